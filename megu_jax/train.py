"""Training a classifier: the train state, the pure steps, and the resumable training loop.

``train_step(state, batch, key) -> (state, metrics)`` and ``eval_step(state, batch) -> outputs`` are
pure; :class:`~megu_jax.parallel.DataParallel` compiles them for the device mesh (default) or pmap.
``train_and_evaluate(config, workdir)`` trains the original model (or, with ``config.retrain``, the
Retrain gold standard on the retain set only), checkpointing atomically and resuming where it
stopped. A batch is a dict: ``image`` uint8 ``[batch, height, width, channels]``, ``label`` int32
``[batch]`` and ``index`` int32 ``[batch]`` (the example's position in the training set, which seeds
its augmentation so that the result does not depend on how the batch is split over devices).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from megu_jax import augment
from megu_jax import checkpoints
from megu_jax import datasets
from megu_jax import distributed
from megu_jax import interruption
from megu_jax import io_utils
from megu_jax import models
from megu_jax import parallel
from megu_jax import splits

TRAINING_SCHEDULES = ("cosine", "step", "constant")

logger = logging.getLogger(__name__)


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training, as plain pytrees."""
  step: jax.Array        # int32 scalar
  params: Any
  batch_stats: Any       # BatchNorm running statistics ({} for models without BatchNorm)
  opt_state: Any


@dataclasses.dataclass(frozen=True)
class Trained:
  """A trained model ready for inference: what evaluation and unlearning methods start from."""
  config: ml_collections.ConfigDict
  model: nn.Module
  state: TrainState
  mean: np.ndarray       # float32 [channels], normalisation statistics of the training images
  std: np.ndarray


class NonFiniteError(FloatingPointError):
  """Training produced a NaN or infinity; ``step`` is where, ``checkpoint`` the last good one.

  ``checkpoint`` is the directory of the newest checkpoint saved before the fault (None when there
  is none): every checkpoint is checked before it is written, so it holds finite numbers only.
  """

  def __init__(self, message: str, step: int | None = None, checkpoint: str | None = None):
    super().__init__(message)
    self.step = step
    self.checkpoint = checkpoint


class NonFiniteLossError(NonFiniteError):
  """Training produced a NaN or infinite loss."""


class NonFiniteParamsError(NonFiniteError):
  """A parameter (or BatchNorm statistic, or optimizer moment) became NaN or infinite."""


def _last_good_checkpoint(ckpt) -> tuple[str | None, str]:
  """(directory of the newest checkpoint, words for a message) of a Checkpointer or None."""
  step = ckpt.latest_step() if ckpt is not None else None
  if step is None:
    return None, "none (the run stopped before its first checkpoint)"
  return ckpt.step_directory(step), f"step {step} in {ckpt.step_directory(step)}"


def check_finite_state(host_state: TrainState, step: int, ckpt=None) -> None:
  """Raises NonFiniteParamsError naming the first non-finite leaf of ``host_state``."""
  for path, leaf in jax.tree_util.tree_flatten_with_path(host_state)[0]:
    array = np.asarray(leaf)
    if np.issubdtype(array.dtype, np.inexact) and not np.all(np.isfinite(array)):
      directory, words = _last_good_checkpoint(ckpt)
      raise NonFiniteParamsError(
          f"non-finite values in {jax.tree_util.keystr(path)} after step {step}; last good "
          f"checkpoint: {words}", step=step, checkpoint=directory)


# --- optimizer ---------------------------------------------------------------------------------
def make_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int) -> optax.Schedule:
  total_steps = max(1, config.epochs * steps_per_epoch)
  if config.learning_rate <= 0:
    raise ValueError(f"config.learning_rate={config.learning_rate} must be positive")
  if config.schedule == "cosine":
    return optax.cosine_decay_schedule(config.learning_rate, total_steps)
  if config.schedule == "step":
    # Multiply by step_factor at each epoch in step_epochs (SSD's recipe: x0.2).
    boundaries = {int(e * steps_per_epoch): config.step_factor for e in config.step_epochs}
    return optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  if config.schedule == "constant":
    return optax.constant_schedule(config.learning_rate)
  raise ValueError(f"config.schedule={config.schedule!r} is not one of {TRAINING_SCHEDULES}")


