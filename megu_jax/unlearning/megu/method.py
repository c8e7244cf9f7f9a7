"""The MeGU method: machine guidance, then the noise phase and the finetuning (docs/method.md §2).

``megu(trained, forget_data, retain_data, config, key)`` is registered as ``"megu"`` with the
signature every method shares (:mod:`megu_jax.unlearning.base`); its settings are ``config.megu``
(:mod:`.config`). The order of work:

1. **Machine guidance** (:func:`machine_guidance`, once): one pass of the original model over the
   forget images; T from ``config.megu.transition`` (:func:`megu_jax.transition.build_transition`);
   one perturbing label per forget sample (:mod:`.labels`).
2. **Noise pair**: δ⁻ per target class (or per sample), δ⁺ per perturbing class, optimised with θ
   frozen (:mod:`.steps`, :mod:`megu_jax.noise`), before finetuning or alternating with it.
3. **Finetuning** θ on forget and retain batches:
       L = w_f·CE(h(g(x_f) + δ⁻ + δ⁺), ỹ) + β·CE(f(x_r), y_r) + α·KL(f_θ₀(x_r) ‖ f_θ(x_r))
           + μ·mean (g_θ(x_f) − sg(g_θ₀(x_f) + δ⁻ + δ⁺))².
   No noise at test time.
"""
from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from megu_jax import noise as noise_lib
from megu_jax import parallel
from megu_jax import train
from megu_jax import transition as transition_lib
from megu_jax.unlearning import register
from megu_jax.unlearning.base import (UnlearnData, UnlearningInputError, balanced_subset,
                                      check_data, host_copy, make_finetuning_optimizer,
                                      num_classes_of, row_stream, run_phase,
                                      timed_apart_from_compilation)
from megu_jax.unlearning.megu import calibration as calibration_lib
from megu_jax.unlearning.megu.config import (megu_settings, noise_rows_per_sample,
                                             own_class_weight, validate_settings)
from megu_jax.unlearning.megu.labels import draw_perturbing_labels, guided_distribution
from megu_jax.unlearning.megu.targets import matched_to_unseen, non_member_margin_targets
from megu_jax.unlearning.megu.steps import (MeguState, make_finetune_step, make_noise_step,
                                            noise_optimizers)


# --- host side: batches ---------------------------------------------------------------------------
def _forget_batches(rng, forget_data, perturbing, batch_size, num_steps, per_row=None, *,
                    with_images=True):
  """Forget batches; ``per_row`` maps more batch keys to per-forget-sample arrays.

  ``with_images=False`` leaves the images out, for a step that reads only what ``per_row`` holds
  (the activations the guidance pass computed): nothing unused is copied to the devices.
  """
  rows = row_stream(rng, len(forget_data), batch_size * num_steps).reshape(num_steps, batch_size)
  for step_rows in rows:
    batch = {"forget_label": forget_data.labels[step_rows],
             "forget_perturbing": perturbing[step_rows],
             "forget_row": step_rows.astype(np.int32)}
    if with_images:
      batch["forget_image"] = forget_data.images[step_rows]
    for name, values in (per_row or {}).items():
      batch[name] = values[step_rows]
    yield batch


