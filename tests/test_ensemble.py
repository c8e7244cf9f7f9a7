"""Ensembles on digits: the schema of ensemble.json, resume model by model, the vmapped trainer
against the sequential one, and every bad input of the yardstick issue."""
import json
import logging
import os
import pathlib
import shutil

import jax
import numpy as np
import pytest

from megu_jax import ensemble_metrics
from megu_jax import ensemble_training
from megu_jax import models
from megu_jax import parallel
from megu_jax import train
from megu_jax import unlearning
from megu_jax.configs import digits as digits_config
from megu_jax.harness import ensemble
from megu_jax.harness import experiment

N = ensemble_metrics.MIN_MODELS_FORGETTING


def ensemble_config(**overrides):
  config = digits_config.get_config("quick")
  config.ensemble_size = N
  config.methods = "original,retrain,finetune,megu"
  config.ensemble_retain_examples = 200
  config.ensemble_val_examples = 150
  config.update_from_flattened_dict(overrides)
  return config


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("ensemble")
  summary = ensemble.run_ensemble(ensemble_config(), str(workdir))
  return workdir, summary


def test_ensemble_json_holds_every_field_the_issue_names(finished):
  workdir, summary = finished
  on_disk = json.loads((workdir / "ensemble.json").read_text())
  assert on_disk["methods"].keys() == summary["methods"].keys() == {"original", "retrain",
                                                                    "finetune", "megu"}
  assert on_disk["dataset"] == "digits" and on_disk["scenario"] == "full_class"
  assert on_disk["forget"] == ["3"] and on_disk["ensemble_size"] == N
  assert on_disk["examples"]["retain"] == 200 and on_disk["examples"]["val"] == 150
  assert on_disk["examples"]["forget"] == summary["forget_size"] > 0
  for name, entry in on_disk["methods"].items():
    for split in ("forget", "retain", "val"):
      klom = entry["klom"][split]
      assert {"p95", "p99", "mean", "p95_ci95"} <= set(klom), name
      low, high = klom["p95_ci95"]
      assert low <= klom["p95"] <= high
      assert {"mean", "p95", "mean_ci95"} <= set(entry["gaussian_kl"][split])
    assert {"F", "F_ci95", "score"} <= set(entry["forgetting_quality"])
    for column in ("retain_test_acc", "forget_test_acc", "test_acc", "mia_entropy_lr", "time_s"):
      assert {"mean", "std"} <= set(entry[column]), (name, column)
  assert on_disk["provenance"]["command"] and on_disk["provenance"]["date"]
  # The settings each method ran with, as configured (the frozen-defaults test reads them).
  assert on_disk["settings"].keys() == {"finetune", "megu"}
  assert on_disk["settings"]["megu"] == json.loads(json.dumps(ensemble_config().megu.to_dict()))
  for name in ("oracle", "original", "retrain", "finetune"):
    with np.load(workdir / "margins" / f"{name}.npz") as margins:
      assert margins["forget"].shape == (N, on_disk["examples"]["forget"])
      assert margins["val"].shape == (N, 150) and margins["val_positions"].shape == (150,)
  # Where the forgotten 3s went: the original still calls them 3, no oracle ever does.
  three = on_disk["class_names"].index("3")
  assert on_disk["methods"]["original"]["forget_predicted"][three] > 0.8
  assert on_disk["oracles"]["forget_predicted"][three] == 0.0
  for entry in [*on_disk["methods"].values(), on_disk["oracles"]]:
    assert sum(entry["forget_predicted"]) == pytest.approx(1.0)
  # The retain divergences by class: every retained digit, none of the forgotten 3s.
  for entry in (on_disk["methods"]["megu"], on_disk["methods"]["megu"]["floor"]):
    for family in ("klom", "gaussian_kl"):
      by_class = entry["retain_by_class"][family]
      assert "3" not in by_class and len(by_class) == 9
      assert all(row["p95_ci95"][0] <= row["p95"] <= row["p95_ci95"][1]
                 for row in by_class.values())
  for plot in ("forget_klom_cdf.png", "forget_margins.png", "forget_margins_megu.png",
               "ensemble.md"):
    assert (workdir / plot).stat().st_size > 0


def test_doing_nothing_is_further_from_retrain_than_the_floor(finished):
  _, summary = finished
  original, floor = summary["methods"]["original"], summary["methods"]["retrain"]
  # The original still knows class 3; the floor never saw it: per example, the forget margins
  # of doing nothing lie far from the oracles', the floor's do not.
  assert (original["gaussian_kl"]["forget"]["mean"]
          > 5 * floor["gaussian_kl"]["forget"]["mean"])
  assert original["klom"]["forget"]["mean"] > floor["klom"]["forget"]["mean"]
  assert original["forget_test_acc"]["mean"] > 0.8 > 0.05 > floor["forget_test_acc"]["mean"]