def make_training_optimizer(config: ml_collections.ConfigDict, steps_per_epoch: int
                   ) -> optax.GradientTransformation:
  """SGD with momentum and (PyTorch-style, coupled) weight decay."""
  return optax.chain(
      optax.add_decayed_weights(config.weight_decay),
      optax.sgd(make_schedule(config, steps_per_epoch), momentum=config.momentum or None))


def create_train_state(model: nn.Module, tx: optax.GradientTransformation, key: jax.Array,
                       image_shape: tuple[int, int, int]) -> TrainState:
  variables = model.init(key, jnp.zeros((1,) + tuple(image_shape), jnp.float32), train=False)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get("batch_stats", {}), opt_state=tx.init(params))


# --- pure steps --------------------------------------------------------------------------------
def prepare_images(batch: dict, key: jax.Array | None, mean, std, crop_padding: int = 0,
                   flip: bool = False) -> jax.Array:
  """uint8 images -> normalised float32, augmented per example when ``key`` is given."""
  images = augment.normalize(batch["image"], mean, std)
  if key is not None and (crop_padding or flip):
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, batch["index"])
    images = augment.augment_batch(images, keys, crop_padding=crop_padding, flip=flip)
  return images


def apply_model(model: nn.Module, params, batch_stats, images, *, train: bool,
                from_activation: str | None = None):
  """Returns ``(logits, activations, new_batch_stats)``; BatchNorm statistics update when training."""
  variables = {"params": params, "batch_stats": batch_stats}
  if train and batch_stats:
    (logits, activations), updates = model.apply(
        variables, images, train=True, from_activation=from_activation, mutable=["batch_stats"])
    return logits, activations, updates["batch_stats"]
  logits, activations = model.apply(variables, images, train=train,
                                    from_activation=from_activation)
  return logits, activations, batch_stats


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def apply_gradients(state: TrainState, grads, tx: optax.GradientTransformation,
                    batch_stats=None) -> TrainState:
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                       opt_state=opt_state,
                       batch_stats=state.batch_stats if batch_stats is None else batch_stats)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, *, mean, std,
                    crop_padding: int = 0, flip: bool = False) -> parallel.StepFactory:
  """A factory of the supervised step; call it with the device axis name (None on the mesh)."""

  def factory(axis_name: str | None):
    step_model = model.clone(bn_axis_name=axis_name)

    def train_step(state: TrainState, batch: dict, key: jax.Array):
      images = prepare_images(batch, key, mean, std, crop_padding, flip)

      def loss_fn(params):
        logits, _, batch_stats = apply_model(step_model, params, state.batch_stats, images,
                                             train=True)
        return cross_entropy(logits, batch["label"]), (logits, batch_stats)

      (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
          state.params)
      grads = parallel.cross_device_mean(grads, axis_name)
      metrics = parallel.cross_device_mean(
          {"loss": loss, "accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])},
          axis_name)
      return apply_gradients(state, grads, tx, batch_stats), metrics

    return train_step
  return factory


def make_eval_step(model: nn.Module, *, mean, std,
                   activations: tuple[str, ...] = ()) -> parallel.StepFactory:
  """``eval_step(state, batch) -> {"logits": [batch, K], "features": [batch, D], ...}``.

  ``activations``: further intermediate activations to return, by name.
  """

  def factory(axis_name: str | None):
    del axis_name  # evaluation is per example: nothing to reduce across devices

    def eval_step(state: TrainState, batch: dict):
      images = prepare_images(batch, None, mean, std)
      logits, outputs, _ = apply_model(model, state.params, state.batch_stats, images,
                                        train=False)
      return {"logits": logits, "features": outputs["features"],
              **{name: outputs[name] for name in activations}}
    return eval_step
  return factory


# --- host-side data feeding ---------------------------------------------------------------------
def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """The shuffled order of one epoch, a function of (seed, epoch) only, so a resumed run agrees."""
  return np.random.default_rng([seed, epoch]).permutation(num_examples)


def local_batch(images: np.ndarray, labels: np.ndarray, indices: np.ndarray) -> dict:
  """This process's slice of the global batch ``indices`` (positions into images/labels)."""
  per_process = len(indices) // jax.process_count()
  mine = indices[jax.process_index() * per_process:(jax.process_index() + 1) * per_process]
  return {"image": images[mine], "label": labels[mine].astype(np.int32),
          "index": mine.astype(np.int32)}


def predict(trained: Trained, images: np.ndarray, batch_size: int = 1000,
            dp: parallel.DataParallel | None = None,
            timings: dict | None = None,
            activations: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
  """Logits ``[N, K]`` and penultimate features ``[N, D]`` of uint8 ``images`` ``[N, H, W, C]``.

  ``activations``: names of further intermediate activations to return (``[N, ...]`` each).

  ``timings`` (if given): when this call compiles the forward pass (the first for this model and
  batch shape in the process), its first batch's time goes to ``timings["compile_s"]``, as
  ``unlearning.base.run_phase`` counts a step's first call.
  """
  dp = dp or parallel.DataParallel(trained.config.get("parallel", "mesh"))
  batch_size = max(dp.num_devices, batch_size - batch_size % dp.num_devices)
  shape_key = (batch_size,) + tuple(np.shape(images)[1:])
  activations = tuple(activations)
  eval_fn, seen_shapes = _compiled_eval(trained.model, trained.mean, trained.std, dp,
                                        activations)
  compiles = timings is not None and shape_key not in seen_shapes
  state = dp.put_replicated(trained.state)
  outputs = {name: [] for name in ("logits", "features") + activations}
  n = len(images)
  for start in range(0, n, batch_size):
    chunk = images[start:start + batch_size]
    valid = len(chunk)
    if valid < batch_size:  # pad so that every call has one shape: one compilation
      chunk = np.concatenate([chunk, np.zeros((batch_size - valid,) + chunk.shape[1:],
                                              chunk.dtype)])
    batch = {"image": chunk, "label": np.zeros(batch_size, np.int32),
             "index": np.arange(batch_size, dtype=np.int32)}
    first_start = time.perf_counter()
    out = eval_fn(state, dp.put_batch(batch))
    if distributed.is_multi_process():
      # Each process fed and computed its rows only; every process gets them all, in order.
      out = distributed.gather_rows({k: out[k] for k in outputs})
    for k in outputs:
      outputs[k].append(np.asarray(out[k])[:valid])
    if compiles:
      timings["compile_s"] = timings.get("compile_s", 0.0) + time.perf_counter() - first_start
      compiles = False
    seen_shapes.add(shape_key)
  return {k: (np.concatenate(v) if v else np.zeros((0,))) for k, v in outputs.items()}


# (model, normalisation, devices, activations) -> (eval function, the batch shapes it compiled for)
_EVAL_CACHE: dict = {}


def _compiled_eval(model, mean, std, dp, activations=()):
  key = (model, tuple(np.asarray(mean).tolist()), tuple(np.asarray(std).tolist()), dp,
         activations)
  if key not in _EVAL_CACHE:
    _EVAL_CACHE[key] = (dp.compile_eval(make_eval_step(model, mean=mean, std=std,
                                                       activations=activations)), set())
  return _EVAL_CACHE[key]


# --- the training loop --------------------------------------------------------------------------
def training_labels_level(config: ml_collections.ConfigDict) -> str:
  """Sub-class forgetting trains on the coarse labels (the CIFAR-20 protocol); cifar20 always does."""
  return "coarse" if config.get("scenario") == "sub_class" or config.dataset == "cifar20" else "fine"


def load_config_dataset(config: ml_collections.ConfigDict) -> datasets.Dataset:
  """The data set of ``config``: its label level, and its fixed training subset when
  ``config.train_subset`` > 0 (``config.train_subset_seed`` picks it; every model of the recipe,
  original or Retrain, of any seed, trains on the same images)."""
  dataset = datasets.load_dataset(config.dataset, data_dir=config.get("data_dir") or None,
                                  label_level=training_labels_level(config))
  if config.get("train_subset", 0):
    dataset = datasets.training_subset(dataset, config.train_subset,
                                       config.get("train_subset_seed", 0))
  return dataset


def split_seed(config: ml_collections.ConfigDict) -> int:
  """The seed of the forget draw (random forgetting): ``config.split_seed``, or ``config.seed``
  when it is negative (each model seed then forgets its own draw)."""
  seed = config.get("split_seed", -1)
  return int(config.seed if seed is None or seed < 0 else seed)


def split_from_config(config: ml_collections.ConfigDict, dataset: datasets.Dataset
                      ) -> splits.ForgetSplit:
  if config.scenario == "random":  # forget_size samples; class names do not apply
    return splits.make_split(dataset, "random", forget_size=config.get("forget_size"),
                             seed=split_seed(config))
  forget = tuple(n.strip() for n in str(config.get("forget", "")).split(",") if n.strip())
  return splits.make_split(dataset, config.scenario, forget=forget, seed=split_seed(config))


def validate_config(config: ml_collections.ConfigDict, dp: parallel.DataParallel) -> None:
  """Fails before any compute, naming the field, the value and what is allowed."""
  for field in ("batch_size", "eval_batch_size"):
    dp.check_batch_size(config[field], field)
  for field in ("epochs", "checkpoint_every_steps", "log_every_steps"):
    if config[field] <= 0:
      raise ValueError(f"config.{field}={config[field]} must be positive")
  if config.learning_rate <= 0:
    raise ValueError(f"config.learning_rate={config.learning_rate} must be positive")
  if config.schedule not in TRAINING_SCHEDULES:
    raise ValueError(f"config.schedule={config.schedule!r} is not one of {TRAINING_SCHEDULES}")
  if config.model.name not in models.MODEL_NAMES:
    raise ValueError(f"config.model.name={config.model.name!r} is not one of {models.MODEL_NAMES}")
  if config.dataset not in datasets.DATASET_NAMES:
    raise ValueError(f"config.dataset={config.dataset!r} is not one of {datasets.DATASET_NAMES}")
  apply_debug_flags(config)


def apply_debug_flags(config: ml_collections.ConfigDict) -> None:
  """``config.debug_nans``: JAX checks outputs for NaNs and names the operation that made one.

  It reruns a function without jit on the first NaN, and :func:`fit` then also checks the state
  after every step, so it is for debugging only: the default checks (the loss of every step, every
  state before it is checkpointed) cost nothing measurable.
  """
  if config.get("debug_nans", False):
    jax.config.update("jax_debug_nans", True)


def fit(config: ml_collections.ConfigDict, model: nn.Module, images: np.ndarray,
        labels: np.ndarray, train_positions: np.ndarray, *, mean, std, key: jax.Array,
        dp: parallel.DataParallel | None = None, workdir: str | None = None,
        flip_ok: bool = True, stop_after_steps: int | None = None, desc: str = "train",
        stop: interruption.StopRequest | None = None) -> tuple[TrainState | None, dict]:
  """The training loop: ``config``'s recipe on ``images[train_positions]`` from a fresh init.

  With a ``workdir`` it checkpoints every ``config.checkpoint_every_steps`` steps (atomically),
  resumes from the last checkpoint and logs to ``metrics.jsonl``; without one it runs in memory
  (the ``retrain`` unlearning method uses that). Returns the final state (first device) and
  ``{"time_s", "compile_s", "steps", "images_per_s"}``; ``(None, {"stopped_at_step": s})`` when
  ``stop_after_steps`` ends it early, as an interruption would (for tests of resumption).

  When ``stop`` is requested (a SIGTERM, see :mod:`megu_jax.interruption`) the loop finishes the
  current step, checkpoints it and raises :class:`~megu_jax.interruption.Interrupted`. A damaged
  checkpoint is moved aside with a warning and the previous one is resumed. A non-finite loss or
  state raises :class:`NonFiniteError` naming the step and the last good checkpoint: a state is
  checked before it is checkpointed, so every checkpoint is finite.
  """
  dp = dp or parallel.DataParallel(config.get("parallel", "mesh"))
  steps_per_epoch = len(train_positions) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the {len(train_positions)} "
                     "training examples")
  total_steps = config.epochs * steps_per_epoch
  tx = make_training_optimizer(config, steps_per_epoch)
  init_key, train_key = jax.random.split(key)
  state = create_train_state(model, tx, init_key, images.shape[1:])

  ckpt = None
  start_step, elapsed_s = 0, 0.0
  if workdir is not None:
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    config.checkpoint_every_steps)
    restored = ckpt.restore_latest(state)
    if restored is not None:
      start_step, host_state, meta = restored
      state = jax.tree.map(jnp.asarray, host_state)
      elapsed_s = float(meta.get("elapsed_s", 0.0))
  resumed_elapsed_s = elapsed_s
  log = MetricsLog(os.path.join(workdir, "metrics.jsonl") if workdir else None,
                   keep_up_to_step=start_step)

  # jax_debug_nans alone did not catch this step's NaNs (jax 0.10.2, measured: its post-call
  # check never ran for the jitted step), so config.debug_nans also checks the state every step.
  debug_nans = bool(config.get("debug_nans", False))
  augmentation = config.get("augment", ml_collections.ConfigDict())
  step_fn = dp.compile_step(make_train_step(
      model, tx, mean=mean, std=std, crop_padding=augmentation.get("crop_padding", 0),
      flip=bool(augmentation.get("flip", False)) and flip_ok))
  state = dp.put_replicated(state)

  end_step = total_steps if stop_after_steps is None else min(total_steps, stop_after_steps)
  pending = None  # previous step's metrics, fetched one step late so the host never blocks
  compile_s = 0.0
  window_start, window_images = time.perf_counter(), 0
  bar = tqdm.tqdm(total=total_steps, initial=start_step, desc=desc, unit="step",
                  dynamic_ncols=True,
                  disable=not config.get("progress", True) or not distributed.is_primary())
  # Several processes stop after the same step, whichever of them got the signal.
  stop_vote = (distributed.StopVote() if stop is not None and distributed.is_multi_process()
               else None)
  last_time = time.perf_counter()
  for step in range(start_step, end_step):
    epoch, offset = divmod(step, steps_per_epoch)
    order = epoch_order(config.seed, epoch, len(train_positions))
    positions = train_positions[order[offset * config.batch_size:(offset + 1) * config.batch_size]]
    batch = dp.put_process_batch(local_batch(images, labels, positions))
    state, metrics = step_fn(state, batch, parallel.fold_in_step(train_key, step))
    if debug_nans:  # the exact step, at the cost of a host sync per step
      check_finite_state(jax.device_get(dp.get_replicated(state)), step + 1, ckpt)
    if step == start_step:
      # The first call compiles: time it apart so that time_s measures training alone.
      jax.block_until_ready(metrics)
      compile_s = time.perf_counter() - last_time
      last_time = window_start = time.perf_counter()
    else:  # the logged rate, too, counts only the images of the steps its clock saw
      window_images += config.batch_size
    if pending is not None and _log_step(pending, log, bar, config, ckpt, window_start,
                                         window_images):
      window_start, window_images = time.perf_counter(), 0
    pending = (step, metrics)
    now = time.perf_counter()
    elapsed_s += now - last_time
    last_time = now
    stopping = stop is not None and stop.requested
    if stop_vote is not None:
      stopping = stop_vote.agreed(stopping)
    if ckpt is not None and ((step + 1) % config.checkpoint_every_steps == 0
                             or step + 1 == end_step or stopping):
      # This step's loss and state are checked before they are kept: every checkpoint is good.
      if _log_step(pending, log, bar, config, ckpt, window_start, window_images,
                   force=step + 1 == end_step):
        window_start, window_images = time.perf_counter(), 0
      pending = None
      host_state = jax.device_get(dp.get_replicated(state))
      check_finite_state(host_state, step + 1, ckpt)
      ckpt.save(step + 1, host_state, {"elapsed_s": elapsed_s}, force=True)
    bar.update(1)
    if stopping:
      bar.close()
      where = f"checkpoint saved in {ckpt.step_directory(step + 1)}" if ckpt else "nothing saved"
      # A process that got no signal itself stops with the one that did, as if sent SIGTERM.
      signum = stop.signum if stop.requested else signal.SIGTERM
      by = (interruption.signal_name(signum) if stop.requested
            else "a stop signal to another process")
      raise interruption.Interrupted(
          f"stopped by {by} after step {step + 1} of {total_steps}; {where}: run the same "
          "command again to resume", signum)
  if pending is not None:
    _log_step(pending, log, bar, config, ckpt, window_start, window_images, force=True)
  bar.close()
  if ckpt is not None:
    ckpt.close()
  if end_step < total_steps:
    return None, {"stopped_at_step": end_step}
  final_state = dp.get_replicated(state)
  if ckpt is None:  # a checkpointed run checked its final state before saving it
    check_finite_state(jax.device_get(final_state), total_steps)
  # The rate of this process's timed steps: elapsed_s also holds earlier runs' time (resumed)
  # and the clock starts after the first, compiling step.
  timed_steps = max(total_steps - start_step - 1, 0)
  return final_state, {
      "time_s": elapsed_s, "compile_s": compile_s, "steps": total_steps,
      "images_per_s": timed_steps * config.batch_size / max(elapsed_s - resumed_elapsed_s, 1e-9)}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       dataset: datasets.Dataset | None = None,
                       stop_after_steps: int | None = None) -> dict:
  """Trains (or resumes) the model of ``config`` in ``workdir``; returns the final metrics.

  ``stop_after_steps`` ends the run early *as if interrupted* (after checkpointing), for tests of
  resumption. Writes ``config.json``, ``model_info.json``, ``metrics.jsonl``, ``checkpoints/`` and
  ``final_metrics.json``; a Retrain run also writes its split's index files under ``split/``.
  A finished run (``final_metrics.json`` present) is not redone. A SIGTERM or Ctrl-C stops it after
  the current step with a checkpoint (:class:`~megu_jax.interruption.Interrupted`).
  """
  dp = parallel.DataParallel(config.get("parallel", "mesh"))
  validate_config(config, dp)  # before the data set is read: a bad field fails in milliseconds
  dataset = dataset or load_config_dataset(config)
  train_positions, final = prepare_workdir(config, workdir, dataset, dp)
  if final is not None:
    return final
  model = models.create_model(config.model, dataset.num_classes)
  with interruption.deferred_stop_signals() as stop:
    state, info = fit(config, model, dataset.train_images, dataset.train_labels, train_positions,
                      mean=dataset.mean, std=dataset.std, key=jax.random.key(config.seed), dp=dp,
                      workdir=workdir, flip_ok=dataset.flip_ok, stop_after_steps=stop_after_steps,
                      desc="retrain" if config.get("retrain", False) else "train", stop=stop)
  if state is None:
    return info
  return write_final_metrics(config, workdir, model, state, dataset, train_positions, info, dp)


