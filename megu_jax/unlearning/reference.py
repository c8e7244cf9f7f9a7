"""The two reference points every unlearning result is judged against (docs/method.md §3).

- ``original``: does nothing; the model that still knows the forget set.
- ``retrain``: the gold standard, a fresh model trained from scratch on the retain set only with
  the original recipe (the top level of the experiment config). Unlike SSD's code, which only
  resets the head, this retrains every layer.
"""
from __future__ import annotations

import dataclasses

import jax
import ml_collections
import numpy as np

from megu_jax import parallel
from megu_jax import train
from megu_jax.unlearning import register
from megu_jax.unlearning.base import UnlearnData, check_data


@register("original")
def original(trained: train.Trained, forget_data: UnlearnData, retain_data: UnlearnData,
             config: ml_collections.ConfigDict, key: jax.Array, *,
             timings: dict | None = None) -> train.Trained:
  """Returns ``trained`` unchanged (the identity: the upper bound on what is remembered)."""
  del forget_data, retain_data, config, key
  if timings is not None:
    timings["compile_s"] = 0.0
  return trained


@register("retrain")
def retrain(trained: train.Trained, forget_data: UnlearnData, retain_data: UnlearnData,
            config: ml_collections.ConfigDict, key: jax.Array, *,
            timings: dict | None = None) -> train.Trained:
  """Trains a fresh model of the same architecture on ``retain_data`` with ``config``'s recipe.

  Uses ``config.epochs``, ``config.batch_size``, the optimiser fields and ``config.augment``; the
  normalisation statistics of ``trained`` are kept so that both models see identical inputs.
  ``timings`` receives ``compile_s`` (first step) and ``train_s`` (the remaining steps). The loop
  is ``train.fit``, the one that trained the original, in memory (no checkpoints).
  """
  check_data(trained, forget_data, retain_data, need_forget=False)
  dp = parallel.DataParallel(config.get("parallel", "mesh"))
  dp.check_batch_size(config.batch_size)
  model = trained.model
  state, run = train.fit(config, model, retain_data.images, retain_data.labels,
                         np.arange(len(retain_data)), mean=trained.mean, std=trained.std,
                         key=key, dp=dp, desc="retrain")
  if timings is not None:
    timings.update(compile_s=run["compile_s"], train_s=run["time_s"])
  return dataclasses.replace(trained, state=state)
