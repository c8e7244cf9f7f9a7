"""XLA:CPU settings that make our training steps faster, applied before JAX starts its backend.

jaxlib 0.10 hands convolutions to YNNPACK. For the small channel counts of our models (16-128)
that path is slower than XLA's own (Eigen) convolutions, forward and backward: YNNPACK computes a
weight gradient with the batch as its feature axis, so XLA transposes each activation to
[channels, height, width, batch] first, and its fusion pass recomputes the BatchNorm/ReLU/residual
chain inside those transposes (the narrow ResNet-18 spent more time in them than in its
convolutions; see the README's "Performance"). Leaving YNNPACK its dot and reduction fusions but
not convolutions measured ~10-15 % faster training on both models (paired runs, 2 CPU cores).

XLA reads ``XLA_FLAGS`` once, when the first computation creates the CPU client, so the flag is
appended at ``import megu_jax`` (before any of our code can run a computation). It is added only
on jaxlib versions where it was measured (an unknown flag would abort the process), and never
over a choice of the user's: an ``XLA_FLAGS`` that already names the option wins, and
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
  """Appends :data:`CPU_FLAGS` to ``XLA_FLAGS`` when safe; returns whether it did."""
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


def active() -> bool:
  """Whether this process's ``XLA_FLAGS`` carries our CPU flags (for benchmark records)."""
  return all(flag in os.environ.get("XLA_FLAGS", "") for flag in CPU_FLAGS)
