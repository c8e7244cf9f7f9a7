"""The benchmark: every method x scenario x seed, resumable cell by cell, aggregated over seeds.

``run_benchmark(config, workdir)`` reuses one original and one Retrain model per seed and split
(under ``workdir/models``, shared with :mod:`megu_jax.harness.experiment`), writes each finished
method's result as its own file ``workdir/cells/<scenario>_<what>_seed<s>/methods/<method>.json``
(atomically), and
skips those on a rerun: a killed benchmark continues where it stopped. At the end it writes
``benchmark.json`` (every cell plus mean and standard deviation), ``benchmark.md`` and plots.
"""
from __future__ import annotations

import copy
import json
import logging
import os
from typing import Any

import ml_collections
import numpy as np
import tqdm

from megu_jax import io_utils
from megu_jax import metrics
from megu_jax.harness import experiment
from megu_jax.harness import provenance
from megu_jax.harness import reporting

logger = logging.getLogger(__name__)

SUMMARY_METRICS = ("retain_test_acc", "forget_test_acc", "mia_entropy_lr", "avg_gap", "time_s",
                   "related_test_acc", "probe_forget_acc", "mia_confidence_svc", "test_acc")


def parse_scenarios(text: str) -> list[tuple[str, str]]:
  """``"full_class:Shirt;sub_class:Sneaker;random:100"`` -> [(scenario, what), ...].

  ``what`` is the forgotten class names (comma-separated) or, for ``random``, the sample count.
  """
  scenarios = []
  for item in (part.strip() for part in str(text).split(";")):
    if not item:
      continue
    scenario, sep, what = item.partition(":")
    if not sep or not what.strip():
      raise ValueError(f"config.benchmark_scenarios item {item!r} must read SCENARIO:WHAT, e.g. "
                       "full_class:Shirt or random:100")
    scenarios.append((scenario.strip(), what.strip()))
  if not scenarios:
    raise ValueError("config.benchmark_scenarios is empty")
  return scenarios


def cell_config(config: ml_collections.ConfigDict, scenario: str, what: str,
                seed: int) -> ml_collections.ConfigDict:
  cell = copy.deepcopy(config)
  with cell.unlocked():
    cell.scenario, cell.seed = scenario, seed
    if scenario == "random":
      # random:100@2 is draw 2 of 100 samples; without @, the draw follows the seed.
      size, _, draw = what.partition("@")
      try:
        cell.forget_size = int(size)
        if draw:
          cell.split_seed = int(draw)
      except ValueError:
        raise ValueError(f"config.benchmark_scenarios: random:{what!r} needs a sample count "
                         "(and, after @, a draw number)") from None
      cell.forget = ""
    else:
      cell.forget = what
  return cell


def cell_name(scenario: str, what: str, seed: int) -> str:
  return f"{scenario}_{experiment._slug(what)}_seed{seed}"


def run_ensemble_benchmark(config: ml_collections.ConfigDict, workdir: str,
                           models_root: str | None = None) -> dict[str, Any]:
  """``config.ensemble_size`` > 0: one ensemble run per scenario (:mod:`.ensemble`), sharing
  the models under ``models_root`` (default ``workdir/models``); writes ``benchmark.json`` (every scenario's
  ``ensemble.json`` content) and ``benchmark.md``. Each scenario's own outputs are under ``workdir/ensembles/<scenario>_<what>``.
  """
  from megu_jax.harness import ensemble  # noqa: PLC0415 (the seed-cell benchmark needs none of it)
  from megu_jax.harness import ensemble_report  # noqa: PLC0415
  scenarios = parse_scenarios(config.benchmark_scenarios)
  configs = {item: cell_config(config, *item, seed=config.seed) for item in scenarios}
  for item, cell in configs.items():  # every scenario checked before any training
    ensemble.validate(cell)
  models_root = models_root or os.path.join(workdir, "models")
  summaries = []
  for (scenario, what), cell in configs.items():
    directory = os.path.join(workdir, "ensembles", f"{scenario}_{experiment._slug(what)}")
    summaries.append(ensemble.run_ensemble(cell, directory, models_root=models_root))
  benchmark = {"dataset": config.dataset, "ensemble_size": config.ensemble_size,
               "scenarios": summaries, "provenance": provenance.record()}
  io_utils.atomic_write_json(os.path.join(workdir, "benchmark.json"), benchmark)
  io_utils.atomic_write_text(os.path.join(workdir, "benchmark.md"), "\n".join(
      ensemble_report.markdown(summary) for summary in summaries))
  return benchmark


