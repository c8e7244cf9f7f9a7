"""Is a method close enough to Retrain? The MeGU issue's targets, checked on a benchmark's output.

The targets are margins around Retrain, the model that never saw the forgotten data (docs/method.md
section 4): Df at most 2 points above Retrain's, Dr at least Retrain's minus 1, the membership
score (``mia_entropy_lr``) within 5 points of Retrain's, related-class accuracy at least Retrain's
minus 2, avg gap at most 2 points, and the method's time at most 10 % of Retrain's training time.
As the issue states them, they hold for the mean over seeds; how many seeds meet every target on
their own is reported beside it, because a mean can hide one bad seed. Beside it too: Retrain's
own spread, the avg gap between two of its seeds. In the class scenarios seeds differ only in
initialisation and batch order (the forgotten set is the class), so that is how far a second
Retrain would land from the first: where it exceeds a margin, the margin is tighter than Retrain
can reproduce itself. (In the random scenario the seed also redraws the forgotten samples.)

``check_targets(benchmark)`` reads ``benchmark.json``'s content (:mod:`megu_jax.harness.benchmark`);
``targets_markdown`` renders one row per scenario. ``experiments/check_targets.py`` is the command.
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, Sequence

import numpy as np

from megu_jax import metrics


@dataclasses.dataclass(frozen=True)
class Targets:
  """Margins around Retrain, as fractions (0.02 = 2 points)."""
  forget_above: float = 0.02       # Df ≤ Retrain's + this
  retain_below: float = 0.01       # Dr ≥ Retrain's − this
  mia_within: float = 0.05         # |MIA − Retrain's| ≤ this
  related_below: float = 0.02      # related ≥ Retrain's − this
  max_avg_gap: float = 0.02        # avg gap ≤ this
  max_time_fraction: float = 0.10  # time_s ≤ this × Retrain's time_s


# The targets' names, in report order; and the metrics a benchmark cell must hold for them.
TARGET_NAMES = ("Df", "Dr", "MIA", "related", "avg gap", "time")
_METRICS = ("forget_test_acc", "retain_test_acc", "mia_entropy_lr", "related_test_acc",
            "avg_gap", "time_s")


def differences(method: Mapping[str, float], retrain: Mapping[str, float]) -> dict[str, float]:
  """The method against Retrain on one seed: differences of Df, Dr, MIA, related (method minus
  Retrain), its avg gap, and its time as a fraction of Retrain's."""
  missing = [k for k in _METRICS if k not in method or (k != "avg_gap" and k not in retrain)]
  if missing:
    raise ValueError(f"metrics {missing} are missing: a benchmark cell needs all of {_METRICS}")
  retrain_time = float(retrain["time_s"])
  return {
      "Df": float(method["forget_test_acc"]) - float(retrain["forget_test_acc"]),
      "Dr": float(method["retain_test_acc"]) - float(retrain["retain_test_acc"]),
      "MIA": float(method["mia_entropy_lr"]) - float(retrain["mia_entropy_lr"]),
      "related": float(method["related_test_acc"]) - float(retrain["related_test_acc"]),
      "avg gap": float(method["avg_gap"]),
      "time": float(method["time_s"]) / retrain_time if retrain_time > 0 else float("inf"),
  }


def failed_targets(values: Mapping[str, float], targets: Targets = Targets()) -> list[str]:
  """The names of the targets ``values`` (as from :func:`differences`) misses, in report order."""
  # How far each value lies past its margin; > 0 is a miss.
  excess = {
      "Df": values["Df"] - targets.forget_above,
      "Dr": -targets.retain_below - values["Dr"],
      "MIA": abs(values["MIA"]) - targets.mia_within,
      "related": -targets.related_below - values["related"],
      "avg gap": values["avg gap"] - targets.max_avg_gap,
      "time": values["time"] - targets.max_time_fraction,
  }
  # A tolerance: a margin met exactly (Df +2.0 against 2 points) must not fail on float rounding.
  return [name for name in TARGET_NAMES if excess[name] > 1e-9]


