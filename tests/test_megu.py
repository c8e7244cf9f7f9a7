"""MeGU end to end on digits, its pure steps on 1 vs 2 devices, the registry and bad input."""
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from megu_jax import datasets
from megu_jax import metrics
from megu_jax import noise as noise_lib
from megu_jax import parallel
from megu_jax import splits
from megu_jax import train
from megu_jax import transition
from megu_jax import unlearning
from megu_jax.configs import digits as digits_config
from megu_jax.unlearning import base as base_lib
from megu_jax.unlearning import megu as megu_lib

FORGET = "3"


@pytest.fixture(scope="module")
def digits():
  return datasets.load_dataset("digits")


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("digits_original"))
  config = digits_config.get_config()
  config.epochs = 3  # enough to know the class to forget (asserted in the end-to-end test)
  train.train_and_evaluate(config, workdir, dataset=digits)
  return train.restore_trained(workdir)


@pytest.fixture(scope="module")
def split(digits):
  return splits.make_split(digits, "full_class", forget=(FORGET,))


def unlearn_data(digits, split):
  forget = unlearning.UnlearnData.from_positions(digits.train_images, digits.train_labels,
                                                 split.forget_train)
  retain = unlearning.UnlearnData.from_positions(digits.train_images, digits.train_labels,
                                                 split.retain_train)
  return forget, retain


def experiment_config(**megu_fields):
  config = digits_config.get_config()
  config.megu = megu_lib.default_megu_config()
  # Digits batches are small (1437 training images): scale the recipe down, keep its shape.
  config.megu.update(forget_batch_size=32, retain_batch_size=32, noise_steps=30, steps=60,
                     learning_rate=0.02, prototype_samples_per_class=50)
  config.megu.update(megu_fields)
  return config


def test_a_short_megu_run_forgets_the_class_and_keeps_the_rest(digits, trained, split):
  forget, retain = unlearn_data(digits, split)
  timings, diagnostics = {}, {}
  unlearned = unlearning.get_method("megu")(trained, forget, retain, experiment_config(),
                                            jax.random.key(0), timings=timings,
                                            diagnostics=diagnostics)

  def test_accuracies(model):
    logits = train.predict(model, digits.test_images)["logits"]
    return (metrics.accuracy(logits[split.forget_test], digits.test_labels[split.forget_test]),
            metrics.accuracy(logits[split.retain_test], digits.test_labels[split.retain_test]))

  forget_before, retain_before = test_accuracies(trained)
  forget_after, retain_after = test_accuracies(unlearned)
  assert forget_before > 0.85, "the original model should know the class it is asked to forget"
  assert forget_after < 0.15, (forget_before, forget_after)
  assert retain_after > retain_before - 0.04, (retain_before, retain_after)

  # The perturbing labels follow T and never name the forgotten class itself.
  T = diagnostics["transition"]
  transition.validate_transition(T, digits.num_classes)
  assert not np.any(diagnostics["perturbing_labels"] == int(FORGET))
  for name in ("transition_s", "noise_s", "finetune_s", "compile_s"):
    assert timings[name] > 0, name
  # The positive noise moved the forget features to the perturbing classes: the CE of ỹ, huge on
  # a clean, memorised 3, is below chance level's log(10) with the pair.
  assert diagnostics["noise_metrics"]["positive_ce"] < np.log(10)
  # Only θ changed: BatchNorm statistics are frozen during unlearning.
  for a, b in zip(jax.tree.leaves(trained.state.batch_stats),
                  jax.tree.leaves(unlearned.state.batch_stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def run_unlearning_steps(trained, forget, mode, num_devices, settings, num_steps=3):
  """A noise step then finetuning steps that update the noise, the KL and the alignment terms."""
  dp = parallel.DataParallel(mode, tuple(jax.devices()[:num_devices]))
  model = trained.model
  tx = base_lib.make_finetuning_optimizer(settings, num_steps)
  negative_tx, positive_tx = megu_lib.noise_optimizers(settings)
  noise_state = noise_lib.init_noise((32,), len(forget), digits_num_classes(trained), negative_tx,
                                     positive_tx)
  host = lambda tree: jax.tree.map(np.array, jax.device_get(tree))  # distinct, donatable buffers
  state = dp.put_replicated(megu_lib.MeguState(
      step=jnp.zeros((), jnp.int32), params=host(trained.state.params),
      opt_state=tx.init(host(trained.state.params)), noise=noise_state,
      original_params=host(trained.state.params), batch_stats=host(trained.state.batch_stats)))
  common = dict(mean=trained.mean, std=trained.std, per_sample=True)
  noise_step = dp.compile_step(megu_lib.make_noise_step(model, settings, **common))
  finetune_step = dp.compile_step(megu_lib.make_finetune_step(model, tx, settings,
                                                              update_noise=True, **common))
  rows = np.arange(16)
  batch = {"forget_image": forget.images[rows], "forget_label": forget.labels[rows],
           "forget_perturbing": (forget.labels[rows] + 1 + rows % 3).astype(np.int32) % 10,
           "forget_row": rows.astype(np.int32),
           "retain_image": forget.images[rows + 16], "retain_label": forget.labels[rows]}
  key = jax.random.key(0)
  state, _ = noise_step(state, dp.put_batch(batch), key)
  losses = []
  for step in range(num_steps):
    state, step_metrics = finetune_step(state, dp.put_batch(batch), jax.random.fold_in(key, step))
    losses.append(float(step_metrics["loss"]))
  return np.array(losses), jax.device_get(dp.get_replicated(state))


def digits_num_classes(trained):
  return int(trained.model.num_classes)


def test_unlearning_steps_on_mesh_and_pmap_equal_one_device(digits, trained, split):
  forget, _ = unlearn_data(digits, split)
  settings = megu_lib.default_megu_config()
  settings.update(kl_weight=0.5, align_weight=0.1, learning_rate=0.05)
  reference_losses, reference_state = run_unlearning_steps(trained, forget, "mesh", 1, settings)
  assert np.all(np.isfinite(reference_losses))
  assert float(np.abs(reference_state.noise.negative).max()) > 0  # the noise moved
  for mode in ("mesh", "pmap"):
    losses, state = run_unlearning_steps(trained, forget, mode, 2, settings)
    # Same float32 program up to the order of cross-device reductions.
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-5, atol=1e-6, err_msg=mode)
    for ref, got in zip(jax.tree.leaves(reference_state), jax.tree.leaves(state)):
      np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5, err_msg=mode)


