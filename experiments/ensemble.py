r"""Every method against Retrain's distribution, per example, on one split (docs/method.md §4).

  python -m experiments.ensemble --config=megu_jax/configs/fashion_mnist.py --workdir=runs/shirt \
      --config.ensemble_size=16 --config.scenario=full_class --config.forget=Shirt \
      --config.methods=original,retrain,megu,finetune

Trains what is missing of the N originals, N oracle and N floor Retrain models (one after
another; a killed run trains only what is missing, a larger N only the new seeds), runs every
method once from each original (finished runs are kept), and writes ``ensemble.json``,
``ensemble.md``, ``forget_klom_cdf.png``, ``forget_margins.png`` and ``margins/NAME.npz``.
``--config.ensemble_method_sizes="ssd:8;scrub:8"`` runs some methods on fewer originals.
``--models_root=DIR`` shares trained models with other runs. Failures print one line
``error: ...``; docs/failures.md lists them.
"""
from absl import flags
from ml_collections import config_flags

from megu_jax.harness import cli
from megu_jax.harness import ensemble

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results, plots and margins.")
_MODELS_ROOT = flags.DEFINE_string("models_root", None,
                                   "Where the trained models live (default: WORKDIR/models).")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  ensemble.run_ensemble(_CONFIG.value, _WORKDIR.value, models_root=_MODELS_ROOT.value)
  with open(f"{_WORKDIR.value}/ensemble.md") as f:
    print(f.read())


if __name__ == "__main__":
  cli.run(main)
