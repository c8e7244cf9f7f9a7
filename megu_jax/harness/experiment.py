"""The main job: train (or resume) the original and Retrain models, unlearn, evaluate, report.

``run_unlearning(config, workdir)`` is what ``python -m experiments.unlearn`` (and ``make demo``)
runs. Trained models live under ``workdir/models/`` keyed by what determines them (label level,
seed; for Retrain also the split), so reruns and other scenarios reuse them; everything else in
the workdir is rewritten atomically at the end.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import inspect
import json
import os
import re
import time
import zlib
from typing import Any

import jax
import ml_collections
import numpy as np

from megu_jax import datasets
from megu_jax import evaluation
from megu_jax import io_utils
from megu_jax import metrics
from megu_jax import oracles
from megu_jax import parallel
from megu_jax import splits
from megu_jax import train
from megu_jax import transition
from megu_jax import unlearning
from megu_jax.harness import plotting
from megu_jax.harness import provenance
from megu_jax.harness import reporting

REFERENCE_METHODS = ("original", "retrain")


def method_list(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """``config.methods`` ("a,b" or "all") as names, validated against the registry."""
  requested = [m.strip() for m in str(config.methods).split(",") if m.strip()]
  if requested == ["all"]:
    return REFERENCE_METHODS + tuple(m for m in unlearning.method_names()
                                     if m not in REFERENCE_METHODS)
  if not requested:
    raise ValueError("config.methods is empty; give comma-separated names or 'all'")
  for name in requested:
    unlearning.get_method(name)  # raises, listing the registered names
  # Retrain is every other method's reference (avg_gap): always evaluate it.
  return tuple(dict.fromkeys(["retrain"] + requested))


_MAX_SLUG_CHARS = 60


def _slug(text: str) -> str:
  """A file-name-safe rendering of user-given class names.

  Only letters, digits, ``_``, ``-`` and inner dots survive, so a name can neither leave the
  directory (``/``, ``..``) nor hide (a leading dot). Where anything was replaced or cut, a hash of
  the original text follows, so that two different names ("T-shirt/top", "T-shirt_top") never share
  a directory, and long lists of names stay under the file-name length limit.
  """
  slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", text)
  slug = re.sub(r"\.{2,}", "_", slug).strip("_.") or "none"
  if slug != text or len(slug) > _MAX_SLUG_CHARS:
    slug = f"{slug[:_MAX_SLUG_CHARS]}-{hashlib.sha256(text.encode()).hexdigest()[:8]}"
  return slug


# The fields that determine a trained model: a change to any of them must not reuse an old one.
RECIPE_FIELDS = ("dataset", "data_dir", "model", "batch_size", "epochs", "learning_rate",
                 "momentum", "weight_decay", "schedule", "step_epochs", "step_factor", "augment",
                 "train_subset", "train_subset_seed")


def recipe_hash(config: ml_collections.ConfigDict) -> str:
  recipe = {field: config.get(field) for field in RECIPE_FIELDS}
  text = json.dumps(recipe, sort_keys=True, default=lambda v: v.to_dict() if hasattr(
      v, "to_dict") else list(v))
  return hashlib.sha256(text.encode()).hexdigest()[:8]


def model_dirs(config: ml_collections.ConfigDict, models_root: str) -> dict[str, str]:
  """Where the original and Retrain models of ``config`` live: keyed by what determines them."""
  level = train.training_labels_level(config)
  what = (f"random{config.forget_size}_draw{train.split_seed(config)}"
          if config.scenario == "random" else _slug(str(config.forget)))
  suffix = f"seed{config.seed}_{recipe_hash(config)}"
  return {"original": os.path.join(models_root, f"original_{level}_{suffix}"),
          "retrain": os.path.join(models_root, f"retrain_{config.scenario}_{what}_{suffix}")}


def _train_reference(config, directory, dataset, retrain: bool) -> tuple[train.Trained, dict]:
  reference_config = copy.deepcopy(config)
  with reference_config.unlocked():
    reference_config.retrain = retrain
  # Resumes a killed training from its checkpoints; retrains past a damaged final checkpoint.
  return train.train_and_restore(reference_config, directory, dataset=dataset)


def resolve_transition(config, dataset: datasets.Dataset, original: train.Trained,
                       workdir: str) -> tuple[np.ndarray, dict]:
  """T from ``config.megu.transition``: a .npy path, or an offline oracle built here.

  The prototype oracle reads the original model's features of every training image (the
  forgotten class included: it is the row being asked about; nothing from the test set). A built
  T is saved to ``workdir/transition.npy`` (with provenance JSON), so that every method of the
  run, MeGU included, uses this one. Returns the host array and ``{"path", "oracle",
  "transition_s"}``.
  """
  start = time.perf_counter()
  settings = config.megu
  source = str(settings.transition)
  if transition.is_transition_file(source):
    matrix = transition.build_transition(source, dataset.num_classes)
    return matrix, {"path": source, "oracle": "file", "transition_s": time.perf_counter() - start}
  features = None
  if source == "prototype":
    features = train.predict(original, dataset.train_images, config.eval_batch_size)["features"]
  try:
    matrix = transition.build_transition(
        source, dataset.num_classes, temperature=settings.temperature, top_k=settings.top_k,
        features=features, feature_labels=dataset.train_labels,
        superclass_of=dataset_grouping(config, dataset))
  except ValueError as error:
    raise ValueError(f"config.megu.transition={source!r}: {error}") from error
  path = os.path.join(workdir, "transition.npy")
  transition.save_transition(path, matrix, {
      "oracle": source, "model": None, "prompt_hash": None,
      "class_names": list(dataset.class_names), "temperature": settings.temperature,
      "top_k": settings.top_k or None})
  return matrix, {"path": path, "oracle": source, "transition_s": time.perf_counter() - start}


def dataset_grouping(config, dataset: datasets.Dataset) -> tuple[int, ...]:
  """``config.megu.superclass_of`` when given, else the data set's own grouping (or ())."""
  if len(config.megu.superclass_of):
    return tuple(int(g) for g in config.megu.superclass_of)
  if dataset.superclass_of is None:
    return ()
  return tuple(int(g) for g in dataset.superclass_of)


