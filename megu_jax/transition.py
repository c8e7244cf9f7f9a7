"""The transition matrix T: built from an oracle's scores, validated, stored (docs/method.md §2).

An oracle scores how much class j resembles class i, S[i, j] on a 0..10 scale. This module turns S
into a row-stochastic K x K matrix T with a zero diagonal,

    T[i, :] = softmax(S[i, :] / temperature) over j != i,   T[i, i] = 0,

optionally keeping only the top-k entries of each row, validates it, and stores it as a ``.npy``
file next to a JSON provenance record. :func:`build_transition` is the one way T is made from a
source (a ``.npy`` file or an offline oracle): MeGU, the main job and
``experiments.build_transition`` all call it. For sub-class forgetting T is over the coarse labels. MeGU draws its perturbing labels
from T in :mod:`megu_jax.unlearning.megu.labels`.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import os
from typing import Any, Mapping, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from megu_jax import io_utils
from megu_jax.oracles import offline

# Rows of T must sum to one within this tolerance, and its diagonal must be zero within it.
ROW_SUM_ATOL = 1e-6
# The oracles build_transition runs itself (gemini needs the network: experiments.build_transition).
OFFLINE_ORACLES = ("prototype", "hierarchy", "uniform")


class InvalidTransitionError(ValueError):
  """A transition matrix (or the scores it is built from) is malformed; the message says how."""


def _row_name(i: int, class_names: Optional[Sequence[str]]) -> str:
  if class_names is not None and i < len(class_names):
    return f"row {i} ({class_names[i]})"
  return f"row {i}"


def _as_float64_matrix(matrix: Any, what: str) -> np.ndarray:
  """Converts to a float64 [K, K] host array, failing with a message that names `what`."""
  try:
    array = np.asarray(matrix, dtype=np.float64)
  except (TypeError, ValueError) as e:
    raise InvalidTransitionError(f"{what} is not a numeric array: {e}") from None
  if array.ndim != 2:
    raise InvalidTransitionError(
        f"{what} must be 2-D [num_classes, num_classes], got shape {array.shape}")
  if array.shape[0] != array.shape[1]:
    raise InvalidTransitionError(f"{what} must be square, got shape {array.shape}")
  if array.shape[0] < 2:
    raise InvalidTransitionError(
        f"{what} needs at least 2 classes (a perturbing label is another class), "
        f"got shape {array.shape}")
  return array


def scores_to_transition(S: Any, *, temperature: float = 1.0,
                         top_k: Optional[int] = None) -> np.ndarray:
  """Turns similarity scores into a transition matrix.

  Args:
    S: [K, K] similarity scores, S[i, j] = how much class j resembles class i (0..10 for every
      oracle of this project). The diagonal is ignored.
    temperature: softmax temperature tau > 0 on the scale of S. On the 0..10 scale tau = 1.0
      equals tau = 0.1 on raw cosine similarities.
    top_k: keep only the k most similar other classes of each row (1 <= k <= K - 1); None keeps
      all. Ties are broken towards the lower class index, so the result is deterministic.

  Returns:
    T: [K, K] float64 on the host; T[i, i] == 0 exactly, every row sums to 1.
  """
  scores = _as_float64_matrix(S, "score matrix S")
  num_classes = scores.shape[0]
  off_diagonal = ~np.eye(num_classes, dtype=bool)
  if not np.all(np.isfinite(scores[off_diagonal])):
    bad = np.argwhere(~np.isfinite(scores) & off_diagonal)[0]
    raise InvalidTransitionError(
        f"score matrix S has a non-finite entry S[{bad[0]}, {bad[1]}] = {scores[tuple(bad)]}")
  if not (isinstance(temperature, (int, float)) and np.isfinite(temperature)
          and temperature > 0):
    raise InvalidTransitionError(f"temperature must be a finite number > 0, got {temperature!r}")
  if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                            or not 1 <= top_k <= num_classes - 1):
    raise InvalidTransitionError(
        f"top_k must be None or an integer in [1, {num_classes - 1}] for {num_classes} classes, "
        f"got {top_k!r}")

  logits = np.where(off_diagonal, scores / temperature, -np.inf)
  if top_k is not None:
    # A stable sort of the negated logits ranks equal scores by class index.
    ranking = np.argsort(-logits, axis=1, kind="stable")
    keep = np.zeros_like(off_diagonal)
    np.put_along_axis(keep, ranking[:, :top_k], True, axis=1)
    logits = np.where(keep, logits, -np.inf)
  # Subtracting the row maximum keeps exp() from overflowing for small temperatures.
  logits = logits - logits.max(axis=1, keepdims=True)
  weights = np.exp(logits)  # exp(-inf) == 0: the diagonal and dropped entries are exact zeros.
  return weights / weights.sum(axis=1, keepdims=True)


def validate_transition(T: Any, num_classes: Optional[int] = None, *,
                        class_names: Optional[Sequence[str]] = None) -> None:
  """Raises InvalidTransitionError naming the first thing wrong with T; returns None if T is valid.

  Valid means: 2-D and square [K, K] with K >= 2, K == num_classes when given, every entry finite
  and >= 0, every row summing to 1 within ROW_SUM_ATOL, and a zero diagonal (within ROW_SUM_ATOL).

  Args:
    T: the candidate matrix (numpy or jax array, or nested lists).
    num_classes: the data set's class count (at the label level T is for), if known.
    class_names: optional, only used to name offending rows in the message.
  """
  matrix = _as_float64_matrix(T, "transition matrix")
  size = matrix.shape[0]
  if num_classes is not None and size != num_classes:
    raise InvalidTransitionError(
        f"transition matrix is {size} x {size} but the data set has {num_classes} classes")
  finite = np.isfinite(matrix)
  if not finite.all():
    i, j = np.argwhere(~finite)[0]
    raise InvalidTransitionError(
        f"transition matrix has a non-finite entry T[{i}, {j}] = {matrix[i, j]} "
        f"in {_row_name(i, class_names)}")
  if (matrix < 0).any():
    i, j = np.argwhere(matrix < 0)[0]
    raise InvalidTransitionError(
        f"transition matrix has a negative entry T[{i}, {j}] = {matrix[i, j]} "
        f"in {_row_name(i, class_names)}")
  diagonal = np.diag(matrix)
  if (np.abs(diagonal) > ROW_SUM_ATOL).any():
    i = int(np.argmax(np.abs(diagonal) > ROW_SUM_ATOL))
    raise InvalidTransitionError(
        f"transition matrix has a non-zero diagonal entry T[{i}, {i}] = {diagonal[i]} in "
        f"{_row_name(i, class_names)}: a perturbing label must be another class")
  row_sums = matrix.sum(axis=1)
  bad_rows = np.abs(row_sums - 1.0) > ROW_SUM_ATOL
  if bad_rows.any():
    i = int(np.argmax(bad_rows))
    raise InvalidTransitionError(
        f"{_row_name(i, class_names)} of the transition matrix sums to {row_sums[i]!r}, "
        f"expected 1 within {ROW_SUM_ATOL}")


def provenance_path(path: str) -> str:
  """The JSON provenance file that belongs to a ``.npy`` file: ``<path minus .npy>.json``."""
  return _strip_npy(path) + ".json"


def _strip_npy(path: str) -> str:
  if not str(path).endswith(".npy"):
    raise ValueError(f"a transition file must end in .npy, got {path!r}")
  return str(path)[:-len(".npy")]


def save_transition(path: str, T: Any, provenance: Mapping[str, Any]) -> None:
  """Validates T and writes it to ``path`` (.npy) plus ``<path minus .npy>.json`` (provenance).

  Both files are written to temporary files first and then moved into place with os.replace, so an
  earlier matrix at ``path`` survives any failure before the move.

  Args:
    path: destination ending in ``.npy``.
    T: [K, K] valid transition matrix; stored as float64.
    provenance: JSON-serialisable record (oracle, model name, prompt hash, class names, tau, k...).
      ``date`` (UTC, ISO 8601) is added when missing; ``num_classes`` and ``transition_sha256``
      (of the stored .npy bytes) are always set.
  """
  json_path = provenance_path(path)
  class_names = provenance.get("class_names")
  validate_transition(T, class_names=class_names)
  matrix = np.asarray(T, dtype=np.float64)
  if class_names is not None and len(class_names) != matrix.shape[0]:
    raise InvalidTransitionError(
        f"provenance lists {len(class_names)} class names for a {matrix.shape[0]} x "
        f"{matrix.shape[0]} transition matrix")
  record = dict(provenance)
  record.setdefault(
      "date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
  record["num_classes"] = int(matrix.shape[0])
  record["transition_sha256"] = hashlib.sha256(matrix.tobytes()).hexdigest()
  # Write the provenance first: a .npy without its record is worse than a stale record.
  # atomic_write_json serialises before it opens anything, so a bad record writes nothing.
  try:
    io_utils.atomic_write_json(json_path, record)
  except TypeError as e:
    raise ValueError(f"provenance for {path} is not JSON-serialisable: {e}") from None
  io_utils.atomic_save_npy(path, matrix)


def load_provenance(path: str) -> dict:
  """Reads the JSON provenance record stored next to the transition matrix at ``path``."""
  with open(provenance_path(path), encoding="utf-8") as f:
    return json.load(f)


def load_transition(path: str, num_classes: Optional[int] = None) -> jnp.ndarray:
  """Loads and validates a transition matrix saved by save_transition.

  Args:
    path: the ``.npy`` file (never unpickled: ``allow_pickle=False``).
    num_classes: the data set's class count at the label level T is for, if known.

  Returns:
    T: [K, K] float32 jnp array.

  Raises:
    FileNotFoundError: no file at ``path``.
    InvalidTransitionError: the file does not hold a valid transition matrix; names the file.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"no transition matrix at {path}")
  try:
    matrix = np.load(path, allow_pickle=False)
  except (ValueError, EOFError, OSError) as e:  # object arrays, corrupt headers, cut-off files
    raise InvalidTransitionError(
        f"{path}: cannot be read as a numeric .npy array ({type(e).__name__}: {e})") from None
  try:
    validate_transition(matrix, num_classes)
  except InvalidTransitionError as e:
    raise InvalidTransitionError(f"{path}: {e}") from None
  return jnp.asarray(matrix, dtype=jnp.float32)


