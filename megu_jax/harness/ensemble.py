"""Ensembles: every method judged per example against Retrain's distribution (docs/method.md §4).

``run_ensemble(config, workdir)`` is what ``python -m experiments.ensemble`` runs. For one split
it trains what is missing of

- N originals (seeds ``seed`` .. ``seed + N - 1``: initialisation and data order; one training
  set),
- N Retrain models, the *oracles*, and N more, the *floor* sample (Retrain seeds start at
  ``seed + RETRAIN_SEED_OFFSET`` and alternate between the two roles, so no Retrain shares its
  initialisation with an original and a larger N only adds seeds),

each trained once, checkpointed, resumable, and shared through ``models_root`` with every other
run that needs it. Every method runs once from each original with its own key; its per-example
margins on three splits (forget: the forgotten training images; retain: a fixed subsample of the
retained training images; val: a fixed subsample of the retained classes' test images) are
compared with the oracles' by KLoM, the Gaussian KL and the NeurIPS 2023 forgetting quality
(:mod:`megu_jax.ensemble_metrics`). ``retrain`` is the floor sample scored the same way (what a
perfect method scores at this N), ``original`` is doing nothing.

Every method result is kept under ``workdir/runs/`` (margins and metrics per original, keyed by
what determines it), so a killed run redoes only what is missing, and ``ensemble.json``,
``ensemble.md``, the plots and ``margins/NAME.npz`` are written atomically at the end.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from typing import Any

import ml_collections
import numpy as np
import tqdm

from megu_jax import ensemble_metrics
from megu_jax import ensemble_training
from megu_jax import io_utils
from megu_jax import metrics
from megu_jax import splits
from megu_jax import train
from megu_jax import unlearning
from megu_jax.harness import experiment
from megu_jax.harness import provenance

logger = logging.getLogger(__name__)

SPLITS = ("forget", "retain", "val")
RETRAIN_SEED_OFFSET = 1000
# The literature's columns, as mean ± std over each ensemble.
LITERATURE_METRICS = ("retain_test_acc", "forget_test_acc", "test_acc", "retain_train_acc",
                      "forget_train_acc", "mia_entropy_lr", "mia_confidence_svc",
                      "related_test_acc", "probe_forget_acc", "time_s", "compile_s")
# What MeGU's stopping rule did (config.megu.calibration), as mean ± std, where a run records it.
STOPPING_RULE_METRICS = ("calibration_steps", "calibration_target")
REFERENCES = ("original", "retrain")


class EnsembleInputError(ValueError):
  """A bad ensemble request (size, method sizes); the message names the field and the value."""


def member_seeds(config: ml_collections.ConfigDict, size: int | None = None
                 ) -> dict[str, list[int]]:
  """Model seeds per role: ``original``, ``oracle`` (Retrain), ``floor`` (Retrain)."""
  base, n = int(config.seed), int(size or config.ensemble_size)
  retrain = base + RETRAIN_SEED_OFFSET
  return {"original": [base + i for i in range(n)],
          "oracle": [retrain + 2 * i for i in range(n)],
          "floor": [retrain + 2 * i + 1 for i in range(n)]}


def method_sizes(config: ml_collections.ConfigDict, methods: tuple[str, ...]) -> dict[str, int]:
  """Each method's ensemble size: ``config.ensemble_size``, or its ``ensemble_method_sizes``
  entry ("name:n;name:n"), which may only be smaller."""
  size = config.ensemble_size
  minimum = ensemble_metrics.MIN_MODELS_FORGETTING
  if isinstance(size, bool) or not isinstance(size, int) or size < minimum:
    raise EnsembleInputError(
        f"config.ensemble_size={size!r} must be an integer >= {minimum} (the forgetting "
        f"quality's attacks need at least {minimum} models per ensemble)")
  sizes = {name: size for name in methods}
  for item in filter(None, (part.strip() for part in
                            str(config.get("ensemble_method_sizes", "")).split(";"))):
    name, _, value = item.partition(":")
    name = name.strip()
    if name not in sizes:
      raise EnsembleInputError(f"config.ensemble_method_sizes names {name!r}, which is not one "
                               f"of the methods {list(methods)}")
    if name in REFERENCES:
      raise EnsembleInputError(f"config.ensemble_method_sizes: {name!r} is a reference; it "
                               "always has config.ensemble_size models")
    try:
      n = int(value)
    except ValueError:
      n = -1
    if not minimum <= n <= size:
      raise EnsembleInputError(f"config.ensemble_method_sizes={config.ensemble_method_sizes!r}: "
                               f"{name}'s size must be an integer in [{minimum}, {size}]")
    sizes[name] = n
  return sizes


def validate(config: ml_collections.ConfigDict):
  """Every check that can fail before training: methods, sizes, data set, split, T source."""
  dataset, split, methods = experiment.validate_before_compute(config)
  methods = tuple(dict.fromkeys(("original", "retrain") + methods))
  mode = config.get("ensemble_training", "sequential")
  if mode not in ensemble_training.TRAINING_MODES:
    raise EnsembleInputError(f"config.ensemble_training={mode!r} is not one of "
                             f"{ensemble_training.TRAINING_MODES}")
  return dataset, split, methods, method_sizes(config, methods)


# --- the models -------------------------------------------------------------------------------
def member_config(config: ml_collections.ConfigDict, seed: int) -> ml_collections.ConfigDict:
  member = copy.deepcopy(config)
  with member.unlocked():
    member.seed = seed
    # Every member forgets the same samples: the draw's seed is the ensemble's, not the model's.
    member.split_seed = train.split_seed(config)
  return member


_IDENTITY_FIELDS = ("seed", "retrain", "scenario", "forget", "forget_size", "split_seed")


def _mismatch(directory: str, expected: ml_collections.ConfigDict) -> str | None:
  """What in ``directory``'s recorded config differs from ``expected`` (None: nothing, or no
  record yet)."""
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    return None
  try:
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
  except (OSError, ValueError) as error:
    return f"its config.json cannot be read ({error})"
  # An original is its recipe and seed; a Retrain also what it was trained without.
  fields = experiment.RECIPE_FIELDS + (_IDENTITY_FIELDS if expected.get("retrain") else ("seed",))
  if expected.get("scenario") != "random":  # only a random draw has a size and a seed
    fields = tuple(f for f in fields if f not in ("forget_size", "split_seed"))
  wanted = json.loads(expected.to_json_best_effort())
  for field in fields:
    if recorded.get(field) != wanted.get(field):
      return f"it was trained with {field}={recorded.get(field)!r}, not {wanted.get(field)!r}"
  return None


def trained_member(config: ml_collections.ConfigDict, directory: str,
                   dataset) -> tuple[train.Trained, dict]:
  """The model of ``config`` in ``directory``: resumed or trained; a directory that holds
  another model is moved aside (saying so) and trained afresh, never reused."""
  problem = _mismatch(directory, config)
  if problem is not None:
    root = os.path.join(os.path.dirname(os.path.dirname(directory)), "mismatched_models")
    os.makedirs(root, exist_ok=True)
    destination = os.path.join(root, os.path.basename(directory))
    suffix = 1
    while os.path.exists(destination):
      destination = os.path.join(root, f"{os.path.basename(directory)}.{suffix}")
      suffix += 1
    shutil.move(directory, destination)
    logger.warning("%s holds another model (%s); moved it to %s and training it again",
                   directory, problem, destination)
  return train.train_and_restore(config, directory, dataset=dataset)


@dataclasses.dataclass(frozen=True)
class Member:
  """One trained model of an ensemble."""
  trained: train.Trained
  final: dict          # its final_metrics.json
  directory: str       # its workdir under models_root
  seed: int


def role_config(config: ml_collections.ConfigDict, role: str, seed: int
                ) -> ml_collections.ConfigDict:
  member = member_config(config, seed)
  with member.unlocked():
    member.retrain = role != "original"
  return member


def train_members(config, models_root: str, dataset, roles: dict[str, list[int]]
                  ) -> tuple[dict[str, list[Member]], dict[str, float]]:
  """Every model of ``roles``, trained one after another (resumable model by model); and the
  training's timing: ``models_trained`` now, the phase's ``training_wall_s``, and
  ``models_training_s``, what those models' own training loops took (compilation included)."""
  jobs = []
  for role, seeds in roles.items():
    for i, seed in enumerate(seeds):
      member = role_config(config, role, seed)
      key = "original" if role == "original" else "retrain"
      jobs.append((role, i, len(seeds), seed, member,
                   experiment.model_dirs(member, models_root)[key]))
  if config.get("ensemble_training", "sequential") == "vmap":
    _train_in_groups(config, jobs, dataset)
  trained: dict[str, list[Member]] = {role: [] for role in roles}
  fresh = {d for *_, d in jobs if not os.path.exists(os.path.join(d, "final_metrics.json"))}
  start = time.perf_counter()
  bar = tqdm.tqdm(jobs, unit="model", dynamic_ncols=True, disable=not config.get("progress", True))
  for role, i, count, seed, member, directory in bar:
    bar.set_description(f"{role} {i + 1}/{count}")
    model, final = trained_member(member, directory, dataset)
    trained[role].append(Member(model, final, directory, seed))
  bar.close()
  # What this run's training cost against what its models' own training loops took: the
  # ensemble's overhead (restores, evaluation of each final model, bookkeeping).
  finals = [m.final for ms in trained.values() for m in ms if m.directory in fresh]
  timing = {"models_trained": len(finals), "training_wall_s": time.perf_counter() - start,
            "models_training_s": float(sum(f["time_s"] + f.get("compile_s", 0.0)
                                           for f in finals))}
  return trained, timing


