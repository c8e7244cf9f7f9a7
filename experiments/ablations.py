r"""MeGU's ablations (or any variants of its settings) against Retrain's distribution.

  python -m experiments.ablations --config=megu_jax/configs/fashion_mnist.py --workdir=runs/dev \
      --config.ensemble_size=8 \
      "--config.benchmark_scenarios=full_class:Shirt;full_class:Trouser;sub_class:Sneaker;sub_class:Coat;random:100@0;random:100@1;random:100@2"

Without ``--variants`` it runs the ablations of docs/method.md §2, step 6 (megu_jax/harness/
ablations.py); ``--variants="tau 0.7:guidance_temperature=0.7;no align:align_weight=0"`` runs
those instead (beside the defaults); ``--add_variants`` (same form) runs them beside the ablations.
``--gemini=PATH`` adds a Gemini T; ``--beside=eu_k,neggrad_plus`` scores those baselines beside
the variants, from the same originals. Writes ablations.json and
ablations.md into the workdir; trained models and finished runs are reused.
``--models_root=DIR`` shares trained models with other runs (default WORKDIR/models).
"""
from absl import flags
from ml_collections import config_flags

from megu_jax.harness import ablations
from megu_jax.harness import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for models, runs and the tables.")
_GEMINI = flags.DEFINE_string("gemini", None, "A T .npy built with the Gemini oracle (optional).")
_VARIANTS = flags.DEFINE_string("variants", None,
                                "NAME:field=value[,field=value];... instead of the ablations.")
_ADD_VARIANTS = flags.DEFINE_string("add_variants", None,
                                    "NAME:field=value[,field=value];... beside the ablations.")
_BESIDE = flags.DEFINE_list("beside", [], "Registered baselines (e.g. eu_k,neggrad_plus) to run "
                            "from the same originals and score beside the variants.")
_MODELS_ROOT = flags.DEFINE_string("models_root", None,
                                   "Where the trained models live (default: WORKDIR/models).")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  table = ablations.variant_table(_VARIANTS.value, _ADD_VARIANTS.value, _GEMINI.value)
  summary = ablations.run(_CONFIG.value, _WORKDIR.value, table, models_root=_MODELS_ROOT.value,
                          beside=tuple(_BESIDE.value))
  print(ablations.markdown(summary))


if __name__ == "__main__":
  cli.run(main)
