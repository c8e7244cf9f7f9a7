"""One program as several processes (one per host) through ``jax.distributed``; bounded failure.

A multi-process run is N copies of the same command, each told the coordinator's address, N and
its own id (or, with ``auto``, finding them in the cluster's environment: Cloud TPU, SLURM, Open
MPI). :func:`initialize` joins them before any other JAX call; from then on ``jax.devices()`` is
the global device list, :class:`~megu_jax.parallel.DataParallel` spans it, and every process runs
the same code on the same data, feeding only its own rows of each global batch. Files are written
by process 0 alone, each followed by a barrier (:func:`barrier`), so that no process reads a file
before it exists; checkpoints are written by all processes together (orbax).

JAX's runtime, left alone, ends a multi-process job badly: a peer that never arrives aborts the
others (SIGABRT) only after ``initialization_timeout``; a peer that dies makes the survivors wait
in their next collective until the coordination service's heartbeat timeout aborts them; a peer
that stalls while alive makes them wait forever. Here every process runs a :class:`Watchdog`
thread that publishes a heartbeat and a progress count in the coordination service's key-value
store and reads everyone else's, so that each of these ends every process within a configured
time with one line ``error: ...`` on stderr, before JAX's own (longer) heartbeat timeout fires:

- a process that does not connect within ``init_timeout_s``;
- a peer whose heartbeat stops for ``heartbeat_timeout_s`` (killed, stopped, lost its network);
- a peer that is alive but makes no progress for ``stall_timeout_s`` while others wait for it;
- a peer that failed: a failing process announces its one-line error before it exits, and the
  others stop with it at once (with its exit code).

One case stays JAX's: when process 0, which hosts the coordination service, dies, JAX's runtime
terminates the others at once (SIGABRT, with its own message) before any Python code can run.

Nothing here imports JAX at module level: :mod:`megu_jax.io_utils` asks it whether to write, and
the commands that never load JAX must not pay for it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
import threading
import time
from typing import Any, Callable

DISTRIBUTED_MODES = ("none", "auto")
DEFAULT_INIT_TIMEOUT_S = 60.0
DEFAULT_HEARTBEAT_TIMEOUT_S = 20.0
DEFAULT_STALL_TIMEOUT_S = 120.0
EXIT_FAILED = 1

# Keys of this module in the coordination service's key-value store.
_KEY_PREFIX = "megu_jax"
# How much later than ours JAX's own timeouts fire, so that ours (with a clear line) come first.
_JAX_TIMEOUT_SLACK_S = 30.0
# How long a process that announced its end waits for every other to announce theirs: process 0
# hosts the coordination service, and if it exited first JAX would abort the others before they
# print their line; any other process, if it exited first, would make the others' next collective
# fail before they read why.
_EXIT_GRACE_S = 5.0
# How long a process that learns of a peer's end lets its own main thread end first (a stop that
# every process agreed on ends them all within this).
_PEER_END_GRACE_S = 2.0


class DistributedInputError(ValueError):
  """A bad multi-process flag value, or a coordinator address that cannot be used."""


class PeerFailure(RuntimeError):
  """A collective (or barrier) with the other processes failed: one of them died or hung."""


# How the collectives' own errors read when a peer is gone (gloo on CPU, NCCL on GPU) or late.
_PEER_FAILURE_SIGNS = ("gloo", "nccl", "connection closed by peer", "connection reset by peer",
                       "socket closed", "barrier timed out")


def as_peer_failure(error: BaseException) -> BaseException:
  """``error`` as a :class:`PeerFailure` when it is a multi-process collective's failure."""
  text = " ".join(str(error).split())
  # Whatever its type: JAX raises a failed collective again as a ValueError at the next dispatch.
  if (not is_multi_process() or isinstance(error, (PeerFailure, DistributedInputError))
      or not any(sign in text.lower() for sign in _PEER_FAILURE_SIGNS)):
    return error
  return PeerFailure(f"process {process_index()}: a collective with the other processes failed, "
                     f"so one of them died or hung ({text[:300]})")


