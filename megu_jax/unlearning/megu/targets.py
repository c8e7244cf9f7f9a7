"""Margin targets for the forgotten samples: ``forget_target="non_member_margin"`` (docs/method.md
§2, step 3).

A model that never saw a forgotten image treats it like any unseen image of its class. So each
forgotten image gets, as its finetuning target, the margin m = z_y − logsumexp_{j≠y} z_j that the
original model gives an unseen image of the same class at the same rank: within each class, the
forgotten image whose original margin is the r-th smallest of n gets the (r + ½)/n quantile of
the original's margins on that class's non-members. The order of the forgotten images is kept (an
image the original found hard stays hard) and their spread becomes the non-members' spread, which
is what a per-example comparison with Retrain's margins asks of it. No Retrain model is used.

The finetuning then regresses the forgotten images' margin onto that target
(:func:`margin_loss`) instead of fitting a perturbing label. This holds for random forgetting
alone: when a whole class or sub-class is forgotten, the original has learned it and gives its
unseen images the margins of its training images, while Retrain, which never saw the (sub-)class,
gives them lower ones.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from megu_jax.ensemble_metrics import margins
from megu_jax.unlearning.base import UnlearningInputError


def non_member_margin_targets(forget_logits: np.ndarray, forget_labels: np.ndarray,
                              non_member_logits: np.ndarray,
                              non_member_labels: np.ndarray) -> np.ndarray:
  """float32 [N_f]: each forgotten image's target margin, quantile-matched within its class to
  the original's margins on that class's non-members (see the module docstring).

  Raises :class:`UnlearningInputError` naming a forgotten class with no non-member image.
  """
  return matched_to_unseen(margins(forget_logits, forget_labels), forget_labels,
                           margins(non_member_logits, non_member_labels), non_member_labels,
                           "quantile", "config.megu.forget_target='non_member_margin'")


def matched_to_unseen(forget_margins: np.ndarray, forget_labels: np.ndarray,
                      unseen_margins: np.ndarray, unseen_labels: np.ndarray, how: str,
                      field: str) -> np.ndarray:
  """float32 [N_f]: ``forget_margins`` matched, class by class, to ``unseen_margins`` (one
  model's margins on unseen images of the same classes). ``how``: "quantile" (the r-th smallest
  of n takes the (r + ½)/n quantile of the unseen margins) or "shift" (every margin moved by
  the unseen mean minus the forgotten mean). ``field`` names the setting in the error raised
  for a forgotten class with no unseen image."""
  forget_labels = np.asarray(forget_labels)
  unseen_labels = np.asarray(unseen_labels)
  forget_margins = np.asarray(forget_margins, np.float64)
  targets = np.empty(len(forget_labels), np.float64)
  for label in np.unique(forget_labels):
    rows = np.flatnonzero(forget_labels == label)
    unseen = np.asarray(unseen_margins, np.float64)[unseen_labels == label]
    if not len(unseen):
      raise UnlearningInputError(
          f"{field}: class {int(label)} has {len(rows)} forgotten image(s) but no unseen image "
          "to match their margins to")
    if how == "quantile":
      ranks = np.argsort(np.argsort(forget_margins[rows], kind="stable"), kind="stable")
      targets[rows] = np.quantile(unseen, (ranks + 0.5) / len(rows))
    elif how == "shift":
      targets[rows] = forget_margins[rows] + (unseen.mean() - forget_margins[rows].mean())
    else:
      raise ValueError(f"how={how!r} must be 'quantile' or 'shift'")
  return targets.astype(np.float32)


def logit_margins(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """float [B]: z_y − logsumexp_{j≠y} z_j of ``logits`` [B, K] (pure, differentiable)."""
  own = jnp.take_along_axis(logits, labels[:, None], axis=-1)[:, 0]
  others = jnp.where(jax.nn.one_hot(labels, logits.shape[-1], dtype=bool), -jnp.inf, logits)
  return own - jax.nn.logsumexp(others, axis=-1)


def margin_loss(logits: jax.Array, labels: jax.Array, target_margins: jax.Array) -> jax.Array:
  """Mean Huber loss (δ = 1) between the margins of ``logits`` [B, K] and ``target_margins`` [B].

  Huber rather than squared: a memorised image starts several units of margin above its target,
  and a squared error's gradient, growing with that gap, would swamp the retain loss's.
  """
  return jnp.mean(optax.huber_loss(logit_margins(logits, labels), target_margins, delta=1.0))
