"""Image classification data sets held in host memory as NumPy arrays.

Every data set is loaded whole (the largest, CIFAR, is 180 MB as uint8), so splits, metrics and
oracles can index it freely. Nothing here downloads: Fashion-MNIST comes from the IDX files that
Debian's `dataset-fashion-mnist` installs, digits ship with scikit-learn, and CIFAR is read from a
TFDS directory that was prepared beforehand (`tfds.data_source(..., download=False)`).

Label levels: a data set may carry a grouping *above* its task classes (`superclass_of`, e.g.
CIFAR-100 fine class -> one of 20 superclasses) and, when its task labels are coarse, finer labels
*below* them (`train_subclasses`, used by sub-class forgetting). `to_coarse` turns the first kind
into the second.
"""
from __future__ import annotations

import dataclasses
import functools
import gzip
import os
import struct
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

DATASET_NAMES = ("fashion_mnist", "digits", "cifar10", "cifar100", "cifar20")
LABEL_LEVELS = ("fine", "coarse")
_NAMES_WITH_GROUPING = ("fashion_mnist", "cifar100")  # data sets whose loader sets superclass_of

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

FASHION_MNIST_CLASS_NAMES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Our own grouping (docs/method.md §3): visually entangled classes share a group.
FASHION_MNIST_GROUP_NAMES = ("tops", "trouser", "dress", "footwear", "bag")
FASHION_MNIST_GROUP_OF = (0, 1, 0, 2, 0, 3, 0, 3, 4, 3)  # indexed by FASHION_MNIST_CLASS_NAMES

CIFAR10_CLASS_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
# TFDS (like the original CIFAR-100 meta file) numbers both label sets alphabetically.
CIFAR100_CLASS_NAMES = (
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cup",
    "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house",
    "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard", "lobster", "man",
    "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree", "orange", "orchid",
    "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain", "plate", "poppy",
    "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose", "sea", "seal",
    "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel", "streetcar",
    "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf", "woman", "worm",
)
CIFAR20_CLASS_NAMES = (
    "aquatic_mammals", "fish", "flowers", "food_containers", "fruit_and_vegetables",
    "household_electrical_devices", "household_furniture", "insects", "large_carnivores",
    "large_man-made_outdoor_things", "large_natural_outdoor_scenes",
    "large_omnivores_and_herbivores", "medium_mammals", "non-insect_invertebrates", "people",
    "reptiles", "small_mammals", "trees", "vehicles_1", "vehicles_2",
)
# Short names used by the SSD benchmark (Foster et al.) for CIFAR-20 classes. An alias only applies
# when its target is one of the data set's names, so it never shadows a real class name.
CLASS_NAME_ALIASES = {
    "vehicle2": "vehicles_2",
    "veg": "fruit_and_vegetables",
    "electrical_devices": "household_electrical_devices",
    "natural_scenes": "large_natural_outdoor_scenes",
}

_DIGITS_TEST_SIZE = 360  # of 1797; the remaining 1437 are the train set
_DIGITS_SPLIT_SEED = 0


class DatasetError(ValueError):
  """A data set request that cannot be served, or data that is not what it should be."""


class DataNotFoundError(DatasetError, FileNotFoundError):
  """The data set's files are not on this machine (nothing is ever downloaded)."""


class CorruptDataError(DatasetError):
  """A data file exists but is truncated, corrupt or inconsistent."""