def _train_in_groups(config, jobs, dataset) -> None:
  """``ensemble_training="vmap"``: the missing models of each training set, several at once."""
  group_size = int(config.get("ensemble_group_size", 4))
  by_training_set: dict[str, list] = {}
  for role, _, _, _, member, directory in jobs:
    if os.path.exists(os.path.join(directory, "final_metrics.json")):
      continue
    if _mismatch(directory, member) is not None:
      continue  # trained_member moves it aside and trains it alone
    by_training_set.setdefault("original" if role == "original" else "retrain", []).append(
        (member, directory))
  for group in by_training_set.values():
    for start in range(0, len(group), group_size):
      chunk = group[start:start + group_size]
      ensemble_training.train_group([m for m, _ in chunk], [d for _, d in chunk], dataset)


# --- the examples and their margins ---------------------------------------------------------------
def example_rows(config: ml_collections.ConfigDict, split: splits.ForgetSplit) -> dict[str, Any]:
  """The positions each split's margins are taken at: training-set positions for forget and
  retain, test-set positions for val; fixed for the split (not for the model seed)."""
  rng = np.random.default_rng([train.split_seed(config), 2024])
  pick = lambda rows, n: np.sort(rng.choice(rows, min(n, len(rows)), replace=False))
  return {"forget": np.asarray(split.forget_train),
          "retain": pick(split.retain_train, int(config.ensemble_retain_examples)),
          "val": pick(split.retain_test, int(config.ensemble_val_examples))}