@dataclasses.dataclass(frozen=True)
class DistributedSpec:
  """How this process joins a multi-process run; the default is a single process.

  ``mode`` ``"auto"`` lets JAX find the coordinator, N and the process id in the cluster's
  environment (any of the three given here overrides what it finds); ``"none"`` runs as a
  single process unless ``coordinator_address``, ``num_processes`` and ``process_id`` are all
  given. Timeouts are in seconds.
  """
  mode: str = "none"
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  init_timeout_s: float = DEFAULT_INIT_TIMEOUT_S
  heartbeat_timeout_s: float = DEFAULT_HEARTBEAT_TIMEOUT_S
  stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S

  @property
  def explicit(self) -> bool:
    return any(v is not None for v in (self.coordinator_address, self.num_processes,
                                       self.process_id))

  @property
  def enabled(self) -> bool:
    """Whether this process joins a multi-process run (possibly of one process)."""
    return self.mode == "auto" or self.explicit


_ADDRESS = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):(?P<port>[0-9]{1,5})$")


def parse_address(address: str) -> tuple[str, int]:
  """``HOST:PORT`` (``[IPv6]:PORT`` too) -> ``(host, port)``; DistributedInputError otherwise."""
  match = _ADDRESS.match(address or "")
  if not match or not 1 <= int(match.group("port")) <= 65535:
    raise DistributedInputError(
        f"--coordinator_address={address!r} is not HOST:PORT with a port in 1..65535 (e.g. "
        "10.0.0.1:1234, the address of process 0)")
  return match.group("host"), int(match.group("port"))


def check_spec(spec: DistributedSpec) -> None:
  """Fails before any compute, naming the flag, its value and what is allowed."""
  if spec.mode not in DISTRIBUTED_MODES:
    raise DistributedInputError(f"--distributed={spec.mode!r} is not one of {DISTRIBUTED_MODES}")
  for name in ("init_timeout_s", "heartbeat_timeout_s", "stall_timeout_s"):
    value = getattr(spec, name)
    if not value > 0:
      raise DistributedInputError(f"--distributed_{name}={value} must be positive")
  if spec.mode == "none" and spec.explicit:
    missing = [f"--{name}" for name in ("coordinator_address", "num_processes", "process_id")
               if getattr(spec, name) is None]
    if missing:
      raise DistributedInputError(
          f"{', '.join(missing)} missing: --coordinator_address, --num_processes and "
          "--process_id go together (or use --distributed=auto on a cluster JAX detects)")
  if spec.num_processes is not None and spec.num_processes < 1:
    raise DistributedInputError(f"--num_processes={spec.num_processes} must be at least 1")
  if spec.process_id is not None:
    if spec.process_id < 0:
      raise DistributedInputError(f"--process_id={spec.process_id} must be >= 0")
    if spec.num_processes is not None and spec.process_id >= spec.num_processes:
      raise DistributedInputError(
          f"--process_id={spec.process_id} must be below --num_processes={spec.num_processes} "
          f"(ids run 0..{spec.num_processes - 1})")
  if spec.coordinator_address is not None:
    parse_address(spec.coordinator_address)


# --- who am I ----------------------------------------------------------------------------------
def _jax_if_distributed():
  """The jax module when this process joined a multi-process run; None otherwise (no import)."""
  jax = sys.modules.get("jax")
  if jax is None or not jax.distributed.is_initialized():
    return None
  return jax


def is_multi_process() -> bool:
  """Whether this process is one of several (``jax.distributed`` initialised, N > 1)."""
  jax = _jax_if_distributed()
  return jax is not None and jax.process_count() > 1


def process_index() -> int:
  jax = _jax_if_distributed()
  return 0 if jax is None else jax.process_index()


def is_primary() -> bool:
  """Whether this process writes the run's files and draws its progress bars (process 0)."""
  return process_index() == 0


def _client():
  from jax._src import distributed as jax_distributed  # noqa: PLC0415 (no public accessor)
  return jax_distributed.global_state.client