@dataclasses.dataclass(frozen=True, eq=False)
class Dataset:
  """A labelled image data set, all in host memory.

  Attributes:
    name: e.g. "fashion_mnist", "fashion_mnist_coarse", "cifar20".
    train_images: uint8 [N, height, width, channels] (channels = 1 for grayscale).
    train_labels: int32 [N], the task classes the model is trained on, in [0, K).
    test_images: uint8 [M, height, width, channels].
    test_labels: int32 [M].
    class_names: K names of the task classes.
    superclass_of: int32 [K] task class -> superclass index, or None without a grouping.
    superclass_names: names of the superclasses, or None.
    train_subclasses: int32 [N] finer labels below the task classes, or None.
    test_subclasses: int32 [M], or None.
    subclass_names: names of the sub-classes, or None.
    flip_ok: whether a horizontal flip preserves the label (False for digits).
    unseen_images, unseen_labels, unseen_subclasses: training-pool images that no model of the
      recipe trains on (the rest of the pool when it trains on a subset, see
      :func:`training_subset`), with their labels: the same distribution as the training
      images, never members; None when every pool image is trained on.

  The grouping fields default to None (no grouping above or below the task classes).
  """

  name: str
  train_images: np.ndarray
  train_labels: np.ndarray
  test_images: np.ndarray
  test_labels: np.ndarray
  class_names: tuple[str, ...]
  superclass_of: np.ndarray | None = None
  superclass_names: tuple[str, ...] | None = None
  train_subclasses: np.ndarray | None = None
  test_subclasses: np.ndarray | None = None
  subclass_names: tuple[str, ...] | None = None
  flip_ok: bool = True
  unseen_images: np.ndarray | None = None
  unseen_labels: np.ndarray | None = None
  unseen_subclasses: np.ndarray | None = None

  def __post_init__(self):
    # Cheap O(N) checks: a mislabelled or mis-shaped data set would otherwise surface as a
    # wrong accuracy much later.
    for split in ("train", "test"):
      images = getattr(self, f"{split}_images")
      labels = getattr(self, f"{split}_labels")
      if images.dtype != np.uint8 or images.ndim != 4:
        raise DatasetError(
            f"{self.name}: {split}_images must be uint8 [N, H, W, C], "
            f"got {images.dtype} {images.shape}")
      _check_labels(f"{self.name}: {split}_labels", labels, len(images), len(self.class_names))
    if self.train_images.shape[1:] != self.test_images.shape[1:]:
      raise DatasetError(
          f"{self.name}: train images {self.train_images.shape[1:]} and test images "
          f"{self.test_images.shape[1:]} differ in shape")
    if (self.superclass_of is None) != (self.superclass_names is None):
      raise DatasetError(f"{self.name}: superclass_of and superclass_names go together")
    if self.superclass_of is not None:
      _check_labels(f"{self.name}: superclass_of", self.superclass_of,
                    len(self.class_names), len(self.superclass_names))
    subclass_fields = (self.train_subclasses, self.test_subclasses, self.subclass_names)
    if any(f is None for f in subclass_fields) and not all(f is None for f in subclass_fields):
      raise DatasetError(
          f"{self.name}: train_subclasses, test_subclasses and subclass_names go together")
    if self.subclass_names is not None:
      _check_labels(f"{self.name}: train_subclasses", self.train_subclasses,
                    len(self.train_images), len(self.subclass_names))
      _check_labels(f"{self.name}: test_subclasses", self.test_subclasses,
                    len(self.test_images), len(self.subclass_names))

    if (self.unseen_images is None) != (self.unseen_labels is None):
      raise DatasetError(f"{self.name}: unseen_images and unseen_labels go together")
    if self.unseen_images is not None:
      _check_labels(f"{self.name}: unseen_labels", self.unseen_labels, len(self.unseen_images),
                    len(self.class_names))

  def __repr__(self) -> str:
    # The default dataclass repr would print the image arrays.
    levels = ""
    if self.superclass_names is not None:
      levels += f", superclasses={len(self.superclass_names)}"
    if self.subclass_names is not None:
      levels += f", subclasses={len(self.subclass_names)}"
    return (f"Dataset(name={self.name!r}, train={len(self.train_images)}, "
            f"test={len(self.test_images)}, image_shape={self.image_shape}, "
            f"classes={self.num_classes}{levels})")

  @property
  def num_classes(self) -> int:
    return len(self.class_names)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(height, width, channels)."""
    return tuple(self.train_images.shape[1:])

  @functools.cached_property
  def _train_mean_std(self) -> tuple[np.ndarray, np.ndarray]:
    # cached_property writes to __dict__ directly, so it works on a frozen dataclass.
    return channel_mean_std(self.train_images)

  @property
  def mean(self) -> np.ndarray:
    """float32 [C]: per-channel mean of the train images, in [0, 1] units (pixel / 255)."""
    return self._train_mean_std[0]

  @property
  def std(self) -> np.ndarray:
    """float32 [C]: per-channel standard deviation of the train images, in [0, 1] units."""
    return self._train_mean_std[1]


def _check_labels(what: str, labels: np.ndarray, expected_len: int, num_values: int) -> None:
  if labels.dtype != np.int32 or labels.ndim != 1:
    raise DatasetError(f"{what} must be int32 [{expected_len}], got {labels.dtype} {labels.shape}")
  if len(labels) != expected_len:
    raise DatasetError(f"{what} has {len(labels)} entries, expected {expected_len}")
  if len(labels) and (labels.min() < 0 or labels.max() >= num_values):
    raise DatasetError(
        f"{what} has values in [{labels.min()}, {labels.max()}], allowed [0, {num_values})")


def channel_mean_std(images: np.ndarray, chunk_size: int = 4096) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of uint8 images, in [0, 1] units.

  Args:
    images: uint8 [N, height, width, channels].
    chunk_size: images converted to float64 at a time; bounds the extra memory.

  Returns:
    (mean, std), each float32 [channels], such that `normalize` maps the images to zero mean and
    unit variance per channel.
  """
  if images.ndim != 4 or len(images) == 0:
    raise DatasetError(f"expected non-empty images [N, H, W, C], got shape {images.shape}")
  channels = images.shape[-1]
  total = np.zeros(channels, np.float64)
  total_sq = np.zeros(channels, np.float64)
  # Sums in float64 over chunks: exact enough, and never a full float64 copy of 60k images.
  for start in range(0, len(images), chunk_size):
    chunk = images[start:start + chunk_size].astype(np.float64) / 255.0
    total += chunk.sum(axis=(0, 1, 2))
    total_sq += np.square(chunk).sum(axis=(0, 1, 2))
  count = images.shape[0] * images.shape[1] * images.shape[2]
  mean = total / count
  variance = np.maximum(total_sq / count - np.square(mean), 0.0)
  return mean.astype(np.float32), np.sqrt(variance).astype(np.float32)


