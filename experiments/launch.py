r"""Runs a command as N processes on this machine, as a multi-host job would (docs/scaling.md).

  python -m experiments.launch --num_processes=2 --local_devices=2 -- \
      python -m experiments.train --config=megu_jax/configs/digits.py --workdir=runs/digits2

For trying multi-process runs on one machine, and for the tests. It picks a free port on
``--host``, starts the command N times with ``--coordinator_address=HOST:PORT --num_processes=N
--process_id=I`` appended (and, with ``--local_devices=D``, D CPU devices each through
``XLA_FLAGS=--xla_force_host_platform_device_count=D``), each in its own process group. Process
0's output is this command's; process I's goes to ``process_I.log`` in ``--output_dir``
(default: the command's ``--workdir``). It prints ``launch: process I: pid P`` for each on stderr.

It stops every process it started, by its process group, when one fails (after ``--grace_s``, for
the others to stop by themselves with their own line), when ``--timeout_s`` passes, or when it is
sent SIGTERM or Ctrl-C (passed on to them first: they checkpoint and exit, as a single process
does); and, on Linux, when it is itself killed. It then exits non-zero with one line ``error:
...`` naming the process that failed: with its exit code (128 + n for signal n), 1 for the
timeout, 2 for bad input.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time

from absl import app
from absl import flags

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2
# How long after SIGTERM a process group gets before SIGKILL.
_KILL_AFTER_S = 5.0
_POLL_S = 0.1
_LAUNCHER_FLAGS = ("coordinator_address", "num_processes", "process_id")



def define_flags() -> None:
  """The launcher's flags, defined only when it runs as a command: importing this module (the
  tests, experiments.bench_scaling) must not clash with the commands' own ``--num_processes``."""
  flags.DEFINE_integer("num_processes", None, "How many processes to start.")
  flags.DEFINE_integer("local_devices", 0,
                       "CPU devices per process (XLA_FLAGS); 0 leaves the device count alone.")
  flags.DEFINE_string("host", "127.0.0.1", "The coordinator's host (process 0 runs here).")
  flags.DEFINE_float("timeout_s", 0.0, "Stop every process after this many seconds (0: no limit).")
  flags.DEFINE_float(
      "grace_s", 30.0, "After a process fails (or a stop signal), how long the others get to "
      "stop by themselves before they are killed.")
  flags.DEFINE_string("output_dir", None,
                      "Where process_I.log go (default: the command's --workdir).")
  flags.mark_flag_as_required("num_processes")


class LaunchInputError(ValueError):
  """A bad launcher flag or command; nothing was started."""


@dataclasses.dataclass
class Process:
  """One started process of the command: its index, its Popen, where its output goes."""
  index: int
  popen: subprocess.Popen
  log_path: str | None

  @property
  def pid(self) -> int:
    return self.popen.pid

  def describe(self, count: int) -> str:
    return f"process {self.index} of {count} (pid {self.pid})"


def free_port(host: str = "127.0.0.1") -> int:
  """A TCP port nothing listens on now (the OS's pick); the coordinator binds it soon after."""
  with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
    probe.bind((host.strip("[]"), 0))
    return probe.getsockname()[1]


def flag_value(command: list[str], name: str) -> str | None:
  """The value of ``--name=VALUE`` (or ``--name VALUE``) in ``command``; None when absent."""
  for i, arg in enumerate(command):
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
    if arg == f"--{name}" and i + 1 < len(command):
      return command[i + 1]
  return None


def check_command(command: list[str], num_processes: int, local_devices: int) -> None:
  """Fails before starting anything, naming what is wrong."""
  if not command:
    raise LaunchInputError("no command: give it after --, e.g. -- python -m experiments.train "
                           "--config=... --workdir=...")
  if num_processes is None or num_processes < 1:
    raise LaunchInputError(f"--num_processes={num_processes} must be at least 1")
  if local_devices < 0:
    raise LaunchInputError(f"--local_devices={local_devices} must be >= 0 (0: leave it alone)")
  for name in _LAUNCHER_FLAGS:
    if flag_value(command, name) is not None or f"--{name}" in command:
      raise LaunchInputError(f"the command sets --{name}; the launcher sets it for each process")


def process_env(local_devices: int, environ=os.environ) -> dict[str, str]:
  """The environment of every process: ``environ``, with ``local_devices`` CPU devices if > 0."""
  env = dict(environ)
  if local_devices:
    kept = [f for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count=")]
    env["XLA_FLAGS"] = " ".join(kept + [f"--xla_force_host_platform_device_count={local_devices}"])
  return env


def _die_with_parent() -> None:
  """In the child, before exec: Linux kills it when the launcher dies, however it dies."""
  try:
    import ctypes  # noqa: PLC0415
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
  except (OSError, AttributeError):  # not Linux: the launcher's own stopping must do
    pass


def start(command: list[str], num_processes: int, *, local_devices: int = 0,
          host: str = "127.0.0.1", log_dir: str | None = None, capture_first: bool = False,
          environ=os.environ) -> list[Process]:
  """Starts ``command`` ``num_processes`` times, each told the coordinator, N and its id.

  Process 0 writes to this process's stdout and stderr (to a pipe, ``popen.stdout``, with
  ``capture_first``), the others to ``log_dir/process_I.log``. Each runs in its own session, so
  that stopping its process group stops whatever it started.
  """
  address = f"{host}:{free_port(host)}"
  env = process_env(local_devices, environ)
  if num_processes > 1:
    os.makedirs(log_dir, exist_ok=True)
  started = []
  try:
    for index in range(num_processes):
      argv = command + [f"--coordinator_address={address}", f"--num_processes={num_processes}",
                        f"--process_id={index}"]
      log_path = None
      if index == 0:
        out = subprocess.PIPE if capture_first else None
        err = subprocess.STDOUT if capture_first else None
      else:
        log_path = os.path.join(log_dir, f"process_{index}.log")
        out, err = open(log_path, "w", encoding="utf-8"), subprocess.STDOUT
      try:
        popen = subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True,
                                 start_new_session=True, preexec_fn=_die_with_parent)
      finally:
        if log_path is not None:
          out.close()  # the child holds its own descriptor
      started.append(Process(index, popen, log_path))
  except BaseException:
    stop(started)
    raise
  return started


