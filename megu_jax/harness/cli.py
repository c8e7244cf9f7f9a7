"""What the ``experiments.*`` commands share: stop signals, and failures reported in one line.

A failure the project anticipates prints one line ``error: <what, naming the field, value or
file>`` on stderr and exits non-zero, without a traceback; ``--verbose`` adds the traceback, and an
unexpected error (a bug) always shows it. Exit codes:

- 2: bad input (a config field, a flag, an input file that is damaged or does not fit): nothing
  was computed, or nothing that a rerun with the input fixed would not reuse;
- 1: a fault during the run (a damaged checkpoint with nothing to fall back to, a NaN, a failed
  Gemini request) or an unexpected error;
- 128 + n: stopped by signal n (143 for SIGTERM, 130 for Ctrl-C); rerunning resumes.

Any Gemini API key in the environment is removed from everything printed here.

Every command can run as N processes, one per host (docs/scaling.md): ``--coordinator_address=
HOST:PORT --num_processes=N --process_id=I`` on each, or ``--distributed=auto`` on a cluster JAX
detects (Cloud TPU, SLURM, Open MPI). :func:`run` joins them (:mod:`megu_jax.distributed`) before
any JAX call; a process that fails tells the others, and all of them stop with one line each.
"""
from __future__ import annotations

import os
import re
import sys
import traceback
from typing import Any, Callable

from absl import app
from absl import flags
from absl import logging

from megu_jax import distributed
from megu_jax import interruption
from megu_jax import xla_cpu
from megu_jax.oracles import gemini

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "On a failure, print the traceback after the one-line error.")
_DISTRIBUTED = flags.DEFINE_enum(
    "distributed", "none", list(distributed.DISTRIBUTED_MODES),
    "auto: join a multi-process run through jax.distributed.initialize()'s cluster detection "
    "(Cloud TPU, SLURM, Open MPI); none: one process unless --coordinator_address, "
    "--num_processes and --process_id are given.")
_COORDINATOR_ADDRESS = flags.DEFINE_string(
    "coordinator_address", None, "Multi-process run: HOST:PORT of process 0, the same for all.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None,
                                      "Multi-process run: how many processes (N).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None,
                                   "Multi-process run: this process's id, 0..N-1.")
_INIT_TIMEOUT_S = flags.DEFINE_float(
    "distributed_init_timeout_s", distributed.DEFAULT_INIT_TIMEOUT_S,
    "Multi-process run: how long to wait for every process to connect.")
_HEARTBEAT_TIMEOUT_S = flags.DEFINE_float(
    "distributed_heartbeat_timeout_s", distributed.DEFAULT_HEARTBEAT_TIMEOUT_S,
    "Multi-process run: a peer silent this long is dead or stopped; every process stops.")
_STALL_TIMEOUT_S = flags.DEFINE_float(
    "distributed_stall_timeout_s", distributed.DEFAULT_STALL_TIMEOUT_S,
    "Multi-process run: a peer that makes no progress this long while the others wait for it "
    "has stalled; every process stops.")


def scrub(text: str) -> str:
  """``text`` without the value of any Gemini API key variable that is set."""
  for name in gemini.API_KEY_ENV_VARS:
    secret = os.environ.get(name, "").strip()
    if secret:
      text = text.replace(secret, "[REDACTED]")
  return text


def one_line(error: BaseException) -> str:
  return scrub(" ".join(str(error).split()) or type(error).__name__)


def exit_code(error: BaseException) -> int | None:
  """The exit code of an anticipated failure; None for an unexpected one."""
  if isinstance(error, interruption.Interrupted):
    return error.exit_code
  # Before ValueError: a missing API key is both a Gemini error and bad input; it is input.
  if isinstance(error, (ValueError, FileNotFoundError)):
    return EXIT_BAD_INPUT
  if isinstance(error, (FloatingPointError, gemini.GeminiOracleError, OSError,
                        distributed.PeerFailure)):
    return EXIT_FAILED
  # Looked up, not imported: build_transition fails fast without loading orbax and jax, and a
  # CheckpointError can only come from a program that loaded them.
  checkpoints = sys.modules.get("megu_jax.checkpoints")
  if checkpoints is not None and isinstance(error, checkpoints.CheckpointError):
    return EXIT_FAILED
  return None


