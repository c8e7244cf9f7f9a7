"""SCRUB (Kurmanji et al., NeurIPS 2023): a student moves away from its teacher on D_f only.

docs/method.md §3. The teacher is the original model, the student starts as a copy of it. Each
epoch runs, while the epoch is below ``max_epochs``, one pass of *max-steps* over D_f:

    minimise −T²·KL_T(teacher ‖ student)               (push the student away on forget images)

then one pass of *min-steps* over D_r:

    minimise γ·CE(student, y) + α·T²·KL_T(teacher ‖ student)   (stay the teacher elsewhere)

with KL_T the KL of the temperature-T softmaxes (T = 4; the T² keeps gradient sizes comparable
across temperatures, as SCRUB's ``DistillKL``), γ = 0.99, α = 0.001, SGD 5e-4 (momentum 0.9,
weight decay 5e-4), 3 epochs, 2 of them with max-steps. One optimiser serves both kinds of step,
as in SCRUB's code.

BatchNorm: the teacher runs in inference mode; the student's steps normalise with *batch*
statistics, as SCRUB's code, which puts the student in ``train()`` mode. By default the running
statistics are not updated (``update_batch_stats = False``): the unlearned model is tested with the
original's, so a max-epoch of forget-only batches cannot shift how every class is normalised.
``update_batch_stats = True`` carries them forward as PyTorch's ``train()`` does (SCRUB's code
literally); the training trajectory is the same either way, only the returned statistics differ.

The max-steps' −KL is unbounded: on the small CNN (two dense layers after the last BatchNorm)
5e-4 grows it exponentially to NaN, so the Fashion-MNIST config lowers the rate (docs/tuning.md);
the default stays 5e-4, stable on digits. A run that diverges raises ``NonFiniteLossError``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from megu_jax import parallel
from megu_jax import train
from megu_jax.unlearning import register
from megu_jax.unlearning.bad_teacher import distillation_kl_per_example
from megu_jax.unlearning.base import (UnlearnData, check_count, check_data, check_finite,
                                      check_positive, frozen_logits, host_copy, method_settings,
                                      resolve_batch_size, row_stream, run_phase_once_compiled,
                                      seed_from_key)

def default_scrub_config() -> ml_collections.ConfigDict:
  """The SSD benchmark's SCRUB; attach as ``config.scrub`` to change a field."""
  c = ml_collections.ConfigDict()
  c.epochs = 3                # epochs of min-steps over D_r
  c.max_epochs = 2            # the first max_epochs epochs also run max-steps over D_f
  c.learning_rate = 5e-4      # SGD
  c.momentum = 0.9
  c.weight_decay = 5e-4
  c.temperature = 4.0         # T of the KL
  c.retain_ce_weight = 0.99   # γ
  c.retain_kl_weight = 0.001  # α
  c.forget_batch_size = 0     # 0 = the experiment's config.batch_size
  c.retain_batch_size = 0     # 0 = the experiment's config.batch_size
  # BatchNorm of the student's steps: it always normalises with batch statistics (train mode, as
  # SCRUB's code); True also carries the running statistics forward (PyTorch's train() does) and
  # returns them, False keeps the original's for test time (see the module docstring).
  c.update_batch_stats = False
  return c


@flax.struct.dataclass
class ScrubState:
  """Everything the max- and min-steps read and write, as pytrees."""
  step: jax.Array             # int32 scalar: steps of either kind done
  params: Any                 # the student
  opt_state: Any
  teacher_params: Any         # the original model, frozen
  teacher_batch_stats: Any    # the original's running statistics, frozen (teacher, eval mode)
  batch_stats: Any            # the student's running statistics (moved only if
  #                             update_batch_stats)


