"""Tests for megu_jax.datasets: loading, label levels, names, and the error paths.

CIFAR is exercised through `tfds.testing.mock_data`, which replaces only the builder's
`as_data_source`; `tfds.data_source` and our record-reading code run for real. No test downloads:
every TFDS call gets an empty temporary data_dir (and conftest points TFDS_DATA_DIR nowhere).
"""
import gzip
import os
import re
import struct

import numpy as np
import pytest
import tensorflow_datasets as tfds

from megu_jax import datasets

FASHION_DIR = datasets.DEFAULT_FASHION_MNIST_DIR
needs_fashion = pytest.mark.skipif(
    not os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")),
    reason=f"Fashion-MNIST IDX files not installed in {FASHION_DIR} (run `make data`)")


@pytest.fixture(scope="module")
def fashion():
    return datasets.load_dataset("fashion_mnist")


@pytest.fixture(scope="module")
def digits():
    return datasets.load_dataset("digits")


# ---------------------------------------------------------------------------------------------
# Fashion-MNIST (real files).


@needs_fashion
def test_fashion_mnist_shapes_labels_and_names(fashion):
    assert fashion.name == "fashion_mnist"
    assert fashion.train_images.shape == (60000, 28, 28, 1)
    assert fashion.test_images.shape == (10000, 28, 28, 1)
    assert fashion.train_images.dtype == np.uint8 and fashion.train_labels.dtype == np.int32
    assert fashion.image_shape == (28, 28, 1) and fashion.num_classes == 10
    # Fashion-MNIST is exactly balanced: 6000 train and 1000 test images per class.
    np.testing.assert_array_equal(np.bincount(fashion.train_labels, minlength=10), [6000] * 10)
    np.testing.assert_array_equal(np.bincount(fashion.test_labels, minlength=10), [1000] * 10)
    assert fashion.class_names[6] == "Shirt" and fashion.class_names[9] == "Ankle boot"
    assert fashion.flip_ok
    assert fashion.train_subclasses is None


@needs_fashion
def test_fashion_mnist_mean_std_match_direct_computation(fashion):
    pixels = fashion.train_images.astype(np.float64) / 255.0
    assert fashion.mean.dtype == np.float32 and fashion.mean.shape == (1,)
    np.testing.assert_allclose(fashion.mean, [pixels.mean()], rtol=1e-5)
    np.testing.assert_allclose(fashion.std, [pixels.std()], rtol=1e-5)


@needs_fashion
def test_fashion_mnist_coarse_view(fashion):
    coarse = datasets.load_dataset("fashion_mnist", label_level="coarse")
    assert coarse.name == "fashion_mnist_coarse"
    assert coarse.class_names == ("tops", "trouser", "dress", "footwear", "bag")
    names = fashion.class_names
    expected_group = {"T-shirt/top": "tops", "Pullover": "tops", "Coat": "tops", "Shirt": "tops",
                      "Trouser": "trouser", "Dress": "dress", "Sandal": "footwear",
                      "Sneaker": "footwear", "Ankle boot": "footwear", "Bag": "bag"}
    for fine_index, fine_name in enumerate(names):
        samples = coarse.train_subclasses == fine_index
        assert set(coarse.train_labels[samples]) == {coarse.class_names.index(
            expected_group[fine_name])}, fine_name
    # The fine labels survive as sub-classes, image for image.
    np.testing.assert_array_equal(coarse.train_subclasses, fashion.train_labels)
    np.testing.assert_array_equal(coarse.test_subclasses, fashion.test_labels)
    assert coarse.subclass_names == fashion.class_names
    np.testing.assert_array_equal(np.bincount(coarse.train_labels), [24000, 6000, 6000, 18000, 6000])
    assert coarse.superclass_of is None


def _write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def _write_fake_fashion(directory, num_train=20, num_test=10):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (num_train, 28, 28)),
        "train-labels-idx1-ubyte.gz": np.arange(num_train) % 10,
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (num_test, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": np.arange(num_test) % 10,
    }
    for file, array in arrays.items():
        _write_idx(os.path.join(directory, file), array)
    return arrays


