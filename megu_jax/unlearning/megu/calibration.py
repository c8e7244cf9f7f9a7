"""MeGU's Retrain-free stopping rules, ``config.megu.calibration`` (docs/method.md §2.6).

How much finetuning a class needs differs from class to class: a class whose images the network
tells apart easily (Fashion-MNIST's trousers) is pushed far past where Retrain puts it by the
same number of steps that leaves a class close to its neighbours (shirts) short of it. A rule
replaces the fixed ``steps`` by a check, every ``calibration_every`` steps up to
``calibration_max_steps``, of the forgotten images' mean margin m = z_y − logsumexp_{j≠y} z_j
against a target that needs no Retrain model:

* ``non_member_margin``: after ``steps``, until the forgotten images' mean margin is at most that
  of unseen images of the same classes under the current model: no longer recognised as members.
* ``retained_head``: from the first check, until it is at most the margin a stand-in for Retrain
  gives them. The stand-in is the stages MeGU trains (those after ``freeze_through``), freshly
  initialised and trained with the original's own recipe on θ₀'s frozen-prefix outputs of the
  retained images only: a head that never saw the forgotten images, on the features they share
  with the rest. It costs a head's training, not a network's; with ``calibration_heads`` > 1 the
  target is the mean over that many heads, each from its own initialisation and data order.

Each rule records ``calibration_steps`` (steps taken), ``calibration_gap`` (the last mean margin
minus its target; ≤ 0 when the rule stopped on it) and, for ``retained_head``,
``calibration_target`` in ``timings``.
"""
from __future__ import annotations

import itertools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from megu_jax import parallel
from megu_jax import train
from megu_jax.unlearning.base import (UnlearnData, retrain_stages_after,
                                      run_phase_once_compiled, timed_apart_from_compilation)
from megu_jax.unlearning.megu.steps import make_margin_fn

CALIBRATIONS = ("none", "non_member_margin", "retained_head")


def margin_inputs(trained: train.Trained, settings, dp, data: UnlearnData,
                  prefix: np.ndarray | None, timings) -> np.ndarray:
  """What :func:`make_margin_fn` reads for ``data``: the frozen prefix's output (θ₀'s, which
  finetuning does not change; computed here unless given) or the normalised images."""
  if settings.freeze_through:
    if prefix is None:
      prefix = train.predict(trained, data.images, 1000, dp, timings,
                             (settings.freeze_through,))[settings.freeze_through]
    return prefix
  return np.asarray(train.prepare_images({"image": data.images}, None, trained.mean, trained.std))


def retained_head_margins(trained: train.Trained, settings: ml_collections.ConfigDict,
                          retain_prefix: np.ndarray, retain_labels: np.ndarray,
                          scored_prefix: np.ndarray, scored_labels: np.ndarray,
                          example_images: np.ndarray, keys: list[jax.Array],
                          timings: dict | None = None) -> np.ndarray:
  """float64 [len(keys), N]: the margins of ``scored_prefix`` (labels ``scored_labels``) under
  one stand-in for Retrain per key (see the module docstring).

  ``retain_prefix`` / ``scored_prefix``: θ₀'s outputs of stage ``settings.freeze_through`` for the
  retained images and for the images to score; ``example_images``: any image(s) of the data set,
  for the model's initialisation. The stages after the prefix start from that initialisation
  (each key's) and train for ``settings.calibration_epochs`` epochs (0: the original's
  ``epochs``) with the original's optimiser, batch size and schedule, BatchNorm in inference
  mode with θ₀'s statistics as in MeGU's own steps (:func:`base.retrain_stages_after`, all heads
  in one program). The compilation's time goes to ``timings["compile_s"]``.
  """
  heads = retrain_stages_after(
      trained, settings.freeze_through, retain_prefix, retain_labels, example_images,
      epochs=int(settings.calibration_epochs or trained.config.epochs), keys=keys,
      timings=timings)
  margins = make_margin_fn(trained.model, settings, trained.state.batch_stats)
  inputs, labels = jnp.asarray(scored_prefix), jnp.asarray(scored_labels, jnp.int32)
  margins, first = first_call_timed(margins, (heads[0], inputs, labels), timings)
  return np.stack([np.asarray(first, np.float64)]
                  + [np.asarray(margins(params, inputs, labels), np.float64)
                     for params in heads[1:]])


def first_call_timed(fn, args: tuple, timings: dict | None):
  """``(jit(fn), jit(fn)(*args))``, the first call's time (its compilation, as
  ``unlearning.base.run_phase`` counts a step's first call) added to ``timings["compile_s"]``.
  An ``fn`` jitted already is used as it is, so that later calls find its compilation."""
  start = time.perf_counter()
  jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
  result = jax.block_until_ready(jitted(*args))
  if timings is not None:
    timings["compile_s"] = timings.get("compile_s", 0.0) + time.perf_counter() - start
  return jitted, result


