"""MeGU's settings: every choice of docs/method.md §2 as a field of ``config.megu``, and its checks.

The defaults are the settings that measured closest to Retrain; the measurements behind them are
in docs/tuning.md (retired protocol) and docs/results.md.
"""
from __future__ import annotations

import os

import ml_collections
import numpy as np

from megu_jax import noise as noise_lib
from megu_jax import train
from megu_jax import transition as transition_lib
from megu_jax.unlearning.megu.calibration import CALIBRATIONS
from megu_jax.unlearning.base import (FINETUNING_OPTIMIZERS, FINETUNING_SCHEDULES,
                                      UnlearningInputError, check_choice, check_positive,
                                      method_settings, num_classes_of)

NOISE_SCHEDULES = ("before", "alternating")
NOISE_PER = ("class", "sample", "auto")
LABEL_MODES = ("sample", "argmax")
LABEL_GUIDANCE = ("transition", "transition_x_model")
FORGET_TARGETS = ("label", "distribution", "non_member_margin", "retained_head_margin")
RETAIN_MARGIN_SOURCES = ("original", "retained_head")
STAND_IN_UNSEEN_MATCHES = ("none", "shift", "quantile")


class MissingTransitionFileError(UnlearningInputError, FileNotFoundError):
  """``config.megu.transition`` names a .npy file that does not exist."""