# --- initialisation ----------------------------------------------------------------------------
@dataclasses.dataclass
class _State:
  spec: DistributedSpec | None = None
  watchdog: "Watchdog | None" = None
  barriers: int = 0
  progress: int = 0
  ending: bool = False
  end_lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


_STATE = _State()


def _say(line: str) -> None:
  """One ``error: ...`` line on stderr, flushed (the process may end right after)."""
  print(f"error: {line}", file=sys.stderr, flush=True)


def initialize(spec: DistributedSpec) -> bool:
  """Joins the multi-process run ``spec`` describes (before any other JAX call); returns whether.

  Starts the :class:`Watchdog`. A process that cannot reach all the others within
  ``spec.init_timeout_s`` prints one line and exits (code 1): JAX itself would abort, later.

  Raises:
    DistributedInputError: a bad flag value, no cluster found for ``auto``, or a coordinator
      address process 0 cannot listen on (the port is taken, or the host is not this machine).
  """
  check_spec(spec)
  if not spec.enabled:
    return False
  import jax  # noqa: PLC0415 (only for a multi-process run)
  who = (f"process {spec.process_id} of {spec.num_processes}" if spec.process_id is not None
         else "this process")
  where = spec.coordinator_address or "the address the cluster gives"

  def timed_out():
    _say(f"{who}: not every process reached the coordinator at {where} within "
         f"{spec.init_timeout_s:g} s (--distributed_init_timeout_s): a process did not start, or "
         "the processes disagree on --coordinator_address or --num_processes")
    os._exit(EXIT_FAILED)  # the main thread is inside JAX's connect, which cannot be interrupted

  timer = threading.Timer(spec.init_timeout_s, timed_out)
  timer.daemon = True
  timer.start()
  try:
    jax.distributed.initialize(
        coordinator_address=spec.coordinator_address, num_processes=spec.num_processes,
        process_id=spec.process_id,
        initialization_timeout=int(spec.init_timeout_s + _JAX_TIMEOUT_SLACK_S),
        heartbeat_timeout_seconds=int(spec.heartbeat_timeout_s + _JAX_TIMEOUT_SLACK_S),
        # Bounds the wait at exit for a peer that never ends: the watchdog has stopped by then.
        shutdown_timeout_seconds=int(spec.heartbeat_timeout_s))
  except ValueError as error:  # auto: nothing detected
    raise DistributedInputError(
        f"--distributed={spec.mode}: {error} (no Cloud TPU, SLURM or Open MPI environment "
        "found; give --coordinator_address, --num_processes and --process_id)") from error
  except Exception as error:  # noqa: BLE001 (jaxlib raises its runtime error type)
    if "Failed to start RPC server" in str(error):
      raise DistributedInputError(
          f"process 0 cannot listen on --coordinator_address={spec.coordinator_address}: the "
          "port is in use or the host is not this machine's; choose another port") from error
    raise
  finally:
    timer.cancel()
  _STATE.spec = spec
  if jax.process_count() > 1:
    _STATE.watchdog = Watchdog(_client(), jax.process_index(), jax.process_count(),
                               heartbeat_timeout_s=spec.heartbeat_timeout_s,
                               stall_timeout_s=spec.stall_timeout_s)
    _STATE.watchdog.start()
  return True


def finish() -> None:
  """The normal end of a multi-process run: waits for every process, then stops the watchdog.

  After it, JAX's own exit (``jax.distributed.shutdown`` at interpreter exit) finds every peer
  there. A peer that never arrives is the watchdog's to report.
  """
  if not is_multi_process():
    return
  barrier("finish")
  with _STATE.end_lock:
    _STATE.ending = True
  if _STATE.watchdog is not None:
    _STATE.watchdog.stop()