def test_frozen_stages_keep_the_original_weights_and_the_rest_unlearns(digits, trained, split):
  forget, retain = unlearn_data(digits, split)
  timings = {}
  unlearned = megu_lib.megu(trained, forget, retain,
                            experiment_config(freeze_through="block2", max_grad_norm=0.0),
                            jax.random.key(0), timings=timings)
  before, after = trained.state.params, unlearned.state.params
  for frozen in ("conv1", "bn1", "conv2", "bn2"):
    for a, b in zip(jax.tree.leaves(before[frozen]), jax.tree.leaves(after[frozen])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=frozen)
  for trained_layer in ("conv3", "feature_layer", "classifier"):
    assert not np.allclose(before[trained_layer]["kernel"], after[trained_layer]["kernel"]), (
        trained_layer)
  logits = train.predict(unlearned, digits.test_images)["logits"]
  assert metrics.accuracy(logits[split.forget_test], digits.test_labels[split.forget_test]) < 0.15
  assert metrics.accuracy(logits[split.retain_test], digits.test_labels[split.retain_test]) > 0.85


def test_a_precomputed_frozen_prefix_gives_the_step_computed_one(digits, trained, split):
  forget, _ = unlearn_data(digits, split)
  settings = megu_lib.default_megu_config()
  settings.update(freeze_through="block2", max_grad_norm=0.0)
  model, tx = trained.model, base_lib.make_finetuning_optimizer(settings, 1)
  dp = parallel.DataParallel("mesh", tuple(jax.devices()[:1]))
  step = dp.compile_step(megu_lib.make_finetune_step(
      model, tx, settings, mean=trained.mean, std=trained.std, per_sample=False,
      update_noise=False))
  negative_tx, positive_tx = megu_lib.noise_optimizers(settings)
  rows = np.arange(16)
  batch = {"forget_image": forget.images[rows], "forget_label": forget.labels[rows],
           "forget_perturbing": (forget.labels[rows] + 1).astype(np.int32) % 10,
           "forget_row": rows.astype(np.int32),
           "retain_image": forget.images[rows + 16], "retain_label": forget.labels[rows]}
  prefix = train.predict(trained, forget.images[rows], activations=("block2",))["block2"]

  def one_step(batch):
    params = jax.tree.map(np.array, jax.device_get(trained.state.params))
    state = dp.put_replicated(megu_lib.MeguState(
        step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
        noise=noise_lib.init_noise((32,), 10, 10, negative_tx, positive_tx),
        original_params=jax.tree.map(np.array, params),
        batch_stats=jax.tree.map(np.array, jax.device_get(trained.state.batch_stats))))
    state, step_metrics = step(state, dp.put_batch(batch), jax.random.key(0))
    return float(step_metrics["loss"]), jax.device_get(dp.get_replicated(state).params)

  loss, params = one_step(batch)
  retain_prefix = train.predict(trained, forget.images[rows + 16],
                                activations=("block2",))["block2"]
  retain_batch = {k: v for k, v in batch.items() if k != "retain_image"}
  for precomputed in ({**batch, "forget_prefix": prefix},
                      {**retain_batch, "forget_prefix": prefix, "retain_prefix": retain_prefix}):
    precomputed_loss, precomputed_params = one_step(precomputed)
    np.testing.assert_allclose(precomputed_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(precomputed_params)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  # A distribution target (forget_target="distribution") that is one-hot on ỹ is the label.
  one_hot = np.eye(10, dtype=np.float32)[batch["forget_perturbing"]]
  np.testing.assert_allclose(one_step({**batch, "forget_target": one_hot})[0], loss, rtol=1e-5)
  spread = np.full((16, 10), 0.1, np.float32)
  assert abs(one_step({**batch, "forget_target": spread})[0] - loss) > 0.1


def test_the_guided_distribution_is_the_row_the_labels_are_drawn_from():
  T = transition.scores_to_transition(np.random.default_rng(2).uniform(0, 10, (5, 5)))
  labels = np.array([0, 1, 2, 3, 4] * 4, np.int32)
  logits = np.random.default_rng(3).normal(0, 3, (20, 5)).astype(np.float32)
  rows = megu_lib.guided_distribution(T, labels, logits, guidance_temperature=0.5)
  np.testing.assert_allclose(rows.sum(-1), 1.0, rtol=1e-5)
  assert np.all(rows[np.arange(20), labels] == 0)  # full-class: never the own class
  expected = T[labels] * np.exp(jax.nn.log_softmax(logits / 0.5))
  np.testing.assert_allclose(rows, expected / expected.sum(-1, keepdims=True), rtol=1e-4)
  np.testing.assert_array_equal(
      megu_lib.draw_perturbing_labels(jax.random.key(0), T, labels, np.arange(20),
                                      mode="argmax", original_logits=logits,
                                      guidance_temperature=0.5), rows.argmax(-1))


def test_perturbing_labels_are_fixed_per_sample_and_never_the_own_class():
  T = transition.scores_to_transition(np.random.default_rng(0).uniform(0, 10, (5, 5)))
  labels = np.array([0, 1, 2, 3, 4] * 20, np.int32)
  indices = np.arange(100, 200, dtype=np.int32)
  key = jax.random.key(3)
  drawn = megu_lib.draw_perturbing_labels(key, T, labels, indices)
  assert drawn.shape == (100,) and drawn.dtype == np.int32
  assert not np.any(drawn == labels)
  # A sample's label depends on its index only, not on which other samples are forgotten.
  subset = np.arange(0, 100, 7)
  np.testing.assert_array_equal(
      megu_lib.draw_perturbing_labels(key, T, labels[subset], indices[subset]), drawn[subset])
  np.testing.assert_array_equal(megu_lib.draw_perturbing_labels(key, T, labels, indices,
                                                                mode="argmax"),
                                np.argmax(T[labels], -1))
  # Model guidance: a model certain that every sample looks like class (y + 2) % 5 moves ỹ there.
  logits = 20.0 * np.eye(5)[(labels + 2) % 5]
  guided = megu_lib.draw_perturbing_labels(key, T, labels, indices, original_logits=logits)
  assert np.mean(guided == (labels + 2) % 5) > 0.95


def test_label_draw_counts_its_compilation_once_per_shape():
  T = transition.scores_to_transition(np.random.default_rng(1).uniform(0, 10, (4, 4)))
  labels = np.array([0, 1, 2, 3] * 9 + [0], np.int32)  # 37 samples: a shape no other test uses
  indices = np.arange(37, dtype=np.int32)
  first, again = {}, {}
  drawn = megu_lib.draw_perturbing_labels(jax.random.key(0), T, labels, indices, timings=first)
  redrawn = megu_lib.draw_perturbing_labels(jax.random.key(0), T, labels, indices, timings=again)
  assert first["compile_s"] > 0 and "compile_s" not in again
  np.testing.assert_array_equal(drawn, redrawn)
  with pytest.raises(ValueError, match="'best'"):
    megu_lib.draw_perturbing_labels(jax.random.key(0), T, labels, indices, mode="best")


def test_receiving_classes_are_drawn_by_the_share_of_labels_they_receive():
  retain_labels = np.array([0, 0, 1, 2, 2, 2])
  positions, p = megu_lib.receiving_retain_rows(retain_labels, np.array([0, 0, 0, 2, 3]), 4)
  # Class 3 receives a label but has no retained image: its share goes to the others.
  np.testing.assert_array_equal(positions, [0, 1, 3, 4, 5])
  np.testing.assert_allclose(p, [3 / 8, 3 / 8, 1 / 12, 1 / 12, 1 / 12])
  with pytest.raises(ValueError, match="receiving_retain_fraction"):
    megu_lib.receiving_retain_rows(retain_labels, np.array([3, 3]), 4)


def test_receiving_retain_rows_fill_their_share_of_every_batch_and_zero_changes_nothing():
  from megu_jax.unlearning.megu import method  # pylint: disable=import-outside-toplevel
  # A new entry needs its own check that its value changes nothing (own_class_after_guidance:
  # test_megu_labels.py, False takes the unchanged branch of guided_log_rows; retain_margin_weight:
  # test_the_retain_margin_term_keeps_the_retained_margins_closer_to_the_original, 0 adds no term;
  # retain_margin_source: "original" is ν's θ₀ target, the only one before the field existed;
  # stand_in_unseen_match: "none" scores no unseen image and matches nothing, as before).
  assert megu_lib.NO_OP_VALUES == {"receiving_retain_fraction": 0.0,
                                   "own_class_after_guidance": False,
                                   "retain_margin_weight": 0.0,
                                   "retain_margin_source": "original",
                                   "stand_in_unseen_match": "none"}
  assert megu_lib.default_megu_config().receiving_retain_fraction == 0.0
  labels = np.repeat(np.arange(5), 40)
  # Each "image" is its own row number, so a batch shows which rows it drew.
  data = types.SimpleNamespace(images=np.arange(200)[:, None], labels=labels)
  retain_rows = np.arange(0, 200, 2)
  # The no-op value draws exactly the uniform stream, row for row, as before the field existed.
  uniform = np.concatenate([b["retain_label"] * 1000 + b["retain_image"][:, 0] for b in
                            method._retain_batches(np.random.default_rng(7), retain_rows, data,
                                                   8, 30)])
  expected = retain_rows[base_lib.row_stream(np.random.default_rng(7), len(retain_rows), 240)]
  np.testing.assert_array_equal(uniform, labels[expected] * 1000 + expected)
  receiving = megu_lib.receiving_retain_rows(labels[retain_rows], np.array([3, 3, 4]), 5)
  batches = list(method._retain_batches(np.random.default_rng(7), retain_rows, data, 8, 300,
                                        receiving, 4))
  focused = np.stack([b["retain_label"][:4] for b in batches])
  assert set(np.unique(focused)) == {3, 4}
  assert 0.6 < np.mean(focused == 3) < 0.73  # two of the three labels go to class 3
  rest = np.concatenate([b["retain_label"][4:] for b in batches])
  assert set(np.unique(rest)) == set(range(5))
  assert all(set(b["retain_image"][:, 0]) <= set(retain_rows) for b in batches)


def test_receiving_retain_fraction_reaches_the_finetuning(digits, trained, split):
  forget, retain = unlearn_data(digits, split)
  params = [megu_lib.megu(trained, forget, retain, experiment_config(
      receiving_retain_fraction=fraction, steps=5, noise_steps=2), jax.random.key(0)).state.params
            for fraction in (0.0, 0.5)]
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params[0]),
                                                       jax.tree.leaves(params[1])))