def check_targets(benchmark: Mapping[str, Any], method: str = "megu",
                  targets: Targets = Targets()) -> list[dict[str, Any]]:
  """One row per scenario of ``benchmark``: ``method`` against Retrain, mean over seeds.

  Each row: ``scenario`` (as the benchmark labels it), ``seeds`` (how many have both cells),
  ``mean`` (name -> mean over those seeds of :func:`differences`), ``failed`` (the targets the
  mean misses), ``seeds_meeting_all`` (seeds whose own values meet every target) and
  ``retrain_spread`` (:func:`retrain_spread`).
  A scenario without both ``method`` and ``retrain`` cells is left out; if none has them, the
  benchmark cannot answer and this raises ``ValueError`` naming what it holds.
  """
  # Scenario label -> (method's metrics, Retrain's metrics) per seed.
  pairs: dict[str, list[tuple[Mapping[str, float], Mapping[str, float]]]] = {}
  for cell in benchmark.get("cells", ()):
    methods = cell.get("methods", {})
    if method in methods and "retrain" in methods:
      pairs.setdefault(f"{cell['scenario']} {cell['forget']}", []).append(
          (methods[method], methods["retrain"]))
  if not pairs:
    held = sorted({name for cell in benchmark.get("cells", ()) for name in cell.get("methods", {})})
    raise ValueError(f"no benchmark cell holds both {method!r} and 'retrain' (methods present: "
                     f"{held}); run the benchmark with both")
  rows = []
  for label, seed_pairs in pairs.items():
    runs = [differences(result, retrain) for result, retrain in seed_pairs]
    mean = {name: float(np.mean([run[name] for run in runs])) for name in TARGET_NAMES}
    rows.append({"scenario": label, "seeds": len(runs), "mean": mean,
                 "failed": failed_targets(mean, targets),
                 "seeds_meeting_all": sum(not failed_targets(run, targets) for run in runs),
                 "retrain_spread": retrain_spread([retrain for _, retrain in seed_pairs])})
  return rows


def retrain_spread(retrain_runs: Sequence[Mapping[str, float]]) -> float | None:
  """Mean avg gap (Dr, Df, MIA) between every two of Retrain's seeds; None with fewer than two."""
  pairs = list(itertools.combinations(retrain_runs, 2))
  if not pairs:
    return None
  return float(np.mean([metrics.avg_gap(a, b) for a, b in pairs]))


def targets_markdown(rows: Sequence[Mapping[str, Any]], method: str = "megu",
                     targets: Targets = Targets()) -> str:
  """A table: per scenario the mean differences, the targets missed, and seeds meeting all."""
  points = lambda value: f"{100 * value:+.1f}"
  lines = [
      f"# {method} against Retrain: the targets", "",
      f"Means over seeds, in points (method minus Retrain); time as a share of Retrain's. Targets: "
      f"Df ≤ +{100 * targets.forget_above:g}, Dr ≥ −{100 * targets.retain_below:g}, "
      f"|MIA| ≤ {100 * targets.mia_within:g}, related ≥ −{100 * targets.related_below:g}, "
      f"avg gap ≤ {100 * targets.max_avg_gap:g}, time ≤ {100 * targets.max_time_fraction:g} %.",
      "Last column: the avg gap between two of Retrain's own seeds (mean over pairs).",
      "", "| scenario | seeds | Df | Dr | MIA | related | avg gap | time | missed (mean) | "
      "seeds meeting every target | Retrain vs Retrain |",
      "|---|---|---|---|---|---|---|---|---|---|---|"]
  for row in rows:
    mean = row["mean"]
    spread = "–" if row["retrain_spread"] is None else f"{100 * row['retrain_spread']:.1f}"
    lines.append(
        f"| {row['scenario']} | {row['seeds']} | {points(mean['Df'])} | {points(mean['Dr'])} | "
        f"{points(mean['MIA'])} | {points(mean['related'])} | {100 * mean['avg gap']:.1f} | "
        f"{100 * mean['time']:.1f} % | {', '.join(row['failed']) or 'none'} | "
        f"{row['seeds_meeting_all']} of {row['seeds']} | {spread} |")
  met = sum(not row["failed"] for row in rows)
  lines += ["", f"Every target met on the mean: {met} of {len(rows)} scenarios."]
  return "\n".join(lines) + "\n"


# --- against Retrain's distribution (ensembles) --------------------------------------------------
# The per-example statistics an ensemble run reports, as (family, statistic); lower is closer to
# Retrain. The headline is the one that best separates doing nothing from the floor at the N used.
KL_STATISTICS = (("klom", "p95"), ("klom", "mean"), ("gaussian_kl", "mean"),
                 ("gaussian_kl", "p95"))


def _interval(entry: Mapping, statistic: str) -> list[float] | None:
  return entry.get(f"{statistic}_ci95")


def _references(summary: Mapping, n: int | None) -> Mapping:
  if n is None or n == summary["ensemble_size"]:
    return summary["methods"]
  if str(n) not in summary.get("references_at", {}):
    raise ValueError(f"this ensemble run has no references at N = {n} (sizes: "
                     f"{sorted(summary.get('references_at', {}))} and {summary['ensemble_size']})")
  return summary["references_at"][str(n)]