def prepare_workdir(config: ml_collections.ConfigDict, workdir: str, dataset: datasets.Dataset,
                    dp: parallel.DataParallel) -> tuple[np.ndarray, dict | None]:
  """Checks ``config``, then ``(training positions, final metrics)`` of ``workdir``.

  The final metrics are those of a finished run (nothing to do), else None: then ``workdir``
  holds the config, the model's description and, for Retrain, its split.
  """
  validate_config(config, dp)
  train_positions = np.arange(len(dataset.train_labels))
  split = None
  if config.get("retrain", False):
    split = split_from_config(config, dataset)  # validates the forget request before any work
    train_positions = split.retain_train
    _check_saved_split(split, os.path.join(workdir, "split"), dataset)
  final = _read_final_metrics(os.path.join(workdir, "final_metrics.json"))
  if final is not None:
    return train_positions, final
  os.makedirs(workdir, exist_ok=True)
  if split is not None:
    splits.save_split(split, os.path.join(workdir, "split"))
  io_utils.atomic_write_text(os.path.join(workdir, "config.json"),
                             config.to_json_best_effort(indent=2))
  io_utils.atomic_write_json(os.path.join(workdir, "model_info.json"), {
      "num_classes": dataset.num_classes, "class_names": list(dataset.class_names),
      "image_shape": list(dataset.image_shape), "mean": dataset.mean.tolist(),
      "std": dataset.std.tolist()})
  return train_positions, None