def validate_before_compute(config: ml_collections.ConfigDict) -> tuple[datasets.Dataset,
                                                                         splits.ForgetSplit,
                                                                         tuple[str, ...]]:
  """Every check that can fail without training: methods, data set, split, T file, devices."""
  methods = method_list(config)
  train.validate_config(config, parallel.DataParallel(config.parallel))
  dataset = train.load_config_dataset(config)
  split = train.split_from_config(config, dataset)
  source = str(config.megu.transition)
  if transition.is_transition_file(source):
    transition.load_transition(source, dataset.num_classes)
  elif source not in transition.OFFLINE_ORACLES:
    oracles.get_oracle(source)  # unknown names list the valid ones
    raise ValueError(f"config.megu.transition={source!r}: the main job builds T offline with "
                     f"one of {transition.OFFLINE_ORACLES}; build a Gemini T with "
                     "experiments.build_transition and pass it as --config.megu.transition=PATH")
  elif source == "hierarchy" and not dataset_grouping(config, dataset):
    raise ValueError(f"config.megu.transition='hierarchy' needs a class grouping; "
                     f"{dataset.name} at this label level has none")
  return dataset, split, methods


@dataclasses.dataclass(frozen=True)
class Setting:
  """Everything the methods of one (config, split) share: data, references, T, related set."""
  config: ml_collections.ConfigDict         # the experiment config
  method_config: ml_collections.ConfigDict  # the same, with MeGU pointed at the T file
  dataset: datasets.Dataset
  split: splits.ForgetSplit
  original: train.Trained
  original_final: dict
  retrained: train.Trained
  retrain_final: dict
  transition: np.ndarray
  transition_info: dict
  related: evaluation.Related
  forget_data: unlearning.UnlearnData
  retain_data: unlearning.UnlearnData
  # Images no model trained on, of what is forgotten (its classes, sub-classes, or for random
  # forgetting the forgotten samples' classes): handed to methods that take ``non_members``.
  non_member_data: unlearning.UnlearnData | None = None


