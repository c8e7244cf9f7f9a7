r"""Whether 2 processes compute what 1 process does, step by step: training and unlearning.

  python -m experiments.compare_processes   # writes results/performance/multi_process.json

Expected: every accuracy equal and every step's losses within float32 reduction-order noise.

The same jobs run as 1 process with ``--devices`` CPU devices and as ``--processes`` processes of
``devices / processes`` devices each (``experiments.launch``: the same global devices, batch and
seed): on the digits recipe (``megu_jax/configs/digits.py:quick``, ``--epochs``), training the
original and the Retrain model (``experiments.train``), then unlearning (``experiments.unlearn``,
``--methods``) from the same trained models, the one-process ones copied into both workdirs. Every
compiled step's metrics are recorded as the commands run (``megu_jax.harness.step_metrics``).

Per job (the original's and Retrain's training, MeGU's noise steps and its finetuning steps, each
baseline's steps) the JSON has the number of steps, the largest absolute and relative per-step
difference of any recorded loss, whether every accuracy in ``final_metrics.json`` /
``results.json`` is equal, and the largest absolute difference of their other metrics (timings
left out); with the command's provenance. Each command's output is in ``--workdir``
(a temporary directory, removed at the end, when not given).
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from absl import flags

from megu_jax import io_utils
from megu_jax.harness import cli
from megu_jax.harness import provenance
from megu_jax.harness import step_metrics

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where the runs go (must not exist, or be empty); default: a temporary "
    "directory, removed at the end.")
_EPOCHS = flags.DEFINE_integer("epochs", 2, "Training epochs of the digits recipe.")
_METHODS = flags.DEFINE_list("methods", ["megu", "finetune"], "Unlearning methods to run.")
_DEVICES = flags.DEFINE_integer("devices", 4, "Global CPU devices, in either layout.")
_PROCESSES = flags.DEFINE_integer("processes", 2, "Processes of the multi-process layout.")
_TIMEOUT_S = flags.DEFINE_float("timeout_s", 1800.0, "Per command: stop it after this long.")
_OUT = flags.DEFINE_string("out", "results/performance/multi_process.json",
                           "Where to write the JSON.")

CONFIG = "megu_jax/configs/digits.py:quick"
# Each method's compiled steps, in the order it builds them: one job each.
METHOD_JOBS = {"megu": ("megu_noise", "megu_finetune"), "finetune": ("finetune",),
               "random_label": ("random_label",), "neggrad_plus": ("neggrad_plus",),
               "bad_teacher": ("bad_teacher",), "scrub": ("scrub",)}
TRAIN_JOBS = {"train_original": False, "train_retrain": True}  # job -> --config.retrain


def check_flags() -> None:
  unknown = [m for m in _METHODS.value if m not in METHOD_JOBS]
  if unknown or not _METHODS.value:
    raise ValueError(f"--methods={','.join(_METHODS.value)}: each must be one of "
                     f"{', '.join(METHOD_JOBS)} (methods with one known set of compiled steps)")
  if _PROCESSES.value < 2 or _DEVICES.value % _PROCESSES.value:
    raise ValueError(f"--processes={_PROCESSES.value} must be at least 2 and divide "
                     f"--devices={_DEVICES.value}")
  if _EPOCHS.value < 1:
    raise ValueError(f"--epochs={_EPOCHS.value} must be at least 1")
  if _WORKDIR.value and os.path.isdir(_WORKDIR.value) and os.listdir(_WORKDIR.value):
    raise ValueError(f"--workdir={_WORKDIR.value} is not empty; give a new directory")


def config_args() -> list[str]:
  return [f"--config={CONFIG}", f"--config.epochs={_EPOCHS.value}",
          f"--config.methods={','.join(_METHODS.value)}"]


def child_env(cache_dir: str) -> dict[str, str]:
  env = dict(os.environ)
  env.update({"PYTHONPATH": _REPO, "JAX_COMPILATION_CACHE_DIR": cache_dir,  # shared: compile once
              "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
              "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"})
  return env


def run_recorded(layout: dict, module: str, args: list[str], prefix: str, env: dict) -> float:
  """``python -m module args`` in ``layout``, its steps recorded to ``prefix.<process>``; returns
  its wall time. Its output goes to ``prefix.log``."""
  from experiments import launch  # noqa: PLC0415 (its flags are defined only when it runs)
  command = [sys.executable, "-m", "megu_jax.harness.step_metrics", prefix, module, *args]
  if layout["processes"] > 1:
    command = [sys.executable, "-m", "experiments.launch",
               f"--num_processes={layout['processes']}",
               f"--local_devices={layout['devices_per_process']}",
               f"--timeout_s={_TIMEOUT_S.value:g}", "--", *command]
    timeout_s = _TIMEOUT_S.value + 120  # the launcher's own stop comes first
  else:
    env = launch.process_env(layout["devices_per_process"], env)
    timeout_s = _TIMEOUT_S.value
  os.makedirs(os.path.dirname(prefix), exist_ok=True)
  started = time.monotonic()
  with open(f"{prefix}.log", "w", encoding="utf-8") as log:
    done = subprocess.run(command, cwd=_REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                          timeout=timeout_s, check=False)
  wall_s = time.monotonic() - started
  if done.returncode:
    with open(f"{prefix}.log", encoding="utf-8") as log:
      errors = [line.strip() for line in log if line.startswith("error:")]
    raise ChildProcessError(f"{module} as {layout['name']} exited with {done.returncode}: "
                            f"{errors[-1] if errors else 'no error line'}; its output: "
                            f"{prefix}.log")
  print(f"{module} as {layout['name']}: {wall_s:.0f} s", flush=True)
  return wall_s


def step_records(prefix: str, processes: int) -> list[dict[int, list[dict]]]:
  """Each process's recorded steps, by compiled step."""
  return [step_metrics.by_step_fn(step_metrics.read_records(f"{prefix}.{p}"))
          for p in range(processes)]


