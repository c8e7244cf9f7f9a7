"""Bad Teacher, UNSIR, SSD and SCRUB on digits: each moves the model the way its paper promises.

The recipes of docs/method.md are sized for CIFAR; digits has 1437 training images, so the runs that
check an *effect* raise the learning rates (named in each test) to see it within a few dozen
steps. What each test asserts is the direction of the method, not the benchmark's numbers.
"""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from megu_jax import metrics
from megu_jax import parallel
from megu_jax import train
from megu_jax import unlearning
from megu_jax.configs import digits as digits_config
# Importing the modules registers their methods (until the package imports them itself).
from megu_jax.unlearning import bad_teacher as bad_teacher_lib
from megu_jax.unlearning import scrub as scrub_lib
from megu_jax.unlearning import ssd as ssd_lib
from megu_jax.unlearning import unsir as unsir_lib

FORGET = "3"  # the class conftest's ``split`` forgets
METHODS = ("bad_teacher", "unsir", "ssd", "scrub")


def experiment_config(method: str | None = None, **fields) -> ml_collections.ConfigDict:
  config = digits_config.get_config()
  if method is not None:
    config[method] = ml_collections.ConfigDict(fields)
  return config


def test_accuracies(model, digits, split):
  """(forget-class, retained-classes) accuracy on the test images."""
  logits = train.predict(model, digits.test_images)["logits"]
  return (metrics.accuracy(logits[split.forget_test], digits.test_labels[split.forget_test]),
          metrics.accuracy(logits[split.retain_test], digits.test_labels[split.retain_test]))


test_accuracies.__test__ = False  # a helper, not a test


