r"""A method against Retrain on a finished benchmark: which of the MeGU issue's targets it meets.

  python -m experiments.check_targets --benchmark=runs/benchmark/benchmark.json --method=megu \
      --out=runs/benchmark/targets.md

Reads ``benchmark.json`` (``experiments.benchmark``) or an ``ensemble.json``. For ensembles a
target is met when the method lies within what the floor sample (a second Retrain ensemble)
scores, per split, on the statistic that best tells doing nothing from Retrain at that N. For the
seed benchmark: one row per scenario of the mean over seeds of the method minus Retrain against
the margins of ``megu_jax.harness.targets.Targets``. Writes the table to ``--out`` when given.
"""
import json

from absl import flags

from megu_jax import io_utils
from megu_jax.harness import cli
from megu_jax.harness import targets

_BENCHMARK = flags.DEFINE_string("benchmark", None, "Path to a benchmark.json.")
_METHOD = flags.DEFINE_string("method", "megu", "The method to check against Retrain.")
_OUT = flags.DEFINE_string("out", None, "Also write the table here (Markdown).")
flags.mark_flags_as_required(["benchmark"])


def main():
  try:
    with open(_BENCHMARK.value, encoding="utf-8") as f:
      benchmark = json.load(f)
  except json.JSONDecodeError as error:
    raise ValueError(f"--benchmark={_BENCHMARK.value!r} is not valid JSON ({error})") from None
  if "scenarios" in benchmark or "methods" in benchmark:  # ensembles: Retrain's distribution
    summaries = benchmark.get("scenarios", [benchmark])
    sizes = {s["methods"][_METHOD.value]["ensemble_size"] for s in summaries
             if _METHOD.value in s["methods"]}
    if len(sizes) != 1:
      raise ValueError(f"--method={_METHOD.value!r} ran in none of {_BENCHMARK.value}'s "
                       "scenarios, or with different ensemble sizes")
    size, = sizes
    text = targets.floor_markdown(summaries, _METHOD.value,
                                  *targets.headline_statistic(summaries, size))
  else:  # the seed benchmark: margins around one Retrain per seed
    text = targets.targets_markdown(targets.check_targets(benchmark, _METHOD.value),
                                    _METHOD.value)
  if _OUT.value:
    io_utils.atomic_write_text(_OUT.value, text)
  print(text)


if __name__ == "__main__":
  cli.run(main)
