r"""The main job: make a trained model forget, and compare it with Retrain and the original.

  python -m experiments.unlearn --config=experiments/configs/fashion_mnist.py --workdir=runs/demo

Trains (or resumes) the original and the Retrain model, builds T with the prototype oracle unless
``--config.transition=PATH`` is given, runs ``--config.methods`` and writes ``results.json``,
``report.md``, ``per_class_accuracy.png`` and ``transition.png`` into the workdir.
Select the rest with ``--config.scenario`` (full_class | sub_class | random), ``--config.forget``
(comma-separated names), ``--config.forget_size=N`` (random) and ``--config.seed``.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from megu_jax import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for models, results and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    summary = experiment.run_unlearning(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  with open(f"{_WORKDIR.value}/report.md") as f:
    print(f.read())
  del summary


if __name__ == "__main__":
  app.run(main)
