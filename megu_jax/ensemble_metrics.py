"""Per-example tests that compare an ensemble of unlearned models with an ensemble of oracles.

The strongest unlearning evaluations do not compare one unlearned model with one Retrain model:
randomness in training makes any single pair differ. They train N models with the unlearning
method and N "oracles" (Retrain models: trained from scratch without the forgotten data), and ask,
example by example, whether the method's distribution of outputs is the oracles' distribution.
This module holds those tests, on the per-example *margin* of each model (`margins`):

  * `klom`: KL divergence of margins (Georgiev et al. 2024, "Attribute-to-Delete"; the EasyDUB
    benchmark's `eval.py`), a binned KL(method || oracle) per example;
  * `gaussian_kl`: the same KL between Gaussian fits of the two samples, far less biased than the
    binned estimate at the small N (8-32) that a compute budget allows;
  * `forgetting_epsilons`, `forgetting_points`, `forgetting_quality`, `forgetting_score`: the
    NeurIPS 2023 Machine Unlearning Challenge's forgetting quality (Triantafillou et al. 2024;
    `google-deepmind/unlearning_evaluation`, `metric.py`), an empirical (epsilon, delta) of the best
    threshold attack telling the two samples apart, bucketed into points;
  * `bootstrap_ci`, `summarize`: mean and tail quantiles over examples with seeded percentile
    bootstrap intervals, as JSON-ready numbers; `paired_bootstrap_ci`: the interval of the
    difference of two methods' statistic over the same examples.

Arrays (host NumPy, float64; JAX arrays are accepted and copied):

  logits          float [..., examples, K]   outputs of one or more models (leading axes free),
  labels          int   [examples]           true labels in [0, K),
  method_margins  float [models, examples]   margins under the unlearned models,
  oracle_margins  float [models, examples]   margins under the oracles.

The two ensembles may hold different numbers of models. Bad input raises
`EnsembleMetricInputError` (a `ValueError`) whose one line names the argument and what is wrong.

Small-N caveat, measured (tests/test_ensemble_metrics.py): for two independent samples of the
*same* N(0, 1), KLoM's 95th percentile over examples is ~8.8 at N = 8, ~6.0 at 16, ~3.0 at 32
and ~0.67 at 100, so at N <= 32 KLoM mostly measures the sample size; the Gaussian KL still
separates a 0.5-sd shift from no shift at N = 8 (mean 0.52 vs 0.39).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = [
  "MIN_MODELS",
  "MIN_MODELS_FORGETTING",
  "EnsembleMetricInputError",
  "bootstrap_ci",
  "forgetting_epsilons",
  "forgetting_points",
  "forgetting_quality",
  "forgetting_score",
  "gaussian_kl",
  "klom",
  "margins",
  "num_buckets",
  "paired_bootstrap_ci",
  "summarize",
]

# The fewest models per ensemble: a sample standard deviation (ddof=1) needs two.
MIN_MODELS = 2
# The forgetting quality needs ceil(ln(N - 1)) >= 1 for a single bucket of points, i.e. N >= 3:
# at N = 2 there is no bucket and every example would score 0 whatever the method did.
MIN_MODELS_FORGETTING = 3

# KLoM as in EasyDUB.
KLOM_BINS = 20
KLOM_CLIP = 100.0
KLOM_FLOOR = 1e-5

# The challenge's constants (metric.py: DELTA, EPSILON_CAP, NUM_THRESHOLDS_PER_UNIT, `buffer`).
FORGET_DELTA = 1e-5
EPSILON_CAP = 50.0
THRESHOLDS_PER_UNIT = 100
INTERVAL_BUFFER = 2.0
PEAKY_RANGE_RATIO = 0.01
BUCKET_WIDTH = 0.5

# Work arrays of the threshold attacks are [examples, thresholds, pooled samples]; chunks of
# examples keep each below this many entries (~16 MB per float64 array).
_MAX_CHUNK_ENTRIES = 1 << 21




class EnsembleMetricInputError(ValueError):
  """An argument of an ensemble metric has the wrong shape, type, size or value."""


# --------------------------------------------------------------------------------------------
# Input checks. Each returns a clean NumPy array or raises naming the argument.
# --------------------------------------------------------------------------------------------


def _check_finite(name: str, array: np.ndarray) -> None:
  """Raises naming `name` and how many NaN / infinite entries it holds, if any."""
  num_nan = int(np.isnan(array).sum())
  num_inf = int(np.isinf(array).sum())
  if num_nan or num_inf:
    raise EnsembleMetricInputError(
        f"{name} contains {num_nan} NaN and {num_inf} infinite values (of {array.size}); all "
        "must be finite.")


def _check_ensemble(name: str, value: Any, *, min_models: int) -> np.ndarray:
  """Returns `value` as finite float64 [models >= min_models, examples >= 1]."""
  array = np.asarray(value)
  if array.ndim != 2:
    raise EnsembleMetricInputError(
        f"{name} must be a 2-D array [models, examples]; got ndim={array.ndim} "
        f"(shape {array.shape}).")
  if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise EnsembleMetricInputError(f"{name} must hold real numbers; got dtype {array.dtype}.")
  if array.shape[0] < min_models:
    raise EnsembleMetricInputError(
        f"{name} has {array.shape[0]} models (shape {array.shape}); at least {min_models} are "
        "needed.")
  if array.shape[1] == 0:
    raise EnsembleMetricInputError(
        f"{name} has no examples (shape {array.shape}); at least 1 is needed.")
  array = array.astype(np.float64)
  _check_finite(name, array)
  return array


def _check_ensemble_pair(method_margins: Any, oracle_margins: Any, *,
                         min_models: int) -> tuple[np.ndarray, np.ndarray]:
  """Both ensembles, checked, with the same number of examples."""
  method = _check_ensemble("method_margins", method_margins, min_models=min_models)
  oracle = _check_ensemble("oracle_margins", oracle_margins, min_models=min_models)
  if oracle.shape[1] != method.shape[1]:
    raise EnsembleMetricInputError(
        f"oracle_margins has {oracle.shape[1]} examples but method_margins has "
        f"{method.shape[1]}; the columns must be the same examples.")
  return method, oracle


def _check_positive_float(name: str, value: Any) -> float:
  """Returns `value` as a finite float > 0."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
    raise EnsembleMetricInputError(f"{name} must be a positive number; got {value!r}.")
  if not math.isfinite(float(value)) or float(value) <= 0:
    raise EnsembleMetricInputError(f"{name} must be a finite number > 0; got {value!r}.")
  return float(value)


