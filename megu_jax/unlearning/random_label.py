"""Random label (Amnesiac, Graves et al. 2021): relabel the forget set, train on D_f ∪ D_r.

Every forget sample gets one label drawn uniformly from the *other* classes (for sub-class
forgetting: the other superclasses, since the task labels are coarse), fixed for the whole run;
the model then trains on the relabelled forget set together with the retain set, which keeps the
rest of the task in place while the forget samples are pushed to arbitrary classes. SSD
benchmark recipe (docs/method.md §3): 3 epochs, Adam, lr 1e-4, BatchNorm in training mode.

This is MeGU with a uniform transition matrix and no noise pair: the ablation that shows what
machine guidance adds. As MeGU's perturbing labels, a sample's random label depends only on the
key and its training-set index.
"""
from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from megu_jax import parallel
from megu_jax import train
from megu_jax.unlearning import register
from megu_jax.unlearning.base import (UnlearnData, check_data, check_finite, finetuning_settings,
                                      make_finetuning_optimizer, num_classes_of, num_steps)
from megu_jax.unlearning.finetune import train_on


def default_random_label_config() -> ml_collections.ConfigDict:
  """docs/method.md §3 (SSD benchmark): 3 epochs of Adam at lr 1e-4 on D_f (relabelled) ∪ D_r.

  Attach as ``config.random_label``. ``batch_size`` 0 means the recipe's ``config.batch_size``.
  """
  c = ml_collections.ConfigDict()
  c.epochs = 3.0            # passes over D_f ∪ D_r
  c.optimizer = "adam"      # sgd | adam
  c.learning_rate = 1e-4
  c.momentum = 0.0          # sgd only
  c.weight_decay = 0.0
  c.schedule = "constant"   # constant | cosine
  c.batch_size = 0          # 0 = config.batch_size
  c.augment = True          # use the recipe's config.augment on the training images
  return c


def random_other_labels(key: jax.Array, labels: np.ndarray, indices: np.ndarray,
                        num_classes: int) -> np.ndarray:
  """One label per sample, uniform over the ``num_classes - 1`` classes other than its own.

  Args:
    labels: int [N] in [0, num_classes).
    indices: int [N], training-set positions: sample i's draw uses ``fold_in(key, indices[i])``,
      so it does not depend on which other samples are forgotten or in what order.

  Returns:
    int32 [N], never equal to ``labels``.
  """
  return np.asarray(_shifted_labels(key, jnp.asarray(labels, jnp.int32),
                                    jnp.asarray(indices, jnp.uint32), num_classes))


@functools.partial(jax.jit, static_argnums=3)
def _shifted_labels(key, labels, indices, num_classes):
  # y + s mod K with s uniform in {1, ..., K-1} is uniform over the K-1 other classes: the same
  # law as MeGU's draw from a uniform T, without building T (one small compiled program).
  keys = jax.vmap(jax.random.fold_in, (None, 0))(key, indices)
  shifts = jax.vmap(lambda k: jax.random.randint(k, (), 1, num_classes))(keys)
  return (labels + shifts) % num_classes


def relabelled_union(forget_data: UnlearnData, retain_data: UnlearnData,
                     forget_labels: np.ndarray) -> UnlearnData:
  """D_f with ``forget_labels`` [len(D_f)] followed by D_r, as one training set."""
  return UnlearnData(images=np.concatenate([forget_data.images, retain_data.images]),
                     labels=np.concatenate([forget_labels, retain_data.labels]),
                     indices=np.concatenate([forget_data.indices, retain_data.indices]))


def relabelled_training_set(trained: train.Trained, forget_data: UnlearnData,
                            retain_data: UnlearnData, key: jax.Array,
                            timings: dict) -> UnlearnData:
  """D_f, each sample relabelled by :func:`random_other_labels`, then D_r; the time: relabel_s."""
  start = time.perf_counter()
  new_labels = random_other_labels(key, forget_data.labels, forget_data.indices,
                                   num_classes_of(trained))
  data = relabelled_union(forget_data, retain_data, new_labels)
  timings["relabel_s"] = time.perf_counter() - start
  return data


@register("random_label")
def random_label(trained: train.Trained, forget_data: UnlearnData, retain_data: UnlearnData,
                 config: ml_collections.ConfigDict, key: jax.Array, *,
                 timings: dict | None = None) -> train.Trained:
  """Amnesiac unlearning; settings in ``config.random_label``.

  ``timings`` receives ``relabel_s``, ``compile_s`` (first step) and ``finetune_s``.
  """
  timings = {} if timings is None else timings
  dp = parallel.DataParallel(config.get("parallel", "mesh"))
  settings, batch_size = finetuning_settings(config, "random_label",
                                             default_random_label_config(), dp.num_devices)
  check_data(trained, forget_data, retain_data)
  label_key, train_key = jax.random.split(key)
  data = relabelled_training_set(trained, forget_data, retain_data, label_key, timings)
  steps = num_steps(settings.epochs, len(data), batch_size)
  unlearned, last_metrics = train_on(
      trained, data, make_finetuning_optimizer(settings, steps), steps=steps, batch_size=batch_size,
      augment=settings.augment, config=config, key=train_key, timings=timings, dp=dp)
  check_finite(last_metrics, "random_label")
  return unlearned