def test_original_is_the_identity_and_retrain_starts_from_scratch(digits, trained, split):
  forget, retain = unlearn_data(digits, split)
  config = digits_config.get_config("quick")
  assert unlearning.get_method("original")(trained, forget, retain, config,
                                           jax.random.key(0)) is trained
  timings = {}
  retrained = unlearning.get_method("retrain")(trained, forget, retain, config,
                                               jax.random.key(0), timings=timings)
  logits = train.predict(retrained, digits.test_images)["logits"]
  assert metrics.accuracy(logits[split.retain_test], digits.test_labels[split.retain_test]) > 0.7
  # Never shown a 3, the retrained model does not recognise 3s.
  assert metrics.accuracy(logits[split.forget_test], digits.test_labels[split.forget_test]) < 0.2
  assert timings["train_s"] > 0


def test_unknown_method_name_lists_the_registered_ones():
  assert {"megu", "original", "retrain"} <= set(unlearning.UNLEARNING_METHODS)
  with pytest.raises(ValueError, match=r"'mgeu'.*'megu'.*'original'.*'retrain'"):
    unlearning.get_method("mgeu")


def test_a_transition_matrix_of_the_wrong_size_fails_before_any_compute(
    tmp_path, digits, trained, split, no_compute):
  forget, retain = unlearn_data(digits, split)
  path = str(tmp_path / "t3.npy")
  np.save(path, transition.scores_to_transition(np.ones((3, 3))))
  with pytest.raises(transition.InvalidTransitionError, match="3 x 3.*10 classes"):
    megu_lib.megu(trained, forget, retain, experiment_config(transition=path), jax.random.key(0))
  bad = transition.scores_to_transition(np.ones((10, 10)))
  bad[0, 0] = 0.5
  np.save(path, bad)
  with pytest.raises(transition.InvalidTransitionError, match="diagonal"):
    megu_lib.megu(trained, forget, retain, experiment_config(transition=path), jax.random.key(0))


