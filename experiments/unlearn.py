r"""The main job: make a trained model forget, and compare it with Retrain and the original.

  python -m experiments.unlearn --config=megu_jax/configs/fashion_mnist.py --workdir=runs/demo

Trains (or resumes) the original and the Retrain model, builds T from ``config.megu.transition``
(the prototype oracle unless ``--config.megu.transition=PATH`` names a .npy), runs
``--config.methods`` and writes ``results.json``, ``report.md``, ``per_class_accuracy.png`` and
``transition.png`` into the workdir.
Select the rest with ``--config.scenario`` (full_class | sub_class | random), ``--config.forget``
(comma-separated names), ``--config.forget_size=N`` (random) and ``--config.seed``.

Running the same command again after a kill resumes the reference models' training from their
checkpoints; results are written atomically at the end. Failures print one line ``error: ...``
(``--verbose``: with the traceback); docs/failures.md lists them.
"""
from absl import flags
from ml_collections import config_flags

from megu_jax.harness import cli
from megu_jax.harness import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for models, results and plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  experiment.run_unlearning(_CONFIG.value, _WORKDIR.value)
  with open(f"{_WORKDIR.value}/report.md") as f:
    print(f.read())


if __name__ == "__main__":
  cli.run(main)