def read_json(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def main():
  check_flags()
  from megu_jax.configs import digits  # noqa: PLC0415
  from megu_jax.harness import experiment  # noqa: PLC0415
  devices, processes = _DEVICES.value, _PROCESSES.value
  layouts = [{"name": f"1x{devices}", "processes": 1, "devices_per_process": devices},
             {"name": f"{processes}x{devices // processes}", "processes": processes,
              "devices_per_process": devices // processes}]
  config = digits.get_config("quick")
  config.epochs = _EPOCHS.value
  config.methods = ",".join(_METHODS.value)
  method_order = [m for m in experiment.method_list(config) if m in METHOD_JOBS]
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="compare-processes-")
  os.makedirs(workdir, exist_ok=True)
  env = child_env(os.path.join(workdir, "xla_cache"))
  wall_s: dict[str, dict[str, float]] = {}
  try:
    # Training: each layout trains both models from scratch.
    for layout in layouts:
      for job, retrain in TRAIN_JOBS.items():
        run_dir = os.path.join(workdir, layout["name"], job)
        wall_s.setdefault(job, {})[layout["name"]] = run_recorded(
            layout, "experiments.train",
            [*config_args(), *(["--config.retrain=True"] if retrain else []),
             f"--workdir={run_dir}"],
            os.path.join(workdir, layout["name"], f"{job}.steps"), env)
    # Unlearning: from the one-process models, where experiments.unlearn looks for them.
    models = experiment.model_dirs(config, os.path.join(workdir, "models"))
    for job, name in (("train_original", "original"), ("train_retrain", "retrain")):
      shutil.copytree(os.path.join(workdir, layouts[0]["name"], job), models[name],
                      ignore=shutil.ignore_patterns("process_*.log"))
    for layout in layouts:
      run_dir = os.path.join(workdir, layout["name"], "unlearn")
      os.makedirs(run_dir)
      shutil.copytree(os.path.join(workdir, "models"), os.path.join(run_dir, "models"))
      wall_s.setdefault("unlearn", {})[layout["name"]] = run_recorded(
          layout, "experiments.unlearn", [*config_args(), f"--workdir={run_dir}"],
          os.path.join(workdir, layout["name"], "unlearn.steps"), env)

    jobs = {}
    for job in TRAIN_JOBS:
      ref, = step_records(os.path.join(workdir, layouts[0]["name"], f"{job}.steps"), 1)
      multi = step_records(os.path.join(workdir, layouts[1]["name"], f"{job}.steps"), processes)
      if sorted(ref) != [0] or any(sorted(m) != [0] for m in multi):
        raise ChildProcessError(f"{job}: expected one compiled train step, recorded "
                                f"{sorted(ref)} and {[sorted(m) for m in multi]}")
      final = [read_json(os.path.join(workdir, layout["name"], job, "final_metrics.json"))
               for layout in layouts]
      jobs[job] = {**step_metrics.compare_steps(ref[0], [m[0] for m in multi]),
                   **step_metrics.compare_metrics(final[0], final[1]),
                   "file": "final_metrics.json"}
    ref, = step_records(os.path.join(workdir, layouts[0]["name"], "unlearn.steps"), 1)
    multi = step_records(os.path.join(workdir, layouts[1]["name"], "unlearn.steps"), processes)
    names = [(method, job) for method in method_order for job in METHOD_JOBS[method]]
    if sorted(ref) != list(range(len(names))) or any(sorted(m) != sorted(ref) for m in multi):
      raise ChildProcessError(
          f"unlearning: expected {len(names)} compiled steps ({', '.join(j for _, j in names)}; "
          f"no training: the models were there), recorded {sorted(ref)} and "
          f"{[sorted(m) for m in multi]}")
    results = [read_json(os.path.join(workdir, layout["name"], "unlearn", "results.json"))
               ["methods"] for layout in layouts]
    for index, (method, job) in enumerate(names):
      jobs[job] = {**step_metrics.compare_steps(ref[index], [m[index] for m in multi]),
                   **step_metrics.compare_metrics(results[0][method], results[1][method]),
                   "file": f"results.json (methods.{method})"}
    evaluated = {method: step_metrics.compare_metrics(results[0][method], results[1][method])
                 for method in results[0] if method not in METHOD_JOBS}
  finally:
    if not _WORKDIR.value:
      shutil.rmtree(workdir, ignore_errors=True)

  record = {"dataset": config.dataset, "config": CONFIG, "epochs": _EPOCHS.value,
            "methods": list(_METHODS.value),
            "reference": {"layout": layouts[0]["name"], "processes": 1, "devices": devices},
            "multi_process": {"layout": layouts[1]["name"], "processes": processes,
                              "devices_per_process": devices // processes},
            "jobs": jobs, "references_evaluated": evaluated, "wall_s": wall_s,
            "provenance": provenance.record()}
  io_utils.atomic_write_json(_OUT.value, record)
  for job, entry in jobs.items():
    accuracies = ("equal" if entry["accuracies_equal"] else
                  "DIFFER: " + ", ".join(entry["unequal_accuracies"]))
    print(f"{job}: {entry['steps']} steps, losses within {entry['max_abs_loss_diff']:.2g} "
          f"(relative {entry['max_rel_loss_diff']:.2g}), accuracies {accuracies}, other metrics "
          f"within {entry['max_abs_other_metric_diff']:.2g}")
  print(f"wrote {os.path.abspath(_OUT.value)}")


if __name__ == "__main__":
  cli.run(main)
