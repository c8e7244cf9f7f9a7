r"""Trains the original model, or with ``--config.retrain=True`` the Retrain gold standard.

  python -m experiments.train --config=experiments/configs/fashion_mnist.py --workdir=runs/fmnist

Running the same command again resumes from the last checkpoint; a finished run is not redone.
"""
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from megu_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  try:
    final = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in final.items()))


if __name__ == "__main__":
  app.run(main)