def test_fashion_mnist_reads_idx_files_from_data_dir(tmp_path):
    arrays = _write_fake_fashion(tmp_path)
    dataset = datasets.load_dataset("fashion_mnist", data_dir=tmp_path)
    assert dataset.train_images.shape == (20, 28, 28, 1)
    np.testing.assert_array_equal(dataset.train_images[..., 0],
                                  arrays["train-images-idx3-ubyte.gz"])
    np.testing.assert_array_equal(dataset.test_labels, np.arange(10) % 10)


@pytest.mark.parametrize("damage", ["bad_magic", "truncated_payload", "truncated_gzip", "not_gzip"])
def test_corrupt_idx_file_is_named(tmp_path, damage):
    _write_fake_fashion(tmp_path)
    path = os.path.join(tmp_path, "train-images-idx3-ubyte.gz")
    with gzip.open(path, "rb") as f:
        content = f.read()
    if damage == "bad_magic":
        with gzip.open(path, "wb") as f:
            f.write(b"\x00\x00\x08\x01" + content[4:])
    elif damage == "truncated_payload":
        with gzip.open(path, "wb") as f:
            f.write(content[:-100])
    elif damage == "truncated_gzip":
        raw = open(path, "rb").read()
        open(path, "wb").write(raw[: len(raw) // 2])
    else:
        open(path, "wb").write(b"this is not a gzip file at all")
    with pytest.raises(datasets.CorruptDataError, match=re.escape(path)):
        datasets.load_dataset("fashion_mnist", data_dir=tmp_path)


def test_idx_files_with_different_counts_are_rejected(tmp_path):
    _write_fake_fashion(tmp_path)
    _write_idx(os.path.join(tmp_path, "t10k-labels-idx1-ubyte.gz"), np.zeros(9))
    with pytest.raises(datasets.CorruptDataError, match="10 images but .* 9 labels"):
        datasets.load_dataset("fashion_mnist", data_dir=tmp_path)


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(datasets.DataNotFoundError) as info:
        datasets.load_dataset("fashion_mnist", data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "make data" in message
    assert "dataset-fashion-mnist" in message
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_fashion_mnist_falls_back_to_tfds(tmp_path):
    # No IDX files in tmp_path, so the loader must go through tfds.data_source.
    with tfds.testing.mock_data(num_examples=6):
        dataset = datasets.load_dataset("fashion_mnist", data_dir=tmp_path)
    assert dataset.train_images.shape == (6, 28, 28, 1)
    assert dataset.class_names == datasets.FASHION_MNIST_CLASS_NAMES


# ---------------------------------------------------------------------------------------------
# Digits.


def test_digits_loads_scaled_and_stratified(digits):
    assert digits.train_images.shape == (1437, 8, 8, 1)
    assert digits.test_images.shape == (360, 8, 8, 1)
    assert digits.train_images.dtype == np.uint8
    assert digits.train_images.max() == 255 and digits.train_images.min() == 0
    assert digits.class_names == tuple("0123456789")
    assert not digits.flip_ok
    test_counts = np.bincount(digits.test_labels, minlength=10)
    assert test_counts.min() >= 35 and test_counts.max() <= 37  # stratified: 360 / 10 each


def test_digits_split_is_fixed():
    first, second = datasets.load_dataset("digits"), datasets.load_dataset("digits")
    np.testing.assert_array_equal(first.train_images, second.train_images)
    np.testing.assert_array_equal(first.test_labels, second.test_labels)


# ---------------------------------------------------------------------------------------------
# CIFAR through tfds.testing.mock_data.

# A deliberately non-standard fine -> coarse map: if the loader hard-coded CIFAR-100's real map,
# the superclass tests below would fail.
FAKE_SUPERCLASS_OF = (7 * np.arange(100) + 3) % 20


def _cifar100_records(self, split, decoders=None, **kwargs):
    """Stands in for builder.as_data_source: 2 consistent records per fine class."""
    del self, decoders, kwargs
    rng = np.random.default_rng(0 if split == "train" else 1)
    fine = np.arange(200) % 100
    return [{"id": f"{split}_{i}", "image": rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
             "label": np.int64(f), "coarse_label": np.int64(FAKE_SUPERCLASS_OF[f])}
            for i, f in enumerate(fine)]


@pytest.fixture(scope="module")
def cifar100(tmp_path_factory):
    with tfds.testing.mock_data(as_data_source_fn=_cifar100_records):
        return datasets.load_dataset("cifar100", data_dir=tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def cifar20(tmp_path_factory):
    with tfds.testing.mock_data(as_data_source_fn=_cifar100_records):
        return datasets.load_dataset("cifar20", data_dir=tmp_path_factory.mktemp("tfds"))


def test_cifar10_through_mock_data(tmp_path):
    with tfds.testing.mock_data(num_examples=12):
        dataset = datasets.load_dataset("cifar10", data_dir=tmp_path)
    assert dataset.train_images.shape == (12, 32, 32, 3)
    assert dataset.test_images.shape == (12, 32, 32, 3)
    assert dataset.train_labels.dtype == np.int32 and dataset.train_labels.max() < 10
    assert dataset.class_names == datasets.CIFAR10_CLASS_NAMES
    assert dataset.superclass_of is None and dataset.flip_ok


def test_cifar100_reads_superclass_map_from_records(cifar100):
    assert cifar100.train_images.shape == (200, 32, 32, 3)
    assert cifar100.class_names == datasets.CIFAR100_CLASS_NAMES
    assert cifar100.superclass_names == datasets.CIFAR20_CLASS_NAMES
    np.testing.assert_array_equal(cifar100.superclass_of, FAKE_SUPERCLASS_OF)


def test_cifar20_is_cifar100_at_the_coarse_level(cifar20, cifar100):
    assert cifar20.name == "cifar20" and cifar20.num_classes == 20
    assert cifar20.class_names == datasets.CIFAR20_CLASS_NAMES
    assert cifar20.subclass_names == datasets.CIFAR100_CLASS_NAMES
    np.testing.assert_array_equal(cifar20.train_subclasses, cifar100.train_labels)
    np.testing.assert_array_equal(cifar20.train_labels, FAKE_SUPERCLASS_OF[cifar100.train_labels])
    coarse = datasets.to_coarse(cifar100)
    assert coarse.name == "cifar20"
    np.testing.assert_array_equal(coarse.test_labels, cifar20.test_labels)


def test_cifar100_with_inconsistent_labels_is_rejected(tmp_path):
    # mock_data's default records draw both labels independently at random.
    with tfds.testing.mock_data(num_examples=300):
        with pytest.raises(datasets.CorruptDataError, match="occurs with superclasses"):
            datasets.load_dataset("cifar100", data_dir=tmp_path)


def test_superclass_map_needs_every_fine_class():
    with pytest.raises(datasets.CorruptDataError, match="'c'.*never occur"):
        datasets.superclass_map_from_labels(np.array([0, 1]), np.array([0, 0]), ("a", "b", "c"),
                                            ("x",))


def test_missing_cifar_says_how_to_prepare(tmp_path):
    with pytest.raises(datasets.DataNotFoundError, match=re.escape(str(tmp_path)) + ".*tfds build"):
        datasets.load_dataset("cifar10", data_dir=tmp_path)


def test_cifar100_name_tables():
    assert len(set(datasets.CIFAR100_CLASS_NAMES)) == 100
    assert list(datasets.CIFAR100_CLASS_NAMES) == sorted(datasets.CIFAR100_CLASS_NAMES)
    assert len(set(datasets.CIFAR20_CLASS_NAMES)) == 20
    assert list(datasets.CIFAR20_CLASS_NAMES) == sorted(datasets.CIFAR20_CLASS_NAMES)
    for protocol_name in ("rocket", "mushroom", "baby", "lamp", "sea"):
        assert protocol_name in datasets.CIFAR100_CLASS_NAMES


# ---------------------------------------------------------------------------------------------
# Names.


def test_resolve_class_names_is_case_and_separator_insensitive(digits):
    fashion_like = datasets.Dataset(
        name="tiny", train_images=np.zeros((10, 2, 2, 1), np.uint8),
        train_labels=np.arange(10, dtype=np.int32), test_images=np.zeros((1, 2, 2, 1), np.uint8),
        test_labels=np.zeros(1, np.int32), class_names=datasets.FASHION_MNIST_CLASS_NAMES,
        superclass_of=None, superclass_names=None, train_subclasses=None, test_subclasses=None,
        subclass_names=None, flip_ok=True)
    assert datasets.resolve_class_names(fashion_like, ["shirt", "ANKLE_BOOT", "t-shirt/top"]) == (
        6, 9, 0)
    assert datasets.resolve_class_names(fashion_like, "Ankle boot") == (9,)
    assert datasets.resolve_class_names(digits, ["7"]) == (7,)


def test_ssd_aliases_resolve_on_cifar20(cifar20):
    aliases = ["vehicle2", "veg", "people", "electrical_devices", "natural_scenes"]
    indices = datasets.resolve_class_names(cifar20, aliases)
    assert [cifar20.class_names[i] for i in indices] == [
        "vehicles_2", "fruit_and_vegetables", "people", "household_electrical_devices",
        "large_natural_outdoor_scenes"]
    assert datasets.resolve_class_names(cifar20, "Vehicles_2") == indices[:1]


def test_resolve_subclass_names(cifar20, digits):
    indices = datasets.resolve_subclass_names(cifar20, ["rocket", "Mushroom", "baby", "lamp", "sea"])
    assert [cifar20.subclass_names[i] for i in indices] == [
        "rocket", "mushroom", "baby", "lamp", "sea"]
    with pytest.raises(datasets.DatasetError, match="'digits' has no sub-classes.*label_level"):
        datasets.resolve_subclass_names(digits, ["3"])


def test_unknown_class_name_lists_valid_names(digits, cifar20):
    with pytest.raises(ValueError, match=r"'eleven'.*valid names: 0, 1, 2"):
        datasets.resolve_class_names(digits, ["eleven"])
    # An alias only works where its target exists.
    with pytest.raises(ValueError, match="'veg'"):
        datasets.resolve_class_names(digits, "veg")
    with pytest.raises(ValueError, match="'rocket'.*aquatic_mammals.*aliases: vehicle2"):
        datasets.resolve_class_names(cifar20, "rocket")


# ---------------------------------------------------------------------------------------------
# Bad requests.


def test_unknown_data_set_lists_valid_names():
    with pytest.raises(ValueError, match="'mnist'.*fashion_mnist, digits, cifar10, cifar100, cifar20"):
        datasets.load_dataset("mnist")


def test_unknown_label_level_is_named():
    with pytest.raises(ValueError, match="'medium'.*fine, coarse"):
        datasets.load_dataset("digits", label_level="medium")


@pytest.mark.parametrize("name", ["digits", "cifar10"])
def test_coarse_without_grouping_names_the_data_set(name):
    # Raised before anything is read, so cifar10 needs no data here.
    with pytest.raises(ValueError, match=f"'{name}' has none.*'fashion_mnist' and 'cifar100'"):
        datasets.load_dataset(name, label_level="coarse")


def test_to_coarse_without_grouping_raises(digits):
    with pytest.raises(ValueError, match="'digits' has no class grouping"):
        datasets.to_coarse(digits)


def test_cifar20_has_no_fine_level():
    with pytest.raises(ValueError, match="'cifar20'.*label_level='fine'.*'cifar100'"):
        datasets.load_dataset("cifar20", label_level="fine")


def test_dataset_rejects_inconsistent_arrays():
    good = dict(name="tiny", train_images=np.zeros((4, 2, 2, 1), np.uint8),
                train_labels=np.array([0, 1, 0, 1], np.int32),
                test_images=np.zeros((2, 2, 2, 1), np.uint8), test_labels=np.array([0, 1], np.int32),
                class_names=("a", "b"), superclass_of=None, superclass_names=None,
                train_subclasses=None, test_subclasses=None, subclass_names=None, flip_ok=True)
    datasets.Dataset(**good)
    with pytest.raises(ValueError, match="train_images must be uint8"):
        datasets.Dataset(**{**good, "train_images": np.zeros((4, 2, 2, 1), np.float32)})
    with pytest.raises(ValueError, match=r"test_labels has values in \[0, 2\], allowed \[0, 2\)"):
        datasets.Dataset(**{**good, "test_labels": np.array([0, 2], np.int32)})
    with pytest.raises(ValueError, match="train_labels has 3 entries, expected 4"):
        datasets.Dataset(**{**good, "train_labels": np.array([0, 1, 0], np.int32)})


def test_channel_mean_std_per_channel():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 4, 5, 3), dtype=np.uint8)
    mean, std = datasets.channel_mean_std(images, chunk_size=7)
    pixels = images.astype(np.float64) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=(0, 1, 2)), rtol=1e-6)
    np.testing.assert_allclose(std, pixels.std(axis=(0, 1, 2)), rtol=1e-5)
    assert mean.dtype == std.dtype == np.float32
