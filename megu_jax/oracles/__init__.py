"""Similarity oracles: each produces S [K, K] on the 0..10 scale, S[i, j] = how much j resembles i.

``ORACLES`` maps a name to an ``Oracle`` record; ``get_oracle(name)`` returns the function (or, for
gemini, the class) that computes S. The gemini module is imported only when asked for, so the
offline oracles cost no google-genai import.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Oracle:
  """Where an oracle's implementation lives, and what it needs."""
  name: str
  module: str
  attribute: str
  needs: str  # One line for --help and error messages.

  def load(self) -> Callable[..., Any]:
    return getattr(importlib.import_module(self.module), self.attribute)


ORACLES: dict[str, Oracle] = {
    "gemini": Oracle("gemini", "megu_jax.oracles.gemini", "GeminiOracle",
                     "a Gemini API key in GEMINI_API_KEY (network)"),
    "prototype": Oracle("prototype", "megu_jax.oracles.offline", "prototype_scores",
                        "a trained model's penultimate features"),
    "hierarchy": Oracle("hierarchy", "megu_jax.oracles.offline", "hierarchy_scores",
                        "the data set's superclass grouping"),
    "uniform": Oracle("uniform", "megu_jax.oracles.offline", "uniform_scores", "nothing"),
}


class UnknownOracleError(ValueError):
  """An oracle name that is not in ORACLES."""


def get_oracle(name: str) -> Callable[..., Any]:
  """Returns the implementation registered as ``name``; raises UnknownOracleError listing names."""
  if name not in ORACLES:
    raise UnknownOracleError(f"unknown oracle {name!r}; available: {sorted(ORACLES)}")
  return ORACLES[name].load()