def write_final_metrics(config: ml_collections.ConfigDict, workdir: str, model: nn.Module,
                        state: TrainState, dataset: datasets.Dataset, train_positions: np.ndarray,
                        info: dict, dp: parallel.DataParallel) -> dict:
  """Test accuracy, accuracy on the model's own training set, and ``info``: final_metrics.json."""
  trained = Trained(config=config, model=model, state=state, mean=dataset.mean, std=dataset.std)
  test_logits = predict(trained, dataset.test_images, config.eval_batch_size, dp)["logits"]
  # Accuracy on the model's own training set: how far the recipe memorises it.
  train_logits = predict(trained, dataset.train_images[train_positions], config.eval_batch_size,
                         dp)["logits"]
  from megu_jax import ensemble_metrics  # noqa: PLC0415 (numpy only; kept off the import path)
  from megu_jax import metrics  # noqa: PLC0415 (scikit-learn: only once, at the end)
  train_targets = dataset.train_labels[train_positions]
  final = {"test_acc": float(np.mean(np.argmax(test_logits, -1) == dataset.test_labels)),
           "train_acc": float(np.mean(np.argmax(train_logits, -1) == train_targets)),
           # Members (its training images) against non-members (the test set), by a threshold on
           # the per-example margin: how much the model's confidence gives membership away.
           "margin_auc": metrics.membership_auc(
               ensemble_metrics.margins(train_logits, train_targets),
               ensemble_metrics.margins(test_logits, dataset.test_labels)),
           **info, "epochs": config.epochs, "train_examples": int(len(train_positions)),
           "devices": dp.num_devices, "parallel": dp.mode}
  io_utils.atomic_write_json(os.path.join(workdir, "final_metrics.json"), final)
  return final


