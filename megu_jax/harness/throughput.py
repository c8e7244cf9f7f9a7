"""Measuring speed honestly: train-step throughput, compile time apart, and the machine it ran on.

The ``experiments.bench_*`` scripts build on these. Every measurement follows one protocol:
compile once (timed on its own), run ``warmup_steps`` more steps, then ``repetitions`` timed blocks
of ``steps`` steps each, with inputs already on the device and the per-step keys drawn beforehand,
so a block times the train step alone. A block ends with ``block_until_ready``: JAX dispatches
asynchronously and a clock read without it would time the dispatch, not the work. The median block
is the figure; every block is kept so that noise (another process taking a core) is visible.
"""
from __future__ import annotations

import datetime
import os
import platform
import resource
import sys
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from megu_jax import io_utils
from megu_jax import models
from megu_jax import parallel
from megu_jax import train
from megu_jax.harness import provenance

# The two architectures of issue 6: the Fashion-MNIST default and the narrow CIFAR ResNet-18.
MODEL_SETUPS = {
    "small_cnn": {"model": {"name": "small_cnn", "widths": (16, 32, 64), "feature_dim": 128},
                  "image_shape": (28, 28, 1), "num_classes": 10},
    "resnet18_narrow": {"model": {"name": "resnet18", "width": 0.25},
                        "image_shape": (32, 32, 3), "num_classes": 10},
}


def recipe_config(batch_size: int = 128) -> ml_collections.ConfigDict:
  """The optimiser half of the Fashion-MNIST recipe: SGD 0.05, momentum 0.9, wd 5e-4, cosine."""
  return ml_collections.ConfigDict({
      "batch_size": batch_size, "epochs": 1, "learning_rate": 0.05, "momentum": 0.9,
      "weight_decay": 5e-4, "schedule": "cosine"})


def synthetic_batches(num_batches: int, batch_size: int, image_shape, num_classes: int,
                      seed: int = 0) -> list[dict[str, np.ndarray]]:
  """Random uint8 images and labels in the layout of :func:`megu_jax.train.local_batch`.

  Throughput does not depend on pixel values, and random data keeps the benchmark free of any
  data set on disk; several distinct batches so that nothing can be cached across steps.
  """
  rng = np.random.default_rng(seed)
  return [{"image": rng.integers(0, 256, (batch_size,) + tuple(image_shape), dtype=np.uint8),
           "label": rng.integers(0, num_classes, batch_size).astype(np.int32),
           "index": np.arange(i * batch_size, (i + 1) * batch_size, dtype=np.int32)}
          for i in range(num_batches)]


class JaxTrainStep:
  """The project's train step (``train.make_train_step``) compiled for timing.

  ``dp`` places it like ``train.fit`` does; the state is donated, so each call consumes the state
  of the previous one, as in training.
  """

  def __init__(self, setup: str | dict, batch_size: int = 128,
               dp: parallel.DataParallel | None = None, num_batches: int = 4, seed: int = 0,
               model_overrides: dict | None = None):
    setup = MODEL_SETUPS[setup] if isinstance(setup, str) else setup
    self.dp = dp or parallel.DataParallel("mesh", tuple(jax.devices()[:1]))
    self.dp.check_batch_size(batch_size)
    self.batch_size = batch_size
    model_config = ml_collections.ConfigDict(dict(setup["model"], **(model_overrides or {})))
    self.model = models.create_model(model_config, setup["num_classes"])
    image_shape = tuple(setup["image_shape"])
    channels = image_shape[-1]
    config = recipe_config(batch_size)
    self.tx = train.make_training_optimizer(config, steps_per_epoch=1000)
    key = jax.random.key(seed)
    self.state = self.dp.put_replicated(
        train.create_train_state(self.model, self.tx, key, image_shape))
    self.step_fn = self.dp.compile_step(train.make_train_step(
        self.model, self.tx, mean=np.full(channels, 0.5, np.float32),
        std=np.full(channels, 0.25, np.float32)))
    self.batches = [self.dp.put_batch(b) for b in synthetic_batches(
        num_batches, batch_size, image_shape, setup["num_classes"], seed)]
    self.step_keys = [parallel.fold_in_step(key, s) for s in range(len(self.batches))]
    self.compiled = None
    self.steps_done = 0

  def compile(self) -> float:
    """Traces, lowers and compiles the step ahead of time; returns the seconds it took."""
    start = time.perf_counter()
    if hasattr(self.step_fn, "lower"):  # jax.jit (the mesh): compile ahead of time
      self.compiled = self.step_fn.lower(self.state, self.batches[0], self.step_keys[0]).compile()
    else:  # pmap's wrapper compiles on its first call: time that call
      self.compiled = self.step_fn
      self.run(1)
    return time.perf_counter() - start

  def run(self, steps: int) -> Any:
    """``steps`` train steps; returns the last metrics, ready (the host waited for the device)."""
    fn = self.compiled or self.step_fn
    metrics = None
    for _ in range(steps):
      i = self.steps_done % len(self.batches)
      self.state, metrics = fn(self.state, self.batches[i], self.step_keys[i])
      self.steps_done += 1
    return jax.block_until_ready(metrics)


