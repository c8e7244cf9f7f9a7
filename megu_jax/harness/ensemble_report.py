"""What an ensemble run writes, and how its ``ensemble.json`` reads in a table.

``write_outputs`` writes a run's ``ensemble.json``, ``ensemble.md``, ``margins/NAME.npz`` (every
model's per-example margins, one float64 array [models, examples] per split, with the example
positions) and two plots: each method's per-example forget KLoM as a CDF, and the oracle and
method margin histograms of the forget examples the original is furthest from Retrain on.
``headline_section`` and ``headline_summary`` render the committed headline runs for the docs.
"""
from __future__ import annotations

import json
import os
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from megu_jax import ensemble_metrics  # noqa: E402
from megu_jax import io_utils  # noqa: E402
from megu_jax.harness import provenance  # noqa: E402

SPLITS = ("forget", "retain", "val")
ALL_CLASS_DIR = os.path.join("ensembles", "all_class")
# Oracle, original and MeGU margins of the forget examples MeGU is furthest from Retrain on.
MEGU_WORST_PLOT = "forget_margins_megu.png"
HEADLINE_DIR = os.path.join("ensembles", "headline")
def _ci(entry: dict, statistic: str) -> list[float] | None:
  return entry.get(f"{statistic}_ci95")


def write_outputs(workdir: str, summary: dict, runs: dict[str, list[dict]],
                  oracle_margins: dict[str, np.ndarray], rows: dict[str, np.ndarray],
                  dataset) -> None:
  margins_dir = os.path.join(workdir, "margins")
  positions = {f"{split}_positions": rows[split] for split in SPLITS}
  io_utils.atomic_save_npz(os.path.join(margins_dir, "oracle.npz"), **oracle_margins, **positions)
  for name, method_runs in runs.items():
    if method_runs:
      stacked = {split: np.stack([r["margins"][split] for r in method_runs]) for split in SPLITS}
      io_utils.atomic_save_npz(os.path.join(margins_dir, f"{name}.npz"), **stacked, **positions)
  plot_klom_cdf(runs, oracle_margins, os.path.join(workdir, "forget_klom_cdf.png"), summary)
  plot_margin_histograms(runs, oracle_margins, os.path.join(workdir, "forget_margins.png"),
                         summary)
  plot_margin_histograms(runs, oracle_margins, os.path.join(workdir, MEGU_WORST_PLOT), summary,
                         worst_of="megu")
  io_utils.atomic_write_json(os.path.join(workdir, "ensemble.json"), summary)
  io_utils.atomic_write_text(os.path.join(workdir, "ensemble.md"), markdown(summary))


def _title(summary: dict) -> str:
  forget = ", ".join(summary["forget"]) or f"{summary['forget_size']} random samples"
  return f"{summary['dataset']}, {summary['scenario']}: forget {forget}"


def plot_klom_cdf(runs, oracle_margins, path: str, summary: dict) -> None:
  fig, ax = plt.subplots(figsize=(6.4, 4.0))
  for name, method_runs in runs.items():
    if len(method_runs) < ensemble_metrics.MIN_MODELS_FORGETTING:
      continue
    method = np.stack([r["margins"]["forget"] for r in method_runs])
    values = np.sort(ensemble_metrics.klom(method, oracle_margins["forget"]))
    ax.plot(values, np.arange(1, len(values) + 1) / len(values),
            label=f"{name} (N={len(method_runs)})", lw=2.2 if name in ("megu", "retrain") else 1.2,
            ls="--" if name == "retrain" else "-")
  ax.set_xlabel("per-example KLoM on the forget split (nats)")
  ax.set_ylabel("fraction of forget examples")
  ax.set_title(_title(summary), fontsize=10)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  _save(fig, path)


