r"""Trains the original model, or with ``--config.retrain=True`` the Retrain gold standard.

  python -m experiments.train --config=megu_jax/configs/fashion_mnist.py --workdir=runs/fmnist

Running the same command again resumes from the last checkpoint; a finished run is not redone.
SIGTERM or Ctrl-C stops it after the current step with a checkpoint (exit code 143 / 130).
Failures print one line ``error: ...`` (``--verbose``: with the traceback); docs/failures.md
lists them.
"""
from absl import flags
from ml_collections import config_flags

from megu_jax import train
from megu_jax.harness import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and metrics.")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  final = train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                 for k, v in final.items()))


if __name__ == "__main__":
  cli.run(main)