def margins_of(outputs: dict[str, dict], dataset, rows: dict[str, np.ndarray]
               ) -> dict[str, np.ndarray]:
  """float64 margins per split from a model's train/test outputs
  (:func:`~megu_jax.harness.experiment.run_method_with_outputs`)."""
  train_logits, test_logits = outputs["train"]["logits"], outputs["test"]["logits"]
  return {"forget": ensemble_metrics.margins(train_logits[rows["forget"]],
                                             dataset.train_labels[rows["forget"]]),
          "retain": ensemble_metrics.margins(train_logits[rows["retain"]],
                                             dataset.train_labels[rows["retain"]]),
          "val": ensemble_metrics.margins(test_logits[rows["val"]],
                                          dataset.test_labels[rows["val"]])}


def predicted_fractions(logits: np.ndarray) -> list[float]:
  """Where a model sends some images: the fraction it predicts as each class."""
  logits = np.asarray(logits)
  counts = np.bincount(np.argmax(logits, axis=-1), minlength=logits.shape[-1])
  return (counts / max(len(logits), 1)).tolist()


# --- running the methods, one result per original, kept on disk -----------------------------------
def method_source_digest(name: str) -> str | None:
  """A digest of the code of registered method ``name``: the module that registered it (every
  module of its package, for a method that is a package) and the shared
  :mod:`megu_jax.unlearning.base`. None for a name that is not a method (the oracle and floor
  roles only evaluate models)."""
  if name not in unlearning.UNLEARNING_METHODS:
    return None
  return _module_source_digest(unlearning.registered_module(name))


