"""The noise pair on hand-made activations and a fixed linear head."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from megu_jax import noise

NUM_CLASSES, DIM = 3, 4
# A fixed head: class c is read off feature c (the last feature is ignored), so a noise row that
# lowers feature y / raises feature ỹ is exactly what the objectives should find.
WEIGHTS = jnp.concatenate([3.0 * jnp.eye(NUM_CLASSES), jnp.zeros((1, NUM_CLASSES))])
head = lambda z: z @ WEIGHTS


def hand_made_batch():
  """Six examples, two per class, each classified right with p(y) ~ 0.7 (as on held-out data).

  (On saturated examples, p(y) ~ 1, the gradient of CE vanishes at δ⁻ = 0 and error-maximising
  noise starts slowly: a property of the objective, not tested here.)
  """
  labels = jnp.array([0, 0, 1, 1, 2, 2])
  activation = jax.nn.one_hot(labels, DIM) * 0.5 + 0.1
  perturbing = jnp.array([1, 2, 2, 0, 0, 1])
  return activation, labels, perturbing


def make_state(rows=NUM_CLASSES, learning_rate=0.1):
  tx = optax.adam(learning_rate)
  return noise.init_noise((DIM,), rows, NUM_CLASSES, tx, tx), tx


def test_shapes_and_zero_initial_noise():
  state, _ = make_state()
  assert state.negative.shape == (NUM_CLASSES, DIM) and state.positive.shape == (NUM_CLASSES, DIM)
  conv_state = noise.init_noise((3, 3, 8), 5, NUM_CLASSES, optax.adam(0.1), optax.adam(0.1))
  assert conv_state.negative.shape == (5, 3, 3, 8)
  assert conv_state.positive.shape == (NUM_CLASSES, 3, 3, 8)

  activation, labels, perturbing = hand_made_batch()
  negative, positive = noise.gather_noise(state, labels, perturbing)
  assert negative.shape == positive.shape == activation.shape
  np.testing.assert_array_equal(noise.apply_noise(activation, negative, positive), activation)


def test_apply_noise_adds_each_examples_rows_and_checks_shapes():
  activation, labels, perturbing = hand_made_batch()
  state, _ = make_state()
  state = state.replace(negative=jnp.arange(NUM_CLASSES * DIM, dtype=jnp.float32).reshape(
      NUM_CLASSES, DIM), positive=-jnp.ones((NUM_CLASSES, DIM)) * jnp.arange(NUM_CLASSES)[:, None])
  negative, positive = noise.gather_noise(state, labels, perturbing)
  expected = activation + state.negative[labels] + state.positive[perturbing]
  np.testing.assert_allclose(noise.apply_noise(activation, negative, positive), expected)
  with pytest.raises(AssertionError):
    noise.apply_noise(activation, negative[:2], positive)


@pytest.mark.parametrize("mode,negative_zero,positive_zero", [
    ("both", False, False), ("negative", False, True), ("positive", True, False),
    ("none", True, True)])
def test_ablation_modes_switch_members_off(mode, negative_zero, positive_zero):
  state, _ = make_state()
  state = state.replace(negative=jnp.ones_like(state.negative),
                        positive=jnp.ones_like(state.positive))
  _, labels, perturbing = hand_made_batch()
  negative, positive = noise.gather_noise(state, labels, perturbing, mode)
  assert bool(jnp.all(negative == 0)) == negative_zero
  assert bool(jnp.all(positive == 0)) == positive_zero
  with pytest.raises(ValueError, match="'neither'.*both"):
    noise.gather_noise(state, labels, perturbing, "neither")


def test_objectives_match_hand_computation():
  activation, labels, perturbing = hand_made_batch()
  negative = jnp.full_like(activation, 0.5)
  positive = jnp.full_like(activation, -0.25)
  ce = lambda z, y: -jax.nn.log_softmax(head(z))[jnp.arange(len(y)), y]
  expected_negative = jnp.mean(ce(activation + negative, labels) - 0.1 * DIM * 0.25)
  expected_positive = jnp.mean(ce(activation + negative + positive, perturbing)
                               + 0.2 * DIM * 0.0625)
  np.testing.assert_allclose(
      noise.negative_objective(head, activation, negative, labels, 0.1), expected_negative,
      rtol=1e-6)
  np.testing.assert_allclose(
      noise.positive_objective(head, activation, negative, positive, perturbing, 0.2),
      expected_positive, rtol=1e-6)


def run_updates(num_steps=50, weight=0.1, mode="both", per_sample=False):
  activation, labels, perturbing = hand_made_batch()
  rows = jnp.arange(len(labels)) if per_sample else labels
  state, tx = make_state(rows=len(labels) if per_sample else NUM_CLASSES)
  update = jax.jit(lambda s: noise.noise_update(
      s, head, activation, labels, perturbing, rows, perturbing, negative_weight=weight,
      positive_weight=weight, negative_tx=tx, positive_tx=tx, mode=mode))
  history = []
  for _ in range(num_steps):
    state, metrics = update(state)
    history.append(jax.device_get(metrics))
  return state, history


def clean_cross_entropies():
  activation, labels, perturbing = hand_made_batch()
  ce = lambda y: float(jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
      head(activation), y)))
  return ce(labels), ce(perturbing)


def test_negative_noise_raises_true_class_loss_and_positive_lowers_perturbing_loss():
  true_ce, perturbing_ce = clean_cross_entropies()
  state, history = run_updates()
  assert history[-1]["negative_ce"] > true_ce + 1.0, (true_ce, history[-1])
  assert history[-1]["positive_ce"] < perturbing_ce - 1.0, (perturbing_ce, history[-1])
  # The negative noise lowers the true class's feature; the positive raises the perturbing one's.
  for c in range(NUM_CLASSES):
    assert state.negative[c, c] < 0
    assert state.positive[c, c] > 0
  # The ignored feature has no gradient through the head: only the norm penalty acts, so it stays 0.
  np.testing.assert_allclose(state.negative[:, DIM - 1], 0.0, atol=1e-6)


def test_larger_penalty_gives_smaller_noise():
  weak, _ = run_updates(weight=0.01)
  strong, _ = run_updates(weight=1.0)
  assert float(jnp.linalg.norm(strong.negative)) < 0.5 * float(jnp.linalg.norm(weak.negative))
  assert float(jnp.linalg.norm(strong.positive)) < float(jnp.linalg.norm(weak.positive))


def test_negative_only_leaves_positive_untouched_and_vice_versa():
  negative_only, _ = run_updates(num_steps=5, mode="negative")
  assert float(jnp.abs(negative_only.positive).max()) == 0.0
  assert float(jnp.abs(negative_only.negative).max()) > 0.0
  positive_only, _ = run_updates(num_steps=5, mode="positive")
  assert float(jnp.abs(positive_only.negative).max()) == 0.0
  assert float(jnp.abs(positive_only.positive).max()) > 0.0


def test_per_sample_rows_move_only_for_their_own_example():
  activation, labels, perturbing = hand_made_batch()
  tx = optax.adam(0.1)
  state = noise.init_noise((DIM,), 10, NUM_CLASSES, tx, tx)
  rows = jnp.array([0, 1, 2, 3, 4, 5])
  state, _ = noise.noise_update(state, head, activation, labels, perturbing, rows, perturbing,
                                negative_weight=0.1, positive_weight=0.1, negative_tx=tx,
                                positive_tx=tx)
  moved = np.asarray(jnp.any(state.negative != 0, axis=-1))
  np.testing.assert_array_equal(moved, [True] * 6 + [False] * 4)
