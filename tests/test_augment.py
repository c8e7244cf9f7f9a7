"""Tests for megu_jax.augment: crop, flip, per-example keys, device independence, normalize."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from megu_jax import augment

BATCH, HEIGHT, WIDTH, CHANNELS = 16, 6, 5, 2


def _images(batch=BATCH):
    # Distinct, non-zero pixel values, so every shift and mirror is recognisable.
    values = np.arange(1, batch * HEIGHT * WIDTH * CHANNELS + 1, dtype=np.float32)
    return jnp.asarray(values.reshape(batch, HEIGHT, WIDTH, CHANNELS))


def _keys(indices, seed=0):
    # The caller's recipe: fold the sample's data-set index into the step key.
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.asarray(indices))


def test_identity_when_off():
    images = _images()
    out = augment.augment_batch(images, _keys(np.arange(BATCH)), crop_padding=0, flip=False)
    np.testing.assert_array_equal(out, images)


def _windows(image, padding):
    """Every crop that padding by `padding` and cropping back can produce."""
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    return {(dy, dx): padded[dy:dy + HEIGHT, dx:dx + WIDTH]
            for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)}


def test_crop_is_a_shifted_window_of_the_padded_image():
    images = _images(64)
    padding = 2
    out = np.asarray(augment.augment_batch(images, _keys(np.arange(64)), crop_padding=padding,
                                           flip=False))
    assert out.shape == images.shape and out.dtype == np.float32
    offsets = []
    for image, cropped in zip(np.asarray(images), out):
        matches = [o for o, w in _windows(image, padding).items() if np.array_equal(w, cropped)]
        assert len(matches) == 1
        offsets.append(matches[0])
    # 64 draws from 25 offsets: the crop really moves, in both directions and both axes.
    assert len(set(offsets)) > 10
    assert {o[0] for o in offsets} >= {0, 2 * padding} and {o[1] for o in offsets} >= {0, 2 * padding}


def test_flip_mirrors_about_half_the_images():
    images = np.asarray(_images(64))
    out = np.asarray(augment.augment_batch(jnp.asarray(images), _keys(np.arange(64)),
                                           crop_padding=0, flip=True))
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, images)]
    kept = [np.array_equal(o, i) for o, i in zip(out, images)]
    assert all(f != k for f, k in zip(flipped, kept))  # each image is one or the other
    assert 16 <= sum(flipped) <= 48


def test_deterministic_per_key_and_different_across_keys():
    images = _images()
    run = lambda seed: np.asarray(augment.augment_batch(
        images, _keys(np.arange(BATCH), seed), crop_padding=2, flip=True))
    np.testing.assert_array_equal(run(0), run(0))
    assert not np.array_equal(run(0), run(1))


def test_same_result_when_the_batch_is_split_in_halves():
    images = _images()
    indices = np.arange(100, 100 + BATCH)
    whole = augment.augment_batch(images, _keys(indices), crop_padding=2, flip=True)
    half = BATCH // 2
    first = augment.augment_batch(images[:half], _keys(indices[:half]), crop_padding=2, flip=True)
    second = augment.augment_batch(images[half:], _keys(indices[half:]), crop_padding=2, flip=True)
    np.testing.assert_array_equal(whole, jnp.concatenate([first, second]))


def test_same_result_sharded_over_devices_under_jit():
    devices = jax.devices()
    if len(devices) < 2:
        pytest.skip("needs 2 devices (conftest fakes 2 CPU devices)")
    mesh = Mesh(np.array(devices[:2]), ("data",))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    images = _images()
    indices = jnp.arange(BATCH)

    @jax.jit
    def step(images, indices):
        keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(0), indices)
        return augment.augment_batch(images, keys, crop_padding=2, flip=True)

    sharded = step(jax.device_put(images, batch_sharding), jax.device_put(indices, batch_sharding))
    assert len(sharded.sharding.device_set) == 2
    single_device = augment.augment_batch(images, _keys(np.arange(BATCH)), crop_padding=2, flip=True)
    np.testing.assert_array_equal(sharded, single_device)


def test_raw_uint32_keys_work():
    raw_keys = jax.vmap(jax.random.fold_in, (None, 0))(jax.random.PRNGKey(0), jnp.arange(BATCH))
    out = augment.augment_batch(_images(), raw_keys, crop_padding=2, flip=True)
    assert out.shape == (BATCH, HEIGHT, WIDTH, CHANNELS)
    assert not np.array_equal(out, _images())


@pytest.mark.parametrize("crop_padding", [-1, 1.5, True, "2"])
def test_bad_crop_padding_is_named(crop_padding):
    with pytest.raises(ValueError, match=f"crop_padding must be an integer >= 0, got {crop_padding!r}"):
        augment.augment_batch(_images(), _keys(np.arange(BATCH)), crop_padding=crop_padding,
                              flip=False)


def test_bad_flip_and_shapes_are_named():
    keys = _keys(np.arange(BATCH))
    with pytest.raises(ValueError, match="flip must be True or False, got 'yes'"):
        augment.augment_batch(_images(), keys, crop_padding=0, flip="yes")
    with pytest.raises(ValueError, match="15 keys for 16 images"):
        augment.augment_batch(_images(), keys[:15], crop_padding=1, flip=True)
    with pytest.raises(ValueError, match=r"got shape \(6, 5, 2\)"):
        augment.augment_batch(_images()[0], keys, crop_padding=1, flip=True)


def test_normalize_values_and_dtype():
    images = np.array([0, 51, 255], np.uint8).reshape(1, 1, 3, 1)
    out = augment.normalize(jnp.asarray(images), np.array([0.2], np.float32),
                            np.array([0.5], np.float32))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out).ravel(), [-0.4, 0.0, 1.6], atol=1e-6)


def test_normalize_gives_zero_mean_unit_std_per_channel():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    images[..., 1] //= 4  # channels with clearly different statistics
    pixels = images.astype(np.float64) / 255.0
    mean, std = pixels.mean(axis=(0, 1, 2)), pixels.std(axis=(0, 1, 2))
    out = np.asarray(jax.jit(augment.normalize)(images, mean, std))
    np.testing.assert_allclose(out.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(out.std(axis=(0, 1, 2)), 1.0, atol=1e-5)


def test_normalize_refuses_float_images():
    with pytest.raises(ValueError, match="expects uint8 images, got float32"):
        augment.normalize(jnp.zeros((1, 2, 2, 1), jnp.float32), 0.5, 0.5)