def test_megu_moves_the_forgotten_margins_toward_the_oracles(finished):
  workdir, _ = finished
  load = lambda name: np.load(workdir / "margins" / f"{name}.npz")["forget"]
  oracle = load("oracle").mean(0)
  distance = {name: np.abs(load(name).mean(0) - oracle).mean() for name in ("original", "megu")}
  # Per forgotten example, the mean margin over the ensemble: the original is sure of class 3,
  # the oracles never saw it; MeGU's margins land far closer to the oracles'.
  assert distance["megu"] < 0.5 * distance["original"], distance


def test_a_rerun_trains_nothing_and_a_larger_ensemble_only_the_new_seeds(finished, tmp_path,
                                                                         monkeypatch):
  workdir, summary = finished
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  trained_dirs = []
  real = train.train_and_evaluate

  def watched(config, directory, *args, **kwargs):
    if not os.path.exists(os.path.join(directory, "final_metrics.json")):
      trained_dirs.append(os.path.basename(directory))
    return real(config, directory, *args, **kwargs)
  monkeypatch.setattr(train, "train_and_evaluate", watched)
  again = ensemble.run_ensemble(ensemble_config(), str(copy))
  assert trained_dirs == []
  assert again["methods"]["finetune"]["klom"] == summary["methods"]["finetune"]["klom"]

  # A kill mid-ensemble: one original's training is lost, and one method run.
  seeds = ensemble.member_seeds(ensemble_config())
  lost = experiment.model_dirs(ensemble.role_config(ensemble_config(), "original",
                                                    seeds["original"][1]),
                               str(copy / "models"))["original"]
  shutil.rmtree(lost)
  (copy / "runs" / "finetune" / f"seed{seeds['original'][2]}.json").unlink()
  ensemble.run_ensemble(ensemble_config(), str(copy))
  assert trained_dirs == [os.path.basename(lost)]

  trained_dirs.clear()
  bigger = ensemble.run_ensemble(ensemble_config(ensemble_size=N + 1,
                                                 ensemble_method_sizes=f"finetune:{N}"),
                                 str(copy))
  assert sorted(trained_dirs) == sorted(
      os.path.basename(experiment.model_dirs(ensemble.role_config(
          ensemble_config(), role, ensemble.member_seeds(ensemble_config(), N + 1)[role][-1]),
          str(copy / "models"))["original" if role == "original" else "retrain"])
      for role in ("original", "oracle", "floor"))
  assert bigger["methods"]["original"]["ensemble_size"] == N + 1
  assert bigger["methods"]["finetune"]["ensemble_size"] == N


def test_an_edit_to_a_methods_code_reruns_that_method_only(finished, tmp_path, monkeypatch):
  workdir, summary = finished
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  calls = {"finetune": 0, "megu": 0}
  for name in calls:
    method = unlearning.get_method(name)

    def counted(*args, _name=name, _method=method, **kwargs):
      calls[_name] += 1
      return _method(*args, **kwargs)
    monkeypatch.setitem(unlearning.UNLEARNING_METHODS, name, counted)
  real_digest = ensemble.method_source_digest
  monkeypatch.setattr(ensemble, "method_source_digest",
                      lambda name: "edited" if name == "finetune" else real_digest(name))
  again = ensemble.run_ensemble(ensemble_config(), str(copy))
  assert calls == {"finetune": N, "megu": 0}
  assert again["methods"]["megu"]["klom"] == summary["methods"]["megu"]["klom"]


def test_the_retain_divergence_by_class_is_highest_where_the_margins_were_moved():
  rng = np.random.default_rng(0)
  models = 64  # enough for the binned KLoM to be near 0 where the distributions agree
  oracle = rng.normal(3.0, 0.5, (models, 40))
  method = rng.normal(3.0, 0.5, (models, 40))
  labels = np.repeat([0, 2], 20)
  method[:, labels == 2] -= 3.0  # class 2's retained images are disturbed, class 0's are not
  per_example = ensemble.compare({split: method for split in ensemble.SPLITS},
                                 {split: oracle for split in ensemble.SPLITS})["per_example"]
  by_class = ensemble.retain_by_class(per_example, labels, ["a", "b", "c"])
  for family in ("klom", "gaussian_kl"):
    assert set(by_class[family]) == {"a", "c"}
    assert by_class[family]["c"]["p95"] > 5 * by_class[family]["a"]["p95"]


def test_the_code_digest_tells_methods_apart_and_skips_the_evaluation_roles():
  digests = {name: ensemble.method_source_digest(name) for name in ("megu", "finetune", "ssd")}
  assert all(isinstance(d, str) and len(d) == 16 for d in digests.values())
  assert len(set(digests.values())) == 3
  assert ensemble.method_source_digest("floor") is None


def test_the_code_digest_reads_the_registering_module_even_under_a_wrapper(monkeypatch):
  real = ensemble.method_source_digest("ssd")
  ensemble._module_source_digest.cache_clear()  # the wrapper comes before the first digest
  method = unlearning.get_method("ssd")
  monkeypatch.setitem(unlearning.UNLEARNING_METHODS, "ssd",
                      lambda *args, **kwargs: method(*args, **kwargs))
  assert ensemble.method_source_digest("ssd") == real
  assert unlearning.registered_module("ssd") == "megu_jax.unlearning.ssd"


