r"""MeGU's ablations against Retrain on one split (see megu_jax/ablations.py).

  python -m experiments.ablations --config=megu_jax/configs/fashion_mnist.py \
      --workdir=runs/ablations [--config.seeds=3] [--gemini=transitions/fashion_mnist_gemini.npy]
"""
from absl import flags
from ml_collections import config_flags

from megu_jax.harness import ablations
from megu_jax.harness import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for models and the ablation tables.")
_GEMINI = flags.DEFINE_string("gemini", None, "A T .npy built with the Gemini oracle (optional).")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  summary = ablations.run(_CONFIG.value, _WORKDIR.value, _GEMINI.value)
  print(ablations.markdown(summary))


if __name__ == "__main__":
  cli.run(main)