def plot_margin_histograms(runs, oracle_margins, path: str, summary: dict, examples: int = 4,
                           worst_of: str = "original") -> None:
  """Oracle, original and MeGU (where run) margins of the forget examples that ``worst_of`` is
  furthest from Retrain on (highest per-example KLoM)."""
  if not runs.get("original") or not runs.get(worst_of):
    return
  original = np.stack([r["margins"]["forget"] for r in runs["original"]])
  oracle = oracle_margins["forget"]
  judged = np.stack([r["margins"]["forget"] for r in runs[worst_of]])
  worst = np.argsort(-ensemble_metrics.klom(judged, oracle), kind="stable")[:examples]
  shown = {"oracle (Retrain)": oracle, "original": original}
  for name in ("megu", "retrain"):
    if runs.get(name):
      label = "floor (Retrain)" if name == "retrain" else name
      shown[label] = np.stack([r["margins"]["forget"] for r in runs[name]])
  fig, axes = plt.subplots(1, len(worst), figsize=(3.2 * len(worst), 2.8), squeeze=False)
  for ax, example in zip(axes[0], worst):
    values = np.concatenate([m[:, example] for m in shown.values()])
    bins = np.linspace(values.min(), values.max() + 1e-9, 21)
    for label, margins in shown.items():
      ax.hist(margins[:, example], bins=bins, alpha=0.45, label=label)
    ax.set_title(f"forget example {example}" + (f" ({worst_of}'s worst)"
                                                 if worst_of != "original" else ""), fontsize=9)
    ax.set_xlabel("margin")
  axes[0][0].legend(fontsize=7)
  fig.suptitle(_title(summary), fontsize=10)
  fig.tight_layout()
  _save(fig, path)


def _save(fig, path: str) -> None:
  import io  # noqa: PLC0415
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  plt.close(fig)
  io_utils.atomic_write_bytes(path, buffer.getvalue())


# --- tables -------------------------------------------------------------------------------------
def _fmt(value, digits: int = 2) -> str:
  return "–" if value is None else f"{value:.{digits}f}"


def _with_ci(value, ci, digits: int = 2) -> str:
  if value is None:
    return "–"
  return f"{value:.{digits}f}" + ("" if not ci else f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]")


def _percent(entry: dict | None) -> str:
  if not entry:
    return "–"
  return f"{100 * entry['mean']:.1f} ± {100 * entry['std']:.1f}"


def markdown(summary: dict) -> str:
  """The tables of one ensemble run: per-example tests, then the literature's columns."""
  lines = [f"# {_title(summary)}", "",
           f"N = {summary['ensemble_size']} originals, oracles and floor models; examples: "
           + ", ".join(f"{k} {v}" for k, v in summary["examples"].items()) + ".", "",
           klom_table(summary), "", literature_table(summary)]
  if summary.get("failures"):
    lines += ["", "Failures: " + "; ".join(
        f"{name} on seed {f['seed']}: {f['error']}" for name, items in summary["failures"].items()
        for f in items)]
  lines += ["", f"<sub>{provenance.describe(summary.get('provenance'))}</sub>"]
  return "\n".join(lines) + "\n"


def klom_table(summary: dict) -> str:
  """KLoM P95 [95 % CI] per split, Gaussian KL mean, F; the floor's value at the same N beside."""
  lines = ["| method | N | forget KLoM P95 | retain KLoM P95 | val KLoM P95 | forget Gaussian KL "
           "(mean) | retain / val Gaussian KL | F | floor at this N: forget KLoM P95, Gaussian "
           "KL, F |", "|---|---|---|---|---|---|---|---|---|"]
  for name, entry in summary["methods"].items():
    klom, gkl, quality = entry["klom"], entry["gaussian_kl"], entry["forgetting_quality"]
    floor = entry["floor"]
    lines.append(
        f"| {name} | {entry['ensemble_size']} | "
        + " | ".join(_with_ci(klom[s]["p95"], _ci(klom[s], "p95")) for s in SPLITS)
        + f" | {_with_ci(gkl['forget']['mean'], _ci(gkl['forget'], 'mean'))} | "
        f"{_fmt(gkl['retain']['mean'])} / {_fmt(gkl['val']['mean'])} | "
        f"{_with_ci(quality['F'], quality['F_ci95'], 3)} | "
        f"{_fmt(floor['klom']['forget']['p95'])}, {_fmt(floor['gaussian_kl']['forget']['mean'])}, "
        f"{_fmt(floor['forgetting_quality']['F'], 3)} |")
  return "\n".join(lines)