def stopping_gap(trained: train.Trained, settings, dp, forget_data: UnlearnData,
                 retain_data: UnlearnData, retain_rows: np.ndarray,
                 forget_prefix: np.ndarray | None, non_members: UnlearnData | None, steps: int,
                 key: jax.Array, timings: dict):
  """``(gap(params) -> float, first check)`` of ``settings.calibration``: the forgotten images'
  mean margin minus its target, and after how many steps :func:`finetune_until` first checks it.
  ``forget_prefix``: θ₀'s frozen-prefix output of the forget images when already computed."""
  margins = make_margin_fn(trained.model, settings, trained.state.batch_stats)
  forget_inputs = jnp.asarray(margin_inputs(trained, settings, dp, forget_data, forget_prefix,
                                            timings))
  forget_labels = jnp.asarray(forget_data.labels)
  # Called once here, so that the checks' time leaves the compilation out.
  first_call_timed(margins, (trained.state.params, forget_inputs, forget_labels), timings)
  forget_mean = lambda params: float(jnp.mean(margins(params, forget_inputs, forget_labels)))
  if settings.calibration == "non_member_margin":
    unseen_inputs = jnp.asarray(margin_inputs(trained, settings, dp, non_members, None, timings))
    unseen_labels = jnp.asarray(non_members.labels)
    first_call_timed(margins, (trained.state.params, unseen_inputs, unseen_labels), timings)
    return (lambda params: forget_mean(params)
            - float(jnp.mean(margins(params, unseen_inputs, unseen_labels)))), steps
  with timed_apart_from_compilation(timings, "calibration_s"):
    retained = UnlearnData(retain_data.images[retain_rows], retain_data.labels[retain_rows],
                           retain_data.indices[retain_rows])
    retain_prefix = margin_inputs(trained, settings, dp, retained, None, timings)
    target = float(np.mean(stand_in_margins(
        trained, settings, retain_prefix, retained.labels, np.asarray(forget_inputs),
        forget_data.labels, forget_data.images[:1], key, timings)))
  timings["calibration_target"] = target
  return (lambda params: forget_mean(params) - target), settings.calibration_every


def stand_in_margins(trained: train.Trained, settings: ml_collections.ConfigDict,
                     retain_prefix: np.ndarray, retain_labels: np.ndarray,
                     scored_prefix: np.ndarray, scored_labels: np.ndarray,
                     example_images: np.ndarray, key: jax.Array,
                     timings: dict | None = None) -> np.ndarray:
  """float64 [N]: the margins of ``scored_prefix`` (labels ``scored_labels``) under the stand-in
  for Retrain, averaged over ``settings.calibration_heads`` heads (:func:`retained_head_margins`),
  each from its own initialisation and data order; the mean varies less between runs."""
  return np.mean(retained_head_margins(trained, settings, retain_prefix, retain_labels,
                                       scored_prefix, scored_labels, example_images,
                                       _head_keys(key, settings.calibration_heads), timings),
                 axis=0)


def _head_keys(key: jax.Array, heads: int) -> list[jax.Array]:
  """One key per stand-in head; the first is ``key`` itself, so one head is as before."""
  return [key] + [jax.random.fold_in(key, i) for i in range(1, int(heads))]


def finetune_until(settings: ml_collections.ConfigDict, dp: parallel.DataParallel,
                   finetune_step, state, batches, key: jax.Array, first_check: int,
                   max_steps: int, gap: Callable[[object], float], timings: dict):
  """Finetunes ``first_check`` steps, then ``calibration_every`` at a time, until
  ``gap(params) <= 0`` or ``max_steps``. Records ``calibration_steps`` and ``calibration_gap``."""
  compiled: set = set()
  done, last_metrics, current_gap = 0, None, float("nan")
  while done < max_steps:
    chunk = min(first_check if done == 0 else settings.calibration_every, max_steps - done)
    state, last_metrics = run_phase_once_compiled(
        finetune_step, state, itertools.islice(batches, chunk),
        parallel.fold_in_step(key, done), "finetune_s", timings, compiled)
    done += chunk
    start = time.perf_counter()
    current_gap = gap(dp.get_replicated(state).params)
    timings["calibration_s"] = timings.get("calibration_s", 0.0) + time.perf_counter() - start
    if current_gap <= 0.0:
      break
  timings.update(calibration_steps=float(done), calibration_gap=current_gap)
  return state, last_metrics
