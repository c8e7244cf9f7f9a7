"""MeGU's perturbing labels (megu_jax.unlearning.megu.labels): the one implementation of ỹ.

Model guidance, per-sample keys and the own-class weight are tested with the method in
test_megu.py; here the plain draw from T: its frequencies, the own class, argmax, jit, keys.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megu_jax import transition
from megu_jax.datasets import FASHION_MNIST_GROUP_OF
from megu_jax.oracles import offline
from megu_jax.unlearning.megu import labels as labels_lib


def _random_scores(num_classes, seed=0):
  return np.random.default_rng(seed).uniform(0.0, 10.0, (num_classes, num_classes))


def _valid_T(num_classes=4):
  return transition.scores_to_transition(_random_scores(num_classes, seed=5))


# --- perturbing labels --------------------------------------------------------------------------

def test_sampled_frequencies_match_T_and_never_hit_the_own_class():
  num_classes, per_class = 5, 20_000
  T = transition.scores_to_transition(_random_scores(num_classes, seed=7), temperature=3.0)
  labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
  drawn = np.asarray(labels_lib.perturbing_labels(jax.random.key(0), T, labels))
  assert drawn.dtype == np.int32 and drawn.shape == labels.shape
  assert not np.any(drawn == labels)
  for i in range(num_classes):
    frequency = np.bincount(drawn[labels == i], minlength=num_classes) / per_class
    # Each frequency is a binomial proportion: standard deviation sqrt(p (1 - p) / n), at most
    # 0.0035 here. Five standard deviations over 25 cells leave a false-alarm chance near 1e-5;
    # a sampler that ignored T (e.g. uniform) misses by > 0.05 on these rows.
    tolerance = 5.0 * np.sqrt(T[i] * (1 - T[i]) / per_class) + 1e-12
    np.testing.assert_array_less(np.abs(frequency - T[i]), tolerance)


def test_own_class_is_excluded_even_with_diagonal_mass():
  # Not a valid T (heavy diagonal), yet the own class must still never come out.
  T = np.full((3, 3), 1e-8)
  np.fill_diagonal(T, 1.0)
  labels = np.tile(np.arange(3, dtype=np.int32), 3000)
  drawn = np.asarray(labels_lib.perturbing_labels(jax.random.key(1), T, labels))
  assert not np.any(drawn == labels)
  assert set(np.unique(drawn[labels == 0])) == {1, 2}


def test_argmax_mode_takes_the_most_likely_other_class():
  T = np.array([[0, .7, .3], [.2, 0, .8], [.5, .5, 0]])
  drawn = labels_lib.perturbing_labels(None, T, np.array([0, 1, 2, 0], np.int32), mode="argmax")
  np.testing.assert_array_equal(drawn, [1, 2, 0, 1])  # the tie in row 2 goes to the lower index


def test_own_class_weight_after_the_guidance_is_the_share_that_keeps_its_label():
  # A confident original (p(own) ~ 0.998): mixed in before the guidance, the own class wins
  # almost always; after it, w is the share kept and the rest follows T x guidance.
  T = np.array([[0, .5, .5], [.5, 0, .5], [.5, .5, 0]])
  n = 30_000
  labels = np.zeros(n, np.int32)
  logits = np.tile(np.array([[8.0, 2.0, 0.0]], np.float32), (n, 1))
  draw = lambda after: np.asarray(labels_lib.perturbing_labels(
      jax.random.key(2), T, labels, original_logits=logits, guidance_temperature=1.0,
      own_class_weight=0.5, own_class_after_guidance=after))
  assert np.mean(draw(False) == 0) > 0.99
  after = draw(True)
  assert abs(np.mean(after == 0) - 0.5) < 0.02
  # Among the others, class 1 over class 2 by the guidance's e^2 : 1.
  assert abs(np.mean(after[after != 0] == 1) - np.exp(2) / (1 + np.exp(2))) < 0.02
  # With no own-class weight the two orders are the same distribution.
  rows = [labels_lib.guided_distribution_of(T, labels[:4], logits[:4], 1.0, 0.0, after)
          for after in (False, True)]
  np.testing.assert_allclose(rows[0], rows[1], atol=1e-6)


def test_perturbing_labels_under_jit_equal_the_eager_result():
  T = jnp.asarray(_valid_T(6), jnp.float32)
  labels = jnp.arange(600, dtype=jnp.int32) % 6
  key = jax.random.key(3)
  jitted = jax.jit(labels_lib.perturbing_labels, static_argnames="mode")
  for mode in labels_lib.LABEL_MODES:
    np.testing.assert_array_equal(jitted(key, T, labels, mode=mode),
                                  labels_lib.perturbing_labels(key, T, labels, mode=mode))


def test_the_same_key_gives_the_same_labels_and_another_key_other_labels():
  T = _valid_T(6)
  labels = np.arange(600, dtype=np.int32) % 6
  first = labels_lib.perturbing_labels(jax.random.key(4), T, labels)
  np.testing.assert_array_equal(first, labels_lib.perturbing_labels(jax.random.key(4), T, labels))
  assert np.any(first != labels_lib.perturbing_labels(jax.random.key(5), T, labels))


def test_sub_class_mode_never_returns_the_own_superclass():
  # Sub-class forgetting: T is over the coarse labels and the samples carry their superclass.
  coarse_T = transition.scores_to_transition(offline.uniform_scores(5))
  fine_labels = np.tile(np.arange(10), 200)
  superclass = np.asarray(FASHION_MNIST_GROUP_OF)[fine_labels].astype(np.int32)
  drawn = np.asarray(labels_lib.perturbing_labels(jax.random.key(6), coarse_T, superclass))
  assert not np.any(drawn == superclass)
  assert drawn.max() < 5


@pytest.mark.parametrize("kwargs, labels, message", [
    ({"mode": "greedy"}, [0, 1], "mode must be one of ('sample', 'argmax')"),
    ({}, [0, 4], "label 4 is outside [0, 3)"),
    ({}, [[0, 1]], "1-D integer array"),
    ({}, [0.0, 1.0], "1-D integer array"),
])
def test_perturbing_labels_rejects_bad_input(kwargs, labels, message):
  T = _valid_T(3)
  with pytest.raises(ValueError) as error:
    labels_lib.perturbing_labels(jax.random.key(0), T, np.asarray(labels), **kwargs)
  assert message in str(error.value)


