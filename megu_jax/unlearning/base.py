"""What the unlearning methods share: their data, signature, input checks and host-loop pieces.

An unlearning method is a function

    unlearn(trained, forget_data, retain_data, config, key, *, timings=None) -> unlearned

where ``trained`` is a :class:`megu_jax.train.Trained`, ``config`` is the *experiment* config (the
original model's recipe at top level: ``config.batch_size``, ``config.parallel``...; each method's
own settings under ``config.<method name>``), and ``timings``, when given, is a dict the method
fills with the wall time of its phases (seconds). The result is a new ``Trained`` with the same
model, normalisation and config.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import time
from typing import Any, Callable, Protocol, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

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


# --- the finetuning optimiser: MeGU's, shared by the finetuning-family baselines ----------------
FINETUNING_OPTIMIZERS = ("sgd", "adam")
FINETUNING_SCHEDULES = ("cosine", "constant")


def make_finetuning_optimizer(settings: ml_collections.ConfigDict, total_steps: int
                   ) -> optax.GradientTransformation:
  """The finetuning optimiser of θ."""
  if settings.schedule == "cosine":
    learning_rate = optax.cosine_decay_schedule(settings.learning_rate, max(1, total_steps))
  else:
    learning_rate = optax.constant_schedule(settings.learning_rate)
  if settings.optimizer == "sgd":
    opt = optax.sgd(learning_rate, momentum=settings.momentum or None)
  else:
    opt = optax.adam(learning_rate)
  # Clipping guards against a confident original model: a ỹ it finds near-impossible gives a
  # cross-entropy of ~20 and gradients that momentum SGD turns into NaN within a few steps.
  max_grad_norm = settings.get("max_grad_norm", 0.0)  # baselines share this optimiser
  clip = optax.clip_by_global_norm(max_grad_norm) if max_grad_norm > 0 else optax.identity()
  return optax.chain(clip, optax.add_decayed_weights(settings.weight_decay), opt)


def validate_training_settings(name: str, settings: ml_collections.ConfigDict) -> None:
  """Checks the optimiser fields every finetuning-family method has (batch size: separately)."""
  f = lambda field: f"config.{name}.{field}"
  check_choice(f("optimizer"), settings.optimizer, FINETUNING_OPTIMIZERS)
  check_choice(f("schedule"), settings.schedule, FINETUNING_SCHEDULES)
  check_positive(f("epochs"), settings.epochs)
  check_positive(f("learning_rate"), settings.learning_rate)
  check_positive(f("momentum"), settings.momentum, allow_zero=True)
  check_positive(f("weight_decay"), settings.weight_decay, allow_zero=True)


def finetuning_settings(config: ml_collections.ConfigDict, name: str,
                        defaults: ml_collections.ConfigDict, num_devices: int
                        ) -> tuple[ml_collections.ConfigDict, int]:
  """``config.<name>`` over ``defaults``, optimiser fields checked; and the resolved batch size.

  The set-up every finetuning-family method (``finetune``, ``random_label``, ``salun``,
  ``neggrad_plus``) starts with; its own fields it checks itself.
  """
  settings = method_settings(config, name, defaults)
  validate_training_settings(name, settings)
  batch_size = resolve_batch_size(f"config.{name}.batch_size", settings.batch_size, config,
                                  num_devices)
  return settings, batch_size


def num_steps(epochs: float, num_examples: int, batch_size: int) -> int:
  """Steps of ``epochs`` passes over ``num_examples`` in whole batches of ``batch_size`` (>= 1)."""
  return max(1, math.ceil(epochs * (num_examples // batch_size)))


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


@contextlib.contextmanager
def timed_apart_from_compilation(timings: dict | None, key: str):
  """Adds to ``timings[key]`` the block's wall time less the compilation it adds to
  ``timings["compile_s"]`` (nothing is recorded when ``timings`` is None)."""
  start = time.perf_counter()
  compile_before = 0.0 if timings is None else timings.get("compile_s", 0.0)
  yield
  if timings is not None:
    timings[key] = (timings.get(key, 0.0) + time.perf_counter() - start
                    - (timings.get("compile_s", 0.0) - compile_before))


def run_phase_once_compiled(step_fn: Callable, state, batches, key: jax.Array, timings_key: str,
                            timings: dict, compiled: set, compile_key: Any = None):
  """``run_phase`` for a step that may have run before: only its first call ever is compile_s.

  ``compiled`` holds the ``compile_key``s (default: the step function itself; add the batch
  shape when it varies) already called once; a phase that reuses one (a second epoch, a second
  importance pass) counts its first call as work, not compilation.
  """
  compile_key = step_fn if compile_key is None else compile_key
  if compile_key in compiled:
    phase = {}
    state, metrics = run_phase(step_fn, state, batches, key, timings_key, phase)
    timings[timings_key] = (timings.get(timings_key, 0.0) + phase.get("compile_s", 0.0)
                            + phase.get(timings_key, 0.0))
    return state, metrics
  compiled.add(compile_key)
  return run_phase(step_fn, state, batches, key, timings_key, timings)


def host_copy(tree: Any) -> Any:
  """Fresh host buffers: steps donate their state, and the caller's ``Trained`` must survive."""
  return jax.tree.map(np.array, jax.device_get(tree))


