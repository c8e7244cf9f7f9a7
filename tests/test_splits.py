"""Tests for megu_jax.splits: the three scenarios on real Fashion-MNIST, invariants, files."""
import json
import os
import re

import numpy as np
import pytest

from megu_jax import datasets, splits

FASHION_DIR = datasets.DEFAULT_FASHION_MNIST_DIR
SHIRT = 6


@pytest.fixture(scope="module")
def fashion():
    if not os.path.exists(os.path.join(FASHION_DIR, "train-images-idx3-ubyte.gz")):
        pytest.skip(f"Fashion-MNIST IDX files not installed in {FASHION_DIR} (run `make data`)")
    return datasets.load_dataset("fashion_mnist")


@pytest.fixture(scope="module")
def small_cifar20():
    """CIFAR-20-shaped stand-in: 3 train and 1 test image per fine class, tiny images."""
    fine_train = np.repeat(np.arange(100), 3).astype(np.int32)
    fine_test = np.arange(100, dtype=np.int32)
    cifar100_like = datasets.Dataset(
        name="cifar100", train_images=np.zeros((300, 2, 2, 3), np.uint8), train_labels=fine_train,
        test_images=np.zeros((100, 2, 2, 3), np.uint8), test_labels=fine_test,
        class_names=datasets.CIFAR100_CLASS_NAMES,
        superclass_of=(np.arange(100) % 20).astype(np.int32),
        superclass_names=datasets.CIFAR20_CLASS_NAMES, train_subclasses=None,
        test_subclasses=None, subclass_names=None, flip_ok=True)
    return datasets.to_coarse(cifar100_like)


@pytest.fixture(scope="module")
def fashion_coarse(fashion):
    return datasets.to_coarse(fashion)


def _assert_partition(forget, retain, size):
    assert forget.dtype == retain.dtype == np.int64
    assert np.all(np.diff(forget) > 0) and np.all(np.diff(retain) > 0)
    assert np.intersect1d(forget, retain).size == 0
    np.testing.assert_array_equal(np.union1d(forget, retain), np.arange(size))


# ---------------------------------------------------------------------------------------------
# Scenarios.


def test_full_class_shirt(fashion):
    split = splits.make_split(fashion, "full_class", forget=["shirt"])
    assert split.forget == ("Shirt",) and split.forget_classes == (SHIRT,)
    assert split.counts() == {"forget_train": 6000, "retain_train": 54000,
                              "forget_test": 1000, "retain_test": 9000}
    assert np.all(fashion.train_labels[split.forget_train] == SHIRT)
    assert not np.any(fashion.train_labels[split.retain_train] == SHIRT)
    assert np.all(fashion.test_labels[split.forget_test] == SHIRT)
    assert not np.any(fashion.test_labels[split.retain_test] == SHIRT)
    _assert_partition(split.forget_train, split.retain_train, 60000)
    _assert_partition(split.forget_test, split.retain_test, 10000)
    assert split.dataset_name == "fashion_mnist"


def test_full_class_several_classes(fashion):
    split = splits.make_split(fashion, "full_class", forget=("Shirt", "Coat"))
    assert split.forget_classes == (SHIRT, 4)
    assert len(split.forget_train) == 12000 and len(split.forget_test) == 2000
    assert set(fashion.train_labels[split.forget_train]) == {SHIRT, 4}


def test_sub_class_keeps_the_superclass(fashion_coarse):
    split = splits.make_split(fashion_coarse, "sub_class", forget="Shirt")
    assert split.forget == ("Shirt",) and split.forget_classes == (SHIRT,)
    assert len(split.forget_train) == 6000 and len(split.forget_test) == 1000
    tops = fashion_coarse.class_names.index("tops")
    # Forget samples keep their superclass label, and the superclass stays in the retain set.
    assert np.all(fashion_coarse.train_labels[split.forget_train] == tops)
    assert np.sum(fashion_coarse.train_labels[split.retain_train] == tops) == 18000
    assert np.all(fashion_coarse.train_subclasses[split.forget_train] == SHIRT)
    _assert_partition(split.forget_train, split.retain_train, 60000)
    _assert_partition(split.forget_test, split.retain_test, 10000)


def test_ssd_protocol_names_on_cifar20(small_cifar20):
    full = splits.make_split(small_cifar20, "full_class", forget="vehicle2")
    assert full.forget == ("vehicles_2",) and full.forget_classes == (19,)
    assert len(full.forget_train) == 15 and len(full.forget_test) == 5  # 5 fine classes each
    sub = splits.make_split(small_cifar20, "sub_class", forget="rocket")
    rocket = datasets.CIFAR100_CLASS_NAMES.index("rocket")
    assert sub.forget == ("rocket",) and sub.forget_classes == (rocket,)
    np.testing.assert_array_equal(sub.forget_train, 3 * rocket + np.arange(3))
    np.testing.assert_array_equal(sub.forget_test, [rocket])
    assert np.all(small_cifar20.train_labels[sub.forget_train] == rocket % 20)


