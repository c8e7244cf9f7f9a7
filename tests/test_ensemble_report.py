"""The README's headline table, rendered from synthetic ensemble.json summaries."""
import json

from megu_jax.harness import ensemble_report

SPLITS = ("forget", "retain", "val")


def stats(value, width=0.1):
  """One split's entry: the same value for every statistic, with a symmetric interval."""
  entry = {}
  for statistic in ("mean", "p95", "p99"):
    entry[statistic] = value
    entry[f"{statistic}_ci95"] = [value - width, value + width]
  return entry


def method(forget, retain, val, F, size, floor):
  values = dict(zip(SPLITS, (forget, retain, val)))
  return {"ensemble_size": size,
          "klom": {s: stats(v) for s, v in values.items()},
          "gaussian_kl": {s: stats(v) for s, v in values.items()},
          "forgetting_quality": {"F": F, "F_ci95": [F - 0.01, F + 0.01]},
          "floor": floor}


def floor_of(value, F):
  return {"klom": {s: stats(value) for s in SPLITS},
          "gaussian_kl": {s: stats(value) for s in SPLITS},
          "forgetting_quality": {"F": F, "F_ci95": [F - 0.02, F + 0.02]}}


def summary():
  floor4, floor2 = floor_of(0.3, 0.16), floor_of(0.6, 0.09)
  methods = {
      "original": method(80.0, 0.6, 0.9, 0.0, 4, floor4),
      "retrain": method(0.3, 0.3, 0.3, 0.16, 4, floor4),
      "megu": method(3.0, 0.35, 0.3, 0.15, 4, floor4),
      "ssd": method(11.0, 3.0, 1.8, 0.0, 2, floor2),
      "neggrad_plus": method(1.5, 0.65, 0.5, 0.06, 2, floor2),
  }
  at_2 = {"original": method(79.0, 0.6, 0.9, 0.0, 2, floor2),
          "retrain": method(0.6, 0.6, 0.6, 0.09, 2, floor2)}
  return {"dataset": "d", "scenario": "full_class", "forget": ["Shirt"], "forget_size": 500,
          "ensemble_size": 4, "methods": methods, "references_at": {"2": at_2}}


def test_the_readme_table_orders_methods_and_marks_what_lies_within_the_floor(tmp_path):
  directory = tmp_path / ensemble_report.HEADLINE_DIR / "full_class_Shirt"
  directory.mkdir(parents=True)
  (directory / "ensemble.json").write_text(json.dumps(summary()))
  table = ensemble_report.headline_summary(str(tmp_path))
  rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
  names = [row.split("|")[1].strip() for row in rows[1:]]
  # The references first, then the baselines by forget value: closest first.
  assert names == ["original", "retrain", "megu", "neggrad_plus", "ssd"]
  by_name = dict(zip(names, rows[1:]))
  # megu: retain 0.35 and val 0.30 within the N=4 floor's upper bound 0.4, forget 3.0 not; F 0.15
  # at or above the floor's lower bound 0.14.
  assert "| megu | 4 | 3.00 / **0.35** / **0.30**, **0.150** |" == by_name["megu"]
  # neggrad_plus is judged against the N=2 floor (upper bound 0.7): retain and val within.
  assert "| neggrad_plus | 2 | 1.50 / **0.65** / **0.50**, 0.060 |" == by_name["neggrad_plus"]
  assert "N = 4: Gaussian KL" in table or "N = 4: KLoM" in table
  assert "the floor scores 0.30 / 0.30 / 0.30, 0.160" in table


def test_without_committed_runs_the_table_says_so(tmp_path):
  assert "has not been committed yet" in ensemble_report.headline_summary(str(tmp_path))


def test_the_development_section_renders_each_committed_ablation_with_its_reading(tmp_path):
  from megu_jax.harness import report  # pylint: disable=import-outside-toplevel
  row = summary()
  for entry in row["methods"].values():
    entry.update({k: {"mean": 0.9} for k in ("retain_test_acc", "forget_test_acc", "test_acc")})
  directory = tmp_path / report.ABLATIONS_DIR / "probe"
  directory.mkdir(parents=True)
  (directory / "ablations.json").write_text(json.dumps(
      {"dataset": "d", "ensemble_size": 4, "rows": {"full_class_Shirt_seed0": row}}))
  (directory / "reading.md").write_text("Not adopted.\n")
  text = report.development_section(str(tmp_path))
  assert "### MeGU variants against Retrain's distribution: d, N = 4 (`probe`)" in text
  assert "#### full_class_Shirt_seed0" in text and "Not adopted." in text
  assert text.index("Not adopted.") < text.index("#### full_class_Shirt_seed0")
  assert "| megu | 3.000 | 0.350 | 0.300 | 0.150 |" in text
  assert "Nothing committed yet" in report.development_section(str(tmp_path / "none"))