# --------------------------------------------------------------------------------------------
# Label levels and names.


def to_coarse(dataset: Dataset) -> Dataset:
  """The same images with the superclasses as task labels and the old labels as sub-classes.

  Fashion-MNIST's 10 classes become our 5 groups ("fashion_mnist_coarse"); CIFAR-100's 100 fine
  classes become its 20 superclasses ("cifar20").
  """
  if dataset.superclass_of is None:
    raise DatasetError(
        f"data set {dataset.name!r} has no class grouping to make coarse; the data sets with "
        f"one are 'fashion_mnist' and 'cifar100'")
  coarse_name = "cifar20" if dataset.name == "cifar100" else f"{dataset.name}_coarse"
  return Dataset(
      name=coarse_name,
      train_images=dataset.train_images,
      train_labels=dataset.superclass_of[dataset.train_labels].astype(np.int32),
      test_images=dataset.test_images,
      test_labels=dataset.superclass_of[dataset.test_labels].astype(np.int32),
      class_names=dataset.superclass_names,
      superclass_of=None,
      superclass_names=None,
      train_subclasses=dataset.train_labels,
      test_subclasses=dataset.test_labels,
      subclass_names=dataset.class_names,
      flip_ok=dataset.flip_ok,
  )


def _normalized_name(name: str) -> str:
  # Case, spaces, hyphens and underscores do not distinguish any two class names we know, and
  # users type "ankle boot", "Ankle_Boot" or "t-shirt/top" interchangeably.
  return name.strip().lower().replace(" ", "_").replace("-", "_")