def prepare(config: ml_collections.ConfigDict, workdir: str, models_root: str | None = None,
            checked: tuple | None = None) -> Setting:
  """Validates, then trains or resumes the references and builds T for one split.

  ``models_root`` (default ``workdir/models``) holds the trained models, so that several runs (the
  benchmark's cells) share them; ``checked`` is :func:`validate_before_compute`'s result when the
  caller already has it.
  """
  dataset, split, _ = checked or validate_before_compute(config)
  os.makedirs(workdir, exist_ok=True)
  splits.save_split(split, os.path.join(workdir, "split"))
  dirs = model_dirs(config, models_root or os.path.join(workdir, "models"))
  original, original_final = _train_reference(config, dirs["original"], dataset, retrain=False)
  retrained, retrain_final = _train_reference(config, dirs["retrain"], dataset, retrain=True)
  return setting_from_models(config, workdir, dataset, split, (original, original_final),
                             (retrained, retrain_final))


def setting_from_models(config: ml_collections.ConfigDict, workdir: str,
                        dataset: datasets.Dataset, split: splits.ForgetSplit,
                        original: tuple[train.Trained, dict],
                        retrained: tuple[train.Trained, dict]) -> Setting:
  """The :class:`Setting` of trained ``(model, final metrics)`` references: T (from this
  original, saved in ``workdir``), the related set and the methods' data."""
  (original, original_final), (retrained, retrain_final) = original, retrained
  matrix, transition_info = resolve_transition(config, dataset, original, workdir)
  method_config = copy.deepcopy(config)
  with method_config.unlocked():
    method_config.megu.transition = transition_info["path"]
    # The grouping is the data set's to give: the methods know no data set names.
    method_config.megu.superclass_of = dataset_grouping(config, dataset)
  return Setting(
      non_member_data=non_members_of(dataset, split, seed=train.split_seed(config)),
      config=config, method_config=method_config, dataset=dataset, split=split,
      original=original, original_final=original_final, retrained=retrained,
      retrain_final=retrain_final, transition=matrix, transition_info=transition_info,
      related=evaluation.related_test_set(dataset, split, similarity=matrix),
      forget_data=unlearning.UnlearnData.from_positions(dataset.train_images,
                                                        dataset.train_labels, split.forget_train),
      retain_data=unlearning.UnlearnData.from_positions(dataset.train_images,
                                                        dataset.train_labels, split.retain_train))


