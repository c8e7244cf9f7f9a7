"""UNSIR (Tarun et al., IEEE TNNLS 2023): error-maximising noise, then impair and repair.

docs/method.md §3, as the SSD benchmark runs it:

1. **Noise.** For every forgotten label c, a batch of ``noise_batch_size`` input-space images N_c
   (normalised pixel space, initialised N(0, 1)) is optimised with θ frozen to *maximise* the
   model's error on c: minimise −CE(f(N_c), c) + λ·mean_i ‖N_c,i‖², Adam 0.1, 25 steps (250 for
   sub-class forgetting, where the model must learn to separate a fine class from its own
   superclass).
2. **Impair.** One epoch of CE on the noise, labelled c (``noise_repeats`` copies of the noise
   batch, as SSD's code feeds 80 noise batches), shuffled with up to ``retain_per_class`` retain
   images of every retained label. Fitting c to inputs built to be the least like c wrecks the
   weights that carry c.
3. **Repair.** One epoch of CE on the same retain images. Adam 1e-4 for both, batches of 32
   (impair) and 128 (repair) as in SSD's code.

How much the impair epoch is noise depends on the data: a 10-class run (CIFAR-10, Fashion-MNIST)
sees 2,560 noise images among 4,500 retain images, a CIFAR-100 run among 49,500. (SSD's
``UNSIR_create_noisy_loader`` loops ``range(batch[0].size(0))``, the *channel* count, so it
actually feeds 3 noise rows per noise batch, 240 in all on CIFAR; we follow the description, 80
whole batches.)

On a tiny retain set the recipe's noise share dominates the impair epoch: on digits (1,291
retain images) the 2,560 noise images labelled with the forget class teach the model to answer it
everywhere, so the digits test sets its own noise share and learning rates (docs/tuning.md).

In the random scenario (and when several classes are forgotten) the forget set spans several
labels; each gets its own noise batch (SSD's description is class-wise; this is our extension),
and each batch is copied ceil(noise_repeats / labels) times, so that the impair epoch holds about
noise_repeats noise batches whatever the number of labels: noise stays the share of the epoch that
it is in SSD's single-class runs instead of drowning the retain images.

Sub-class forgetting: ``retain_per_class`` applies to the task (super)class labels that
:class:`UnlearnData` carries, not to SSD's fine classes (500 per fine class, 2,500 per CIFAR-20
superclass): set it to 2500 there to match SSD's retain count.

Every phase is a pure, jitted, data-parallel step on one :class:`UnsirState`. BatchNorm runs in
inference mode (as in MeGU): an impair batch of pure noise would otherwise move the running
statistics that every class is normalised with at test time.
"""
from __future__ import annotations

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
from megu_jax.unlearning.base import (UnlearnData, UnlearningInputError, balanced_subset,
                                      check_count, check_data, check_finite, check_positive,
                                      frozen_logits, host_copy, method_settings,
                                      resolve_batch_size, row_stream, run_phase,
                                      run_phase_once_compiled, seed_from_key, with_params)


def default_unsir_config() -> ml_collections.ConfigDict:
  """The SSD benchmark's UNSIR; attach as ``config.unsir`` to change a field."""
  c = ml_collections.ConfigDict()
  c.noise_batch_size = 32        # noise images per forgotten label
  c.noise_steps = 25             # Adam steps on the noise (full-class and random)
  c.noise_steps_sub_class = 250  # ... when config.scenario == "sub_class"
  c.noise_learning_rate = 0.1
  c.noise_weight = 0.1           # λ of λ·mean_i ‖N_i‖²
  c.noise_repeats = 80           # copies of the noise batch in the impair epoch, shared out
  #                                among the forgotten labels (see the module docstring)
  c.retain_per_class = 500       # retain images per retained label (impair and repair)
  c.impair_epochs = 1.0
  c.repair_epochs = 1.0
  c.impair_learning_rate = 1e-4  # Adam
  c.repair_learning_rate = 1e-4  # Adam
  c.impair_batch_size = 32       # SSD's code: the noise batch size; 0 = config.batch_size
  c.repair_batch_size = 128      # SSD's code; 0 = config.batch_size
  return c