def _check_int_at_least(name: str, value: Any, minimum: int) -> int:
  """Returns `value` as a Python int >= minimum."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise EnsembleMetricInputError(f"{name} must be an integer >= {minimum}; got {value!r}.")
  if value < minimum:
    raise EnsembleMetricInputError(f"{name} must be at least {minimum}; got {value}.")
  return int(value)


def _check_delta(delta: Any) -> float:
  """Returns the attack's delta as a float in [0, 1)."""
  if isinstance(delta, (bool, np.bool_)) or not isinstance(delta, (int, float, np.number)):
    raise EnsembleMetricInputError(f"delta must be a number in [0, 1); got {delta!r}.")
  if not 0.0 <= float(delta) < 1.0:
    raise EnsembleMetricInputError(f"delta must lie in [0, 1); got {delta!r}.")
  return float(delta)


# --------------------------------------------------------------------------------------------
# Margins.
# --------------------------------------------------------------------------------------------


def margins(logits: Any, labels: Any) -> np.ndarray:
  """Per-example margin m = z_y - logsumexp_{j != y} z_j, i.e. log p_y - log(1 - p_y).

  The "logit-scaled confidence" of LiRA and of the challenge, and the margin of KLoM. Computed
  from the logits directly: the largest wrong logit is factored out of the log-sum-exp, so every
  exp() is in [0, 1] and the sum is in [1, K - 1]. Nothing is rounded to p_y = 1 first, so
  logits such as [1000, 0, 0] give exactly 1000 - ln 2 (a softmax route gives log(0) = -inf or,
  with metric.py's 1e-45 floors, a value capped near +-103.6).

  Args:
    logits: float [..., examples, K], K >= 2, finite; any leading axes (e.g. [models, examples,
      K]).
    labels: int [examples], values in [0, K); the same labels for every leading index.

  Returns:
    float64 [..., examples].
  """
  logits = np.asarray(logits)
  if logits.ndim < 2:
    raise EnsembleMetricInputError(
        f"logits must have at least 2 axes [..., examples, K]; got ndim={logits.ndim} "
        f"(shape {logits.shape}).")
  if not (np.issubdtype(logits.dtype, np.floating) or np.issubdtype(logits.dtype, np.integer)):
    raise EnsembleMetricInputError(f"logits must hold real numbers; got dtype {logits.dtype}.")
  num_examples, num_classes = logits.shape[-2], logits.shape[-1]
  if num_classes < 2:
    raise EnsembleMetricInputError(
        f"logits has {num_classes} classes (shape {logits.shape}); a margin needs at least 2.")
  if num_examples == 0:
    raise EnsembleMetricInputError(
        f"logits has no examples (shape {logits.shape}); at least 1 is needed.")
  logits = logits.astype(np.float64)
  _check_finite("logits", logits)

  labels = np.asarray(labels)
  if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
    raise EnsembleMetricInputError(
        f"labels must be a 1-D integer array [examples]; got shape {labels.shape}, dtype "
        f"{labels.dtype}.")
  if labels.shape[0] != num_examples:
    raise EnsembleMetricInputError(
        f"labels has {labels.shape[0]} entries but logits has {num_examples} examples (shape "
        f"{logits.shape}); they must match.")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise EnsembleMetricInputError(
        f"labels must lie in [0, {num_classes}) (the number of classes); got values in "
        f"[{int(labels.min())}, {int(labels.max())}].")

  is_true_class = np.arange(num_classes) == labels[:, None]  # [examples, K]; broadcasts
  true_logit = np.where(is_true_class, logits, 0.0).sum(axis=-1)
  wrong_logits = np.where(is_true_class, -np.inf, logits)
  largest_wrong = wrong_logits.max(axis=-1)
  # exp(-inf) = 0 removes the true class from the sum; the largest wrong term is exp(0) = 1.
  sum_wrong = np.exp(wrong_logits - largest_wrong[..., None]).sum(axis=-1)
  return true_logit - (largest_wrong + np.log(sum_wrong))


# --------------------------------------------------------------------------------------------
# KLoM and the Gaussian KL.
# --------------------------------------------------------------------------------------------


def _bin_indices(values: np.ndarray, low: np.ndarray, step: np.ndarray, edges: np.ndarray,
                 bins: int) -> np.ndarray:
  """Bin of each value [models, examples] -> int [models, examples] in [0, bins).

  Bin b holds edges[b] <= v < edges[b + 1], as np.digitize reads the edges, except that the last
  bin also holds its right edge (the combined maximum), as np.histogram does. The arithmetic guess
  is corrected against the actual edges, so a value lying exactly on an edge goes where the edge
  comparison puts it, whatever the rounding of the division.
  """
  index = np.floor((values - low) / step)
  index = np.clip(np.nan_to_num(index), 0, bins - 1).astype(np.int64)
  while True:
    next_edge = np.take_along_axis(edges, index + 1, axis=0)
    this_edge = np.take_along_axis(edges, index, axis=0)
    move_up = (index < bins - 1) & (values >= next_edge)
    move_down = (index > 0) & (values < this_edge)
    if not (move_up.any() or move_down.any()):
      return index
    index = index + move_up - move_down


