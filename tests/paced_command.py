"""Runs an ``experiments.*`` command unchanged, but announcing and pausing at its save points.

  python tests/paced_command.py experiments.train --config=... --workdir=...

After every checkpoint (and every benchmark method result) it prints ``EVENT checkpoint <step>
<directory>`` (``EVENT result <path>``) on stdout and sleeps ``PACED_PAUSE_S`` seconds, so that
a test can send a signal at a known point instead of racing a run that takes a second.
Nothing else changes: the command's own ``__main__`` runs, with its flags, handlers and exit code.
"""
import os
import runpy
import sys
import time

from megu_jax import checkpoints
from megu_jax import io_utils

_PAUSE_S = float(os.environ.get("PACED_PAUSE_S", "0.5"))


def _announce(line: str) -> None:
  print(f"EVENT {line}", flush=True)
  time.sleep(_PAUSE_S)


_save = checkpoints.Checkpointer.save


def _paced_save(self, step, state, meta, force=False):
  saved = _save(self, step, state, meta, force=force)
  if saved:
    _announce(f"checkpoint {step} {self.directory}")
  return saved


_write_json = io_utils.atomic_write_json


def _paced_write_json(path, obj):
  _write_json(path, obj)
  if f"{os.sep}methods{os.sep}" in path:
    _announce(f"result {path}")


checkpoints.Checkpointer.save = _paced_save
io_utils.atomic_write_json = _paced_write_json

if __name__ == "__main__":
  module = sys.argv[1]
  sys.argv = [module] + sys.argv[2:]
  runpy.run_module(module, run_name="__main__", alter_sys=True)