def make_scrub_step(model: nn.Module, tx: optax.GradientTransformation,
                    settings: ml_collections.ConfigDict, *, mean, std) -> parallel.StepFactory:
  """Factory of ``scrub_step(state, batch, key) -> (state, metrics)``.

  ``batch``: ``image`` uint8 ``[B, H, W, C]``, ``label`` int32 ``[B]`` and ``is_forget`` bool
  ``[B]``: a forget example contributes the max-step loss −T²·KL, a retain example the min-step
  loss γ·CE + α·T²·KL, averaged over the batch. :func:`scrub` feeds batches of one kind only, so
  a step *is* a max- or a min-step; one program serves both (one compilation, not two).
  """
  temperature = float(settings.temperature)
  kl_scale = temperature ** 2
  update_batch_stats = bool(settings.update_batch_stats)

  def factory(axis_name: str | None):
    # The student normalises with the statistics of the whole (global) batch, as training does.
    student_model = model.clone(bn_axis_name=axis_name)

    def scrub_step(state: ScrubState, batch: dict, key: jax.Array):
      del key
      images = train.prepare_images({"image": batch["image"]}, None, mean, std)
      teacher_logits = frozen_logits(model, state.teacher_params, state.teacher_batch_stats,
                                     images)
      is_forget = batch["is_forget"]

      def loss_fn(params):
        # Batch statistics, not running ones: with frozen BatchNorm the −KL of the max-steps
        # grows the weights' scale unchecked across layers and diverges (module docstring).
        student_logits, _, batch_stats = train.apply_model(student_model, params,
                                                           state.batch_stats, images, train=True)
        kl = kl_scale * distillation_kl_per_example(teacher_logits, student_logits, temperature)
        ce = optax.softmax_cross_entropy_with_integer_labels(student_logits, batch["label"])
        per_example = jnp.where(is_forget, -kl, settings.retain_ce_weight * ce
                                + settings.retain_kl_weight * kl)
        return jnp.mean(per_example), ({"kl": jnp.mean(kl), "ce": jnp.mean(ce)}, batch_stats)

      (loss, (terms, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params)
      grads = parallel.cross_device_mean(grads, axis_name)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      new_state = state.replace(
          step=state.step + 1, params=optax.apply_updates(state.params, updates),
          opt_state=opt_state,
          batch_stats=batch_stats if update_batch_stats else state.batch_stats)
      return new_state, parallel.cross_device_mean({"loss": loss, **terms}, axis_name)
    return scrub_step
  return factory


def _epoch_batches(rng: np.random.Generator, data: UnlearnData, batch_size: int,
                   is_forget: bool):
  """One shuffled epoch, ceil(N / batch_size) batches; the last one is topped up from the next
  shuffle so that every batch has one shape (one compilation)."""
  num_steps = math.ceil(len(data) / batch_size)
  flags = np.full(batch_size, is_forget)
  for rows in row_stream(rng, len(data), num_steps * batch_size).reshape(num_steps, batch_size):
    yield {"image": data.images[rows], "label": data.labels[rows], "is_forget": flags}


def make_scrub_optimizer(settings: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """SGD with momentum and PyTorch-style (coupled) weight decay, constant learning rate."""
  return optax.chain(optax.add_decayed_weights(settings.weight_decay),
                     optax.sgd(settings.learning_rate, momentum=settings.momentum or None))


@register("scrub")
def scrub(trained: train.Trained, forget_data: UnlearnData, retain_data: UnlearnData,
          config: ml_collections.ConfigDict, key: jax.Array, *,
          timings: dict | None = None, diagnostics: dict | None = None) -> train.Trained:
  """Unlearns ``forget_data`` with SCRUB; settings in ``config.scrub``.

  ``timings`` (if given) receives ``max_s``, ``min_s`` and ``compile_s`` (the first call for each
  batch shape), in seconds; ``diagnostics`` (if given) the last ``max_metrics`` and
  ``min_metrics``.
  """
  timings = {} if timings is None else timings
  dp = parallel.DataParallel(config.get("parallel", "mesh"))
  settings = method_settings(config, "scrub", default_scrub_config())
  f = lambda name: f"config.scrub.{name}"
  for name in ("epochs", "max_epochs"):
    check_count(f(name), settings[name])
  for name in ("learning_rate", "temperature"):
    check_positive(f(name), settings[name])
  for name in ("momentum", "weight_decay", "retain_ce_weight", "retain_kl_weight"):
    check_positive(f(name), settings[name], allow_zero=True)
  forget_batch_size = resolve_batch_size(f("forget_batch_size"), settings.forget_batch_size,
                                         config, dp.num_devices)
  retain_batch_size = resolve_batch_size(f("retain_batch_size"), settings.retain_batch_size,
                                         config, dp.num_devices)
  check_data(trained, forget_data, retain_data)

  rng = np.random.default_rng(seed_from_key(key))
  tx = make_scrub_optimizer(settings)
  params = host_copy(trained.state.params)
  state = dp.put_replicated(ScrubState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      teacher_params=host_copy(trained.state.params),
      teacher_batch_stats=host_copy(trained.state.batch_stats),
      batch_stats=host_copy(trained.state.batch_stats)))
  step_fn = dp.compile_step(make_scrub_step(trained.model, tx, settings, mean=trained.mean,
                                            std=trained.std))
  compiled: set = set()
  timings.setdefault("max_s", 0.0)
  timings.setdefault("min_s", 0.0)
  last = {}
  for epoch in range(settings.epochs):
    if epoch < settings.max_epochs:
      batches = (dp.put_batch(b) for b in _epoch_batches(rng, forget_data, forget_batch_size,
                                                         is_forget=True))
      state, last["max_metrics"] = run_phase_once_compiled(
          step_fn, state, batches, jax.random.key(0), "max_s", timings, compiled,
          compile_key=forget_batch_size)
    batches = (dp.put_batch(b) for b in _epoch_batches(rng, retain_data, retain_batch_size,
                                                       is_forget=False))
    state, last["min_metrics"] = run_phase_once_compiled(
        step_fn, state, batches, jax.random.key(0), "min_s", timings, compiled,
        compile_key=retain_batch_size)
  for metrics in last.values():
    check_finite(metrics, "scrub")
  if diagnostics is not None:
    diagnostics.update(last)
  state = dp.get_replicated(state)
  # Unless update_batch_stats, state.batch_stats are still the original's.
  return dataclasses.replace(
      trained, state=trained.state.replace(params=state.params, batch_stats=state.batch_stats))