@pytest.mark.parametrize("fields,pattern", [
    ({"transition": "gemini"}, "transition='gemini'.*prototype"),
    ({"transition": "/no/such/T.npy"}, "T.npy.*no transition matrix"),
    ({"activation": "block9"}, "activation='block9'.*features"),
    ({"noise": "more"}, "noise='more'"),
    ({"noise_schedule": "after"}, "noise_schedule='after'.*alternating"),
    ({"label_mode": "top"}, "label_mode='top'.*argmax"),
    ({"forget_batch_size": 33}, "forget_batch_size=33.*multiple of the device count"),
    ({"learning_rate": -1.0}, "learning_rate=-1.0"),
    ({"top_k": 12}, "top_k=12"),
    ({"freeze_through": "block9"}, "freeze_through='block9'.*block3"),
    ({"freeze_through": "features"}, "freeze_through='features' must come before"),
    ({"freeze_through": "block2", "weight_decay": 1e-4}, "weight_decay=0.0001.*frozen"),
    ({"forget_target": "soft"}, "forget_target='soft'.*distribution"),
    ({"receiving_retain_fraction": 1.5}, "receiving_retain_fraction=1.5 must be in"),
])
def test_bad_settings_fail_before_any_compute(digits, trained, split, no_compute, fields,
                                              pattern):
  forget, retain = unlearn_data(digits, split)
  with pytest.raises(ValueError, match=pattern):
    megu_lib.megu(trained, forget, retain, experiment_config(**fields), jax.random.key(0))