def literature_table(summary: dict) -> str:
  columns = (("retain_test_acc", "Dr"), ("forget_test_acc", "Df"), ("test_acc", "test"),
             ("mia_entropy_lr", "MIA (entropy LR)"), ("related_test_acc", "related"))
  lines = ["| method | " + " | ".join(t for _, t in columns) + " | avg gap | score | time (s) |",
           "|---|" + "---|" * (len(columns) + 3)]
  oracles = summary.get("oracles", {})
  cells = " | ".join(_percent(oracles.get(k)) for k, _ in columns)
  lines.append(f"| Retrain (the oracles) | {cells} | – | – | – |")
  for name, entry in summary["methods"].items():
    time = entry.get("time_s")
    time = "–" if not time else f"{time['mean']:.1f}"
    lines.append(f"| {name} | " + " | ".join(_percent(entry.get(k)) for k, _ in columns)
                 + f" | {100 * entry['avg_gap']:.1f} | "
                 f"{_fmt(entry['forgetting_quality']['score'], 3)} | {time} |")
  return "\n".join(lines)


# --- the committed headline runs ------------------------------------------------------------------
def headline_runs(results_dir: str, directory: str = HEADLINE_DIR) -> list[dict]:
  """Every ``ensemble.json`` one level under ``results_dir/directory``, in name order."""
  return [summary for _, summary in committed_runs(results_dir, directory)]


def committed_runs(results_dir: str, directory: str) -> list[tuple[str, dict]]:
  """``(folder, ensemble.json content)`` one level under ``results_dir/directory``."""
  root = os.path.join(results_dir, directory)
  if not os.path.isdir(root):
    return []
  found = []
  for name in sorted(os.listdir(root)):
    path = os.path.join(root, name, "ensemble.json")
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        found.append((name, json.load(f)))
  return found


def where_they_went(fractions: list[float] | None, class_names: list[str], top: int = 3) -> str:
  """The classes a model predicts most for the forgotten images: ``Pullover 61 %, Coat 30 %``."""
  if not fractions:
    return "–"
  order = np.argsort(-np.asarray(fractions), kind="stable")[:top]
  return ", ".join(f"{class_names[i]} {100 * fractions[i]:.0f} %" for i in order
                   if fractions[i] >= 0.005)


def scenario_label(summary: dict) -> str:
  """``full_class Shirt``, ``sub_class Sneaker``, ``random 100``."""
  return f"{summary['scenario']} {', '.join(summary['forget']) or summary['forget_size']}"


def _sizes(summaries: list[dict]) -> list[int]:
  return sorted({entry["ensemble_size"] for summary in summaries
                 for entry in summary["methods"].values()}, reverse=True)


def statistic_choice_table(summaries: list[dict]) -> str:
  """Per N: how far doing nothing lies above the floor's interval for each candidate statistic
  (in widths of that interval, worst scenario), and the one chosen as the headline."""
  from megu_jax.harness import targets  # noqa: PLC0415 (scikit-learn: only when rendering)
  lines = ["| N | " + " | ".join(f"{family} {statistic}" for family, statistic
                                  in targets.KL_STATISTICS) + " | headline |",
           "|---|" + "---|" * (len(targets.KL_STATISTICS) + 1)]
  for n in _sizes(summaries):
    worst = [min(targets.separation(s, *fs, n=n) for s in summaries)
             for fs in targets.KL_STATISTICS]
    family, statistic = targets.headline_statistic(summaries, n)
    lines.append(f"| {n} | " + " | ".join(f"{w:.2f}" for w in worst)
                 + f" | {family} {statistic} |")
  return "\n".join(lines)


def floor_tables(summaries: list[dict]) -> str:
  """Every method against the floor, per scenario, on the headline statistic of its N."""
  from megu_jax.harness import targets  # noqa: PLC0415
  lines = ["| scenario | method | N | statistic | within the floor's interval on |",
           "|---|---|---|---|---|"]
  choice = {n: targets.headline_statistic(summaries, n) for n in _sizes(summaries)}
  for summary in summaries:
    for name, entry in summary["methods"].items():
      family, statistic = choice[entry["ensemble_size"]]
      rows = targets.against_floor(summary, name, family, statistic)
      met = [split for split, row in rows.items() if row["within_floor"]]
      lines.append(f"| {scenario_label(summary)} | {name} | {entry['ensemble_size']} | "
                   f"{family} {statistic} | {', '.join(met) or 'none'} |")
  return "\n".join(lines)