def separation(summary: Mapping, family: str, statistic: str, split: str = "forget",
               n: int | None = None) -> float:
  """How far doing nothing lies above the floor, with ``n`` models per ensemble (default: the
  run's size): the lower end of the original's 95 % interval over the upper end of the floor's,
  minus 1.

  Above 0: the two intervals are disjoint, the statistic tells a model that forgot nothing from
  Retrain at this N, and the larger the clearer. At or below 0: they overlap. (A ratio, not a
  difference in interval widths: at small N the binned KLoM's intervals collapse to a point near
  its ceiling, and widths would make that look decisive.)
  """
  references = _references(summary, n)
  original = references["original"][family][split]
  floor = references["retrain"][family][split]
  original_low = (_interval(original, statistic) or (original[statistic],))[0]
  floor_high = (_interval(floor, statistic) or (floor[statistic], floor[statistic]))[1]
  return float(original_low / max(floor_high, 1e-12) - 1.0)


def headline_statistic(summaries: Sequence[Mapping], n: int | None = None) -> tuple[str, str]:
  """The (family, statistic) whose worst separation over ``summaries`` at ``n`` models per
  ensemble (default: their size) is largest: the one that tells doing nothing from Retrain
  best on every scenario."""
  return max(KL_STATISTICS,
             key=lambda fs: min(separation(s, *fs, n=n) for s in summaries))


def against_floor(summary: Mapping, method: str, family: str, statistic: str
                  ) -> dict[str, dict[str, Any]]:
  """Per split: the method's value, the floor's 95 % interval at the method's N, and whether the
  method lies within what the floor scores (at or below its upper bound)."""
  entry = summary["methods"][method]
  rows = {}
  for split in ("forget", "retain", "val"):
    value = entry[family][split][statistic]
    floor = entry["floor"][family][split]
    low, high = _interval(floor, statistic) or (floor[statistic], floor[statistic])
    rows[split] = {"value": value, "floor": floor[statistic], "floor_ci95": [low, high],
                   "within_floor": bool(value <= high)}
  quality = entry["forgetting_quality"]
  floor_quality = entry["floor"]["forgetting_quality"]
  rows["F"] = {"value": quality["F"], "floor": floor_quality["F"],
               "floor_ci95": floor_quality["F_ci95"],
               "within_floor": bool(quality["F"] >= floor_quality["F_ci95"][0])}
  return rows


def against_baselines(summary: Mapping, family: str, statistic: str, method: str = "megu",
                      references: Sequence[str] = ("original", "retrain")) -> dict[str, Any]:
  """The MeGU issue's per-row test: is ``method``'s forget value the lowest of every method of
  the row (``references`` left out), with its retain and val values at or below the best
  baseline's upper 95 % bound on each? Also names the baseline closest on forget."""
  entry = summary["methods"][method]
  baselines = {name: e for name, e in summary["methods"].items()
               if name != method and name not in references}
  if not baselines:
    raise ValueError(f"row {summary.get('scenario')} {summary.get('forget')} has no baseline "
                     f"beside {method!r} (methods: {sorted(summary['methods'])})")
  value = lambda e, split: e[family][split][statistic]
  closest = min(baselines, key=lambda name: value(baselines[name], "forget"))
  keeps = {}
  for split in ("retain", "val"):
    best = min(baselines.values(), key=lambda e: value(e, split))[family][split]
    upper = (_interval(best, statistic) or (best[statistic], best[statistic]))[1]
    keeps[split] = bool(value(entry, split) <= upper)
  return {"closest_baseline": closest,
          "lowest_forget": bool(all(value(entry, "forget") < value(e, "forget")
                                    for e in baselines.values())),
          "keeps_retain_val": bool(all(keeps.values())), "keeps": keeps}


def floor_markdown(summaries: Sequence[Mapping], method: str, family: str, statistic: str) -> str:
  """One row per scenario: the method's value and the floor's interval on every split, and F."""
  label = statistic.upper() if statistic.startswith("p") else statistic
  name = f"{'KLoM' if family == 'klom' else 'Gaussian KL'} {label}"
  lines = [f"`{method}` against Retrain's distribution ({name} per split; F: the forgetting "
           "quality). A value is within the floor when it lies at or below the upper end of the "
           "floor's 95 % interval (for F: at or above its lower end); the floor is a second "
           "Retrain ensemble of the method's size scored against the oracles.", "",
           "| scenario | N | forget | retain | val | F | within the floor on |",
           "|---|---|---|---|---|---|---|"]
  for summary in summaries:
    if method not in summary["methods"]:
      continue
    rows = against_floor(summary, method, family, statistic)
    cells = [f"{r['value']:.3f} (floor {r['floor_ci95'][0]:.3f}–{r['floor_ci95'][1]:.3f})"
             for r in rows.values()]
    met = [split for split, r in rows.items() if r["within_floor"]]
    forget = ", ".join(summary["forget"]) or f"{summary['forget_size']} random"
    lines.append(f"| {summary['scenario']} {forget} | {summary['methods'][method]['ensemble_size']}"
                 f" | " + " | ".join(cells) + f" | {', '.join(met) or 'none'} |")
  return "\n".join(lines) + "\n"
