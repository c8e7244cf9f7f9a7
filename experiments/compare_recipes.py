r"""Which training recipe memorises: train/test accuracy, membership AUC and time per recipe.

  python -m experiments.compare_recipes --config=megu_jax/configs/fashion_mnist.py \
      --workdir=runs/recipes --recipes=10000x30,5000x30,5000x40,10000x20,0x4 \
      --out=results/protocol/recipes.json

Each ``SUBSETxEPOCHS`` item trains the config's original with ``train_subset=SUBSET`` (0: every
image) for ``EPOCHS`` epochs (resumable, in ``WORKDIR/SUBSETxEPOCHS``) and records its
``final_metrics.json``: accuracy on its own training set, test accuracy, the ROC AUC of a
threshold on the per-example margin between its training images and the test images, and its
training time. Writes ``--out`` with the command's provenance.
"""
import copy
import os

from absl import flags
from ml_collections import config_flags

from megu_jax import io_utils
from megu_jax import train
from megu_jax.harness import cli
from megu_jax.harness import provenance

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the recipes' models are trained.")
_RECIPES = flags.DEFINE_list("recipes", ["10000x30"], "SUBSETxEPOCHS items.")
_OUT = flags.DEFINE_string("out", "results/protocol/recipes.json", "Where to write the JSON.")
flags.mark_flags_as_required(["config", "workdir"])


def main():
  rows = []
  for item in _RECIPES.value:
    try:
      subset, epochs = (int(part) for part in item.split("x"))
    except ValueError:
      raise ValueError(f"--recipes item {item!r} must read SUBSETxEPOCHS, e.g. 10000x30") from None
    config = copy.deepcopy(_CONFIG.value)
    config.train_subset, config.epochs = subset, epochs
    final = train.train_and_evaluate(config, os.path.join(_WORKDIR.value, item))
    rows.append({"train_subset": subset, "epochs": epochs, "images_seen": final["steps"]
                 * config.batch_size, **{k: final[k] for k in ("train_acc", "test_acc",
                                                                "margin_auc", "time_s")}})
    print(f"{item}: train {final['train_acc']:.4f}, test {final['test_acc']:.4f}, margin AUC "
          f"{final['margin_auc']:.3f}, {final['time_s']:.0f} s")
  io_utils.atomic_write_json(_OUT.value, {"dataset": _CONFIG.value.dataset, "recipes": rows,
                                          "provenance": provenance.record()})
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  cli.run(main)