@functools.lru_cache(maxsize=None)
def _module_source_digest(module_name: str) -> str:
  module_file = os.path.abspath(sys.modules[module_name].__file__)
  directory = os.path.dirname(module_file)
  own = ([os.path.join(directory, f) for f in sorted(os.listdir(directory)) if f.endswith(".py")]
         if directory != os.path.dirname(os.path.abspath(unlearning.__file__)) else [module_file])
  digest = hashlib.sha256()
  for path in own + [os.path.abspath(sys.modules[unlearning.base.__name__].__file__)]:
    with open(path, "rb") as f:
      digest.update(os.path.basename(path).encode() + b"\0" + f.read())
  return digest.hexdigest()[:16]


def _file_digest(source: str) -> str:
  """The sha256 of the file at ``source``; ``source`` itself where it names no file."""
  if not os.path.isfile(source):
    return source
  with open(source, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _run_key(config, name: str, member_dir: str, split: splits.ForgetSplit) -> str:
  """What determines one method run: its settings and code, the original it starts from, the
  split. An edit to the method's code changes the key, so a cached run is not reused."""
  section = config.get(name)
  settings = section.to_dict() if hasattr(section, "to_dict") else section
  transition = None
  if name == "megu":
    # T as its content, not its path: the path lies in the workdir, and a moved or copied
    # workdir holds the same T.
    transition = _file_digest(str(config.megu.transition))
    settings = dict(settings, transition=transition)
  text = json.dumps({"method": name, "settings": settings, "model": os.path.basename(member_dir),
                     "code": method_source_digest(name),
                     "megu_transition": transition,
                     "forget_train": hashlib.sha256(np.asarray(split.forget_train).tobytes()
                                                    ).hexdigest()},
                    sort_keys=True, default=str)
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _load_run(path: str, key: str) -> dict | None:
  try:
    with open(path + ".json", encoding="utf-8") as f:
      record = json.load(f)
    if record.get("key") != key:
      return None
    with np.load(path + ".npz", allow_pickle=False) as stored:
      record["margins"] = {split: np.asarray(stored[split], np.float64) for split in SPLITS}
    return record
  except (OSError, ValueError, KeyError) as error:
    if os.path.exists(path + ".json"):
      logger.warning("%s is damaged or of an older format (%s); running it again", path, error)
    return None


def _save_run(path: str, key: str, metrics_: dict, margins: dict[str, np.ndarray]) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  io_utils.atomic_save_npz(path + ".npz", **margins)
  io_utils.atomic_write_json(path + ".json", {"key": key, "metrics": metrics_})


def run_member(setting: experiment.Setting, name: str, rows: dict[str, np.ndarray],
               path: str, key: str) -> dict:
  """One method from one original: ``{"metrics", "margins"}``, from disk when already done."""
  done = _load_run(path, key)
  if done is not None:
    return done
  result, _, outputs = experiment.run_method_with_outputs(setting, name)
  margins = margins_of(outputs, setting.dataset, rows)
  bad = [split for split, values in margins.items() if not np.all(np.isfinite(values))]
  if bad:
    raise FloatingPointError(f"{name}: non-finite margins on the {', '.join(bad)} split(s)")
  result["forget_predicted"] = predicted_fractions(outputs["train"]["logits"][rows["forget"]])
  _save_run(path, key, result, margins)
  return {"metrics": result, "margins": margins}


# --- comparing ensembles --------------------------------------------------------------------------
def _mean_std(values: list[float]) -> dict[str, float]:
  array = np.asarray(values, np.float64)
  return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0}