def test_unknown_setting_and_out_of_range_labels_fail_before_any_compute(
    digits, trained, split, no_compute):
  forget, retain = unlearn_data(digits, split)
  config = experiment_config()
  config.megu.lamda = 0.1
  with pytest.raises(ValueError, match="unknown field.*lamda.*negative_weight"):
    megu_lib.megu(trained, forget, retain, config, jax.random.key(0))
  wrong = unlearning.UnlearnData(forget.images, forget.labels + 20, forget.indices)
  with pytest.raises(ValueError, match=r"forget_data.labels span \[23, 23\].*\[0, 10\)"):
    megu_lib.megu(trained, wrong, retain, experiment_config(), jax.random.key(0))


# --- the Retrain-free stopping rule -------------------------------------------------------------
def test_calibration_without_unseen_images_fails_naming_the_field(digits, trained, split,
                                                                   no_compute):
  forget, retain = unlearn_data(digits, split)
  with pytest.raises(unlearning.UnlearningInputError,
                     match="config.megu.calibration='non_member_margin' needs non_members"):
    megu_lib.megu(trained, forget, retain, experiment_config(calibration="non_member_margin"),
                  jax.random.key(0))


def test_calibration_finetunes_until_the_forgotten_images_look_unseen(digits, trained, split):
  forget, retain = unlearn_data(digits, split)
  # Unseen images of the forgotten class: here its test images stand in for a pool no model saw.
  unseen_rows = np.flatnonzero(digits.test_labels == split.forget_classes[0])
  unseen = unlearning.UnlearnData(images=digits.test_images[unseen_rows],
                                  labels=digits.test_labels[unseen_rows],
                                  indices=len(digits.train_labels) + unseen_rows)
  margins_of = metrics_margins
  timings = {}
  calibrated = megu_lib.megu(
      trained, forget, retain,
      experiment_config(calibration="non_member_margin", steps=10, calibration_every=5,
                        calibration_max_steps=120), jax.random.key(0), timings=timings,
      non_members=unseen)
  steps = timings["calibration_steps"]
  assert 10 <= steps <= 120 and steps % 5 == 0
  gap = margins_of(calibrated, forget).mean() - margins_of(calibrated, unseen).mean()
  assert gap == pytest.approx(timings["calibration_gap"], abs=1e-3)
  # It stopped at the first check where the forgotten images were no more recognised than the
  # unseen ones, or ran out of steps.
  assert timings["calibration_gap"] <= 0 or steps == 120
  # Ten steps alone leave the forgotten training images far more recognised than unseen ones.
  short = megu_lib.megu(trained, forget, retain, experiment_config(steps=10), jax.random.key(0))
  short_gap = margins_of(short, forget).mean() - margins_of(short, unseen).mean()
  assert short_gap > gap