def claim_end() -> bool:
  """Whether this thread may end the process with its own error line (the first to ask may).

  The watchdog may already be ending it, with the reason (a peer's end, a stall): a second line
  (often the collective that then failed) would only hide it. Always True in a single process.
  """
  if not is_multi_process():
    return True
  with _STATE.end_lock:
    if _STATE.ending:
      return False
    _STATE.ending = True
    return True


def wait_for_end(timeout_s: float = 2 * _EXIT_GRACE_S) -> None:
  """Waits for the thread that claimed the end (:func:`claim_end`) to end the process."""
  time.sleep(timeout_s)


def end_with_error(line: str, exit_code: int) -> None:
  """A failing process's end: tells the others (who stop too), then exits with ``exit_code``.

  Call after printing the error. Exits without Python's clean-up (``os._exit``): a normal exit
  would wait for the others in JAX's shutdown barrier, which a peer stuck in a collective never
  reaches. It first waits (a few seconds at most) until every other process has announced its
  end too, so that each stops saying why rather than failing on a closed connection.
  """
  if not is_multi_process():
    return
  with _STATE.end_lock:
    _STATE.ending = True
  if _STATE.watchdog is not None:
    _STATE.watchdog.stop()
  _announce_end_and_exit(line, exit_code)


def _announce_end_and_exit(line: str, exit_code: int, announce: bool = True) -> None:
  """Exits, after telling the others (``announce``: not when the coordination service, which
  carries the message, is what failed)."""
  import jax  # noqa: PLC0415
  me, count = jax.process_index(), jax.process_count()
  client = _client()
  try:
    if not announce:
      raise ConnectionError("the coordination service is unreachable")
    client.key_value_set(f"{_KEY_PREFIX}/ended/{me}", f"{exit_code} {line}",
                         allow_overwrite=True)
    deadline = time.monotonic() + _EXIT_GRACE_S
    while time.monotonic() < deadline:
      ended = {key for key, _ in client.key_value_dir_get(f"{_KEY_PREFIX}/ended/")}
      if len(ended) >= count:
        break
      time.sleep(0.1)
    if me == 0:
      time.sleep(0.2)  # the last one to announce is on its way out
  except Exception:  # noqa: BLE001 (the service is gone: nobody is left to tell)
    pass
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(exit_code)


# --- synchronisation ---------------------------------------------------------------------------
def note_progress() -> None:
  """Counts one step of work (a batch placed, a step or barrier called): the watchdog's measure.

  Every process runs the same code, so the counts of healthy processes move together; the one
  that stops counting while the others wait for it is the one that stalled.
  """
  _STATE.progress += 1


def barrier(name: str) -> None:
  """Waits until every process has called ``barrier`` with this name the same number of times.

  A no-op in a single process. The wait is bounded by the stall timeout; the watchdog ends the
  run before that when a peer died or stalled.
  """
  if not is_multi_process():
    return
  note_progress()
  _STATE.barriers += 1
  timeout_s = (_STATE.spec.stall_timeout_s if _STATE.spec else DEFAULT_STALL_TIMEOUT_S)
  _client().wait_at_barrier(f"{_KEY_PREFIX}/{name}/{_STATE.barriers}",
                            int((timeout_s + _JAX_TIMEOUT_SLACK_S) * 1000))


def gather_rows(local_rows: Any) -> Any:
  """Every process's rows of a batch, concatenated in process order: ``[global batch, ...]``.

  ``local_rows``: a pytree of this process's rows (host arrays, or jax.Arrays sharded over the
  processes along the first axis). Identity in a single process.
  """
  if not is_multi_process():
    return local_rows
  from jax.experimental import multihost_utils  # noqa: PLC0415
  note_progress()
  return multihost_utils.process_allgather(local_rows, tiled=True)