def compare(method: dict[str, np.ndarray], oracle: dict[str, np.ndarray], *, seed: int = 0
            ) -> dict[str, Any]:
  """Per-example tests of ``method`` margins ``{split: [n, examples]}`` against the oracles'.

  ``out["per_example"]["klom_<split>" | "gaussian_kl_<split>"]`` keeps the values the summaries
  were taken of (``retain_by_class`` groups them); callers drop it before writing JSON."""
  out: dict[str, Any] = {"klom": {}, "gaussian_kl": {}, "per_example": {}}
  for split in SPLITS:
    per_example = {"klom": ensemble_metrics.klom(method[split], oracle[split]),
                   "gaussian_kl": ensemble_metrics.gaussian_kl(method[split], oracle[split])}
    for family, values in per_example.items():
      out[family][split] = ensemble_metrics.summarize(values, seed=seed)
      out["per_example"][f"{family}_{split}"] = values
  quality = ensemble_metrics.forgetting_quality(method["forget"], oracle["forget"])
  low, high = ensemble_metrics.bootstrap_ci(quality["points"], np.mean, seed=seed)
  out["forgetting_quality"] = {"F": float(quality["F"]), "F_ci95": [float(low), float(high)]}
  return out


def retain_by_class(per_example: dict[str, np.ndarray], labels: np.ndarray, class_names, *,
                    seed: int = 0) -> dict[str, dict[str, dict]]:
  """The retain split's per-example divergences (``compare(...)["per_example"]``) summarised
  within each class: ``{"klom" | "gaussian_kl": {class name: summarize(...)}}``. Shows where a
  method's over-unlearning lands, e.g. on the classes the forgotten images were sent to."""
  labels = np.asarray(labels)
  return {family: {str(class_names[c]): ensemble_metrics.summarize(
                       per_example[f"{family}_retain"][labels == c], seed=seed)
                   for c in np.unique(labels)}
          for family in ("klom", "gaussian_kl")}


def stack(runs: list[dict]) -> dict[str, np.ndarray]:
  return {split: np.stack([run["margins"][split] for run in runs]) for split in SPLITS}


def summarize_method(runs: list[dict], oracle_runs: list[dict], floor_runs: list[dict],
                     oracle_margins: dict[str, np.ndarray], *, seed: int,
                     retain_labels: np.ndarray | None = None, class_names=None) -> dict[str, Any]:
  """One method's entry of ``ensemble.json``: the tests, the floor at its size, its columns, and
  (given the retain split's labels) the retain divergence by class, the floor's beside it.
  The entry keeps the method's ``per_example`` values: drop them before writing JSON."""
  n = len(runs)
  entry = {"ensemble_size": n, **compare(stack(runs), oracle_margins, seed=seed)}
  floor = compare(stack(floor_runs[:n]), oracle_margins, seed=seed)
  entry["floor"] = {k: v for k, v in floor.items() if k != "per_example"}
  if retain_labels is not None:
    entry["retain_by_class"] = retain_by_class(entry["per_example"], retain_labels, class_names,
                                               seed=seed)
    entry["floor"]["retain_by_class"] = retain_by_class(floor["per_example"], retain_labels,
                                                        class_names, seed=seed)
  for name in LITERATURE_METRICS + STOPPING_RULE_METRICS:
    values = [run["metrics"][name] for run in runs if name in run["metrics"]]
    if values:
      entry[name] = _mean_std(values)
  went = [run["metrics"]["forget_predicted"] for run in runs
          if "forget_predicted" in run["metrics"]]
  if len(went) == n:  # runs recorded before it was kept have none
    entry["forget_predicted"] = np.mean(went, axis=0).tolist()
  reference = {name: np.mean([r["metrics"][name] for r in oracle_runs])
               for name in ("retain_test_acc", "forget_test_acc", "mia_entropy_lr",
                            "retain_train_acc", "test_acc")}
  means = {name: entry[name]["mean"] for name in reference if name in entry}
  entry["avg_gap"] = float(metrics.avg_gap(means, reference))
  entry["forgetting_quality"]["score"] = float(ensemble_metrics.forgetting_score(
      entry["forgetting_quality"]["F"], means["retain_train_acc"],
      reference["retain_train_acc"], means["test_acc"], reference["test_acc"]))
  return entry


