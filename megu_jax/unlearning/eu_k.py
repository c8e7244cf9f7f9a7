"""EU-k: retrain the last stages from scratch on the retain set, the rest frozen (docs/method.md §3).

Goel et al. (2022, "Towards Adversarial Evaluation of Machine Unlearning") call it *exact
unlearning of the last k layers*: the stages after ``freeze_through`` are freshly initialised and
trained with the original's own recipe on θ₀'s outputs of the frozen prefix for the retained
images; the prefix keeps θ₀. Nothing of the forgotten images reaches the new stages, but the
prefix was trained on them, so what it still encodes of them stays.

It is also the stand-in for Retrain that MeGU's ``forget_target="retained_head_margin"`` and
``calibration="retained_head"`` read (:func:`megu_jax.unlearning.base.retrain_stages_after`):
set beside MeGU, it shows what MeGU adds to the stand-in's own outputs.
"""
from __future__ import annotations

import jax
import ml_collections

from megu_jax import parallel
from megu_jax import train
from megu_jax.unlearning import register
from megu_jax.unlearning.base import (UnlearnData, check_choice, check_count, check_data,
                                      method_settings, retrain_stages_after,
                                      timed_apart_from_compilation, with_params)


def default_eu_k_config() -> ml_collections.ConfigDict:
  """Attach as ``config.eu_k``: the stages after ``freeze_through`` are retrained for ``epochs``
  epochs (0: the original recipe's ``epochs``)."""
  c = ml_collections.ConfigDict()
  c.freeze_through = "block3"   # the small CNN's feature layer and head are retrained
  c.epochs = 0
  return c


@register("eu_k")
def eu_k(trained: train.Trained, forget_data: UnlearnData, retain_data: UnlearnData,
         config: ml_collections.ConfigDict, key: jax.Array, *,
         timings: dict | None = None) -> train.Trained:
  """θ₀ with the stages after ``config.eu_k.freeze_through`` retrained on ``retain_data`` only.

  ``forget_data`` is not used (only checked to belong to the task). ``timings`` receives
  ``compile_s`` (the prefix pass's and the first epoch's compilation) and ``train_s``.
  """
  timings = {} if timings is None else timings
  settings = method_settings(config, "eu_k", default_eu_k_config())
  names = tuple(trained.model.activation_names)
  check_choice("config.eu_k.freeze_through", settings.freeze_through, names)
  check_count("config.eu_k.epochs", settings.epochs)
  check_data(trained, forget_data, retain_data, need_forget=False)
  epochs = int(settings.epochs or trained.config.epochs)
  dp = parallel.DataParallel(config.get("parallel", "mesh"))
  prefix = train.predict(trained, retain_data.images, 1000, dp, timings,
                         (settings.freeze_through,))[settings.freeze_through]
  with timed_apart_from_compilation(timings, "train_s"):
    params, = retrain_stages_after(trained, settings.freeze_through, prefix, retain_data.labels,
                                   retain_data.images[:1], epochs=epochs, keys=[key],
                                   timings=timings)
  return with_params(trained, params)