class StopVote:
  """Whether any process was asked to stop, the same answer in every process at the same step.

  A stop signal reaches the processes at different steps, but a checkpoint must be written by
  all of them after the same step. Each :meth:`agreed` call casts this process's vote (a tiny
  collective, dispatched without waiting) and returns the previous call's result, which every
  process reads alike: the stop is agreed one step after the first process asked for it.
  """

  def __init__(self):
    import jax  # noqa: PLC0415
    import jax.numpy as jnp  # noqa: PLC0415
    import numpy as np  # noqa: PLC0415
    from jax.sharding import Mesh, NamedSharding, PartitionSpec  # noqa: PLC0415
    mesh = Mesh(np.asarray(sorted(jax.devices(), key=lambda d: (d.process_index, d.id))),
                ("processes",))
    self._np = np
    self._jax = jax
    self._sharding = NamedSharding(mesh, PartitionSpec("processes"))
    self._local_devices = sum(d.process_index == jax.process_index() for d in jax.devices())
    self._any = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))
    self._pending = None

  def agreed(self, requested: bool) -> bool:
    """Casts this process's vote (``requested``); returns the previous call's agreed answer."""
    votes = self._np.full((self._local_devices,), int(requested), self._np.int32)
    vote = self._any(self._jax.make_array_from_process_local_data(self._sharding, votes))
    previous, self._pending = self._pending, vote
    return previous is not None and bool(previous.addressable_data(0))


# --- the watchdog ------------------------------------------------------------------------------
@dataclasses.dataclass
class _Seen:
  """The last value read from one peer and when (this process's monotonic clock) it changed."""
  value: Any
  since: float


class StallDetector:
  """Which processes stalled: behind the furthest one, without moving, for ``stall_timeout_s``.

  A process blocked in a collective waits for the others without counting; the one it waits for
  is behind it. Processes level with the furthest are not stalled: they are all busy with the
  same work (a compilation, a data set being read), or all waiting for someone behind. The clock
  of a process starts when it is first seen behind with its current count, not at its last
  move: the work all processes share may take longer than the timeout.
  """

  def __init__(self, stall_timeout_s: float):
    self.stall_timeout_s = stall_timeout_s
    self._behind: dict[int, tuple[int, float]] = {}  # process -> (its count, behind since)

  def observe(self, counts: dict[int, int], now: float) -> list[int]:
    """``counts``: each process's latest progress count; returns the stalled ones, sorted."""
    if not counts:
      return []
    furthest = max(counts.values())
    for p, count in counts.items():
      if count >= furthest:
        self._behind.pop(p, None)
      elif self._behind.get(p, (None, 0.0))[0] != count:
        self._behind[p] = (count, now)
    return sorted(p for p, (_, since) in self._behind.items()
                  if now - since > self.stall_timeout_s)