@flax.struct.dataclass
class UnsirState:
  """Everything the two steps read and write; each phase updates its own part."""
  params: Any                    # θ (frozen in the noise phase)
  opt_state: Any                 # Adam of θ, learning rate inside (see make_adam); reset between
  #                                impair and repair, which each start a fresh Adam in SSD's code
  noise: jax.Array               # float32 [R, H, W, C]: rows c·noise_batch_size.. belong to label c
  noise_opt_state: Any
  batch_stats: Any               # frozen


def make_adam(learning_rate: float) -> optax.GradientTransformation:
  """Adam whose learning rate lives in its state, not in the program.

  Impair and repair differ only in learning rate: with the rate as data, both phases run one
  compiled step (one compilation when their batches have one shape).
  """
  return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate)


def _mean_squared_norm(noise: jax.Array) -> jax.Array:
  """mean_i ‖N_i‖² of a ``[B, H, W, C]`` batch."""
  return jnp.mean(jnp.sum(jnp.square(noise), axis=tuple(range(1, noise.ndim))))


def make_noise_step(model: nn.Module, noise_tx: optax.GradientTransformation, *,
                    noise_weight: float) -> parallel.StepFactory:
  """Factory of ``noise_step(state, batch, key) -> (state, metrics)``, θ frozen.

  ``batch``: ``noise_row`` int32 ``[B]`` (rows of ``state.noise``) and ``noise_label`` int32
  ``[B]`` (the forgotten label each row attacks). Metrics: ``forget_ce`` = CE(f(N), c).
  """

  def factory(axis_name: str | None):

    def noise_step(state: UnsirState, batch: dict, key: jax.Array):
      del key

      def loss_fn(noise_table):
        noise = noise_table[batch["noise_row"]]
        logits = frozen_logits(model, state.params, state.batch_stats, noise)
        forget_ce = train.cross_entropy(logits, batch["noise_label"])
        return -forget_ce + noise_weight * _mean_squared_norm(noise), forget_ce

      (loss, forget_ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.noise)
      # Each device's gradient is non-zero on its own rows only; the mean over devices is the
      # gradient of the global batch-mean loss.
      grads = parallel.cross_device_mean(grads, axis_name)
      updates, noise_opt_state = noise_tx.update(grads, state.noise_opt_state, state.noise)
      new_state = state.replace(noise=optax.apply_updates(state.noise, updates),
                                noise_opt_state=noise_opt_state)
      return new_state, parallel.cross_device_mean({"loss": loss, "forget_ce": forget_ce},
                                                   axis_name)
    return noise_step
  return factory


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *, mean,
                    std) -> parallel.StepFactory:
  """Factory of the impair/repair step: CE on a batch of images and noise rows, noise frozen.

  ``batch``: ``image`` uint8 ``[B, H, W, C]``, ``label`` int32 ``[B]``, ``is_noise`` bool ``[B]``
  and ``noise_row`` int32 ``[B]``: where ``is_noise``, the input is ``state.noise[noise_row]``
  instead of the (then blank) image. A repair batch has no noise.
  """

  def factory(axis_name: str | None):

    def unsir_train_step(state: UnsirState, batch: dict, key: jax.Array):
      del key
      images = train.prepare_images({"image": batch["image"]}, None, mean, std)
      noise = state.noise[batch["noise_row"]]
      inputs = jnp.where(batch["is_noise"].reshape((-1,) + (1,) * (images.ndim - 1)), noise,
                         images)

      def loss_fn(params):
        logits = frozen_logits(model, params, state.batch_stats, inputs)
        return train.cross_entropy(logits, batch["label"])

      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      grads = parallel.cross_device_mean(grads, axis_name)
      updates, opt_state = tx.update(grads, state.opt_state, state.params)
      new_state = state.replace(params=optax.apply_updates(state.params, updates),
                                opt_state=opt_state)
      return new_state, parallel.cross_device_mean({"loss": loss}, axis_name)
    return unsir_train_step
  return factory


def _noise_batches(noise_labels: np.ndarray, num_steps: int):
  """Every step sees the whole noise table, as SSD's code optimises its one noise batch."""
  batch = {"noise_row": np.arange(len(noise_labels), dtype=np.int32),
           "noise_label": noise_labels.astype(np.int32)}
  for _ in range(num_steps):
    yield batch


