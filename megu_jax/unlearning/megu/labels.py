"""MeGU's perturbing labels: where each forgotten sample goes (docs/method.md §2, step 3).

One implementation, :func:`perturbing_labels` (pure, jit-compatible with ``mode`` static): ỹ is
drawn from T[y] -- reweighted, with model guidance, by the original model's own posterior on the
image -- with the sample's own class masked out unless ``own_class_weight`` lets it stay. Each
sample's draw uses ``fold_in(key, index)`` with its training-set index, so ỹ of a sample does not
depend on which other samples are forgotten or in what order they come. For sub-class forgetting T
and the labels are coarse, so ỹ is never the sample's own superclass unless the weight allows it.
:func:`draw_perturbing_labels` is the host-side call MeGU makes: one compiled program per shape,
its compilation timed apart.
"""
from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from megu_jax.unlearning.megu.config import LABEL_MODES


def _check_inputs(T: jax.Array, labels: jax.Array, mode: str) -> None:
  if mode not in LABEL_MODES:
    raise ValueError(f"mode must be one of {LABEL_MODES}, got {mode!r}")
  if T.ndim != 2 or T.shape[0] != T.shape[1]:
    raise ValueError(f"T must be square [K, K], got shape {T.shape}")
  if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be a 1-D integer array [N], got {labels.dtype} {labels.shape}")
  try:  # concrete labels are checked on the host; traced ones (under jit) cannot be
    host_labels = np.asarray(labels)
  except jax.errors.TracerArrayConversionError:
    return
  num_classes = T.shape[0]
  if host_labels.size and (host_labels.min() < 0 or host_labels.max() >= num_classes):
    bad = host_labels[(host_labels < 0) | (host_labels >= num_classes)][0]
    raise ValueError(f"label {bad} is outside [0, {num_classes}) for a {num_classes}-class T")


def _masked_log(rows: jax.Array) -> jax.Array:
  """log(rows), -inf exactly where a row entry is 0 (an impossible ỹ stays impossible)."""
  return jnp.where(rows > 0, jnp.log(jnp.maximum(rows, 1e-30)), -jnp.inf)


def guided_log_rows(T, labels, original_logits=None, guidance_temperature=1.0,
                    own_class_weight=0.0, own_class_after_guidance=False) -> jax.Array:
  """float [N, K]: unnormalised log of each sample's row; -inf where ỹ is impossible.

  row = (1 − w)·T[y] (own class masked) + w·e_y, then, with ``original_logits`` [N, K], times
  softmax(logits / guidance_temperature). The own class is masked in log space, so ỹ != y holds
  even when T carries a numerically tiny diagonal mass. With ``own_class_after_guidance`` the
  guidance reweights the other classes alone, and the own class is mixed in afterwards with
  weight w: w is then the chance that a sample keeps its label, whatever the original's
  confidence in it (before the guidance, that confidence -- near 1 on memorised images --
  keeps almost every label).
  """
  own = jax.nn.one_hot(labels, T.shape[0])

  def guide(log_rows):
    if original_logits is None:
      return log_rows
    # -inf + finite stays -inf: the guidance never revives an impossible ỹ.
    return log_rows + jax.nn.log_softmax(original_logits / guidance_temperature, axis=-1)

  others = T[labels] * (1 - own)
  if own_class_after_guidance:
    guided_others = jax.nn.softmax(guide(_masked_log(others)), axis=-1)
    return _masked_log((1.0 - own_class_weight) * guided_others + own_class_weight * own)
  return guide(_masked_log((1.0 - own_class_weight) * others + own_class_weight * own))


def perturbing_labels(key: jax.Array | None, T: Any, labels: Any, indices: Any = None,
                      original_logits: Any = None, guidance_temperature: float = 1.0,
                      own_class_weight: float = 0.0, own_class_after_guidance: bool = False, *,
                      mode: str = "sample") -> jax.Array:
  """One perturbing label per forget sample.

  Args:
    key: a PRNG key (mode "sample" only; None is fine for "argmax").
    T: [K, K] transition matrix.
    labels: int [N], the forget samples' labels y.
    indices: int [N], their training-set positions (the per-sample keys); None: 0..N-1.
    mode: "sample" draws ỹ from the row; "argmax" takes its most likely class (ties: lower index).
    original_logits: [N, K] logits of the original model on the forget images (model guidance).
    guidance_temperature: τ_g of the guidance.
    own_class_weight: w in [0, 1); 0 keeps the own class out, as class forgetting needs.
    own_class_after_guidance: mix the own class in after the guidance (see guided_log_rows).

  Returns:
    int32 [N].
  """
  T = jnp.asarray(T, jnp.float32)
  labels = jnp.asarray(labels)
  _check_inputs(T, labels, mode)
  labels = labels.astype(jnp.int32)
  if original_logits is not None:
    original_logits = jnp.asarray(original_logits, jnp.float32)
  log_rows = guided_log_rows(T, labels, original_logits, guidance_temperature, own_class_weight,
                             own_class_after_guidance)
  if mode == "argmax":
    return jnp.argmax(log_rows, axis=-1).astype(jnp.int32)
  indices = (jnp.arange(labels.shape[0], dtype=jnp.uint32) if indices is None
             else jnp.asarray(indices).astype(jnp.uint32))
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, indices)
  return jax.vmap(jax.random.categorical)(keys, log_rows).astype(jnp.int32)