def _resolve_names(names: str | Iterable[str], valid_names: Sequence[str], what: str,
                   dataset_name: str) -> tuple[int, ...]:
  if isinstance(names, str):
    names = (names,)
  index_of = {_normalized_name(n): i for i, n in enumerate(valid_names)}
  for alias, target in CLASS_NAME_ALIASES.items():
    if _normalized_name(target) in index_of and _normalized_name(alias) not in index_of:
      index_of[_normalized_name(alias)] = index_of[_normalized_name(target)]
  indices = []
  for name in names:
    if not isinstance(name, str):
      raise DatasetError(f"{what} names must be strings, got {name!r}")
    key = _normalized_name(name)
    if key not in index_of:
      aliases = [a for a, t in CLASS_NAME_ALIASES.items() if t in valid_names]
      alias_note = f"; aliases: {', '.join(aliases)}" if aliases else ""
      raise DatasetError(
          f"unknown {what} name {name!r} for data set {dataset_name!r}; valid names: "
          f"{', '.join(valid_names)}{alias_note}")
    indices.append(index_of[key])
  return tuple(indices)


def resolve_class_names(dataset: Dataset, names: str | Iterable[str]) -> tuple[int, ...]:
  """Task-class indices of user-given names, in the given order.

  Case-insensitive; spaces, hyphens and underscores are interchangeable; the SSD benchmark's short
  CIFAR-20 names (vehicle2, veg, people, electrical_devices, natural_scenes) are accepted.
  """
  return _resolve_names(names, dataset.class_names, "class", dataset.name)


def resolve_subclass_names(dataset: Dataset, names: str | Iterable[str]) -> tuple[int, ...]:
  """Sub-class indices of user-given names (same matching rules as `resolve_class_names`)."""
  if dataset.subclass_names is None:
    raise DatasetError(
        f"data set {dataset.name!r} has no sub-classes; load it with label_level='coarse' "
        f"(fashion_mnist, cifar100) or use 'cifar20'")
  return _resolve_names(names, dataset.subclass_names, "sub-class", dataset.name)


# --------------------------------------------------------------------------------------------
# Loading.


