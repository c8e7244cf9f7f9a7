"""Forget / retain splits for the three forgetting scenarios of the SSD benchmark.

- full_class: every sample of one or more task classes is forgotten.
- sub_class: every sample of one or more *sub-classes* is forgotten (e.g. "rocket" in CIFAR-20);
  the samples keep their superclass label, and the superclass stays in the retain set.
- random: a seeded uniform sample of the training set is forgotten; its test side is the whole
  test set (retain_test), since no test image belongs to the forget set.

A split is a set of index arrays into the data set, saved as .npy files plus a JSON record with
their SHA-256, so an experiment can prove later that it used exactly the same samples.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterable

import numpy as np

from megu_jax import datasets as datasets_lib
from megu_jax import io_utils

SCENARIOS = ("full_class", "sub_class", "random")
INDEX_ARRAYS = ("forget_train", "retain_train", "forget_test", "retain_test")
SPLIT_FILE = "split.json"
_FORMAT_VERSION = 1


class SplitError(ValueError):
  """A split request that cannot be served, or a split that breaks an invariant."""


class SplitFileError(SplitError):
  """A saved split is missing, damaged or does not match its record."""


@dataclasses.dataclass(frozen=True, eq=False)
class ForgetSplit:
  """Which training and test samples are forgotten and which are retained.

  Attributes:
    scenario: one of SCENARIOS.
    forget: what was forgotten: class names (full_class), sub-class names (sub_class), () random.
    forget_classes: task-class indices (full_class), sub-class indices (sub_class), () random.
    forget_train: int64 [F] sorted indices into the train set.
    retain_train: int64 [N - F] sorted; disjoint from forget_train, together all of the train set.
    forget_test: int64 [F_test] sorted indices into the test set (empty for random).
    retain_test: int64 [M - F_test] sorted (the whole test set for random).
    seed: the seed of the random draw (recorded for every scenario).
    dataset_name: name of the Dataset the indices refer to.
  """

  scenario: str
  forget: tuple[str, ...]
  forget_classes: tuple[int, ...]
  forget_train: np.ndarray
  retain_train: np.ndarray
  forget_test: np.ndarray
  retain_test: np.ndarray
  seed: int
  dataset_name: str = ""

  def counts(self) -> dict[str, int]:
    """Number of samples in each index array."""
    return {name: int(len(getattr(self, name))) for name in INDEX_ARRAYS}


def _complement(indices: np.ndarray, size: int) -> np.ndarray:
  keep = np.ones(size, bool)
  keep[indices] = False
  return np.flatnonzero(keep).astype(np.int64)


def _as_name_tuple(forget: str | Iterable[str]) -> tuple[str, ...]:
  # A lone string would otherwise be split into characters.
  return (forget,) if isinstance(forget, str) else tuple(forget)


def _check_no_duplicates(names: tuple[str, ...], indices: tuple[int, ...], valid_names) -> None:
  seen = {}
  for name, index in zip(names, indices):
    if index in seen:
      raise SplitError(
          f"forget names {seen[index]!r} and {name!r} both mean {valid_names[index]!r}; "
          f"list each class once")
    seen[index] = name


def make_split(dataset: datasets_lib.Dataset, scenario: str, *,
               forget: str | Iterable[str] = (), forget_size: int | None = None,
               seed: int = 0) -> ForgetSplit:
  """Builds the forget/retain split of `dataset` for one scenario.

  Args:
    dataset: the data set whose indices the split holds.
    scenario: one of SCENARIOS.
    forget: class names (full_class) or sub-class names (sub_class); must be empty for random.
      Names are matched by `datasets.resolve_class_names` (case-insensitive, SSD aliases).
    forget_size: number of training samples to forget (random only).
    seed: seed of `np.random.default_rng` for the random draw.

  Returns:
    A ForgetSplit that passes `validate_split(split, dataset)`.
  """
  if scenario not in SCENARIOS:
    raise SplitError(f"unknown scenario {scenario!r}; valid scenarios: {', '.join(SCENARIOS)}")
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
    raise SplitError(f"seed must be an integer, got {seed!r}")
  seed = int(seed)
  names = _as_name_tuple(forget)
  num_train, num_test = len(dataset.train_labels), len(dataset.test_labels)

  if scenario == "random":
    if names:
      raise SplitError(
          f"scenario 'random' draws its forget set and takes no forget names, got {names}; "
          f"use forget_size=")
    if (forget_size is None or isinstance(forget_size, bool)
            or not isinstance(forget_size, (int, np.integer))
            or not 0 < forget_size < num_train):
      raise SplitError(
          f"scenario 'random' needs forget_size, an integer in [1, {num_train - 1}] "
          f"(the train set of {dataset.name!r} has {num_train} samples, and at least one "
          f"must be retained), got {forget_size!r}")
    rng = np.random.default_rng(seed)
    forget_train = np.sort(rng.choice(num_train, size=int(forget_size), replace=False))
    split = ForgetSplit(
        scenario=scenario,
        forget=(),
        forget_classes=(),
        forget_train=forget_train.astype(np.int64),
        retain_train=_complement(forget_train, num_train),
        forget_test=np.zeros(0, np.int64),
        retain_test=np.arange(num_test, dtype=np.int64),
        seed=seed,
        dataset_name=dataset.name,
    )
    validate_split(split, dataset)
    return split

  if forget_size is not None:
    raise SplitError(
        f"forget_size={forget_size!r} only applies to scenario 'random'; scenario "
        f"{scenario!r} forgets every sample of the named classes")
  if not names:
    what = "class" if scenario == "full_class" else "sub-class"
    raise SplitError(f"scenario {scenario!r} needs forget=<{what} names>, got none")

  if scenario == "full_class":
    indices = datasets_lib.resolve_class_names(dataset, names)
    canonical = tuple(dataset.class_names[i] for i in indices)
    _check_no_duplicates(names, indices, dataset.class_names)
    train_groups, test_groups = dataset.train_labels, dataset.test_labels
  else:  # sub_class
    if dataset.train_subclasses is None:
      raise SplitError(
          f"scenario 'sub_class' needs sub-class labels, and data set {dataset.name!r} has "
          f"none; load it with label_level='coarse' (fashion_mnist, cifar100) or use "
          f"'cifar20'")
    indices = datasets_lib.resolve_subclass_names(dataset, names)
    canonical = tuple(dataset.subclass_names[i] for i in indices)
    _check_no_duplicates(names, indices, dataset.subclass_names)
    train_groups, test_groups = dataset.train_subclasses, dataset.test_subclasses

  forget_train = np.flatnonzero(np.isin(train_groups, indices)).astype(np.int64)
  forget_test = np.flatnonzero(np.isin(test_groups, indices)).astype(np.int64)
  if scenario == "sub_class":
    # Sub-class forgetting means the superclass stays learnable; if the named sub-classes are
    # all of it, this is full-class forgetting under another name.
    remaining = set(dataset.train_labels[_complement(forget_train, num_train)].tolist())
    emptied = sorted(set(dataset.train_labels[forget_train].tolist()) - remaining)
    if emptied:
      raise SplitError(
          f"forgetting sub-classes {canonical} removes every training sample of class(es) "
          f"{[dataset.class_names[c] for c in emptied]}; that is full-class forgetting, "
          f"use scenario='full_class'")
  split = ForgetSplit(
      scenario=scenario,
      forget=canonical,
      forget_classes=tuple(int(i) for i in indices),
      forget_train=forget_train,
      retain_train=_complement(forget_train, num_train),
      forget_test=forget_test,
      retain_test=_complement(forget_test, num_test),
      seed=seed,
      dataset_name=dataset.name,
  )
  validate_split(split, dataset)
  return split


def _check_structure(split: ForgetSplit, num_train: int | None = None,
                     num_test: int | None = None) -> None:
  """Invariants that need no data set: dtypes, order, disjointness, coverage, non-emptiness."""
  if split.scenario not in SCENARIOS:
    raise SplitError(
        f"split has unknown scenario {split.scenario!r}; valid scenarios: {', '.join(SCENARIOS)}")
  for name in INDEX_ARRAYS:
    indices = getattr(split, name)
    if not isinstance(indices, np.ndarray) or indices.dtype != np.int64 or indices.ndim != 1:
      raise SplitError(
          f"{name} must be an int64 [n] array, got "
          f"{getattr(indices, 'dtype', type(indices))} {getattr(indices, 'shape', '')}")
    if len(indices) > 1 and not np.all(np.diff(indices) > 0):
      raise SplitError(f"{name} must be strictly increasing (sorted, no repeats)")
    if len(indices) and indices[0] < 0:
      raise SplitError(f"{name} holds negative index {indices[0]}")
  if len(split.forget_train) == 0:
    raise SplitError(f"the forget set is empty (forget={split.forget})")
  if len(split.retain_train) == 0:
    raise SplitError(f"the retain set is empty (forget={split.forget}): nothing would remain")
  if len(split.forget) != len(split.forget_classes):
    raise SplitError(
        f"forget {split.forget} and forget_classes {split.forget_classes} differ in length")
  if split.scenario == "random":
    if split.forget or split.forget_classes:
      raise SplitError(f"a random split names no classes, got forget={split.forget}")
    if len(split.forget_test):
      raise SplitError("a random split has no forget_test samples")
  for side, size in (("train", num_train), ("test", num_test)):
    forget = getattr(split, f"forget_{side}")
    retain = getattr(split, f"retain_{side}")
    if np.intersect1d(forget, retain).size:
      raise SplitError(f"forget_{side} and retain_{side} overlap")
    # Both are sorted and disjoint, so they cover 0..n-1 exactly when sizes and maxima agree.
    total = len(forget) + len(retain)
    largest = max(forget[-1] if len(forget) else -1, retain[-1] if len(retain) else -1)
    if largest != total - 1:
      raise SplitError(
          f"forget_{side} and retain_{side} do not cover indices 0..{total - 1} exactly "
          f"(largest index {largest})")
    if size is not None and total != size:
      raise SplitError(
          f"forget_{side} + retain_{side} hold {total} indices, the {side} set has {size}")


def validate_split(split: ForgetSplit,
                   dataset: datasets_lib.Dataset | None = None) -> None:
  """Raises SplitError unless `split` is a consistent split (of `dataset`, when given).

  Always checked: int64 sorted unique indices, forget/retain disjoint and together the whole
  set, non-empty forget and retain sets, random splits have no forget_test. With a data set:
  sizes match, and for full_class / sub_class the forget sets are exactly the samples of the
  named (sub-)classes, whose names match.
  """
  if dataset is None:
    _check_structure(split)
    return
  if split.dataset_name and split.dataset_name != dataset.name:
    raise SplitError(
        f"split was made for data set {split.dataset_name!r}, not {dataset.name!r}")
  _check_structure(split, len(dataset.train_labels), len(dataset.test_labels))
  if split.scenario == "random":
    return
  if split.scenario == "full_class":
    valid_names, train_groups, test_groups = (
        dataset.class_names, dataset.train_labels, dataset.test_labels)
  else:
    if dataset.subclass_names is None:
      raise SplitError(f"sub_class split, but data set {dataset.name!r} has no sub-classes")
    valid_names, train_groups, test_groups = (
        dataset.subclass_names, dataset.train_subclasses, dataset.test_subclasses)
  for name, index in zip(split.forget, split.forget_classes):
    if not 0 <= index < len(valid_names) or valid_names[index] != name:
      raise SplitError(
          f"forget class {name!r} does not have index {index} in data set {dataset.name!r}")
  for side, groups in (("train", train_groups), ("test", test_groups)):
    expected = np.flatnonzero(np.isin(groups, split.forget_classes))
    if not np.array_equal(getattr(split, f"forget_{side}"), expected):
      raise SplitError(
          f"forget_{side} is not exactly the {side} samples of {split.forget} "
          f"in data set {dataset.name!r}")


# --------------------------------------------------------------------------------------------
# Saving and loading.


def _sha256(indices: np.ndarray) -> str:
  # Hash the values (as little-endian int64), not the .npy bytes, so the header layout of a
  # NumPy version does not matter.
  return hashlib.sha256(np.ascontiguousarray(indices, dtype="<i8").tobytes()).hexdigest()


def save_split(split: ForgetSplit, directory: str | os.PathLike) -> None:
  """Writes split.json and the four index arrays as .npy files, each atomically.

  The JSON record is written last, so a directory with a split.json always has the arrays it
  describes.
  """
  _check_structure(split)
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  for name in INDEX_ARRAYS:
    indices = np.ascontiguousarray(getattr(split, name), dtype="<i8")
    io_utils.atomic_save_npy(os.path.join(directory, f"{name}.npy"), indices)
  record = {
      "format_version": _FORMAT_VERSION,
      "dataset": split.dataset_name,
      "scenario": split.scenario,
      "forget": list(split.forget),
      "forget_classes": [int(c) for c in split.forget_classes],
      "seed": split.seed,
      "counts": split.counts(),
      "sha256": {name: _sha256(getattr(split, name)) for name in INDEX_ARRAYS},
  }
  text = json.dumps(record, indent=2) + "\n"
  io_utils.atomic_write_text(os.path.join(directory, SPLIT_FILE), text)


def load_split(directory: str | os.PathLike,
               dataset: datasets_lib.Dataset | None = None) -> ForgetSplit:
  """Loads a split saved by `save_split`, checking hashes, counts and invariants.

  Args:
    directory: where `save_split` wrote it.
    dataset: when given, the split is also validated against it (`validate_split`).

  Returns:
    The ForgetSplit.
  """
  directory = os.fspath(directory)
  record_path = os.path.join(directory, SPLIT_FILE)
  try:
    with open(record_path, encoding="utf-8") as f:
      record = json.load(f)
  except FileNotFoundError as e:
    raise SplitFileError(f"split record {record_path} is missing") from e
  except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
    raise SplitFileError(f"split record {record_path} is unreadable: {e}") from e
  required = ("format_version", "dataset", "scenario", "forget", "forget_classes", "seed",
              "counts", "sha256")
  missing = [key for key in required if key not in record] if isinstance(record, dict) else required
  if missing:
    raise SplitFileError(f"split record {record_path} lacks {missing}")
  if record["format_version"] != _FORMAT_VERSION:
    raise SplitFileError(
        f"split record {record_path} has format_version {record['format_version']!r}, "
        f"this code reads {_FORMAT_VERSION}")

  arrays = {}
  for name in INDEX_ARRAYS:
    path = os.path.join(directory, f"{name}.npy")
    try:
      indices = np.load(path, allow_pickle=False)
    except FileNotFoundError as e:
      raise SplitFileError(f"index file {path} is missing") from e
    except (OSError, ValueError, EOFError) as e:
      raise SplitFileError(f"index file {path} is damaged: {e}") from e
    if indices.dtype != np.int64 or indices.ndim != 1:
      raise SplitFileError(
          f"index file {path} holds {indices.dtype} {indices.shape}, expected int64 [n]")
    if len(indices) != record["counts"].get(name):
      raise SplitFileError(
          f"index file {path} holds {len(indices)} indices, {record_path} says "
          f"{record['counts'].get(name)}")
    if _sha256(indices) != record["sha256"].get(name):
      raise SplitFileError(
          f"index file {path} does not match the SHA-256 in {record_path}: it was "
          f"changed or damaged")
    arrays[name] = indices

  split = ForgetSplit(
      scenario=record["scenario"],
      forget=tuple(record["forget"]),
      forget_classes=tuple(int(c) for c in record["forget_classes"]),
      seed=int(record["seed"]),
      dataset_name=record["dataset"],
      **arrays,
  )
  try:
    validate_split(split, dataset)
  except SplitError as e:
    raise SplitFileError(f"split in {directory} is inconsistent: {e}") from e
  return split