def _train_batches(rng: np.random.Generator, retain_data: UnlearnData, retain_rows: np.ndarray,
                   noise_labels: np.ndarray, noise_repeats: int, batch_size: int,
                   epochs: float):
  """Shuffled batches of ``noise_repeats`` copies of every noise row plus the retain rows."""
  noise_pool = np.tile(np.arange(len(noise_labels)), noise_repeats)
  pool_size = len(noise_pool) + len(retain_rows)
  num_steps = math.ceil(epochs * pool_size / batch_size)
  image_shape = retain_data.images.shape[1:]
  for rows in row_stream(rng, pool_size, num_steps * batch_size).reshape(num_steps, batch_size):
    is_noise = rows < len(noise_pool)
    images = np.zeros((batch_size,) + image_shape, np.uint8)
    labels = np.empty(batch_size, np.int32)
    noise_row = np.zeros(batch_size, np.int32)
    noise_row[is_noise] = noise_pool[rows[is_noise]]
    labels[is_noise] = noise_labels[noise_row[is_noise]]
    retain = retain_rows[rows[~is_noise] - len(noise_pool)]
    images[~is_noise] = retain_data.images[retain]
    labels[~is_noise] = retain_data.labels[retain]
    yield {"image": images, "label": labels, "is_noise": is_noise, "noise_row": noise_row}


def unsir_settings(config: ml_collections.ConfigDict, dp: parallel.DataParallel
                   ) -> tuple[ml_collections.ConfigDict, tuple[int, int]]:
  """``config.unsir`` over the defaults, checked; and the resolved impair, repair batch sizes."""
  settings = method_settings(config, "unsir", default_unsir_config())
  f = lambda name: f"config.unsir.{name}"
  for name in ("noise_learning_rate", "impair_learning_rate", "repair_learning_rate"):
    check_positive(f(name), settings[name])
  for name in ("noise_weight", "impair_epochs", "repair_epochs"):
    check_positive(f(name), settings[name], allow_zero=True)
  for name in ("noise_steps", "noise_steps_sub_class", "noise_repeats"):
    check_count(f(name), settings[name])
  for name in ("noise_batch_size", "retain_per_class"):
    check_count(f(name), settings[name], minimum=1)
  if settings.noise_batch_size % dp.num_devices:
    raise UnlearningInputError(
        f"{f('noise_batch_size')}={settings.noise_batch_size} must be a multiple of the device "
        f"count ({dp.num_devices})")
  return settings, tuple(resolve_batch_size(f(name), settings[name], config, dp.num_devices)
                         for name in ("impair_batch_size", "repair_batch_size"))


