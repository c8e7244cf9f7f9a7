"""XLA:CPU settings that make our training steps faster, applied before JAX starts its backend.

jaxlib 0.10 hands convolutions to YNNPACK. For the small channel counts of our models (16-128)
that path is slower than XLA's own (Eigen) convolutions, forward and backward: YNNPACK computes a
weight gradient with the batch as its feature axis, so XLA transposes each activation to
[channels, height, width, batch] first, and its fusion pass recomputes the BatchNorm/ReLU/residual
chain inside those transposes (docs/performance.md). Leaving YNNPACK its dot and reduction
fusions but not convolutions measured faster training on both models (paired runs, 2 CPU cores).

XLA reads ``XLA_FLAGS`` once, when the first computation creates the CPU client, so
:func:`apply_cpu_defaults` must run before that: the ``experiments/`` commands call it first
thing (``megu_jax.harness.cli.run`` and the benchmark scripts); a library user calls it
explicitly, or not at all -- ``import megu_jax`` never touches the environment. It adds the flag
only on jaxlib versions where it was measured (an unknown flag would abort the process), and
never over a choice of the user's: an ``XLA_FLAGS`` that already names the option wins, and
``MEGU_JAX_XLA_CPU_DEFAULTS=0`` turns the whole thing off.
"""
from __future__ import annotations

import os

_OPTION = "xla_cpu_experimental_ynn_fusion_type"
CPU_FLAGS = (f"--{_OPTION}=-individual_convolution",)
# jaxlib releases whose XLA knows the option (and where it was measured).
_TESTED_JAXLIB = ("0.10.",)


def _jaxlib_version() -> str | None:
  try:
    from importlib import metadata  # noqa: PLC0415
    return metadata.version("jaxlib")
  except Exception:  # noqa: BLE001 (no jaxlib distribution metadata: do nothing)
    return None


def apply_cpu_defaults(environ=os.environ) -> bool:
  """Appends :data:`CPU_FLAGS` to ``XLA_FLAGS`` when safe; returns whether it did.

  Raises:
    RuntimeError: JAX's backends already exist, so XLA would never read the flag.
  """
  if environ is os.environ and _backends_initialized():
    raise RuntimeError("megu_jax.xla_cpu.apply_cpu_defaults() must run before JAX's first "
                       "computation: XLA has already read XLA_FLAGS")
  if environ.get("MEGU_JAX_XLA_CPU_DEFAULTS", "1") == "0":
    return False
  flags = environ.get("XLA_FLAGS", "")
  if _OPTION in flags:
    return False
  version = _jaxlib_version()
  if version is None or not version.startswith(_TESTED_JAXLIB):
    return False
  environ["XLA_FLAGS"] = " ".join([flags, *CPU_FLAGS]).strip()
  return True


def _backends_initialized() -> bool:
  import sys  # noqa: PLC0415
  if "jax" not in sys.modules:  # nothing can have started a backend
    return False
  from jax._src import xla_bridge  # noqa: PLC0415 (no public query in jax 0.4-0.10)
  return bool(getattr(xla_bridge, "backends_are_initialized", lambda: False)())


def active() -> bool:
  """Whether this process's ``XLA_FLAGS`` carries our CPU flags (for benchmark records)."""
  return all(flag in os.environ.get("XLA_FLAGS", "") for flag in CPU_FLAGS)