def _bin_probabilities(values: np.ndarray, low: np.ndarray, step: np.ndarray,
                       edges: np.ndarray, bins: int) -> np.ndarray:
  """Histogram over the per-example edges, as fractions of the sample size: [bins, examples]."""
  num_models, num_examples = values.shape
  index = _bin_indices(values, low, step, edges, bins)
  flat = (index * num_examples + np.arange(num_examples)).ravel()
  counts = np.bincount(flat, minlength=bins * num_examples).reshape(bins, num_examples)
  return counts / num_models


def klom(method_margins: Any, oracle_margins: Any, *, bins: int = KLOM_BINS,
         clip: float = KLOM_CLIP, floor: float = KLOM_FLOOR) -> np.ndarray:
  """KL divergence of margins, KL(method || oracle), per example (binned).

  As EasyDUB computes it (`binned_kl_divergence` with p = the unlearned models, q = the oracles:
  its `klom_from_margins(oracle, unlearned)` takes the oracle first but passes it as q):
    1. both samples are clipped to [-clip, clip];
    2. `bins` equal-width bins span the combined range, min to max of both samples of that
       example (edges as np.linspace(min, max, bins + 1));
    3. each bin's probability is its count over the sample size;
    4. the oracle's probability is floored at `floor` in every bin where the method has mass;
    5. KL = sum over the method's non-empty bins of p_m * log(p_m / max(p_o, floor)).
  The value lies in [0, ln(1 / floor)] (11.513 for floor = 1e-5): the ceiling is reached when the
  method's whole sample sits in one bin that holds no oracle.

  Where we differ from EasyDUB: np.digitize's last bin there is half-open, so a value equal to the
  combined maximum is dropped and the rest renormalised; a method whose every model gives that
  maximum (one constant ensemble above another) then scores 0 instead of the ceiling. Here the
  last bin is closed, as in np.histogram, and no value is dropped. A zero range (all values of
  both samples equal) is widened to one unit, as there, so everything falls in the first bin
  and the KL is exactly 0.

  Args:
    method_margins: float [models_m >= 2, examples], margins under the unlearned models.
    oracle_margins: float [models_o >= 2, examples], margins under the oracles.
    bins: number of bins, >= 1.
    clip: margins are clipped to [-clip, clip] first, > 0.
    floor: lower bound on the oracle's bin probability, > 0.

  Returns:
    float64 [examples], each in [0, ln(1 / floor)].
  """
  method, oracle = _check_ensemble_pair(method_margins, oracle_margins, min_models=MIN_MODELS)
  bins = _check_int_at_least("bins", bins, 1)
  clip = _check_positive_float("clip", clip)
  floor = _check_positive_float("floor", floor)

  method = np.clip(method, -clip, clip)
  oracle = np.clip(oracle, -clip, clip)
  low = np.minimum(method.min(axis=0), oracle.min(axis=0))
  high = np.maximum(method.max(axis=0), oracle.max(axis=0))
  high = np.where(high > low, high, low + 1.0)
  # The edges np.linspace(low, high, bins + 1) would give, one column per example.
  step = (high - low) / bins
  edges = np.arange(bins + 1)[:, None] * step + low
  edges[-1] = high

  p_method = _bin_probabilities(method, low, step, edges, bins)
  p_oracle = _bin_probabilities(oracle, low, step, edges, bins)
  has_mass = p_method > 0
  # Where the method has no mass the term is 0; dividing by 1 there keeps log() quiet.
  ratio = np.where(has_mass, p_method / np.where(has_mass, np.maximum(p_oracle, floor), 1.0),
                   1.0)
  return np.sum(p_method * np.log(ratio), axis=0)


def gaussian_kl(method_margins: Any, oracle_margins: Any, *, min_std: float = 1e-3) -> np.ndarray:
  """KL(N(mu_m, s_m^2) || N(mu_o, s_o^2)) per example, from each ensemble's mean and std.

  The closed form log(s_o / s_m) + (s_m^2 + (mu_m - mu_o)^2) / (2 s_o^2) - 1/2, with the sample
  mean and the unbiased (ddof=1) standard deviation of each ensemble. Both standard deviations
  are floored at `min_std`, an absolute floor in margin units (log-odds). Margins of networks
  trained with different seeds spread by far more than 1e-3, so the floor only changes
  (near-)constant ensembles, where it prevents a division by zero: two identical constant
  ensembles give exactly 0, and a constant ensemble against a spread one a large, finite value.

  Args:
    method_margins: float [models_m >= 2, examples], margins under the unlearned models.
    oracle_margins: float [models_o >= 2, examples], margins under the oracles.
    min_std: floor on both standard deviations, > 0.

  Returns:
    float64 [examples], each >= 0.
  """
  method, oracle = _check_ensemble_pair(method_margins, oracle_margins, min_models=MIN_MODELS)
  min_std = _check_positive_float("min_std", min_std)
  mean_m, mean_o = method.mean(axis=0), oracle.mean(axis=0)
  std_m = np.maximum(method.std(axis=0, ddof=1), min_std)
  std_o = np.maximum(oracle.std(axis=0, ddof=1), min_std)
  kl = (np.log(std_o / std_m) + (std_m**2 + (mean_m - mean_o)**2) / (2 * std_o**2) - 0.5)
  # Rounding can leave -1e-17 for identical fits; a KL is never negative.
  return np.maximum(kl, 0.0)


# --------------------------------------------------------------------------------------------
# Forgetting quality of the NeurIPS 2023 Machine Unlearning Challenge.
# --------------------------------------------------------------------------------------------
#
# metric.py evaluates every attack of two families on a grid of thresholds, per example, and
# takes the best epsilon. We never build the grids: an attack's error rates depend only on how
# many samples of each side it calls "positive", and those counts change only where a threshold
# crosses a sample value. So for each gap between consecutive pooled sample values we ask whether
# any grid point falls in it (an O(1) index computation on the arithmetic grid, checked against
# the grid's exact floating-point values), and look the epsilon of the resulting counts up in a
# table of all (positives called positive, negatives called positive) pairs. The attacks, and
# hence the epsilons, are the reference's (tests compare with a literal per-threshold loop).