# --- the run --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Ensemble:
  """Everything the methods of one split share: the trained models, the per-original settings,
  the examples, and the references' runs (evaluated once, kept on disk)."""
  config: ml_collections.ConfigDict
  workdir: str
  dataset: Any
  split: splits.ForgetSplit
  trained: dict[str, list[Member]]
  members: list[experiment.Setting]   # one per original; its Retrain is the floor model
  rows: dict[str, np.ndarray]
  oracle_runs: list[dict]
  reference_runs: dict[str, list[dict]]  # "original", "retrain" (the floor)
  timing: dict[str, float]               # of the training phase (train_members)

  @property
  def oracle_margins(self) -> dict[str, np.ndarray]:
    return stack(self.oracle_runs)


def prepare_ensemble(config: ml_collections.ConfigDict, workdir: str,
                     models_root: str | None = None, checked: tuple | None = None) -> Ensemble:
  """Validates, trains what is missing, evaluates the references: an :class:`Ensemble`."""
  dataset, split, _, _ = checked or validate(config)
  models_root = models_root or os.path.join(workdir, "models")
  os.makedirs(workdir, exist_ok=True)
  splits.save_split(split, os.path.join(workdir, "split"))
  size = int(config.ensemble_size)
  trained, timing = train_members(config, models_root, dataset, member_seeds(config, size))
  rows = example_rows(config, split)
  members = [experiment.setting_from_models(
      member_config(config, original.seed),
      os.path.join(workdir, "members", f"seed{original.seed}"), dataset, split,
      (original.trained, original.final), (floor.trained, floor.final))
      for original, floor in zip(trained["original"], trained["floor"])]

  def reference_runs(role: str) -> list[dict]:
    """The references' margins and columns: each of ``role``'s models, evaluated once."""
    results = []
    for setting, model in zip(members, trained[role]):
      name = "original" if role == "original" else "retrain"
      if role != "original":  # the floor model is the setting's own; an oracle stands in for it
        setting = dataclasses.replace(setting, retrained=model.trained, retrain_final=model.final)
      path = os.path.join(workdir, "runs", role, f"seed{model.seed}")
      results.append(run_member(setting, name, rows, path,
                                _run_key(config, role, model.directory, split)))
    return results

  return Ensemble(config=config, workdir=workdir, dataset=dataset, split=split, trained=trained,
                  members=members, rows=rows, oracle_runs=reference_runs("oracle"), timing=timing,
                  reference_runs={"original": reference_runs("original"),
                                  "retrain": reference_runs("floor")})


def apply_overrides(section: ml_collections.ConfigDict, overrides: dict) -> None:
  """Sets ``overrides`` in ``section``; a dotted field (``random_scenario.learning_rate``) sets
  the field of a nested section."""
  for field, value in overrides.items():
    *path, leaf = field.split(".")
    target = section
    for part in path:
      target = target[part]
    target[leaf] = value


def run_method_ensemble(ens: Ensemble, name: str, size: int, *, overrides: dict | None = None,
                        tag: str | None = None, failures: dict | None = None) -> list[dict]:
  """``name`` once from each of the first ``size`` originals: their runs (kept on disk under
  ``runs/<tag or name>/``). ``overrides`` change fields of ``config.<name>`` (a variant; its
  runs are keyed by its settings, so a changed default never reuses an old result). A run that
  fails is reported in ``failures`` with its seed; the others are kept."""
  runs = []
  bar = tqdm.tqdm(range(size), unit="run", dynamic_ncols=True,
                  disable=not ens.config.get("progress", True))
  for i in bar:
    setting, original = ens.members[i], ens.trained["original"][i]
    bar.set_description(f"{tag or name} from original {i + 1}/{size}")
    if overrides:
      method_config = copy.deepcopy(setting.method_config)
      with method_config.unlocked():
        apply_overrides(method_config[name], overrides)
      setting = dataclasses.replace(setting, method_config=method_config)
    path = os.path.join(ens.workdir, "runs", tag or name, f"seed{original.seed}")
    try:
      runs.append(run_member(setting, name, ens.rows, path,
                             _run_key(setting.method_config, name, original.directory,
                                      ens.split)))
    except unlearning.UnlearningInputError:
      raise  # bad settings fail every original alike: stop, naming them
    except Exception as error:  # noqa: BLE001  (one failed original must not lose the others)
      if failures is None:
        raise
      failures.setdefault(tag or name, []).append(
          {"seed": original.seed, "error": f"{type(error).__name__}: {error}"})
      logger.warning("%s failed on the original of seed %d (%s: %s); its other originals are "
                     "kept", tag or name, original.seed, type(error).__name__, error)
  bar.close()
  return runs