def report(error: BaseException, verbose: bool = False) -> int:
  """Prints ``error`` as the commands do and returns the exit code."""
  code = exit_code(error)
  if code is None or verbose:
    lines = traceback.format_exception(type(error), error, error.__traceback__)
    print(scrub("".join(lines)).rstrip("\n"), file=sys.stderr)
  if code is None:
    print(f"error: unexpected {type(error).__name__}: {one_line(error)}", file=sys.stderr)
    return EXIT_FAILED
  print(f"error: {one_line(error)}", file=sys.stderr)
  return code


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parser, with a bad flag (or config override) as one line instead of a usage dump."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    print(f"error: {one_line(error)}", file=sys.stderr)
  except (AttributeError, KeyError) as error:  # ml_collections: --config.<unknown field>=...
    # Its message is the field's repr, nested in quotes and escapes, maybe with a suggestion.
    text = str(error)
    field = re.search(r"[A-Za-z_][A-Za-z0-9_]*", text)
    field = field.group(0) if field else text
    named = [arg.split("=")[0] for arg in argv[1:]
             if arg.startswith("--config.") and field in arg.split("=")[0].split(".")]
    suggestion = re.search(r'Did you mean "([^"]+)"', text)
    print(f"error: {named[0] if named else 'a --config override'}: the config has no field "
          f"{field!r}" + (f"; did you mean {suggestion.group(1)!r}?" if suggestion else ""),
          file=sys.stderr)
  sys.exit(EXIT_BAD_INPUT)


def verbose() -> bool:
  return _VERBOSE.value


def distributed_spec() -> distributed.DistributedSpec:
  """The multi-process flags of this command line (after they were parsed)."""
  return distributed.DistributedSpec(
      mode=_DISTRIBUTED.value, coordinator_address=_COORDINATOR_ADDRESS.value,
      num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
      init_timeout_s=_INIT_TIMEOUT_S.value, heartbeat_timeout_s=_HEARTBEAT_TIMEOUT_S.value,
      stall_timeout_s=_STALL_TIMEOUT_S.value)


def start_distributed() -> bool:
  """Joins the multi-process run the flags describe (before any JAX call); returns whether.

  A process other than 0 also turns off the progress bars of the command's ``--config`` (its
  ``progress`` field): one bar per run, process 0's.

  Raises:
    distributed.DistributedInputError: a bad flag value (exit code 2 through :func:`report`).
  """
  if not distributed.initialize(distributed_spec()):
    return False
  config = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
  if not distributed.is_primary() and config is not None and "progress" in config:
    with config.unlocked():
      config.progress = False
  return True


def run(main: Callable[[], Any]) -> None:
  """Runs ``main()`` as a command: absl flags, stop signals, failures as one line; exits.

  First of all it applies the XLA:CPU settings (:mod:`megu_jax.xla_cpu`), before JAX's backend
  starts; after parsing the flags it joins a multi-process run when they ask for one
  (:func:`start_distributed`), before ``main`` makes any JAX call. With several processes, a
  process that fails announces its error to the others, which stop with it
  (:func:`megu_jax.distributed.end_with_error`).
  """
  xla_cpu.apply_cpu_defaults()

  def wrapped(argv: list[str]) -> int:
    if len(argv) > 1:
      print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
      return EXIT_BAD_INPUT
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    try:
      start_distributed()
    except distributed.DistributedInputError as error:
      return report(error, verbose())
    interruption.raise_on_stop_signals()
    try:
      main()
      distributed.finish()
    except Exception as error:  # pylint: disable=broad-except  (the contract: one line, non-zero)
      return _failed(error)
    except interruption.Interrupted as error:
      return _failed(error)
    return 0

  app.run(wrapped, flags_parser=parse_flags)


def _failed(error: BaseException) -> int:
  """Reports ``error``; with several processes, ends this one, telling the others why."""
  if not distributed.claim_end():  # the watchdog is ending this process, saying why
    distributed.wait_for_end()
  error = distributed.as_peer_failure(error)
  code = report(error, verbose())
  distributed.end_with_error(one_line(error), code)  # returns only in a single process
  return code
