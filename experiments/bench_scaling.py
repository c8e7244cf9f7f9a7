r"""Training images per second on 1 and 2 devices, on the mesh and the pmap paths.

  python -m experiments.bench_scaling               # writes results/performance/scaling.json
  python -m experiments.bench_scaling --models=small_cnn,resnet18_narrow --modes=mesh \
      --devices=2,4 --processes=1,2 --out=results/performance/scaling_processes.json

Each (path, devices) configuration runs in its own subprocess, because the device count of a CPU
is fixed when JAX starts: the subprocess gets
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` (N = the largest count asked for), which
splits the CPU into N fake devices; on a machine with real accelerators the flag is ignored and the
real devices are used. Configurations alternate over ``--rounds`` so that a change in the
machine's load hits all of them alike; per configuration the figure is the median timed block over
all rounds. The step is the project's (``train.make_train_step`` through ``DataParallel``), batch
128 global (64 per device on 2 devices), state donated, inputs already on the devices.

``--processes=1,2`` adds the multi-process case: the same global device count as P processes on
this machine (``experiments.launch``, DEVICES/P devices each, gradients reduced across processes
by gloo over TCP), each feeding its rows of the same global batch. Its figure sits beside the one
process with as many devices, under ``multi_process`` in the JSON: the cost of going through
``jax.distributed`` on one machine, not a speed-up (docs/scaling.md).
"""
import json
import os
import subprocess
import sys
import tempfile

from absl import app
from absl import flags

from megu_jax import xla_cpu
from megu_jax.harness import cli  # the multi-process flags a worker of several processes gets

_MODELS = flags.DEFINE_list("models", ["resnet18_narrow", "small_cnn"], "Models to measure.")
_DEVICES = flags.DEFINE_list("devices", ["1", "2"], "Device counts to measure.")
_MODES = flags.DEFINE_list("modes", ["mesh", "pmap"], "Parallel paths to measure.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 128, "Global images per step.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed block.")
_REPETITIONS = flags.DEFINE_integer("repetitions", 3, "Timed blocks per configuration and round.")
_ROUNDS = flags.DEFINE_integer("rounds", 2, "Passes over all configurations.")
_PROCESSES = flags.DEFINE_list(
    "processes", ["1"], "Process counts to measure: P > 1 runs each device count that P divides "
    "as P processes on this machine (experiments.launch), beside one process.")
_OUT = flags.DEFINE_string("out", "results/performance/scaling.json", "Where to write the JSON.")
_WORKER = flags.DEFINE_string(
    "worker", "", "Internal: MODEL,MODE,DEVICES[,PROCESSES] to measure in this process.")


def run_worker(spec: str) -> None:
  """Measures one configuration in this process and prints it as one JSON line.

  With PROCESSES > 1 this is one of them: it joins the others first (the launcher's flags), and
  the step spans every process's devices.
  """
  model, mode, devices, processes = (spec.split(",") + ["1"])[:4]
  devices, processes = int(devices), int(processes)
  if processes > 1:
    cli.start_distributed()  # before any JAX call
  import jax  # noqa: PLC0415 (after XLA_FLAGS was set by the parent)

  from megu_jax import distributed  # noqa: PLC0415
  from megu_jax import parallel  # noqa: PLC0415
  from megu_jax.harness import throughput  # noqa: PLC0415
  if jax.device_count() < devices:
    print(json.dumps({"error": f"{devices} devices asked, {jax.device_count()} available"}))
    return
  # Several processes: every process's devices (DataParallel's default, ordered by process).
  dp = (parallel.DataParallel(mode) if processes > 1 else
        parallel.DataParallel(mode, tuple(jax.devices()[:devices])))
  result = throughput.measure_jax_step(model, batch_size=_BATCH_SIZE.value, steps=_STEPS.value,
                                       repetitions=_REPETITIONS.value, dp=dp)
  result["platform"] = jax.devices()[0].platform
  result["processes"] = jax.process_count()
  result["peak_rss_mb"] = round(throughput.peak_rss_bytes() / 2**20, 1)
  print("RESULT " + json.dumps(result), flush=True)
  distributed.finish()


def _worker_argv(spec: str) -> list[str]:
  return [sys.executable, "-m", "experiments.bench_scaling", f"--worker={spec}",
          f"--batch_size={_BATCH_SIZE.value}", f"--steps={_STEPS.value}",
          f"--repetitions={_REPETITIONS.value}"]


def _result_of(stdout: str, spec: str, returncode: int, stderr: str) -> dict:
  for line in stdout.splitlines():
    if line.startswith("RESULT "):
      return json.loads(line[len("RESULT "):])
  return {"error": f"worker {spec} exited with {returncode}: {stderr[-2000:]}"}


def launch(spec: str, max_devices: int) -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                      f" --xla_force_host_platform_device_count={max_devices}").strip()
  done = subprocess.run(_worker_argv(spec), env=env, capture_output=True, text=True, check=False)
  return _result_of(done.stdout, spec, done.returncode, done.stderr)


