r"""Training images per second: our jitted train step against the same step in PyTorch.

  python -m experiments.bench_throughput            # writes results/performance/throughput.json

For the small CNN on 28x28 (the Fashion-MNIST default) and the narrow ResNet-18 on 32x32, batch
128, float32: the project's train step (``train.make_train_step`` compiled by ``DataParallel`` on
one device, state donated) and its PyTorch twin (``experiments.torch_reference``: same layers, same
initial weights copied from Flax, SGD momentum 0.9, coupled weight decay 5e-4, cosine learning
rate) in NCHW and channels-last memory order; then the whole training loop (``train.fit``) of our
step, to show what the loop adds. Each is compiled or warmed up first (JAX's compile
time reported apart), then the two frameworks' timed blocks *alternate*, so that another process
taking a core slows both alike; the figure is the median block. ``ratio`` is JAX over the faster
PyTorch variant. PyTorch is optional (``pip install -e '.[bench]'``): without it the JAX figures
are still measured and written.
"""
import os
import sys
import time

from absl import app
from absl import flags

import numpy as np

from megu_jax import xla_cpu
from megu_jax.harness import throughput

_MODELS = flags.DEFINE_list("models", list(throughput.MODEL_SETUPS),
                            f"Which of {list(throughput.MODEL_SETUPS)} to measure.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Images per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed block.")
_REPETITIONS = flags.DEFINE_integer("repetitions", 7, "Timed blocks per framework and model.")
_WARMUP = flags.DEFINE_integer("warmup_steps", 3, "Untimed steps after compilation.")
_FIT_STEPS = flags.DEFINE_integer("fit_steps", 30, "Steps of the whole training loop (train.fit) "
                                  "to time after the step alone; 0 skips it.")
_TORCH = flags.DEFINE_bool("torch", True, "Measure the PyTorch twins too (when torch imports).")
_OUT = flags.DEFINE_string("out", "results/performance/throughput.json", "Where to write the JSON.")


def _import_torch_reference():
  try:
    from experiments import torch_reference  # noqa: PLC0415 (optional dependency)
  except ImportError as error:
    print(f"PyTorch is not installed ({error}); measuring JAX only. Install the benchmark "
          "extra for the comparison: pip install -e '.[bench]' (CPU build: add "
          "--extra-index-url https://download.pytorch.org/whl/cpu)", file=sys.stderr)
    return None
  return torch_reference


def measure_model(name: str, torch_reference) -> dict:
  """JAX and (optionally) PyTorch throughput of one model, timed blocks interleaved."""
  setup = throughput.MODEL_SETUPS[name]
  batch_size, steps = _BATCH_SIZE.value, _STEPS.value
  jax_step = throughput.JaxTrainStep(name, batch_size)
  compile_s = jax_step.compile()
  jax_step.run(_WARMUP.value)
  runners = {"jax": jax_step.run}
  torch_first_step_s = {}
  if torch_reference is not None:
    import jax  # noqa: PLC0415
    host_state = jax.device_get(jax_step.state)
    batches = throughput.synthetic_batches(4, batch_size, setup["image_shape"],
                                           setup["num_classes"])
    channels = setup["image_shape"][-1]
    for variant, channels_last in (("torch_eager", False), ("torch_eager_channels_last", True)):
      twin = torch_reference.create_twin(setup["model"], setup["image_shape"],
                                         setup["num_classes"])
      torch_reference.load_flax_params(twin, host_state.params, host_state.batch_stats)
      step = torch_reference.TorchTrainStep(
          twin, batches, mean=np.full(channels, 0.5, np.float32),
          std=np.full(channels, 0.25, np.float32), channels_last=channels_last)
      start = time.perf_counter()
      step.run(1)
      torch_first_step_s[variant] = time.perf_counter() - start
      step.run(_WARMUP.value)
      runners[variant] = step.run
  rates = {variant: [] for variant in runners}
  for _ in range(_REPETITIONS.value):
    for variant, run in runners.items():
      rates[variant] += throughput.time_blocks(run, steps=steps, repetitions=1,
                                               images_per_step=batch_size)
      time.sleep(0.1)  # let one framework's worker threads go idle before the other starts
  result = {"model": dict(setup["model"]), "image_shape": list(setup["image_shape"]),
            "batch_size": batch_size, "steps_per_block": steps,
            "jax": {"compile_s": compile_s, **throughput.summarize_rates(rates["jax"])}}
  for variant in runners:
    if variant != "jax":
      result[variant] = {"first_step_s": torch_first_step_s[variant],
                         **throughput.summarize_rates(rates[variant])}
  if _FIT_STEPS.value > 1:
    # The loop around the step (host batches, keys, the late metrics check), after the rest.
    result["jax_fit_loop"] = throughput.measure_fit_loop(name, batch_size=batch_size,
                                                         steps=_FIT_STEPS.value)
  torch_variants = [v for v in runners if v != "jax"]
  if torch_variants:
    best = max(torch_variants, key=lambda v: result[v]["images_per_s"])
    result["torch_best"] = best
    result["ratio_jax_over_torch"] = result["jax"]["images_per_s"] / result[best]["images_per_s"]
    # Per timed round (JAX block and PyTorch block back to back): robust to slow drifts in load.
    result["ratio_per_round"] = [round(j / t, 3) for j, t in zip(rates["jax"], rates[best])]
  return result


def main(argv):
  del argv
  unknown = [m for m in _MODELS.value if m not in throughput.MODEL_SETUPS]
  if unknown:
    print(f"error: --models has {unknown}; valid: {list(throughput.MODEL_SETUPS)}",
          file=sys.stderr)
    sys.exit(2)
  torch_reference = _import_torch_reference() if _TORCH.value else None
  machine = throughput.machine_info(torch_reference.versions() if torch_reference else None)
  results = {}
  for name in _MODELS.value:
    results[name] = measure_model(name, torch_reference)
    line = f"{name}: JAX {results[name]['jax']['images_per_s']:.0f} img/s " \
           f"(compile {results[name]['jax']['compile_s']:.1f} s)"
    if "jax_fit_loop" in results[name]:
      line += f", whole loop {results[name]['jax_fit_loop']['images_per_s']:.0f} img/s"
    if "torch_best" in results[name]:
      best = results[name]["torch_best"]
      line += (f", PyTorch {results[name][best]['images_per_s']:.0f} img/s ({best}), "
               f"ratio {results[name]['ratio_jax_over_torch']:.2f}x")
    print(line, flush=True)
  throughput.write_result(_OUT.value, {"machine": machine, "results": results,
                                       "torch_available": torch_reference is not None})
  print(f"wrote {os.path.abspath(_OUT.value)}")


if __name__ == "__main__":
  xla_cpu.apply_cpu_defaults()  # before JAX starts its backend
  app.run(main)