# --- non-member margin targets ---------------------------------------------------------------
def random_forgetting(digits, count=64):
  """Random forgetting of ``count`` training images; the test images stand in for unseen ones."""
  rows = np.sort(np.random.default_rng(0).choice(len(digits.train_labels), count, replace=False))
  kept = np.setdiff1d(np.arange(len(digits.train_labels)), rows)
  forget = unlearning.UnlearnData.from_positions(digits.train_images, digits.train_labels, rows)
  retain = unlearning.UnlearnData.from_positions(digits.train_images, digits.train_labels, kept)
  unseen = unlearning.UnlearnData(digits.test_images, digits.test_labels,
                                  len(digits.train_labels) + np.arange(len(digits.test_labels)))
  config = experiment_config(forget_target="non_member_margin")
  config.scenario = "random"
  config.megu.random_scenario = ml_collections.ConfigDict(
      {"forget_weight": 1.0, "learning_rate": 0.02, "noise": "none"})
  return forget, retain, unseen, config


def test_margin_targets_bring_each_forgotten_margin_to_its_target(digits, trained):
  forget, retain, unseen, config = random_forgetting(digits)
  guidance = megu_lib.machine_guidance(trained, forget, retain, config, jax.random.key(0),
                                       non_members=unseen)
  target = guidance.forget_target_margins
  unlearned = megu_lib.megu(trained, forget, retain, config, jax.random.key(0),
                            non_members=unseen)
  before = np.abs(metrics_margins(trained, forget) - target).mean()
  after = np.abs(metrics_margins(unlearned, forget) - target).mean()
  assert after < before / 3, (before, after)
  logits = train.predict(unlearned, retain.images)["logits"]
  assert metrics.accuracy(logits, retain.labels) > 0.95


def test_the_retain_margin_term_keeps_the_retained_margins_closer_to_the_original(digits, trained):
  forget, retain, unseen, config = random_forgetting(digits)
  config.megu.random_scenario.learning_rate = 0.1  # far enough to move the retained margins
  drift, terms = {}, {}
  for weight in (0.0, 1.0):
    config.megu.retain_margin_weight = weight
    diagnostics = {}
    unlearned = megu_lib.megu(trained, forget, retain, config, jax.random.key(0),
                              non_members=unseen, diagnostics=diagnostics)
    drift[weight] = np.abs(metrics_margins(unlearned, retain)
                           - metrics_margins(trained, retain)).mean()
    terms[weight] = set(diagnostics["finetune_metrics"])
  assert drift[1.0] < 0.7 * drift[0.0], drift
  # At 0 the loss has no such term (it is the loss from before the field existed).
  assert "retain_margin" in terms[1.0] and "retain_margin" not in terms[0.0]


@pytest.mark.parametrize("scenario", ["full_class", "sub_class"])
def test_margin_targets_need_non_members_and_random_forgetting(digits, trained, no_compute,
                                                               scenario):
  forget, retain, unseen, config = random_forgetting(digits)
  with pytest.raises(unlearning.UnlearningInputError,
                     match="forget_target='non_member_margin' needs non_members"):
    megu_lib.megu(trained, forget, retain, config, jax.random.key(0))
  config.scenario = scenario
  with pytest.raises(unlearning.UnlearningInputError,
                     match=f"'non_member_margin' is for random forgetting, not {scenario}"):
    megu_lib.megu(trained, forget, retain, config, jax.random.key(0), non_members=unseen)


def test_retained_head_calibration_needs_a_frozen_prefix(digits, trained, split, no_compute):
  forget, retain = unlearn_data(digits, split)
  with pytest.raises(unlearning.UnlearningInputError,
                     match="calibration='retained_head' needs config.megu.freeze_through"):
    megu_lib.megu(trained, forget, retain, experiment_config(calibration="retained_head"),
                  jax.random.key(0))