def test_the_headline_section_carries_the_reading_beside_the_tables(tmp_path, monkeypatch):
  # The per-scenario tables have their own fields; only the reading's place is checked here.
  monkeypatch.setattr(ensemble_report, "klom_table", lambda summary: "")
  monkeypatch.setattr(ensemble_report, "literature_table", lambda summary: "")
  directory = tmp_path / ensemble_report.HEADLINE_DIR / "full_class_Shirt"
  directory.mkdir(parents=True)
  (directory / "ensemble.json").write_text(json.dumps(summary()))
  assert "**Reading.**" not in ensemble_report.headline_section(str(tmp_path))
  (directory.parent / "reading.md").write_text("Only Retrain lies within the floor.\n")
  text = ensemble_report.headline_section(str(tmp_path))
  assert "**Reading.** Only Retrain lies within the floor." in text
  assert text.index("**Reading.**") < text.index("### d, full_class: forget Shirt")


def test_the_cost_table_shows_what_each_recorded_run_trained_and_took():
  row = summary()
  row["timing"] = {"models_trained": 32, "models_training_s": 1500.0, "training_wall_s": 1560.0,
                   "wall_s": 1800.0}
  table = ensemble_report.cost_table([row, {**summary(), "scenario": "random", "forget": [],
                                            "forget_size": 100}])
  assert "| full_class Shirt | 32 | 26.0 | 30.0 |" in table
  assert "| random 100 | – |" in table


def test_the_all_class_table_marks_development_rows_and_counts_where_megu_is_lowest(tmp_path):
  root = tmp_path / ensemble_report.ALL_CLASS_DIR
  shirt = summary()  # MeGU forget 3.0 above NegGrad+'s 1.5: not the lowest
  trouser = {**summary(), "forget": ["Trouser"]}
  trouser["methods"] = {**trouser["methods"],
                        "megu": {**method(1.0, 0.35, 0.3, 0.15, 4, floor_of(0.3, 0.16)),
                                 "time_s": {"mean": 2.0}},
                        "retrain": {**trouser["methods"]["retrain"], "time_s": {"mean": 40.0}}}
  draw = {**summary(), "scenario": "random", "forget": [], "forget_size": 100, "split_seed": 1}
  # Where the forgotten shirts went: Retrain mostly to T-shirts, MeGU mostly to coats.
  shirt["class_names"] = ["T-shirt", "Coat", "Shirt"]
  shirt["oracles"] = {"forget_predicted": [0.7, 0.3, 0.0]}
  shirt["methods"]["megu"] = {**shirt["methods"]["megu"], "forget_predicted": [0.2, 0.8, 0.0]}
  # Where MeGU disturbs the retained images most: T-shirts, then coats (whichever statistic).
  by_class = lambda t_shirt, coat: {family: {"T-shirt": {"p95": t_shirt, "mean": t_shirt},
                                             "Coat": {"p95": coat, "mean": coat}}
                                    for family in ("klom", "gaussian_kl")}
  shirt["methods"]["megu"]["retain_by_class"] = by_class(0.9, 0.4)
  shirt["methods"]["megu"]["floor"] = {**shirt["methods"]["megu"]["floor"],
                                       "retain_by_class": by_class(0.2, 0.3)}
  for name, row in (("full_class_Shirt", shirt), ("full_class_Trouser", trouser),
                    ("random_100_1", draw)):
    (root / name).mkdir(parents=True)
    (root / name / "ensemble.json").write_text(json.dumps(row))
  (root / "full_class_Shirt" / ensemble_report.MEGU_WORST_PLOT).write_bytes(b"png")
  text = ensemble_report.all_class_section(str(tmp_path), development=("full_class Shirt",))
  lines = {line.split("|")[1].strip(): line for line in text.splitlines()
           if line.startswith("| ") and "---" not in line}
  assert lines["full_class Shirt (dev)"].startswith(
      "| full_class Shirt (dev) | 4 | 3.00 / **0.35** / **0.30** | neggrad_plus: 1.50 / "
      "**0.65** / **0.50** | 80.00 / 0.60 / 0.90 | 0.30 / 0.30 / 0.30 | no | retain, val, F | "
      "0.150 / 0.060 (neggrad_plus) | – |")  # no times recorded: no share
  # Trouser: MeGU's forget 1.0 below NegGrad+'s 1.5, retain 0.35 and val 0.30 at or below the best
  # baseline's upper bounds (0.75 and 0.60).
  assert "| yes |" in lines["full_class Trouser"]
  assert lines["full_class Trouser"].endswith("| 5 % |")  # 2 s of MeGU against 40 s of Retrain
  assert "random 100 @1" in lines
  # Shirt is the development row; Trouser and the draw were run after the freeze.
  assert ("development rows: 0 of 1 full_class rows; the other rows: 1 of 1 full_class rows; "
          "0 of 1 random rows." in text)
  assert "1 of 2 full_class rows; 0 of 1 random rows." in ensemble_report.all_class_section(
      str(tmp_path))  # without development rows, one count
  assert "rows run" not in text  # without the expected rows nothing is said to be missing
  why = {line.split("|")[1].strip(): line for line in text.split("Where MeGU is not")[1]
         .splitlines() if line.startswith("| ") and "---" not in line}
  assert set(why) == {"row", "full_class Shirt", "random 100 @1"}  # Trouser is MeGU's
  assert why["full_class Shirt"] == (
      "| full_class Shirt | T-shirt 70 %, Coat 30 % | Coat 80 %, T-shirt 20 % | neggrad_plus: – | "
      f"[histograms](../results/ensembles/all_class/full_class_Shirt/"
      f"{ensemble_report.MEGU_WORST_PLOT}) | T-shirt 0.90 (0.20), Coat 0.40 (0.30) |")
  assert why["random 100 @1"].endswith("| – | – | neggrad_plus: – | – | – |")
  expected = ("full_class Shirt", "full_class Trouser", "random 100 @1", "sub_class Coat")
  assert ("3 of 4 rows run; still to run: sub_class Coat." in
          ensemble_report.all_class_section(str(tmp_path), expected=expected))
  assert "Not run yet" in ensemble_report.all_class_section(str(tmp_path / "none"))
  # The README's tally: the same two sentences, nothing else.
  assert ensemble_report.all_class_tally(str(tmp_path), ("full_class Shirt",), expected) == (
      "MeGU lowest on forget without higher retain/val: development rows: 0 of 1 full_class "
      "rows; the other rows: 1 of 1 full_class rows; 0 of 1 random rows.\n\n"
      "3 of 4 rows run; still to run: sub_class Coat.")
  assert "Not run yet" in ensemble_report.all_class_tally(str(tmp_path / "none"))