def time_blocks(run: Callable[[int], Any], *, steps: int, repetitions: int,
                images_per_step: int) -> list[float]:
  """Images per second of ``repetitions`` blocks of ``run(steps)`` (which must wait for the end)."""
  rates = []
  for _ in range(repetitions):
    start = time.perf_counter()
    run(steps)
    rates.append(steps * images_per_step / (time.perf_counter() - start))
  return rates


def summarize_rates(rates: list[float]) -> dict[str, Any]:
  return {"images_per_s": float(np.median(rates)), "images_per_s_min": float(np.min(rates)),
          "images_per_s_max": float(np.max(rates)),
          "images_per_s_blocks": [round(float(r), 1) for r in rates]}


def measure_jax_step(setup: str | dict, *, batch_size: int = 128, steps: int = 20,
                     warmup_steps: int = 3, repetitions: int = 5,
                     dp: parallel.DataParallel | None = None,
                     model_overrides: dict | None = None) -> dict[str, Any]:
  """Compile time and images per second of the JAX train step (see the module docstring)."""
  bench = JaxTrainStep(setup, batch_size, dp=dp, model_overrides=model_overrides)
  compile_s = bench.compile()
  bench.run(warmup_steps)
  rates = time_blocks(bench.run, steps=steps, repetitions=repetitions, images_per_step=batch_size)
  return {"compile_s": compile_s, "batch_size": batch_size, "steps_per_block": steps,
          "warmup_steps": warmup_steps, "devices": bench.dp.num_devices,
          "parallel": bench.dp.mode, **summarize_rates(rates)}


def measure_fit_loop(setup: str | dict, *, batch_size: int = 128, steps: int = 40,
                     seed: int = 0) -> dict[str, Any]:
  """Images per second of the whole training loop (``train.fit``) on synthetic data.

  Against :func:`measure_jax_step` this shows what the loop adds around the step: gathering each
  batch on the host, placing it, the per-step key and the one-step-late metrics check.
  """
  setup = MODEL_SETUPS[setup] if isinstance(setup, str) else setup
  config = recipe_config(batch_size)
  config.update({"seed": seed, "log_every_steps": 10**9, "progress": False,
                 "augment": ml_collections.ConfigDict({"crop_padding": 0, "flip": False})})
  batches = synthetic_batches(steps, batch_size, setup["image_shape"], setup["num_classes"], seed)
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  channels = setup["image_shape"][-1]
  model = models.create_model(ml_collections.ConfigDict(setup["model"]), setup["num_classes"])
  _, info = train.fit(config, model, images, labels, np.arange(len(labels)),
                      mean=np.full(channels, 0.5, np.float32),
                      std=np.full(channels, 0.25, np.float32), key=jax.random.key(seed),
                      dp=parallel.DataParallel("mesh", tuple(jax.devices()[:1])))
  return {"images_per_s": info["images_per_s"],
          "compile_s": info["compile_s"], "steps": info["steps"]}


