"""The target check on hand-made benchmark cells: each margin, the mean over seeds, the command."""
import json
import subprocess
import sys

import pytest

from megu_jax.harness import targets

RETRAIN = {"forget_test_acc": 0.0, "retain_test_acc": 0.95, "mia_entropy_lr": 0.27,
           "related_test_acc": 0.92, "time_s": 100.0}


def _method(**changes):
  values = {"forget_test_acc": 0.0, "retain_test_acc": 0.95, "mia_entropy_lr": 0.27,
            "related_test_acc": 0.92, "time_s": 2.0, "avg_gap": 0.005}
  values.update(changes)
  return values


def _benchmark(*seed_cells, scenario="full_class", forget="Shirt"):
  return {"cells": [{"scenario": scenario, "forget": forget, "seed": seed,
                     "methods": {"retrain": RETRAIN, "megu": cell}}
                    for seed, cell in enumerate(seed_cells)]}


def test_a_method_equal_to_retrain_meets_every_target():
  rows = targets.check_targets(_benchmark(_method()))
  assert rows == [{"scenario": "full_class Shirt", "seeds": 1, "mean": pytest.approx(
      {"Df": 0.0, "Dr": 0.0, "MIA": 0.0, "related": 0.0, "avg gap": 0.005, "time": 0.02}),
      "failed": [], "seeds_meeting_all": 1, "retrain_spread": None}]


@pytest.mark.parametrize("changes, missed", [
    ({"forget_test_acc": 0.021}, ["Df"]),
    ({"retain_test_acc": 0.939}, ["Dr"]),
    ({"mia_entropy_lr": 0.321}, ["MIA"]),
    ({"mia_entropy_lr": 0.219}, ["MIA"]),           # below Retrain counts too
    ({"related_test_acc": 0.899}, ["related"]),
    ({"avg_gap": 0.021}, ["avg gap"]),
    ({"time_s": 10.1}, ["time"]),
    ({"forget_test_acc": 0.02, "retain_test_acc": 0.94, "mia_entropy_lr": 0.32,
      "related_test_acc": 0.90, "avg_gap": 0.02, "time_s": 10.0}, []),  # every margin exactly
])
def test_each_margin(changes, missed):
  assert targets.check_targets(_benchmark(_method(**changes)))[0]["failed"] == missed


def test_the_mean_over_seeds_decides_and_seeds_are_counted_apart():
  # Seed 0 misses MIA by 7 points below, seed 1 is 3 above: the mean (−2) meets the target.
  rows = targets.check_targets(_benchmark(_method(mia_entropy_lr=0.20),
                                          _method(mia_entropy_lr=0.30)))
  assert rows[0]["mean"]["MIA"] == pytest.approx(-0.02)
  assert rows[0]["failed"] == [] and rows[0]["seeds_meeting_all"] == 1 and rows[0]["seeds"] == 2


def test_scenarios_are_kept_apart_and_cells_without_the_method_skipped():
  benchmark = _benchmark(_method())
  benchmark["cells"] += _benchmark(_method(forget_test_acc=0.5), scenario="sub_class",
                                   forget="Sneaker")["cells"]
  benchmark["cells"].append({"scenario": "random", "forget": "100", "seed": 0,
                             "methods": {"retrain": RETRAIN}})
  rows = targets.check_targets(benchmark)
  assert [(row["scenario"], row["failed"]) for row in rows] == [
      ("full_class Shirt", []), ("sub_class Sneaker", ["Df"])]
  text = targets.targets_markdown(rows)
  assert "| sub_class Sneaker | 1 | +50.0 |" in text and "1 of 2 scenarios" in text


def test_a_benchmark_without_the_method_names_what_it_holds():
  with pytest.raises(ValueError, match=r"'salun'.*\['megu', 'retrain'\]"):
    targets.check_targets(_benchmark(_method()), method="salun")


def test_a_cell_missing_a_metric_is_named():
  cell = _method()
  del cell["related_test_acc"]
  with pytest.raises(ValueError, match="related_test_acc"):
    targets.check_targets(_benchmark(cell))


def test_the_command_writes_the_table_and_rejects_bad_json(tmp_path):
  path = tmp_path / "benchmark.json"
  path.write_text(json.dumps(_benchmark(_method(mia_entropy_lr=0.40))))
  out = tmp_path / "targets.md"
  done = subprocess.run([sys.executable, "-m", "experiments.check_targets",
                         f"--benchmark={path}", f"--out={out}"], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  assert "| full_class Shirt | 1 | +0.0 | +0.0 | +13.0 |" in out.read_text()
  assert "0 of 1 scenarios" in done.stdout
  path.write_text("{not json")
  done = subprocess.run([sys.executable, "-m", "experiments.check_targets",
                         f"--benchmark={path}"], capture_output=True, text=True)
  assert done.returncode == 2 and done.stderr.strip().startswith("error:")
  assert "not valid JSON" in done.stderr


def test_retrain_spread_is_the_mean_gap_between_its_seeds():
  benchmark = _benchmark(_method(), _method(), _method())
  for cell, mia in zip(benchmark["cells"], (0.27, 0.30, 0.36)):
    cell["methods"]["retrain"] = {**RETRAIN, "mia_entropy_lr": mia}
  row = targets.check_targets(benchmark)[0]
  # MIA differs by 3, 9 and 6 points over the three pairs and Dr, Df not at all, so the pairs'
  # avg gaps (a third of the MIA difference) are 1, 3 and 2 points: mean 2.
  assert row["retrain_spread"] == pytest.approx(0.02)
  assert targets.targets_markdown([row]).splitlines()[-3].endswith("| 2.0 |")


def test_megu_against_baselines_needs_a_baseline_in_the_row():
  from megu_jax.harness import targets as targets_lib  # pylint: disable=import-outside-toplevel
  row = {"scenario": "full_class", "forget": ["Shirt"],
         "methods": {name: {"gaussian_kl": {s: {"mean": 1.0} for s in ("forget", "retain", "val")}}
                     for name in ("original", "retrain", "megu")}}
  with pytest.raises(ValueError, match="no baseline beside 'megu'"):
    targets_lib.against_baselines(row, "gaussian_kl", "mean")
