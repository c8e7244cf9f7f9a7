"""The finetuning-family baselines on digits: finetune, neggrad_plus, random_label, salun.

Each test asserts the effect in the direction the method promises, on a digits model trained once
for the module; the steps are checked on 1 device vs a 2-device mesh and pmap; bad settings fail
before any compute.
"""
import jax
import numpy as np
import optax
import pytest

from megu_jax import metrics
from megu_jax import parallel
from megu_jax import train
from megu_jax import unlearning
from megu_jax.configs import digits as digits_config
from megu_jax.unlearning import base as base_lib
from megu_jax.unlearning import neggrad_plus as neggrad_plus_lib
from megu_jax.unlearning import random_label as random_label_lib
from megu_jax.unlearning import salun as salun_lib

METHODS = ("finetune", "neggrad_plus", "random_label", "salun")


@pytest.fixture(scope="module")
def original_scores(digits, split, data, trained):
  return scores(trained, digits, split, data[0])


def scores(model, digits, split, forget):
  """Dr, Df on the test set; accuracy, mean true-class confidence and mean CE on D_f (train)."""
  test_logits = train.predict(model, digits.test_images)["logits"]
  forget_logits = train.predict(model, forget.images)["logits"]
  confidence = metrics.true_class_confidence(forget_logits, forget.labels)
  return {"Dr": metrics.accuracy(test_logits[split.retain_test],
                                 digits.test_labels[split.retain_test]),
          "Df": metrics.accuracy(test_logits[split.forget_test],
                                 digits.test_labels[split.forget_test]),
          "forget_train_acc": metrics.accuracy(forget_logits, forget.labels),
          "forget_confidence": float(confidence.mean()),
          "forget_ce": float(-np.log(np.maximum(confidence, 1e-30)).mean()),
          "forget_predictions": forget_logits.argmax(-1)}


def experiment_config(method: str | None = None, **fields):
  config = digits_config.get_config()
  if method is not None:
    config[method] = fields
  return config


def params_of(model):
  return [np.asarray(leaf) for leaf in jax.tree.leaves(jax.device_get(model.state.params))]


def test_the_four_methods_are_registered():
  assert set(METHODS) <= set(unlearning.UNLEARNING_METHODS)
  assert unlearning.get_method("salun") is salun_lib.salun


# --- finetune -----------------------------------------------------------------------------------
def test_finetune_on_the_retain_set_fades_the_forget_class_and_keeps_the_rest(
    digits, split, data, trained, original_scores):
  forget, retain = data
  before = params_of(trained)
  timings = {}
  unlearned = unlearning.get_method("finetune")(trained, forget, retain,
                                                experiment_config("finetune", epochs=3.0),
                                                jax.random.key(0), timings=timings)
  after = scores(unlearned, digits, split, forget)
  # Under-unlearning by design: no push away from the class, only catastrophic forgetting --
  # the forget samples lose confidence but are not erased.
  assert after["forget_confidence"] < original_scores["forget_confidence"] - 0.03, (
      original_scores["forget_confidence"], after["forget_confidence"])
  assert after["Dr"] > original_scores["Dr"] - 0.04
  assert timings["compile_s"] > 0 and timings["finetune_s"] > 0
  # The caller's model is untouched (the steps donate their own copies).
  for a, b in zip(before, params_of(trained)):
    np.testing.assert_array_equal(a, b)