def default_megu_config() -> ml_collections.ConfigDict:
  """Every choice of docs/method.md §2 with its default; attach it as ``config.megu``."""
  c = ml_collections.ConfigDict()
  # --- the transition matrix and the perturbing labels ---
  c.transition = "prototype"   # path to a .npy T, or an offline oracle: prototype|hierarchy|uniform
  c.temperature = 1.0          # τ on the oracles' 0..10 scale (1.0 here = 0.1 on raw cosine)
  c.top_k = 0                  # keep the k most similar classes per row; 0 keeps all
  c.label_mode = "sample"      # sample: ỹ ~ Categorical(row); argmax: the most likely other class
  # label: the finetuning CE on forget images targets ỹ. distribution: it targets the whole row
  # ỹ is drawn from (after the guidance below); ỹ then only picks each sample's δ⁺.
  # non_member_margin: it regresses each image's margin onto the original's margin on an unseen
  # image of its class at the same rank (targets.py; needs non_members; random forgetting only).
  # retained_head_margin: it regresses each image's margin onto the margin a stand-in for Retrain
  # gives it: the stages after freeze_through retrained from scratch on θ₀'s prefix outputs of
  # the retained images (calibration.py; calibration_heads heads of calibration_epochs each).
  c.forget_target = "label"
  # transition: row = T[y]. transition_x_model: row ∝ T[y] · p_θ₀(·|x)^(1/guidance_temperature),
  # the original model's opinion of where this image would go (own class excluded): each image
  # gets a label it can be fitted to, as a model that never saw the class would send it.
  c.label_guidance = "transition_x_model"
  c.guidance_temperature = 0.5  # between under-confident sampling (1) and over-confident argmax
  # Sub-class and random forgetting only (see own_class_weight()): the row becomes
  # (1 − w)·T[y] + w·e_y before the guidance, so a sample may keep its label.
  c.own_class_weight = 0.5
  # True: the guidance reweights the other classes alone and the own class is mixed in after
  # it, so own_class_weight is the share of samples that keep their label; False: before it,
  # where the original's confidence (near 1 on memorised images) keeps almost every label.
  c.own_class_after_guidance = False
  c.prototype_samples_per_class = 500  # images per class whose features make the prototypes
  c.superclass_of = ()         # hierarchy oracle: class -> group (the main job fills it in)
  # --- the noise pair ---
  c.activation = "features"    # which of model.activation_names carries the noise
  c.noise = "both"             # both | negative | positive | none (ablations)
  c.noise_per = "auto"         # class | sample | auto (= sample for the random scenario)
  c.negative_weight = 0.1      # λ⁻
  c.positive_weight = 0.1      # λ⁺
  c.noise_steps = 100
  c.negative_learning_rate = 0.1   # Adam
  c.positive_learning_rate = 0.1   # Adam
  c.noise_schedule = "before"  # before: noise first, then finetune; alternating: one noise step
  #                              before every finetuning step, on the current θ
  # --- finetuning ---
  c.forget_weight = 1.0        # weight of the perturbed forget CE
  c.retain_weight = 1.0        # β
  c.kl_weight = 0.0            # α: KL(f_θ₀ ‖ f_θ) on retain images (> 0 keeps the class alive)
  # ν: Huber(margin_θ(x_r) − margin_θ₀(x_r)) on retain images. Lowering the forgotten images'
  # margins moves the retained images' too; this holds them where θ₀ has them.
  c.retain_margin_weight = 0.0
  # Where ν's retained margins come from: original (θ₀'s), or retained_head (the stand-in's of
  # forget_target="retained_head_margin", which never had the forgotten images as competitors).
  c.retain_margin_source = "original"
  # forget_target="retained_head_margin" only (needs non_members). The stand-in reads θ₀'s frozen
  # prefix, which was trained on the forgotten images, while Retrain treats them like any unseen
  # image of their class. none: the stand-in's margins on the forgotten images as they are;
  # otherwise matched, class by class, to its margins on unseen images of the same classes.
  # shift: moved by the difference of the two means; quantile: the r-th smallest of n takes the
  # (r + ½)/n quantile of the unseen images' (order kept, spread the unseen images').
  c.stand_in_unseen_match = "none"
  # μ: without it the noise pair does part of the forgetting for θ and the clean model ends up
  # less confident on forgotten images than a model that never saw them.
  c.align_weight = 1.0
  c.steps = 50
  c.epochs = 0.0               # > 0: steps = ceil(epochs * |D_f| / forget_batch_size) instead
  c.optimizer = "sgd"          # sgd | adam
  c.learning_rate = 0.04
  c.momentum = 0.9             # sgd only
  c.weight_decay = 0.0
  c.max_grad_norm = 2.0        # clip the gradient's global norm (full finetuning); 0 = no clip
  # Train only the stages after this activation ("" trains all): the stages up to it keep θ₀,
  # and a step skips their backward pass. Must come before ``activation``; no weight decay.
  c.freeze_through = ""
  c.schedule = "cosine"        # cosine | constant
  c.forget_batch_size = 128
  c.retain_batch_size = 128
  c.retain_subset_size = 0     # draw retain batches from this many retain images; 0 = all
  # This fraction of every retain batch comes from the retained images of the classes the
  # perturbing labels send forget samples to, each class in proportion to the labels it
  # receives (0: every retain row uniform): the finetuning moves those classes most.
  c.receiving_retain_fraction = 0.0
  # Retrain-free stopping rule (calibration.py). none: finetune for ``steps``. Otherwise check
  # the forgotten images' mean margin every calibration_every steps, up to calibration_max_steps
  # (the schedule spans those), and stop once it is no higher than a target.
  # non_member_margin (from ``steps`` on): that of unseen images of the same classes
  # (``non_members``). retained_head (from the first check; ``steps`` unused): the margin a head
  # retrained on the retained images over θ₀'s frozen prefix gives them (needs freeze_through),
  # trained for calibration_epochs (0: the original's recipe's epochs); the target is the mean
  # over calibration_heads such heads, each from its own initialisation and data order.
  c.calibration = "none"
  c.calibration_every = 10
  c.calibration_max_steps = 200
  c.calibration_epochs = 0
  c.calibration_heads = 1
  # Random (sample-level) forgetting: these fields replace the ones above. A hundred samples'
  # batches revisited for every step dominate a full-weight update, so MeGU does little here.
  c.random_scenario = ml_collections.ConfigDict(
      {"forget_weight": 0.1, "learning_rate": 0.01, "noise": "none"})
  return c


# Fields added after the all-class table, with the value at which MeGU does exactly what it did
# before they existed (tests/test_megu.py checks that it does): a table recorded without such a
# field ran with this value.
NO_OP_VALUES = {"receiving_retain_fraction": 0.0, "own_class_after_guidance": False,
                "retain_margin_weight": 0.0, "retain_margin_source": "original",
                "stand_in_unseen_match": "none"}