def training_subset(dataset: Dataset, size: int, seed: int = 0) -> Dataset:
  """``dataset`` with a fixed, class-balanced subset of ``size`` training images (test unchanged).

  The subset is balanced over the finest labels the data set carries (its sub-classes when it
  has them), so that a fine and a coarse model of the same recipe see the same images; it is a
  function of (size, seed) only. The positions are kept sorted, so the subset's order follows
  the source's. Its name gains ``_subset<size>``; the rest of the pool becomes its ``unseen_*``
  images (non-members of every model of the recipe).

  Raises:
    DatasetError: ``size`` is not in [number of fine classes, number of training images].
  """
  finest = dataset.train_subclasses if dataset.train_subclasses is not None else \
      dataset.train_labels
  classes = np.unique(finest)
  if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not (
      len(classes) <= size <= len(finest)):
    raise DatasetError(f"config.train_subset={size!r} must be an integer in [{len(classes)}, "
                       f"{len(finest)}] for {dataset.name} (0 trains on every image)")
  rng = np.random.default_rng([seed, size])
  per_class = np.full(len(classes), size // len(classes))
  per_class[:size % len(classes)] += 1
  chosen = []
  for label, count in zip(classes, per_class):
    members = np.flatnonzero(finest == label)
    if len(members) < count:
      raise DatasetError(f"config.train_subset={size}: class {label} of {dataset.name} has only "
                         f"{len(members)} training images, fewer than the {count} a balanced "
                         "subset needs")
    chosen.append(rng.choice(members, count, replace=False))
  positions = np.sort(np.concatenate(chosen))
  unseen = np.setdiff1d(np.arange(len(finest)), positions)
  subclasses = dataset.train_subclasses
  return dataclasses.replace(
      dataset, name=f"{dataset.name}_subset{size}", train_images=dataset.train_images[positions],
      train_labels=dataset.train_labels[positions],
      train_subclasses=None if subclasses is None else subclasses[positions],
      unseen_images=dataset.train_images[unseen], unseen_labels=dataset.train_labels[unseen],
      unseen_subclasses=None if subclasses is None else subclasses[unseen])


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None,
                 label_level: str | None = None) -> Dataset:
  """Loads a data set into memory; never downloads.

  Args:
    name: one of DATASET_NAMES.
    data_dir: Fashion-MNIST: directory of the IDX files (default DEFAULT_FASHION_MNIST_DIR), or
      a TFDS data directory. CIFAR: the TFDS data directory (default: TFDS's own). Digits: unused.
    label_level: "fine" or "coarse"; None means the data set's own level (fine, except cifar20,
      which is CIFAR-100 at the coarse level). "coarse" makes the class grouping the task labels
      and keeps the fine labels as sub-classes.

  Returns:
    The Dataset.
  """
  if name not in DATASET_NAMES:
    raise DatasetError(f"unknown data set {name!r}; valid names: {', '.join(DATASET_NAMES)}")
  if label_level is not None and label_level not in LABEL_LEVELS:
    raise DatasetError(
        f"unknown label_level {label_level!r}; valid values: {', '.join(LABEL_LEVELS)}")
  if name == "cifar20":
    if label_level == "fine":
      raise DatasetError(
          "'cifar20' is CIFAR-100 at the coarse level, so label_level='fine' is not "
          "available for it; load 'cifar100' for the fine labels")
    return to_coarse(_load_cifar100(data_dir))
  loaders = {
      "fashion_mnist": _load_fashion_mnist,
      "digits": _load_digits,
      "cifar10": _load_cifar10,
      "cifar100": _load_cifar100,
  }
  # Checked before reading anything, so a bad request fails in milliseconds.
  if label_level == "coarse" and name not in _NAMES_WITH_GROUPING:
    raise DatasetError(
        f"label_level='coarse' needs a class grouping, and data set {name!r} has none; "
        f"the data sets with one are 'fashion_mnist' and 'cifar100' (or use 'cifar20')")
  dataset = loaders[name](data_dir)
  return to_coarse(dataset) if label_level == "coarse" else dataset


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
# IDX magic number: two zero bytes, the element type (0x08 = unsigned byte), the number of dims.
_IDX_UBYTE = 0x08


def read_idx(path: str | os.PathLike, expected_ndim: int) -> np.ndarray:
  """Reads a gzipped IDX file of unsigned bytes (the MNIST format) into a uint8 array."""
  path = os.fspath(path)
  try:
    with gzip.open(path, "rb") as f:
      content = f.read()
  except (OSError, EOFError, zlib.error) as e:  # gzip.BadGzipFile is an OSError
    raise CorruptDataError(f"cannot read IDX file {path}: {e}") from e
  if len(content) < 4:
    raise CorruptDataError(f"IDX file {path} is truncated: {len(content)} bytes")
  zeros, element_type, ndim = struct.unpack(">HBB", content[:4])
  if zeros != 0 or element_type != _IDX_UBYTE or ndim != expected_ndim:
    raise CorruptDataError(
        f"IDX file {path} has magic number 0x{content[:4].hex()}, expected "
        f"0x0000{_IDX_UBYTE:02x}{expected_ndim:02x} (unsigned bytes, {expected_ndim} dims)")
  header_size = 4 + 4 * ndim
  if len(content) < header_size:
    raise CorruptDataError(f"IDX file {path} is truncated inside its header")
  shape = struct.unpack(f">{ndim}I", content[4:header_size])
  expected_size = header_size + int(np.prod(shape))
  if len(content) != expected_size:
    raise CorruptDataError(
        f"IDX file {path} holds {len(content)} bytes, but its header {shape} implies "
        f"{expected_size}: truncated or corrupt")
  return np.frombuffer(content, np.uint8, offset=header_size).reshape(shape)