def guided_distribution_of(T, labels, original_logits=None, guidance_temperature=1.0,
                           own_class_weight=0.0, own_class_after_guidance=False) -> jax.Array:
  """float [N, K]: the normalised row each sample's ỹ is drawn from (pure)."""
  return jax.nn.softmax(guided_log_rows(jnp.asarray(T, jnp.float32), labels, original_logits,
                                        guidance_temperature, own_class_weight,
                                        own_class_after_guidance), axis=-1)


_perturbing_labels_jit = jax.jit(perturbing_labels,
                                 static_argnames=("mode", "own_class_after_guidance"))
_guided_distribution_jit = jax.jit(guided_distribution_of,
                                   static_argnames=("own_class_after_guidance",))


def draw_perturbing_labels(key: jax.Array, T: np.ndarray, labels: np.ndarray,
                           indices: np.ndarray, *, mode: str = "sample",
                           original_logits: np.ndarray | None = None,
                           guidance_temperature: float = 1.0,
                           own_class_weight: float = 0.0,
                           own_class_after_guidance: bool = False,
                           timings: dict | None = None) -> np.ndarray:
  """:func:`perturbing_labels` on the host, as int32 [N] NumPy.

  ``timings`` (if given): the seconds spent compiling (first call for these shapes) are added to
  ``timings["compile_s"]``.
  """
  if mode not in LABEL_MODES:
    raise ValueError(f"mode must be one of {LABEL_MODES}, got {mode!r}")
  args = (key, jnp.asarray(T, jnp.float32), jnp.asarray(labels, jnp.int32),
          jnp.asarray(indices, jnp.uint32),
          None if original_logits is None else jnp.asarray(original_logits, jnp.float32),
          jnp.float32(guidance_temperature), jnp.float32(own_class_weight))
  # One compiled program, not a dozen eager ops that each compile on a cold process; its
  # compilation is timed apart.
  static = {"mode": mode, "own_class_after_guidance": bool(own_class_after_guidance)}
  return np.asarray(_run_compiled(_perturbing_labels_jit, args, static, timings), np.int32)


def guided_distribution(T: np.ndarray, labels: np.ndarray, original_logits: np.ndarray | None,
                        *, guidance_temperature: float = 1.0, own_class_weight: float = 0.0,
                        own_class_after_guidance: bool = False,
                        timings: dict | None = None) -> np.ndarray:
  """float32 [N, K]: the soft finetuning target of ``forget_target="distribution"``."""
  args = (jnp.asarray(T, jnp.float32), jnp.asarray(labels, jnp.int32),
          None if original_logits is None else jnp.asarray(original_logits, jnp.float32),
          jnp.float32(guidance_temperature), jnp.float32(own_class_weight))
  static = {"own_class_after_guidance": bool(own_class_after_guidance)}
  return np.asarray(_run_compiled(_guided_distribution_jit, args, static, timings), np.float32)


def _run_compiled(jitted, args: tuple, static: dict, timings: dict | None):
  """``jitted(*args, **static)`` from an ahead-of-time executable, cached per shape.

  jit's own cache cannot say whether a call compiled; this one can, so that the compilation goes
  to ``timings["compile_s"]`` and not into the method's time.
  """
  signature = (jitted, tuple(sorted(static.items())), jax.tree.structure(args),
               tuple((np.shape(x), str(x.dtype)) for x in jax.tree.leaves(args)))
  executable = _EXECUTABLES.get(signature)
  if executable is None:
    start = time.perf_counter()
    executable = jitted.lower(*args, **static).compile()
    _EXECUTABLES[signature] = executable
    if timings is not None:
      timings["compile_s"] = timings.get("compile_s", 0.0) + time.perf_counter() - start
  return executable(*args)


_EXECUTABLES: dict = {}
