"""Several models of one recipe trained at once, over a ``models`` axis.

``train_group(configs, workdirs, dataset)`` trains one model per config (the configs differ only
in ``seed``: initialisation and data order; one training set) in a single jitted step
``jax.vmap``-ed over a leading models axis, spread over the local devices when their count
divides the number of models (each device then trains whole models; no gradient crosses devices).
Every model gets exactly the keys, batches and learning rates that :func:`megu_jax.train.fit`
would give it alone, and its own workdir with the same files (checkpoints at the same steps,
``metrics.jsonl``, ``final_metrics.json``), so a model trained either way is reused alike; the
two agree to float rounding (a test bounds it on digits).

Which is faster depends on the backend: on XLA:CPU the batched convolutions become grouped
convolutions, which are slow (``experiments.bench_ensemble_training`` measures it); on
accelerators small models usually gain. ``config.ensemble_training`` chooses.
"""
from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from megu_jax import checkpoints
from megu_jax import datasets
from megu_jax import models
from megu_jax import parallel
from megu_jax import train

TRAINING_MODES = ("sequential", "vmap")
MODELS_AXIS = "models"


def _check_group(configs: list[ml_collections.ConfigDict]) -> None:
  """The models of a group must share everything but the seed."""
  first = {k: v for k, v in configs[0].items() if k != "seed"}
  for config in configs[1:]:
    other = {k: v for k, v in config.items() if k != "seed"}
    if other != first:
      differing = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
      raise ValueError(f"models trained together must differ only in seed; these differ in "
                       f"{differing}")


def _models_sharding(num_models: int) -> NamedSharding | None:
  devices = jax.local_devices()
  if len(devices) > 1 and num_models % len(devices) == 0:
    return NamedSharding(Mesh(np.asarray(devices), (MODELS_AXIS,)), PartitionSpec(MODELS_AXIS))
  return None


def _stack(trees):
  return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def _unstack(tree, i):
  return jax.tree.map(lambda x: np.asarray(x[i]), tree)


def train_group(configs: list[ml_collections.ConfigDict], workdirs: list[str],
                dataset: datasets.Dataset) -> list[dict]:
  """Trains (or resumes) every model of the group; returns their final metrics.

  Models whose workdir already holds a finished run are not trained again; the others resume
  from the newest checkpoint they all have.
  """
  _check_group(configs)
  dp = parallel.DataParallel("mesh", devices=(jax.local_devices()[0],))
  prepared = [train.prepare_workdir(c, w, dataset, dp) for c, w in zip(configs, workdirs)]
  todo = [i for i, (_, final) in enumerate(prepared) if final is None]
  finals = {i: final for i, (_, final) in enumerate(prepared) if final is not None}
  if todo:
    config = configs[todo[0]]
    positions = prepared[todo[0]][0]
    model = models.create_model(config.model, dataset.num_classes)
    states, infos = fit_group(config, model, dataset, positions,
                              seeds=[configs[i].seed for i in todo],
                              workdirs=[workdirs[i] for i in todo])
    for j, i in enumerate(todo):
      state = jax.tree.map(jnp.asarray, states[j])
      finals[i] = train.write_final_metrics(configs[i], workdirs[i], model, state, dataset,
                                            positions, infos[j], dp)
  return [finals[i] for i in range(len(configs))]


def _resume_step(checkpointers, abstract) -> tuple[int, list, list[float]]:
  """The newest step every model has a checkpoint of, and their states and times there."""
  steps = [set(c.all_steps()) for c in checkpointers]
  common = set.intersection(*steps) if steps else set()
  if not common:
    return 0, [abstract] * len(checkpointers), [0.0] * len(checkpointers)
  step = max(common)
  states, elapsed = [], []
  for ckpt in checkpointers:
    state, meta = ckpt.restore(step, abstract)
    states.append(state)
    elapsed.append(float(meta.get("elapsed_s", 0.0)))
  return step, states, elapsed


