"""NegGrad+ (Kurmanji et al., SCRUB paper, NeurIPS 2023): ascend on D_f while descending on D_r.

Each step sees one forget batch and one retain batch and minimises

    L(θ) = β · CE(f_θ(x_r), y_r) − (1 − β) · mean_i min(CE(f_θ(x_f,i), y_f,i), c · log K),

i.e. gradient *ascent* on the forget loss held in check by descent on the retain loss. Plain
NegGrad (β = 0) destroys the model; the retain term is the "+".

The cap c · log K (our addition, ``forget_loss_cap`` c = 1: chance level) stops pushing a forget
sample once the model gives its class no more than a uniform guess would. Without it the ascent
is unbounded, and on digits it measured unstable: with β = 0.95, lr 0.01 the well-trained model
kept Dr 94.4 but a 2-epoch model collapsed to Dr 7.7 (forget CE 4.7 and rising); β = 0.99 for 3
epochs drove the forget CE to 2333 and Dr to 51. With the cap (defaults otherwise) the 2-epoch
model keeps Dr 93.5 (its original value) with Df 0.0, and the 6-epoch model Dr 96.6, Df 59.5 in
its 40 steps (Df 0.0, Dr 98.1 with 3 epochs). ``forget_loss_cap = 0`` restores the classic,
unbounded NegGrad+.

docs/method.md gives no hyperparameters for NegGrad+ (the SSD benchmark does not run it); ours, stated
as our choice: β = 0.95, SGD lr 0.01 with momentum 0.9 and weight decay 5e-4, one pass over D_r
(forget batches cycle through D_f alongside), batches of the recipe's ``config.batch_size``.
The ascent is unbounded: longer runs or larger (1 − β) drive the forget loss up without limit
(over-unlearning, Df below Retrain's and a collapsed MIA), which is why the cap is on.

BatchNorm runs in inference mode (statistics frozen, scale and bias trained), as in MeGU: half of
every batch is forget data, often a single class, and ascending on it through the running
statistics would shift the normalisation of every class. No augmentation.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from megu_jax import parallel
from megu_jax import train
from megu_jax.unlearning import register
from megu_jax.unlearning.base import (UnlearnData, UnlearningInputError, check_data, check_finite,
                                      check_positive, finetuning_settings,
                                      make_finetuning_optimizer, num_classes_of, num_steps,
                                      replicated_train_state, row_stream, run_phase,
                                      seed_from_key, with_params)


def default_neggrad_plus_config() -> ml_collections.ConfigDict:
  """Our NegGrad+ setting (docs/method.md gives none; see the module docstring).

  Attach as ``config.neggrad_plus``. ``batch_size`` 0 means the recipe's ``config.batch_size``,
  used for both the forget and the retain batch of a step.
  """
  c = ml_collections.ConfigDict()
  c.retain_weight = 0.95    # β; the forget loss is ascended with weight 1 − β
  c.forget_loss_cap = 1.0   # c: per-sample forget CE ascended only up to c·log K; 0 = unbounded
  c.epochs = 1.0            # passes over D_r (forget batches cycle through D_f meanwhile)
  c.optimizer = "sgd"       # sgd | adam
  c.learning_rate = 0.01
  c.momentum = 0.9          # sgd only
  c.weight_decay = 5e-4
  c.schedule = "constant"   # constant | cosine
  c.batch_size = 0          # 0 = config.batch_size
  return c


def make_neggrad_plus_step(model, tx: optax.GradientTransformation, *, mean, std,
                           retain_weight: float, forget_loss_cap: float = 0.0
                           ) -> parallel.StepFactory:
  """Factory of ``neggrad_plus_step(state, batch, key) -> (state, metrics)``.

  ``state`` is a ``train.TrainState`` (its BatchNorm statistics stay as they are). ``batch``:
  ``forget_image`` / ``retain_image`` uint8 [B, H, W, C], ``forget_label`` / ``retain_label``
  int32 [B]. ``forget_loss_cap`` > 0 caps each forget sample's ascended CE at that value (in
  nats); 0 leaves it unbounded. Metrics: ``loss``, ``forget_loss`` (uncapped mean CE),
  ``retain_loss``, ``forget_acc``, ``retain_acc``.
  """

  def factory(axis_name: str | None):

    def neggrad_plus_step(state: train.TrainState, batch: dict, key: jax.Array):
      del key  # deterministic: no augmentation, no dropout
      forget_images = train.prepare_images({"image": batch["forget_image"]}, None, mean, std)
      retain_images = train.prepare_images({"image": batch["retain_image"]}, None, mean, std)

      def loss_fn(params):
        forget_logits, _, _ = train.apply_model(model, params, state.batch_stats, forget_images,
                                                train=False)
        retain_logits, _, _ = train.apply_model(model, params, state.batch_stats, retain_images,
                                                train=False)
        forget_losses = optax.softmax_cross_entropy_with_integer_labels(forget_logits,
                                                                        batch["forget_label"])
        # The cap zeroes the ascent gradient of samples already at or past it.
        ascended = (jnp.minimum(forget_losses, forget_loss_cap) if forget_loss_cap > 0
                    else forget_losses)
        forget_loss = jnp.mean(forget_losses)
        retain_loss = train.cross_entropy(retain_logits, batch["retain_label"])
        loss = retain_weight * retain_loss - (1.0 - retain_weight) * jnp.mean(ascended)
        return loss, {
            "forget_loss": forget_loss, "retain_loss": retain_loss,
            "forget_acc": jnp.mean(jnp.argmax(forget_logits, -1) == batch["forget_label"]),
            "retain_acc": jnp.mean(jnp.argmax(retain_logits, -1) == batch["retain_label"])}

      (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
      grads = parallel.cross_device_mean(grads, axis_name)
      metrics = parallel.cross_device_mean({"loss": loss, **terms}, axis_name)
      return train.apply_gradients(state, grads, tx), metrics
    return neggrad_plus_step
  return factory


def paired_batches(rng: np.random.Generator, forget_data: UnlearnData,
                   retain_data: UnlearnData, batch_size: int, steps: int):
  """``steps`` batches of ``batch_size`` forget and ``batch_size`` retain examples.

  Each stream runs through successive shuffles of its set, so the small forget set repeats while
  the retain set is walked through.
  """
  forget_rows = row_stream(rng, len(forget_data), batch_size * steps).reshape(steps, batch_size)
  retain_rows = row_stream(rng, len(retain_data), batch_size * steps).reshape(steps, batch_size)
  for f, r in zip(forget_rows, retain_rows):
    yield {"forget_image": forget_data.images[f], "forget_label": forget_data.labels[f],
           "retain_image": retain_data.images[r], "retain_label": retain_data.labels[r]}


@register("neggrad_plus")
def neggrad_plus(trained: train.Trained, forget_data: UnlearnData, retain_data: UnlearnData,
                 config: ml_collections.ConfigDict, key: jax.Array, *,
                 timings: dict | None = None, diagnostics: dict | None = None) -> train.Trained:
  """NegGrad+; settings in ``config.neggrad_plus``.

  ``timings`` receives ``compile_s`` (first step) and ``finetune_s``; ``diagnostics`` (if given)
  the last step's metrics as ``finetune_metrics``.
  """
  timings = {} if timings is None else timings
  dp = parallel.DataParallel(config.get("parallel", "mesh"))
  settings, batch_size = finetuning_settings(config, "neggrad_plus",
                                             default_neggrad_plus_config(), dp.num_devices)
  beta = settings.retain_weight
  if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0 <= beta <= 1:
    raise UnlearningInputError(
        f"config.neggrad_plus.retain_weight={beta!r} must be in [0, 1] (β of β·CE_r − (1−β)·CE_f)")
  cap = settings.forget_loss_cap
  check_positive("config.neggrad_plus.forget_loss_cap", cap, allow_zero=True)
  check_data(trained, forget_data, retain_data)
  if len(retain_data) < batch_size:
    raise UnlearningInputError(
        f"batch size {batch_size} exceeds the {len(retain_data)} retain examples")

  steps = num_steps(settings.epochs, len(retain_data), batch_size)
  tx = make_finetuning_optimizer(settings, steps)
  step_fn = dp.compile_step(make_neggrad_plus_step(trained.model, tx, mean=trained.mean,
                                                   std=trained.std, retain_weight=float(beta),
                                                   forget_loss_cap=float(cap) * math.log(
                                                       num_classes_of(trained))))
  state = replicated_train_state(trained, tx, dp)
  order_key, step_key = jax.random.split(key)
  rng = np.random.default_rng(seed_from_key(order_key))
  batches = (dp.put_batch(b) for b in paired_batches(rng, forget_data, retain_data, batch_size,
                                                     steps))
  state, last_metrics = run_phase(step_fn, state, batches, step_key, "finetune_s", timings)
  check_finite(last_metrics, "neggrad_plus")
  if diagnostics is not None:
    diagnostics["finetune_metrics"] = last_metrics
  return with_params(trained, dp.get_replicated(state).params)
