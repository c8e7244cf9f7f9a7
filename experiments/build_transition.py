r"""Builds the transition matrix T (docs/method.md §2, steps 1-2) and writes it to disk.

  python -m experiments.build_transition --dataset=fashion_mnist --oracle=gemini \
      --out=transitions/fashion_mnist_gemini.npy
  python -m experiments.build_transition --dataset=fashion_mnist --oracle=prototype \
      --workdir=runs/fmnist --out=transitions/fashion_mnist_prototype.npy
  python -m experiments.build_transition --dataset=fashion_mnist --oracle=hierarchy \
      --out=transitions/fashion_mnist_hierarchy.npy
  python -m experiments.build_transition --dataset=fashion_mnist --oracle=uniform \
      --out=transitions/fashion_mnist_uniform.npy

It prints T as a table with class names and writes ``--out`` (.npy), its provenance
(``<out minus .npy>.json``) and a heatmap (``<out minus .npy>.png``). For sub-class forgetting pass
``--label_level=coarse``: T is then over the coarse labels.

Gemini needs an API key in GEMINI_API_KEY (or GOOGLE_API_KEY); answers are cached under
``--cache_dir`` (default: ``gemini_cache`` next to ``--out``), so a rerun after a failure continues
where it stopped. ``--images_per_class=k`` sends k training images of each class with its request.
Per-sample mode (``--per_sample_out=labels.npy --forget=Shirt``) asks Gemini, for every training
image of the forgotten class(es), which other class it most resembles, and saves those labels.

On any failure the command prints one line ``error: <reason>`` on stderr (an unexpected error, or
``--verbose``, adds the traceback), exits non-zero, and leaves an earlier matrix at ``--out``
untouched (every file is written atomically, after all checks).
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Optional

from absl import flags
import numpy as np

from megu_jax import io_utils
from megu_jax import oracles
from megu_jax import transition
from megu_jax.harness import cli
from megu_jax.oracles import gemini as gemini_lib

LABEL_LEVELS = ("fine", "coarse")

_DATASET = flags.DEFINE_string("dataset", None, "Data set name, e.g. fashion_mnist, cifar100.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where the data set's files are (optional).")
_ORACLE = flags.DEFINE_enum("oracle", None, list(oracles.ORACLES),
                            "Who scores class similarity.")
_OUT = flags.DEFINE_string("out", None, "Destination .npy of T.")
_TEMPERATURE = flags.DEFINE_float("temperature", 1.0,
                                  "Softmax temperature on the 0..10 score scale.")
_TOP_K = flags.DEFINE_integer("top_k", None, "Keep only the k most similar classes per row.")
_GEMINI_MODEL = flags.DEFINE_string("gemini_model", gemini_lib.DEFAULT_MODEL,
                                    "Gemini model name.")
_GEMINI_BASE_URL = flags.DEFINE_string(
    "gemini_base_url", None,
    f"Gemini API endpoint (default: ${gemini_lib.BASE_URL_ENV_VAR}, else google-genai's).")
_GEMINI_TIMEOUT_S = flags.DEFINE_float("gemini_timeout_s", 120.0, "Per-request timeout.")
_GEMINI_MAX_RETRIES = flags.DEFINE_integer("gemini_max_retries", 5,
                                           "Retries per request after the first attempt.")
_GEMINI_BACKOFF_S = flags.DEFINE_float("gemini_backoff_s", 1.0,
                                       "First retry delay; doubles per retry.")
_CACHE_DIR = flags.DEFINE_string("cache_dir", None,
                                 "Gemini answer cache (default: gemini_cache next to --out).")
_IMAGES_PER_CLASS = flags.DEFINE_integer(
    "images_per_class", 0, "Example images sent with each Gemini class request (multimodal).")
_SEED = flags.DEFINE_integer("seed", 0, "Seed for choosing the example images.")
_WORKDIR = flags.DEFINE_string("workdir", None, "prototype: the workdir of a trained model.")
_LABEL_LEVEL = flags.DEFINE_enum(
    "label_level", None, list(LABEL_LEVELS),
    "fine or coarse (sub-class forgetting: T over the coarse labels); default: the data set's own.")
_PER_SAMPLE_OUT = flags.DEFINE_string(
    "per_sample_out", None, "Per-sample mode: destination .npy of one Gemini label per image.")
_FORGET = flags.DEFINE_list(
    "forget", None, "Per-sample mode: forgotten class names (sub-class names at coarse level).")
_PER_SAMPLE_LIMIT = flags.DEFINE_integer(
    "per_sample_limit", 0, "Per-sample mode: label only the first n forget images (0: all).")
_PREDICT_BATCH_SIZE = 1000


@dataclasses.dataclass(frozen=True)
class BuildOptions:
  """Everything the command does, as plain values (the flags map one to one onto these)."""
  dataset: str
  oracle: str
  out: Optional[str] = None
  data_dir: Optional[str] = None
  temperature: float = 1.0
  top_k: Optional[int] = None
  gemini_model: str = gemini_lib.DEFAULT_MODEL
  gemini_base_url: Optional[str] = None
  gemini_timeout_s: float = 120.0
  gemini_max_retries: int = 5
  gemini_backoff_s: float = 1.0
  cache_dir: Optional[str] = None
  images_per_class: int = 0
  seed: int = 0
  workdir: Optional[str] = None
  label_level: Optional[str] = None
  per_sample_out: Optional[str] = None
  forget: tuple[str, ...] = ()
  per_sample_limit: int = 0


class BuildError(ValueError):
  """A combination of options the command cannot serve; the message says which and why."""


def check_options(options: BuildOptions) -> None:
  """Fails on bad options before any data is loaded or any request is sent."""
  if options.oracle not in oracles.ORACLES:
    raise BuildError(f"unknown oracle {options.oracle!r}; available: {sorted(oracles.ORACLES)}")
  if options.out is None and options.per_sample_out is None:
    raise BuildError("nothing to do: pass --out (T) and/or --per_sample_out (per-sample labels)")
  for name in ("out", "per_sample_out"):
    path = getattr(options, name)
    if path is not None and not path.endswith(".npy"):
      raise BuildError(f"--{name} must end in .npy, got {path!r}")
  if not options.temperature > 0:
    raise BuildError(f"--temperature must be > 0, got {options.temperature}")
  if options.top_k is not None:
    if options.top_k < 1:
      raise BuildError(f"--top_k must be >= 1, got {options.top_k}")
    if options.oracle == "uniform":
      raise BuildError("--top_k with the uniform oracle would keep arbitrary classes (all scores "
                       "tie); drop --top_k")
  if options.images_per_class < 0:
    raise BuildError(f"--images_per_class must be >= 0, got {options.images_per_class}")
  if options.images_per_class and options.oracle != "gemini":
    raise BuildError("--images_per_class only applies to --oracle=gemini")
  if options.label_level not in (None, *LABEL_LEVELS):
    raise BuildError(f"--label_level must be one of {LABEL_LEVELS}, got {options.label_level!r}")
  if options.oracle == "prototype" and not options.workdir:
    raise BuildError("--oracle=prototype needs --workdir (the workdir of a trained model)")
  if options.per_sample_out is not None:
    if options.oracle != "gemini":
      raise BuildError("--per_sample_out (per-sample mode) needs --oracle=gemini")
    if not options.forget:
      raise BuildError("--per_sample_out needs --forget (the forgotten class names)")
  if options.per_sample_limit < 0:
    raise BuildError(f"--per_sample_limit must be >= 0, got {options.per_sample_limit}")


def format_transition_table(T: np.ndarray, class_names: tuple[str, ...]) -> str:
  """T as text: the full table up to 20 classes, else each row's five most likely classes."""
  num_classes = len(class_names)
  lines = ["T: rows = class of the forget sample, columns = perturbing class"]
  if num_classes <= 20:
    name_width = max(len(n) for n in class_names)
    cell = max(6, min(11, name_width))
    lines.append(" " * name_width + "".join(f" {n[:cell]:>{cell}}" for n in class_names))
    for name, row in zip(class_names, T):
      lines.append(f"{name:<{name_width}}" + "".join(f" {v:>{cell}.3f}" for v in row))
  else:
    for name, row in zip(class_names, T):
      top = np.argsort(-row, kind="stable")[:5]
      lines.append(f"{name}: " + ", ".join(f"{class_names[j]} {row[j]:.3f}" for j in top))
  return "\n".join(lines)