def headline_targets_table(summaries: list[dict]) -> str:
  """Per scenario, the MeGU issue's headline targets, on the headline statistic of MeGU's N:
  its forget value the lowest of every method (the references apart), its retain and val at or
  below the best baseline's upper 95 % bound, and its F above every baseline's."""
  from megu_jax.harness import targets  # noqa: PLC0415
  lines = ["| scenario | statistic | MeGU: forget / retain / val | closest baseline on forget | "
           "MeGU lowest on forget | retain, val at or below the best baseline's bound | "
           "F: MeGU / highest baseline | MeGU's F the highest |",
           "|---|---|---|---|---|---|---|---|"]
  for summary in summaries:
    megu = summary["methods"].get("megu")
    if megu is None:
      continue
    family, statistic = targets.headline_statistic(summaries, megu["ensemble_size"])
    verdict = targets.against_baselines(summary, family, statistic)
    value = lambda name, split: _fmt(summary["methods"][name][family][split][statistic])
    closest = verdict["closest_baseline"]
    highest_F = _forgetting_quality(summary, _highest_F_baseline(summary))
    keeps = ", ".join(f"{split} {'yes' if kept else 'no'}"
                      for split, kept in verdict["keeps"].items())
    lines.append(f"| {scenario_label(summary)} | {family} {statistic} | "
                 f"{' / '.join(value('megu', split) for split in SPLITS)} | "
                 f"{closest} {value(closest, 'forget')} | "
                 f"{'yes' if verdict['lowest_forget'] else 'no'} | {keeps} | "
                 f"{_forgetting_quality_cell(summary)} | "
                 f"{'yes' if _forgetting_quality(summary, 'megu') > highest_F else 'no'} |")
  return "\n".join(lines)


def cost_table(summaries: list[dict]) -> str:
  """Per scenario: what the recorded invocation trained and how long it ran (a resumed run
  counts only what it trained itself; models shared with an earlier scenario are not counted)."""
  lines = ["| scenario | models trained by this run | their training (min) | whole run (min) |",
           "|---|---|---|---|"]
  for summary in summaries:
    timing = summary.get("timing", {})
    lines.append(f"| {scenario_label(summary)} | {timing.get('models_trained', '–')} | "
                 f"{_fmt(timing.get('training_wall_s', float('nan')) / 60, 1)} | "
                 f"{_fmt(timing.get('wall_s', float('nan')) / 60, 1)} |")
  return "\n".join(lines)


def headline_section(results_dir: str) -> str:
  runs = headline_runs(results_dir)
  lines = ["## Headline: every method against Retrain's distribution", ""]
  if not runs:
    return "\n".join(lines + ["_Not run yet: `python -m experiments.benchmark` with "
                              "`--config.ensemble_size` (docs/usage.md), then copy each "
                              "scenario's `ensemble.json` to `results/ensembles/headline/`._", ""])
  lines += ["Which per-example statistic tells doing nothing from Retrain at each N, on the "
            "forget split: the lower end of the original's 95 % interval over the upper end of "
            "the floor's, minus 1, on the scenario where it is smallest (at or below 0: the "
            "intervals overlap). The headline statistic of an N is the one where it is largest.",
            "", statistic_choice_table(runs), "",
            "Where each method lies within what a second Retrain ensemble of its size scores "
            "(forget, retain, val: at or below the floor's upper bound; F: at or above its lower "
            "bound):", "", floor_tables(runs), "",
            "MeGU against the issue's headline targets (lowest forget of every method, retain and "
            "val no higher than the best baseline's upper 95 % bound, F above every baseline's):",
            "", headline_targets_table(runs), ""]
  lines += _reading(results_dir, HEADLINE_DIR)
  lines += ["What each scenario's recorded run cost (one after another in one command; the "
            "machine is in each scenario's provenance line):", "", cost_table(runs), ""]
  for summary in runs:
    lines += [f"### {_title(summary)}", "", klom_table(summary), "", literature_table(summary),
              "", f"<sub>{provenance.describe(summary.get('provenance'))}</sub>", ""]
  return "\n".join(lines)


def _reading(results_dir: str, directory: str) -> list[str]:
  """The hand-written reading.md beside a table's result files, as a paragraph (or nothing)."""
  path = os.path.join(results_dir, directory, "reading.md")
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    return ["**Reading.** " + f.read().strip(), ""]


def most_disturbed(entry: dict, family: str, statistic: str, top: int = 2) -> str:
  """The ``top`` retained classes on which a method's retain divergence is highest, with the
  floor's value on each in brackets; "–" for a summary recorded before it was kept."""
  by_class = (entry.get("retain_by_class") or {}).get(family)
  floor = ((entry.get("floor") or {}).get("retain_by_class") or {}).get(family) or {}
  if not by_class:
    return "–"
  worst = sorted(by_class, key=lambda name: -by_class[name][statistic])[:top]
  return ", ".join(f"{name} {_fmt(by_class[name][statistic])}"
                   + (f" ({_fmt(floor[name][statistic])})" if name in floor else "")
                   for name in worst)


