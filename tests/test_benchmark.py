"""The benchmark runner: resume after a kill without redoing finished cells; mean/std aggregation."""
import glob
import json
import os

import pytest

from megu_jax.configs import digits as digits_config
from megu_jax.harness import benchmark
from megu_jax.harness import experiment


def quick_config():
  config = digits_config.get_config("quick")
  config.benchmark_scenarios = "full_class:3;random:20"
  config.methods = "original,megu"
  config.seeds = 1
  return config


def test_a_killed_benchmark_resumes_without_redoing_finished_cells(tmp_path, monkeypatch):
  calls = []
  real_run_method = experiment.run_method

  def run_method_then_die(setting, name):
    if len(calls) == 4:
      raise KeyboardInterrupt("killed")  # as if the process died mid-benchmark
    calls.append((setting.split.scenario, name))
    return real_run_method(setting, name)

  monkeypatch.setattr(experiment, "run_method", run_method_then_die)
  with pytest.raises(KeyboardInterrupt):
    benchmark.run_benchmark(quick_config(), str(tmp_path))
  assert len(calls) == 4  # 3 methods (retrain is always added) of the first cell + 1 of the second
  done = sorted(p.name for p in tmp_path.glob("cells/*/methods/*.json"))
  assert len(done) == 4

  calls.clear()
  result = benchmark.run_benchmark(quick_config(), str(tmp_path))
  assert calls == [("random", "original"), ("random", "megu")]  # only what was missing
  assert len(list(tmp_path.glob("cells/*/methods/*.json"))) == 6
  assert set(result["summary"]) == {"full_class 3", "random 20"}
  megu = result["summary"]["full_class 3"]["megu"]
  assert megu["forget_test_acc"]["n"] == 1 and "avg_gap" in megu
  for name in ("benchmark.json", "benchmark.md", "dr_vs_df.png", "mia.png", "time.png"):
    assert (tmp_path / name).exists(), name
  assert "| megu |" in (tmp_path / "benchmark.md").read_text()

  calls.clear()
  benchmark.run_benchmark(quick_config(), str(tmp_path))
  assert calls == []  # everything finished: nothing is redone


def test_summarize_gives_mean_and_sample_std_over_seeds():
  records = [{"scenario": "full_class", "forget": "Shirt", "seed": s,
              "methods": {"megu": {"forget_test_acc": v, "time_s": t}}}
             for s, (v, t) in enumerate([(0.1, 2.0), (0.2, 4.0), (0.3, 6.0)])]
  stats = benchmark.summarize(records)["full_class Shirt"]["megu"]
  assert stats["forget_test_acc"]["mean"] == pytest.approx(0.2)
  assert stats["forget_test_acc"]["std"] == pytest.approx(0.1)  # sample std (ddof=1)
  assert stats["time_s"]["mean"] == pytest.approx(4.0) and stats["time_s"]["n"] == 3
  table = benchmark.benchmark_markdown({"dataset": "x", "seeds": 3, "summary":
                                        benchmark.summarize(records)})
  assert "20.0 ± 10.0" in table and "4.0 ± 2.0" in table


@pytest.mark.parametrize("text,pattern", [("full_class", "SCENARIO:WHAT"), ("", "empty"),
                                          ("random:many", "sample count")])