def test_random_split_counts_and_test_side(fashion):
    split = splits.make_split(fashion, "random", forget_size=83, seed=0)
    assert len(split.forget_train) == 83 and len(split.retain_train) == 60000 - 83
    assert split.forget == () and split.forget_classes == ()
    assert len(split.forget_test) == 0
    np.testing.assert_array_equal(split.retain_test, np.arange(10000))
    _assert_partition(split.forget_train, split.retain_train, 60000)


def test_random_split_is_reproducible_and_seed_dependent(fashion):
    first = splits.make_split(fashion, "random", forget_size=83, seed=3)
    again = splits.make_split(fashion, "random", forget_size=83, seed=3)
    other = splits.make_split(fashion, "random", forget_size=83, seed=4)
    np.testing.assert_array_equal(first.forget_train, again.forget_train)
    assert not np.array_equal(first.forget_train, other.forget_train)
    # The documented recipe: default_rng(seed).choice without replacement, then sorted.
    expected = np.sort(np.random.default_rng(3).choice(60000, size=83, replace=False))
    np.testing.assert_array_equal(first.forget_train, expected)


def test_class_splits_are_reproducible(fashion):
    a = splits.make_split(fashion, "full_class", forget="Shirt", seed=0)
    b = splits.make_split(fashion, "full_class", forget="Shirt", seed=1)
    np.testing.assert_array_equal(a.forget_train, b.forget_train)


# ---------------------------------------------------------------------------------------------
# Bad requests: each names the bad value.


def test_unknown_scenario_lists_valid(fashion):
    with pytest.raises(ValueError, match="'class'.*full_class, sub_class, random"):
        splits.make_split(fashion, "class", forget="Shirt")


def test_unknown_class_name_lists_valid(fashion):
    with pytest.raises(ValueError, match=r"'Hat'.*T-shirt/top, Trouser"):
        splits.make_split(fashion, "full_class", forget=["Shirt", "Hat"])


def test_empty_forget_list(fashion):
    with pytest.raises(ValueError, match="'full_class' needs forget=<class names>"):
        splits.make_split(fashion, "full_class", forget=())


def test_forgetting_every_class_leaves_nothing(fashion):
    with pytest.raises(ValueError, match="retain set is empty"):
        splits.make_split(fashion, "full_class", forget=fashion.class_names)


def test_duplicate_forget_names(fashion):
    with pytest.raises(ValueError, match="'Shirt' and 'shirt' both mean 'Shirt'"):
        splits.make_split(fashion, "full_class", forget=["Shirt", "shirt"])


def test_sub_class_needs_subclasses(fashion):
    with pytest.raises(ValueError, match="'fashion_mnist' has\\s+none.*label_level='coarse'.*cifar20"):
        splits.make_split(fashion, "sub_class", forget="Shirt")


def test_sub_class_that_empties_its_superclass(fashion_coarse):
    with pytest.raises(ValueError, match=r"\['trouser'\].*scenario='full_class'"):
        splits.make_split(fashion_coarse, "sub_class", forget="Trouser")


def test_unknown_subclass_name(fashion_coarse):
    with pytest.raises(ValueError, match="'tops'.*valid names: T-shirt/top"):
        splits.make_split(fashion_coarse, "sub_class", forget="tops")


@pytest.mark.parametrize("forget_size", [None, 0, -5, 60000, 60001, 2.5, True])
def test_bad_forget_size(fashion, forget_size):
    with pytest.raises(ValueError, match=re.escape(f"got {forget_size!r}")):
        splits.make_split(fashion, "random", forget_size=forget_size)


def test_random_takes_no_names_and_classes_take_no_size(fashion):
    with pytest.raises(ValueError, match="takes no forget names, got \\('Shirt',\\)"):
        splits.make_split(fashion, "random", forget="Shirt", forget_size=10)
    with pytest.raises(ValueError, match="forget_size=10 only applies to scenario 'random'"):
        splits.make_split(fashion, "full_class", forget="Shirt", forget_size=10)


def test_bad_seed(fashion):
    with pytest.raises(ValueError, match="seed must be an integer, got '0'"):
        splits.make_split(fashion, "random", forget_size=3, seed="0")


# ---------------------------------------------------------------------------------------------
# validate_split catches broken splits.


def _with(split, **changes):
    fields = {f: getattr(split, f) for f in split.__dataclass_fields__}
    return splits.ForgetSplit(**{**fields, **changes})


