r"""Training images per second on 1 and 2 devices, on the mesh and the pmap paths.

  python -m experiments.bench_scaling               # writes results/performance/scaling.json

Each (path, devices) configuration runs in its own subprocess, because the device count of a CPU
is fixed when JAX starts: the subprocess gets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (N = the largest count asked for), which
splits the CPU into N fake devices; on a machine with real accelerators the flag is ignored and the
real devices are used. Configurations alternate over ``--rounds`` so that a change in the
machine's load hits all of them alike; per configuration the figure is the median timed block over
all rounds. The step is the project's (``train.make_train_step`` through ``DataParallel``), batch
128 global (64 per device on 2 devices), state donated, inputs already on the devices.
"""
import json
import os
import subprocess
import sys

from absl import app
from absl import flags

from megu_jax import xla_cpu

_MODELS = flags.DEFINE_list("models", ["resnet18_narrow", "small_cnn"], "Models to measure.")
_DEVICES = flags.DEFINE_list("devices", ["1", "2"], "Device counts to measure.")
_MODES = flags.DEFINE_list("modes", ["mesh", "pmap"], "Parallel paths to measure.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global images per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed block.")
_REPETITIONS = flags.DEFINE_integer("repetitions", 3, "Timed blocks per configuration and round.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Passes over all configurations.")
_OUT = flags.DEFINE_string("out", "results/performance/scaling.json", "Where to write the JSON.")
_WORKER = flags.DEFINE_string("worker", "", "Internal: MODEL,MODE,DEVICES to measure in-process.")


def run_worker(spec: str) -> None:
  """Measures one configuration in this process and prints it as one JSON line."""
  import jax  # noqa: PLC0415 (after XLA_FLAGS was set by the parent)

  from megu_jax import parallel  # noqa: PLC0415
  from megu_jax.harness import throughput  # noqa: PLC0415
  model, mode, devices = spec.split(",")
  devices = int(devices)
  if jax.device_count() < devices:
    print(json.dumps({"error": f"{devices} devices asked, {jax.device_count()} available"}))
    return
  dp = parallel.DataParallel(mode, tuple(jax.devices()[:devices]))
  result = throughput.measure_jax_step(model, batch_size=_BATCH_SIZE.value, steps=_STEPS.value,
                                       repetitions=_REPETITIONS.value, dp=dp)
  result["platform"] = jax.devices()[0].platform
  result["peak_rss_mb"] = round(throughput.peak_rss_bytes() / 2**20, 1)
  print("RESULT " + json.dumps(result), flush=True)


def launch(spec: str, max_devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={max_devices}").strip()
  argv = [sys.executable, "-m", "experiments.bench_scaling", f"--worker={spec}",
          f"--batch_size={_BATCH_SIZE.value}", f"--steps={_STEPS.value}",
          f"--repetitions={_REPETITIONS.value}"]
  done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
  for line in done.stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  return {"error": f"worker {spec} exited with {done.returncode}: {done.stderr[-2000:]}"}


def main(argv):
  del argv
  if _WORKER.value:
    run_worker(_WORKER.value)
    return
  from megu_jax.harness import throughput  # noqa: PLC0415
  devices = [int(d) for d in _DEVICES.value]
  configs = [(m, mode, n) for m in _MODELS.value for mode in _MODES.value for n in devices]
  runs: dict[tuple, list[dict]] = {c: [] for c in configs}
  machine = throughput.machine_info()
  for round_index in range(_ROUNDS.value):
    for config in configs:
      result = launch(",".join(map(str, config)), max(devices))
      if "error" in result:
        print(f"error: {result['error']}", file=sys.stderr)
        sys.exit(1)
      runs[config].append(result)
      print(f"round {round_index}: {config[0]} {config[1]} {config[2]} device(s): "
            f"{result['images_per_s']:.0f} img/s", flush=True)
  results = throughput.aggregate_scaling(runs, _BATCH_SIZE.value)
  machine["devices"] = f"{max(devices)} ({runs[configs[0]][0]['platform']}) per worker"
  throughput.write_result(_OUT.value, {"machine": machine, "results": results})
  for model, by_mode in results.items():
    for mode, by_n in by_mode.items():
      print(f"{model} {mode}: " + ", ".join(
          f"{n} device(s) {e['images_per_s']:.0f} img/s" for n, e in by_n.items()))
  print(f"wrote {os.path.abspath(_OUT.value)}")


if __name__ == "__main__":
  xla_cpu.apply_cpu_defaults()  # before JAX starts its backend
  app.run(main)
