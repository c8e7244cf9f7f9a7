"""MeGU's variants on digits against Retrain's distribution: each variant changes MeGU fields;
every row gets a table beside doing nothing and the floor."""
import json

import numpy as np
import pytest

from megu_jax import ensemble_metrics
from megu_jax.configs import digits as digits_config
from megu_jax.harness import ablations
from megu_jax.harness import benchmark
from megu_jax.harness import targets


def test_variants_are_scored_per_row_against_retrain(tmp_path):
  config = digits_config.get_config("quick")
  chosen = {ablations.DEFAULTS: {}, "noise: both": {"noise": "both"},
            "T: the default's": {"transition": config.megu.transition},
            # digits has no grouping of its classes for the hierarchy T to read
            "T: hierarchy": {"transition": "hierarchy"}}
  config.ensemble_size = ensemble_metrics.MIN_MODELS_FORGETTING
  config.ensemble_retain_examples, config.ensemble_val_examples = 100, 100
  config.benchmark_scenarios = "full_class:3;random:20@1"
  config.train_subset = 1200  # the rest of the pool: unseen images for the margin gap
  summary = ablations.run(config, str(tmp_path), chosen, models_root=str(tmp_path / "shared"),
                          beside=("eu_k",))
  # The models went where they were asked to, to be shared with other workdirs.
  assert list((tmp_path / "shared").glob("original_*")) and not (tmp_path / "models").exists()
  assert set(summary["rows"]) == {benchmark.cell_name("full_class", "3", 0),
                                  benchmark.cell_name("random", "20@1", 0)}
  # A variant that restates the defaults is listed, not run again under another name; so is one
  # whose field the row's scenario replaces (the random scenario sets its own noise).
  assert summary["same_as_defaults"] == ["T: the default's"]
  full, random = (summary["rows"][benchmark.cell_name(*row, 0)]
                  for row in (("full_class", "3"), ("random", "20@1")))
  assert full["same_as_defaults"] == [] and random["same_as_defaults"] == ["noise: both"]
  # A baseline named beside runs from the same originals on every row.
  assert set(full["methods"]) == {"original", "retrain", "eu_k", ablations.DEFAULTS,
                                  "noise: both"}
  assert set(random["methods"]) == {"original", "retrain", "eu_k", ablations.DEFAULTS}
  assert summary["beside"] == ["eu_k"]
  for row in summary["rows"].values():
    # A variant a row cannot take is listed with its reason there; the others still ran.
    assert list(row["not_applicable"]) == ["T: hierarchy"]
    assert "superclass_of" in row["not_applicable"]["T: hierarchy"]
    for entry in row["methods"].values():
      assert entry["ensemble_size"] == config.ensemble_size
      assert {"forget", "retain", "val"} <= set(entry["gaussian_kl"])
    # The originals' and Retrain's mean margins on the forgotten and on unseen images: the
    # originals saw the forgotten images, so they are surer of them than of unseen ones.
    gap = row["margins"]
    assert gap["original"]["forgotten"]["mean"] > gap["original"]["unseen"]["mean"]
    assert all(np.isfinite(gap[role][name][k]) for role in gap for name in gap[role]
               for k in ("mean", "sd"))
  # Each variant is set against the defaults on the same examples: the paired difference of
  # the row's headline statistic, inside its own interval.
  paired = full["methods"]["noise: both"]["vs_defaults"]
  assert (paired["family"], paired["statistic"]) == targets.headline_statistic(
      [full], config.ensemble_size)
  for split in ("forget", "retain", "val"):
    value = full["methods"]["noise: both"][paired["family"]][split][paired["statistic"]]
    defaults = full["methods"][ablations.DEFAULTS][paired["family"]][split][paired["statistic"]]
    assert paired[split]["difference"] == pytest.approx(value - defaults)
    low, high = paired[split]["ci95"]
    assert low <= paired[split]["difference"] <= high
  assert all("vs_defaults" not in row["methods"][name] for row in summary["rows"].values()
             for name in ("original", "retrain", "eu_k", ablations.DEFAULTS))
  stored = json.loads((tmp_path / "ablations.json").read_text())
  assert stored["rows"]["full_class_3_seed0"]["methods"]["noise: both"]["forgetting_quality"]
  table = (tmp_path / "ablations.md").read_text()
  assert "| noise: both |" in table and "| retrain |" in table and "| original |" in table
  assert "| eu_k |" in table
  assert "on the forgotten training images / on unseen images like them: original " in table
  assert "whose settings they already are: T: the default's." in table
  assert "where their settings are the defaults': noise: both." in table
  assert "Each variant minus the defaults, paired over the same examples" in table
  assert "which its settings do not fit: T: hierarchy (config.megu.transition='hierarchy'" in table
  # A variant's runs are its own: the defaults' runs were not overwritten by the variants'.
  assert (tmp_path / "rows" / "full_class_3_seed0" / "runs" / "megu-noise_both").is_dir()
  assert (tmp_path / "rows" / "full_class_3_seed0" / "runs" / "megu").is_dir()


