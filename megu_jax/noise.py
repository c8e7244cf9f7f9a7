"""MeGU's positive-negative feature-noise pair (docs/method.md §2, step 4), as pure functions.

The model is f = h o g: ``g`` maps an image to an intermediate activation z (by default the
penultimate features), ``h`` is the rest of the network (``model.apply(..., from_activation=NAME)``).
Two learnable noise tables live beside the model, never inside it:

- the *negative* noise δ⁻, one row per target class (or per forget sample), is optimised with θ
  frozen to remove the evidence for the true class:
      maximise  CE(h(z + δ⁻), y) − λ⁻ ‖δ⁻‖²;
- the *positive* noise δ⁺, one row per perturbing class (one per concept serves every target class
  that is sent there), aligns what remains with the perturbing concept ỹ:
      minimise  CE(h(z + δ⁻ + δ⁺), ỹ) + λ⁺ ‖δ⁺‖².

‖δ‖² is the squared Euclidean norm of a row (summed over the activation's elements), as in the
specification; λ therefore scales with the activation's size. Two measured facts about strength
(digits, 32-d features, Adam 0.1): on training images the model is sure of, ∂CE/∂δ⁻ ~ 0 at δ⁻ = 0,
so with λ⁻ = 0.1 δ⁻ stays near that trivial local maximum (CE of y rose from 0.000 to 0.008);
with the penalty 32x weaker (a per-element mean) δ⁻ grew, but then the noisy forward pass already
predicts ỹ, θ barely moves and the clean model still recognises the class (forget accuracy 0.95
after MeGU). Noise that does the forgetting *for* θ defeats its purpose, hence the summed norm.

:func:`apply_noise` is the one place where the pair touches an activation. Both tables and their
optax states form a :class:`NoiseState` pytree, so a jitted, data-parallel step updates them like
any parameters (:func:`noise_update`).

Shapes: ``activation`` is ``[batch, *activation_shape]`` (``[batch, D]`` for the features,
``[batch, H, W, C]`` for a conv block); a table is ``[rows, *activation_shape]``.
"""
from __future__ import annotations

from typing import Any, Callable

import chex
import flax
import jax
import jax.numpy as jnp
import optax

from megu_jax import parallel

# Which members of the pair are active: the ablations of docs/method.md §2, step 6.
NOISE_MODES = ("both", "negative", "positive", "none")

HeadFn = Callable[[jax.Array], jax.Array]  # activation [batch, *shape] -> logits [batch, K]


@flax.struct.dataclass
class NoiseState:
  """The noise pair and the optimiser state of each member, as plain pytrees."""
  negative: jax.Array            # [num_negative_rows, *activation_shape]: δ⁻ per class or sample
  positive: jax.Array            # [num_classes, *activation_shape]: δ⁺ per perturbing class
  negative_opt_state: Any
  positive_opt_state: Any


def init_noise(activation_shape: tuple[int, ...], num_negative_rows: int, num_positive_rows: int,
               negative_tx: optax.GradientTransformation,
               positive_tx: optax.GradientTransformation) -> NoiseState:
  """Zero noise (the unperturbed model) and fresh optimiser states."""
  negative = jnp.zeros((num_negative_rows,) + tuple(activation_shape), jnp.float32)
  positive = jnp.zeros((num_positive_rows,) + tuple(activation_shape), jnp.float32)
  return NoiseState(negative=negative, positive=positive,
                    negative_opt_state=negative_tx.init(negative),
                    positive_opt_state=positive_tx.init(positive))


def apply_noise(activation: jax.Array, negative: jax.Array, positive: jax.Array) -> jax.Array:
  """z + δ⁻ + δ⁺: the perturbed activation that the rest of the network sees.

  Args:
    activation: ``[batch, *shape]``, z = g(x).
    negative: ``[batch, *shape]``, each example's row of δ⁻ (see :func:`gather_noise`).
    positive: ``[batch, *shape]``, each example's row of δ⁺.
  """
  chex.assert_equal_shape((activation, negative, positive))
  return activation + negative + positive


def gather_noise(noise: NoiseState, negative_rows: jax.Array, positive_rows: jax.Array,
                 mode: str = "both") -> tuple[jax.Array, jax.Array]:
  """Each example's (δ⁻, δ⁺), both ``[batch, *shape]``; a member switched off by ``mode`` is 0.

  Args:
    negative_rows: int ``[batch]``, the row of δ⁻: the target class, or the forget-sample row.
    positive_rows: int ``[batch]``, the row of δ⁺: the perturbing class ỹ.
  """
  if mode not in NOISE_MODES:
    raise ValueError(f"noise mode {mode!r} is not one of {NOISE_MODES}")
  negative = noise.negative[negative_rows]
  positive = noise.positive[positive_rows]
  if mode in ("positive", "none"):
    negative = jnp.zeros_like(negative)
  if mode in ("negative", "none"):
    positive = jnp.zeros_like(positive)
  return negative, positive