class Watchdog:
  """Every ``poll_s``: publishes this process's heartbeat and progress, and checks the others'.

  Ends this process (one line, then ``os._exit``) when a peer announced its end, stopped sending
  heartbeats for ``heartbeat_timeout_s``, or stalled for ``stall_timeout_s`` while others waited
  for it (:class:`StallDetector`), or when the coordination service stops answering.
  """

  def __init__(self, client, process_id: int, num_processes: int, *,
               heartbeat_timeout_s: float, stall_timeout_s: float, poll_s: float | None = None,
               clock: Callable[[], float] = time.monotonic):
    self.client = client
    self.me = process_id
    self.count = num_processes
    self.heartbeat_timeout_s = heartbeat_timeout_s
    self.stall_timeout_s = stall_timeout_s
    self.poll_s = poll_s or min(1.0, heartbeat_timeout_s / 5)
    self.clock = clock
    self._stopped = threading.Event()
    self._last_answer = clock()
    self._threads = [threading.Thread(target=self._poll, name="megu_jax-watchdog", daemon=True),
                     threading.Thread(target=self._watch_service, name="megu_jax-watchdog-rpc",
                                      daemon=True)]

  def start(self) -> None:
    for thread in self._threads:
      thread.start()

  def stop(self) -> None:
    self._stopped.set()
    for thread in self._threads:
      if thread is not threading.current_thread():
        thread.join(timeout=self.poll_s * 5)

  def _end(self, line: str, exit_code: int = EXIT_FAILED, announce: bool = True) -> None:
    with _STATE.end_lock:
      if _STATE.ending or self._stopped.is_set():
        return  # the main thread is already ending this process, or it finished normally
      _STATE.ending = True
    _say(line)
    self._stopped.set()
    _announce_end_and_exit(line, exit_code, announce)

  def _watch_service(self) -> None:
    """Ends the process when the coordination service has not answered for the heartbeat time
    (the poll thread is then stuck in a call to it: process 0 is stopped or unreachable)."""
    while not self._stopped.wait(self.poll_s):
      silent_s = self.clock() - self._last_answer
      if silent_s > self.heartbeat_timeout_s and self.me == 0:  # its own service: it was frozen
        self._end(f"process 0 (the coordinator) did not run for more than "
                  f"{self.heartbeat_timeout_s:g} s (--distributed_heartbeat_timeout_s): it was "
                  "stopped, so the others have stopped; stopping", announce=False)
      elif silent_s > self.heartbeat_timeout_s:
        self._end(f"process {self.me}: the coordinator (process 0) has not answered for "
                  f"{self.heartbeat_timeout_s:g} s (--distributed_heartbeat_timeout_s): it is "
                  "stopped or unreachable; stopping", announce=False)

  def _poll(self) -> None:
    beat = 0
    start = self.clock()
    beats = {p: _Seen(None, start) for p in range(self.count) if p != self.me}
    counts: dict[int, int] = {}
    stalls = StallDetector(self.stall_timeout_s)
    while not self._stopped.wait(self.poll_s):
      beat += 1
      try:
        self.client.key_value_set(f"{_KEY_PREFIX}/beat/{self.me}", f"{beat} {_STATE.progress}",
                                  allow_overwrite=True)
        entries = dict(self.client.key_value_dir_get(f"{_KEY_PREFIX}/"))
      except Exception as error:  # noqa: BLE001 (jaxlib's runtime error: the service is gone)
        if not self._stopped.is_set():
          cause = " ".join(str(error).split())[:200]
          self._end(f"process {self.me}: lost the coordinator (process 0): {cause}; stopping",
                    announce=False)
        return
      now = self._last_answer = self.clock()
      if self._check_ended(entries):
        return
      for p in range(self.count):
        value = entries.get(f"{_KEY_PREFIX}/beat/{p}")
        if value is None:
          continue
        heartbeat, counts[p] = (int(v) for v in value.split())
        if p in beats and beats[p].value != heartbeat:
          beats[p] = _Seen(heartbeat, now)
      for p, seen in beats.items():
        if now - seen.since > self.heartbeat_timeout_s:
          self._end(f"process {p} sent no heartbeat for {self.heartbeat_timeout_s:g} s "
                    "(--distributed_heartbeat_timeout_s): it died, was stopped or lost its "
                    f"network; stopping process {self.me}")
          return
      stalled = stalls.observe(counts, now)
      if stalled:
        names = ", ".join(str(p) for p in stalled)
        where = ", ".join(f"{p}: {c}" for p, c in sorted(counts.items()))
        self._end(f"process(es) {names} made no progress for {self.stall_timeout_s:g} s "
                  f"(--distributed_stall_timeout_s) while the others waited for them (progress "
                  f"counts {where}): stalled; stopping process {self.me}")
        return

  def _check_ended(self, entries: dict[str, str]) -> bool:
    """Ends this process when another announced its end; returns whether one had."""
    for key, value in sorted(entries.items()):
      if not key.startswith(f"{_KEY_PREFIX}/ended/"):
        continue
      peer = int(key.rsplit("/", 1)[1])
      if peer == self.me:
        continue
      code, _, line = value.partition(" ")
      # A stop every process agreed on ends this one's main thread too: let it say so itself.
      deadline = self.clock() + _PEER_END_GRACE_S
      while self.clock() < deadline and not _STATE.ending:
        time.sleep(0.05)
      self._end(f"process {peer} ended with exit code {code} ({line}); stopping process "
                f"{self.me} too", int(code))
      return True
    return False