def megu_settings(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """``config.megu`` over the defaults, then ``random_scenario`` in the random scenario.

  An unknown field (also inside ``random_scenario``) fails, listing the known ones.
  """
  settings = method_settings(config, "megu", default_megu_config())
  overrides = settings.random_scenario
  unknown = sorted(set(overrides.keys()) - set(settings.keys()))
  if unknown:
    raise UnlearningInputError(
        f"config.megu.random_scenario has unknown field(s) {unknown}; known fields: "
        f"{sorted(k for k in settings.keys() if k != 'random_scenario')}")
  if config.get("scenario") == "random":
    for field, value in overrides.items():
      settings[field] = value
  return settings


def validate_settings(settings: ml_collections.ConfigDict, trained: train.Trained,
                      num_devices: int) -> None:
  """Every field checked before any compute; a bad one raises naming it and what is allowed."""
  f = lambda name: f"config.megu.{name}"
  names = tuple(trained.model.activation_names)
  check_choice(f("activation"), settings.activation, names)
  if settings.freeze_through:
    check_choice(f("freeze_through"), settings.freeze_through, ("",) + names)
    if names.index(settings.freeze_through) >= names.index(settings.activation):
      raise UnlearningInputError(
          f"{f('freeze_through')}={settings.freeze_through!r} must come before "
          f"{f('activation')}={settings.activation!r} in {names}: the noisy activation has to "
          "be produced by trained stages")
    if settings.weight_decay:
      raise UnlearningInputError(
          f"{f('weight_decay')}={settings.weight_decay} would shrink the frozen stages "
          f"(up to {settings.freeze_through!r}) too; set it to 0 or freeze_through=''")
  check_choice(f("noise"), settings.noise, noise_lib.NOISE_MODES)
  check_choice(f("noise_per"), settings.noise_per, NOISE_PER)
  check_choice(f("noise_schedule"), settings.noise_schedule, NOISE_SCHEDULES)
  check_choice(f("optimizer"), settings.optimizer, FINETUNING_OPTIMIZERS)
  check_choice(f("schedule"), settings.schedule, FINETUNING_SCHEDULES)
  check_choice(f("label_mode"), settings.label_mode, LABEL_MODES)
  check_choice(f("label_guidance"), settings.label_guidance, LABEL_GUIDANCE)
  check_choice(f("forget_target"), settings.forget_target, FORGET_TARGETS)
  check_choice(f("calibration"), settings.calibration, CALIBRATIONS)
  check_choice(f("retain_margin_source"), settings.retain_margin_source, RETAIN_MARGIN_SOURCES)
  if settings.retain_margin_source == "retained_head" and (
      settings.forget_target != "retained_head_margin"):
    raise UnlearningInputError(
        f"{f('retain_margin_source')}='retained_head' reads the stand-in heads of "
        f"{f('forget_target')}='retained_head_margin' (now {settings.forget_target!r})")
  check_choice(f("stand_in_unseen_match"), settings.stand_in_unseen_match,
               STAND_IN_UNSEEN_MATCHES)
  if settings.stand_in_unseen_match != "none" and (
      settings.forget_target != "retained_head_margin"):
    raise UnlearningInputError(
        f"{f('stand_in_unseen_match')}={settings.stand_in_unseen_match!r} matches the stand-in's "
        f"margins of {f('forget_target')}='retained_head_margin' (now {settings.forget_target!r})")
  if settings.forget_target == "retained_head_margin" and not settings.freeze_through:
    raise UnlearningInputError(
        f"{f('forget_target')}='retained_head_margin' needs {f('freeze_through')}: its stand-in "
        "retrains the stages after the frozen prefix (with none frozen it would be Retrain)")
  if not 0.0 <= settings.receiving_retain_fraction <= 1.0:
    raise UnlearningInputError(
        f"{f('receiving_retain_fraction')}={settings.receiving_retain_fraction!r} must be in "
        "[0, 1]")
  if not 0.0 <= settings.own_class_weight < 1.0:
    raise UnlearningInputError(f"{f('own_class_weight')}={settings.own_class_weight!r} must be "
                               "in [0, 1)")
  for name in ("negative_weight", "positive_weight", "forget_weight", "retain_weight",
               "kl_weight", "retain_margin_weight", "align_weight", "weight_decay", "momentum",
               "epochs", "max_grad_norm"):
    check_positive(f(name), settings[name], allow_zero=True)
  for name in ("temperature", "guidance_temperature", "learning_rate", "negative_learning_rate",
               "positive_learning_rate"):
    check_positive(f(name), settings[name])
  for name in ("steps", "noise_steps", "top_k", "retain_subset_size",
               "prototype_samples_per_class", "forget_batch_size", "retain_batch_size",
               "calibration_every", "calibration_max_steps", "calibration_epochs",
               "calibration_heads"):
    value = settings[name]
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
      raise UnlearningInputError(f"{f(name)}={value!r} must be an integer >= 0")
  if settings.steps == 0 and settings.epochs == 0:
    raise UnlearningInputError(f"{f('steps')} and {f('epochs')} are both 0: nothing would run")
  if settings.calibration != "none":
    if settings.calibration_every < 1:
      raise UnlearningInputError(f"{f('calibration_every')}={settings.calibration_every} must "
                                 "be >= 1")
    if settings.calibration == "retained_head" and settings.calibration_heads < 1:
      raise UnlearningInputError(f"{f('calibration_heads')}={settings.calibration_heads} must "
                                 "be >= 1")
    if settings.calibration == "retained_head" and not settings.freeze_through:
      raise UnlearningInputError(
          f"{f('calibration')}='retained_head' needs {f('freeze_through')}: its stand-in "
          "retrains the stages after the frozen prefix (with none frozen it would be Retrain)")
    if settings.calibration_max_steps < settings.calibration_every:
      raise UnlearningInputError(
          f"{f('calibration_max_steps')}={settings.calibration_max_steps} must be at least "
          f"{f('calibration_every')}={settings.calibration_every}")
    if (settings.calibration == "non_member_margin"
        and settings.calibration_max_steps < settings.steps):
      raise UnlearningInputError(
          f"{f('calibration_max_steps')}={settings.calibration_max_steps} must be at least "
          f"{f('steps')}={settings.steps}")
  if settings.forget_target == "retained_head_margin" and settings.calibration_heads < 1:
    raise UnlearningInputError(f"{f('calibration_heads')}={settings.calibration_heads} must be "
                               ">= 1 for forget_target='retained_head_margin'")
  for name in ("forget_batch_size", "retain_batch_size"):
    if settings[name] == 0 or settings[name] % num_devices:
      raise UnlearningInputError(
          f"{f(name)}={settings[name]} must be a positive multiple of the device count "
          f"({num_devices})")
  if settings.prototype_samples_per_class == 0:
    raise UnlearningInputError(f"{f('prototype_samples_per_class')} must be >= 1")
  num_classes = num_classes_of(trained)
  if settings.top_k and settings.top_k > num_classes - 1:
    raise UnlearningInputError(
        f"{f('top_k')}={settings.top_k} must be at most {num_classes - 1} for {num_classes} "
        "classes (0 keeps all)")
  source = str(settings.transition)
  if transition_lib.is_transition_file(source):
    # Loading validates size and content: a wrong T fails here, before any compute.
    if not os.path.exists(source):
      raise MissingTransitionFileError(
          f"config.megu.transition={source!r}: no transition matrix at that path (give a .npy "
          f"file or one of the offline oracles {transition_lib.OFFLINE_ORACLES})")
    transition_lib.load_transition(source, num_classes)
  elif source == "hierarchy":
    groups = np.asarray(settings.superclass_of, np.int32)
    if groups.shape != (num_classes,):
      raise UnlearningInputError(
          f"config.megu.transition='hierarchy' needs config.megu.superclass_of, the group of each "
          f"of the {num_classes} classes (the main job fills in the data set's own grouping); "
          f"it has {groups.size} entries")
  elif source not in transition_lib.OFFLINE_ORACLES:
    raise UnlearningInputError(
        f"{f('transition')}={source!r} is neither a .npy file nor an offline oracle "
        f"{transition_lib.OFFLINE_ORACLES} (build a gemini T with the gemini oracle and pass its "
        ".npy path)")


def own_class_weight(settings, config) -> float:
  """How much a forget sample's own label stays a candidate ỹ.

  Full-class forgetting: none, the class is gone. Sub-class and random forgetting: the label
  lives on in D_r (Sandal and Ankle boot stay footwear; other shirts stay shirts), so a model
  that never saw the forgotten samples still gives many of them their label -- Retrain does.
  """
  if config.get("scenario") in ("sub_class", "random"):
    return float(settings.own_class_weight)
  return 0.0


def noise_rows_per_sample(settings, config) -> bool:
  if settings.noise_per == "auto":
    return config.get("scenario") == "random"
  return settings.noise_per == "sample"