def log_softmax(logits):
  logits = np.asarray(logits, np.float64)
  shifted = logits - logits.max(-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def mean_kl(teacher_logits, student_logits):
  """Mean KL(softmax(teacher) ‖ softmax(student)) in NumPy, independent of the code under test."""
  t, s = log_softmax(teacher_logits), log_softmax(student_logits)
  return float(np.mean(np.sum(np.exp(t) * (t - s), axis=-1)))


def test_the_four_methods_are_registered():
  assert set(METHODS) <= set(unlearning.UNLEARNING_METHODS)
  for name, module in zip(METHODS, (bad_teacher_lib, unsir_lib, ssd_lib, scrub_lib)):
    assert unlearning.get_method(name) is getattr(module, name)


# --- Bad Teacher ----------------------------------------------------------------------------------
def test_bad_teacher_moves_forget_predictions_toward_the_random_teacher(digits, trained, split,
                                                                        data):
  forget, retain = data
  timings, diagnostics = {}, {}
  params_before = jax.tree.map(np.array, jax.device_get(trained.state.params))
  # Adam 1e-3 instead of 1e-4: digits' one epoch is ~17 steps.
  unlearned = unlearning.get_method("bad_teacher")(
      trained, forget, retain, experiment_config("bad_teacher", learning_rate=1e-3),
      jax.random.key(0), timings=timings, diagnostics=diagnostics)
  random_teacher = diagnostics["incompetent_teacher"]
  teacher_logits = train.predict(random_teacher, forget.images)["logits"]
  before = mean_kl(teacher_logits, train.predict(trained, forget.images)["logits"])
  after = mean_kl(teacher_logits, train.predict(unlearned, forget.images)["logits"])
  assert after < 0.25 * before, (before, after)
  forget_before, retain_before = test_accuracies(trained, digits, split)
  forget_after, retain_after = test_accuracies(unlearned, digits, split)
  assert forget_before > 0.9 and forget_after < 0.3, (forget_before, forget_after)
  # The competent teacher keeps the retained classes.
  assert retain_after > retain_before - 0.08, (retain_before, retain_after)
  assert timings["compile_s"] > 0 and timings["distill_s"] > 0
  # The caller's model is untouched and usable (the step donated copies, not its buffers).
  for a, b in zip(jax.tree.leaves(params_before), jax.tree.leaves(trained.state.params)):
    np.testing.assert_array_equal(a, np.asarray(b))


def test_distillation_kl_matches_the_definition():
  rng = np.random.default_rng(0)
  teacher, student = rng.normal(size=(2, 5, 7)) * 3
  for temperature in (1.0, 4.0):
    p = np.exp(teacher / temperature) / np.exp(teacher / temperature).sum(-1, keepdims=True)
    q = np.exp(student / temperature) / np.exp(student / temperature).sum(-1, keepdims=True)
    expected = np.mean(np.sum(p * np.log(p / q), axis=-1))
    np.testing.assert_allclose(bad_teacher_lib.distillation_kl(teacher, student, temperature),
                               expected, rtol=1e-5)
  assert float(bad_teacher_lib.distillation_kl(teacher, teacher)) == pytest.approx(0, abs=1e-6)


# --- UNSIR ----------------------------------------------------------------------------------------
def test_unsir_noise_raises_the_forget_class_loss_and_the_run_forgets(digits, trained, split,
                                                                      data):
  forget, retain = data
  timings, diagnostics = {}, {}
  # Digits has ~145 retain images per class: 10 noise copies (not 80) keep the noise share of the
  # impair epoch near SSD's CIFAR-10 share; learning rates 0.02 / 0.01 (UNSIR paper's), not 1e-4;
  # one batch size for both phases, so that they share one compilation.
  config = experiment_config("unsir", noise_repeats=10, impair_learning_rate=0.02,
                             repair_learning_rate=0.01, repair_batch_size=32)
  unlearned = unlearning.get_method("unsir")(trained, forget, retain, config, jax.random.key(0),
                                             timings=timings, diagnostics=diagnostics)
  labels = diagnostics["noise_labels"]
  assert labels.shape == (32,) and np.all(labels == int(FORGET))

  def forget_class_ce(noise):
    logits, _, _ = train.apply_model(trained.model, trained.state.params,
                                     trained.state.batch_stats, jnp.asarray(noise), train=False)
    return float(optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean())

  initial_ce = forget_class_ce(diagnostics["initial_noise"])
  learned_ce = forget_class_ce(diagnostics["noise"])
  assert learned_ce > initial_ce + 1.0, (initial_ce, learned_ce)
  # The impair step fits the forget label on that noise; the noise table itself stays frozen.
  forget_before, retain_before = test_accuracies(trained, digits, split)
  forget_after, retain_after = test_accuracies(unlearned, digits, split)
  assert forget_before > 0.9 and forget_after < 0.3, (forget_before, forget_after)
  assert retain_after > retain_before - 0.08, (retain_before, retain_after)
  for name in ("noise_s", "impair_s", "repair_s", "compile_s"):
    assert timings[name] > 0, name


def test_unsir_impair_pool_mixes_noise_copies_and_retain_images(data):
  _, retain = data
  rng = np.random.default_rng(0)
  noise_labels = np.array([3] * 4 + [5] * 4, np.int32)
  retain_rows = np.arange(20)
  batches = list(unsir_lib._train_batches(rng, retain, retain_rows, noise_labels, 3, 4, 1.0))
  assert len(batches) == (3 * 8 + 20) // 4
  is_noise = np.concatenate([b["is_noise"] for b in batches])
  noise_row = np.concatenate([b["noise_row"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  # Every noise row appears exactly 3 times, labelled with the label it attacks.
  np.testing.assert_array_equal(np.bincount(noise_row[is_noise], minlength=8), [3] * 8)
  np.testing.assert_array_equal(labels[is_noise], noise_labels[noise_row[is_noise]])
  np.testing.assert_array_equal(np.sort(labels[~is_noise]), np.sort(retain.labels[retain_rows]))
  images = np.concatenate([b["image"] for b in batches])
  assert not images[is_noise].any()  # a noise example's image slot is blank


# --- SSD ------------------------------------------------------------------------------------------
def test_importances_are_the_mean_of_squared_batch_gradients_on_any_devices(trained, data):
  forget, _ = data
  subset = unlearning.UnlearnData(forget.images[:10], forget.labels[:10], forget.indices[:10])
  order = np.array([3, 1, 4, 0, 9, 2, 6, 5, 8, 7])
  # Batches of 4: [3 1 4 0] [9 2 6 5] [8 7] -- the last one partial, as a DataLoader yields it;
  # on 2 devices its padding is masked on both.

  @jax.jit
  def batch_grad(params, images, labels):
    def loss(params):
      logits, _, _ = train.apply_model(trained.model, params, trained.state.batch_stats,
                                       train.prepare_images({"image": images}, None, trained.mean,
                                                            trained.std), train=False)
      return train.cross_entropy(logits, labels)
    return jax.grad(loss)(params)

  grads = [batch_grad(trained.state.params, subset.images[rows], subset.labels[rows])
           for rows in (order[:4], order[4:8], order[8:])]
  expected = jax.tree.map(lambda *g: sum(np.square(np.asarray(x)) for x in g) / 3, *grads)
  assert max(float(np.max(x)) for x in jax.tree.leaves(expected)) > 0
  # The single-device program is the reference above; the step on a 2-device mesh and under
  # 2-device pmap (where the batch mean needs a psum of counts and gradients) must agree.
  for mode in ("mesh", "pmap"):
    dp = parallel.DataParallel(mode, tuple(jax.devices()[:2]))
    got = ssd_lib.importances(trained, subset, 4, dp, order=order)
    for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)):
      np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-5 * float(np.max(e)), err_msg=mode)


def test_ssd_dampens_exactly_the_selected_parameters_and_forgets(digits, trained, split, data):
  forget, retain = data
  timings, diagnostics = {}, {}
  unlearned = unlearning.get_method("ssd")(trained, forget, retain, experiment_config(),
                                           jax.random.key(0), timings=timings,
                                           diagnostics=diagnostics)
  alpha, lam = 10.0, 1.0  # the defaults of docs/method.md
  leaves = zip(jax.tree.leaves(trained.state.params), jax.tree.leaves(unlearned.state.params),
               jax.tree.leaves(diagnostics["forget_importance"]),
               jax.tree.leaves(diagnostics["full_importance"]))
  num_selected = 0
  for theta, dampened, i_f, i_d in leaves:
    theta, dampened = np.asarray(theta), np.asarray(dampened)
    selected = i_f > alpha * i_d
    num_selected += selected.sum()
    # Low forget importance: bit for bit untouched.
    np.testing.assert_array_equal(dampened[~selected], theta[~selected])
    # Selected: scaled by min(λ·I_D/I_f, 1), never grown.
    factor = np.minimum(lam * i_d[selected] / i_f[selected], 1.0)
    np.testing.assert_allclose(dampened[selected], theta[selected] * factor, rtol=1e-6)
    assert np.all(np.abs(dampened) <= np.abs(theta))
  total = sum(x.size for x in jax.tree.leaves(trained.state.params))
  assert 0 < num_selected < 0.5 * total
  assert diagnostics["selected_fraction"] == pytest.approx(num_selected / total)
  forget_before, retain_before = test_accuracies(trained, digits, split)
  forget_after, retain_after = test_accuracies(unlearned, digits, split)
  assert forget_before > 0.9 and forget_after < 0.3, (forget_before, forget_after)
  assert retain_after > retain_before - 0.08, (retain_before, retain_after)
  # BatchNorm statistics are buffers, not parameters: SSD never touches them.
  for a, b in zip(jax.tree.leaves(trained.state.batch_stats),
                  jax.tree.leaves(unlearned.state.batch_stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert timings["compile_s"] > 0 and timings["importance_s"] > 0


def test_dampen_on_hand_made_importances():
  theta = {"w": np.array([1.0, -2.0, 3.0, 4.0, 5.0], np.float32)}
  i_f = {"w": np.array([0.0, 10.0, 30.0, 100.0, 11.0], np.float32)}
  i_d = {"w": np.array([0.0, 1.0, 1.0, 5.0, 1.0], np.float32)}
  # α = 10 selects I_f > 10·I_D: entries 2 (30 > 10), 3 (100 > 50), 4 (11 > 10); not 0 (0 > 0)
  # nor 1 (10 > 10). λ = 2: factors min(2·1/30, 1), min(2·5/100, 1), min(2·1/11, 1).
  out = ssd_lib.dampen(theta, i_f, i_d, 10.0, 2.0)
  np.testing.assert_allclose(out["w"], [1.0, -2.0, 3.0 * 2 / 30, 4.0 * 10 / 100, 5.0 * 2 / 11],
                             rtol=1e-6)
  # λ large: the factor is capped at 1, a parameter is never grown.
  np.testing.assert_array_equal(ssd_lib.dampen(theta, i_f, i_d, 10.0, 1e6)["w"], theta["w"])


# --- SCRUB ----------------------------------------------------------------------------------------
def test_scrub_moves_away_from_the_teacher_on_forget_images_only(digits, trained, split, data):
  forget, retain = data
  timings, diagnostics = {}, {}
  # SGD 2e-3 instead of 5e-4: digits' epochs are a few steps (5 on D_f, 41 on D_r).
  unlearned = unlearning.get_method("scrub")(
      trained, forget, retain, experiment_config("scrub", learning_rate=2e-3),
      jax.random.key(0), timings=timings, diagnostics=diagnostics)
  kl = lambda images: mean_kl(train.predict(trained, images)["logits"],
                              train.predict(unlearned, images)["logits"])
  forget_kl, retain_kl = kl(forget.images), kl(retain.images[:500])
  assert forget_kl > 1.0 and retain_kl < 0.1 * forget_kl, (forget_kl, retain_kl)
  forget_before, retain_before = test_accuracies(trained, digits, split)
  forget_after, retain_after = test_accuracies(unlearned, digits, split)
  assert forget_before > 0.9 and forget_after < 0.3, (forget_before, forget_after)
  assert retain_after > retain_before - 0.08, (retain_before, retain_after)
  assert diagnostics["max_metrics"]["loss"] < 0  # the max-step minimises −KL
  for name in ("max_s", "min_s", "compile_s"):
    assert timings[name] > 0, name
  # By default the student's steps leave the running statistics alone: test time normalises
  # every class as the original did.
  for a, b in zip(jax.tree.leaves(trained.state.batch_stats),
                  jax.tree.leaves(unlearned.state.batch_stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def scrub_state_and_step(trained, update_batch_stats):
  settings = scrub_lib.default_scrub_config()
  settings.update_batch_stats = update_batch_stats
  tx = optax.sgd(0.0)  # parameters stay the original's: the step's BatchNorm alone is compared
  state = scrub_lib.ScrubState(
      step=jnp.zeros((), jnp.int32), params=trained.state.params,
      opt_state=tx.init(trained.state.params), teacher_params=trained.state.params,
      teacher_batch_stats=trained.state.batch_stats, batch_stats=trained.state.batch_stats)
  step = jax.jit(scrub_lib.make_scrub_step(trained.model, tx, settings, mean=trained.mean,
                                           std=trained.std)(None))
  return state, step


@pytest.mark.parametrize("update_batch_stats", [False, True])
def test_scrub_student_normalises_with_batch_statistics(trained, data, update_batch_stats):
  forget, _ = data
  state, step = scrub_state_and_step(trained, update_batch_stats)
  batch = {"image": forget.images[:32], "label": forget.labels[:32],
           "is_forget": np.ones(32, bool)}
  new_state, step_metrics = step(state, batch, jax.random.key(0))
  # Same parameters as the teacher: a student on running statistics would give KL = 0 exactly;
  # the batch statistics of 32 forget images (one class) differ from the running ones.
  assert float(step_metrics["kl"]) > 1e-3, step_metrics
  changed = [not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(state.batch_stats),
                             jax.tree.leaves(new_state.batch_stats))]
  assert all(changed) if update_batch_stats else not any(changed), changed
  for a, b in zip(jax.tree.leaves(state.teacher_batch_stats),
                  jax.tree.leaves(new_state.teacher_batch_stats)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,fields,pattern", [
    ("bad_teacher", {"temprature": 2.0}, r"config.bad_teacher.*unknown.*temprature.*temperature"),
    ("bad_teacher", {"retain_fraction": 1.5}, r"retain_fraction=1.5.*\[0, 1\]"),
    ("bad_teacher", {"batch_size": 33}, r"batch_size=33 must be.*multiple of the device count"),
    ("unsir", {"noise_steps": -3}, r"noise_steps=-3.*integer >= 0"),
    ("unsir", {"noise_batch_size": 31}, r"noise_batch_size=31.*multiple of the device count"),
    ("unsir", {"impair_learning_rate": -1.0}, r"impair_learning_rate=-1.0"),
    ("ssd", {"selection_weighting": -1.0}, r"selection_weighting=-1.0.*>= 0"),
    ("ssd", {"alpha": 10.0}, r"unknown.*alpha.*dampening_constant"),
    ("scrub", {"max_epochs": -1}, r"max_epochs=-1.*integer >= 0"),
    ("scrub", {"retain_batch_size": 7}, r"retain_batch_size=7.*multiple of the device count"),
])
def test_bad_settings_fail_before_any_compute(trained, data, no_compute, method, fields,
                                              pattern):
  forget, retain = data
  with pytest.raises(ValueError, match=pattern):
    unlearning.get_method(method)(trained, forget, retain, experiment_config(method, **fields),
                                  jax.random.key(0))


@pytest.mark.parametrize("method", METHODS)
def test_out_of_range_labels_fail_before_any_compute(trained, data, no_compute, method):
  forget, retain = data
  wrong = unlearning.UnlearnData(forget.images, forget.labels + 20, forget.indices)
  with pytest.raises(ValueError, match=r"forget_data.labels span \[23, 23\].*\[0, 10\)"):
    unlearning.get_method(method)(trained, wrong, retain, experiment_config(), jax.random.key(0))
