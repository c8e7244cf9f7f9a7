"""Finetune: keep training the original model on the retain set only (method.md section 3).

The weakest baseline: nothing pushes the forget set away; it fades only as far as catastrophic
forgetting carries it, so this baseline *under*-unlearns (high Df, MIA above Retrain's) unless it
runs long. SSD benchmark recipe (method.md): 5 epochs of SGD at lr 0.02 on D_r; momentum 0.9
and weight decay 5e-4 (method.md fixes neither) are the original recipe's, lr held constant.

The step is the original model's own supervised step (``train.make_train_step``: BatchNorm in
training mode, the recipe's augmentation), so finetuning is literally "more of the same training
on D_r". The helpers here -- reading ``config.<method>`` over a method's defaults, checking the
shared training fields, and running the supervised step over epochs of a labelled set -- are
shared by ``random_label`` and ``salun``, which are the same loop on other data and optimisers.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from megu_jax import parallel
from megu_jax import train
from megu_jax.unlearning import register
from megu_jax.unlearning.base import method_settings  # noqa: F401  (re-exported)
from megu_jax.unlearning.base import (UnlearnData, UnlearningInputError, check_choice,
                                      check_data, check_positive)
# The finetuning optimiser (sgd|adam, cosine|constant, coupled weight decay) and the phase timer
# that puts the first call's time into timings["compile_s"] are MeGU's; reused, not twinned.
from megu_jax.unlearning.megu import OPTIMIZERS, SCHEDULES, make_optimizer
from megu_jax.unlearning.base import run_phase

def default_finetune_config() -> ml_collections.ConfigDict:
  """method.md section 3 (SSD benchmark): 5 epochs of SGD, lr 0.02, on the retain set.

  Attach as ``config.finetune``. ``batch_size`` 0 means the original recipe's
  ``config.batch_size``.
  """
  c = ml_collections.ConfigDict()
  c.epochs = 5.0
  c.optimizer = "sgd"       # sgd | adam
  c.learning_rate = 0.02
  c.momentum = 0.9          # sgd only
  c.weight_decay = 5e-4
  c.schedule = "constant"   # constant | cosine (over all the method's steps)
  c.batch_size = 0          # 0 = config.batch_size
  c.augment = True          # use the recipe's config.augment (crop/flip) on the training images
  return c


# --- settings (shared by the finetuning-family baselines) --------------------------------------


def check_count(field: str, value, *, minimum: int = 0) -> None:
  """Raises unless ``value`` is an integer (not a bool) >= ``minimum``."""
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
    raise UnlearningInputError(f"{field}={value!r} must be an integer >= {minimum}")


def resolve_batch_size(field: str, batch_size: int, config: ml_collections.ConfigDict,
                       num_devices: int) -> int:
  """``batch_size`` (0 = the recipe's ``config.batch_size``), checked against the device count."""
  check_count(field, batch_size)
  resolved = batch_size or config.batch_size
  if resolved <= 0 or resolved % num_devices:
    source = field if batch_size else f"{field}=0 -> config.batch_size"
    raise UnlearningInputError(
        f"{source}={resolved} must be a positive multiple of the device count ({num_devices})")
  return int(resolved)


def validate_training_settings(name: str, settings: ml_collections.ConfigDict) -> None:
  """Checks the optimiser fields every finetuning-family method has (batch size: separately)."""
  f = lambda field: f"config.{name}.{field}"
  check_choice(f("optimizer"), settings.optimizer, OPTIMIZERS)
  check_choice(f("schedule"), settings.schedule, SCHEDULES)
  check_positive(f("epochs"), settings.epochs)
  check_positive(f("learning_rate"), settings.learning_rate)
  check_positive(f("momentum"), settings.momentum, allow_zero=True)
  check_positive(f("weight_decay"), settings.weight_decay, allow_zero=True)


def num_steps(epochs: float, num_examples: int, batch_size: int) -> int:
  """Steps of ``epochs`` passes over ``num_examples`` in whole batches of ``batch_size`` (>= 1)."""
  return max(1, math.ceil(epochs * (num_examples // batch_size)))


def host_copy(tree: Any) -> Any:
  """Fresh host buffers: steps donate their state, and the caller's ``Trained`` must survive."""
  return jax.tree.map(np.array, jax.device_get(tree))


def seed_from_key(key: jax.Array) -> int:
  """A host-side NumPy seed drawn from a JAX key (batch orders are host-side, as in train.fit)."""
  return int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))


def check_finite(metrics: dict | None, method: str) -> None:
  if metrics is not None and not np.isfinite(float(metrics["loss"])):
    raise train.NonFiniteLossError(
        f"{method}: the last step's loss is {float(metrics['loss'])}; lower "
        f"config.{method}.learning_rate")


# --- the supervised loop on a labelled set -------------------------------------------------------
def epoch_batches(data: UnlearnData, batch_size: int, steps: int, seed: int):
  """``steps`` batches ``{"image", "label", "index"}`` of shuffled epochs over ``data``.

  Each epoch is ``train.epoch_order(seed, epoch, N)`` cut into whole batches (the last partial
  batch is dropped, as in ``train.fit``, so every call has one shape: one compilation).
  """
  per_epoch = len(data) // batch_size
  for step in range(steps):
    epoch, offset = divmod(step, per_epoch)
    rows = train.epoch_order(seed, epoch, len(data))[offset * batch_size:(offset + 1) * batch_size]
    yield {"image": data.images[rows], "label": data.labels[rows], "index": data.indices[rows]}


def train_on(trained: train.Trained, data: UnlearnData, tx: optax.GradientTransformation, *,
             steps: int, batch_size: int, augment: bool, config: ml_collections.ConfigDict,
             key: jax.Array, timings: dict, phase: str = "finetune_s",
             dp: parallel.DataParallel | None = None
             ) -> tuple[train.Trained, dict | None]:
  """``steps`` supervised steps (the original recipe's step, ``tx`` as optimiser) on ``data``.

  Starts from ``trained``'s parameters and BatchNorm statistics (host copies, so ``trained``
  stays usable). Returns the new ``Trained`` and the last step's metrics (``loss``,
  ``accuracy``); ``timings`` receives ``compile_s`` and ``phase``.
  """
  if len(data) < batch_size:
    raise UnlearningInputError(
        f"batch size {batch_size} exceeds the {len(data)} examples to train on")
  dp = dp or parallel.DataParallel(config.get("parallel", "mesh"))
  augmentation = config.get("augment", None) if augment else None
  augmentation = augmentation or ml_collections.ConfigDict()
  step_fn = dp.compile_step(train.make_train_step(
      trained.model, tx, mean=trained.mean, std=trained.std,
      crop_padding=augmentation.get("crop_padding", 0), flip=bool(augmentation.get("flip", False))))
  params = host_copy(trained.state.params)
  state = dp.put_replicated(train.TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=host_copy(trained.state.batch_stats),
      opt_state=tx.init(params)))
  order_key, step_key = jax.random.split(key)
  batches = (dp.put_batch(b) for b in epoch_batches(data, batch_size, steps,
                                                     seed_from_key(order_key)))
  state, last_metrics = run_phase(step_fn, state, batches, step_key, phase, timings)
  state = dp.get_replicated(state)
  unlearned = trained.state.replace(params=state.params, batch_stats=state.batch_stats)
  return train.Trained(config=trained.config, model=trained.model, state=unlearned,
                       mean=trained.mean, std=trained.std), last_metrics


# --- the method ----------------------------------------------------------------------------------
@register("finetune")
def finetune(trained: train.Trained, forget_data: UnlearnData, retain_data: UnlearnData,
             config: ml_collections.ConfigDict, key: jax.Array, *,
             timings: dict | None = None) -> train.Trained:
  """Trains ``trained`` further on ``retain_data`` only; settings in ``config.finetune``.

  ``forget_data`` is not used (only checked to belong to the task). ``timings`` receives
  ``compile_s`` (first step) and ``finetune_s`` (the other steps), in seconds.
  """
  timings = {} if timings is None else timings
  dp = parallel.DataParallel(config.get("parallel", "mesh"))
  settings = method_settings(config, "finetune", default_finetune_config())
  validate_training_settings("finetune", settings)
  batch_size = resolve_batch_size("config.finetune.batch_size", settings.batch_size, config,
                                  dp.num_devices)
  check_data(trained, forget_data, retain_data, need_forget=False)
  steps = num_steps(settings.epochs, len(retain_data), batch_size)
  unlearned, last_metrics = train_on(
      trained, retain_data, make_optimizer(settings, steps), steps=steps, batch_size=batch_size,
      augment=settings.augment, config=config, key=key, timings=timings, dp=dp)
  check_finite(last_metrics, "finetune")
  return unlearned