# --- neggrad_plus ---------------------------------------------------------------------------------
def test_neggrad_plus_ascends_the_forget_loss_and_keeps_the_retain_classes(
    digits, split, data, trained, original_scores):
  forget, retain = data
  diagnostics = {}
  unlearned = neggrad_plus_lib.neggrad_plus(trained, forget, retain, experiment_config(),
                                            jax.random.key(0), diagnostics=diagnostics)
  after = scores(unlearned, digits, split, forget)
  assert after["forget_ce"] > original_scores["forget_ce"] + 1.0, (original_scores["forget_ce"],
                                                                   after["forget_ce"])
  assert after["forget_train_acc"] < 0.3 and after["Df"] < 0.3, after
  assert after["Dr"] > original_scores["Dr"] - 0.08, (original_scores["Dr"], after["Dr"])
  # BatchNorm statistics are frozen (inference mode) during NegGrad+.
  for a, b in zip(jax.tree.leaves(trained.state.batch_stats),
                  jax.tree.leaves(unlearned.state.batch_stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def neggrad_plus_batch(forget, retain):
  rows = np.arange(16)
  return {"forget_image": forget.images[rows], "forget_label": forget.labels[rows],
          "retain_image": retain.images[rows * 7], "retain_label": retain.labels[rows * 7]}


def run_neggrad_plus_steps(trained, forget, retain, mode, num_devices, num_steps=3,
                           forget_loss_cap=0.0, tx=optax.sgd(0.05, momentum=0.9)):
  dp = parallel.DataParallel(mode, tuple(jax.devices()[:num_devices]))
  state = base_lib.replicated_train_state(trained, tx, dp)
  step = dp.compile_step(neggrad_plus_lib.make_neggrad_plus_step(
      trained.model, tx, mean=trained.mean, std=trained.std, retain_weight=0.8,
      forget_loss_cap=forget_loss_cap))
  batch = neggrad_plus_batch(forget, retain)
  losses = []
  for i in range(num_steps):
    state, step_metrics = step(state, dp.put_batch(batch), jax.random.key(i))
    losses.append([float(step_metrics[k]) for k in ("loss", "forget_loss", "retain_loss")])
  return np.array(losses), jax.device_get(dp.get_replicated(state).params)


def test_neggrad_plus_step_on_mesh_and_pmap_equals_one_device(data, trained):
  forget, retain = data
  reference_losses, reference_params = run_neggrad_plus_steps(trained, forget, retain, "mesh", 1)
  # The forget loss rises step by step: the ascent works.
  assert reference_losses[-1, 1] > reference_losses[0, 1]
  for mode in ("mesh", "pmap"):
    losses, params = run_neggrad_plus_steps(trained, forget, retain, mode, 2)
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, atol=1e-6, err_msg=mode)
    for ref, got in zip(jax.tree.leaves(reference_params), jax.tree.leaves(params)):
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=mode)


def test_neggrad_plus_stops_ascending_forget_samples_past_the_cap(data, trained):
  """With every forget sample past a (tiny) cap, a step is plain descent on β·CE_r."""
  forget, retain = data
  _, params = run_neggrad_plus_steps(trained, forget, retain, "mesh", 1, num_steps=1,
                                     forget_loss_cap=1e-6, tx=optax.sgd(1.0))
  batch = neggrad_plus_batch(forget, retain)

  def retain_loss(params):
    images = train.prepare_images({"image": batch["retain_image"]}, None, trained.mean,
                                  trained.std)
    logits, _, _ = train.apply_model(trained.model, params, trained.state.batch_stats, images,
                                     train=False)
    return 0.8 * train.cross_entropy(logits, batch["retain_label"])

  expected = jax.jit(lambda p: jax.tree.map(lambda w, g: w - g, p, jax.grad(retain_loss)(p)))(
      trained.state.params)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=1e-6)


# --- random_label ------------------------------------------------------------------------------
def test_random_labels_are_uniform_over_the_other_classes_and_fixed_per_sample():
  labels = np.tile(np.arange(10, dtype=np.int32), 900)
  indices = np.arange(len(labels), dtype=np.int32) * 3 + 5
  key = jax.random.key(1)
  drawn = random_label_lib.random_other_labels(key, labels, indices, 10)
  assert drawn.dtype == np.int32 and drawn.shape == labels.shape
  assert not np.any(drawn == labels)
  # Uniform over the 9 others: each (label, other) pair ~ 1/9 of that label's 900 samples.
  for c in (0, 7):
    counts = np.bincount(drawn[labels == c], minlength=10)
    assert counts[c] == 0
    np.testing.assert_allclose(np.delete(counts, c) / 900, 1 / 9, atol=0.04)
  # A sample's new label depends on its index only, not on which other samples are forgotten.
  subset = np.arange(0, len(labels), 13)
  np.testing.assert_array_equal(
      random_label_lib.random_other_labels(key, labels[subset], indices[subset], 10),
      drawn[subset])