def _read_final_metrics(path: str) -> dict | None:
  """A finished run's metrics; None when the run has not finished (or the file is damaged)."""
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      final = json.load(f)
    if not isinstance(final, dict) or "test_acc" not in final:
      raise ValueError("it holds no test_acc")
    return final
  except (ValueError, UnicodeDecodeError) as error:
    # Evaluating the final checkpoint again rewrites it; the training steps are not redone.
    logger.warning("%s is damaged (%s); evaluating the last checkpoint again", path, error)
    return None


def _check_saved_split(split: splits.ForgetSplit, directory: str,
                       dataset: datasets.Dataset) -> None:
  """A Retrain workdir's model was trained on its saved split: that split must be this one."""
  if not os.path.exists(os.path.join(directory, splits.SPLIT_FILE)):
    return
  saved = splits.load_split(directory, dataset)  # SplitFileError naming a damaged file
  for name in splits.INDEX_ARRAYS:
    if not np.array_equal(getattr(saved, name), getattr(split, name)):
      raise splits.SplitFileError(
          f"{directory} holds another split ({name} differs) than the config asks for; its model "
          "was trained on that one: use another workdir")


def _log_step(pending, log, bar, config, ckpt, window_start, window_images, force=False) -> bool:
  """Checks the previous step's loss; logs it when on the interval. Returns whether it logged."""
  step, metrics = pending
  metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
  if not math.isfinite(metrics["loss"]):
    directory, words = _last_good_checkpoint(ckpt)
    raise NonFiniteLossError(
        f"non-finite loss {metrics['loss']} at step {step + 1}; last good checkpoint: {words}",
        step=step + 1, checkpoint=directory)
  if force or (step + 1) % config.log_every_steps == 0:
    rate = window_images / max(time.perf_counter() - window_start, 1e-9)
    log.write({"step": step + 1, **metrics, "images_per_s": rate})
    bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.3f}",
                    img_s=f"{rate:.0f}")
    return True
  return False


