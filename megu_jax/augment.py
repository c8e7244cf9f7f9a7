"""Training-time augmentation and input normalisation, run on device inside jit.

Randomness is per example: the caller derives one key per sample from the sample's index in the
data set, e.g.

    keys = jax.vmap(jax.random.fold_in, (None, 0))(step_key, batch["index"])

so an image is augmented identically however the batch is split over devices or hosts.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


class AugmentError(ValueError):
  """Bad augmentation settings or inputs."""


def _augment_one(image: jax.Array, key: jax.Array, crop_padding: int, flip: bool) -> jax.Array:
  """image: [height, width, channels]; key: one PRNG key."""
  crop_key, flip_key = jax.random.split(key)
  if crop_padding > 0:
    height, width, channels = image.shape
    padded = jnp.pad(image, ((crop_padding, crop_padding), (crop_padding, crop_padding), (0, 0)))
    # Offsets in [0, 2 * padding]: a shift of up to `padding` pixels in each direction, with
    # the uncovered border filled by the zero padding.
    offset_y, offset_x = jax.random.randint(crop_key, (2,), 0, 2 * crop_padding + 1)
    image = jax.lax.dynamic_slice(padded, (offset_y, offset_x, 0), (height, width, channels))
  if flip:
    image = jnp.where(jax.random.bernoulli(flip_key), image[:, ::-1, :], image)
  return image


# Jitted so that eager callers (and tests) compile once per shape instead of dispatching each op;
# inside a caller's jit it is simply inlined.
@functools.partial(jax.jit, static_argnames=("crop_padding", "flip"))
def _augment_batch_jit(images: jax.Array, keys: jax.Array, crop_padding: int,
                       flip: bool) -> jax.Array:
  return jax.vmap(_augment_one, in_axes=(0, 0, None, None))(images, keys, crop_padding, flip)


def augment_batch(images: jax.Array, keys: jax.Array, *, crop_padding: int,
                  flip: bool) -> jax.Array:
  """Random zero-padded crop and horizontal flip, independently per example.

  Args:
    images: float32 [batch, height, width, channels].
    keys: [batch] PRNG keys (typed keys, or raw uint32 keys of shape [batch, 2]), one per example.
    crop_padding: pixels of zero padding on each side before cropping back to height x width;
      0 turns cropping off.
    flip: whether to mirror each image left-right with probability 1/2.

  Returns:
    float32 [batch, height, width, channels]; `images` itself when both are off.
  """
  if (isinstance(crop_padding, (bool, np.bool_))
          or not isinstance(crop_padding, (int, np.integer)) or crop_padding < 0):
    raise AugmentError(f"crop_padding must be an integer >= 0, got {crop_padding!r}")
  if not isinstance(flip, (bool, np.bool_)):
    raise AugmentError(f"flip must be True or False, got {flip!r}")
  # Plain Python values: they are static arguments of the jitted kernel (hashed, compared).
  crop_padding, flip = int(crop_padding), bool(flip)
  if images.ndim != 4:
    raise AugmentError(
        f"images must be [batch, height, width, channels], got shape {images.shape}")
  if keys.shape[0] != images.shape[0]:
    raise AugmentError(
        f"need one key per image: {keys.shape[0]} keys for {images.shape[0]} images")
  if crop_padding == 0 and not flip:
    return images
  return _augment_batch_jit(images, keys, crop_padding, flip)


def normalize(images_uint8: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """Maps uint8 pixels to float32 (pixel / 255 - mean) / std, per channel.

  Args:
    images_uint8: uint8 [..., channels].
    mean: [channels] in [0, 1] units, e.g. `Dataset.mean`.
    std: [channels], e.g. `Dataset.std`.

  Returns:
    float32 [..., channels].
  """
  # Requiring uint8 catches the easy mistake of normalising twice.
  if images_uint8.dtype != jnp.uint8:
    raise AugmentError(f"normalize expects uint8 images, got {images_uint8.dtype}")
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  return (images_uint8.astype(jnp.float32) / 255.0 - mean) / std
