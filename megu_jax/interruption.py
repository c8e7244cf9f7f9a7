"""Stopping on SIGTERM or Ctrl-C without losing work.

Batch schedulers send SIGTERM some seconds before they kill a job. Inside a training loop
(:func:`deferred_stop_signals`) the signal only raises a flag: the loop finishes its step, saves a
checkpoint and raises :class:`Interrupted`, so that rerunning the same command resumes there.
Everywhere else (:func:`raise_on_stop_signals`, installed by the ``experiments.*`` commands) the
signal raises :class:`Interrupted` at once: every file the project writes is written atomically,
so stopping mid-way leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import threading
from typing import Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
  """A stop signal ended the run; rerunning the same command resumes it.

  A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` swallows it.
  """

  def __init__(self, message: str, signum: int):
    super().__init__(message)
    self.signum = signum

  @property
  def exit_code(self) -> int:
    return 128 + self.signum  # the shell's convention for "ended by signal n"


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


@dataclasses.dataclass
class StopRequest:
  """``signum`` is the stop signal received since the request was made (None: none yet)."""
  signum: int | None = None

  @property
  def requested(self) -> bool:
    return self.signum is not None


def _in_main_thread() -> bool:
  # Python delivers signals to the main thread only, and only it may install handlers.
  return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def deferred_stop_signals() -> Iterator[StopRequest]:
  """Within the block, a stop signal only sets ``signum`` of the yielded request.

  A second signal while the first is pending raises :class:`Interrupted` at once: the user who
  presses Ctrl-C twice means it.
  """
  request = StopRequest()
  if not _in_main_thread():
    yield request
    return

  def handler(signum, frame):
    del frame
    if request.requested:
      raise Interrupted(f"stopped by a second {signal_name(signum)} before the current step "
                        "ended; nothing was saved since the last checkpoint", signum)
    request.signum = signum

  previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
  for signum in STOP_SIGNALS:
    signal.signal(signum, handler)
  try:
    yield request
  finally:
    for signum, old in previous.items():
      signal.signal(signum, old)


def raise_on_stop_signals() -> None:
  """From now on, a stop signal raises :class:`Interrupted` wherever the program is."""
  if not _in_main_thread():
    return

  def handler(signum, frame):
    del frame
    raise Interrupted(f"stopped by {signal_name(signum)}; finished work is kept (every file is "
                      "written atomically): rerun the same command to continue", signum)

  for signum in STOP_SIGNALS:
    signal.signal(signum, handler)
