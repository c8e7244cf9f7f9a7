r"""Side-by-side runs of methods and setting variants against Retrain, on already trained models.

The tool behind the tuning tables of docs/tuning.md: each ``--run`` is a method name, optionally followed by ``;section.field=value`` overrides (``section.sub.field``
inside a nested section), and prints its Dr, Df, MIA, related, probe, avg gap and time against
Retrain. Trains or resumes the original and Retrain models under ``--models_root`` first (a
benchmark's ``models/`` is reused).

  python -m experiments.compare_methods --scenario=full_class --forget=Shirt --seed=0 \
    --models_root=runs/benchmark/models --out=runs/compare.jsonl \
    --run=megu --run="megu;megu.guidance_temperature=1.0" --run="megu;megu.max_grad_norm=0"

``--config`` (default: the Fashion-MNIST config) takes overrides as every command does, e.g.
``--config.epochs=4 --config.train_subset=0`` for the retired recipe of docs/tuning.md.
"""
import copy
import dataclasses
import json
import os

from absl import flags
from absl import logging
from ml_collections import config_flags

from megu_jax.harness import ablations
from megu_jax.harness import cli
from megu_jax.harness import experiment

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "megu_jax", "configs", "fashion_mnist.py"),
    "Path to a config file.", lock_config=False)
_SCENARIO = flags.DEFINE_enum("scenario", "full_class", ["full_class", "sub_class", "random"],
                              "What kind of forgetting.")
_FORGET = flags.DEFINE_string("forget", "Shirt", "Class names, or the sample count for random.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the trained models and the split.")
_MODELS_ROOT = flags.DEFINE_string("models_root", "runs/benchmark/models",
                                   "Where the original and Retrain models live (or will).")
_WORKDIR = flags.DEFINE_string("workdir", "runs/compare", "Split and T of this comparison.")
_OUT = flags.DEFINE_string("out", "runs/compare.jsonl", "Each run's metrics are appended here.")
_RUNS = flags.DEFINE_multi_string("run", ["megu"], "METHOD[;section.field=value...], repeatable.")


def main():
  logging.set_verbosity(logging.WARNING)
  config = copy.deepcopy(_CONFIG.value)
  config.progress = False
  config.scenario, config.seed = _SCENARIO.value, _SEED.value
  if config.scenario == "random":
    config.forget_size = int(_FORGET.value)
  else:
    config.forget = _FORGET.value
  setting = experiment.prepare(config, _WORKDIR.value, models_root=_MODELS_ROOT.value)
  reference, _ = experiment.run_method(setting, "retrain")
  for run in _RUNS.value:
    name, *overrides = run.split(";")
    method_config = copy.deepcopy(setting.method_config)
    for override in overrides:
      path, value = override.split("=", 1)
      *sections, field = path.split(".")  # e.g. megu.random_scenario.learning_rate
      target = method_config
      for section in sections:
        target = target[section]
      target[field] = ablations.parse_value(value)
    result, _ = experiment.run_method(
        dataclasses.replace(setting, method_config=method_config), name)
    experiment.add_avg_gaps({"retrain": reference, name: result})
    pct = lambda key: 100 * result[key]
    print(f"{run:60s}\n  Dr {pct('retain_test_acc'):.1f} Df {pct('forget_test_acc'):.1f} "
          f"MIA {pct('mia_entropy_lr'):.1f} (Retrain {100 * reference['mia_entropy_lr']:.1f}) "
          f"related {pct('related_test_acc'):.1f} probe {pct('probe_forget_acc'):.1f} "
          f"gap {pct('avg_gap'):.2f} time {result['time_s']:.1f}s", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(_OUT.value)), exist_ok=True)
    with open(_OUT.value, "a") as f:
      f.write(json.dumps({"run": run, "seed": config.seed, "scenario": config.scenario,
                          **result}) + "\n")


if __name__ == "__main__":
  cli.run(main)
