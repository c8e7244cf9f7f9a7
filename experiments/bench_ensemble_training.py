r"""Which way trains an ensemble faster here: one model after another, or several at once (vmap).

  python -m experiments.bench_ensemble_training   # writes results/performance/ensemble_training.json

For each model and group size it times the whole training loop on synthetic data, alternating
between ``train.fit`` (one model) and ``ensemble_training.fit_group`` (the group vmapped over a
models axis) for ``--rounds`` rounds, and reports images per second counting every model's images:
a ratio above 1 means training the ensemble in groups is faster on this machine.
"""
import numpy as np
from absl import app
from absl import flags

from megu_jax import xla_cpu
from megu_jax.harness import throughput

_MODELS = flags.DEFINE_list("models", ["small_cnn"], "Models to measure.")
_GROUP_SIZES = flags.DEFINE_list("group_sizes", ["2", "4"], "Models trained at once.")
_STEPS = flags.DEFINE_integer("steps", 30, "Steps per timed run.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Alternating rounds.")
_OUT = flags.DEFINE_string("out", "results/performance/ensemble_training.json",
                           "Where to write the JSON.")


def main(argv):
  del argv
  results = {}
  for name in _MODELS.value:
    entry = {}
    for group_size in map(int, _GROUP_SIZES.value):
      sequential, grouped = [], []
      for _ in range(_ROUNDS.value):
        sequential.append(throughput.measure_fit_loop(name, steps=_STEPS.value)["images_per_s"])
        grouped.append(throughput.measure_group_fit(name, group_size=group_size,
                                                    steps=_STEPS.value)["images_per_s"])
      entry[str(group_size)] = {
          "sequential_images_per_s": float(np.median(sequential)),
          "vmap_images_per_s": float(np.median(grouped)),
          "vmap_over_sequential": float(np.median(grouped) / np.median(sequential)),
          "sequential_runs": [round(r, 1) for r in sequential],
          "vmap_runs": [round(r, 1) for r in grouped]}
      print(f"{name}, {group_size} at once: {entry[str(group_size)]['vmap_over_sequential']:.2f}x "
            "the images per second of one after another")
    results[name] = entry
  throughput.write_result(_OUT.value, {"machine": throughput.machine_info(), "steps": _STEPS.value,
                                       "rounds": _ROUNDS.value, "results": results})
  print(f"wrote {_OUT.value}")


if __name__ == "__main__":
  xla_cpu.apply_cpu_defaults()  # before JAX starts its backend
  app.run(main)
