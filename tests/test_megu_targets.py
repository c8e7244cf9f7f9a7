"""The non-member margin targets of ``forget_target="non_member_margin"`` and their loss."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from megu_jax import ensemble_metrics
from megu_jax import unlearning
from megu_jax.unlearning.megu import targets


def logits_with_margins(margins, labels, num_classes=4):
  """Logits whose margin on ``labels`` is ``margins``: the own logit m + log(K − 1), the rest 0."""
  logits = np.zeros((len(margins), num_classes))
  logits[np.arange(len(margins)), labels] = np.asarray(margins) + np.log(num_classes - 1)
  return logits


def test_targets_are_the_non_members_quantiles_in_the_forgotten_images_order():
  forget_labels = np.array([0, 0, 0, 0, 1, 1])
  forget_margins = np.array([9.0, 3.0, 7.0, 5.0, 8.0, 6.0])
  non_member_labels = np.array([0] * 5 + [1] * 3)
  non_member_margins = np.array([0.0, 1.0, 2.0, 3.0, 4.0, -2.0, 0.0, 2.0])
  got = targets.non_member_margin_targets(
      logits_with_margins(forget_margins, forget_labels), forget_labels,
      logits_with_margins(non_member_margins, non_member_labels), non_member_labels)
  # Class 0's forgotten images rank 3, 0, 2, 1 of 4: the (r + 1/2)/4 quantiles of 0..4.
  expected_0 = np.quantile(non_member_margins[:5], (np.array([3, 0, 2, 1]) + 0.5) / 4)
  expected_1 = np.quantile(non_member_margins[5:], (np.array([1, 0]) + 0.5) / 2)
  np.testing.assert_allclose(got, np.concatenate([expected_0, expected_1]), rtol=1e-5)
  assert np.all(np.diff(got[[1, 3, 2, 0]]) > 0)  # the order of the original margins is kept
  assert got.dtype == np.float32


def test_a_forgotten_class_without_non_members_fails_naming_it():
  labels = np.array([0, 2])
  with pytest.raises(unlearning.UnlearningInputError,
                     match="class 2 has 1 forgotten image.*no unseen image"):
    targets.non_member_margin_targets(logits_with_margins([1.0, 2.0], labels), labels,
                                      logits_with_margins([0.5], [0]), np.array([0]))


def test_the_margin_loss_is_zero_at_the_target_and_pulls_toward_it():
  labels = jnp.array([0, 1, 3])
  logits = jnp.asarray(np.random.default_rng(0).normal(0, 3, (3, 4)), jnp.float32)
  margins = targets.logit_margins(logits, labels)
  np.testing.assert_allclose(margins, ensemble_metrics.margins(logits, labels), rtol=1e-5)
  assert float(targets.margin_loss(logits, labels, margins)) == pytest.approx(0.0, abs=1e-7)
  # A target below the margin: a gradient step on the logits lowers the margin toward it.
  lower = margins - 5.0
  grad = jax.grad(targets.margin_loss)(logits, labels, lower)
  stepped = targets.logit_margins(logits - 0.5 * grad, labels)
  assert np.all(np.asarray(stepped) < np.asarray(margins))
  # Huber: five units away, each example's loss grows linearly, not as 25/2.
  assert float(targets.margin_loss(logits, labels, lower)) == pytest.approx(4.5, rel=1e-5)


def test_matching_to_unseen_margins_shifts_each_class_to_its_mean_or_takes_its_quantiles():
  forget_labels = np.array([0, 0, 0, 1, 1])
  forget_margins = np.array([5.0, 9.0, 7.0, 2.0, 4.0])
  unseen_labels = np.array([0, 0, 1, 1, 1])
  unseen_margins = np.array([1.0, 3.0, -4.0, 0.0, 1.0])
  shifted = targets.matched_to_unseen(forget_margins, forget_labels, unseen_margins,
                                      unseen_labels, "shift", "f")
  # Class 0: mean 7 → 2 (shift −5); class 1: mean 3 → −1 (shift −4). The spread is kept.
  np.testing.assert_allclose(shifted, [0.0, 4.0, 2.0, -2.0, 0.0])
  matched = targets.matched_to_unseen(forget_margins, forget_labels, unseen_margins,
                                      unseen_labels, "quantile", "f")
  np.testing.assert_allclose(matched[:3], np.quantile([1.0, 3.0], [0.5 / 3, 2.5 / 3, 1.5 / 3]))
  np.testing.assert_allclose(matched[3:], np.quantile([-4.0, 0.0, 1.0], [0.25, 0.75]))
  assert shifted.dtype == matched.dtype == np.float32
  with pytest.raises(unlearning.UnlearningInputError, match="^f: class 1 has 2 forgotten"):
    targets.matched_to_unseen(forget_margins, forget_labels, unseen_margins[:2],
                              unseen_labels[:2], "shift", "f")
