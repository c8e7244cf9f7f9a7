"""What unlearning costs: each method's wall time relative to Retrain's, MeGU's by phase.

``experiments.bench_unlearning`` writes what these functions return. A cost record holds a
method's ``time_s`` (its call without compilation), ``compile_s`` and its own phase timings;
``relative_to_retrain`` divides ``time_s`` by Retrain's training time *of the same cell* (one
scenario, split and seed, so both ran on the same data on the same machine). Run here
(:func:`run_methods`), every method and Retrain is called twice, and ``time_s`` is the second
call's (:func:`cold_and_warm`).
"""
from __future__ import annotations

import glob
import json
import os
import time
import zlib
from typing import Any, Callable

import jax
import numpy as np

from megu_jax import unlearning
from megu_jax.harness import experiment

MEGU_PHASES = ("transition_s", "noise_s", "finetune_s")


def method_cost(record: dict, retrain: dict) -> dict:
  """One method's timings and ratios to Retrain's (both dicts with ``time_s``, ``compile_s``)."""
  cost = {k: float(v) for k, v in record.items() if k.endswith("_s")}
  cost.setdefault("compile_s", 0.0)
  retrain_time = float(retrain["time_s"])
  retrain_total = retrain_time + float(retrain.get("compile_s", 0.0))
  if retrain_time > 0:
    cost["relative_to_retrain"] = cost["time_s"] / retrain_time
    cost["relative_to_retrain_with_compile"] = (cost["time_s"] + cost["compile_s"]) / retrain_total
  return cost


def megu_phases(cost: dict, oracle_s: float | None = None) -> dict:
  """MeGU's phases in seconds, ``other_s`` (the rest of its call) and each one's share of it.

  With the stand-in's margin targets, their time (``stand_in_s``, the heads' training and
  scoring) is a phase of its own and ``transition_s`` keeps the rest of the guidance.
  ``oracle_s`` (building T before MeGU is called) is reported beside them, outside the shares:
  it is not part of MeGU's ``time_s``.
  """
  phases = {k: cost[k] for k in MEGU_PHASES if k in cost}
  if "stand_in_s" in cost and "transition_s" in phases:
    phases["stand_in_s"] = cost["stand_in_s"]
    phases["transition_s"] -= cost["stand_in_s"]
  phases["other_s"] = cost["time_s"] - sum(phases.values())
  total = cost["time_s"]
  phases["shares"] = {k: v / total for k, v in phases.items() if total > 0}
  if oracle_s is not None:
    phases["oracle_s"] = oracle_s
  return phases


def summarize(cells: dict[str, dict]) -> dict:
  """Mean and spread over cells of each method's ratio to Retrain."""
  by_method: dict[str, list[dict]] = {}
  for methods in cells.values():
    for name, cost in methods.items():
      by_method.setdefault(name, []).append(cost)
  summary = {}
  for name, costs in by_method.items():
    entry = {"cells": len(costs)}
    for key in ("time_s", "compile_s", "relative_to_retrain", "relative_to_retrain_with_compile",
                *MEGU_PHASES):
      values = [c[key] for c in costs if key in c]
      if values:
        entry[key] = {"mean": float(np.mean(values)), "min": float(np.min(values)),
                      "max": float(np.max(values))}
    summary[name] = entry
  return summary


def from_benchmark(directory: str) -> dict:
  """Costs of every cell of a benchmark workdir that has Retrain's record."""
  cells = {}
  for cell_dir in sorted(glob.glob(os.path.join(directory, "cells", "*"))):
    records = {}
    for path in sorted(glob.glob(os.path.join(cell_dir, "methods", "*.json"))):
      try:
        with open(path) as f:
          records[os.path.basename(path)[:-len(".json")]] = json.load(f)["metrics"]
      except (OSError, json.JSONDecodeError, KeyError):
        continue  # a half-written or old-format record: the benchmark will redo it
    if "retrain" not in records:
      continue
    # "original" does nothing (time 0): no cost to report.
    methods = {name: method_cost(record, records["retrain"]) for name, record in records.items()
               if "time_s" in record and name != "original"}
    if "megu" in methods:
      methods["megu"]["phases"] = megu_phases(methods["megu"])
    cells[os.path.basename(cell_dir)] = methods
  if not cells:
    raise FileNotFoundError(f"no cell under {directory}/cells has a retrain.json: is it a "
                            "benchmark workdir (python -m experiments.benchmark)?")
  return {"source": {"benchmark": os.path.abspath(directory)}, "cells": cells,
          "summary": summarize(cells)}