class MetricsLog:
  """Append-only JSON lines; on resume, records after the restored step are dropped."""

  def __init__(self, path: str | None, keep_up_to_step: int = 0):
    self.path = path
    if path is None:  # an in-memory run logs nowhere
      return
    kept = []
    if os.path.exists(path):
      with open(path) as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
          if record.get("step", 0) <= keep_up_to_step:
            kept.append(line if line.endswith("\n") else line + "\n")
    io_utils.atomic_write_text(path, "".join(kept))

  def write(self, record: dict) -> None:
    if self.path is None or jax.process_index() != 0:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")


def restore_trained(workdir: str) -> Trained:
  """The final state of a finished ``train_and_evaluate`` run in ``workdir``.

  Raises:
    CheckpointError: naming the checkpoint, when the final one is missing or damaged.
  """
  paths = {name: os.path.join(workdir, name) for name in ("config.json", "model_info.json")}
  for path in paths.values():
    if not os.path.exists(path):
      raise FileNotFoundError(f"{path} does not exist: is {workdir!r} a training workdir?")
  with open(paths["config.json"]) as f:
    config = ml_collections.ConfigDict(json.load(f))
  with open(paths["model_info.json"]) as f:
    info = json.load(f)
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                  config.checkpoint_every_steps)
  step = ckpt.latest_step()
  if step is None:
    raise FileNotFoundError(f"no checkpoint under {ckpt.directory}")
  final = _read_final_metrics(os.path.join(workdir, "final_metrics.json"))
  if final is not None and "steps" in final and step != final["steps"]:
    raise checkpoints.CheckpointError(
        f"the final checkpoint {ckpt.step_directory(final['steps'])} of {workdir} is missing "
        f"(the newest is step {step})")
  model = models.create_model(config.model, info["num_classes"])
  # The optimizer's state structure does not depend on the schedule's length: any steps_per_epoch.
  abstract = create_train_state(model, make_training_optimizer(config, 1), jax.random.key(0),
                                tuple(info["image_shape"]))
  try:
    host_state, _ = ckpt.restore(step, abstract)
  finally:
    ckpt.close()
  return Trained(config=config, model=model, state=jax.tree.map(jnp.asarray, host_state),
                 mean=np.asarray(info["mean"], np.float32), std=np.asarray(info["std"], np.float32))


def train_and_restore(config: ml_collections.ConfigDict, workdir: str,
                      dataset: datasets.Dataset | None = None) -> tuple[Trained, dict]:
  """:func:`train_and_evaluate`, then the trained model and its final metrics.

  A damaged final checkpoint is not trusted: it is moved aside (saying so), and the last steps are
  trained again from the previous checkpoint, which gives the same state (the data order and the
  step keys are functions of the step).
  """
  final = train_and_evaluate(config, workdir, dataset)
  try:
    return restore_trained(workdir), final
  except checkpoints.CheckpointError as error:
    ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    config.checkpoint_every_steps)
    moved = ""
    if os.path.isdir(ckpt.step_directory(final["steps"])):
      moved = f"; moved it to {ckpt.quarantine(final['steps'])}"
    ckpt.close()
    logger.warning("%s%s; training the last steps again from the previous checkpoint", error,
                   moved)
  io_utils.remove_file(os.path.join(workdir, "final_metrics.json"))
  final = train_and_evaluate(config, workdir, dataset)
  return restore_trained(workdir), final