def row_label(summary: dict) -> str:
  """:func:`scenario_label`, with the forget draw of a random row (``random 100 @1``)."""
  label = scenario_label(summary)
  return f"{label} @{summary['split_seed']}" if summary["scenario"] == "random" else label


def _forgetting_quality(summary: dict, name: str) -> float:
  return summary["methods"][name].get("forgetting_quality", {}).get("F", float("nan"))


def _highest_F_baseline(summary: dict) -> str:
  """The baseline (not MeGU, not a reference) with the highest forgetting quality F."""
  return max((name for name in summary["methods"] if name not in ("megu", "original", "retrain")),
             key=lambda name: _forgetting_quality(summary, name))


def _forgetting_quality_cell(summary: dict) -> str:
  """MeGU's F and the highest of the baselines' (named), e.g. ``0.196 / 0.209 (eu_k)``."""
  best = _highest_F_baseline(summary)
  return (f"{_forgetting_quality(summary, 'megu'):.3f} / "
          f"{_forgetting_quality(summary, best):.3f} ({best})")


def _time_share(summary: dict) -> str:
  """MeGU's mean time per model over Retrain's mean training time, in percent."""
  seconds = lambda name: summary["methods"].get(name, {}).get("time_s", {}).get("mean")
  megu, retrain = seconds("megu"), seconds("retrain")
  return f"{100 * megu / retrain:.0f} %" if megu is not None and retrain else "–"


_ALL_CLASS_NOT_RUN = ("_Not run yet: the all-class rows are run with MeGU's defaults frozen "
                      "(docs/usage.md, the `:all_classes` config)._")


def _judged_all_class_rows(results_dir: str) -> tuple[list[dict], list[tuple]]:
  """Every committed all-class row's summary; and each row with MeGU, in table order, as
  ``(folder, summary, family, statistic, verdict, won)``: judged on the headline statistic of
  its N (chosen on the headline runs), ``won`` when MeGU's forget is the lowest without higher
  retain/val."""
  from megu_jax.harness import targets  # noqa: PLC0415
  folders = committed_runs(results_dir, ALL_CLASS_DIR)
  summaries = [summary for _, summary in folders]
  choose_from = headline_runs(results_dir) or summaries
  judged = []
  for folder, summary in sorted(folders, key=lambda f: (f[1]["scenario"], row_label(f[1]))):
    megu = summary["methods"].get("megu")
    if megu is None:
      continue
    family, statistic = targets.headline_statistic(choose_from, megu["ensemble_size"])
    verdict = targets.against_baselines(summary, family, statistic)
    judged.append((folder, summary, family, statistic, verdict,
                   verdict["lowest_forget"] and verdict["keeps_retain_val"]))
  return summaries, judged


def _all_class_tally_lines(summaries: list[dict], judged: list, development: tuple[str, ...],
                           expected: tuple[str, ...]) -> list[str]:
  """Where MeGU is the lowest, counted per scenario and apart on the development rows and the
  others; then the expected rows still to run (none named without ``expected``)."""
  counts: dict[bool, dict[str, list[int]]] = {True: {}, False: {}}
  for _, summary, *_, won in judged:
    counts[row_label(summary) in development].setdefault(summary["scenario"], []).append(int(won))
  tally = lambda group: "; ".join(f"{sum(v)} of {len(v)} {scenario} rows"
                                  for scenario, v in sorted(group.items()))
  lines = ["MeGU lowest on forget without higher retain/val: " + (
      f"development rows: {tally(counts[True])}; the other rows: {tally(counts[False])}"
      if counts[True] and counts[False] else tally(counts[True] or counts[False])) + "."]
  run = {row_label(summary) for summary in summaries}
  missing = [label for label in expected if label not in run]
  if missing:
    lines.append(f"{len(expected) - len(missing)} of {len(expected)} rows run; still to run: "
                 + ", ".join(missing) + ".")
  return lines


def all_class_tally(results_dir: str, development: tuple[str, ...] = (),
                    expected: tuple[str, ...] = ()) -> str:
  """The all-class table's tally and the rows still to run, as :func:`all_class_section`
  words them (the README shows these)."""
  summaries, judged = _judged_all_class_rows(results_dir)
  if not summaries:
    return _ALL_CLASS_NOT_RUN
  return "\n\n".join(_all_class_tally_lines(summaries, judged, development, expected))


