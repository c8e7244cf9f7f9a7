"""MeGU's ablations (docs/method.md §2, step 6) against Retrain, on one split.

  python -m experiments.ablations --config=megu_jax/configs/fashion_mnist.py \
      --workdir=runs/ablations [--config.seeds=3] [--gemini=transitions/fashion_mnist_gemini.npy]

Variants: the noise pair (none / negative only / positive only / both), the source of T (uniform,
prototype, hierarchy, and a Gemini file when given) and sampling vs argmax perturbing labels; each
changes one field of ``config.megu`` from its default. Reuses the trained models of the workdir
(shared with experiments.unlearn when it is the same directory) and writes ``ablations.json`` and
``ablations.md``.
"""
import copy
import dataclasses
import os

import tqdm

from megu_jax import io_utils
from megu_jax import metrics
from megu_jax.harness import experiment
from megu_jax.harness import provenance
from megu_jax.harness import reporting

def variants(gemini_path: str | None) -> dict[str, dict]:
  """Name -> the ``config.megu`` fields it changes (the default is the first, unchanged)."""
  table = {
      "megu (defaults)": {},
      "noise: none": {"noise": "none"},
      "noise: negative only": {"noise": "negative"},
      "noise: positive only": {"noise": "positive"},
      "noise: both": {"noise": "both"},
      "T: uniform": {"transition": "uniform"},
      "T: prototype": {"transition": "prototype"},
      "T: hierarchy": {"transition": "hierarchy"},
      "labels: sample": {"label_mode": "sample"},
      "labels: argmax": {"label_mode": "argmax"},
  }
  if gemini_path:
    table["T: gemini"] = {"transition": gemini_path}
  return table


def run(config, workdir: str, gemini_path: str | None) -> dict:
  table = variants(gemini_path)
  runs: dict[str, list[dict]] = {name: [] for name in ["retrain", *table]}
  bar = tqdm.tqdm(total=config.seeds * len(table), unit="run")
  for seed in range(config.seeds):
    seed_config = copy.deepcopy(config)
    with seed_config.unlocked():
      seed_config.seed = seed
      seed_config.methods = "megu"
    setting = experiment.prepare(seed_config, os.path.join(workdir, f"ablations_seed{seed}"),
                                 models_root=os.path.join(workdir, "models"))
    retrain_result, _ = experiment.run_method(setting, "retrain")
    runs["retrain"].append(retrain_result)
    for name, overrides in table.items():
      bar.set_description(f"{name} | seed {seed}")
      variant_config = copy.deepcopy(setting.method_config)
      with variant_config.unlocked():
        variant_config.megu.update(overrides)
      result, _ = experiment.run_method(
          dataclasses.replace(setting, method_config=variant_config), "megu")
      result["avg_gap"] = metrics.avg_gap(result, retrain_result)
      runs[name].append(result)
      bar.update(1)
  bar.close()
  summary = {"dataset": config.dataset, "scenario": config.scenario, "forget": config.forget,
             "seeds": config.seeds, "variants": table,
             "summary": {name: metrics.aggregate(results) for name, results in runs.items()},
             "provenance": provenance.record()}
  io_utils.atomic_write_json(os.path.join(workdir, "ablations.json"), summary)
  io_utils.atomic_write_text(os.path.join(workdir, "ablations.md"), markdown(summary))
  return summary


def markdown(summary: dict) -> str:
  keys = ("retain_test_acc", "forget_test_acc", "mia_entropy_lr", "avg_gap", "time_s",
          "related_test_acc", "probe_forget_acc")
  titles = dict(reporting.TABLE_COLUMNS)
  lines = [f"# MeGU ablations: {summary['dataset']}, {summary['scenario']} {summary['forget']}, "
           f"{summary['seeds']} seed(s)", "",
           "Means over seeds; accuracies and MIA in %. Each row changes one field of "
           "`config.megu` from the defaults.", "",
           "| variant | " + " | ".join(titles[k] for k in keys) + " |",
           "|---|" + "---|" * len(keys)]
  for name, stats in summary["summary"].items():
    lines.append(f"| {name} | " + " | ".join(
        reporting.format_value(k, stats[k]["mean"]) if k in stats else "–" for k in keys) + " |")
  return "\n".join(lines) + "\n"