def _signal_group(process: Process, signum: int) -> None:
  try:
    os.killpg(process.pid, signum)  # its session's group: the process and all it started
  except ProcessLookupError:
    pass


def group_alive(process: Process) -> bool:
  """Whether anything of ``process``'s process group is still running."""
  process.popen.poll()
  try:
    os.killpg(process.pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def stop(processes: list[Process], kill_after_s: float = _KILL_AFTER_S) -> None:
  """SIGTERM to every process group still running, SIGKILL to those left after ``kill_after_s``;
  returns when every process has been waited for and every group is empty."""
  running = [p for p in processes if group_alive(p)]
  for process in running:
    _signal_group(process, signal.SIGTERM)
    _signal_group(process, signal.SIGCONT)  # a stopped process handles SIGTERM only when resumed
  deadline = time.monotonic() + kill_after_s
  while any(group_alive(p) for p in running) and time.monotonic() < deadline:
    time.sleep(_POLL_S)
  for process in running:
    if group_alive(process):
      _signal_group(process, signal.SIGKILL)
  for process in processes:
    process.popen.wait()
  while any(group_alive(p) for p in processes):  # the group's other members die with SIGKILL
    time.sleep(_POLL_S)


def exit_description(returncode: int) -> tuple[str, int]:
  """(words, exit code in the shell's convention) of a Popen return code."""
  if returncode < 0:
    return f"was killed by {signal.Signals(-returncode).name}", 128 - returncode
  return f"exited with code {returncode}", returncode


@dataclasses.dataclass
class _Stop:
  """A stop signal the launcher received (None: none yet)."""
  signum: int | None = None


def supervise(processes: list[Process], *, timeout_s: float = 0.0, grace_s: float = 30.0,
              stop_request: _Stop | None = None) -> tuple[int, str | None]:
  """Waits for the processes; returns (exit code, the ``error:`` line or None when all ended 0).

  The first process to fail is the one named. The others then get ``grace_s`` to end by
  themselves (their watchdog stops them with their own line) before :func:`stop` ends them. A
  stop signal is passed on to every process group, which then gets ``grace_s`` as well.
  """
  stop_request = stop_request or _Stop()
  count = len(processes)
  start_time = time.monotonic()
  failure: tuple[int, str] | None = None
  deadline = None  # when the remaining processes are stopped
  forwarded = False
  while True:
    for process in processes:
      code = process.popen.poll()
      # After a stop signal was passed on, a process ending 128 + n is doing as it was told.
      if code not in (None, 0) and failure is None and not forwarded:
        words, exit_code = exit_description(code)
        where = f"; its output: {process.log_path}" if process.log_path else ""
        failure = (exit_code, f"{process.describe(count)} {words}{where}")
        deadline = time.monotonic() + grace_s
    if all(p.popen.poll() is not None for p in processes):
      break
    if stop_request.signum is not None and not forwarded:
      for process in processes:
        _signal_group(process, stop_request.signum)
      forwarded = True
      deadline = min(deadline or float("inf"), time.monotonic() + grace_s)
    if timeout_s and failure is None and time.monotonic() - start_time > timeout_s:
      failure = (EXIT_FAILED, f"the {count} processes did not finish within --timeout_s="
                              f"{timeout_s:g} s; stopped them")
      deadline = time.monotonic()
    if deadline is not None and time.monotonic() >= deadline:
      break
    time.sleep(_POLL_S)
  stop(processes)
  if stop_request.signum is not None and failure is None:
    return 128 + stop_request.signum, None
  if failure is None:
    return 0, None
  return failure


def main(argv: list[str]) -> int:
  options = flags.FLAGS
  command = argv[1:]
  try:
    check_command(command, options.num_processes, options.local_devices)
    log_dir = options.output_dir or flag_value(command, "workdir")
    if log_dir is None and options.num_processes > 1:
      raise LaunchInputError("the command has no --workdir for the other processes' output: "
                             "give --output_dir")
  except LaunchInputError as error:
    print(f"error: {error}", file=sys.stderr)
    return EXIT_BAD_INPUT
  stop_request = _Stop()

  def on_stop_signal(signum, frame):
    del frame
    stop_request.signum = signum

  for signum in (signal.SIGTERM, signal.SIGINT):
    signal.signal(signum, on_stop_signal)
  processes = start(command, options.num_processes, local_devices=options.local_devices,
                    host=options.host, log_dir=log_dir)
  for process in processes:
    where = f", output in {process.log_path}" if process.log_path else ""
    print(f"launch: process {process.index}: pid {process.pid}{where}", file=sys.stderr,
          flush=True)
  code, line = supervise(processes, timeout_s=options.timeout_s, grace_s=options.grace_s,
                         stop_request=stop_request)
  if code:
    for process in processes:
      print(f"launch: process {process.index} "
            f"{exit_description(process.popen.returncode)[0]}", file=sys.stderr)
  if line is not None:
    print(f"error: {line}", file=sys.stderr, flush=True)
  return code


if __name__ == "__main__":
  define_flags()
  app.run(main)