def error_maximizing_noise(trained: train.Trained, forget_data: UnlearnData,
                           config: ml_collections.ConfigDict, key: jax.Array, *,
                           timings: dict | None = None,
                           dp: parallel.DataParallel | None = None
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """UNSIR's noise (step 1 alone) for every label of ``forget_data``, ``config.unsir``'s settings.

  Returns:
    initial_noise: float32 ``[R, H, W, C]``, the N(0, 1) start (normalised pixel space).
    noise: float32 ``[R, H, W, C]``, after the noise steps.
    noise_labels: int32 ``[R]``, the label each row attacks (R = labels × noise_batch_size).
  """
  timings = {} if timings is None else timings
  dp = dp or parallel.DataParallel(config.get("parallel", "mesh"))
  settings, _ = unsir_settings(config, dp)
  noise_labels = _noise_labels(forget_data, settings)
  state = _initial_state(trained, forget_data, noise_labels, settings, key, dp,
                         tx=optax.identity())
  initial = np.asarray(jax.device_get(dp.get_replicated(state).noise))
  state = _noise_phase(trained, state, noise_labels, _num_noise_steps(settings, config), settings,
                       dp, timings)
  return initial, np.asarray(jax.device_get(dp.get_replicated(state).noise)), noise_labels


def _noise_labels(forget_data: UnlearnData, settings) -> np.ndarray:
  """``noise_batch_size`` rows per distinct forget label, grouped by label."""
  return np.repeat(np.unique(forget_data.labels), settings.noise_batch_size).astype(np.int32)


def _num_noise_steps(settings, config) -> int:
  return int(settings.noise_steps_sub_class if config.get("scenario") == "sub_class"
             else settings.noise_steps)


def _initial_state(trained, forget_data, noise_labels, settings, key, dp, *,
                   tx) -> UnsirState:
  # Host copies: the steps donate their state, which must not be the caller's buffers.
  params = host_copy(trained.state.params)
  noise = np.asarray(jax.random.normal(key, (len(noise_labels),) + forget_data.images.shape[1:]),
                     np.float32)
  return dp.put_replicated(UnsirState(
      params=params, opt_state=tx.init(params), noise=noise,
      noise_opt_state=optax.adam(settings.noise_learning_rate).init(noise),
      batch_stats=host_copy(trained.state.batch_stats)))


def _noise_phase(trained, state, noise_labels, num_steps, settings, dp, timings) -> UnsirState:
  noise_tx = optax.adam(settings.noise_learning_rate)
  step_fn = dp.compile_step(make_noise_step(trained.model, noise_tx,
                                            noise_weight=settings.noise_weight))
  batches = (dp.put_batch(b) for b in _noise_batches(noise_labels, num_steps))
  state, _ = run_phase(step_fn, state, batches, jax.random.key(0), "noise_s", timings)
  return state


@register("unsir")
def unsir(trained: train.Trained, forget_data: UnlearnData, retain_data: UnlearnData,
          config: ml_collections.ConfigDict, key: jax.Array, *,
          timings: dict | None = None, diagnostics: dict | None = None) -> train.Trained:
  """Unlearns ``forget_data`` with UNSIR; settings in ``config.unsir``.

  ``timings`` (if given) receives ``noise_s``, ``impair_s``, ``repair_s`` and ``compile_s`` (the
  first call of each compiled step and batch shape), in seconds. ``diagnostics`` (if given) receives
  ``initial_noise`` and ``noise`` (float32 ``[R, H, W, C]``, normalised pixel space),
  ``noise_labels`` (int32 ``[R]``) and the last ``impair_metrics`` / ``repair_metrics``.
  """
  timings = {} if timings is None else timings
  dp = parallel.DataParallel(config.get("parallel", "mesh"))
  settings, (impair_batch_size, repair_batch_size) = unsir_settings(config, dp)
  check_data(trained, forget_data, retain_data)
  noise_key, batch_key = jax.random.split(key)
  rng = np.random.default_rng(seed_from_key(batch_key))

  noise_labels = _noise_labels(forget_data, settings)
  # Retain images: up to retain_per_class of every retained label (SSD's "500 per class").
  retain_rows = balanced_subset(rng, retain_data.labels, settings.retain_per_class)
  impair_tx = make_adam(settings.impair_learning_rate)
  state = _initial_state(trained, forget_data, noise_labels, settings, noise_key, dp,
                         tx=impair_tx)
  if diagnostics is not None:
    diagnostics["initial_noise"] = np.asarray(jax.device_get(dp.get_replicated(state).noise))
  state = _noise_phase(trained, state, noise_labels, _num_noise_steps(settings, config),
                       settings, dp, timings)

  train_step = dp.compile_step(make_train_step(trained.model, impair_tx, mean=trained.mean,
                                               std=trained.std))
  compiled: set = set()
  num_labels = len(noise_labels) // settings.noise_batch_size
  repeats_per_label = math.ceil(settings.noise_repeats / num_labels)
  batches = (dp.put_batch(b) for b in _train_batches(
      rng, retain_data, retain_rows, noise_labels, repeats_per_label, impair_batch_size,
      settings.impair_epochs))
  state, impair_metrics = run_phase_once_compiled(
      train_step, state, batches, jax.random.key(0), "impair_s", timings, compiled,
      compile_key=impair_batch_size)

  # A fresh Adam, its learning rate the repair one: same structure, so the same compiled step.
  repair_opt_state = dp.put_replicated(make_adam(settings.repair_learning_rate).init(
      host_copy(trained.state.params)))
  state = state.replace(opt_state=repair_opt_state)
  batches = (dp.put_batch(b) for b in _train_batches(
      rng, retain_data, retain_rows, noise_labels, 0, repair_batch_size, settings.repair_epochs))
  state, repair_metrics = run_phase_once_compiled(
      train_step, state, batches, jax.random.key(0), "repair_s", timings, compiled,
      compile_key=repair_batch_size)
  check_finite(impair_metrics, "unsir")
  check_finite(repair_metrics, "unsir")
  state = dp.get_replicated(state)
  if diagnostics is not None:
    diagnostics.update(noise=np.asarray(jax.device_get(state.noise)), noise_labels=noise_labels,
                       impair_metrics=impair_metrics, repair_metrics=repair_metrics)
  return with_params(trained, state.params)
