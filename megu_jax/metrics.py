"""Evaluation metrics of the unlearning benchmark (docs/method.md §3), as pure functions.

Everything here works on host NumPy arrays that the evaluation glue has already computed by
running a network over a data set (without augmentation: SalUn converts its retain set to test
transforms before attacking it, and so must the glue):

  logits    float [N, K]   the model's outputs,
  features  float [N, D]   penultimate activations,
  labels    int   [N]      true labels in [0, K).

JAX arrays are accepted too (`np.asarray` copies them to the host); nothing here needs a device,
and the attacks and the probe are scikit-learn models, as in the SSD and SalUn code bases.

Bad input raises `MetricInputError` (a `ValueError`) naming the argument and what is allowed.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC

__all__ = [
    "MetricInputError",
    "accuracy",
    "prediction_entropy",
    "true_class_confidence",
    "mia_entropy_lr",
    "mia_confidence_svc",
    "linear_probe_accuracy",
    "class_accuracies",
    "related_accuracy",
    "avg_gap",
    "aggregate",
    "most_similar_classes",
]

DEFAULT_AVG_GAP_KEYS = ("retain_test_acc", "forget_test_acc", "mia_entropy_lr")


class MetricInputError(ValueError):
  """An argument of a metric has the wrong shape, type, size or value."""


# --------------------------------------------------------------------------------------------
# Input checks. Each returns a clean NumPy array or raises naming the argument.
# --------------------------------------------------------------------------------------------


def _check_float_matrix(name: str, value: Any, *, min_columns: int = 1) -> np.ndarray:
  """Returns `value` as a finite float64 array [N >= 1, C >= min_columns]."""
  array = np.asarray(value)
  if array.ndim != 2:
    raise MetricInputError(
        f"{name} must be a 2-D array [num_samples, num_columns]; got ndim={array.ndim} "
        f"(shape {array.shape}).")
  if array.shape[0] == 0:
    raise MetricInputError(f"{name} is empty (shape {array.shape}); it needs at least one sample.")
  if array.shape[1] < min_columns:
    raise MetricInputError(
        f"{name} has {array.shape[1]} columns (shape {array.shape}); at least {min_columns} "
        "are needed.")
  if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise MetricInputError(f"{name} must hold real numbers; got dtype {array.dtype}.")
  array = array.astype(np.float64)
  if not np.all(np.isfinite(array)):
    bad = int(np.sum(~np.isfinite(array)))
    raise MetricInputError(
        f"{name} contains {bad} non-finite values (NaN or inf); all must be finite.")
  return array


def _check_logits(name: str, value: Any) -> np.ndarray:
  """Returns finite float64 logits [N >= 1, K >= 2]."""
  # One class would make every prediction trivially right and every entropy zero.
  return _check_float_matrix(name, value, min_columns=2)


def _check_labels(name: str, value: Any, *, num_samples: int, num_classes: int | None,
                  num_samples_from: str) -> np.ndarray:
  """Returns int64 labels [num_samples], each in [0, num_classes) (>= 0 if num_classes is None)."""
  array = np.asarray(value)
  if array.ndim != 1:
    raise MetricInputError(
        f"{name} must be a 1-D array [num_samples]; got ndim={array.ndim} (shape {array.shape}).")
  if array.shape[0] == 0:
    raise MetricInputError(f"{name} is empty; it needs at least one sample.")
  if not np.issubdtype(array.dtype, np.integer):
    raise MetricInputError(f"{name} must have an integer dtype; got {array.dtype}.")
  if array.shape[0] != num_samples:
    raise MetricInputError(
        f"{name} has {array.shape[0]} entries but {num_samples_from} has {num_samples} rows; "
        "they must match.")
  low, high = int(array.min()), int(array.max())
  if num_classes is None and low < 0:
    raise MetricInputError(f"{name} must be non-negative class indices; got a minimum of {low}.")
  if num_classes is not None and (low < 0 or high >= num_classes):
    raise MetricInputError(
        f"{name} must lie in [0, {num_classes}) (the number of classes); got values in "
        f"[{low}, {high}].")
  return array.astype(np.int64)


def _check_count(name: str, value: Any, *, allow_none: bool) -> int | None:
  """Returns `value` as a positive Python int (or None when that is allowed)."""
  if value is None and allow_none:
    return None
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < 1:
    allowed = "a positive integer or None" if allow_none else "a positive integer"
    raise MetricInputError(f"{name} must be {allowed}; got {value!r}.")
  return int(value)


def _check_same_num_classes(pairs: Sequence[tuple[str, np.ndarray]]) -> int:
  """Returns the shared K of several logits arrays, or raises naming the odd one out."""
  first_name, first = pairs[0]
  for name, other in pairs[1:]:
    if other.shape[1] != first.shape[1]:
      raise MetricInputError(
          f"{name} has {other.shape[1]} classes but {first_name} has {first.shape[1]}; "
          "all logits must come from the same model.")
  return first.shape[1]


def _log_softmax(logits: np.ndarray) -> np.ndarray:
  """log softmax over the last axis [N, K] -> [N, K], stable for any finite logits."""
  # Subtracting the row maximum keeps exp() in [0, 1]; the log-sum-exp is then >= 0 and
  # finite, so no probability is rounded to exactly 0 before its log is taken.
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _subsample_indices(num_total: int, max_count: int | None,
                       rng: np.random.Generator) -> np.ndarray:
  """Sorted indices of a uniform subset of size min(num_total, max_count) (all if None)."""
  if max_count is None or num_total <= max_count:
    return np.arange(num_total)
  return np.sort(rng.choice(num_total, size=max_count, replace=False))


# --------------------------------------------------------------------------------------------
# Per-sample quantities and accuracies.
# --------------------------------------------------------------------------------------------


def accuracy(logits: Any, labels: Any) -> float:
  """Fraction of samples whose arg-max logit is the true label.

  Args:
    logits: float [N, K], N >= 1, K >= 2, finite.
    labels: int [N], values in [0, K).

  Returns:
    A float in [0, 1]. Ties in the arg-max go to the lowest class index (NumPy's rule).
  """
  logits = _check_logits("logits", logits)
  labels = _check_labels("labels", labels, num_samples=logits.shape[0],
                         num_classes=logits.shape[1], num_samples_from="logits")
  return float(np.mean(logits.argmax(axis=-1) == labels))


def prediction_entropy(logits: Any) -> np.ndarray:
  """Shannon entropy (nats) of the softmax of each row: -sum_k p_k log p_k.

  Computed from log_softmax, so very confident rows give ~0 instead of NaN (SSD computes it from
  softmax probabilities and masks p == 0; the values agree wherever theirs is defined).

  Args:
    logits: float [N, K], N >= 1, K >= 2, finite.

  Returns:
    float64 [N], each in [0, log K].
  """
  log_probs = _log_softmax(_check_logits("logits", logits))
  entropy = -np.sum(np.exp(log_probs) * log_probs, axis=-1)
  # Rounding can leave -1e-17 for a one-hot row; an entropy is never negative.
  return np.maximum(entropy, 0.0)


def true_class_confidence(logits: Any, labels: Any) -> np.ndarray:
  """Softmax probability the model gives to each sample's true class.

  Args:
    logits: float [N, K], N >= 1, K >= 2, finite.
    labels: int [N], values in [0, K).

  Returns:
    float64 [N], each in [0, 1].
  """
  logits = _check_logits("logits", logits)
  labels = _check_labels("labels", labels, num_samples=logits.shape[0],
                         num_classes=logits.shape[1], num_samples_from="logits")
  log_probs = _log_softmax(logits)
  return np.exp(log_probs[np.arange(labels.shape[0]), labels])


def class_accuracies(logits: Any, labels: Any, num_classes: int) -> np.ndarray:
  """Accuracy on the samples of each true class.

  Args:
    logits: float [N, K], N >= 1, K == num_classes, finite.
    labels: int [N], values in [0, num_classes).
    num_classes: K, the number of the model's classes.

  Returns:
    float64 [K]; entry k is the accuracy over samples labelled k, NaN when no sample has label k
    (an absent class has no accuracy; 0 would read as "all wrong").
  """
  num_classes = _check_count("num_classes", num_classes, allow_none=False)
  logits = _check_logits("logits", logits)
  if logits.shape[1] != num_classes:
    raise MetricInputError(
        f"logits has {logits.shape[1]} columns but num_classes={num_classes}; they must match.")
  labels = _check_labels("labels", labels, num_samples=logits.shape[0],
                         num_classes=num_classes, num_samples_from="logits")
  correct = (logits.argmax(axis=-1) == labels).astype(np.float64)
  num_correct = np.bincount(labels, weights=correct, minlength=num_classes)
  num_samples = np.bincount(labels, minlength=num_classes).astype(np.float64)
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(num_samples > 0, num_correct / num_samples, np.nan)


def related_accuracy(logits: Any, labels: Any, related_classes: Sequence[int]) -> float:
  """Accuracy restricted to samples whose true label is one of `related_classes`.

  `related_test_acc` in docs/method.md: the test accuracy on the classes most similar to the
  forgotten one (see `most_similar_classes`), where over-unlearning shows first.

  Args:
    logits: float [N, K], N >= 1, K >= 2, finite.
    labels: int [N], values in [0, K).
    related_classes: non-empty sequence of distinct class indices in [0, K).

  Returns:
    A float in [0, 1]. Predictions may be any class, not only a related one.
  """
  logits = _check_logits("logits", logits)
  num_classes = logits.shape[1]
  labels = _check_labels("labels", labels, num_samples=logits.shape[0],
                         num_classes=num_classes, num_samples_from="logits")
  related = np.asarray(related_classes)
  if related.ndim != 1 or related.size == 0 or not np.issubdtype(related.dtype, np.integer):
    raise MetricInputError(
        "related_classes must be a non-empty 1-D sequence of integer class indices; got "
        f"{related_classes!r}.")
  if related.min() < 0 or related.max() >= num_classes:
    raise MetricInputError(
        f"related_classes must lie in [0, {num_classes}); got {related.tolist()}.")
  if np.unique(related).size != related.size:
    raise MetricInputError(f"related_classes has repeated entries: {related.tolist()}.")
  in_related = np.isin(labels, related)
  if not np.any(in_related):
    raise MetricInputError(
        f"no sample in labels belongs to related_classes {related.tolist()}; present labels are "
        f"{np.unique(labels).tolist()}.")
  return float(np.mean(logits[in_related].argmax(axis=-1) == labels[in_related]))


# --------------------------------------------------------------------------------------------
# Membership-inference attacks.
# --------------------------------------------------------------------------------------------


def membership_auc(member_scores: Any, non_member_scores: Any) -> float:
  """ROC AUC of a threshold on a per-example score separating members from non-members.

  0.5 is chance; 1.0 means every member scores above every non-member. Computed from ranks
  (the Mann-Whitney statistic, ties counted half), so no classifier is fitted.
  """
  from scipy import stats  # noqa: PLC0415 (a dependency of scikit-learn)
  members = np.asarray(member_scores, np.float64).ravel()
  others = np.asarray(non_member_scores, np.float64).ravel()
  if not len(members) or not len(others):
    raise ValueError(f"membership_auc needs members and non-members, got {len(members)} and "
                     f"{len(others)}")
  ranks = stats.rankdata(np.concatenate([members, others]))
  n1, n0 = len(members), len(others)
  return float((ranks[:n1].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def mia_entropy_lr(retain_train_logits: Any, test_logits: Any, forget_logits: Any, *,
                   seed: int = 0, max_samples: int | None = None) -> float:
  """SSD's membership-inference attack on prediction entropy (`mia_entropy_lr`).

  A logistic regression (class_weight="balanced") learns to tell members, the retain-train
  samples (label 1), from non-members, the test samples (label 0), from the entropy of the
  model's prediction alone. The score is the fraction of forget samples it calls members.
  After unlearning, the target is Retrain's score, not 0 (docs/method.md §4).

  As in SSD (Foster et al. 2024, `get_membership_attack_prob`, itself from Chundawat et al.'s
  Bad-Teacher code): the raw entropy is the only feature, unscaled, and sklearn's lbfgs solver
  with its default C = 1. Where we differ:
    * the entropy comes from log_softmax (see `prediction_entropy`);
    * `max_samples` optionally subsamples the retain set (uniformly, seeded) for speed; SSD uses
      all of it, which is what the default None does. The test set is never subsampled, and the
      balanced class weights keep the attack fair when the two sets differ in size.
    * SSD passes multi_class="multinomial", which is moot for two classes and removed from
      recent scikit-learn.

  Args:
    retain_train_logits: float [N_r, K], outputs on retain training samples (members).
    test_logits: float [N_t, K], outputs on test samples (non-members).
    forget_logits: float [N_f, K], outputs on the forgotten training samples.
    seed: seeds the retain subsample (unused when no subsampling happens).
    max_samples: at most this many retain samples fit the attack; None uses all.

  Returns:
    A float in [0, 1]: the fraction of forget samples predicted "member".
  """
  retain_train_logits = _check_logits("retain_train_logits", retain_train_logits)
  test_logits = _check_logits("test_logits", test_logits)
  forget_logits = _check_logits("forget_logits", forget_logits)
  _check_same_num_classes([("retain_train_logits", retain_train_logits),
                           ("test_logits", test_logits), ("forget_logits", forget_logits)])
  max_samples = _check_count("max_samples", max_samples, allow_none=True)

  rng = np.random.default_rng(seed)
  retain_index = _subsample_indices(retain_train_logits.shape[0], max_samples, rng)
  member_entropy = prediction_entropy(retain_train_logits[retain_index])
  nonmember_entropy = prediction_entropy(test_logits)

  attack_inputs = np.concatenate([member_entropy, nonmember_entropy])[:, None]
  attack_targets = np.concatenate(
      [np.ones_like(member_entropy), np.zeros_like(nonmember_entropy)]).astype(np.int64)
  attack = LogisticRegression(class_weight="balanced", solver="lbfgs")
  attack.fit(attack_inputs, attack_targets)
  predicted_member = attack.predict(prediction_entropy(forget_logits)[:, None])
  return float(np.mean(predicted_member == 1))


def mia_confidence_svc(retain_train_logits: Any, retain_train_labels: Any, test_logits: Any,
                       test_labels: Any, forget_logits: Any, forget_labels: Any, *,
                       seed: int = 0, max_samples: int | None = 3000) -> float:
  """SalUn's "MIA-efficacy" on true-class confidence (`mia_confidence_svc`).

  An RBF support-vector classifier (C = 3, gamma = "auto", i.e. 1 for this single feature) learns
  to tell members, retain-train samples (1), from non-members, test samples (0), by the softmax
  probability of the true class. The score is the fraction of forget samples it calls
  NON-members: higher means the forget set looks more "unseen". Note the opposite direction to
  `mia_entropy_lr`.

  As in SalUn (Fan et al. 2024, `evaluation/SVC_MIA.py`, used with shadow_train = retain,
  shadow_test = test, target_test = forget): same feature, kernel, C, gamma, and the same equal
  number of members and non-members. Where we differ: SalUn takes the *first* len(test) retain
  samples and the whole test set (about 10 000 each); we draw a seeded uniform subset of each set
  (the retain set may be ordered by class), of size min(N_r, N_t, max_samples), because fitting
  an SVC is quadratic in its training set: 3000 + 3000 takes ~4 s on 2 cores, 10000 + 10000 ~26 s.

  Args:
    retain_train_logits: float [N_r, K], outputs on retain training samples (members).
    retain_train_labels: int [N_r], their true labels.
    test_logits: float [N_t, K], outputs on test samples (non-members).
    test_labels: int [N_t], their true labels.
    forget_logits: float [N_f, K], outputs on the forgotten samples.
    forget_labels: int [N_f], their true (original) labels.
    seed: seeds both subsamples.
    max_samples: at most this many members and as many non-members train the SVC; None takes
      min(N_r, N_t) of each, as SalUn does.

  Returns:
    A float in [0, 1]: the fraction of forget samples predicted "non-member".
  """
  retain_train_logits = _check_logits("retain_train_logits", retain_train_logits)
  test_logits = _check_logits("test_logits", test_logits)
  forget_logits = _check_logits("forget_logits", forget_logits)
  num_classes = _check_same_num_classes([
      ("retain_train_logits", retain_train_logits), ("test_logits", test_logits),
      ("forget_logits", forget_logits)])
  retain_train_labels = _check_labels(
      "retain_train_labels", retain_train_labels, num_samples=retain_train_logits.shape[0],
      num_classes=num_classes, num_samples_from="retain_train_logits")
  test_labels = _check_labels("test_labels", test_labels, num_samples=test_logits.shape[0],
                              num_classes=num_classes, num_samples_from="test_logits")
  forget_labels = _check_labels("forget_labels", forget_labels,
                                num_samples=forget_logits.shape[0], num_classes=num_classes,
                                num_samples_from="forget_logits")
  max_samples = _check_count("max_samples", max_samples, allow_none=True)

  per_side = min(retain_train_logits.shape[0], test_logits.shape[0])
  if max_samples is not None:
    per_side = min(per_side, max_samples)
  rng = np.random.default_rng(seed)
  member_index = _subsample_indices(retain_train_logits.shape[0], per_side, rng)
  nonmember_index = _subsample_indices(test_logits.shape[0], per_side, rng)
  member_confidence = true_class_confidence(retain_train_logits[member_index],
                                            retain_train_labels[member_index])
  nonmember_confidence = true_class_confidence(test_logits[nonmember_index],
                                               test_labels[nonmember_index])

  attack_inputs = np.concatenate([member_confidence, nonmember_confidence])[:, None]
  attack_targets = np.concatenate(
      [np.ones(per_side, np.int64), np.zeros(per_side, np.int64)])
  attack = SVC(C=3, kernel="rbf", gamma="auto")
  attack.fit(attack_inputs, attack_targets)
  predicted_member = attack.predict(true_class_confidence(forget_logits, forget_labels)[:, None])
  return float(np.mean(predicted_member == 0))


# --------------------------------------------------------------------------------------------
# Residual information in the features.
# --------------------------------------------------------------------------------------------


def _class_balanced_indices(labels: np.ndarray, max_per_class: int,
                            rng: np.random.Generator) -> np.ndarray:
  """Sorted indices holding at most `max_per_class` uniformly drawn samples of each class."""
  chosen = []
  for label in np.unique(labels):
    of_class = np.flatnonzero(labels == label)
    if of_class.size > max_per_class:
      of_class = rng.choice(of_class, size=max_per_class, replace=False)
    chosen.append(of_class)
  return np.sort(np.concatenate(chosen))


def linear_probe_accuracy(train_features: Any, train_labels: Any, eval_features: Any,
                          eval_labels: Any, *, seed: int = 0, max_per_class: int = 500) -> float:
  """Accuracy of a linear probe fit on frozen features (`probe_forget_acc` and alike).

  The probe is a multinomial logistic regression (lbfgs, C = 1) on standardised features (the
  scaler is fit on the probe's training subset only). Its training subset holds at most
  `max_per_class` samples of each class, drawn uniformly with `seed`: balanced, so a small class
  is not drowned out, and bounded, so the cost stays a few seconds whatever the data set size.

  How `probe_forget_acc` uses it: `train_features` are the unlearned model's features of the
  *whole* training set, retained and forgotten samples alike, with their TRUE labels, so the
  probe sees the forgotten class under its own name; `eval_features` are the features of the
  forgotten class's test images, with their true labels. A high score means the features still
  separate the forgotten class even if the head no longer predicts it: residual information the
  output metrics miss. The target is Retrain's score (a model that never saw the class can still
  separate it a little), not 0. Neither SSD nor SalUn report a probe; this metric is ours.

  Args:
    train_features: float [N_train, D], D >= 1, finite.
    train_labels: int [N_train], non-negative; at least two distinct classes.
    eval_features: float [N_eval, D].
    eval_labels: int [N_eval]; every class must also occur in train_labels (a probe cannot
      predict a class it never saw).
    seed: seeds the class-balanced subsample (the lbfgs solver itself is deterministic).
    max_per_class: at most this many training samples per class fit the probe.

  Returns:
    A float in [0, 1]: the probe's accuracy on the eval set.
  """
  train_features = _check_float_matrix("train_features", train_features)
  eval_features = _check_float_matrix("eval_features", eval_features)
  if eval_features.shape[1] != train_features.shape[1]:
    raise MetricInputError(
        f"eval_features has {eval_features.shape[1]} feature columns but train_features has "
        f"{train_features.shape[1]}; they must match.")
  # No model output fixes K here, so labels are only required to be non-negative.
  train_labels = _check_labels("train_labels", train_labels,
                               num_samples=train_features.shape[0], num_classes=None,
                               num_samples_from="train_features")
  eval_labels = _check_labels("eval_labels", eval_labels, num_samples=eval_features.shape[0],
                              num_classes=None, num_samples_from="eval_features")
  max_per_class = _check_count("max_per_class", max_per_class, allow_none=False)
  train_classes = np.unique(train_labels)
  if train_classes.size < 2:
    raise MetricInputError(
        f"train_labels must contain at least two classes; got only {train_classes.tolist()}.")
  unseen = np.setdiff1d(np.unique(eval_labels), train_classes)
  if unseen.size:
    raise MetricInputError(
        f"eval_labels contain classes {unseen.tolist()} absent from train_labels "
        f"{train_classes.tolist()}; the probe could never predict them.")

  rng = np.random.default_rng(seed)
  probe_index = _class_balanced_indices(train_labels, max_per_class, rng)
  probe = make_pipeline(
      StandardScaler(),
      LogisticRegression(solver="lbfgs", C=1.0, max_iter=2000))
  probe.fit(train_features[probe_index], train_labels[probe_index])
  return float(np.mean(probe.predict(eval_features) == eval_labels))


def most_similar_classes(transition_row_or_scores: Any, target: int, k: int) -> tuple[int, ...]:
  """The k classes other than `target` with the highest scores, most similar first.

  Used to pick the "related" classes of `related_test_acc` when the data set has no grouping:
  pass the target's row of the transition matrix T (or of the oracle's scores S).

  Args:
    transition_row_or_scores: float [K], finite; higher means more similar to the target.
    target: the forgotten class, in [0, K).
    k: how many classes to return, in [1, K - 1].

  Returns:
    A tuple of k distinct Python ints, none equal to `target`, by decreasing score; equal scores
    are ordered by increasing class index, so the choice is deterministic.
  """
  scores = np.asarray(transition_row_or_scores)
  if scores.ndim != 1:
    raise MetricInputError(
        "transition_row_or_scores must be a 1-D array [num_classes]; got ndim="
        f"{scores.ndim} (shape {scores.shape}).")
  num_classes = scores.shape[0]
  if num_classes < 2:
    raise MetricInputError(
        f"transition_row_or_scores needs at least 2 classes; got {num_classes}.")
  if not (np.issubdtype(scores.dtype, np.floating) or np.issubdtype(scores.dtype, np.integer)):
    raise MetricInputError(
        f"transition_row_or_scores must hold real numbers; got dtype {scores.dtype}.")
  if not np.all(np.isfinite(scores)):
    raise MetricInputError("transition_row_or_scores contains NaN or inf; all must be finite.")
  if isinstance(target, (bool, np.bool_)) or not isinstance(target, (int, np.integer)) or not (
      0 <= target < num_classes):
    raise MetricInputError(f"target must be an integer in [0, {num_classes}); got {target!r}.")
  if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or not (
      1 <= k <= num_classes - 1):
    raise MetricInputError(f"k must be an integer in [1, {num_classes - 1}]; got {k!r}.")
  candidates = np.array([c for c in range(num_classes) if c != target])
  # lexsort sorts by its last key first: descending score, then ascending index among equals.
  order = np.lexsort((candidates, -scores[candidates].astype(np.float64)))
  return tuple(int(c) for c in candidates[order[:k]])


# --------------------------------------------------------------------------------------------
# Summaries over metrics dictionaries.
# --------------------------------------------------------------------------------------------


def avg_gap(metrics: Mapping[str, Any], retrain_metrics: Mapping[str, Any],
            keys: Sequence[str] = DEFAULT_AVG_GAP_KEYS) -> float:
  """Mean absolute difference from Retrain over `keys`, as SalUn reports its "Avg. Gap".

  SalUn averages |metric - Retrain's metric| over its accuracies and MIA-efficacy in percent; the
  default keys here are docs/method.md's Dr, Df and MIA (`mia_entropy_lr`), in fractions, so 0.05
  means 5 points. Every value must be a fraction in [0, 1]: a percentage passed by mistake would
  otherwise inflate the gap a hundredfold without any sign.

  Args:
    metrics: the method's metrics, key -> float.
    retrain_metrics: Retrain's metrics, key -> float.
    keys: non-empty sequence of distinct keys present in both.

  Returns:
    A float in [0, 1].
  """
  if isinstance(keys, str) or len(keys) == 0:
    raise MetricInputError(f"keys must be a non-empty sequence of metric names; got {keys!r}.")
  if len(set(keys)) != len(keys):
    raise MetricInputError(f"keys has repeated entries: {list(keys)}.")
  gaps = []
  for key in keys:
    values = []
    for name, table in (("metrics", metrics), ("retrain_metrics", retrain_metrics)):
      if key not in table:
        raise MetricInputError(
            f"{name} has no key {key!r}; it has {sorted(map(str, table))}.")
      value = table[key]
      if not _is_numeric_scalar(value) or not (0.0 <= float(value) <= 1.0):
        raise MetricInputError(
            f"{name}[{key!r}] must be a fraction in [0, 1]; got {value!r}.")
      values.append(float(value))
    gaps.append(abs(values[0] - values[1]))
  return float(np.mean(gaps))


def _is_numeric_scalar(value: Any) -> bool:
  """True for real-number scalars (Python, NumPy, 0-d arrays); False for bools, strings, lists."""
  if isinstance(value, (bool, np.bool_, str, bytes)):
    return False
  try:
    array = np.asarray(value)
  except Exception:  # pylint: disable=broad-except  # objects NumPy cannot convert
    return False
  return array.ndim == 0 and (np.issubdtype(array.dtype, np.floating)
                              or np.issubdtype(array.dtype, np.integer))


def aggregate(list_of_metric_dicts: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float]]:
  """Mean and spread of each numeric metric over runs (seeds).

  Args:
    list_of_metric_dicts: non-empty sequence of dicts key -> value, one per run. Keys whose
      values are not real-number scalars (strings, bools, lists, None) are ignored; a key may
      be missing from some runs, and `n` counts the runs that have it.

  Returns:
    {key: {"mean": float, "std": float, "n": int}}, keys in order of first appearance. `std` is
    the SAMPLE standard deviation (ddof = 1), the unbiased-variance estimate usual for a spread
    over seeds; it is NaN when n == 1, since one run says nothing about spread. A NaN value in
    any run makes that key's mean and std NaN, so a failed run is never averaged away.
  """
  if isinstance(list_of_metric_dicts, (Mapping, str)):
    raise MetricInputError(
        "list_of_metric_dicts must be a sequence of metric dicts, one per run; got a single "
        f"{type(list_of_metric_dicts).__name__}.")
  runs = list(list_of_metric_dicts)
  if not runs:
    raise MetricInputError("list_of_metric_dicts is empty; it needs at least one run's metrics.")
  values_by_key: dict[str, list[float]] = {}
  for position, metrics in enumerate(runs):
    if not isinstance(metrics, Mapping):
      raise MetricInputError(
          f"list_of_metric_dicts[{position}] must be a dict of metrics; got "
          f"{type(metrics).__name__}.")
    for key, value in metrics.items():
      if _is_numeric_scalar(value):
        values_by_key.setdefault(key, []).append(float(value))
  summary = {}
  for key, values in values_by_key.items():
    array = np.asarray(values, dtype=np.float64)
    std = float(np.std(array, ddof=1)) if array.size > 1 else math.nan
    summary[key] = {"mean": float(np.mean(array)), "std": std, "n": int(array.size)}
  return summary
