"""The pure train step on 1 device, a 2-device mesh and 2-device pmap; checkpoint resume."""
import json
import os

import jax
import numpy as np
import pytest

from megu_jax import datasets
from megu_jax import parallel
from megu_jax import train
from megu_jax.configs import digits as digits_config


@pytest.fixture(scope="module")
def digits():
  return datasets.load_dataset("digits")


def run_steps(dataset, mode, num_devices, num_steps=6, batch_size=32):
  """Trains a few steps with augmentation on; returns the losses and the final state."""
  config = digits_config.get_config()
  config.batch_size = batch_size
  model = train.models.create_model(config.model, dataset.num_classes)
  tx = train.make_training_optimizer(config, steps_per_epoch=20)
  dp = parallel.DataParallel(mode, tuple(jax.devices()[:num_devices]))
  mean, std = dataset.mean, dataset.std
  key = jax.random.key(0)
  state = dp.put_replicated(train.create_train_state(model, tx, key, dataset.image_shape))
  step = dp.compile_step(train.make_train_step(model, tx, mean=mean, std=std, crop_padding=1))
  losses = []
  for s in range(num_steps):
    positions = train.epoch_order(0, 0, len(dataset.train_labels))[s * batch_size:
                                                                    (s + 1) * batch_size]
    batch = dp.put_batch(train.local_batch(dataset.train_images, dataset.train_labels, positions))
    state, metrics = step(state, batch, parallel.fold_in_step(key, s))
    losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(dp.get_replicated(state))


def test_two_devices_needed():
  assert jax.device_count() >= 2, "tests/conftest.py should provide 2 fake CPU devices"


def test_mesh_and_pmap_on_two_devices_equal_one_device(digits):
  # Tolerance: the same float32 program up to the order of cross-device reductions
  # (a few ulps per op, amplified by 6 SGD steps) -- far below any real difference.
  reference_losses, reference_state = run_steps(digits, "mesh", 1)
  assert reference_losses[-1] < reference_losses[0]  # it trains
  for mode in ("mesh", "pmap"):
    losses, state = run_steps(digits, mode, 2)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, atol=1e-6, err_msg=mode)
    for ref, got in zip(jax.tree.leaves(reference_state), jax.tree.leaves(state)):
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=mode)


def test_pmap_step_synchronises_batchnorm_statistics(digits):
  # Without cross-device BatchNorm each replica would keep its own running mean.
  _, one = run_steps(digits, "mesh", 1, num_steps=2)
  _, two = run_steps(digits, "pmap", 2, num_steps=2)
  np.testing.assert_allclose(two.batch_stats["bn1"]["mean"], one.batch_stats["bn1"]["mean"],
                             rtol=1e-5, atol=1e-6)


def _final_params(workdir):
  return jax.device_get(train.restore_trained(workdir).state.params)


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, digits):
  config = digits_config.get_config("quick")
  config.checkpoint_every_steps = 10
  uninterrupted = train.train_and_evaluate(config, str(tmp_path / "a"), dataset=digits)

  partial = train.train_and_evaluate(config, str(tmp_path / "b"), dataset=digits,
                                     stop_after_steps=23)
  assert partial == {"stopped_at_step": 23}
  assert not os.path.exists(tmp_path / "b" / "final_metrics.json")
  resumed = train.train_and_evaluate(config, str(tmp_path / "b"), dataset=digits)

  assert resumed["test_acc"] == uninterrupted["test_acc"]
  for a, b in zip(jax.tree.leaves(_final_params(tmp_path / "a")),
                  jax.tree.leaves(_final_params(tmp_path / "b"))):
    np.testing.assert_array_equal(a, b)  # bitwise on CPU: same programs, same data order
  # The metrics log has each logged step once, even across the interruption.
  steps = [json.loads(l)["step"] for l in open(tmp_path / "b" / "metrics.jsonl")]
  assert steps == sorted(set(steps))


def test_training_reaches_good_accuracy_and_writes_outputs(tmp_path, digits):
  final = train.train_and_evaluate(digits_config.get_config(), str(tmp_path), dataset=digits)
  assert final["test_acc"] > 0.9, final
  assert final["time_s"] > 0 and final["compile_s"] > 0
  for name in ("config.json", "model_info.json", "metrics.jsonl", "final_metrics.json"):
    assert (tmp_path / name).exists(), name
  # A finished run is not redone.
  assert train.train_and_evaluate(digits_config.get_config(), str(tmp_path), dataset=digits) == final


def test_retrain_trains_on_the_retain_set_only_and_saves_its_split(tmp_path, digits):
  config = digits_config.get_config("quick")
  config.retrain = True
  config.forget = "3"
  final = train.train_and_evaluate(config, str(tmp_path), dataset=digits)
  forget_count = int(np.sum(digits.train_labels == 3))
  assert final["train_examples"] == len(digits.train_labels) - forget_count
  assert (tmp_path / "split" / "forget_train.npy").exists()
  trained = train.restore_trained(str(tmp_path))
  logits = train.predict(trained, digits.test_images)["logits"]
  # Never trained on a 3, the model never predicts 3 for a 3 (it has no evidence for the class).
  threes = digits.test_labels == 3
  assert np.mean(np.argmax(logits[threes], -1) == 3) < 0.2


@pytest.mark.parametrize("field,value,pattern", [
    ("batch_size", 33, "batch_size=33.*multiple of the device count"),
    ("batch_size", 0, "batch_size=0"),
    ("learning_rate", -0.1, "learning_rate=-0.1"),
    ("epochs", 0, "epochs=0"),
    ("schedule", "linear", "schedule='linear'"),
    ("dataset", "mnist", "dataset='mnist'"),
])
def test_bad_config_fails_before_any_work(tmp_path, field, value, pattern):
  config = digits_config.get_config()
  config[field] = value
  with pytest.raises(ValueError, match=pattern):
    train.train_and_evaluate(config, str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()