def replicated_train_state(trained: train.Trained, tx: optax.GradientTransformation,
                           dp: parallel.DataParallel) -> train.TrainState:
  """A fresh ``train.TrainState`` (step 0, ``tx`` initialised) of ``trained``, on ``dp``'s devices.

  Of host copies, so the steps may donate it while ``trained`` stays usable.
  """
  params = host_copy(trained.state.params)
  return dp.put_replicated(train.TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      batch_stats=host_copy(trained.state.batch_stats),
      opt_state=tx.init(params)))


def seed_from_key(key: jax.Array) -> int:
  """A host-side NumPy seed drawn from a JAX key (batch orders are host-side, as in train.fit)."""
  return int(jax.random.randint(key, (), 0, np.iinfo(np.int32).max))


def check_finite(metrics: dict | None, method: str) -> None:
  if metrics is not None and not np.isfinite(float(metrics["loss"])):
    raise train.NonFiniteLossError(
        f"{method}: the last step's loss is {float(metrics['loss'])}; lower "
        f"config.{method}.learning_rate")


# --- the model being unlearned -------------------------------------------------------------------
def with_params(trained: train.Trained, params: Any) -> train.Trained:
  """``trained`` with new parameters (BatchNorm statistics and everything else unchanged)."""
  return dataclasses.replace(trained, state=trained.state.replace(params=params))


def frozen_logits(model: nn.Module, params: Any, batch_stats: Any, images: jax.Array) -> jax.Array:
  """Logits ``[B, K]`` with BatchNorm in inference mode (running statistics read, not updated)."""
  logits, _, _ = train.apply_model(model, params, batch_stats, images, train=False)
  return logits


# --- retraining the stages after a frozen prefix ------------------------------------------------
def used_by_stages_after(model: nn.Module, params: Any, batch_stats: Any, start: str,
                         example_prefix: jax.Array) -> Any:
  """A pytree of bools like ``params``: True where a leaf is read by the stages after ``start``.

  Read off the traced computation (a leaf whose variable no operation uses is not read), so it
  holds for any model that takes ``from_activation``.
  """
  leaves, treedef = jax.tree.flatten(params)
  forward = lambda *flat: model.apply(
      {"params": jax.tree.unflatten(treedef, flat), "batch_stats": batch_stats},
      example_prefix, train=False, from_activation=start)[0]
  jaxpr = jax.make_jaxpr(forward)(*leaves).jaxpr
  read = {id(v) for eqn in jaxpr.eqns for v in eqn.invars}
  read |= {id(v) for v in jaxpr.outvars}
  return jax.tree.unflatten(treedef, [id(v) in read for v in jaxpr.invars])