def test_bad_scenarios_fail_before_any_training(tmp_path, text, pattern):
  config = quick_config()
  config.benchmark_scenarios = text
  with pytest.raises(ValueError, match=pattern):
    benchmark.run_benchmark(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_the_all_class_config_names_every_row_and_contains_the_development_rows():
  from megu_jax import unlearning  # pylint: disable=import-outside-toplevel
  from megu_jax.configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  config = fashion_mnist.get_config("all_classes")
  rows = benchmark.parse_scenarios(config.benchmark_scenarios)
  assert len(rows) == 10 + 4 + 3 and config.ensemble_size == 8
  assert set(benchmark.parse_scenarios(fashion_mnist.DEVELOPMENT_ROWS)) <= set(rows)
  for name in config.methods.split(","):
    unlearning.get_method(name)  # every method is registered
  with pytest.raises(ValueError, match="unknown variant 'all_class'"):
    fashion_mnist.get_config("all_class")


def _differences_from_the_frozen_defaults(recorded: dict, config) -> list[str]:
  """What an all-class row's ensemble.json ran with that the ``:all_classes`` config does not
  have now (MeGU's settings as they applied on the row's scenario, the methods, N)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from megu_jax import unlearning  # pylint: disable=import-outside-toplevel
  from megu_jax.unlearning import megu  # pylint: disable=import-outside-toplevel

  def as_run(settings: dict) -> dict:
    # What MeGU ran with on the row's scenario, merged by the library's own megu_settings
    # (random_scenario replaces fields in the random scenario only).
    row = ml_collections.ConfigDict({"scenario": recorded["scenario"], "megu": settings})
    merged = megu.megu_settings(row).to_dict()
    merged.pop("random_scenario")
    return merged

  recorded_settings = recorded["settings"]["megu"]
  # A field added after the row ran is absent from it; the row ran as if it had its no-op
  # value, so the config must still hold that value.
  added = {field: value for field, value in megu.NO_OP_VALUES.items()
           if field not in recorded_settings}
  try:
    ran = as_run({**recorded_settings, **added})
  except unlearning.UnlearningInputError as e:  # a field the library no longer knows
    return [str(e)]
  now = as_run(json.loads(json.dumps(config.megu.to_dict())))
  # Any other field the row lacks is unknown: megu_settings would fill in today's default.
  unknown = set(now) - set(recorded_settings) - set(added)
  differences = [f"megu.{field}: not recorded by the row, now {now[field]!r}"
                 for field in sorted(unknown)]
  differences += [f"megu.{field}: ran {ran[field]!r}, now {now[field]!r}"
                  for field in sorted(set(now) - unknown) if ran[field] != now[field]]
  if set(recorded["methods"]) != set(config.methods.split(",")):
    differences.append(f"methods: ran {sorted(recorded['methods'])}, now {config.methods}")
  if recorded["ensemble_size"] != config.ensemble_size:
    differences.append(f"ensemble_size: ran {recorded['ensemble_size']}, now "
                       f"{config.ensemble_size}")
  return differences


def test_the_all_class_table_was_run_with_the_frozen_defaults():
  """Every committed all-class row ran with the MeGU settings (and methods) the config has now:
  a default changed after the table fails here until the table is rerun (rows not yet rerun
  are absent, and the docs list them as still to run)."""
  from megu_jax.configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  config = fashion_mnist.get_config("all_classes")
  results = os.path.join(os.path.dirname(os.path.dirname(__file__)), "results", "ensembles",
                         "all_class")
  assert os.path.isdir(results), f"no all-class table at {results}"
  for path in sorted(glob.glob(os.path.join(results, "*", "ensemble.json"))):
    with open(path, encoding="utf-8") as f:
      assert _differences_from_the_frozen_defaults(json.load(f), config) == [], path


def test_the_frozen_defaults_check_names_what_a_row_ran_differently():
  from megu_jax.configs import fashion_mnist  # pylint: disable=import-outside-toplevel
  config = fashion_mnist.get_config("all_classes")
  row = lambda scenario, **megu_fields: {
      "scenario": scenario, "methods": config.methods.split(","),
      "ensemble_size": config.ensemble_size,
      "settings": {"megu": {**json.loads(json.dumps(config.megu.to_dict())), **megu_fields}}}
  assert _differences_from_the_frozen_defaults(row("full_class"), config) == []
  assert _differences_from_the_frozen_defaults(row("full_class", steps=7), config) == [
      f"megu.steps: ran 7, now {config.megu.steps}"]
  # A field the library no longer has is named, not skipped.
  (gone,) = _differences_from_the_frozen_defaults(row("full_class", retired_field=1), config)
  assert "retired_field" in gone
  unrecorded = row("full_class")
  del unrecorded["settings"]["megu"]["steps"]
  assert _differences_from_the_frozen_defaults(unrecorded, config) == [
      f"megu.steps: not recorded by the row, now {config.megu.steps}"]
  # random_scenario applies on random rows only.
  other = dict(config.megu.random_scenario.to_dict(), steps=7)
  assert _differences_from_the_frozen_defaults(row("full_class", random_scenario=other),
                                               config) == []
  assert _differences_from_the_frozen_defaults(row("random", random_scenario=other), config) == [
      f"megu.steps: ran 7, now {config.megu.random_scenario.steps}"]
  fewer = row("full_class")
  fewer["methods"] = ["original", "retrain", "megu"]
  fewer["ensemble_size"] = 4
  assert len(_differences_from_the_frozen_defaults(fewer, config)) == 2