def run_benchmark(config: ml_collections.ConfigDict, workdir: str,
                  models_root: str | None = None) -> dict[str, Any]:
  """Runs or resumes every cell; returns (and writes) the aggregated benchmark. Trained models
  live under ``models_root`` (default ``workdir/models``): keyed by recipe and seed, one folder
  can serve several workdirs.

  With ``config.ensemble_size`` > 0 the cells are ensembles (:func:`run_ensemble_benchmark`).
  """
  if config.get("ensemble_size", 0):
    return run_ensemble_benchmark(config, workdir, models_root)
  if config.seeds <= 0:
    raise ValueError(f"config.seeds={config.seeds} must be positive")
  scenarios = parse_scenarios(config.benchmark_scenarios)
  cells = [(scenario, what, seed) for seed in range(config.seeds) for scenario, what in scenarios]
  # Validate every cell before any training: a typo in the last scenario must not cost an hour.
  checked = {cell: experiment.validate_before_compute(cell_config(config, *cell))
             for cell in cells}
  methods = next(iter(checked.values()))[2]
  models_root = models_root or os.path.join(workdir, "models")
  bar = tqdm.tqdm(total=len(cells) * len(methods), unit="run", dynamic_ncols=True,
                  disable=not config.get("progress", True))
  records = []
  for cell in cells:
    directory = os.path.join(workdir, "cells", cell_name(*cell))
    done = {m: _read_cell(directory, m) for m in methods}
    missing = [m for m in methods if done[m] is None]
    bar.update(len(methods) - len(missing))
    if missing:
      setting = experiment.prepare(cell_config(config, *cell), directory,
                                   models_root=models_root, checked=checked[cell])
      for method in missing:
        bar.set_description(f"{method} | {cell[0]} {cell[1]} | seed {cell[2]}")
        result, per_class = experiment.run_method(setting, method)
        done[method] = {"metrics": result, "per_class_test_acc": per_class.tolist()}
        io_utils.atomic_write_json(os.path.join(directory, "methods", f"{method}.json"),
                                   done[method])
        bar.update(1)
    results = {m: dict(done[m]["metrics"]) for m in methods}
    experiment.add_avg_gaps(results)
    records.append({"scenario": cell[0], "forget": cell[1], "seed": cell[2], "methods": results})
  bar.close()

  benchmark = {"dataset": config.dataset, "seeds": config.seeds, "methods": list(methods),
               "cells": records, "summary": summarize(records),
               "provenance": provenance.record()}
  io_utils.atomic_write_json(os.path.join(workdir, "benchmark.json"), benchmark)
  io_utils.atomic_write_text(os.path.join(workdir, "benchmark.md"),
                             benchmark_markdown(benchmark))
  reporting.plot_benchmark(benchmark, workdir)
  return benchmark


def _read_cell(directory: str, method: str) -> dict | None:
  path = os.path.join(directory, "methods", f"{method}.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      record = json.load(f)
    record["metrics"]["time_s"]  # a record from an older format is redone, not trusted
    return record
  except (ValueError, KeyError, TypeError) as error:
    logger.warning("%s is damaged or of an older format (%s: %s); running %s again", path,
                   type(error).__name__, error, method)
    return None


def summarize(records: list[dict]) -> dict[str, dict[str, dict]]:
  """``{"scenario what": {method: {metric: {"mean", "std", "n"}}}}`` over the seeds."""
  summary: dict[str, dict[str, dict]] = {}
  for record in records:
    label = f"{record['scenario']} {record['forget']}"
    for method, values in record["methods"].items():
      summary.setdefault(label, {}).setdefault(method, []).append(values)
  return {label: {method: metrics.aggregate(runs) for method, runs in by_method.items()}
          for label, by_method in summary.items()}


def benchmark_markdown(benchmark: dict) -> str:
  """Mean ± std per method and scenario, columns in the literature's order (Dr, Df, MIA, gap,
  time)."""
  columns = [(key, title) for key, title in reporting.TABLE_COLUMNS if key in SUMMARY_METRICS]
  lines = [f"# Benchmark on {benchmark['dataset']}: {benchmark['seeds']} seed(s)", "",
           "Mean ± standard deviation over seeds; accuracies and MIA in %, time in seconds "
           "(Retrain: its training time).", ""]
  for label, by_method in benchmark["summary"].items():
    lines += [f"## {label}", "", "| method | " + " | ".join(t for _, t in columns) + " |",
              "|---|" + "---|" * len(columns)]
    for method, stats in by_method.items():
      cells = []
      for key, _ in columns:
        if key not in stats:
          cells.append("–")
          continue
        mean, std = stats[key]["mean"], stats[key]["std"]
        cell = reporting.format_value(key, mean)
        if stats[key]["n"] > 1 and np.isfinite(std):
          cell += " ± " + reporting.format_value(key, std)
        cells.append(cell)
      lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
  return "\n".join(lines)