def _default_cache_dir(options: BuildOptions) -> str:
  anchor = options.out or options.per_sample_out
  return os.path.join(os.path.dirname(anchor) or ".", "gemini_cache")


def _make_gemini_oracle(options: BuildOptions) -> gemini_lib.GeminiOracle:
  return oracles.get_oracle("gemini")(
      model=options.gemini_model, base_url=options.gemini_base_url,
      cache_dir=options.cache_dir or _default_cache_dir(options),
      timeout_s=options.gemini_timeout_s, max_retries=options.gemini_max_retries,
      backoff_base_s=options.gemini_backoff_s)


def _example_images(dataset: Any, images_per_class: int, seed: int) -> list[np.ndarray]:
  """Per class, ``images_per_class`` training images chosen with a seeded generator."""
  rng = np.random.default_rng(seed)
  examples = []
  for label in range(dataset.num_classes):
    positions = np.flatnonzero(dataset.train_labels == label)
    if len(positions) < images_per_class:
      raise BuildError(f"class {dataset.class_names[label]!r} has only {len(positions)} training "
                       f"images, fewer than --images_per_class={images_per_class}")
    chosen = np.sort(rng.choice(positions, images_per_class, replace=False))
    examples.append(dataset.train_images[chosen])
  return examples


def _prototype_scores(options: BuildOptions, dataset: Any) -> tuple[np.ndarray, dict]:
  # Imported here: only this oracle needs a trained model (and the training stack).
  from megu_jax import evaluation  # pylint: disable=g-import-not-at-top
  from megu_jax import train  # pylint: disable=g-import-not-at-top

  trained = train.restore_trained(options.workdir)
  outputs = evaluation.predict(trained, dataset.train_images, batch_size=_PREDICT_BATCH_SIZE)
  if outputs["logits"].shape[-1] != dataset.num_classes:
    raise BuildError(
        f"the model in {options.workdir} has {outputs['logits'].shape[-1]} classes but "
        f"{dataset.name} has {dataset.num_classes} at this label level; pass the --label_level "
        "the model was trained with")
  scores = transition.offline_scores("prototype", dataset.num_classes,
                                     features=outputs["features"],
                                     feature_labels=dataset.train_labels)
  model_name = trained.config.get("model") if hasattr(trained.config, "get") else None
  return scores, {"model": str(model_name) if model_name is not None else None,
                  "workdir": os.path.abspath(options.workdir)}


