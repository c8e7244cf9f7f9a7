r"""A method against Retrain on a finished benchmark: which of the MeGU issue's targets it meets.

  python -m experiments.check_targets --benchmark=runs/benchmark/benchmark.json --method=megu \
      --out=runs/benchmark/targets.md

Reads ``benchmark.json`` (``experiments.benchmark``), prints one row per scenario (mean over seeds
of the method minus Retrain, the targets the mean misses, how many seeds meet every target alone)
and writes it to ``--out`` when given. Margins: ``megu_jax.harness.targets.Targets``.
"""
import json

from absl import flags

from megu_jax.harness import cli
from megu_jax import io_utils
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
  text = targets.targets_markdown(targets.check_targets(benchmark, _METHOD.value), _METHOD.value)
  if _OUT.value:
    io_utils.atomic_write_text(_OUT.value, text)
  print(text)


if __name__ == "__main__":
  cli.run(main)
