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

from megu_jax import interruption
from megu_jax import xla_cpu
from megu_jax.oracles import gemini

EXIT_FAILED = 1
EXIT_BAD_INPUT = 2

_VERBOSE = flags.DEFINE_bool("verbose", False,
                             "On a failure, print the traceback after the one-line error.")


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
  if isinstance(error, (FloatingPointError, gemini.GeminiOracleError, OSError)):
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


def run(main: Callable[[], Any]) -> None:
  """Runs ``main()`` as a command: absl flags, stop signals, failures as one line; exits.

  First of all it applies the XLA:CPU settings (:mod:`megu_jax.xla_cpu`), before JAX's backend
  starts.
  """
  xla_cpu.apply_cpu_defaults()

  def wrapped(argv: list[str]) -> int:
    if len(argv) > 1:
      print(f"error: unexpected arguments {argv[1:]}", file=sys.stderr)
      return EXIT_BAD_INPUT
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    interruption.raise_on_stop_signals()
    try:
      main()
    except Exception as error:  # pylint: disable=broad-except  (the contract: one line, non-zero)
      return report(error, verbose())
    except interruption.Interrupted as error:
      return report(error, verbose())
    return 0

  app.run(wrapped, flags_parser=parse_flags)