def test_a_model_directory_holding_another_model_is_moved_aside_and_retrained(finished, tmp_path,
                                                                             caplog):
  workdir, _ = finished
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  seeds = ensemble.member_seeds(ensemble_config())
  directory = pathlib.Path(experiment.model_dirs(
      ensemble.role_config(ensemble_config(), "oracle", seeds["oracle"][0]),
      str(copy / "models"))["retrain"])
  recorded = json.loads((directory / "config.json").read_text())
  recorded["seed"] = 12345  # the directory now claims to hold another seed's model
  (directory / "config.json").write_text(json.dumps(recorded))
  with caplog.at_level(logging.WARNING):
    ensemble.run_ensemble(ensemble_config(), str(copy))
  assert f"{directory} holds another model (it was trained with seed=12345, not" in caplog.text
  assert json.loads((directory / "config.json").read_text())["seed"] == seeds["oracle"][0]
  assert (copy / "mismatched_models" / directory.name).is_dir()


def test_a_method_that_fails_on_one_original_is_reported_with_its_seed(finished, tmp_path,
                                                                       monkeypatch, caplog):
  workdir, _ = finished
  copy = tmp_path / "copy"
  shutil.copytree(workdir, copy)
  shutil.rmtree(copy / "runs" / "finetune")
  finetune = unlearning.get_method("finetune")
  bad_seed = ensemble.member_seeds(ensemble_config())["original"][0]

  def flaky(trained, forget, retain, config, key, **kwargs):
    if config.seed == bad_seed:
      raise FloatingPointError("the loss went to nan")
    return finetune(trained, forget, retain, config, key, **kwargs)
  monkeypatch.setitem(unlearning.UNLEARNING_METHODS, "finetune", flaky)
  with caplog.at_level(logging.WARNING):
    summary = ensemble.run_ensemble(ensemble_config(ensemble_size=N + 1), str(copy))
  assert summary["failures"] == {"finetune": [
      {"seed": bad_seed, "error": "FloatingPointError: the loss went to nan"}]}
  assert summary["methods"]["finetune"]["ensemble_size"] == N  # the other originals are kept
  assert f"finetune failed on the original of seed {bad_seed}" in caplog.text


@pytest.mark.parametrize("overrides,message", [
    ({"ensemble_size": 1}, f"config.ensemble_size=1 must be an integer >= {N}"),
    ({"ensemble_method_sizes": "finetune:1"}, "finetune's size must be an integer in"),
    ({"ensemble_method_sizes": "ssd:2"}, "names 'ssd', which is not one of the methods"),
    ({"methods": "original,unlearn_all"}, "unknown unlearning method 'unlearn_all'"),
    ({"scenario": "sideways"}, "unknown scenario 'sideways'"),
    ({"ensemble_training": "parallel_universe"}, "config.ensemble_training='parallel_universe'"),
])
def test_bad_ensemble_requests_fail_in_one_line_before_training(tmp_path, overrides, message,
                                                                no_compute):
  with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
    ensemble.run_ensemble(ensemble_config(**overrides), str(tmp_path / "w"))
  assert not (tmp_path / "w" / "models").exists()


def test_nan_margins_are_refused_naming_the_argument():
  good = np.zeros((N, 4))
  bad = good.copy()
  bad[0, 1] = np.nan
  with pytest.raises(ValueError, match="method_margins"):
    ensemble_metrics.klom(bad, good)


def test_models_trained_at_once_equal_models_trained_one_after_another(tmp_path):
  config = digits_config.get_config("quick")
  dataset = train.load_config_dataset(config)
  one_device = parallel.DataParallel("mesh", devices=(jax.devices()[0],))
  model = models.create_model(config.model, dataset.num_classes)
  configs = [ensemble.member_config(config, seed) for seed in (3, 4)]
  finals = ensemble_training.train_group(configs, [str(tmp_path / f"group{s}") for s in (3, 4)],
                                         dataset)
  for member, final in zip(configs, finals):
    alone, info = train.fit(member, model, dataset.train_images, dataset.train_labels,
                            np.arange(len(dataset.train_labels)), mean=dataset.mean,
                            std=dataset.std, key=jax.random.key(member.seed), dp=one_device)
    together = train.restore_trained(str(tmp_path / f"group{member.seed}"))
    assert final["group_size"] == 2 and final["steps"] == info["steps"] == 88
    # The same keys, batches and learning rates, one model per device as train.fit on one device:
    # what differs is vmap's grouped convolutions, the same arithmetic in another order.
    # Measured after these 88 steps: max |Δθ| 7e-6.
    for a, b in zip(jax.tree.leaves(alone.params), jax.tree.leaves(together.state.params)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-4)
