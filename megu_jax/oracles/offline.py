"""Oracles that need no network: each returns a similarity matrix S [K, K] on the 0..10 scale.

- prototype: cosine similarity of the trained model's class-mean penultimate features;
- hierarchy: the data set's own grouping (same superclass = similar);
- uniform: every other class equally similar (the classic random-label ablation).

The diagonal of every S is 0: a class's similarity to itself is never used (T[i, i] = 0).
"""
from __future__ import annotations

from typing import Any, Optional

import numpy as np

# Every oracle scores on 0..10, so one temperature means the same thing for all of them.
MAX_SCORE = 10.0


class OracleInputError(ValueError):
  """An offline oracle got input it cannot score; the message names the bad value."""


def _check_num_classes(num_classes: Any) -> int:
  if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or \
      num_classes < 2:
    raise OracleInputError(f"num_classes must be an integer >= 2, got {num_classes!r}")
  return int(num_classes)


def prototype_scores(features: Any, labels: Any, num_classes: int) -> np.ndarray:
  """Scores classes by the cosine similarity c of their mean features: S = 10 * clip(c, 0, 1).

  Args:
    features: [N, D] penultimate features of the trained model (e.g. the training images).
    labels: [N] int class of each row of ``features``, in [0, num_classes).
    num_classes: K.

  Returns:
    S: [K, K] float64, zero diagonal.
  """
  num_classes = _check_num_classes(num_classes)
  features = np.asarray(features, dtype=np.float64)
  labels = np.asarray(labels)
  if features.ndim != 2:
    raise OracleInputError(f"features must be 2-D [N, D], got shape {features.shape}")
  if labels.shape != (features.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
    raise OracleInputError(
        f"labels must be integers of shape [{features.shape[0]}] to match features, got "
        f"{labels.dtype} {labels.shape}")
  if not np.all(np.isfinite(features)):
    raise OracleInputError("features contain non-finite values (NaN or inf)")
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise OracleInputError(f"labels must lie in [0, {num_classes}), got range "
                           f"[{labels.min()}, {labels.max()}]")
  counts = np.bincount(labels, minlength=num_classes)
  if (counts == 0).any():
    raise OracleInputError(
        f"class {int(np.argmin(counts))} has no samples, so it has no prototype")

  sums = np.zeros((num_classes, features.shape[1]))
  np.add.at(sums, labels, features)
  prototypes = sums / counts[:, None]
  norms = np.linalg.norm(prototypes, axis=1)
  if (norms == 0).any():
    raise OracleInputError(
        f"class {int(np.argmin(norms))} has an all-zero mean feature; cosine similarity is "
        "undefined for it")
  unit = prototypes / norms[:, None]
  cosine = unit @ unit.T
  scores = MAX_SCORE * np.clip(cosine, 0.0, 1.0)
  np.fill_diagonal(scores, 0.0)
  return scores


def hierarchy_scores(superclass_of: Optional[Any]) -> np.ndarray:
  """Scores 10 for two classes in the same superclass, else 0.

  Args:
    superclass_of: [K] int superclass of each class (the data set's coarse grouping), or None.

  Returns:
    S: [K, K] float64, zero diagonal. A class alone in its superclass gets an all-zero row, so its
    transition row is uniform over the other classes.
  """
  if superclass_of is None:
    raise OracleInputError(
        "the hierarchy oracle needs a class grouping, and this data set (at this label level) "
        "has none; use the prototype, gemini or uniform oracle")
  groups = np.asarray(superclass_of)
  if groups.ndim != 1 or groups.size < 2 or not np.issubdtype(groups.dtype, np.integer):
    raise OracleInputError(
        f"superclass_of must be a 1-D integer array with >= 2 classes, got {groups.dtype} "
        f"{groups.shape}")
  same_group = groups[:, None] == groups[None, :]
  np.fill_diagonal(same_group, False)
  if not same_group.any():
    # Every class alone in its group: the result would silently be the uniform ablation.
    raise OracleInputError(
        "superclass_of puts every class in its own group, so the hierarchy says nothing about "
        "similarity; use the uniform oracle if that is what you want")
  return np.where(same_group, MAX_SCORE, 0.0)


def uniform_scores(num_classes: int) -> np.ndarray:
  """Scores every pair of distinct classes the same, so T is uniform over the other classes.

  Returns:
    S: [K, K] float64 of zeros.
  """
  num_classes = _check_num_classes(num_classes)
  return np.zeros((num_classes, num_classes))
