"""Bad Teacher (Chundawat et al., AAAI 2023): a student distils a competent and a random teacher.

docs/method.md §3: the student starts as a copy of the original model. On retain images it
matches the original (the *competent* teacher); on forget images it matches a randomly initialised
model of the same architecture (the *incompetent* teacher), which knows nothing about anything. The
loss is KL(teacher ‖ student) at temperature T = 1 over one epoch of D_f ∪ (30% of D_r), shuffled
together, Adam 1e-4.

The end of this module holds the distillation KL, which SCRUB shares with it and imports from
here.

As in MeGU, BatchNorm runs in inference mode (running statistics frozen, scale and bias trained):
half a batch of forget images would otherwise move the normalisation of every class. No
augmentation: the forget images must be the ones an attacker queries.
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
from megu_jax.unlearning.base import (UnlearnData, UnlearningInputError, check_data, check_finite,
                                      check_positive, frozen_logits, host_copy, method_settings,
                                      resolve_batch_size, row_stream, run_phase, seed_from_key,
                                      with_params)


def default_bad_teacher_config() -> ml_collections.ConfigDict:
  """The SSD benchmark's Bad Teacher; attach as ``config.bad_teacher`` to change a field."""
  c = ml_collections.ConfigDict()
  c.retain_fraction = 0.3   # share of D_r (drawn at random) distilled from the competent teacher
  c.epochs = 1.0            # passes over D_f ∪ retain subset
  c.learning_rate = 1e-4    # Adam
  c.temperature = 1.0       # T of the KL
  c.batch_size = 0          # 0 = the experiment's config.batch_size
  return c


@flax.struct.dataclass
class BadTeacherState:
  """Everything the step reads and writes, as pytrees."""
  step: jax.Array                # int32 scalar
  params: Any                    # the student, being unlearned
  opt_state: Any
  competent_params: Any          # the original model, frozen
  incompetent_params: Any        # a fresh random initialisation, frozen
  incompetent_batch_stats: Any
  batch_stats: Any               # the original's BatchNorm statistics, frozen (student and teacher)


def make_bad_teacher_step(model: nn.Module, tx: optax.GradientTransformation, *, mean, std,
                          temperature: float) -> parallel.StepFactory:
  """Factory of ``bad_teacher_step(state, batch, key) -> (state, metrics)``.

  ``batch``: ``image`` uint8 ``[B, H, W, C]`` and ``is_forget`` bool ``[B]`` (which teacher the
  example is distilled from).
  """

  def factory(axis_name: str | None):

    def bad_teacher_step(state: BadTeacherState, batch: dict, key: jax.Array):
      del key  # deterministic: no augmentation, no dropout
      images = train.prepare_images({"image": batch["image"]}, None, mean, std)
      competent = frozen_logits(model, state.competent_params, state.batch_stats, images)
      incompetent = frozen_logits(model, state.incompetent_params,
                                  state.incompetent_batch_stats, images)
      teacher_logits = jnp.where(batch["is_forget"][:, None], incompetent, competent)

      def loss_fn(params):
        student_logits = frozen_logits(model, params, state.batch_stats, images)
        return distillation_kl(teacher_logits, student_logits, temperature)

      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      grads = parallel.cross_device_mean(grads, axis_name)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      new_state = state.replace(step=state.step + 1,
                                params=optax.apply_updates(state.params, updates),
                                opt_state=opt_state)
      return new_state, parallel.cross_device_mean({"loss": loss}, axis_name)
    return bad_teacher_step
  return factory


def _pool_batches(rng: np.random.Generator, forget_data: UnlearnData, retain_data: UnlearnData,
                  retain_rows: np.ndarray, batch_size: int, num_steps: int):
  """Shuffled batches of the pool D_f ∪ retain_data[retain_rows], each with its ``is_forget``."""
  num_forget = len(forget_data)
  pool = row_stream(rng, num_forget + len(retain_rows), batch_size * num_steps)
  for rows in pool.reshape(num_steps, batch_size):
    is_forget = rows < num_forget
    images = np.empty((batch_size,) + forget_data.images.shape[1:], np.uint8)
    images[is_forget] = forget_data.images[rows[is_forget]]
    images[~is_forget] = retain_data.images[retain_rows[rows[~is_forget] - num_forget]]
    yield {"image": images, "is_forget": is_forget}