def all_class_section(results_dir: str, development: tuple[str, ...] = (),
                      expected: tuple[str, ...] = ()) -> str:
  """The all-class table: per row under ``results/ensembles/all_class/``, MeGU, the baseline
  closest to Retrain on forget, doing nothing and the floor, on the headline statistic of the
  row's N (chosen on the headline runs); whether MeGU's forget is the lowest without higher
  retain/val (counted apart on the development rows and the others), where it lies within the
  floor, its F beside the best baseline's and its time as a share of Retrain's.
  ``development``: the row labels the defaults were chosen on;
  ``expected``: every row label of the table, so that the rows still to run are named."""
  from megu_jax.harness import targets  # noqa: PLC0415
  summaries, judged = _judged_all_class_rows(results_dir)
  lines = ["## MeGU on every class", ""]
  if not summaries:
    return "\n".join(lines + [_ALL_CLASS_NOT_RUN, ""])
  lines += ["Each row at MeGU's frozen defaults; *dev* marks the development rows the defaults "
            "were chosen on. Values: forget / retain / val of the headline statistic of the "
            "row's N; **bold**: within the floor's 95 % interval. *Lowest* is yes when MeGU's "
            "forget is below every baseline's and its retain and val at or below the best "
            "baseline's upper 95 % bound. *F*: the forgetting quality of MeGU and of the "
            "baseline with the highest; *time*: MeGU's mean time per model as a share of "
            "Retrain's mean training time (compilation apart).", "",
            "| row | N | MeGU | closest baseline on forget | doing nothing | floor | lowest | "
            "MeGU within the floor on | F: MeGU / best baseline | time |",
            "|---|---|---|---|---|---|---|---|---|---|"]
  lost = []  # (folder, summary, closest baseline) of the rows where MeGU is not the lowest
  for folder, summary, family, statistic, verdict, won in judged:
    megu = summary["methods"]["megu"]
    closest = verdict["closest_baseline"]
    cell = lambda rows: " / ".join(
        f"**{_fmt(rows[s]['value'])}**" if rows[s]["within_floor"] else _fmt(rows[s]["value"])
        for s in SPLITS)
    megu_rows = targets.against_floor(summary, "megu", family, statistic)
    floor = megu["floor"][family]
    met = [split for split, r in megu_rows.items() if r["within_floor"]]
    if not won:
      lost.append((folder, summary, closest, family, statistic))
    label = row_label(summary)
    label += " (dev)" if label in development else ""
    nothing = (cell(targets.against_floor(summary, "original", family, statistic))
               if "original" in summary["methods"] else "–")
    lines.append(f"| {label} | {megu['ensemble_size']} | {cell(megu_rows)} | {closest}: "
                 f"{cell(targets.against_floor(summary, closest, family, statistic))} | "
                 f"{nothing} | {' / '.join(_fmt(floor[s][statistic]) for s in SPLITS)} | "
                 f"{'yes' if won else 'no'} | {', '.join(met) or 'none'} | "
                 f"{_forgetting_quality_cell(summary)} | {_time_share(summary)} |")
  tally, *missing = _all_class_tally_lines(summaries, judged, development, expected)
  lines += ["", tally, ""]
  if lost:
    # Rows summarised before the retain divergence by class was kept have none to show.
    by_class = any("retain_by_class" in s["methods"]["megu"] for _, s, *_ in lost)
    lines += ["Where MeGU is not the lowest: the classes the models predict for the forgotten "
              "images (mean over each ensemble), the margins of the forget examples MeGU "
              "is furthest from Retrain on"
              + (", and the retained classes where MeGU's retain divergence is highest (the "
                 "floor's on the same class in brackets)" if by_class else "") + ".", "",
              "| row | Retrain sends them to | MeGU | closest baseline | MeGU's worst examples |"
              + (" MeGU's retain divergence highest on |" if by_class else ""),
              "|---|---|---|---|---|" + ("---|" if by_class else "")]
    for folder, summary, closest, family, statistic in lost:
      names = summary.get("class_names") or []
      went = lambda entry: where_they_went((entry or {}).get("forget_predicted"), names)
      plot = os.path.join(results_dir, ALL_CLASS_DIR, folder, MEGU_WORST_PLOT)
      link = (f"[histograms](../results/ensembles/all_class/{folder}/{MEGU_WORST_PLOT})"
              if os.path.exists(plot) else "–")
      lines.append(f"| {row_label(summary)} | {went(summary.get('oracles'))} | "
                   f"{went(summary['methods']['megu'])} | {closest}: "
                   f"{went(summary['methods'].get(closest))} | {link} |"
                   + (f" {most_disturbed(summary['methods']['megu'], family, statistic)} |"
                      if by_class else ""))
    lines.append("")
  if missing:
    lines += [missing[0], ""]
  lines += _reading(results_dir, ALL_CLASS_DIR)
  # One line per command and commit the rows came from (the latest row's date and machine).
  runs_by_source: dict[tuple, list[dict]] = {}
  for summary in summaries:
    record = summary.get("provenance") or {}
    runs_by_source.setdefault((record.get("command"), record.get("commit"), record.get("dirty")),
                              []).append(record)
  for records in runs_by_source.values():
    latest = max(records, key=lambda record: str(record.get("date", "")))
    lines += [f"<sub>{len(records)} row{'s' if len(records) > 1 else ''}: "
              f"{provenance.describe(latest or None)}</sub>", ""]
  return "\n".join(lines)