def test_random_label_sends_the_forget_samples_to_other_classes(
    digits, split, data, trained, original_scores):
  forget, retain = data
  timings = {}
  # Digits has 45 batches an epoch (Fashion-MNIST: 470): lr 1e-3 instead of 1e-4 to get the same
  # distance in a test-sized run.
  unlearned = unlearning.get_method("random_label")(
      trained, forget, retain, experiment_config("random_label", learning_rate=1e-3),
      jax.random.key(0), timings=timings)
  after = scores(unlearned, digits, split, forget)
  assert after["forget_train_acc"] < 0.2 and after["Df"] < 0.3, after
  # Spread over many wrong classes, as the uniform relabelling asks -- not collapsed onto one.
  assert len(np.unique(after["forget_predictions"])) >= 5
  assert after["Dr"] > original_scores["Dr"] - 0.04, (original_scores["Dr"], after["Dr"])
  for name in ("relabel_s", "compile_s", "finetune_s"):
    assert name in timings


# --- salun ---------------------------------------------------------------------------------------
def test_saliency_mask_keeps_exactly_the_largest_gradient_magnitudes():
  gradient = {"a": np.array([[0.1, -5.0], [0.0, 2.0]]), "b": np.array([-3.0, 0.2, 1.0, -0.05])}
  mask = salun_lib.saliency_mask(gradient, 0.5)
  # |g| ranked over both leaves together: 5, 3, 2, 1 are the top half (4 of 8).
  np.testing.assert_array_equal(mask["a"], [[0, 1], [0, 1]])
  np.testing.assert_array_equal(mask["b"], [1, 0, 1, 0])
  assert mask["a"].dtype == np.float32
  one = salun_lib.saliency_mask(gradient, 0.125)
  assert sum(m.sum() for m in jax.tree.leaves(one)) == 1 and one["a"][0, 1] == 1
  assert all(np.all(m == 1) for m in jax.tree.leaves(salun_lib.saliency_mask(gradient, 1.0)))


@pytest.mark.parametrize("mode,batch_size", [("mesh", 32), ("pmap", 48)])
def test_forget_gradient_is_the_mean_gradient_whatever_the_batching_and_devices(
    data, trained, mode, batch_size):
  """Against one jax.grad over all of D_f on one device: 2 devices, padded last batches."""
  forget, _ = data
  dp = parallel.DataParallel(mode, tuple(jax.devices()[:2]))
  gradient = salun_lib.forget_gradient(trained, forget, batch_size, dp, {})

  def mean_loss(params):
    images = train.prepare_images({"image": forget.images}, None, trained.mean, trained.std)
    logits, _, _ = train.apply_model(trained.model, params, trained.state.batch_stats, images,
                                     train=False)
    return train.cross_entropy(logits, forget.labels)

  expected = jax.jit(jax.grad(mean_loss))(trained.state.params)
  for got, want in zip(jax.tree.leaves(gradient), jax.tree.leaves(expected)):
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-7)