def measure_group_fit(setup: str | dict, *, group_size: int, batch_size: int = 128,
                      steps: int = 30, seed: int = 0) -> dict[str, Any]:
  """Images per second of training ``group_size`` models at once (:mod:`megu_jax.ensemble_training`,
  vmapped over a models axis) on synthetic data, counting every model's images."""
  import tempfile  # noqa: PLC0415

  from megu_jax import datasets  # noqa: PLC0415
  from megu_jax import ensemble_training  # noqa: PLC0415
  setup = MODEL_SETUPS[setup] if isinstance(setup, str) else setup
  batches = synthetic_batches(steps, batch_size, setup["image_shape"], setup["num_classes"], seed)
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  data = datasets.Dataset(name="synthetic", train_images=images, train_labels=labels,
                          test_images=images[:batch_size], test_labels=labels[:batch_size],
                          class_names=tuple(str(c) for c in range(setup["num_classes"])))
  config = recipe_config(batch_size)
  config.update({"log_every_steps": 10**9, "checkpoint_every_steps": 10**9, "progress": False,
                 "model": ml_collections.ConfigDict(setup["model"]),
                 "augment": ml_collections.ConfigDict({"crop_padding": 0, "flip": False})})
  model = models.create_model(config.model, setup["num_classes"])
  with tempfile.TemporaryDirectory() as root:
    _, infos = ensemble_training.fit_group(
        config, model, data, np.arange(len(labels)), seeds=list(range(seed, seed + group_size)),
        workdirs=[os.path.join(root, str(i)) for i in range(group_size)])
  return {"images_per_s": infos[0]["images_per_s"], "compile_s": infos[0]["compile_s"],
          "group_size": group_size, "steps": steps}


def aggregate_scaling(runs: dict[tuple[str, str, int], list[dict]], batch_size: int) -> dict:
  """``{(model, mode, devices): [measure_jax_step results]}`` -> ``{model: {mode: {n: entry}}}``.

  Each entry's figure is the median block over all its runs; ``speedup_over_1_device`` compares
  it with the same path on one device.
  """
  results: dict[str, dict] = {}
  for (model, mode, devices), measured in runs.items():
    blocks = [b for r in measured for b in r["images_per_s_blocks"]]
    results.setdefault(model, {}).setdefault(mode, {})[str(devices)] = {
        "images_per_s": float(np.median(blocks)), "images_per_s_blocks": blocks,
        "compile_s": measured[0]["compile_s"], "platform": measured[0].get("platform"),
        "batch_size": batch_size, "per_device_batch": batch_size // devices,
        "peak_rss_mb": max(r.get("peak_rss_mb", 0.0) for r in measured)}
  for by_mode in results.values():
    for by_devices in by_mode.values():
      if "1" in by_devices:
        for entry in by_devices.values():
          entry["speedup_over_1_device"] = entry["images_per_s"] / by_devices["1"]["images_per_s"]
  return results


# --- what ran where -----------------------------------------------------------------------------
def peak_rss_bytes() -> int:
  """Peak resident set size of this process and its finished children, from the kernel.

  ``getrusage``'s ``ru_maxrss`` is the operating system's own accounting (KiB on Linux, bytes on
  macOS); children count separately, so a job that runs configurations in subprocesses adds them.
  """
  scale = 1 if sys.platform == "darwin" else 1024
  own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
  return int(max(own, children) * scale)


def machine_info(extra_versions: dict[str, str] | None = None) -> dict[str, Any]:
  """The facts a throughput figure means nothing without: CPU, cores, load, versions, date."""
  import flax  # noqa: PLC0415 (only for its version)
  import jaxlib  # noqa: PLC0415
  try:
    usable_cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    usable_cores = os.cpu_count()
  info = {
      "cpu_model": provenance.cpu_model(), "cpu_count": os.cpu_count(),
      "usable_cores": usable_cores,
      "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
      "platform": platform.platform(), "python": platform.python_version(),
      "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
      "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "command": provenance.command_line(), **provenance.loaded_commit(),
  }
  info.update(extra_versions or {})
  return info


def write_result(path: str, result: dict[str, Any]) -> None:
  """Writes ``result`` (plus the end-of-run load and peak memory) atomically as JSON."""
  result = dict(result)
  result.setdefault("machine", {})["load_average_at_end"] = [
      round(x, 2) for x in os.getloadavg()]
  result["peak_rss_mb"] = round(peak_rss_bytes() / 2**20, 1)
  io_utils.atomic_write_json(path, result)