def squared_norm(rows: jax.Array) -> jax.Array:
  """‖δ‖² of each row: ``[batch, *shape] -> [batch]``."""
  return jnp.sum(jnp.square(rows).reshape(rows.shape[0], -1), axis=-1)


def cross_entropy_per_example(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """``[batch, K], [batch] -> [batch]``."""
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def negative_objective(head: HeadFn, activation: jax.Array, negative: jax.Array,
                       labels: jax.Array, weight: float) -> jax.Array:
  """CE(h(z + δ⁻), y) − λ⁻ ‖δ⁻‖², averaged over the batch: the quantity δ⁻ *maximises*.

  Args:
    head: the rest of the network, θ frozen.
    activation: ``[batch, *shape]``, z.
    negative: ``[batch, *shape]``, δ⁻ of each example.
    labels: int ``[batch]``, the true (target) class y.
    weight: λ⁻ >= 0; larger keeps δ⁻ smaller.
  """
  logits = head(activation + negative)
  return jnp.mean(cross_entropy_per_example(logits, labels) - weight * squared_norm(negative))


def positive_objective(head: HeadFn, activation: jax.Array, negative: jax.Array,
                       positive: jax.Array, perturbing_labels: jax.Array,
                       weight: float) -> jax.Array:
  """CE(h(z + δ⁻ + δ⁺), ỹ) + λ⁺ ‖δ⁺‖², averaged over the batch: the quantity δ⁺ *minimises*."""
  logits = head(apply_noise(activation, negative, positive))
  return jnp.mean(cross_entropy_per_example(logits, perturbing_labels)
                  + weight * squared_norm(positive))


def noise_update(noise: NoiseState, head: HeadFn, activation: jax.Array, labels: jax.Array,
                 perturbing_labels: jax.Array, negative_rows: jax.Array,
                 positive_rows: jax.Array, *, negative_weight: float, positive_weight: float,
                 negative_tx: optax.GradientTransformation,
                 positive_tx: optax.GradientTransformation, mode: str = "both",
                 axis_name: str | None = None) -> tuple[NoiseState, dict[str, jax.Array]]:
  """One optimiser step of both members of the pair on one batch of forget examples.

  δ⁻ ascends its objective; δ⁺ descends its own, seeing δ⁻ as a constant (δ⁺ aligns *what δ⁻
  left*, it does not help δ⁻). The activation is a constant too: θ is frozen for the noise.
  Under pmap the table gradients are averaged over devices, so every replica keeps the same
  tables and the result equals the single-device step on the global batch.

  Returns:
    The new NoiseState and metrics ``negative_ce`` (CE of y with δ⁻: rises), ``positive_ce``
    (CE of ỹ with both: falls), ``negative_norm`` and ``positive_norm`` (mean ‖δ‖ per example).
  """
  activation = jax.lax.stop_gradient(activation)
  use_negative = mode in ("both", "negative")
  use_positive = mode in ("both", "positive")

  def negative_loss(table):  # minimised, hence the minus sign
    rows = table[negative_rows]
    return -negative_objective(head, activation, rows, labels, negative_weight)

  def positive_loss(table, negative_rows_value):
    rows = table[positive_rows]
    return positive_objective(head, activation, negative_rows_value, rows, perturbing_labels,
                              positive_weight)

  new_negative, new_negative_opt = noise.negative, noise.negative_opt_state
  if use_negative:
    grads = parallel.cross_device_mean(jax.grad(negative_loss)(noise.negative), axis_name)
    updates, new_negative_opt = negative_tx.update(grads, noise.negative_opt_state,
                                                   noise.negative)
    new_negative = optax.apply_updates(noise.negative, updates)

  negative_now = (new_negative[negative_rows] if use_negative
                  else jnp.zeros_like(activation))
  new_positive, new_positive_opt = noise.positive, noise.positive_opt_state
  if use_positive:
    grads = parallel.cross_device_mean(
        jax.grad(positive_loss)(noise.positive, negative_now), axis_name)
    updates, new_positive_opt = positive_tx.update(grads, noise.positive_opt_state,
                                                   noise.positive)
    new_positive = optax.apply_updates(noise.positive, updates)

  new_noise = NoiseState(negative=new_negative, positive=new_positive,
                         negative_opt_state=new_negative_opt,
                         positive_opt_state=new_positive_opt)
  negative, positive = gather_noise(new_noise, negative_rows, positive_rows, mode)
  metrics = {
      "negative_ce": jnp.mean(cross_entropy_per_example(head(activation + negative), labels)),
      "positive_ce": jnp.mean(cross_entropy_per_example(
          head(apply_noise(activation, negative, positive)), perturbing_labels)),
      "negative_norm": jnp.mean(jnp.sqrt(squared_norm(negative))),
      "positive_norm": jnp.mean(jnp.sqrt(squared_norm(positive))),
  }
  return new_noise, parallel.cross_device_mean(metrics, axis_name)