def test_every_listed_variant_names_real_megu_fields():
  from megu_jax.unlearning import megu
  fields = set(megu.default_megu_config().keys())
  fields |= {f"random_scenario.{field}" for field in fields}
  for overrides in ablations.variants("t.npy").values():
    assert set(overrides) <= fields


def test_the_noise_ablations_change_the_noise_in_every_scenario():
  config = digits_config.get_config("quick")
  table = ablations.variants(None)
  full = benchmark.cell_config(config, "full_class", "3", seed=0)
  random = benchmark.cell_config(config, "random", "20@1", seed=0)
  # The defaults have no noise in either scenario (the full-class rows' own field, the random
  # rows' random_scenario.noise), so "none" restates them in both and "both" in neither; the
  # noise variants set both fields, so each changes the noise in every scenario.
  assert all(ablations._same_settings(cell, table["noise: none"]) for cell in (full, random))
  assert not any(ablations._same_settings(cell, table["noise: both"]) for cell in (full, random))
  for half in ("noise: negative only", "noise: positive only"):
    assert not any(ablations._same_settings(cell, table[half]) for cell in (full, random))
  # Settings a field's scenario does not use still count: T changes both.
  assert not any(ablations._same_settings(cell, table["T: uniform"]) for cell in (full, random))


def test_variants_from_the_command_line_and_their_bad_values():
  assert ablations.parse_variants("tau:guidance_temperature=0.7,noise=none") == {
      ablations.DEFAULTS: {}, "tau": {"guidance_temperature": 0.7, "noise": "none"}}
  with pytest.raises(ValueError, match="must read NAME:field=value"):
    ablations.parse_variants("tau")
  config = digits_config.get_config("quick")
  config.ensemble_size = 3
  with pytest.raises(ValueError, match=r"unknown config.megu field\(s\) \['tau'\]"):
    ablations.run(config, "/nonexistent", {"bad": {"tau": 1}})
  with pytest.raises(ValueError, match=r"unknown config.megu field\(s\) \['random_scenario.tau'\]"):
    ablations.run(config, "/nonexistent", {"bad": {"random_scenario.tau": 1}})
  with pytest.raises(ValueError, match="unknown unlearning method 'eu'"):
    ablations.run(config, "/nonexistent", {}, beside=("eu",))
  with pytest.raises(ValueError, match="--beside 'megu': that row is already in the table"):
    ablations.run(config, "/nonexistent", {}, beside=("megu",))


def test_added_variants_run_beside_the_ablations_and_not_with_variants():
  table = ablations.variant_table(add_text="half:receiving_retain_fraction=0.5")
  assert table == {**ablations.variants(None), "half": {"receiving_retain_fraction": 0.5}}
  assert list(ablations.variant_table("half:steps=3")) == [ablations.DEFAULTS, "half"]
  # A colon ends a name in the command-line form, so an added variant never replaces one of these.
  assert all(":" in name for name in ablations.variants("t.npy") if name != ablations.DEFAULTS)
  with pytest.raises(ValueError, match="not both"):
    ablations.variant_table("a:steps=3", "b:steps=4")
  with pytest.raises(ValueError, match="config's own settings"):
    ablations.variant_table(add_text="megu (defaults):steps=3")


def test_a_dotted_variant_field_sets_the_nested_section():
  from megu_jax.harness import ensemble  # pylint: disable=import-outside-toplevel
  from megu_jax.unlearning import megu  # pylint: disable=import-outside-toplevel
  section = megu.default_megu_config()
  ensemble.apply_overrides(section, {"random_scenario.learning_rate": 0.04, "steps": 7})
  assert section.random_scenario.learning_rate == 0.04 and section.steps == 7
  assert section.learning_rate == megu.default_megu_config().learning_rate
