"""What every unlearning method shares: its data, its signature, and input checks.

An unlearning method is a function

    unlearn(trained, forget_data, retain_data, config, key, *, timings=None) -> unlearned

where ``trained`` is a :class:`megu_jax.train.Trained`, ``config`` is the *experiment* config (the
original model's recipe at top level: ``config.batch_size``, ``config.parallel``...; each method's
own settings under ``config.<method name>``), and ``timings``, when given, is a dict the method
fills with the wall time of its phases (seconds). The result is a new ``Trained`` with the same
model, normalisation and config.
"""
from __future__ import annotations

import dataclasses
import math
import time
from typing import Protocol

import jax
import ml_collections
import numpy as np

from megu_jax import parallel
from megu_jax import train


class UnlearningInputError(ValueError):
  """The data or config handed to an unlearning method is unusable; the message says why."""


@dataclasses.dataclass(frozen=True)
class UnlearnData:
  """A set of training examples handed to an unlearning method.

  Attributes:
    images: uint8 ``[N, H, W, C]``.
    labels: int32 ``[N]``, the task labels (the superclass labels in sub-class forgetting).
    indices: int32 ``[N]``, positions in the training set: stable ids, so that per-sample noise
      rows and per-sample random draws do not depend on the order or batching of the data.
  """
  images: np.ndarray
  labels: np.ndarray
  indices: np.ndarray

  def __post_init__(self):
    images, labels, indices = (np.asarray(self.images), np.asarray(self.labels),
                               np.asarray(self.indices))
    if images.dtype != np.uint8 or images.ndim != 4:
      raise UnlearningInputError(
          f"UnlearnData.images must be uint8 [N, H, W, C], got {images.dtype} {images.shape}")
    for name, array in (("labels", labels), ("indices", indices)):
      if array.shape != (len(images),) or not np.issubdtype(array.dtype, np.integer):
        raise UnlearningInputError(
            f"UnlearnData.{name} must be integers of shape [{len(images)}] (one per image), got "
            f"{array.dtype} {array.shape}")
    object.__setattr__(self, "images", images)
    object.__setattr__(self, "labels", labels.astype(np.int32))
    object.__setattr__(self, "indices", indices.astype(np.int32))

  def __len__(self) -> int:
    return len(self.labels)

  @classmethod
  def from_positions(cls, images: np.ndarray, labels: np.ndarray,
                     positions: np.ndarray) -> "UnlearnData":
    """The examples at ``positions`` of a training set (``images``, ``labels``)."""
    positions = np.asarray(positions)
    return cls(images=images[positions], labels=labels[positions],
               indices=positions.astype(np.int32))


class UnlearnFn(Protocol):
  """The signature every registered method has."""

  def __call__(self, trained: train.Trained, forget_data: UnlearnData, retain_data: UnlearnData,
               config: ml_collections.ConfigDict, key: jax.Array, *,
               timings: dict | None = None) -> train.Trained:
    ...


def num_classes_of(trained: train.Trained) -> int:
  """K, read off the model (every model of megu_jax.models has ``num_classes``)."""
  return int(trained.model.num_classes)


def check_data(trained: train.Trained, forget_data: UnlearnData, retain_data: UnlearnData,
               *, need_forget: bool = True) -> None:
  """Fails early when the data cannot belong to ``trained``'s task; names the bad value."""
  num_classes = num_classes_of(trained)
  if need_forget and len(forget_data) == 0:
    raise UnlearningInputError("forget_data is empty: there is nothing to forget")
  if len(retain_data) == 0:
    raise UnlearningInputError("retain_data is empty")
  if len(forget_data) and forget_data.images.shape[1:] != retain_data.images.shape[1:]:
    raise UnlearningInputError(
        f"forget images {forget_data.images.shape[1:]} and retain images "
        f"{retain_data.images.shape[1:]} differ in shape")
  for name, data in (("forget_data", forget_data), ("retain_data", retain_data)):
    if len(data) and (data.labels.min() < 0 or data.labels.max() >= num_classes):
      raise UnlearningInputError(
          f"{name}.labels span [{data.labels.min()}, {data.labels.max()}] but the model has "
          f"{num_classes} classes: allowed [0, {num_classes})")


def method_settings(config: ml_collections.ConfigDict, name: str,
                    defaults: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.<name>`` over ``defaults``; an unknown field fails, listing the known ones."""
  given = config.get(name, None)
  if given is None:
    return defaults
  unknown = sorted(set(given.keys()) - set(defaults.keys()))
  if unknown:
    raise UnlearningInputError(
        f"config.{name} has unknown field(s) {unknown}; known fields: {sorted(defaults.keys())}")
  defaults.update(given)
  return defaults


def check_choice(field: str, value, allowed) -> None:
  """Raises UnlearningInputError unless ``value`` is one of ``allowed``."""
  if value not in allowed:
    raise UnlearningInputError(f"{field}={value!r} is not one of {tuple(allowed)}")


def check_positive(field: str, value, *, allow_zero: bool = False) -> None:
  ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool) \
      and np.isfinite(value) and (value >= 0 if allow_zero else value > 0)
  if not ok:
    raise UnlearningInputError(
        f"{field}={value!r} must be a finite number {'>= 0' if allow_zero else '> 0'}")


# --- shared by the methods' host loops ---------------------------------------------------------

def row_stream(rng: np.random.Generator, num_rows: int, count: int) -> np.ndarray:
  """``count`` row numbers: successive shuffles of ``range(num_rows)`` (repeats when count > N)."""
  epochs = math.ceil(count / num_rows)
  return np.concatenate([rng.permutation(num_rows) for _ in range(epochs)])[:count]


def balanced_subset(rng, labels: np.ndarray, per_class: int) -> np.ndarray:
  """Up to ``per_class`` random rows of every label present."""
  chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in np.unique(labels)]
  return np.sort(np.concatenate(chosen))


def run_phase(step_fn, state, batches, key, timings_key, timings):
  """Runs the steps; the first call's time (compilation) goes to compile_s, the rest to key."""
  start = time.perf_counter()
  metrics = None
  for i, batch in enumerate(batches):
    state, metrics = step_fn(state, batch, parallel.fold_in_step(key, i))
    if i == 0:
      jax.block_until_ready(metrics)
      timings["compile_s"] = timings.get("compile_s", 0.0) + time.perf_counter() - start
      start = time.perf_counter()
  state = jax.block_until_ready(state)
  timings[timings_key] = timings.get(timings_key, 0.0) + time.perf_counter() - start
  return state, (None if metrics is None else jax.device_get(metrics))