def _method_order(summaries: list[dict]) -> list[str]:
  """original, retrain, megu, then the rest by their forget value on the first scenario."""
  from megu_jax.harness import targets  # noqa: PLC0415
  first = summaries[0]
  family, statistic = targets.headline_statistic(summaries)
  fixed = [n for n in ("original", "retrain", "megu") if any(n in s["methods"] for s in summaries)]
  rest = sorted({n for s in summaries for n in s["methods"]} - set(fixed),
                key=lambda n: (first["methods"][n][family]["forget"][statistic]
                               if n in first["methods"] else float("inf"), n))
  return fixed + rest


def headline_summary(results_dir: str) -> str:
  """The README's table: per scenario, every method's forget / retain / val value of the
  headline statistic of its N and its F; the floor (a second Retrain ensemble of the same N) in
  brackets; bold where the method lies within the floor's 95 % interval."""
  from megu_jax.harness import targets  # noqa: PLC0415
  runs = headline_runs(results_dir)
  if not runs:
    return "_The headline run has not been committed yet ([docs/results.md](docs/results.md))._\n"
  choice = {n: targets.headline_statistic(runs, n) for n in _sizes(runs)}
  header = "| method | N | " + " | ".join(f"{scenario_label(s)}: forget / retain / val, F"
                                           for s in runs) + " |"
  lines = [header, "|---|---|" + "---|" * len(runs)]
  for name in _method_order(runs):
    sizes = {s["methods"][name]["ensemble_size"] for s in runs if name in s["methods"]}
    cells = []
    for summary in runs:
      if name not in summary["methods"]:
        cells.append("–")
        continue
      entry = summary["methods"][name]
      rows = targets.against_floor(summary, name, *choice[entry["ensemble_size"]])
      values = [f"**{_fmt(rows[s]['value'], 2)}**" if rows[s]["within_floor"]
                else _fmt(rows[s]["value"], 2) for s in SPLITS]
      f_text = _fmt(rows["F"]["value"], 3)
      if rows["F"]["within_floor"]:
        f_text = f"**{f_text}**"
      cells.append(" / ".join(values) + f", {f_text}")
    lines.append(f"| {name} | {'/'.join(str(n) for n in sorted(sizes, reverse=True))} | "
                 + " | ".join(cells) + " |")
  floors = []
  for n, (family, statistic) in choice.items():
    label = ("KLoM " if family == "klom" else "Gaussian KL ") + statistic
    per_scenario = []
    for summary in runs:
      reference = next((e for e in summary["methods"].values() if e["ensemble_size"] == n), None)
      if reference is None:
        continue
      floor = reference["floor"]
      per_scenario.append(" / ".join(_fmt(floor[family][s][statistic], 2) for s in SPLITS)
                          + f", {_fmt(floor['forgetting_quality']['F'], 3)}")
    floors.append(f"N = {n}: {label}; the floor scores {'; '.join(per_scenario)}")
  lines += ["", "Per-example divergence from Retrain's oracles (lower is closer; F higher is "
            "closer); **bold**: within the 95 % interval of a second Retrain ensemble of the same "
            "N (the floor). " + ". ".join(floors) + "."]
  return "\n".join(lines) + "\n"