def _linspace_entries(start: np.ndarray, step: np.ndarray, stop: np.ndarray, num: np.ndarray,
                      index: np.ndarray) -> np.ndarray:
  """Entries `index` of np.linspace(start, stop, num), bitwise: numpy computes index * step +
  start with step = (stop - start) / (num - 1), and sets the last entry to stop. All arguments
  broadcast; entries outside [0, num) are garbage for the caller to mask."""
  entries = index * step + start
  return np.where((index == num - 1) & (num > 1), stop, entries)


def _count_grid_points(start: np.ndarray, stop: np.ndarray, num: Any, values: np.ndarray, *,
                       inclusive: bool) -> np.ndarray:
  """How many points of np.linspace(start, stop, num) are <= (inclusive) or < each value.

  start, stop, num broadcast against values, one grid per entry; returns int64 of the broadcast
  shape, in [0, num]. The count comes from the value's position on the grid, (value - start) /
  step. Rounding moves that position by far less than `tolerance`, so only a position within
  `tolerance` of a whole number (a value on or next to a grid point: in practice only exact
  ties) can be miscounted; those few are settled against the grid's exact entries, so a value
  equal to a grid point is counted exactly as a comparison with the built grid counts it.
  """
  num = np.asarray(num, np.int64)
  step = (stop - start) / np.maximum(num - 1, 1)
  with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
    position = (values - start) / step
  position = np.where(np.isfinite(position), position, -1.0)
  count = (np.floor(position) + 1) if inclusive else np.ceil(position)
  count = np.clip(count, 0, num).astype(np.int64)
  if np.any(num == 1):
    # A one-point grid is just its start (its step may be 0); an empty one is clipped to 0.
    count = np.where(num == 1, (values >= start) if inclusive else (values > start), count)
  has_step = num >= 2
  if not np.any(has_step):
    return count
  # A bound on the position's rounding error (a few roundings of magnitude |value| + |start|,
  # over the step, plus the grid entries' own), with a wide safety factor.
  smallest_step = np.min(np.where(has_step, step, np.inf))
  scale = (np.max(np.abs(values)) + np.max(np.abs(start))) / smallest_step + np.max(num) + 1.0
  tolerance = 1024 * np.finfo(np.float64).eps * scale
  uncertain = (np.abs(position - np.round(position)) <= tolerance) & has_step
  if not uncertain.any():
    return count

  # Exact settlement of the uncertain entries: step `count` until entry count - 1 is counted
  # and entry `count` is not (the grid is non-decreasing).
  where = np.nonzero(uncertain)
  shape = uncertain.shape
  part = {name: np.broadcast_to(array, shape)[where]
          for name, array in (("start", start), ("stop", stop), ("num", num), ("step", step),
                              ("values", values))}
  part_count = count[where]

  def counted(index: np.ndarray) -> np.ndarray:
    entries = _linspace_entries(part["start"], part["step"], part["stop"], part["num"], index)
    return entries <= part["values"] if inclusive else entries < part["values"]

  while True:
    too_few = (part_count < part["num"]) & counted(
        np.clip(part_count, 0, np.maximum(part["num"] - 1, 0)))
    too_many = (part_count > 0) & ~counted(np.maximum(part_count - 1, 0))
    if not (too_few.any() or too_many.any()):
      break
    part_count = part_count + too_few - too_many
  count[where] = part_count
  return count


def _gaps_with_grid_points(at_or_below: np.ndarray, num: Any) -> np.ndarray:
  """Which gaps between sorted pooled values hold at least one grid point.

  at_or_below [..., M]: how many grid points are <= each sorted pooled value v_0 <= ... <=
  v_{M-1}; num: the grid sizes, broadcasting against [...]. Gap g in 0..M is (v_{g-1}, v_g], with
  v_{-1} = -inf and v_M = +inf; a threshold t in gap g has exactly g pooled values < t (an empty
  gap, between tied values, holds no point). Returns bool [..., M + 1].
  """
  first = at_or_below[..., :1] > 0
  middle = np.diff(at_or_below, axis=-1) > 0
  last = (np.asarray(num)[..., None] - at_or_below[..., -1:]) > 0
  return np.concatenate([first, middle, last], axis=-1)


def _epsilon_table(num_positive: int, num_negative: int, delta: float) -> np.ndarray:
  """Epsilon of an attack by how many samples of each side it calls positive: [P + 1, N + 1].

  Entry [a, b]: a of the num_positive positives and b of the num_negative negatives are called
  positive, so FNR = (num_positive - a) / num_positive and FPR = b / num_negative. As metric.py:
    * FPR = FNR = 0 (perfect separation): +inf, clipped to EPSILON_CAP at the end;
    * exactly one of FPR, FNR zero: the attack is discarded (-inf here), metric.py taking that
      as "an indication of insufficient samples";
    * otherwise max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR)), a term being
      ignored where its log's argument is negative (a rate of 1), as np.nanmax ignores NaN, and
      the attack discarded when both are (FPR = FNR = 1); a negative value becomes 0.
  The rates are float64 here; the reference's are float32 means (~1e-7 relative differences).
  """
  called_positive = np.arange(num_positive + 1)[:, None]
  negatives_called_positive = np.arange(num_negative + 1)[None, :]
  fnr = (num_positive - called_positive) / num_positive
  fpr = negatives_called_positive / num_negative
  with np.errstate(divide="ignore", invalid="ignore"):
    from_fnr = np.log(1 - delta - fpr) - np.log(fnr)
    from_fpr = np.log(1 - delta - fnr) - np.log(fpr)
  best = np.fmax(from_fnr, from_fpr)
  perfect = (fnr == 0) & (fpr == 0)
  one_zero = (fnr == 0) != (fpr == 0)
  table = np.where(np.isnan(best) | one_zero, -np.inf, np.maximum(best, 0.0))
  return np.where(perfect, np.inf, table)