def launch_processes(spec: str, devices: int, processes: int) -> dict:
  """One configuration as ``processes`` processes of ``devices / processes`` devices each,
  through the launcher (a separate command: it forks no process that has JAX's threads);
  process 0's result. The others' output goes to a temporary directory."""
  with tempfile.TemporaryDirectory(prefix="bench-scaling-") as output_dir:
    argv = [sys.executable, "-m", "experiments.launch", f"--num_processes={processes}",
            f"--local_devices={devices // processes}", f"--output_dir={output_dir}", "--",
            *_worker_argv(spec)]
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    others = "".join(open(os.path.join(output_dir, name), encoding="utf-8").read()[-1000:]
                     for name in sorted(os.listdir(output_dir)))
  return _result_of(done.stdout, spec, done.returncode, done.stderr + others)


def multi_process_results(runs: dict[tuple, list[dict]], single: dict) -> dict:
  """``{(model, mode, devices, processes): [results]}`` -> ``{model: {mode: {"PxD": entry}}}``,
  each beside the single process with the same global device count (``single``: the
  ``aggregate_scaling`` table)."""
  import numpy as np  # noqa: PLC0415
  table: dict[str, dict] = {}
  for (model, mode, devices, processes), measured in runs.items():
    blocks = [b for r in measured for b in r["images_per_s_blocks"]]
    entry = {"processes": processes, "devices_per_process": devices // processes,
             "devices": devices, "images_per_s": float(np.median(blocks)),
             "images_per_s_blocks": blocks, "compile_s": measured[0]["compile_s"],
             "batch_size": _BATCH_SIZE.value,
             "peak_rss_mb_process_0": max(r.get("peak_rss_mb", 0.0) for r in measured)}
    one = single.get(model, {}).get(mode, {}).get(str(devices))
    if one is not None:
      entry["one_process_images_per_s"] = one["images_per_s"]
      # > 1: each step takes that many times as long as in one process with as many devices.
      entry["step_time_vs_one_process"] = one["images_per_s"] / entry["images_per_s"]
    table.setdefault(model, {}).setdefault(mode, {})[f"{processes}x{devices // processes}"] = entry
  return table


def main(argv):
  del argv
  if _WORKER.value:
    run_worker(_WORKER.value)
    return
  from megu_jax.harness import throughput  # noqa: PLC0415
  devices = [int(d) for d in _DEVICES.value]
  process_counts = [int(p) for p in _PROCESSES.value if int(p) > 1]
  configs = [(m, mode, n) for m in _MODELS.value for mode in _MODES.value for n in devices]
  multi_configs = [(m, mode, n, p) for m, mode, n in configs for p in process_counts
                   if n % p == 0]
  runs: dict[tuple, list[dict]] = {c: [] for c in configs}
  multi_runs: dict[tuple, list[dict]] = {c: [] for c in multi_configs}
  machine = throughput.machine_info()
  for round_index in range(_ROUNDS.value):
    # Alternating: one process, then several, per configuration, so that load hits both alike.
    for config in configs + multi_configs:
      spec = ",".join(map(str, config))
      result = (launch(spec, max(devices)) if len(config) == 3 else
                launch_processes(spec, config[2], config[3]))
      if "error" in result:
        print(f"error: {result['error']}", file=sys.stderr)
        sys.exit(1)
      (runs if len(config) == 3 else multi_runs)[config].append(result)
      how = f" as {config[3]} processes" if len(config) == 4 else ""
      print(f"round {round_index}: {config[0]} {config[1]} {config[2]} device(s){how}: "
            f"{result['images_per_s']:.0f} img/s", flush=True)
  results = throughput.aggregate_scaling(runs, _BATCH_SIZE.value)
  machine["devices"] = f"{max(devices)} ({runs[configs[0]][0]['platform']}) per worker"
  record = {"machine": machine, "results": results}
  if multi_runs:
    record["multi_process"] = multi_process_results(multi_runs, results)
  throughput.write_result(_OUT.value, record)
  for model, by_mode in results.items():
    for mode, by_n in by_mode.items():
      print(f"{model} {mode}: " + ", ".join(
          f"{n} device(s) {e['images_per_s']:.0f} img/s" for n, e in by_n.items()))
  for model, by_mode in record.get("multi_process", {}).items():
    for mode, by_layout in by_mode.items():
      print(f"{model} {mode}: " + ", ".join(
          f"{layout} (processes x devices) {e['images_per_s']:.0f} img/s, step time x"
          f"{e.get('step_time_vs_one_process', float('nan')):.2f} of one process"
          for layout, e in by_layout.items()))
  print(f"wrote {os.path.abspath(_OUT.value)}")


if __name__ == "__main__":
  xla_cpu.apply_cpu_defaults()  # before JAX starts its backend
  app.run(main)