def _similarity_scores(options: BuildOptions, dataset: Any,
                       gemini: Optional[gemini_lib.GeminiOracle],
                       say: Callable[[str], None]) -> tuple[np.ndarray, dict]:
  """S [K, K] from the chosen oracle, plus what the provenance record should say about it."""
  if options.oracle == "gemini":
    examples = (_example_images(dataset, options.images_per_class, options.seed)
                if options.images_per_class else None)
    say(f"asking {gemini.model} about {dataset.num_classes} classes (answers cached in "
        f"{gemini.cache_dir})")
    scores, record = gemini.class_scores_with_provenance(dataset.class_names, examples)
    say(f"gemini: {gemini.requests_sent} requests sent, {gemini.cache_hits} answers from the cache")
    record["example_image_seed"] = options.seed if examples is not None else None
    return scores, record
  if options.oracle == "prototype":
    return _prototype_scores(options, dataset)
  if options.oracle == "hierarchy":
    scores = transition.offline_scores("hierarchy", dataset.num_classes,
                                       superclass_of=dataset.superclass_of)
    return scores, {"superclass_names": list(dataset.superclass_names)}
  return transition.offline_scores("uniform", dataset.num_classes), {}


def _forget_positions(options: BuildOptions, dataset: Any) -> np.ndarray:
  """Training-set positions of the forget images named by --forget (classes, or sub-classes)."""
  from megu_jax import datasets  # pylint: disable=g-import-not-at-top

  if dataset.subclass_names is not None:  # Coarse task labels: --forget names sub-classes.
    chosen = datasets.resolve_subclass_names(dataset, options.forget)
    positions = np.flatnonzero(np.isin(dataset.train_subclasses, chosen))
  else:
    chosen = datasets.resolve_class_names(dataset, options.forget)
    positions = np.flatnonzero(np.isin(dataset.train_labels, chosen))
  if options.per_sample_limit:
    positions = positions[:options.per_sample_limit]
  return positions