def _sorted_pool(positive: np.ndarray, negative: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Both samples pooled and sorted per example, float64 [E, M = P + N], and how many of the
  first g sorted values are positives, g = 0..M: int64 [E, M + 1]."""
  pooled = np.concatenate([positive, negative], axis=0).T
  order = np.argsort(pooled, axis=1, kind="stable")
  sorted_pool = np.take_along_axis(pooled, order, axis=1)
  positives_below = np.cumsum(order < positive.shape[0], axis=1)
  return sorted_pool, np.pad(positives_below, ((0, 0), (1, 0)))


def _best_single_threshold(positive: np.ndarray, negative: np.ndarray,
                           table: np.ndarray) -> np.ndarray:
  """Best epsilon [E] over metric.py's single-threshold attacks (-inf where none survives).

  positive [P, E] is the side with the larger median. Thresholds: ceil((max - min) * 100) points
  evenly from the pooled minimum to the pooled maximum (none when all values are equal); a value
  c >= t is called positive.
  """
  num_positive, num_negative = positive.shape[0], negative.shape[0]
  sorted_pool, positives_below = _sorted_pool(positive, negative)
  low, high = sorted_pool[:, :1], sorted_pool[:, -1:]
  num = np.ceil((high - low) * THRESHOLDS_PER_UNIT).astype(np.int64)
  at_or_below = _count_grid_points(low, high, num, sorted_pool, inclusive=True)
  has_threshold = _gaps_with_grid_points(at_or_below, num[:, 0])  # [E, M + 1]
  # With t in gap g, the g values below t are called negative, the others positive.
  values_below = np.arange(sorted_pool.shape[1] + 1)
  codes = ((num_positive - positives_below) * (num_negative + 1)
           + num_negative - (values_below - positives_below))
  epsilons = np.take(table, codes)
  return np.where(has_threshold, epsilons, -np.inf).max(axis=1)


def _best_interval(peaky: np.ndarray, other: np.ndarray, table: np.ndarray) -> np.ndarray:
  """Best epsilon [E] over metric.py's double-threshold (interval) attacks (-inf: none survives).

  peaky [P, E], the positive side here, is the sample with the smaller range w. Right thresholds:
  ceil((max_ - min_) * 100) points evenly from min_ = (min(peaky) + w) - 2 to max_ = max(peaky) +
  2 (so ~400 points, 0.01 apart); for each right threshold r, 400 left thresholds evenly from
  (r - w) - 2 to (r - w) + 2. A value c with l <= c <= r is called positive.
  """
  num_examples = peaky.shape[1]
  peaky_min, peaky_max = peaky.min(axis=0), peaky.max(axis=0)
  width = peaky_max - peaky_min
  right_start = peaky_min + width - INTERVAL_BUFFER
  right_stop = peaky_max + INTERVAL_BUFFER
  num_right = np.ceil((right_stop - right_start) * THRESHOLDS_PER_UNIT).astype(np.int64)
  num_left = int(np.ceil(2 * INTERVAL_BUFFER * THRESHOLDS_PER_UNIT))
  max_right = int(num_right.max())
  right_index = np.arange(max_right)[None, :]
  right_step = (right_stop - right_start) / np.maximum(num_right - 1, 1)
  right = _linspace_entries(right_start[:, None], right_step[:, None], right_stop[:, None],
                            num_right[:, None], right_index)  # [E, R]
  right_exists = right_index < num_right[:, None]

  def at_or_below_right(samples: np.ndarray) -> np.ndarray:
    """Samples [S, E] <= each right threshold: int [E, R]."""
    # c <= grid point k exactly when k >= (grid points < c): a cumulative histogram of that.
    points_below = _count_grid_points(right_start[:, None], right_stop[:, None],
                                      num_right[:, None], samples.T, inclusive=False)
    flat = (np.arange(num_examples)[:, None] * (max_right + 1) + points_below).ravel()
    histogram = np.bincount(flat, minlength=num_examples * (max_right + 1))
    return np.cumsum(histogram.reshape(num_examples, max_right + 1), axis=1)[:, :max_right]

  peaky_inside_right = at_or_below_right(peaky)[:, :, None]  # [E, R, 1]
  other_inside_right = at_or_below_right(other)[:, :, None]

  sorted_pool, peaky_below = _sorted_pool(peaky, other)
  values_below = np.arange(sorted_pool.shape[1] + 1)
  other_below = values_below - peaky_below
  # Each right threshold's own left grid, built from r and w as metric.py does.
  left_start = (right - width[:, None]) - INTERVAL_BUFFER
  left_stop = (right - width[:, None]) + INTERVAL_BUFFER
  left_at_or_below = _count_grid_points(left_start[..., None], left_stop[..., None], num_left,
                                        sorted_pool[:, None, :], inclusive=True)  # [E, R, M]
  has_left = _gaps_with_grid_points(left_at_or_below, num_left)  # [E, R, M + 1]
  # With l in gap g, the g pooled values below l are outside [l, r]; a negative difference
  # means l > r, an empty interval.
  peaky_called = np.maximum(peaky_inside_right - peaky_below[:, None, :], 0)
  other_called = np.maximum(other_inside_right - other_below[:, None, :], 0)
  epsilons = np.take(table, peaky_called * table.shape[1] + other_called)
  valid = has_left & right_exists[:, :, None]
  return np.where(valid, epsilons, -np.inf).max(axis=(1, 2))


def _best_in_chunks(attack: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                    positive: np.ndarray, negative: np.ndarray, table: np.ndarray, *,
                    entries_per_example: int) -> np.ndarray:
  """attack(positive, negative, table) over chunks of examples (columns), concatenated: [E]."""
  num_examples = positive.shape[1]
  chunk = max(1, _MAX_CHUNK_ENTRIES // max(entries_per_example, 1))
  return np.concatenate([
      attack(positive[:, start:start + chunk], negative[:, start:start + chunk], table)
      for start in range(0, num_examples, chunk)
  ] or [np.zeros(0)])


def _forgetting_epsilons(method: np.ndarray, oracle: np.ndarray, delta: float) -> np.ndarray:
  """forgetting_epsilons on checked float64 [models, examples] ensembles."""
  num_examples = method.shape[1]
  # The positive side of each example is the sample with the larger median (the method on ties).
  oracle_positive = np.median(oracle, axis=0) > np.median(method, axis=0)
  method_range = method.max(axis=0) - method.min(axis=0)
  oracle_range = oracle.max(axis=0) - oracle.min(axis=0)
  positive_range = np.where(oracle_positive, oracle_range, method_range)
  negative_range = np.where(oracle_positive, method_range, oracle_range)
  largest = np.where(positive_range > negative_range, positive_range, negative_range)
  smallest = np.where(positive_range > negative_range, negative_range, positive_range)
  # The peaky guard: one range under 1% of the other (typically a method whose models all agree)
  # gets the cap outright; the threshold grids are too coarse to be trusted to catch it. Two
  # zero ranges give 0 / 0 = NaN, which is not < 0.01: those go on to the attacks.
  with np.errstate(divide="ignore", invalid="ignore"):
    peaky_guard = smallest / largest < PEAKY_RANGE_RATIO
  # The interval attacks' positive side is the peakier sample; on equal ranges, the one the
  # median rule made negative.
  peaky_is_oracle = np.where(positive_range >= negative_range, ~oracle_positive, oracle_positive)

  num_method, num_oracle = method.shape[0], oracle.shape[0]
  pooled = num_method + num_oracle
  tables = {(num_oracle, num_method): _epsilon_table(num_oracle, num_method, delta),
            (num_method, num_oracle): _epsilon_table(num_method, num_oracle, delta)}
  best = np.full(num_examples, -np.inf)
  for oracle_side in (True, False):
    first, second = (oracle, method) if oracle_side else (method, oracle)
    table = tables[(first.shape[0], second.shape[0])]
    for attack, chooses_oracle, entries in (
        (_best_single_threshold, oracle_positive, 4 * (pooled + 1)),
        (_best_interval, peaky_is_oracle, 4 * 402 * (pooled + 1))):
      columns = np.flatnonzero(~peaky_guard & (chooses_oracle == oracle_side))
      if columns.size:
        best[columns] = np.maximum(best[columns], _best_in_chunks(
            attack, first[:, columns], second[:, columns], table, entries_per_example=entries))
  # No surviving attack (both samples one identical constant: every attack has exactly one zero
  # error rate) trips an assertion in metric.py; nothing tells the samples apart, so 0 here.
  epsilons = np.clip(np.where(best == -np.inf, 0.0, best), 0.0, EPSILON_CAP)
  return np.where(peaky_guard, EPSILON_CAP, epsilons)


def forgetting_epsilons(method_margins: Any, oracle_margins: Any, *,
                        delta: float = FORGET_DELTA) -> np.ndarray:
  """Empirical epsilon of the best threshold attack telling method from oracle, per example.

  The NeurIPS 2023 Machine Unlearning Challenge's per-example test (metric.py, `_get_epsilons`
  and `compute_forget_score_from_confs`), reproduced attack for attack:
    * per example, the "positive" sample is the one with the larger median (the method's when
      the medians are equal);
    * peaky guard: if smallest_range / largest_range < 0.01 (either sample) epsilon is the cap
      50, before any attack; two zero ranges (0 / 0) are not caught by it;
    * single-threshold attacks: t on ceil((max - min) * 100) points evenly over the pooled range;
      c >= t is called positive;
    * interval attacks, the positive side now being the peakier sample (smaller range w; on
      equal ranges, the side the median rule made negative): right ends r on
      ceil(((max + 2) - ((min + w) - 2)) * 100) points evenly from (min + w) - 2 to max + 2 of
      the peaky sample, for each r 400 left ends l evenly from (r - w) - 2 to (r - w) + 2;
      l <= c <= r is called positive;
    * each attack's FPR, FNR give an epsilon as in `_epsilon_table` (both zero: +inf; exactly one
      zero: discarded; else max(log((1 - delta - FPR) / FNR), log((1 - delta - FNR) / FPR)),
      at least 0); epsilon is the best over both families, clipped to [0, 50].
  Where we differ: rates and logs are float64 (metric.py's are float32), the single-threshold
  grid follows np.linspace rather than torch.linspace (last-bit differences, which matter only for
  a margin lying exactly on a grid point), and an example where no attack survives gets 0
  instead of tripping metric.py's assertion (that happens when both samples are one identical
  constant, so nothing can tell them apart). The two ensembles may differ in size.

  Speed: the reference evaluates ~160 000 attacks per example on a GPU (~0.2 s per example). Here
  no grid is built: an attack's rates change only where a threshold crosses a sample, so each
  gap between sorted pooled values is tested for holding a grid point, vectorised over examples.
  Measured (time.perf_counter around one call on 2 000 examples of N(0, 1) margins, 16 models
  per ensemble, best / median of 5 calls, NumPy on one core of a shared 2-core machine): 0.66 /
  0.71 ms per example; at 512 models per ensemble (the challenge's size) ~17 ms per example.

  Args:
    method_margins: float [models_m >= 3, examples], margins under the unlearned models.
    oracle_margins: float [models_o >= 3, examples], margins under the oracles.
    delta: the delta of the (epsilon, delta) attacks, in [0, 1).

  Returns:
    float64 [examples], each in [0, 50].
  """
  method, oracle = _check_ensemble_pair(method_margins, oracle_margins,
                                        min_models=MIN_MODELS_FORGETTING)
  return _forgetting_epsilons(method, oracle, _check_delta(delta))


def num_buckets(num_models: int) -> int:
  """How many epsilon buckets (of width 0.5) score points with `num_models` unlearned models.

  metric.py bounds the epsilon that N models can measure by max_epsilon = ceil(ln(N - 1)) and
  lays buckets [0, 0.5), [0.5, 1), ... while a bucket's end is <= max_epsilon: 2 * max_epsilon
  buckets. E.g. N = 3: 2, N = 8: 4, N = 16: 6, N = 32: 8, N = 512: 14. N = 2 would give none,
  hence the minimum of 3.
  """
  num_models = _check_int_at_least("num_models", num_models, MIN_MODELS_FORGETTING)
  max_epsilon = math.ceil(math.log(num_models - 1))
  return int(max_epsilon // BUCKET_WIDTH)


def forgetting_points(epsilons: Any, num_models: int) -> np.ndarray:
  """Points of each example's epsilon: 2^-b in bucket b (width 0.5), 0 beyond the last bucket.

  As metric.py: epsilon in [0.5 b, 0.5 (b + 1)) scores 2^-b for b < num_buckets(num_models); an
  epsilon >= ceil(ln(N - 1)) (the cap of 50 in particular) falls in no bucket and scores 0, not
  the last bucket's 2^-(num_buckets - 1).

  Args:
    epsilons: float [examples], not NaN (as from `forgetting_epsilons`).
    num_models: N, the number of unlearned models the epsilons came from, >= 3.

  Returns:
    float64 [examples], each 0 or a power of 2 in [2^-(num_buckets - 1), 1].
  """
  buckets = num_buckets(num_models)
  epsilons = np.asarray(epsilons)
  if epsilons.ndim != 1 or not (np.issubdtype(epsilons.dtype, np.floating)
                                or np.issubdtype(epsilons.dtype, np.integer)):
    raise EnsembleMetricInputError(
        f"epsilons must be a 1-D array of numbers [examples]; got shape {epsilons.shape}, "
        f"dtype {epsilons.dtype}.")
  epsilons = epsilons.astype(np.float64)
  num_nan = int(np.isnan(epsilons).sum())
  if num_nan:
    raise EnsembleMetricInputError(f"epsilons contains {num_nan} NaN values (of {epsilons.size}).")
  # The first bucket with epsilon < its end; a negative epsilon would land in the first.
  with np.errstate(invalid="ignore", over="ignore"):
    bucket = np.maximum(np.floor(epsilons / BUCKET_WIDTH), 0.0)
  return np.where(bucket < buckets, 2.0 ** -np.minimum(bucket, buckets), 0.0)


def forgetting_quality(method_margins: Any, oracle_margins: Any, *,
                       delta: float = FORGET_DELTA) -> dict[str, Any]:
  """The challenge's forgetting quality F: the mean over forget examples of their points.

  F is 1 when no example's epsilon reaches 0.5 and 0 when every one reaches ceil(ln(N - 1)).
  Even a perfect unlearner (method and oracle samples of one distribution) scores well below 1,
  because N finite samples look different by chance: ~0.18 at N = 8-32 (measured in the tests).
  N is the number of unlearned models, as in metric.py.

  Args:
    method_margins: float [models_m >= 3, examples], margins under the unlearned models.
    oracle_margins: float [models_o >= 3, examples], margins under the oracles.
    delta: the attacks' delta, in [0, 1).

  Returns:
    {"F": float, "points": float64 [examples], "epsilons": float64 [examples]}.
  """
  method, oracle = _check_ensemble_pair(method_margins, oracle_margins,
                                        min_models=MIN_MODELS_FORGETTING)
  epsilons = _forgetting_epsilons(method, oracle, _check_delta(delta))
  points = forgetting_points(epsilons, method.shape[0])
  return {"F": float(points.mean()), "points": points, "epsilons": epsilons}


def forgetting_score(F: float, retain_acc_unlearned: float, retain_acc_retrain: float,
                     test_acc_unlearned: float, test_acc_retrain: float) -> float:
  """The challenge's final score: F * (RA_U / RA_R) * (TA_U / TA_R).

  The utility ratios penalise a method that forgets by destroying the model: retain and test
  accuracies of the unlearned models relative to those of Retrain (each the mean over its
  ensemble). F must be in [0, 1]; accuracies in [0, 1], Retrain's above 0.
  """
  named = {"F": F, "retain_acc_unlearned": retain_acc_unlearned,
           "retain_acc_retrain": retain_acc_retrain, "test_acc_unlearned": test_acc_unlearned,
           "test_acc_retrain": test_acc_retrain}
  values = {}
  for name, value in named.items():
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
      raise EnsembleMetricInputError(f"{name} must be a number in [0, 1]; got {value!r}.")
    if not 0.0 <= float(value) <= 1.0:
      raise EnsembleMetricInputError(f"{name} must lie in [0, 1]; got {value!r}.")
    values[name] = float(value)
  for name in ("retain_acc_retrain", "test_acc_retrain"):
    if values[name] == 0.0:
      raise EnsembleMetricInputError(
          f"{name} is 0; the utility ratio divides by it, so it must be > 0.")
  return (values["F"] * (values["retain_acc_unlearned"] / values["retain_acc_retrain"])
          * (values["test_acc_unlearned"] / values["test_acc_retrain"]))


# --------------------------------------------------------------------------------------------
# Aggregates over examples, with bootstrap intervals.
# --------------------------------------------------------------------------------------------


def _check_per_example(name: str, value: Any) -> np.ndarray:
  """Returns `value` as finite float64 [examples >= 1]."""
  array = np.asarray(value)
  if array.ndim != 1:
    raise EnsembleMetricInputError(
        f"{name} must be a 1-D array [examples]; got ndim={array.ndim} (shape {array.shape}).")
  if array.size == 0:
    raise EnsembleMetricInputError(f"{name} is empty; it needs at least 1 example.")
  if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
    raise EnsembleMetricInputError(f"{name} must hold real numbers; got dtype {array.dtype}.")
  array = array.astype(np.float64)
  _check_finite(name, array)
  return array


def bootstrap_ci(values: Any, statistic: Callable[..., Any], *, num_resamples: int = 1000,
                 level: float = 0.95, seed: int = 0) -> tuple[float, float]:
  """Percentile-bootstrap confidence interval of a statistic over examples.

  Examples are resampled with replacement `num_resamples` times; the interval is the
  ((1 - level) / 2, (1 + level) / 2) quantiles of the statistic over the resamples. The same seed
  gives the same interval.

  Args:
    values: float [examples], finite (e.g. per-example KLoM).
    statistic: a NumPy-style reduction called as statistic(array, axis=-1), reducing the last
      axis: np.mean, np.median, functools.partial(np.quantile, q=0.95), ... It receives float64
      [resamples, examples] (a chunk of the resamples at a time) and must return [resamples].
    num_resamples: how many bootstrap resamples, >= 1.
    level: the interval's coverage, in (0, 1).
    seed: seeds the resampling.

  Returns:
    (low, high), Python floats.
  """
  values = _check_per_example("values", values)
  _check_bootstrap_settings(statistic, num_resamples, level)
  statistics = _resampled_statistics((values,), lambda v: statistic(v, axis=-1),
                                     num_resamples, seed)
  return _percentile_interval(statistics, level)


def paired_bootstrap_ci(values: Any, baseline: Any, statistic: Callable[..., Any], *,
                        num_resamples: int = 1000, level: float = 0.95, seed: int = 0
                        ) -> tuple[float, float]:
  """Percentile-bootstrap interval of ``statistic(values) - statistic(baseline)``, paired.

  Both are per-example values of the same examples (e.g. two methods' per-example KLoM against
  one Retrain ensemble); every resample draws the same examples from both, so what the examples
  share (how hard each one is) cancels and the interval is that of the difference alone. An
  interval that excludes 0 says the two differ on these examples.

  Args:
    values, baseline: float [examples] each, finite, the same examples in the same order.
    statistic: as in :func:`bootstrap_ci`.
    num_resamples, level, seed: as in :func:`bootstrap_ci`.

  Returns:
    (low, high), Python floats.
  """
  values = _check_per_example("values", values)
  baseline = _check_per_example("baseline", baseline)
  if values.shape != baseline.shape:
    raise EnsembleMetricInputError(
        f"values and baseline must hold the same examples; got shapes {values.shape} and "
        f"{baseline.shape}.")
  _check_bootstrap_settings(statistic, num_resamples, level)
  statistics = _resampled_statistics(
      (values, baseline), lambda v, b: statistic(v, axis=-1) - statistic(b, axis=-1),
      num_resamples, seed)
  return _percentile_interval(statistics, level)


def _check_bootstrap_settings(statistic, num_resamples, level) -> None:
  if not callable(statistic):
    raise EnsembleMetricInputError(f"statistic must be callable as statistic(array, axis=-1); got "
                     f"{statistic!r}.")
  _check_int_at_least("num_resamples", num_resamples, 1)
  if isinstance(level, (bool, np.bool_)) or not isinstance(level, (int, float, np.number)) or (
      not 0.0 < float(level) < 1.0):
    raise EnsembleMetricInputError(f"level must be a number in (0, 1); got {level!r}.")


def _resampled_statistics(arrays: tuple[np.ndarray, ...], statistic: Callable[..., Any],
                          num_resamples: int, seed: int) -> np.ndarray:
  """``statistic`` of each resample: the same resampled examples from every array."""
  rng = np.random.default_rng(seed)
  num_examples = arrays[0].size
  # A [resamples, examples] index array for all resamples at once can be gigabytes; chunks of
  # resamples keep it small. The chunk size depends on the example count only, so a seed still
  # fixes the interval.
  chunk = max(1, _MAX_CHUNK_ENTRIES // num_examples)
  statistics = []
  for start in range(0, int(num_resamples), chunk):
    size = min(chunk, int(num_resamples) - start)
    index = rng.integers(0, num_examples, size=(size, num_examples))
    resampled = [array[index] for array in arrays]
    result = np.asarray(statistic(*resampled), np.float64)
    if result.shape != (size,):
      raise EnsembleMetricInputError(
          f"statistic must reduce the last axis of its [resamples, examples] input to "
          f"[resamples]; got shape {result.shape} from input shape {resampled[0].shape}.")
    statistics.append(result)
  return np.concatenate(statistics)


def _percentile_interval(statistics: np.ndarray, level: float) -> tuple[float, float]:
  tail = (1.0 - float(level)) / 2.0
  low, high = np.quantile(statistics, [tail, 1.0 - tail])
  return float(low), float(high)


def _quantile_95(array: np.ndarray, axis: int = -1) -> np.ndarray:
  """The 95th percentile along `axis` (linear interpolation, NumPy's default)."""
  return np.quantile(array, 0.95, axis=axis)


def summarize(per_example: Any, *, seed: int = 0) -> dict[str, Any]:
  """Mean and tail of a per-example metric, with 95 % percentile-bootstrap intervals.

  Args:
    per_example: float [examples], finite (e.g. per-example KLoM).
    seed: seeds both bootstraps (1000 resamples each).

  Returns:
    JSON-ready {"mean", "p95", "p99": float, "mean_ci95", "p95_ci95": [low, high]}; quantiles
    are NumPy's linear interpolation.
  """
  values = _check_per_example("per_example", per_example)
  return {
      "mean": float(values.mean()),
      "p95": float(np.quantile(values, 0.95)),
      "p99": float(np.quantile(values, 0.99)),
      "mean_ci95": list(bootstrap_ci(values, np.mean, seed=seed)),
      "p95_ci95": list(bootstrap_ci(values, _quantile_95, seed=seed)),
  }