def test_validate_split_catches_broken_invariants(fashion):
    split = splits.make_split(fashion, "full_class", forget="Shirt")
    splits.validate_split(split, fashion)
    moved = split.retain_train[:1]
    overlapping = _with(split, forget_train=np.union1d(split.forget_train, moved))
    with pytest.raises(splits.SplitError, match="overlap"):
        splits.validate_split(overlapping, fashion)
    gap = _with(split, retain_train=np.delete(split.retain_train, 10))
    with pytest.raises(splits.SplitError, match="do not cover indices 0..59998"):
        splits.validate_split(gap, fashion)
    short = _with(split, retain_train=split.retain_train[:-1])
    with pytest.raises(splits.SplitError, match="hold 59999 indices, the train set has 60000"):
        splits.validate_split(short, fashion)
    wrong_class = _with(split, forget_classes=(4,))
    with pytest.raises(splits.SplitError, match="'Shirt' does not have index 4"):
        splits.validate_split(wrong_class, fashion)
    unsorted = _with(split, forget_train=split.forget_train[::-1].copy())
    with pytest.raises(splits.SplitError, match="forget_train must be strictly increasing"):
        splits.validate_split(unsorted, fashion)
    int32 = _with(split, forget_test=split.forget_test.astype(np.int32))
    with pytest.raises(splits.SplitError, match="forget_test must be an int64"):
        splits.validate_split(int32, fashion)


def test_validate_split_checks_the_data_set(fashion, fashion_coarse):
    split = splits.make_split(fashion, "random", forget_size=10)
    with pytest.raises(splits.SplitError, match="'fashion_mnist', not 'fashion_mnist_coarse'"):
        splits.validate_split(split, fashion_coarse)


# ---------------------------------------------------------------------------------------------
# Files.


def test_save_load_round_trip(fashion, tmp_path):
    split = splits.make_split(fashion, "full_class", forget=["Shirt", "Coat"], seed=7)
    splits.save_split(split, tmp_path)
    assert sorted(os.listdir(tmp_path)) == sorted(
        ["split.json"] + [f"{name}.npy" for name in splits.INDEX_ARRAYS])  # no temp files left
    loaded = splits.load_split(tmp_path, fashion)
    for field in ("scenario", "forget", "forget_classes", "seed", "dataset_name"):
        assert getattr(loaded, field) == getattr(split, field), field
    for name in splits.INDEX_ARRAYS:
        np.testing.assert_array_equal(getattr(loaded, name), getattr(split, name))
        assert getattr(loaded, name).dtype == np.int64
    record = json.loads((tmp_path / "split.json").read_text())
    assert record["dataset"] == "fashion_mnist" and record["forget"] == ["Shirt", "Coat"]
    assert record["counts"]["forget_train"] == 12000 and len(record["sha256"]) == 4


def test_random_split_round_trip_without_data_set(fashion, tmp_path):
    split = splits.make_split(fashion, "random", forget_size=83, seed=1)
    splits.save_split(split, tmp_path / "nested" / "dir")
    loaded = splits.load_split(tmp_path / "nested" / "dir")
    np.testing.assert_array_equal(loaded.forget_train, split.forget_train)
    assert loaded.scenario == "random" and len(loaded.forget_test) == 0


@pytest.fixture
def saved_split(fashion, tmp_path):
    splits.save_split(splits.make_split(fashion, "full_class", forget="Shirt"), tmp_path)
    return tmp_path


def test_changed_index_is_detected_naming_the_file(saved_split):
    path = saved_split / "forget_train.npy"
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x01  # a different index value; the .npy file itself still parses
    path.write_bytes(bytes(raw))
    with pytest.raises(splits.SplitFileError, match=re.escape(str(path)) + ".*SHA-256"):
        splits.load_split(saved_split)


def test_truncated_index_file_is_named(saved_split):
    path = saved_split / "retain_test.npy"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(splits.SplitFileError, match=re.escape(str(path)) + " is damaged"):
        splits.load_split(saved_split)


def test_missing_files_are_named(saved_split):
    os.remove(saved_split / "forget_test.npy")
    with pytest.raises(splits.SplitFileError, match=re.escape(str(saved_split / "forget_test.npy"))):
        splits.load_split(saved_split)
    os.remove(saved_split / "split.json")
    with pytest.raises(splits.SplitFileError, match=re.escape(str(saved_split / "split.json"))):
        splits.load_split(saved_split)


def test_pickled_index_file_is_refused(saved_split):
    path = saved_split / "forget_train.npy"
    np.save(path, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(splits.SplitFileError, match=re.escape(str(path))):
        splits.load_split(saved_split)


def test_load_against_the_wrong_data_set(saved_split, fashion_coarse):
    with pytest.raises(splits.SplitFileError, match="'fashion_mnist', not 'fashion_mnist_coarse'"):
        splits.load_split(saved_split, fashion_coarse)