def _save_per_sample_labels(options: BuildOptions, dataset: Any,
                            gemini: gemini_lib.GeminiOracle, say: Callable[[str], None]) -> None:
  positions = _forget_positions(options, dataset)
  say(f"asking {gemini.model} about {len(positions)} forget images, one request each")
  labels = gemini.label_samples(dataset.train_images[positions], dataset.class_names,
                                dataset.train_labels[positions])
  record = {
      "oracle": "gemini", "mode": "per_sample", "model": gemini.model,
      "model_versions": sorted(gemini.model_versions), "dataset": options.dataset,
      "dataset_name": dataset.name, "label_level": options.label_level,
      "class_names": list(dataset.class_names), "forget": list(options.forget),
      "train_positions": positions.tolist(),
      "source_labels": dataset.train_labels[positions].tolist(),
  }
  io_utils.atomic_write_json(transition.provenance_path(options.per_sample_out), record)
  io_utils.atomic_save_npy(options.per_sample_out, labels.astype(np.int32))
  say(f"wrote {options.per_sample_out} ({len(labels)} labels)")


def run(options: BuildOptions, say: Callable[[str], None] = print) -> Optional[np.ndarray]:
  """Builds T (and/or the per-sample labels) and writes every output; returns T (or None)."""
  check_options(options)
  # The Gemini client is made first: a missing API key fails before the data set is even read.
  gemini = _make_gemini_oracle(options) if options.oracle == "gemini" else None

  from megu_jax import datasets  # pylint: disable=g-import-not-at-top  (heavy: loads lazily)
  dataset = datasets.load_dataset(options.dataset, data_dir=options.data_dir,
                                  label_level=options.label_level)
  T = None
  if options.out is not None:
    scores, oracle_record = _similarity_scores(options, dataset, gemini, say)
    T = transition.scores_to_transition(scores, temperature=options.temperature,
                                        top_k=options.top_k)
    transition.validate_transition(T, dataset.num_classes, class_names=dataset.class_names)
    say(format_transition_table(T, dataset.class_names))
    provenance = {
        "oracle": options.oracle, "model": None, "prompt_sha256": None,
        **oracle_record,
        "dataset": options.dataset, "dataset_name": dataset.name,
        "label_level": options.label_level, "class_names": list(dataset.class_names),
        "temperature": options.temperature, "top_k": options.top_k,
        "scores": np.asarray(scores).tolist(),
    }
    heatmap_path = transition.provenance_path(options.out)[:-len(".json")] + ".png"
    from megu_jax.harness import plotting  # pylint: disable=g-import-not-at-top  (matplotlib is slow)
    plotting.plot_transition_heatmap(
        T, dataset.class_names, heatmap_path,
        title=f"{dataset.name}: {options.oracle} oracle, tau={options.temperature:g}"
        + (f", top-{options.top_k}" if options.top_k else ""))
    transition.save_transition(options.out, T, provenance)
    say(f"wrote {options.out}, {transition.provenance_path(options.out)}, {heatmap_path}")
  if options.per_sample_out is not None:
    _save_per_sample_labels(options, dataset, gemini, say)
  return T


def _options_from_flags() -> BuildOptions:
  return BuildOptions(
      dataset=_DATASET.value, oracle=_ORACLE.value, out=_OUT.value, data_dir=_DATA_DIR.value,
      temperature=_TEMPERATURE.value, top_k=_TOP_K.value, gemini_model=_GEMINI_MODEL.value,
      gemini_base_url=_GEMINI_BASE_URL.value, gemini_timeout_s=_GEMINI_TIMEOUT_S.value,
      gemini_max_retries=_GEMINI_MAX_RETRIES.value, gemini_backoff_s=_GEMINI_BACKOFF_S.value,
      cache_dir=_CACHE_DIR.value, images_per_class=_IMAGES_PER_CLASS.value, seed=_SEED.value,
      workdir=_WORKDIR.value, label_level=_LABEL_LEVEL.value,
      per_sample_out=_PER_SAMPLE_OUT.value, forget=tuple(_FORGET.value or ()),
      per_sample_limit=_PER_SAMPLE_LIMIT.value)


def main() -> None:
  # google-genai warns about key variables it does not use (we pass the key ourselves); INFO logs
  # (retries, matplotlib's font cache) show only with an explicit --verbosity (see cli.run).
  logging.getLogger("google_genai").setLevel(logging.ERROR)
  run(_options_from_flags())


flags.mark_flags_as_required(["dataset", "oracle"])

if __name__ == "__main__":
  cli.run(main)
