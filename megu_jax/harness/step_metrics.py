r"""Every compiled step's scalar metrics, recorded as it runs: two runs compared step by step.

  python -m megu_jax.harness.step_metrics PREFIX MODULE ARGS...

runs ``python -m MODULE ARGS...`` unchanged (its own ``__main__``, flags and exit code), except
that every step ``DataParallel.compile_step`` builds appends its scalar metrics to
``PREFIX.<process index>``, one JSON line per call: ``{"step_fn": i, "loss": ..., ...}``, ``i``
counting the compiled steps in the order they were built (training: one; MeGU: its noise step,
then its finetuning step). Every process of a multi-process run writes its own file (the metrics
are replicated: they should be the same). Reading each step's metrics makes the host wait for
that step, which costs time but changes no value. :func:`compare_steps` and
:func:`compare_metrics` say how two runs' records and final metrics differ. Used by
``experiments.compare_processes`` and ``tests/test_distributed.py``.
"""
from __future__ import annotations

import json
import runpy
import sys
from typing import Callable


def record_step_metrics(path_prefix: str, process_index: Callable[[], object],
                        set_attribute=setattr) -> None:
  """Makes every step ``DataParallel.compile_step`` builds append its scalar metrics to
  ``path_prefix.<process_index()>``: ``{"step_fn": i, ...}`` per call, ``i`` counting the compiled
  steps. ``set_attribute``: how to patch (pytest's ``monkeypatch.setattr`` in a test)."""
  from megu_jax import parallel  # noqa: PLC0415 (patched before the command imports it)
  original = parallel.DataParallel.compile_step
  compiled = [0]

  def compile_step(self, step_factory, donate_state=True):
    step = original(self, step_factory, donate_state)
    index = compiled[0]
    compiled[0] += 1

    def recorded(state, batch, key):
      state, metrics = step(state, batch, key)
      values = {k: float(v) for k, v in metrics.items() if getattr(v, "size", 1) == 1}
      with open(f"{path_prefix}.{process_index()}", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step_fn": index, **values}) + "\n")
      return state, metrics
    return recorded
  set_attribute(parallel.DataParallel, "compile_step", compile_step)


def read_records(path: str) -> list[dict]:
  """The records of one ``PREFIX.<process>`` file, in order."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def by_step_fn(records: list[dict]) -> dict[int, list[dict]]:
  """``{step_fn: its records in order}`` (without the ``step_fn`` key)."""
  out: dict[int, list[dict]] = {}
  for record in records:
    record = dict(record)
    out.setdefault(record.pop("step_fn"), []).append(record)
  return out


def compare_steps(reference: list[dict], others: list[list[dict]]) -> dict:
  """Per-step differences of every recorded metric: ``reference``'s records against each of
  ``others`` (a run's processes), the worst of them; whether the steps (their count and metric
  names) are the same, and whether ``others`` are identical."""
  out = {"steps": len(reference), "metrics": sorted({k for r in reference for k in r}),
         "same_steps": all(len(o) == len(reference) and all(
             sorted(a) == sorted(b) for a, b in zip(o, reference)) for o in others),
         "processes_identical": all(o == others[0] for o in others),
         "max_abs_loss_diff": 0.0, "max_rel_loss_diff": 0.0, "worst_step": None}
  for other in others:
    for step, (mine, theirs) in enumerate(zip(other, reference)):
      for name, value in theirs.items():
        if name not in mine:
          continue
        diff = abs(mine[name] - value)
        if diff > out["max_abs_loss_diff"]:
          out["max_abs_loss_diff"], out["worst_step"] = diff, {"step": step, "metric": name}
        if value:
          out["max_rel_loss_diff"] = max(out["max_rel_loss_diff"], diff / abs(value))
  return out


def compare_metrics(reference: dict, other: dict) -> dict:
  """Accuracies (``*acc*``) equal? Other numbers: the largest absolute difference; fields that
  are not numbers: equal? Timings (``*_s``) are left out."""
  accuracies = sorted(k for k in reference if "acc" in k)
  numbers = sorted(k for k, v in reference.items() if "acc" not in k and not k.endswith("_s")
                   and isinstance(v, (int, float)) and not isinstance(v, bool))
  others = sorted(k for k, v in reference.items() if not k.endswith("_s") and k not in numbers
                  and k not in accuracies)
  unequal = [k for k in accuracies if other.get(k) != reference[k]]
  return {"accuracies": {k: reference[k] for k in accuracies},
          "accuracies_equal": not unequal, "unequal_accuracies": unequal,
          "other_metrics": numbers,
          "max_abs_other_metric_diff": max((abs(other[k] - reference[k]) for k in numbers
                                            if k in other), default=0.0),
          "other_fields_equal": (all(other.get(k) == reference[k] for k in others)
                                 and all(k in other for k in numbers))}


def run_module(module: str, args: list[str]) -> None:
  """``python -m module args...`` in this process (``sys.argv`` as it would see it)."""
  sys.argv = [module, *args]
  runpy.run_module(module, run_name="__main__", alter_sys=True)


def main(argv: list[str]) -> None:
  if len(argv) < 3:
    print("error: usage: python -m megu_jax.harness.step_metrics PREFIX MODULE ARGS...",
          file=sys.stderr)
    sys.exit(2)
  import jax  # noqa: PLC0415 (jax.process_index: read at write time, after the run joined)
  record_step_metrics(argv[1], jax.process_index)
  run_module(argv[2], argv[3:])


if __name__ == "__main__":
  main(sys.argv)