@register("bad_teacher")
def bad_teacher(trained: train.Trained, forget_data: UnlearnData, retain_data: UnlearnData,
                config: ml_collections.ConfigDict, key: jax.Array, *,
                timings: dict | None = None, diagnostics: dict | None = None) -> train.Trained:
  """Unlearns ``forget_data`` by distilling a random model on it; settings: ``config.bad_teacher``.

  ``timings`` (if given) receives ``distill_s`` and ``compile_s`` (first step), in seconds;
  ``diagnostics`` (if given) the ``incompetent_teacher`` (a ``Trained``) and the last step's
  ``metrics``.
  """
  timings = {} if timings is None else timings
  dp = parallel.DataParallel(config.get("parallel", "mesh"))
  settings = method_settings(config, "bad_teacher", default_bad_teacher_config())
  check_positive("config.bad_teacher.retain_fraction", settings.retain_fraction, allow_zero=True)
  if settings.retain_fraction > 1:
    raise UnlearningInputError(
        f"config.bad_teacher.retain_fraction={settings.retain_fraction} must be in [0, 1]")
  for name in ("epochs", "learning_rate", "temperature"):
    check_positive(f"config.bad_teacher.{name}", settings[name])
  batch_size = resolve_batch_size("config.bad_teacher.batch_size", settings.batch_size, config,
                                  dp.num_devices)
  check_data(trained, forget_data, retain_data)

  init_key, batch_key = jax.random.split(key)
  rng = np.random.default_rng(seed_from_key(batch_key))
  retain_rows = np.sort(rng.choice(len(retain_data),
                                   int(round(settings.retain_fraction * len(retain_data))),
                                   replace=False))
  num_steps = math.ceil(settings.epochs * (len(forget_data) + len(retain_rows)) / batch_size)
  tx = optax.adam(settings.learning_rate)
  # Eager, like train.create_train_state: the original's own init (training or restoring it)
  # has already compiled these small programs in this process; a jitted init would compile anew.
  incompetent = trained.model.init(
      init_key, jnp.zeros((1,) + forget_data.images.shape[1:], jnp.float32), train=False)
  # Host copies: the step donates its state, and the student and the competent teacher must be
  # distinct buffers that are not the caller's (``trained`` stays usable after the call).
  params = host_copy(trained.state.params)
  state = dp.put_replicated(BadTeacherState(
      step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
      competent_params=host_copy(trained.state.params),
      incompetent_params=host_copy(incompetent["params"]),
      incompetent_batch_stats=host_copy(incompetent.get("batch_stats", {})),
      batch_stats=host_copy(trained.state.batch_stats)))
  step_fn = dp.compile_step(make_bad_teacher_step(trained.model, tx, mean=trained.mean,
                                                  std=trained.std,
                                                  temperature=settings.temperature))
  batches = (dp.put_batch(b) for b in _pool_batches(rng, forget_data, retain_data, retain_rows,
                                                    batch_size, num_steps))
  state, last_metrics = run_phase(step_fn, state, batches, jax.random.key(0), "distill_s",
                                   timings)
  check_finite(last_metrics, "bad_teacher")
  if diagnostics is not None:
    diagnostics["incompetent_teacher"] = dataclasses.replace(
        trained, state=trained.state.replace(params=incompetent["params"],
                                             batch_stats=incompetent.get("batch_stats", {})))
    diagnostics["metrics"] = last_metrics
  return with_params(trained, dp.get_replicated(state).params)


# --- the distillation loss, shared with scrub ---------------------------------------------------
def distillation_kl_per_example(teacher_logits: jax.Array, student_logits: jax.Array,
                                temperature: float = 1.0) -> jax.Array:
  """KL(softmax(teacher / T) ‖ softmax(student / T)) ``[B]`` of logits ``[B, K]``."""
  teacher_log_probs = jax.nn.log_softmax(teacher_logits / temperature, axis=-1)
  student_log_probs = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  return jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)


def distillation_kl(teacher_logits: jax.Array, student_logits: jax.Array,
                    temperature: float = 1.0) -> jax.Array:
  """Batch mean of KL(softmax(teacher / T) ‖ softmax(student / T)); logits ``[B, K]``.

  The ``batchmean`` KL of PyTorch's ``F.kl_div`` that Bad Teacher and SCRUB use (SCRUB further
  multiplies by T², see :mod:`.scrub`).
  """
  return jnp.mean(distillation_kl_per_example(teacher_logits, student_logits, temperature))

