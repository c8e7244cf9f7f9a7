"""MeGU's pure, jitted steps: the noise phase and the finetuning step (docs/method.md §2, 4-5).

Both are ``step(state, batch, key) -> (state, metrics)`` factories for
:class:`~megu_jax.parallel.DataParallel` (built like ``train.make_train_step``). The noise tables
and their optimiser states sit in :class:`MeguState` next to θ, so one step updates all of them.
The noise pair is applied by :mod:`megu_jax.noise` to the activations the model returns.

BatchNorm runs in inference mode during unlearning (running statistics frozen, scale and bias
still trained): half of every batch is forget data, often one class, pushed through noise, and
letting it into the running statistics would shift the test-time normalisation of every class.
No augmentation is applied: the forget images must be the ones the attacker queries.
"""
from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from megu_jax import noise as noise_lib
from megu_jax import parallel
from megu_jax import train
from megu_jax.unlearning.megu.targets import logit_margins, margin_loss


@flax.struct.dataclass
class MeguState:
  """Everything the unlearning steps read and write, as pytrees."""
  step: jax.Array                  # int32 scalar: finetuning steps done
  params: Any                      # θ, being unlearned
  opt_state: Any
  noise: noise_lib.NoiseState
  original_params: Any             # θ₀, frozen: the KL and alignment targets
  batch_stats: Any                 # frozen BatchNorm statistics (see the module docstring)


def noise_optimizers(settings) -> tuple[optax.GradientTransformation, optax.GradientTransformation]:
  return optax.adam(settings.negative_learning_rate), optax.adam(settings.positive_learning_rate)


def _network(model: nn.Module, activation_name: str, batch_stats, start: str | None = None):
  """``g(params, x) -> (logits, z)`` and ``h(params, z) -> logits``, BatchNorm frozen.

  ``g`` takes images, or with ``start`` the output of that stage (a frozen prefix, see
  ``frozen_prefix``).
  """

  def g(params, x):
    logits, activations = model.apply({"params": params, "batch_stats": batch_stats}, x,
                                      train=False, from_activation=start)
    return logits, activations[activation_name]

  def h(params, activation):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, activation,
                            train=False, from_activation=activation_name)
    return logits
  return g, h


def frozen_prefix(model: nn.Module, params, batch_stats, until: str, images: jax.Array):
  """The output of stage ``until`` of the network ``params``: the input of the trained stages."""
  _, activations = model.apply({"params": params, "batch_stats": batch_stats}, images,
                               train=False, until=until)
  return activations[until]


def _noise_rows(batch: dict, per_sample: bool) -> jax.Array:
  return batch["forget_row"] if per_sample else batch["forget_label"]


def make_noise_step(model: nn.Module, settings: ml_collections.ConfigDict, *, mean, std,
                    per_sample: bool) -> parallel.StepFactory:
  """Factory of ``noise_step(state, batch, key) -> (state, metrics)``: the pair only, θ frozen."""
  negative_tx, positive_tx = noise_optimizers(settings)

  def factory(axis_name: str | None):

    def noise_step(state: MeguState, batch: dict, key: jax.Array):
      del key  # deterministic: no augmentation, no dropout
      g, h = _network(model, settings.activation, state.batch_stats)
      if "forget_original_activation" in batch:
        # θ is frozen in this phase, so g_θ(x_f) = g_θ₀(x_f), computed once by the guidance
        # pass: the phase then costs the head alone, not a convolution stack per step.
        activation = batch["forget_original_activation"]
      else:
        images = train.prepare_images({"image": batch["forget_image"]}, None, mean, std)
        _, activation = g(state.params, images)
      new_noise, metrics = noise_lib.noise_update(
          state.noise, lambda z: h(state.params, z), activation, batch["forget_label"],
          batch["forget_perturbing"], _noise_rows(batch, per_sample), batch["forget_perturbing"],
          negative_weight=settings.negative_weight, positive_weight=settings.positive_weight,
          negative_tx=negative_tx, positive_tx=positive_tx, mode=settings.noise,
          axis_name=axis_name)
      return state.replace(noise=new_noise), metrics
    return noise_step
  return factory


