r"""Renders docs/results.md, docs/performance.md and the README's result tables from results/.

  python -m experiments.report           # rewrites the rendered documents
  python -m experiments.report --check   # exit 1, naming them, when any is out of date

Every number in those documents comes from a JSON file under ``results/`` written by a command
(``experiments.unlearn``, ``experiments.ensemble``/``benchmark``, ``experiments.bench_*``), with
that command's own provenance printed under each table.
"""
import os
import sys

from absl import flags

from megu_jax.harness import cli
from megu_jax.harness import report

_CHECK = flags.DEFINE_bool("check", False, "Only check that the rendered documents are current.")
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main():
  if _CHECK.value:
    stale = report.stale(_ROOT)
    if stale:
      print(f"error: out of date with results/: {', '.join(stale)}; run python -m "
            "experiments.report", file=sys.stderr)
      sys.exit(1)
    print("the rendered documents are up to date")
    return
  for path in report.write(_ROOT):
    print(f"wrote {path}")


if __name__ == "__main__":
  cli.run(main)
