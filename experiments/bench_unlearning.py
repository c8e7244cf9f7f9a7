r"""What unlearning costs: every method's wall time relative to Retrain, MeGU's time by phase.

Measure it here, every method and Retrain in this one process (minutes: Retrain trains twice):
  python -m experiments.bench_unlearning --config=megu_jax/configs/fashion_mnist.py \
      --workdir=runs/bench_unlearning --config.methods=all
Or derive it from a finished (or partial) benchmark, without running anything:
  python -m experiments.bench_unlearning --from_benchmark=runs/benchmark

Both write ``results/performance/unlearning_cost.json``. ``time_s`` is a method's call without
compilation; ``relative_to_retrain`` divides it by Retrain's training time in the same run (same
cell of the benchmark), and ``relative_to_retrain_with_compile`` adds each one's ``compile_s``.
The run mode calls every method and Retrain twice with the same key: ``time_s`` is the second
call less its compilation, and ``compile_s`` the rest of the first call (a process's first call
also compiles every operation outside the compiled steps); the benchmark mode reads the
benchmark's single calls, whose ``compile_s`` is the first call of each compiled step. MeGU's
``phases`` are its ``transition_s`` (features, T row lookup, perturbing labels), ``stand_in_s``
(the stand-in heads of its margin targets), ``noise_s`` (the noise pair's optimisation) and
``finetune_s`` (the disentangled finetuning), plus ``oracle_s``, the time the job
spent building T with its oracle before MeGU was called. In the run mode the trained original
model is reused from ``--models_root`` (default ``WORKDIR/models``), but Retrain is always
retrained here.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from megu_jax import xla_cpu
from megu_jax.harness import throughput
from megu_jax.harness import unlearning_cost

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config (run mode).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run mode: directory for models and T.")
_MODELS_ROOT = flags.DEFINE_string("models_root", None,
                                   "Run mode: trained models to reuse (default WORKDIR/models).")
_FROM_BENCHMARK = flags.DEFINE_string("from_benchmark", None,
                                      "A benchmark workdir (experiments.benchmark) to read.")
_OUT = flags.DEFINE_string("out", "results/performance/unlearning_cost.json",
                           "Where to write the JSON.")


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  run_mode = _CONFIG.value is not None
  if run_mode == bool(_FROM_BENCHMARK.value) or (run_mode and not _WORKDIR.value):
    print("error: give either --config and --workdir (run the methods) or --from_benchmark=DIR",
          file=sys.stderr)
    sys.exit(2)
  try:
    if run_mode:
      result = unlearning_cost.run_methods(_CONFIG.value, _WORKDIR.value, _MODELS_ROOT.value)
    else:
      result = unlearning_cost.from_benchmark(_FROM_BENCHMARK.value)
  except (ValueError, FileNotFoundError) as error:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)
  result["machine"] = throughput.machine_info()
  unlearning_cost.print_table(result)
  throughput.write_result(_OUT.value, result)
  print(f"wrote {os.path.abspath(_OUT.value)}")


if __name__ == "__main__":
  xla_cpu.apply_cpu_defaults()  # before JAX starts its backend
  app.run(main)