def fit_group(config: ml_collections.ConfigDict, model, dataset: datasets.Dataset,
              train_positions: np.ndarray, *, seeds: list[int], workdirs: list[str]
              ) -> tuple[list, list[dict]]:
  """``train.fit`` for ``len(seeds)`` models at once; returns their host states and infos.

  ``time_s`` of each model is the group's training time divided by the number of models (what
  one model cost), ``group_size`` says how many shared it.
  """
  num_models = len(seeds)
  steps_per_epoch = len(train_positions) // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"config.batch_size={config.batch_size} exceeds the {len(train_positions)} "
                     "training examples")
  total_steps = config.epochs * steps_per_epoch
  tx = train.make_training_optimizer(config, steps_per_epoch)
  init_keys, train_keys = zip(*(jax.random.split(jax.random.key(seed)) for seed in seeds))
  fresh = [jax.device_get(train.create_train_state(model, tx, k, dataset.image_shape))
           for k in init_keys]
  checkpointers = [checkpoints.Checkpointer(os.path.join(w, "checkpoints"),
                                            config.checkpoint_every_steps) for w in workdirs]
  start_step, restored, elapsed = _resume_step(checkpointers, fresh[0])
  states = fresh if start_step == 0 else restored
  logs = [train.MetricsLog(os.path.join(w, "metrics.jsonl"), keep_up_to_step=start_step)
          for w in workdirs]

  augmentation = config.get("augment", ml_collections.ConfigDict())
  step = train.make_train_step(model, tx, mean=dataset.mean, std=dataset.std,
                               crop_padding=augmentation.get("crop_padding", 0),
                               flip=bool(augmentation.get("flip", False)) and dataset.flip_ok)(None)

  def group_step(states, batches, keys, step_number):
    step_keys = jax.vmap(lambda k: jax.random.fold_in(k, step_number))(keys)
    return jax.vmap(step)(states, batches, step_keys)

  sharding = _models_sharding(num_models)
  put = (lambda tree: jax.device_put(tree, sharding)) if sharding else jax.device_put
  step_fn = jax.jit(group_step, donate_argnums=(0,))
  device_states = put(_stack(states))
  keys = put(jax.random.key_data(jnp.stack(train_keys)))
  keys = jax.random.wrap_key_data(keys)

  bar = tqdm.tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                  desc=f"train {num_models} at once", disable=not config.get("progress", True))
  compile_s, timed_s = 0.0, 0.0
  last = time.perf_counter()
  for step_number in range(start_step, total_steps):
    epoch, offset = divmod(step_number, steps_per_epoch)
    rows = [train_positions[train.epoch_order(seed, epoch, len(train_positions))[
        offset * config.batch_size:(offset + 1) * config.batch_size]] for seed in seeds]
    batches = _stack([train.local_batch(dataset.train_images, dataset.train_labels, r)
                      for r in rows])
    device_states, metrics = step_fn(device_states, put(batches), keys,
                                     jnp.uint32(step_number))
    if step_number == start_step:
      jax.block_until_ready(metrics)
      compile_s = time.perf_counter() - last
      last = time.perf_counter()
    done = step_number + 1
    if done % config.log_every_steps == 0 or done == total_steps:
      host_metrics = jax.device_get(metrics)
      for i, log in enumerate(logs):
        values = {k: float(v[i]) for k, v in host_metrics.items()}
        if not np.isfinite(values["loss"]):
          raise train.NonFiniteLossError(
              f"non-finite loss {values['loss']} at step {done} of the model of seed {seeds[i]}",
              step=done)
        log.write({"step": done, **values})
    now = time.perf_counter()
    timed_s += now - last
    last = now
    if done % config.checkpoint_every_steps == 0 or done == total_steps:
      host = jax.device_get(device_states)
      for i, ckpt in enumerate(checkpointers):
        member = _unstack(host, i)
        train.check_finite_state(member, done, ckpt)
        ckpt.save(done, member, {"elapsed_s": elapsed[i] + timed_s / num_models}, force=True)
    bar.update(1)
  bar.close()
  host = jax.device_get(device_states)
  for ckpt in checkpointers:
    ckpt.close()
  timed_steps = max(total_steps - start_step - 1, 0)
  infos = [{"time_s": elapsed[i] + timed_s / num_models, "compile_s": compile_s,
            "steps": total_steps, "group_size": num_models,
            "images_per_s": timed_steps * config.batch_size * num_models / max(timed_s, 1e-9)}
           for i in range(num_models)]
  return [_unstack(host, i) for i in range(num_models)], infos