def retrain_stages_after(trained: train.Trained, start: str, inputs: np.ndarray,
                         labels: np.ndarray, example_images: np.ndarray, *, epochs: int,
                         keys: Sequence[jax.Array], timings: dict | None = None) -> list[Any]:
  """θ₀'s parameters with the stages after ``start`` retrained from scratch on ``inputs``, once
  per key of ``keys``: one parameter tree per key, all trained together (vmapped) in one program.

  ``inputs`` are θ₀'s outputs of stage ``start`` (the frozen prefix) for the images labelled
  ``labels``; ``example_images``, any image(s) of the data set, for the model's initialisation.
  The later stages start from the model's own initialisation (each key's) and train for
  ``epochs`` epochs with the original recipe's optimiser, batch size and schedule, in an order
  drawn from the same key, BatchNorm in inference mode with θ₀'s statistics; every other
  parameter is θ₀'s. One device: the stages are small. The initialisation's and the first
  epoch's time (their compilation) go to ``timings["compile_s"]``.
  """
  recipe = copy.deepcopy(trained.config)
  with recipe.unlocked():
    recipe.epochs = int(epochs)  # the schedule spans these epochs
  batch_size = min(int(recipe.batch_size), len(labels))
  steps_per_epoch = len(labels) // batch_size
  tx = train.make_training_optimizer(recipe, steps_per_epoch)
  batch_stats = trained.state.batch_stats
  inputs = jnp.asarray(inputs)
  labels = jnp.asarray(labels, jnp.int32)
  leaves, treedef = jax.tree.flatten(trained.state.params)
  used = jax.tree.leaves(used_by_stages_after(trained.model, trained.state.params, batch_stats,
                                              start, inputs[:1]))
  example = train.prepare_images({"image": np.asarray(example_images[:1])}, None, trained.mean,
                                 trained.std)

  def fresh_stages(init_key):  # the retrained leaves only; θ₀'s prefix is shared, not copied
    fresh = jax.tree.leaves(trained.model.init(init_key, example, train=False)["params"])
    return [leaf for leaf, u in zip(fresh, used) if u]

  def full_params(stages):
    stages = iter(stages)
    return jax.tree.unflatten(treedef, [next(stages) if u else jnp.asarray(leaf)
                                        for leaf, u in zip(leaves, used)])

  def loss(stages, rows):
    logits = trained.model.apply({"params": full_params(stages), "batch_stats": batch_stats},
                                 inputs[rows], train=False, from_activation=start)[0]
    return train.cross_entropy(logits, labels[rows])

  def one_epoch(stages, opt_state, order):
    def body(carry, rows):
      stages, opt_state = carry
      updates, opt_state = tx.update(jax.grad(loss)(stages, rows), opt_state, stages)
      return (optax.apply_updates(stages, updates), opt_state), None
    (stages, opt_state), _ = jax.lax.scan(body, (stages, opt_state), order)
    return stages, opt_state

  def initial_state(init_keys):
    stages = jax.vmap(fresh_stages)(init_keys)
    return stages, jax.vmap(tx.init)(stages)

  split = [jax.random.split(key) for key in keys]
  orders = []
  for _, order_key in split:
    rng = np.random.default_rng(np.asarray(jax.random.key_data(order_key)).ravel().tolist())
    orders.append([rng.permutation(len(labels))[:steps_per_epoch * batch_size]
                   .reshape(steps_per_epoch, batch_size).astype(np.int32)
                   for _ in range(epochs)])
  orders = np.asarray(orders)  # [heads, epochs, steps, batch]
  epoch = jax.jit(jax.vmap(one_epoch))
  start_time = time.perf_counter()
  # The initialisation as one compiled program: run op by op, each of the model's initialisers
  # would compile on its own, seconds that no first call would count as compilation.
  stages, opt_state = jax.jit(initial_state)(jnp.stack([init_key for init_key, _ in split]))
  stages, opt_state = jax.block_until_ready(epoch(stages, opt_state, orders[:, 0]))
  if timings is not None:
    timings["compile_s"] = timings.get("compile_s", 0.0) + time.perf_counter() - start_time
  for e in range(1, epochs):
    stages, opt_state = epoch(stages, opt_state, orders[:, e])
  stages = jax.block_until_ready(stages)
  return [full_params([leaf[h] for leaf in stages]) for h in range(len(keys))]
