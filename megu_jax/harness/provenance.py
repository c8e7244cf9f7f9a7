"""Where a result came from, recorded by the command that made it: no one types a date or a hash.

:func:`record` returns the command line, the code's git commit (and whether the work tree had
uncommitted changes to tracked files) as it was when the process started, the UTC date, the
machine and the library versions. Every result file the harness writes carries it under
``"provenance"``; ``experiments.report`` prints it under each table it renders.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from typing import Any

_REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def command_line() -> str:
  """How this process was started, as a user would type it (``python -m module args``)."""
  main = sys.modules.get("__main__")
  spec = getattr(main, "__spec__", None)
  module = spec.name if spec is not None and spec.name else os.path.basename(sys.argv[0])
  return " ".join(["python", "-m", module, *sys.argv[1:]])


def _git(*args: str) -> str | None:
  try:
    done = subprocess.run(["git", "-C", _REPOSITORY, *args], capture_output=True, text=True,
                          timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> dict[str, Any]:
  """``{"commit": sha or None, "dirty": bool or None}`` of the code that is running."""
  commit = _git("rev-parse", "HEAD")
  if commit is None:  # installed from a wheel, or no git: say so rather than guess
    return {"commit": None, "dirty": None}
  status = _git("status", "--porcelain", "--untracked-files=no")
  return {"commit": commit, "dirty": bool(status) if status is not None else None}


# The commit as this process loaded its code: a long run must not take a commit made while it
# ran (or the changes then in the work tree) for its own.
_LOADED_FROM = git_commit()


def loaded_commit() -> dict[str, Any]:
  """:func:`git_commit` as it was when this process loaded its code."""
  return dict(_LOADED_FROM)


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
  from importlib import metadata  # noqa: PLC0415
  found = {}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "scikit-learn"):
    try:
      found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return found


def record() -> dict[str, Any]:
  """Command line, commit (when the process started), date, machine and versions of this
  process, JSON-ready."""
  try:
    usable_cores = len(os.sched_getaffinity(0))
  except AttributeError:  # not on Linux
    usable_cores = os.cpu_count()
  return {
      "command": command_line(), **_LOADED_FROM,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "machine": {"cpu_model": cpu_model(), "cpu_count": os.cpu_count(),
                  "usable_cores": usable_cores, "platform": platform.platform(),
                  "python": platform.python_version(),
                  # How busy the cores were when the result was written: times are only
                  # comparable between quiet runs.
                  "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
                  "xla_flags": os.environ.get("XLA_FLAGS", "")},
      "versions": versions(),
  }


def describe(provenance: dict[str, Any] | None) -> str:
  """One line for a rendered table: command, commit, date, machine."""
  if not provenance:
    return "provenance: not recorded"
  commit = provenance.get("commit")
  commit = "not recorded" if not commit else commit[:12] + (" (uncommitted changes)"
                                                            if provenance.get("dirty") else "")
  machine = provenance.get("machine", {})
  load = machine.get("load_average_1_5_15")
  return (f"`{provenance.get('command', '?')}` — commit {commit}, {provenance.get('date', '?')}, "
          f"{machine.get('cpu_model', '?')} ({machine.get('usable_cores', '?')} cores"
          + (f", load average {load[0]:.1f} at the end" if load else "") + "), "
          f"jax {provenance.get('versions', {}).get('jax', '?')}")
