"""MeGU's ablations and tuning variants, judged against Retrain's distribution on several rows.

  python -m experiments.ablations --config=megu_jax/configs/fashion_mnist.py --workdir=runs/dev \
      --config.ensemble_size=8 \
      "--config.benchmark_scenarios=full_class:Shirt;full_class:Trouser;sub_class:Sneaker"

Each variant changes fields of ``config.megu`` (docs/method.md §2, step 6: the noise pair, the
source of T, sampled vs argmax labels, model-guided vs T-only labels; or any other fields, given
as ``--variants``). For every row (``config.benchmark_scenarios``; ``random:100@1`` is the
forget draw 1) it trains what is missing of the row's ensembles (:mod:`.ensemble`, shared under
``workdir/models``), runs every variant once from each original, and scores it per example
against the oracles, beside doing nothing and the floor. Writes ``ablations.json`` and
``ablations.md``; every run is kept on disk, so a rerun (or a new variant) computes only what is
missing.
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any

import numpy as np

from megu_jax import ensemble_metrics
from megu_jax import io_utils
from megu_jax import train
from megu_jax import unlearning
from megu_jax.harness import benchmark
from megu_jax.harness import ensemble
from megu_jax.harness import provenance
from megu_jax.harness import targets

DEFAULTS = "megu (defaults)"


def variants(gemini_path: str | None) -> dict[str, dict]:
  """Name -> the ``config.megu`` fields it changes (the default is the first, unchanged)."""
  table = {
      DEFAULTS: {},
      # The random scenario's own noise setting replaces ``noise`` there, so each noise
      # variant sets both; on a row where a variant restates the defaults it is listed, not run.
      "noise: both": _noise("both"),
      "noise: none": _noise("none"),
      "noise: negative only": _noise("negative"),
      "noise: positive only": _noise("positive"),
      "T: uniform": {"transition": "uniform"},
      "T: prototype (MeGU's own sample)": {"transition": "prototype"},
      "T: hierarchy": {"transition": "hierarchy"},
      "labels: argmax": {"label_mode": "argmax"},
      "labels: T only (no model guidance)": {"label_guidance": "transition"},
  }
  if gemini_path:
    table["T: gemini"] = {"transition": gemini_path}
  return table


def _noise(mode: str) -> dict:
  return {"noise": mode, "random_scenario.noise": mode}


def parse_variants(text: str) -> dict[str, dict]:
  """``"name:field=value,field=value;name2:..."`` -> {name: {field: value}} (values as numbers,
  booleans or strings)."""
  table = {DEFAULTS: {}}
  for item in filter(None, (part.strip() for part in text.split(";"))):
    name, sep, assignments = item.partition(":")
    if not sep:
      raise ValueError(f"--variants item {item!r} must read NAME:field=value[,field=value]")
    overrides = {}
    for assignment in filter(None, (a.strip() for a in assignments.split(","))):
      field, eq, value = assignment.partition("=")
      if not eq:
        raise ValueError(f"--variants item {item!r}: {assignment!r} must read field=value")
      overrides[field.strip()] = parse_value(value.strip())
    if name.strip() == DEFAULTS:
      raise ValueError(f"--variants item {item!r}: {DEFAULTS!r} is the config's own settings; "
                       "give the variant another name")
    table[name.strip()] = overrides
  return table


def variant_table(variants_text: str | None = None, add_text: str | None = None,
                  gemini_path: str | None = None) -> dict[str, dict]:
  """The variants to run: ``variants_text`` instead of the ablations, or the ablations with
  ``add_text``'s beside them (both in :func:`parse_variants`' form)."""
  if variants_text and add_text:
    raise ValueError("give --variants (instead of the ablations) or --add_variants (beside "
                     "them), not both")
  table = parse_variants(variants_text) if variants_text else variants(gemini_path)
  if add_text:
    # The ablations' names hold a colon, so no name given in this form can replace one.
    table.update(parse_variants(add_text))
  return table


def parse_value(value: str):
  """A command-line value as what it reads as: int, float, True/False, else the string."""
  for cast in (int, float):
    try:
      return cast(value)
    except ValueError:
      pass
  return {"True": True, "False": False}.get(value, value)


def _slug(name: str) -> str:
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "variant"


def run(config, workdir: str, table: dict[str, dict],
        models_root: str | None = None, beside: tuple[str, ...] = ()) -> dict[str, Any]:
  """Every variant of ``table`` on every row of ``config.benchmark_scenarios``; the registered
  methods named in ``beside`` (at their config's settings) run from the same originals and are
  scored beside them."""
  for name in beside:
    unlearning.get_method(name)  # an unknown name fails here, listing the registered ones
    if name in table or name in ("original", "retrain", "megu"):
      raise ValueError(f"--beside {name!r}: that row is already in the table; name a baseline")
  from megu_jax.unlearning import megu  # noqa: PLC0415
  defaults = megu.default_megu_config()
  # random_scenario may replace any field of MeGU's (megu_settings checks the same).
  known = set(defaults.keys()) | {f"random_scenario.{field}" for field in defaults.keys()
                                  if field != "random_scenario"}
  for name, overrides in table.items():
    unknown = sorted(set(overrides) - known)
    if unknown:
      raise ValueError(f"variant {name!r} changes unknown config.megu field(s) {unknown}")
  rows = benchmark.parse_scenarios(config.benchmark_scenarios)
  cells = {row: benchmark.cell_config(config, *row, seed=config.seed) for row in rows}
  for cell in cells.values():
    with cell.unlocked():
      cell.methods = "original,retrain,megu"
  # A variant whose settings on a row are the defaults' (it restates the config, or it changes
  # a field that row's scenario replaces) would rerun the defaults under another name and read
  # as a difference where there is none: it is listed for that row, not run there.
  same_on = {row: [name for name, overrides in table.items()
                   if overrides and _same_settings(cell, overrides)]
             for row, cell in cells.items()}
  same = [name for name in table if all(name in names for names in same_on.values())]
  checked = {row: ensemble.validate(cell) for row, cell in cells.items()}  # all before training
  size = int(config.ensemble_size)
  results: dict[str, Any] = {}
  for row, cell in cells.items():
    directory = os.path.join(workdir, "rows", benchmark.cell_name(*row, seed=config.seed))
    ens = ensemble.prepare_ensemble(cell, directory, models_root or os.path.join(workdir, "models"),
                                    checked[row])
    oracle = ens.oracle_margins
    floor = ens.reference_runs["retrain"]
    entries, per_example = {}, {}
    for name in ("original", "retrain"):
      entries[name], per_example[name] = _entry(ens.reference_runs[name], ens, floor, oracle)
    for name in beside:
      entries[name], per_example[name] = _entry(ensemble.run_method_ensemble(ens, name, size),
                                                ens, floor, oracle)
    not_applicable = {}
    for name, overrides in table.items():
      if name in same_on[row]:
        continue
      try:
        runs = ensemble.run_method_ensemble(ens, "megu", size, overrides=overrides,
                                            tag=f"megu-{_slug(name)}" if overrides else "megu")
      except unlearning.UnlearningInputError as error:
        if not overrides:
          raise  # the defaults themselves cannot run: there is nothing to compare against
        # A setting some rows cannot take (the hierarchy T needs a grouping of the row's
        # classes) is listed with its reason on those rows; the other variants still run.
        not_applicable[name] = str(error)
        continue
      entries[name], per_example[name] = _entry(runs, ens, floor, oracle)
    result = {"scenario": row[0], "forget": row[1], "ensemble_size": size, "methods": entries,
              "margins": margin_gap(ens),
              "same_as_defaults": [name for name in same_on[row] if name not in same],
              "not_applicable": not_applicable}
    family, statistic = targets.headline_statistic([result], size)
    for name in entries:
      if name not in ("original", "retrain", DEFAULTS, *beside) and DEFAULTS in per_example:
        entries[name]["vs_defaults"] = paired_difference(
            per_example[name], per_example[DEFAULTS], family, statistic, seed=int(config.seed))
    results[benchmark.cell_name(*row, seed=config.seed)] = result
  summary = {"dataset": config.dataset, "ensemble_size": size, "beside": list(beside),
             "variants": {name: table[name] for name in table if name not in same},
             "same_as_defaults": same, "rows": results, "provenance": provenance.record()}
  io_utils.atomic_write_json(os.path.join(workdir, "ablations.json"), summary)
  io_utils.atomic_write_text(os.path.join(workdir, "ablations.md"), markdown(summary))
  return summary


def margin_gap(ens) -> dict | None:
  """Whether the forgotten images look like unseen ones, to the originals and to Retrain.

  ``{"original" | "retrain": {"forgotten" | "unseen": {"mean", "sd"}}}``: each model's mean
  margin z_y − logsumexp_{j≠y} z_j on the forgotten training images and on the row's non-members
  (unseen images of the same classes, sub-classes or label mix), then the mean and standard
  deviation of those over the row's originals and their Retrain (floor) models. The forgotten
  images' margins are the references' runs' own (their forget split is the whole forget set);
  only the unseen images are scored here. None when the data set has no unseen images.
  """
  if any(member.non_member_data is None for member in ens.members):
    return None
  per_model = {role: {"forgotten": [], "unseen": []} for role in ("original", "retrain")}
  batch_size = int(ens.config.eval_batch_size)
  for i, member in enumerate(ens.members):
    unseen = member.non_member_data
    for role, model in (("original", member.original), ("retrain", member.retrained)):
      per_model[role]["forgotten"].append(
          float(np.mean(ens.reference_runs[role][i]["margins"]["forget"])))
      logits = train.predict(model, unseen.images, batch_size)["logits"]
      per_model[role]["unseen"].append(float(np.mean(ensemble_metrics.margins(logits,
                                                                              unseen.labels))))
  return {role: {name: {"mean": float(np.mean(values)), "sd": float(np.std(values))}
                 for name, values in by_split.items()} for role, by_split in per_model.items()}


def _same_settings(cell, overrides: dict) -> bool:
  """Whether MeGU runs ``cell``'s row with the same settings with ``overrides`` as without."""
  from megu_jax.unlearning import base, megu  # noqa: PLC0415
  changed = copy.deepcopy(cell)
  with changed.unlocked():
    changed.megu = base.method_settings(changed, "megu", megu.default_megu_config())
    ensemble.apply_overrides(changed.megu, overrides)
  before, after = megu.megu_settings(cell).to_dict(), megu.megu_settings(changed).to_dict()
  # random_scenario has been applied where it applies; elsewhere it changes nothing.
  before.pop("random_scenario"), after.pop("random_scenario")
  return before == after


def _entry(runs, ens, floor_runs, oracle) -> tuple[dict, dict]:
  """A method's summary (JSON-ready) and its per-example values (kept apart)."""
  entry = ensemble.summarize_method(runs, ens.oracle_runs, floor_runs, oracle,
                                    seed=int(ens.config.seed))
  return entry, entry.pop("per_example")


_STATISTICS = {"mean": np.mean, "p95": lambda values, axis=-1: np.quantile(values, 0.95, axis=axis)}


def paired_difference(per_example: dict, defaults: dict, family: str, statistic: str, *,
                      seed: int = 0) -> dict:
  """A variant's ``family`` ``statistic`` minus the defaults' on each split, with the paired
  bootstrap's 95 % interval over the examples (both measured against the same Retrain models
  from the same originals): an interval below 0 says the variant is closer to Retrain on that
  split, above 0 further, across 0 that these examples cannot tell them apart."""
  reduce = _STATISTICS[statistic]
  out = {"family": family, "statistic": statistic}
  for split in ensemble.SPLITS:
    key = f"{family}_{split}"
    mine, theirs = np.asarray(per_example[key]), np.asarray(defaults[key])
    low, high = ensemble_metrics.paired_bootstrap_ci(mine, theirs, reduce, seed=seed)
    out[split] = {"difference": float(reduce(mine) - reduce(theirs)), "ci95": [low, high]}
  return out


def _paired_cell(difference: dict) -> str:
  low, high = difference["ci95"]
  verdict = " closer" if high < 0 else " further" if low > 0 else ""
  return f"{difference['difference']:+.3f} ({low:+.3f} to {high:+.3f}){verdict}"


def markdown(summary: dict) -> str:
  """One table per row: each variant's forget / retain / val statistic and F, the floor's
  interval beside, and the literature's Dr, Df, test."""
  lines = [f"# MeGU variants against Retrain's distribution: {summary['dataset']}, "
           f"N = {summary['ensemble_size']}", ""]
  for name, row in summary["rows"].items():
    family, statistic = targets.headline_statistic([row], row["ensemble_size"])
    lines += [f"## {name} (per-example {family} {statistic})", "",
              "| variant | forget | retain | val | F | within the floor on | Dr | Df | test |",
              "|---|---|---|---|---|---|---|---|---|"]
    for variant, entry in row["methods"].items():
      checks = targets.against_floor(row, variant, family, statistic)
      cells = [f"{checks[s]['value']:.3f}" for s in ensemble.SPLITS]
      met = [s for s, c in checks.items() if c["within_floor"]]
      accuracies = [f"{100 * entry[k]['mean']:.1f}"
                    for k in ("retain_test_acc", "forget_test_acc", "test_acc")]
      lines.append(f"| {variant} | " + " | ".join(cells)
                   + f" | {entry['forgetting_quality']['F']:.3f} | {', '.join(met) or 'none'} | "
                   + " | ".join(accuracies) + " |")
    floor = row["methods"]["retrain"]["floor"][family]
    lines += ["", "Floor's 95 % interval: " + ", ".join(
        f"{s} {floor[s][f'{statistic}_ci95'][0]:.3f}–{floor[s][f'{statistic}_ci95'][1]:.3f}"
        for s in ensemble.SPLITS) + ".", ""]
    paired = {variant: entry["vs_defaults"] for variant, entry in row["methods"].items()
              if "vs_defaults" in entry}
    if paired:
      lines += ["Each variant minus the defaults, paired over the same examples (95 % "
                "bootstrap interval; closer or further from Retrain where it excludes 0):", "",
                "| variant | forget | retain | val |", "|---|---|---|---|"]
      for variant, difference in paired.items():
        lines.append(f"| {variant} | " + " | ".join(
            _paired_cell(difference[s]) for s in ensemble.SPLITS) + " |")
      lines.append("")
    if row.get("margins"):
      gap = row["margins"]
      lines += ["Mean margin (± its standard deviation over the models) on the forgotten training "
                "images / on unseen images like them: " + "; ".join(
                    f"{role} {gap[role]['forgotten']['mean']:.2f} ± "
                    f"{gap[role]['forgotten']['sd']:.2f} / {gap[role]['unseen']['mean']:.2f} ± "
                    f"{gap[role]['unseen']['sd']:.2f}" for role in ("original", "retrain"))
                + ".", ""]
    for variant, reason in row.get("not_applicable", {}).items():
      lines += [f"Not run on this row, which its settings do not fit: {variant} ({reason}).", ""]
    if row.get("same_as_defaults"):
      lines += ["Not run on this row, where their settings are the defaults': "
                + ", ".join(row["same_as_defaults"]) + ".", ""]
  if summary.get("same_as_defaults"):
    lines += ["Not run apart from the defaults, whose settings they already are: "
              + ", ".join(summary["same_as_defaults"]) + ".", ""]
  lines.append(f"<sub>{provenance.describe(summary.get('provenance'))}</sub>")
  return "\n".join(lines) + "\n"