def test_salun_changes_only_the_salient_weights_and_forgets(
    digits, split, data, trained, original_scores):
  forget, retain = data
  diagnostics, timings = {}, {}
  unlearned = salun_lib.salun(trained, forget, retain,
                              experiment_config("salun", learning_rate=1e-3),
                              jax.random.key(0), timings=timings, diagnostics=diagnostics)
  mask = jax.tree.leaves(diagnostics["mask"])
  total = sum(m.size for m in mask)
  assert sum(m.sum() for m in mask) == round(0.5 * total)
  moved = 0
  for m, before, after in zip(mask, params_of(trained), params_of(unlearned)):
    # Outside the mask: bit-for-bit the original weights (weight decay included).
    np.testing.assert_array_equal(after[m == 0], before[m == 0])
    moved += int(np.sum(after[m == 1] != before[m == 1]))
  assert moved > 0.9 * round(0.5 * total)
  after = scores(unlearned, digits, split, forget)
  assert after["forget_train_acc"] < 0.2 and after["Df"] < 0.3, after
  assert after["Dr"] > original_scores["Dr"] - 0.06, (original_scores["Dr"], after["Dr"])
  assert timings["saliency_s"] >= 0 and timings["compile_s"] > 0


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("fields,pattern", [
    ({"lr": 0.1}, r"unknown field.*'lr'.*learning_rate"),
    ({"optimizer": "rmsprop"}, r"optimizer='rmsprop'.*\('sgd', 'adam'\)"),
    ({"schedule": "step"}, r"schedule='step'.*cosine"),
    ({"learning_rate": -1.0}, r"learning_rate=-1.0 must be a finite number > 0"),
    ({"epochs": 0.0}, r"epochs=0.0 must be a finite number > 0"),
    ({"batch_size": 33}, r"batch_size=33 must be a positive multiple of the device count \(2\)"),
])
def test_bad_settings_fail_before_any_compute(data, trained, no_compute, method, fields,
                                              pattern):
  forget, retain = data
  with pytest.raises(ValueError, match=pattern):
    unlearning.get_method(method)(trained, forget, retain, experiment_config(method, **fields),
                                  jax.random.key(0))


@pytest.mark.parametrize("method,fields,pattern", [
    ("salun", {"mask_fraction": 1.5}, r"mask_fraction=1.5 must be a fraction in \(0, 1\]"),
    ("salun", {"mask_fraction": 0.0}, r"mask_fraction=0.0"),
    ("neggrad_plus", {"retain_weight": 2.0}, r"retain_weight=2.0 must be in \[0, 1\]"),
    ("neggrad_plus", {"forget_loss_cap": -1.0},
     r"forget_loss_cap=-1.0 must be a finite number >= 0"),
])
def test_method_specific_bad_settings_fail_before_any_compute(data, trained, no_compute, method,
                                                              fields, pattern):
  forget, retain = data
  with pytest.raises(ValueError, match=pattern):
    unlearning.get_method(method)(trained, forget, retain, experiment_config(method, **fields),
                                  jax.random.key(0))


def test_a_recipe_batch_size_the_devices_cannot_split_is_named(data, trained, no_compute):
  forget, retain = data
  config = experiment_config()
  config.batch_size = 31
  with pytest.raises(ValueError, match=r"batch_size=0 -> config.batch_size=31 must be a positive "
                                       r"multiple of the device count"):
    unlearning.get_method("finetune")(trained, forget, retain, config, jax.random.key(0))


@pytest.mark.parametrize("method", ("neggrad_plus", "random_label", "salun"))
def test_forget_labels_outside_the_model_and_empty_forget_sets_are_refused(
    data, trained, no_compute, method):
  forget, retain = data
  wrong = unlearning.UnlearnData(forget.images, forget.labels + 20, forget.indices)
  with pytest.raises(ValueError, match=r"forget_data.labels span \[23, 23\].*\[0, 10\)"):
    unlearning.get_method(method)(trained, wrong, retain, experiment_config(), jax.random.key(0))
  empty = unlearning.UnlearnData(forget.images[:0], forget.labels[:0], forget.indices[:0])
  with pytest.raises(ValueError, match="forget_data is empty"):
    unlearning.get_method(method)(trained, empty, retain, experiment_config(), jax.random.key(0))

