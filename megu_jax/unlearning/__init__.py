"""Unlearning methods, registered by name, all with one signature (see :mod:`.base`).

    from megu_jax import unlearning
    unlearn = unlearning.get_method("megu")
    unlearned = unlearn(trained, forget_data, retain_data, config, jax.random.key(0))

``UNLEARNING_METHODS`` maps each name to its function, so a benchmark loops over names.
"""
from __future__ import annotations

from typing import Callable

from megu_jax.unlearning.base import UnlearnData, UnlearnFn, UnlearningInputError

UNLEARNING_METHODS: dict[str, UnlearnFn] = {}
# The module each name was registered from: the code a cached run is keyed by, even where a
# caller later wraps the entry in UNLEARNING_METHODS (to count or time its calls).
_REGISTERED_MODULES: dict[str, str] = {}


class UnknownMethodError(UnlearningInputError):
  """A method name that is not registered."""


def register(name: str) -> Callable[[UnlearnFn], UnlearnFn]:
  """Decorator: ``@register("megu")`` adds the function to UNLEARNING_METHODS under ``name``."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"a method name must be a non-empty string, got {name!r}")

  def decorator(fn: UnlearnFn) -> UnlearnFn:
    if name in UNLEARNING_METHODS and UNLEARNING_METHODS[name] is not fn:
      raise ValueError(f"an unlearning method named {name!r} is already registered")
    UNLEARNING_METHODS[name] = fn
    _REGISTERED_MODULES[name] = fn.__module__
    return fn
  return decorator


def get_method(name: str) -> UnlearnFn:
  """The method registered as ``name``; an unknown name raises UnknownMethodError listing all."""
  if name not in UNLEARNING_METHODS:
    raise UnknownMethodError(
        f"unknown unlearning method {name!r}; registered methods: {sorted(UNLEARNING_METHODS)}")
  return UNLEARNING_METHODS[name]


def registered_module(name: str) -> str:
  """The name of the module that registered method ``name`` (UnknownMethodError if none did)."""
  get_method(name)
  return _REGISTERED_MODULES.get(name, UNLEARNING_METHODS[name].__module__)


def method_names() -> tuple[str, ...]:
  return tuple(sorted(UNLEARNING_METHODS))


# Importing the modules registers their methods; they import ``register`` from here, so this
# comes last.
from megu_jax.unlearning import bad_teacher  # noqa: E402,F401
from megu_jax.unlearning import eu_k  # noqa: E402,F401
from megu_jax.unlearning import finetune  # noqa: E402,F401
from megu_jax.unlearning import megu  # noqa: E402,F401
from megu_jax.unlearning import neggrad_plus  # noqa: E402,F401
from megu_jax.unlearning import random_label  # noqa: E402,F401
from megu_jax.unlearning import reference  # noqa: E402,F401
from megu_jax.unlearning import salun  # noqa: E402,F401
from megu_jax.unlearning import scrub  # noqa: E402,F401
from megu_jax.unlearning import ssd  # noqa: E402,F401
from megu_jax.unlearning import unsir  # noqa: E402,F401

__all__ = ["UNLEARNING_METHODS", "UnlearnData", "UnlearnFn", "UnlearningInputError",
           "UnknownMethodError", "get_method", "method_names", "register"]
