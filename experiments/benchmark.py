r"""The benchmark: every method x scenario x seed, resumable, aggregated into tables and plots.

  python -m experiments.benchmark --config=megu_jax/configs/fashion_mnist.py \
      --workdir=runs/benchmark --config.methods=all --config.seeds=3

Scenarios come from ``--config.benchmark_scenarios`` (default
``full_class:Shirt;sub_class:Sneaker;random:100``). A rerun skips every finished cell. Writes
``benchmark.json``, ``benchmark.md``, ``dr_vs_df.png``, ``mia.png`` and ``time.png``.
``--models_root=DIR`` shares trained models with other runs (default WORKDIR/models).
Failures print one line ``error: ...`` (``--verbose``: with the traceback); docs/failures.md
lists them.
"""
from absl import flags
from ml_collections import config_flags

from megu_jax.harness import benchmark
from megu_jax.harness import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for models, cells and tables.")
_MODELS_ROOT = flags.DEFINE_string("models_root", None,
                                   "Where the trained models live (default: WORKDIR/models).")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  benchmark.run_benchmark(_CONFIG.value, _WORKDIR.value, models_root=_MODELS_ROOT.value)
  with open(f"{_WORKDIR.value}/benchmark.md") as f:
    print(f.read())


if __name__ == "__main__":
  cli.run(main)
