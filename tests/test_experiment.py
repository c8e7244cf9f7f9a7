"""The main job end to end on digits: results.json schema, report, plots; bad input fails first."""
import json
import os

import numpy as np
import pytest

from megu_jax import transition
from megu_jax.configs import digits as digits_config
from megu_jax.harness import experiment

SCHEMA_KEYS = {"retain_test_acc", "forget_test_acc", "retain_train_acc", "forget_train_acc",
               "test_acc", "mia_entropy_lr", "mia_confidence_svc", "related_test_acc",
               "probe_forget_acc", "time_s", "compile_s"}


def quick_config(**overrides):
  config = digits_config.get_config("quick")
  config.update_from_flattened_dict(overrides)  # dotted keys reach nested fields
  return config


def test_results_json_schema_report_and_plots(tmp_path):
  summary = experiment.run_unlearning(quick_config(), str(tmp_path))
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  assert results == json.loads(json.dumps(summary))
  assert results["dataset"] == "digits" and results["scenario"] == "full_class"
  assert results["forget"] == ["3"] and results["seed"] == 0
  assert set(results["methods"]) == {"original", "retrain", "megu"}
  for name, values in results["methods"].items():
    assert SCHEMA_KEYS <= set(values), name
    assert ("avg_gap" in values) == (name != "retrain")
    for key in SCHEMA_KEYS - {"time_s", "compile_s"} | ({"avg_gap"} & set(values)):
      assert 0.0 <= values[key] <= 1.0, (name, key, values[key])
  assert results["methods"]["original"]["time_s"] == 0.0
  assert results["methods"]["retrain"]["forget_test_acc"] < 0.2  # it never saw a 3
  assert results["methods"]["megu"]["time_s"] > 0
  for name in ("report.md", "per_class_accuracy.png", "transition.png", "transition.npy",
               "split/split.json"):
    assert (tmp_path / name).exists(), name
  report = (tmp_path / "report.md").read_text()
  assert "| megu |" in report and "| retrain |" in report
  # Models are reused on a rerun: the checkpoints are not rewritten.
  original_dir = tmp_path / "models" / f"original_fine_seed0_{experiment.recipe_hash(quick_config())}"
  stamp = os.path.getmtime(original_dir / "final_metrics.json")
  experiment.run_unlearning(quick_config(methods="original"), str(tmp_path))
  assert os.path.getmtime(original_dir / "final_metrics.json") == stamp
  # ... but a changed recipe trains a new model.
  assert experiment.recipe_hash(quick_config(epochs=3)) != experiment.recipe_hash(quick_config())


@pytest.mark.parametrize("overrides,pattern", [
    ({"methods": "original,forgetful"}, "'forgetful'.*megu"),
    ({"forget": "Shirt"}, "Shirt"),
    ({"scenario": "sideways"}, "sideways"),
    ({"scenario": "sub_class", "forget": "3"}, "digits"),
    ({"megu.transition": "crystal_ball"}, "crystal_ball"),
    ({"batch_size": 31}, "batch_size=31"),
])
def test_bad_input_fails_before_any_compute(tmp_path, overrides, pattern):
  with pytest.raises(ValueError, match=pattern):
    experiment.run_unlearning(quick_config(**overrides), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()


def test_a_transition_file_of_the_wrong_size_fails_before_any_compute(tmp_path):
  path = str(tmp_path / "t5.npy")
  transition.save_transition(path, transition.scores_to_transition(np.ones((5, 5))), {})
  with pytest.raises(ValueError, match="5"):
    experiment.run_unlearning(quick_config(**{"megu.transition": path}), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