def _load_fashion_mnist(data_dir) -> Dataset:
  directory = os.fspath(data_dir) if data_dir is not None else DEFAULT_FASHION_MNIST_DIR
  paths = {key: os.path.join(directory, file) for key, file in _IDX_FILES.items()}
  if all(os.path.exists(p) for p in paths.values()):
    arrays = {key: read_idx(path, 3 if key.endswith("images") else 1)
              for key, path in paths.items()}
    for split in ("train", "test"):
      images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
      if len(images) != len(labels):
        raise CorruptDataError(
            f"{paths[f'{split}_images']} has {len(images)} images but "
            f"{paths[f'{split}_labels']} has {len(labels)} labels")
      if labels.size and labels.max() >= len(FASHION_MNIST_CLASS_NAMES):
        raise CorruptDataError(
            f"{paths[f'{split}_labels']} has label {labels.max()}, allowed 0..9")
    train_images = arrays["train_images"][..., None]
    test_images = arrays["test_images"][..., None]
    train_labels = arrays["train_labels"].astype(np.int32)
    test_labels = arrays["test_labels"].astype(np.int32)
  else:
    missing = [os.path.basename(p) for p in paths.values() if not os.path.exists(p)]
    try:
      (train_images, train_labels), (test_images, test_labels) = _read_tfds(
          "fashion_mnist", data_dir, with_coarse_labels=False)
    except DataNotFoundError as tfds_error:
      raise DataNotFoundError(
          f"Fashion-MNIST IDX files are missing in {directory} ({', '.join(missing)}), and "
          f"no prepared TFDS copy of 'fashion_mnist' was found either. `make data` installs "
          f"the IDX files (Debian package `dataset-fashion-mnist`); or pass data_dir= a "
          f"directory that holds them.") from tfds_error
  return Dataset(
      name="fashion_mnist",
      train_images=np.ascontiguousarray(train_images),
      train_labels=train_labels,
      test_images=np.ascontiguousarray(test_images),
      test_labels=test_labels,
      class_names=FASHION_MNIST_CLASS_NAMES,
      superclass_of=np.asarray(FASHION_MNIST_GROUP_OF, np.int32),
      superclass_names=FASHION_MNIST_GROUP_NAMES,
  )


def _load_digits(data_dir) -> Dataset:
  del data_dir  # The 8x8 digits ship inside scikit-learn.
  from sklearn.datasets import load_digits
  from sklearn.model_selection import train_test_split

  digits = load_digits()
  # Pixel values are counts 0..16 (of a 4x4 block); scale to the uint8 range of the other sets.
  images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  labels = digits.target.astype(np.int32)
  train_images, test_images, train_labels, test_labels = train_test_split(
      images, labels, test_size=_DIGITS_TEST_SIZE, random_state=_DIGITS_SPLIT_SEED,
      stratify=labels)
  return Dataset(
      name="digits",
      train_images=np.ascontiguousarray(train_images),
      train_labels=train_labels,
      test_images=np.ascontiguousarray(test_images),
      test_labels=test_labels,
      class_names=tuple(str(d) for d in range(10)),
      flip_ok=False,  # a mirrored 2, 3, 4, 5, 7 or 9 is not that digit
  )


