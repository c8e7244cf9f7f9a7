"""Every metric of docs/method.md §3 for one trained (or unlearned) model and one split.

``evaluate(trained, dataset, split, related) -> dict`` runs the network once over the training and
test images (no augmentation) and hands host arrays to the pure functions of
:mod:`megu_jax.metrics`. All values are fractions in [0, 1].

Scenario conventions (docs/method.md §3):
- ``full_class`` / ``sub_class``: Dr and Df are the test accuracies on retained / forgotten
  classes (sub-classes; the label is the superclass, which the forgotten images keep).
- ``random``: Df (``forget_test_acc``) is the accuracy on the forgotten *training* samples and Dr
  (``retain_test_acc``) the whole test set, as SSD reports them.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from megu_jax import datasets
from megu_jax import metrics
from megu_jax import splits
from megu_jax import train
from megu_jax.train import predict  # noqa: F401  (logits and features of a set of images)

METRIC_NAMES = ("retain_test_acc", "forget_test_acc", "retain_train_acc", "forget_train_acc",
                "test_acc", "mia_entropy_lr", "mia_confidence_svc", "related_test_acc",
                "probe_forget_acc")


@dataclasses.dataclass(frozen=True)
class Related:
  """Where over-unlearning shows first: test images close to what was forgotten.

  ``test_positions`` index the test set; ``description`` says how they were chosen (for reports).
  """
  test_positions: np.ndarray
  description: str


def related_test_set(dataset: datasets.Dataset, split: splits.ForgetSplit,
                     similarity: np.ndarray | None = None, k: int = 3,
                     neighbours_per_sample: int = 5) -> Related:
  """The related test images of a split.

  - ``full_class``: test images of the forgotten class's siblings in the data set's grouping
    (Shirt -> T-shirt/top, Pullover, Coat); without a grouping, of the ``k`` classes most similar
    under ``similarity`` (a ``[K, K]`` transition or score matrix; required then).
  - ``sub_class``: test images of the other sub-classes of the forgotten one's superclass
    (Sneaker -> Sandal, Ankle boot: "footwear stays").
  - ``random``: the ``neighbours_per_sample`` nearest test images (pixel space, so the choice does
    not depend on any model) of each forgotten training image.
  """
  test_labels = dataset.test_labels
  if split.scenario == "full_class":
    forgotten = set(split.forget_classes)
    related: set[int] = set()
    for c in forgotten:
      if dataset.superclass_of is not None:
        siblings = np.flatnonzero(dataset.superclass_of == dataset.superclass_of[c])
        related.update(int(s) for s in siblings)
      elif similarity is not None:
        related.update(metrics.most_similar_classes(np.asarray(similarity)[c], c, k))
      else:
        raise ValueError(f"{dataset.name} has no class grouping: related classes need a "
                         "similarity matrix (e.g. the transition matrix)")
    related -= forgotten
    if not related:  # a class alone in its group: fall back to similarity, then to nothing
      if similarity is not None:
        for c in forgotten:
          related.update(metrics.most_similar_classes(np.asarray(similarity)[c], c, k))
        related -= forgotten
    names = ", ".join(dataset.class_names[c] for c in sorted(related))
    return Related(np.flatnonzero(np.isin(test_labels, sorted(related))),
                   f"test images of {names}")
  if split.scenario == "sub_class":
    superclasses = {int(dataset.train_labels[split.forget_train[0]])}
    in_superclass = np.isin(test_labels, sorted(superclasses))
    not_forgotten = ~np.isin(dataset.test_subclasses, split.forget_classes)
    siblings = sorted(set(dataset.test_subclasses[in_superclass & not_forgotten].tolist()))
    names = ", ".join(dataset.subclass_names[s] for s in siblings)
    return Related(np.flatnonzero(in_superclass & not_forgotten), f"test images of {names}")
  # random: nearest test neighbours of each forgotten image, in pixel space
  forget = dataset.train_images[split.forget_train].reshape(len(split.forget_train), -1)
  test = dataset.test_images.reshape(len(test_labels), -1).astype(np.float32)
  forget = forget.astype(np.float32)
  distances = ((forget ** 2).sum(1)[:, None] - 2 * forget @ test.T + (test ** 2).sum(1)[None])
  nearest = np.argsort(distances, axis=1)[:, :neighbours_per_sample]
  return Related(np.unique(nearest),
                 f"the {neighbours_per_sample} nearest test images of each forgotten image")


def evaluate(trained: train.Trained, dataset: datasets.Dataset, split: splits.ForgetSplit,
             related: Related, *, seed: int = 0, batch_size: int = 1000) -> dict[str, float]:
  """All of :data:`METRIC_NAMES` for ``trained`` on ``split``."""
  train_out = train.predict(trained, dataset.train_images, batch_size)
  test_out = train.predict(trained, dataset.test_images, batch_size)
  return metrics_from_outputs(train_out, test_out, dataset, split, related, seed=seed)


def metrics_from_outputs(train_out: dict, test_out: dict, dataset: datasets.Dataset,
                         split: splits.ForgetSplit, related: Related, *, seed: int = 0
                         ) -> dict[str, float]:
  """The metrics from precomputed logits/features of the whole training and test sets."""
  train_logits, test_logits = train_out["logits"], test_out["logits"]
  y_train, y_test = dataset.train_labels, dataset.test_labels
  acc = lambda logits, labels, positions: metrics.accuracy(logits[positions], labels[positions])

  result = {
      "retain_train_acc": acc(train_logits, y_train, split.retain_train),
      "forget_train_acc": acc(train_logits, y_train, split.forget_train),
      "test_acc": metrics.accuracy(test_logits, y_test),
      "related_test_acc": acc(test_logits, y_test, related.test_positions),
  }
  if split.scenario == "random":
    result["retain_test_acc"] = result["test_acc"]
    result["forget_test_acc"] = result["forget_train_acc"]
  else:
    result["retain_test_acc"] = acc(test_logits, y_test, split.retain_test)
    result["forget_test_acc"] = acc(test_logits, y_test, split.forget_test)

  # Membership attacks: members = retain-train, non-members = retained test images.
  result["mia_entropy_lr"] = metrics.mia_entropy_lr(
      train_logits[split.retain_train], test_logits[split.retain_test],
      train_logits[split.forget_train], seed=seed)
  result["mia_confidence_svc"] = metrics.mia_confidence_svc(
      train_logits[split.retain_train], y_train[split.retain_train],
      test_logits[split.retain_test], y_test[split.retain_test],
      train_logits[split.forget_train], y_train[split.forget_train], seed=seed)
  result["probe_forget_acc"] = _probe_forget_accuracy(train_out["features"],
                                                      test_out["features"], dataset, split, seed)
  return {name: float(result[name]) for name in METRIC_NAMES}


def _probe_forget_accuracy(train_features, test_features, dataset, split, seed) -> float:
  """Can a linear probe on the frozen features still name what was forgotten?

  Class scenarios: the probe is fit on a class-balanced subset of the whole training set with the
  labels that identify the forgotten data (classes; sub-classes for ``sub_class``) and evaluated
  on the forgotten test images. ``random``: fit on retained training images, evaluated on the
  forgotten ones (their features should look like any unseen image's).
  """
  if split.scenario == "sub_class":
    train_labels, test_labels = dataset.train_subclasses, dataset.test_subclasses
  else:
    train_labels, test_labels = dataset.train_labels, dataset.test_labels
  if split.scenario == "random":
    return metrics.linear_probe_accuracy(
        train_features[split.retain_train], train_labels[split.retain_train],
        train_features[split.forget_train], train_labels[split.forget_train], seed=seed)
  return metrics.linear_probe_accuracy(train_features, train_labels,
                                       test_features[split.forget_test],
                                       test_labels[split.forget_test], seed=seed)