def receiving_retain_rows(retain_labels: np.ndarray, perturbing: np.ndarray,
                          num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """The positions of ``retain_labels`` in the classes the perturbing labels receive, and the
  probability of drawing each: a class gets the share of ỹ it receives, split evenly over its
  retained images (a receiving class with no retained image drops out)."""
  received = np.bincount(perturbing, minlength=num_classes).astype(np.float64)
  available = np.bincount(retain_labels, minlength=num_classes)
  received[available == 0] = 0.0
  if not received.sum():
    raise UnlearningInputError(
        "config.megu.receiving_retain_fraction > 0, but no retained image belongs to a class "
        f"the perturbing labels receive ({sorted(set(perturbing.tolist()))}); set it to 0")
  positions = np.flatnonzero(received[retain_labels] > 0)
  labels = retain_labels[positions]
  p = received[labels] / received.sum() / available[labels]
  return positions, p / p.sum()


def _retain_batches(rng, retain_rows, retain_data, batch_size, num_steps, receiving=None,
                    receiving_count=0, target_margins=None, prefix=None):
  """Retain batches: successive shuffles of ``retain_rows``; with ``receiving`` (positions into
  ``retain_rows`` and their probabilities), the first ``receiving_count`` rows of every batch are
  drawn from those instead. With none the draw is the uniform one alone. ``target_margins``
  (aligned with ``retain_rows``) adds each row's ``retain_target_margin``; ``prefix`` (aligned
  the same way: θ₀'s frozen-prefix outputs) replaces the images by ``retain_prefix``."""
  positions = row_stream(rng, len(retain_rows), batch_size * num_steps)
  positions = positions.reshape(num_steps, batch_size)
  if receiving_count:
    receiving_positions, p = receiving
    positions[:, :receiving_count] = rng.choice(receiving_positions,
                                                (num_steps, receiving_count), p=p)
  for step_positions in positions:
    step_rows = retain_rows[step_positions]
    batch = {"retain_label": retain_data.labels[step_rows]}
    if prefix is None:
      batch["retain_image"] = retain_data.images[step_rows]
    else:
      batch["retain_prefix"] = prefix[step_positions]
    if target_margins is not None:
      batch["retain_target_margin"] = target_margins[step_positions]
    yield batch


def check_non_members(settings: ml_collections.ConfigDict, non_members: UnlearnData | None):
  """Raises naming the first setting that reads ``non_members`` when there are none."""
  readers = [f"{field}='non_member_margin'" for field in ("calibration", "forget_target")
             if settings[field] == "non_member_margin"]
  if settings.stand_in_unseen_match != "none":
    readers.append(f"stand_in_unseen_match={settings.stand_in_unseen_match!r}")
  if readers and (non_members is None or not len(non_members)):
    raise UnlearningInputError(
        f"config.megu.{readers[0]} needs non_members: unseen images of what is forgotten (the "
        "harness passes the training pool's unused images when the recipe trains on a subset, "
        "config.train_subset)")


class Guidance(NamedTuple):
  """What ``machine_guidance`` decides before any finetuning."""
  transition: np.ndarray               # [K, K] float64 T
  perturbing_labels: np.ndarray        # int32 [N_f]: ỹ of every forget sample
  retain_rows: np.ndarray              # int [R]: the rows of retain_data batches come from
  # The original model's activations of the forget images by name, when that pass was needed
  # (else empty): "features" [N_f, D], and the output of freeze_through when set.
  forget_activations: dict[str, np.ndarray]
  forget_targets: np.ndarray | None    # float32 [N_f, K] for forget_target="distribution"
  # float32 [N_f] for forget_target="non_member_margin" or "retained_head_margin": each image's
  # target margin.
  forget_target_margins: np.ndarray | None = None
  # float32 [R], aligned with retain_rows, for retain_margin_source="retained_head": each
  # retained image's margin under the stand-in, ν's target.
  retain_target_margins: np.ndarray | None = None
  # θ₀'s output of freeze_through for the retain rows (aligned with retain_rows), when set: the
  # finetuning's retain batches carry it instead of the images, and the stand-in trains on it.
  retain_prefix: np.ndarray | None = None


def machine_guidance(trained: train.Trained, forget_data: UnlearnData, retain_data: UnlearnData,
                     config: ml_collections.ConfigDict, key: jax.Array,
                     rng: np.random.Generator | None = None,
                     dp: parallel.DataParallel | None = None,
                     timings: dict | None = None,
                     non_members: UnlearnData | None = None) -> Guidance:
  """What MeGU decides before any finetuning (a :class:`Guidance`): T, the perturbing labels,
  the retain rows, and what the original model's pass over the forget images left for the steps.
  ``non_members`` (unseen images of the forgotten classes) is read by
  ``forget_target="non_member_margin"`` and ``stand_in_unseen_match`` alone.
  ``forget_target="retained_head_margin"`` trains its stand-in heads here (calibration.py), from
  a key of their own folded from ``key``.

  Public so that a report can show (e.g. plot) exactly the T that a run used. ``timings`` (if
  given) receives the ``compile_s`` of the forward pass and of the label draw, when this call
  compiles them.
  """
  settings = megu_settings(config)
  check_non_members(settings, non_members)
  dp = dp or parallel.DataParallel(config.get("parallel", "mesh"))
  rng = rng or np.random.default_rng(0)
  num_classes = num_classes_of(trained)
  retain_rows = np.arange(len(retain_data))
  if settings.retain_subset_size and settings.retain_subset_size < len(retain_data):
    retain_rows = np.sort(rng.choice(len(retain_data), settings.retain_subset_size,
                                     replace=False))
  need_prototypes = str(settings.transition) == "prototype"
  need_guidance = settings.label_guidance == "transition_x_model"
  features = feature_labels = forget_logits = None
  forget_activations = {}
  noise_first = settings.noise != "none" and settings.noise_schedule == "before"
  prefix = (settings.freeze_through,) if settings.freeze_through else ()
  margin_targets = settings.forget_target in ("non_member_margin", "retained_head_margin")
  if (need_prototypes or need_guidance or settings.align_weight > 0 or noise_first
      or settings.freeze_through or margin_targets):
    # One pass of the original model over the forget images (and, for the prototypes, a
    # class-balanced retain sample): far cheaper than scoring the whole training set.
    forget_out = train.predict(trained, forget_data.images, 1000, dp, timings, prefix)
    forget_logits = forget_out["logits"]
    forget_activations = {name: forget_out[name] for name in ("features",) + prefix}
    if need_prototypes:
      per_class = settings.prototype_samples_per_class
      prototype_rows = retain_rows[balanced_subset(rng, retain_data.labels[retain_rows],
                                                    per_class)]
      forget_rows = balanced_subset(rng, forget_data.labels, per_class)
      retain_features = train.predict(trained, retain_data.images[prototype_rows], 1000,
                                      dp, timings)["features"]
      features = np.concatenate([forget_out["features"][forget_rows], retain_features])
      feature_labels = np.concatenate([forget_data.labels[forget_rows],
                                       retain_data.labels[prototype_rows]])
  retain_prefix = None
  if settings.freeze_through:
    # One pass over the retain rows: each finetuning step then skips the frozen stages.
    retain_prefix = train.predict(trained, retain_data.images[retain_rows], 1000, dp, timings,
                                  prefix)[settings.freeze_through]
  T = transition_lib.build_transition(
      settings.transition, num_classes, temperature=settings.temperature, top_k=settings.top_k,
      features=features, feature_labels=feature_labels, superclass_of=settings.superclass_of)
  guidance = dict(original_logits=forget_logits if need_guidance else None,
                  guidance_temperature=settings.guidance_temperature,
                  own_class_weight=own_class_weight(settings, config),
                  own_class_after_guidance=bool(settings.own_class_after_guidance),
                  timings=timings)
  perturbing = draw_perturbing_labels(key, T, forget_data.labels, forget_data.indices,
                                      mode=settings.label_mode, **guidance)
  targets = target_margins = retain_target_margins = None
  if settings.forget_target == "distribution":
    targets = guided_distribution(T, forget_data.labels, **guidance)
  if settings.forget_target == "non_member_margin":
    non_member_logits = train.predict(trained, non_members.images, 1000, dp, timings)["logits"]
    target_margins = non_member_margin_targets(forget_logits, forget_data.labels,
                                               non_member_logits, non_members.labels)
  if settings.forget_target == "retained_head_margin":
    with timed_apart_from_compilation(timings, "stand_in_s"):  # the heads' training and scoring
      unseen = None
      if settings.stand_in_unseen_match != "none":
        unseen = (train.predict(trained, non_members.images, 1000, dp, timings,
                                prefix)[settings.freeze_through], non_members.labels)
      target_margins, retain_target_margins = _stand_in_targets(
          trained, settings, forget_data, forget_activations[settings.freeze_through],
          retain_data.labels[retain_rows], retain_prefix, jax.random.fold_in(key, 1), timings,
          unseen)
  return Guidance(T, perturbing, retain_rows, forget_activations, targets, target_margins,
                  retain_target_margins, retain_prefix)


def _stand_in_targets(trained, settings, forget_data, forget_prefix, retain_labels, retain_prefix,
                      key, timings, unseen=None):
  """The stand-in's margins on the forget images and, for ν's retained_head source, on the
  retain rows (else None): float32 targets of forget_target="retained_head_margin". ``unseen``
  (θ₀'s prefix outputs of unseen images of the forgotten classes, and their labels) is scored
  too, and the forget margins matched to its margins (``stand_in_unseen_match``)."""
  with_retain = settings.retain_margin_source == "retained_head"
  parts = [(forget_prefix, forget_data.labels)]
  if with_retain:
    parts.append((retain_prefix, retain_labels))
  if unseen is not None:
    parts.append(unseen)
  scored = calibration_lib.stand_in_margins(
      trained, settings, retain_prefix, retain_labels,
      np.concatenate([prefix for prefix, _ in parts]),
      np.concatenate([labels for _, labels in parts]),
      forget_data.images[:1], key, timings).astype(np.float32)
  forget_margins, rest = scored[:len(forget_data)], scored[len(forget_data):]
  retain_margins = rest[:len(retain_labels)] if with_retain else None
  if unseen is not None:
    forget_margins = matched_to_unseen(
        forget_margins, forget_data.labels, scored[-len(unseen[1]):], unseen[1],
        settings.stand_in_unseen_match, "config.megu.stand_in_unseen_match")
  return forget_margins, retain_margins


# --- the method ----------------------------------------------------------------------------------
@register("megu")
def megu(trained: train.Trained, forget_data: UnlearnData, retain_data: UnlearnData,
         config: ml_collections.ConfigDict, key: jax.Array, *,
         timings: dict | None = None, diagnostics: dict | None = None,
         non_members: UnlearnData | None = None) -> train.Trained:
  """Unlearns ``forget_data`` from ``trained`` with MeGU; settings in ``config.megu``.

  ``non_members``: images no model trained on, of the forgotten classes (sub-classes; for random
  forgetting, of the forgotten samples' classes); ``config.megu.calibration`` needs them and
  otherwise ignores them, and so do ``config.megu.forget_target="non_member_margin"`` and
  ``config.megu.stand_in_unseen_match``.

  ``timings`` (if given) receives, in seconds, ``transition_s`` (features, T, perturbing labels,
  and the stand-in's margin targets, whose part is also recorded as ``stand_in_s``),
  ``noise_s`` (the noise phase), ``finetune_s`` and ``compile_s`` (first call of each compiled
  step, of the guidance pass's forward and of the label draw, when this process compiles them).
  ``diagnostics`` (if given) receives ``transition`` (T), ``perturbing_labels`` and the last
  ``noise_metrics`` / ``finetune_metrics``.
  """
  timings = {} if timings is None else timings
  dp = parallel.DataParallel(config.get("parallel", "mesh"))
  settings = megu_settings(config)
  validate_settings(settings, trained, dp.num_devices)
  check_data(trained, forget_data, retain_data)
  calibrate = settings.calibration != "none"
  check_non_members(settings, non_members)
  scenario = config.get("scenario")
  if settings.forget_target == "non_member_margin" and scenario in ("full_class", "sub_class"):
    raise UnlearningInputError(
        f"config.megu.forget_target='non_member_margin' is for random forgetting, not "
        f"{scenario}: the original learned the forgotten (sub-)class and gives its unseen images "
        "the margins of its training images, so they are no target; use 'label' or "
        "'distribution'")
  num_classes = num_classes_of(trained)
  per_sample = noise_rows_per_sample(settings, config)
  label_key, batch_key, step_key = jax.random.split(key, 3)
  calibration_key = jax.random.fold_in(key, 3)  # apart from the others: they stay as they were
  rng = np.random.default_rng(int(jax.random.randint(batch_key, (), 0, np.iinfo(np.int32).max)))

  # 1-2. Transition matrix and perturbing labels: the "machine guidance", computed once.
  with timed_apart_from_compilation(timings, "transition_s"):
    (T, perturbing, retain_rows, forget_activations, forget_targets, forget_target_margins,
     retain_target_margins, retain_prefix) = machine_guidance(
         trained, forget_data, retain_data, config, label_key, rng, dp, timings, non_members)
  if diagnostics is not None:
    diagnostics.update(transition=T, perturbing_labels=perturbing)

  # 3-4. Noise pair and finetuning, in pure jitted steps.
  steps = settings.steps
  if settings.epochs > 0:
    steps = math.ceil(settings.epochs * len(forget_data) / settings.forget_batch_size)
  # With the stopping rule the schedule spans the most steps it may take.
  total_steps = settings.calibration_max_steps if calibrate else steps
  tx = make_finetuning_optimizer(settings, total_steps)
  negative_tx, positive_tx = noise_optimizers(settings)
  activation_shape = _activation_shape(trained, settings.activation, forget_data.images[:1])
  noise_state = noise_lib.init_noise(activation_shape,
                                     len(forget_data) if per_sample else num_classes,
                                     num_classes, negative_tx, positive_tx)
  # Host copies: the steps donate their state, and θ and θ₀ must be distinct buffers that are
  # not the caller's (``trained`` stays usable after the call).
  state = MeguState(step=jnp.zeros((), jnp.int32), params=host_copy(trained.state.params),
                    opt_state=tx.init(host_copy(trained.state.params)), noise=noise_state,
                    original_params=host_copy(trained.state.params),
                    batch_stats=host_copy(trained.state.batch_stats))
  state = dp.put_replicated(state)
  noise_key, finetune_key = jax.random.split(step_key)

  # What the guidance pass already computed per forget image: g_θ₀(x_f) at the noisy activation
  # (the noise phase's input, the alignment target) and the frozen prefix's output.
  original_activation = forget_activations.get(settings.activation)
  has_original = original_activation is not None
  finetune_per_row = {}
  if has_original and settings.align_weight > 0:
    finetune_per_row["forget_original_activation"] = original_activation
  if settings.freeze_through in forget_activations:
    finetune_per_row["forget_prefix"] = forget_activations[settings.freeze_through]
  if forget_targets is not None:
    finetune_per_row["forget_target"] = forget_targets
  if forget_target_margins is not None:
    finetune_per_row["forget_target_margin"] = forget_target_margins

  timings.setdefault("noise_s", 0.0)
  if settings.noise != "none" and settings.noise_schedule == "before" and settings.noise_steps:
    noise_step = dp.compile_step(make_noise_step(trained.model, settings, mean=trained.mean,
                                                 std=trained.std, per_sample=per_sample))
    batches = (dp.put_batch(b) for b in _forget_batches(
        rng, forget_data, perturbing, settings.forget_batch_size, settings.noise_steps,
        {"forget_original_activation": original_activation} if has_original else None,
        with_images=not has_original))
    state, noise_metrics = run_phase(noise_step, state, batches, noise_key, "noise_s", timings)
    if diagnostics is not None:
      diagnostics["noise_metrics"] = noise_metrics

  receiving_count = round(settings.receiving_retain_fraction * settings.retain_batch_size)
  receiving = (receiving_retain_rows(retain_data.labels[retain_rows], perturbing, num_classes)
               if receiving_count else None)
  finetune_step = dp.compile_step(make_finetune_step(
      trained.model, tx, settings, mean=trained.mean, std=trained.std, per_sample=per_sample,
      update_noise=settings.noise != "none" and settings.noise_schedule == "alternating"))
  batches = (dp.put_batch({**f, **r}) for f, r in zip(
      _forget_batches(rng, forget_data, perturbing, settings.forget_batch_size, total_steps,
                      finetune_per_row, with_images="forget_prefix" not in finetune_per_row),
      _retain_batches(rng, retain_rows, retain_data, settings.retain_batch_size, total_steps,
                      receiving, receiving_count, retain_target_margins, retain_prefix)))
  if calibrate:
    gap, first_check = calibration_lib.stopping_gap(
        trained, settings, dp, forget_data, retain_data, retain_rows,
        forget_activations.get(settings.freeze_through), non_members, steps, calibration_key,
        timings)
    state, last_metrics = calibration_lib.finetune_until(
        settings, dp, finetune_step, state, batches, finetune_key, first_check, total_steps,
        gap, timings)
  else:
    state, last_metrics = run_phase(finetune_step, state, batches, finetune_key, "finetune_s",
                                     timings)
  if diagnostics is not None:
    diagnostics["finetune_metrics"] = last_metrics
  if last_metrics is not None and not np.isfinite(float(last_metrics["loss"])):
    raise train.NonFiniteLossError(
        f"megu: the finetuning loss is {float(last_metrics['loss'])} after {steps} steps; "
        f"lower config.megu.learning_rate (now {settings.learning_rate}) or set "
        "config.megu.max_grad_norm")

  state = dp.get_replicated(state)
  return dataclasses.replace(trained, state=trained.state.replace(params=state.params))


def _activation_shape(trained: train.Trained, name: str, images: np.ndarray) -> tuple[int, ...]:
  """The per-example shape of activation ``name``, from an abstract evaluation (no compute)."""
  variables = {"params": trained.state.params, "batch_stats": trained.state.batch_stats}
  x = jax.ShapeDtypeStruct((1,) + images.shape[1:], jnp.float32)
  _, activations = jax.eval_shape(lambda v, x: trained.model.apply(v, x, train=False),
                                  variables, x)
  return tuple(activations[name].shape[1:])