def run_ensemble(config: ml_collections.ConfigDict, workdir: str,
                 models_root: str | None = None) -> dict[str, Any]:
  """Trains what is missing, runs every method from each original, writes the results."""
  from megu_jax.harness import ensemble_report  # noqa: PLC0415 (matplotlib: only when writing)
  start = time.perf_counter()
  checked = validate(config)
  _, _, methods, sizes = checked
  ens = prepare_ensemble(config, workdir, models_root, checked)
  runs: dict[str, list[dict]] = dict(ens.reference_runs)
  failures: dict[str, list[dict]] = {}
  for name in methods:
    if name not in REFERENCES:
      runs[name] = run_method_ensemble(ens, name, sizes[name], failures=failures)
  summary = summarize_all(config, ens.dataset, ens.split, methods, runs, ens.oracle_runs,
                          ens.oracle_margins, failures, ens.rows)
  summary["timing"] = {**ens.timing, "wall_s": time.perf_counter() - start}
  ensemble_report.write_outputs(workdir, summary, runs, ens.oracle_margins, ens.rows,
                                ens.dataset)
  return summary


def summarize_all(config, dataset, split, methods, runs, oracle_runs, oracle_margins, failures,
                  rows) -> dict[str, Any]:
  """``ensemble.json``'s content."""
  seed = int(config.seed)
  summary: dict[str, Any] = {
      "dataset": dataset.name, "scenario": split.scenario, "forget": list(split.forget),
      "forget_size": int(len(split.forget_train)), "split_seed": train.split_seed(config),
      "ensemble_size": int(config.ensemble_size),
      "examples": {name: int(len(positions)) for name, positions in rows.items()},
      "seeds": member_seeds(config),
      "oracles": {name: _mean_std([r["metrics"][name] for r in oracle_runs])
                  for name in LITERATURE_METRICS if name in oracle_runs[0]["metrics"]},
      "class_names": list(dataset.class_names),
      "methods": {}, "failures": failures, "provenance": provenance.record(),
      # Each method's settings as configured (config.<name>): what a table was run with.
      "settings": {name: config[name].to_dict() for name in methods
                   if isinstance(config.get(name), ml_collections.ConfigDict)},
  }
  floor_runs = runs["retrain"]
  # Doing nothing and the floor at every smaller size a method ran with: the headline statistic
  # of that N is chosen on them (targets.headline_statistic).
  summary["references_at"] = {
      str(n): {name: {k: v for k, v in compare(stack(runs[name][:n]), oracle_margins,
                                                 seed=seed).items() if k != "per_example"}
               for name in REFERENCES}
      for n in sorted({len(r) for name, r in runs.items() if name not in REFERENCES})
      if n < len(runs["original"]) and n >= ensemble_metrics.MIN_MODELS_FORGETTING}
  for name in methods:
    if len(runs.get(name, [])) < ensemble_metrics.MIN_MODELS_FORGETTING:
      continue  # every run of it failed: the failures say why
    entry = summarize_method(runs[name], oracle_runs, floor_runs, oracle_margins, seed=seed,
                             retain_labels=dataset.train_labels[rows["retain"]],
                             class_names=dataset.class_names)
    entry.pop("per_example")
    summary["methods"][name] = entry
  if all("forget_predicted" in r["metrics"] for r in oracle_runs):
    # Where Retrain sends the forgotten images, beside where each method does.
    summary["oracles"]["forget_predicted"] = np.mean(
        [r["metrics"]["forget_predicted"] for r in oracle_runs], axis=0).tolist()
  return summary