def make_finetune_step(model: nn.Module, tx: optax.GradientTransformation,
                       settings: ml_collections.ConfigDict, *, mean, std, per_sample: bool,
                       update_noise: bool) -> parallel.StepFactory:
  """Factory of ``finetune_step(state, batch, key) -> (state, metrics)``.

  With ``update_noise`` (the alternating schedule) the pair takes one step on the current θ first.
  """
  negative_tx, positive_tx = noise_optimizers(settings)
  use_kl = settings.kl_weight > 0
  use_retain_margin = settings.retain_margin_weight > 0
  use_align = settings.align_weight > 0

  def factory(axis_name: str | None):

    def finetune_step(state: MeguState, batch: dict, key: jax.Array):
      del key
      start = settings.freeze_through or None
      g, h = _network(model, settings.activation, state.batch_stats, start)
      # With ``start``, g's input is the output of the frozen stages. They are θ₀'s (their
      # gradient is never taken), so that output is the same for θ and θ₀ and needs no backward
      # pass; the guidance pass computes it once for the forget and the retain images, and the
      # batches then carry it instead of the images.
      prefix = functools.partial(frozen_prefix, model, state.original_params, state.batch_stats,
                                 start) if start else (lambda images: images)
      if "retain_prefix" in batch:  # computed once by the guidance pass
        retain_images = batch["retain_prefix"]
      else:
        retain_images = prefix(train.prepare_images({"image": batch["retain_image"]}, None, mean,
                                                    std))
      if "forget_prefix" in batch:
        forget_images = batch["forget_prefix"]
      else:
        forget_images = prefix(train.prepare_images({"image": batch["forget_image"]}, None, mean,
                                                    std))
      negative_rows = _noise_rows(batch, per_sample)
      perturbing = batch["forget_perturbing"]
      noise_metrics = {}
      new_noise = state.noise
      if update_noise:
        _, activation = g(state.params, forget_images)
        new_noise, noise_metrics = noise_lib.noise_update(
            state.noise, lambda z: h(state.params, z), activation, batch["forget_label"],
            perturbing, negative_rows, perturbing,
            negative_weight=settings.negative_weight, positive_weight=settings.positive_weight,
            negative_tx=negative_tx, positive_tx=positive_tx, mode=settings.noise,
            axis_name=axis_name)
      negative, positive = jax.lax.stop_gradient(
          noise_lib.gather_noise(new_noise, negative_rows, perturbing, settings.noise))

      original_retain_logits = retain_target_margins = original_activation = None
      if use_kl or (use_retain_margin and "retain_target_margin" not in batch):
        original_retain_logits, _ = g(state.original_params, retain_images)
      if "retain_target_margin" in batch:  # retain_margin_source="retained_head"
        retain_target_margins = batch["retain_target_margin"]
      elif use_retain_margin:
        retain_target_margins = logit_margins(original_retain_logits, batch["retain_label"])
      if use_align and "forget_original_activation" in batch:
        # Precomputed once per image (the "features" activation, from the guidance pass).
        original_activation = batch["forget_original_activation"]
      elif use_align:
        _, original_activation = g(state.original_params, forget_images)

      def loss_fn(params):
        _, activation = g(params, forget_images)
        forget_logits = h(params, noise_lib.apply_noise(activation, negative, positive))
        if "forget_target_margin" in batch:  # forget_target="*_margin"
          forget_loss = margin_loss(forget_logits, batch["forget_label"],
                                    batch["forget_target_margin"])
        elif "forget_target" in batch:  # forget_target="distribution"
          forget_loss = jnp.mean(optax.softmax_cross_entropy(forget_logits,
                                                             batch["forget_target"]))
        else:
          forget_loss = train.cross_entropy(forget_logits, perturbing)
        retain_logits, _ = g(params, retain_images)
        retain_loss = train.cross_entropy(retain_logits, batch["retain_label"])
        loss = settings.forget_weight * forget_loss + settings.retain_weight * retain_loss
        terms = {"forget_loss": forget_loss, "retain_loss": retain_loss}
        if use_kl:
          original_log_probs = jax.nn.log_softmax(original_retain_logits)
          kl = jnp.mean(jnp.sum(jnp.exp(original_log_probs) * (
              original_log_probs - jax.nn.log_softmax(retain_logits)), axis=-1))
          loss += settings.kl_weight * kl
          terms["kl"] = kl
        if use_retain_margin:
          retain_margin = margin_loss(retain_logits, batch["retain_label"],
                                      retain_target_margins)
          loss += settings.retain_margin_weight * retain_margin
          terms["retain_margin"] = retain_margin
        if use_align:
          target = jax.lax.stop_gradient(
              noise_lib.apply_noise(original_activation, negative, positive))
          align = jnp.mean(jnp.square(activation - target))
          loss += settings.align_weight * align
          terms["align"] = align
        terms["forget_perturbing_acc"] = jnp.mean(jnp.argmax(forget_logits, -1) == perturbing)
        terms["retain_acc"] = jnp.mean(jnp.argmax(retain_logits, -1) == batch["retain_label"])
        return loss, terms

      (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      grads = parallel.cross_device_mean(grads, axis_name)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      new_state = state.replace(step=state.step + 1,
                                params=optax.apply_updates(state.params, updates),
                                opt_state=opt_state, noise=new_noise)
      metrics = parallel.cross_device_mean({"loss": loss, **terms}, axis_name)
      return new_state, {**metrics, **noise_metrics}
    return finetune_step
  return factory


def make_margin_fn(model: nn.Module, settings: ml_collections.ConfigDict, batch_stats):
  """Jitted ``margins(params, inputs, labels) -> float32 [N]``, z_y − logsumexp_{j≠y} z_j.

  ``inputs`` are the frozen prefix's outputs when ``settings.freeze_through`` is set (they do
  not change while θ trains), else normalised images. BatchNorm in inference mode.
  """
  g, _ = _network(model, settings.activation, batch_stats, settings.freeze_through or None)

  @jax.jit
  def margins(params, inputs, labels):
    logits, _ = g(params, inputs)
    return logit_margins(logits, labels)
  return margins