def test_the_all_class_table_carries_its_reading_and_where_its_rows_came_from(tmp_path):
  root = tmp_path / ensemble_report.ALL_CLASS_DIR
  for name, date in (("full_class_Shirt", "2026-01-01"), ("full_class_Trouser", "2026-01-02")):
    row = {**summary(), "forget": [name.split("_")[-1]],
           "provenance": {"command": "python -m experiments.benchmark", "commit": "a" * 40,
                          "dirty": False, "date": date}}
    (root / name).mkdir(parents=True)
    (root / name / "ensemble.json").write_text(json.dumps(row))
  text = ensemble_report.all_class_section(str(tmp_path))
  assert "**Reading.**" not in text
  assert ("<sub>2 rows: `python -m experiments.benchmark` — commit aaaaaaaaaaaa, 2026-01-02"
          in text)
  (root / "reading.md").write_text("MeGU is lowest on Trouser.\n")
  assert "**Reading.** MeGU is lowest on Trouser." in ensemble_report.all_class_section(
      str(tmp_path))


def test_the_headline_targets_table_says_which_of_megus_targets_each_scenario_meets():
  shirt = summary()  # MeGU's forget 3.0 above NegGrad+'s 1.5; its F 0.15 above NegGrad+'s 0.06
  sneaker = {**summary(), "scenario": "sub_class", "forget": ["Sneaker"]}
  sneaker["methods"] = {**sneaker["methods"],
                        "megu": method(1.0, 0.35, 0.9, 0.05, 4, floor_of(0.3, 0.16))}
  table = ensemble_report.headline_targets_table([shirt, sneaker])
  rows = {line.split("|")[1].strip(): line for line in table.splitlines()[2:]}
  statistic = rows["full_class Shirt"].split("|")[2].strip()
  assert statistic.startswith(("klom ", "gaussian_kl "))
  assert rows["full_class Shirt"].endswith(
      "| 3.00 / 0.35 / 0.30 | neggrad_plus 1.50 | no | retain yes, val yes | "
      "0.150 / 0.060 (neggrad_plus) | yes |")
  # Sneaker: forget 1.0 the lowest, but val 0.9 above the best baseline's bound (0.5 + 0.1); F
  # 0.05 below NegGrad+'s 0.06.
  assert rows["sub_class Sneaker"].endswith(
      "| 1.00 / 0.35 / 0.90 | neggrad_plus 1.50 | yes | retain yes, val no | "
      "0.050 / 0.060 (neggrad_plus) | no |")