def test_the_retained_head_stand_in_never_saw_the_forgotten_images(digits, trained, split):
  from megu_jax.unlearning.megu import calibration  # pylint: disable=import-outside-toplevel
  forget, retain = unlearn_data(digits, split)
  settings = megu_lib.megu_settings(experiment_config(freeze_through="block3"))
  prefix = lambda data: train.predict(trained, data.images, activations=("block3",))["block3"]
  forget_prefix, retain_prefix = prefix(forget), prefix(retain)
  stand_in = lambda inputs, labels: calibration.retained_head_margins(
      trained, settings, inputs, labels, forget_prefix, forget.labels, forget.images,
      [jax.random.key(1)])[0]
  without = stand_in(retain_prefix, retain.labels)
  with_forget = stand_in(np.concatenate([retain_prefix, forget_prefix]),
                         np.concatenate([retain.labels, forget.labels]))
  # A head that never trained on the class calls none of its images by it; the same head
  # trained with them back in recognises them, as the original does.
  assert np.all(without < 0)
  assert np.mean(with_forget > 0) > 0.9
  assert np.mean(metrics_margins(trained, forget) > 0) > 0.9


def test_retained_head_calibration_stops_at_the_stand_ins_margin(digits, trained, split):
  forget, retain = unlearn_data(digits, split)
  timings = {}
  # A step size at which digits reach the target well within the step budget.
  unlearned = megu_lib.megu(
      trained, forget, retain,
      experiment_config(calibration="retained_head", freeze_through="block3", learning_rate=0.3,
                        calibration_every=5, calibration_max_steps=200),
      jax.random.key(0), timings=timings)
  steps, target = timings["calibration_steps"], timings["calibration_target"]
  assert target < 0  # the stand-in does not recognise the forgotten class
  assert 5 <= steps < 200 and steps % 5 == 0
  gap = metrics_margins(unlearned, forget).mean() - target
  assert gap == pytest.approx(timings["calibration_gap"], abs=1e-3)
  assert gap <= 0
  assert timings["calibration_s"] > 0 and timings["compile_s"] > 0


def test_retained_head_calibration_averages_its_heads(digits, trained, split, monkeypatch):
  from megu_jax.unlearning.megu import calibration  # pylint: disable=import-outside-toplevel
  forget, retain = unlearn_data(digits, split)
  keys = []  # per run, the key of each head

  def fake_head(*args):  # within a run, the first head's margins are -1, the second's -3
    keys[-1].extend(np.asarray(jax.random.key_data(key)) for key in args[7])
    return np.stack([np.full(len(forget.labels), -1.0 - 2.0 * head)
                     for head in range(len(args[7]))])

  monkeypatch.setattr(calibration, "retained_head_margins", fake_head)
  targets = []
  for heads in (1, 2):
    timings = {}
    keys.append([])
    megu_lib.megu(trained, forget, retain,
                  experiment_config(calibration="retained_head", freeze_through="block3",
                                    calibration_every=5, calibration_max_steps=5,
                                    calibration_heads=heads),
                  jax.random.key(0), timings=timings)
    targets.append(timings["calibration_target"])
  assert targets == [-1.0, -2.0]  # one head's margin, then the mean of two heads'
  assert np.array_equal(keys[0][0], keys[1][0])  # the first head is the one-head rule's
  assert not np.array_equal(keys[1][0], keys[1][1])


def test_calibration_heads_must_be_positive(digits, trained, split, no_compute):
  forget, retain = unlearn_data(digits, split)
  with pytest.raises(unlearning.UnlearningInputError, match="calibration_heads=0 must be >= 1"):
    megu_lib.megu(trained, forget, retain,
                  experiment_config(calibration="retained_head", freeze_through="block3",
                                    calibration_heads=0), jax.random.key(0))


def metrics_margins(model, data):
  from megu_jax import ensemble_metrics  # pylint: disable=import-outside-toplevel
  return ensemble_metrics.margins(train.predict(model, data.images)["logits"], data.labels)


# --- the stand-in's margin targets (forget_target="retained_head_margin") ----------------------
def test_stand_in_targets_bring_forgotten_and_retained_margins_to_the_stand_ins(digits, trained,
                                                                               split):
  forget, retain = unlearn_data(digits, split)
  config = experiment_config(forget_target="retained_head_margin", freeze_through="block3",
                             retain_margin_weight=1.0, retain_margin_source="retained_head")
  guidance = megu_lib.machine_guidance(trained, forget, retain, config, jax.random.key(0))
  forget_target, retain_target = guidance.forget_target_margins, guidance.retain_target_margins
  assert forget_target.shape == (len(forget),) and retain_target.shape == (len(retain),)
  # The stand-in never saw the class: it calls none of its images by it. Without the forgotten
  # class as a competitor it is surer of the retained images than the original.
  assert np.all(forget_target < 0)
  assert retain_target.mean() > metrics_margins(trained, retain).mean() + 0.5
  timings = {}
  unlearned = megu_lib.megu(trained, forget, retain, config, jax.random.key(0), timings=timings)
  # The heads' time is recorded apart, as a part of the guidance's.
  assert 0 < timings["stand_in_s"] <= timings["transition_s"]
  distance = lambda model, data, target: np.abs(metrics_margins(model, data) - target).mean()
  before, after = (distance(model, forget, forget_target) for model in (trained, unlearned))
  assert after < before / 4, (before, after)
  # The retained images move by less than a unit each: their mean reaches the stand-in's and
  # each image comes closer to its own target.
  before, after = (distance(model, retain, retain_target) for model in (trained, unlearned))
  assert after < 0.85 * before, (before, after)
  assert abs(metrics_margins(unlearned, retain).mean() - retain_target.mean()) < 0.2
  # Without ν's stand-in source, the guidance trains no retained targets.
  config.megu.retain_margin_source = "original"
  assert megu_lib.machine_guidance(trained, forget, retain, config,
                                   jax.random.key(0)).retain_target_margins is None


