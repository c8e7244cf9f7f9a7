"""Finetune: keep training the original model on the retain set only (docs/method.md §3).

The weakest baseline: nothing pushes the forget set away; it fades only as far as catastrophic
forgetting carries it, so this baseline *under*-unlearns (high Df, MIA above Retrain's) unless it
runs long. SSD benchmark recipe (docs/method.md): 5 epochs of SGD at lr 0.02 on D_r; momentum 0.9
and weight decay 5e-4 (docs/method.md fixes neither) are the original recipe's, lr held constant.

The step is the original model's own supervised step (``train.make_train_step``: BatchNorm in
training mode, the recipe's augmentation), so finetuning is literally "more of the same training
on D_r". The loop here -- the supervised step over epochs of a labelled set (:func:`train_on`) --
is shared by ``random_label`` and ``salun``, which are the same loop on other data and optimisers;
the settings checks and the optimiser (MeGU's) come from :mod:`.base`.
"""
from __future__ import annotations

import dataclasses

import jax
import ml_collections
import optax

from megu_jax import parallel
from megu_jax import train
from megu_jax.unlearning import register
from megu_jax.unlearning.base import (UnlearnData, UnlearningInputError, check_data, check_finite,
                                      finetuning_settings, make_finetuning_optimizer, num_steps,
                                      replicated_train_state, run_phase, seed_from_key)


def default_finetune_config() -> ml_collections.ConfigDict:
  """docs/method.md §3 (SSD benchmark): 5 epochs of SGD, lr 0.02, on the retain set.

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
  state = replicated_train_state(trained, tx, dp)
  order_key, step_key = jax.random.split(key)
  batches = (dp.put_batch(b) for b in epoch_batches(data, batch_size, steps,
                                                     seed_from_key(order_key)))
  state, last_metrics = run_phase(step_fn, state, batches, step_key, phase, timings)
  state = dp.get_replicated(state)
  unlearned = trained.state.replace(params=state.params, batch_stats=state.batch_stats)
  return dataclasses.replace(trained, state=unlearned), last_metrics


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
  settings, batch_size = finetuning_settings(config, "finetune", default_finetune_config(),
                                             dp.num_devices)
  check_data(trained, forget_data, retain_data, need_forget=False)
  steps = num_steps(settings.epochs, len(retain_data), batch_size)
  unlearned, last_metrics = train_on(
      trained, retain_data, make_finetuning_optimizer(settings, steps), steps=steps,
      batch_size=batch_size, augment=settings.augment, config=config, key=key, timings=timings, dp=dp)
  check_finite(last_metrics, "finetune")
  return unlearned