def _read_tfds(name: str, data_dir, *, with_coarse_labels: bool):
  """Reads the train and test splits of a prepared TFDS data set into NumPy arrays.

  Returns:
    ((train_images, train_labels[, train_coarse]), (test_images, test_labels[, test_coarse]))
    with images uint8 [N, H, W, C] and labels int32 [N].
  """
  import tensorflow_datasets as tfds

  data_dir = os.fspath(data_dir) if data_dir is not None else None
  result = []
  for split in ("train", "test"):
    try:
      # Never download=True: a download attempt without network hangs for minutes.
      source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
    except Exception as e:  # pylint: disable=broad-except
      # TFDS reports a missing or not-random-access copy with unrelated exception types
      # (NotImplementedError for a TFRECORD/absent directory, DatasetNotFoundError,
      # FileNotFoundError...); to the user they all mean "not prepared here".
      where = data_dir or "TFDS's default data directory"
      raise DataNotFoundError(
          f"TFDS data set {name!r} (split {split!r}) is not prepared for random access in "
          f"{where} (TFDS raised {type(e).__name__}, shown above). Prepare it once on a "
          f"machine with network access, e.g. `tfds build {name} "
          f"--file_format=array_record --data_dir=DIR`, and pass data_dir=DIR.") from e
    # Record by record: TFDS' batched __getitems__ is not supported by every source.
    records = [source[i] for i in range(len(source))]
    if not records:
      raise CorruptDataError(f"TFDS data set {name!r} split {split!r} is empty")
    images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
    labels = np.asarray([r["label"] for r in records], np.int32)
    arrays = [images, labels]
    if with_coarse_labels:
      arrays.append(np.asarray([r["coarse_label"] for r in records], np.int32))
    result.append(tuple(arrays))
  return tuple(result)


def _load_cifar10(data_dir) -> Dataset:
  (train_images, train_labels), (test_images, test_labels) = _read_tfds(
      "cifar10", data_dir, with_coarse_labels=False)
  return Dataset(
      name="cifar10",
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      class_names=CIFAR10_CLASS_NAMES,
  )


def superclass_map_from_labels(fine_labels: np.ndarray, coarse_labels: np.ndarray,
                               fine_names: Sequence[str],
                               coarse_names: Sequence[str]) -> np.ndarray:
  """int32 [num_fine]: the superclass of every fine class, read off paired labels.

  Raises CorruptDataError when a fine class never occurs or occurs under two superclasses.
  """
  num_fine = len(fine_names)
  for what, labels, count in (("fine", fine_labels, num_fine),
                              ("coarse", coarse_labels, len(coarse_names))):
    if labels.size and (labels.min() < 0 or labels.max() >= count):
      raise CorruptDataError(
          f"{what} labels span [{labels.min()}, {labels.max()}], allowed [0, {count})")
  pairs = np.unique(np.stack([fine_labels, coarse_labels], axis=1), axis=0)
  superclass_of = np.full(num_fine, -1, np.int32)
  for fine, coarse in pairs:
    if superclass_of[fine] != -1:
      both = sorted(coarse_names[c] for c in pairs[pairs[:, 0] == fine][:, 1])
      raise CorruptDataError(
          f"fine class {fine_names[fine]!r} occurs with superclasses {both}; "
          f"the fine -> coarse labelling must be a function")
    superclass_of[fine] = coarse
  missing = [fine_names[i] for i in np.flatnonzero(superclass_of < 0)]
  if missing:
    raise CorruptDataError(
        f"fine classes {missing} never occur, so their superclass is unknown")
  return superclass_of


def _load_cifar100(data_dir) -> Dataset:
  (train_images, train_labels, train_coarse), (test_images, test_labels, test_coarse) = (
      _read_tfds("cifar100", data_dir, with_coarse_labels=True))
  # The records carry both labels; reading the map from them (rather than typing it in) cannot
  # disagree with the data.
  superclass_of = superclass_map_from_labels(
      np.concatenate([train_labels, test_labels]), np.concatenate([train_coarse, test_coarse]),
      CIFAR100_CLASS_NAMES, CIFAR20_CLASS_NAMES)
  return Dataset(
      name="cifar100",
      train_images=train_images,
      train_labels=train_labels,
      test_images=test_images,
      test_labels=test_labels,
      class_names=CIFAR100_CLASS_NAMES,
      superclass_of=superclass_of,
      superclass_names=CIFAR20_CLASS_NAMES,
  )
