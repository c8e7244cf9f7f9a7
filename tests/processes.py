"""Commands as real subprocesses, for the tests that run them (test_faults.py, test_distributed.py).

:func:`command_env` is the environment they run in; :class:`Streamed` starts one, reads its stdout
lines in a thread (so that a test can wait for a line, then send a signal) and keeps its stderr
in a file.
"""
import os
import pathlib
import queue
import subprocess
import threading

import jax
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


def command_env(**extra):
  """This process's environment (conftest's two fake devices included), with the repository on
  the path, this session's compilation cache shared, and ``extra``."""
  env = dict(os.environ)
  env.update({
      "PYTHONPATH": str(REPO),
      # The commands share this session's compilation cache (eager init ops included).
      "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir or "",
      "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
      "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
      "PACED_PAUSE_S": "0.3",
  })
  env.update(extra)
  return env


class Streamed:
  """``argv`` in a subprocess (in the repository); stdout lines are read in a thread, stderr goes
  to ``stderr_path``. ``name`` says what it is in a failure; ``wait_s`` bounds every wait."""

  def __init__(self, argv, *, stderr_path, env, name, wait_s):
    self.name = name
    self.wait_s = wait_s
    self.stderr_path = stderr_path
    with open(stderr_path, "w", encoding="utf-8") as stderr:
      self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                   stderr=stderr, text=True)
    self.lines = queue.Queue()
    self.stdout = []
    threading.Thread(target=self._pump, daemon=True).start()

  def _pump(self):
    for line in self.proc.stdout:
      self.lines.put(line)
    self.lines.put(None)

  def wait_for(self, prefix):
    """The first stdout line starting with ``prefix``; fails if the command ends first."""
    while True:
      try:
        line = self.lines.get(timeout=self.wait_s)
      except queue.Empty:
        self.proc.kill()
        pytest.fail(f"{self.name}: no {prefix!r} within {self.wait_s} s")
      if line is None:
        self.proc.wait()
        pytest.fail(f"{self.name} ended (rc {self.proc.returncode}) before {prefix!r}: "
                    f"{self.stderr_path.read_text()}")
      self.stdout.append(line)
      if line.startswith(prefix):
        return line

  def finish(self):
    """(exit code, stdout, stderr) once the command has ended; fails (killing it) if it does not
    end within ``wait_s``."""
    try:
      self.proc.wait(timeout=self.wait_s)
    except subprocess.TimeoutExpired:
      self.proc.kill()
      pytest.fail(f"{self.name} did not end within {self.wait_s} s")
    while (line := self.lines.get(timeout=self.wait_s)) is not None:
      self.stdout.append(line)
    return self.proc.returncode, "".join(self.stdout), self.stderr_path.read_text()