def test_stand_in_targets_keep_the_label_draw_and_average_their_heads(digits, trained, split):
  forget, retain = unlearn_data(digits, split)
  plain = megu_lib.machine_guidance(trained, forget, retain, experiment_config(
      freeze_through="block3"), jax.random.key(0))
  one, two = (megu_lib.machine_guidance(trained, forget, retain, experiment_config(
      forget_target="retained_head_margin", freeze_through="block3", calibration_heads=heads,
      calibration_epochs=2), jax.random.key(0)) for heads in (1, 2))
  # The heads' key is folded apart from the labels': the perturbing labels are unchanged.
  np.testing.assert_array_equal(plain.perturbing_labels, one.perturbing_labels)
  assert plain.forget_target_margins is None
  # The second head differs from the first; two heads give the mean of both.
  assert not np.allclose(one.forget_target_margins, two.forget_target_margins)
  assert np.std(two.forget_target_margins) > 0


def test_stand_in_targets_matched_to_unseen_images_take_their_mean_or_distribution(
    digits, trained, split):
  forget, retain = unlearn_data(digits, split)
  unseen_rows = np.flatnonzero(digits.test_labels == split.forget_classes[0])
  unseen = unlearning.UnlearnData(images=digits.test_images[unseen_rows],
                                  labels=digits.test_labels[unseen_rows],
                                  indices=len(digits.train_labels) + unseen_rows)
  settings = dict(forget_target="retained_head_margin", freeze_through="block3",
                  calibration_epochs=2)
  guide = lambda match: megu_lib.machine_guidance(
      trained, forget, retain, experiment_config(**settings, stand_in_unseen_match=match),
      jax.random.key(0), non_members=unseen).forget_target_margins
  plain, shifted, matched = guide("none"), guide("shift"), guide("quantile")
  # The same heads score the unseen images: the shift moves every target by one amount, which
  # brings their mean to the heads' mean on the unseen images, whose quantiles the matched
  # targets are, in the plain targets' order.
  offset = shifted - plain
  np.testing.assert_allclose(offset, offset[0], atol=1e-4)
  assert abs(offset[0]) > 1e-3
  np.testing.assert_allclose(np.sort(matched), matched[np.argsort(plain, kind="stable")],
                             atol=1e-6)
  np.testing.assert_allclose(matched.mean(), shifted.mean(), atol=0.5)
  with pytest.raises(unlearning.UnlearningInputError,
                     match="stand_in_unseen_match='shift' needs non_members"):
    megu_lib.megu(trained, forget, retain, experiment_config(
        **settings, stand_in_unseen_match="shift"), jax.random.key(0))


@pytest.mark.parametrize("fields, message", [
    ({"forget_target": "retained_head_margin"},
     "forget_target='retained_head_margin' needs config.megu.freeze_through"),
    ({"retain_margin_source": "retained_head", "retain_margin_weight": 1.0},
     "retain_margin_source='retained_head' reads the stand-in heads"),
    ({"retain_margin_source": "head"}, "retain_margin_source='head'"),
    ({"stand_in_unseen_match": "shift"},
     "stand_in_unseen_match='shift' matches the stand-in's margins"),
    ({"forget_target": "retained_head_margin", "freeze_through": "block3",
      "stand_in_unseen_match": "median"}, "stand_in_unseen_match='median'"),
    ({"forget_target": "retained_head_margin", "freeze_through": "block3",
      "calibration_heads": 0}, "calibration_heads=0 must be >= 1"),
])
def test_stand_in_target_settings_are_checked_before_any_compute(digits, trained, split,
                                                                 no_compute, fields, message):
  forget, retain = unlearn_data(digits, split)
  with pytest.raises(unlearning.UnlearningInputError, match=message):
    megu_lib.megu(trained, forget, retain, experiment_config(**fields), jax.random.key(0))