def cold_and_warm(call: Callable[[dict], Any]) -> dict:
  """Times ``call(timings)`` twice in this process: a cold call, then the same call again.

  A method's first call in a process costs more than the compilation its own ``compile_s``
  counts (the first call of each compiled step): JAX compiles every operation run outside a
  compiled step on its first use, and XLA builds some kernels at their first execution. The
  second call finds all of that done, so its wall time less its own ``compile_s`` is the
  method's work (``time_s``); ``compile_s`` is the rest of the cold call, so that ``time_s +
  compile_s`` is the cold call's wall time (``wall_s``). The phase timings are the warm call's.
  """
  def timed() -> tuple[dict, float]:
    timings: dict[str, float] = {}
    start = time.perf_counter()
    call(timings)
    return timings, time.perf_counter() - start
  _, cold_wall = timed()
  timings, warm_wall = timed()
  work = warm_wall - float(timings.get("compile_s", 0.0))
  return {**{k: float(v) for k, v in timings.items()}, "time_s": work,
          "compile_s": cold_wall - work, "wall_s": cold_wall, "warm_wall_s": warm_wall}


def run_methods(config, workdir: str, models_root: str | None) -> dict:
  """Runs every method of ``config.methods`` (and Retrain) here, each twice with the same key
  (:func:`cold_and_warm`), and times them."""
  checked = experiment.validate_before_compute(config)
  setting = experiment.prepare(config, workdir, models_root=models_root, checked=checked)
  records = {}
  for name in checked[2]:
    if name == "original":
      continue  # does nothing: nothing to time
    key = jax.random.fold_in(jax.random.key(config.seed), zlib.crc32(name.encode()))
    method = unlearning.get_method(name)

    def call(timings, method=method, key=key):
      unlearned = method(setting.original, setting.forget_data, setting.retain_data,
                         setting.method_config, key, timings=timings)
      jax.block_until_ready(unlearned.state)

    records[name] = cold_and_warm(call)
    print(f"{name}: {records[name]['time_s']:.1f} s (+{records[name]['compile_s']:.1f} s "
          "compile and first-call costs)", flush=True)
  methods = {name: method_cost(record, records["retrain"]) for name, record in records.items()}
  if "megu" in methods:
    methods["megu"]["phases"] = megu_phases(methods["megu"],
                                            setting.transition_info.get("transition_s"))
  cell = f"{config.scenario}_{config.forget or config.forget_size}_seed{config.seed}"
  cells = {cell: methods}
  return {"source": {"run": True, "dataset": config.dataset, "scenario": config.scenario,
                     "forget": str(config.forget), "seed": int(config.seed),
                     "epochs": int(config.epochs)},
          "cells": cells, "summary": summarize(cells)}


def print_table(result: dict) -> None:
  """Mean time and ratio per method, fastest first; MeGU's phases below."""
  print(f"{'method':<14} {'time_s':>9} {'compile_s':>9} {'x Retrain':>9} {'x (w/ compile)':>14}")
  for name, entry in sorted(result["summary"].items(),
                            key=lambda item: item[1].get("time_s", {}).get("mean", 0)):
    def mean(key):
      return entry[key]["mean"] if key in entry else float("nan")
    print(f"{name:<14} {mean('time_s'):>9.1f} {mean('compile_s'):>9.1f} "
          f"{mean('relative_to_retrain'):>9.3f} {mean('relative_to_retrain_with_compile'):>14.3f}")
  megu = [m["megu"]["phases"] for m in result["cells"].values() if "megu" in m]
  if megu:
    keys = [k for k in megu[0] if k.endswith("_s")]
    print("MeGU phases (mean s): " + ", ".join(
        f"{k[:-2]} {np.mean([p[k] for p in megu if k in p]):.1f}" for k in keys))