def is_transition_file(source: str) -> bool:
  """Whether a T source names a file (``*.npy`` or a path) rather than an oracle."""
  return str(source).endswith(".npy") or os.sep in str(source)


def offline_scores(oracle: str, num_classes: int, *, features: Any = None,
                   feature_labels: Any = None, superclass_of: Any = None) -> np.ndarray:
  """S [K, K] of an offline oracle (one of :data:`OFFLINE_ORACLES`), from the inputs it needs.

  Args:
    features: float [N, D] penultimate features of a trained model, with ``feature_labels`` int
      [N] covering every class: the ``prototype`` oracle's input.
    superclass_of: int [K], class -> group: the ``hierarchy`` oracle's input (the data set's own
      grouping, handed in by the caller: this module knows no data set).
  """
  if oracle == "prototype":
    if features is None or feature_labels is None:
      raise ValueError("the prototype oracle needs a trained model's features and their labels")
    return offline.prototype_scores(features, feature_labels, num_classes)
  if oracle == "hierarchy":
    groups = (None if superclass_of is None or len(superclass_of) == 0
              else np.asarray(superclass_of, np.int32))
    if groups is not None and groups.shape != (num_classes,):
      raise ValueError(f"superclass_of has {groups.size} entries for {num_classes} classes")
    return offline.hierarchy_scores(groups)  # no grouping: its error says so
  if oracle == "uniform":
    return offline.uniform_scores(num_classes)
  raise ValueError(f"T source {oracle!r} is neither a .npy file nor an offline oracle "
                   f"{OFFLINE_ORACLES} (build a Gemini T with experiments.build_transition and "
                   "pass its .npy path)")


def build_transition(source: str, num_classes: int, *, temperature: float = 1.0,
                     top_k: Optional[int] = None, **oracle_inputs: Any) -> np.ndarray:
  """T [K, K] (float64, validated) from ``source``: a ``.npy`` file or an offline oracle.

  The one way T is made from a source. A path is loaded and validated (``temperature`` and
  ``top_k`` then do not apply); an oracle's scores (:func:`offline_scores`, given
  ``oracle_inputs``) go through :func:`scores_to_transition` (``top_k`` 0 or None keeps all).

  Raises:
    ValueError (or a subclass) naming the bad source or the missing input.
  """
  source = str(source)
  if is_transition_file(source):
    return np.asarray(load_transition(source, num_classes), np.float64)
  scores = offline_scores(source, num_classes, **oracle_inputs)
  T = scores_to_transition(scores, temperature=float(temperature), top_k=int(top_k or 0) or None)
  validate_transition(T, num_classes)
  return T
