"""The ablation script on digits: every variant changes one MeGU field; tables are written."""
import json

from megu_jax.configs import digits as digits_config
from megu_jax.harness import ablations


def test_ablations_write_a_table_with_retrain_and_each_variant(tmp_path, monkeypatch):
  chosen = {"megu (defaults)": {}, "noise: none": {"noise": "none"},
            "labels: argmax": {"label_mode": "argmax"}}
  monkeypatch.setattr(ablations, "variants", lambda gemini: chosen)
  config = digits_config.get_config("quick")
  config.seeds = 1
  summary = ablations.run(config, str(tmp_path), None)
  assert set(summary["summary"]) == {"retrain", *chosen}
  stored = json.loads((tmp_path / "ablations.json").read_text())
  assert stored["summary"]["noise: none"]["avg_gap"]["n"] == 1
  table = (tmp_path / "ablations.md").read_text()
  assert "| noise: none |" in table and "| retrain |" in table


def test_every_listed_variant_names_real_megu_fields():
  from megu_jax.unlearning import megu
  fields = set(megu.default_megu_config().keys())
  for overrides in ablations.variants("t.npy").values():
    assert set(overrides) <= fields