def non_members_of(dataset: datasets.Dataset, split: splits.ForgetSplit, *, seed: int,
                   max_examples: int = 1000) -> unlearning.UnlearnData | None:
  """Up to ``max_examples`` of the data set's unseen pool images that look like the forget set:
  of its classes (full-class), of its sub-classes (sub-class), or drawn to match its labels'
  histogram (random). None when the data set has no unseen pool."""
  if dataset.unseen_images is None:
    return None
  rng = np.random.default_rng([seed, 7])
  if split.scenario == "full_class":
    pool = np.flatnonzero(np.isin(dataset.unseen_labels, split.forget_classes))
  elif split.scenario == "sub_class":
    pool = np.flatnonzero(np.isin(dataset.unseen_subclasses, split.forget_classes))
  else:  # as many per label as the forget set has, several times over
    labels, counts = np.unique(dataset.train_labels[split.forget_train], return_counts=True)
    repeat = max(1, max_examples // max(1, int(counts.sum())))
    pool = np.concatenate([rng.permutation(np.flatnonzero(dataset.unseen_labels == label))[
        :count * repeat] for label, count in zip(labels, counts)])
  if not len(pool):
    return None
  chosen = np.sort(rng.permutation(pool)[:max_examples])
  # Positions past the training set's end: stable ids that no training example has.
  return unlearning.UnlearnData(images=dataset.unseen_images[chosen],
                                labels=dataset.unseen_labels[chosen],
                                indices=(len(dataset.train_labels) + chosen).astype(np.int32))


def run_method(setting: Setting, name: str) -> tuple[dict[str, float], np.ndarray]:
  """Runs (or, for the references, looks up) one method and evaluates it.

  Returns its metrics (plus ``time_s``, ``compile_s`` and the method's own phase timings) and its
  per-class test accuracy ``[K]``. ``time_s`` is the unlearning call alone, without compilation;
  Retrain's is its training time.
  """
  result, per_class, _ = run_method_with_outputs(setting, name)
  return result, per_class


def run_method_with_outputs(setting: Setting, name: str
                            ) -> tuple[dict[str, float], np.ndarray, dict[str, dict]]:
  """:func:`run_method`, plus the unlearned model's outputs: ``{"train": ..., "test": ...}``,
  each ``{"logits": [N, K], "features": [N, D]}`` over the whole training / test set."""
  timings: dict[str, float] = {}
  if name == "original":
    unlearned, time_s, compile_s = setting.original, 0.0, 0.0
  elif name == "retrain":
    unlearned = setting.retrained
    time_s, compile_s = setting.retrain_final["time_s"], setting.retrain_final["compile_s"]
  else:
    # A key per method name, so that a method's draws do not depend on which others ran.
    key = jax.random.fold_in(jax.random.key(setting.config.seed), zlib.crc32(name.encode()))
    start = time.perf_counter()
    method = unlearning.get_method(name)
    extra = ({"non_members": setting.non_member_data}
             if "non_members" in inspect.signature(method).parameters else {})
    unlearned = method(setting.original, setting.forget_data, setting.retain_data,
                       setting.method_config, key, timings=timings, **extra)
    jax.block_until_ready(unlearned.state)
    compile_s = float(timings.get("compile_s", 0.0))
    time_s = time.perf_counter() - start - compile_s
  batch_size = setting.config.eval_batch_size
  train_out = train.predict(unlearned, setting.dataset.train_images, batch_size)
  test_out = train.predict(unlearned, setting.dataset.test_images, batch_size)
  result = evaluation.metrics_from_outputs(train_out, test_out, setting.dataset, setting.split,
                                           setting.related, seed=setting.config.seed)
  result.update(time_s=float(time_s), compile_s=compile_s,
                **{k: float(v) for k, v in timings.items() if k != "compile_s"})
  per_class = metrics.class_accuracies(test_out["logits"], setting.dataset.test_labels,
                                       setting.dataset.num_classes)
  return result, per_class, {"train": train_out, "test": test_out}


def add_avg_gaps(results: dict[str, dict]) -> None:
  """``avg_gap`` to Retrain for every method but Retrain itself."""
  for name, result in results.items():
    if name != "retrain":
      result["avg_gap"] = metrics.avg_gap(result, results["retrain"])


def run_unlearning(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs every method of ``config.methods`` on one split; writes results, report and plots."""
  checked = validate_before_compute(config)
  setting = prepare(config, workdir, checked=checked)
  results: dict[str, dict] = {}
  per_class: dict[str, np.ndarray] = {}  # test accuracy per class, for the plot
  for name in checked[2]:
    results[name], per_class[name] = run_method(setting, name)
  add_avg_gaps(results)

  dataset, split = setting.dataset, setting.split
  summary = {
      "dataset": dataset.name, "scenario": split.scenario, "forget": list(split.forget),
      "forget_size": int(len(split.forget_train)), "seed": int(config.seed),
      "related": setting.related.description, "transition": setting.transition_info,
      "original_train": setting.original_final, "retrain_train": setting.retrain_final,
      "methods": results, "provenance": provenance.record(),
  }
  io_utils.atomic_write_json(os.path.join(workdir, "results.json"), summary)
  forgotten = ", ".join(split.forget) or f"{len(split.forget_train)} random samples"
  reporting.plot_per_class_accuracy(
      {name: acc for name, acc in per_class.items() if name in ("original", "retrain", "megu")},
      dataset.class_names, os.path.join(workdir, "per_class_accuracy.png"),
      title=f"{dataset.name}: forget {forgotten}")
  plotting.plot_transition_heatmap(setting.transition, dataset.class_names,
                                   os.path.join(workdir, "transition.png"),
                                   title=f"T ({setting.transition_info['oracle']})")
  io_utils.atomic_write_text(os.path.join(workdir, "report.md"),
                             reporting.results_markdown(summary))
  return summary
