"""Selective Synaptic Dampening (SSD, Foster et al., AAAI 2024): retraining-free, one shot.

docs/method.md §3. The diagonal of the Fisher information, estimated as

    I = mean over batches b of (∇θ CE_b)²,   CE_b = the batch-mean cross-entropy,

is computed once on the forget set (I_f) and once on the whole training set D = D_f ∪ D_r (I_D).
A parameter far more important to the forget set than to the data overall, I_f > α·I_D, is
*selected* and dampened: θ ← θ · min(λ·I_D / I_f, 1). Every other parameter stays exactly as it
was. α = 10 (selection weighting) and λ = 1 (dampening constant) are SSD's.

The importance pass is a pure, jitted, data-parallel step that adds one batch's squared gradient
to a running sum; the last, partial batch is padded and masked, so each batch (the partial one
too, as a PyTorch DataLoader yields it) contributes the gradient of its own mean loss. BatchNorm
runs in inference mode, and it has no parameters to select among its running statistics.
"""
from __future__ import annotations

import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from megu_jax import parallel
from megu_jax import train
from megu_jax.unlearning import register
from megu_jax.unlearning.base import (UnlearnData, check_data, check_positive, frozen_logits,
                                      host_copy, method_settings, resolve_batch_size,
                                      run_phase_once_compiled, seed_from_key, with_params)


def default_ssd_config() -> ml_collections.ConfigDict:
  """SSD's hyperparameters (tuned by its authors for ResNet-18 on CIFAR); ``config.ssd`` overrides.

  On the small Fashion-MNIST CNN α = 10 selects about half of the parameters and collapses the
  model; that config sets α = 100 (docs/tuning.md). The default stays SSD's for the CIFAR
  protocol.
  """
  c = ml_collections.ConfigDict()
  c.selection_weighting = 10.0  # α: select θ_i when I_f,i > α · I_D,i
  c.dampening_constant = 1.0    # λ: scale a selected θ_i by min(λ · I_D,i / I_f,i, 1)
  c.batch_size = 0              # importance batches; 0 = the experiment's config.batch_size
  return c


@flax.struct.dataclass
class ImportanceState:
  """The running sum of squared batch gradients, and the (frozen) model it is taken of."""
  squared_gradient_sum: Any     # same tree as params
  num_batches: jax.Array        # float32 scalar
  params: Any
  batch_stats: Any


def make_importance_step(model: nn.Module, *, mean, std) -> parallel.StepFactory:
  """Factory of ``importance_step(state, batch, key) -> (state, metrics)``.

  ``batch``: ``image`` uint8 ``[B, H, W, C]``, ``label`` int32 ``[B]``, ``valid`` bool ``[B]``
  (False on the padding of a last, partial batch). Adds (∇θ mean CE over the valid examples)².
  """

  def factory(axis_name: str | None):

    def importance_step(state: ImportanceState, batch: dict, key: jax.Array):
      del key
      images = train.prepare_images({"image": batch["image"]}, None, mean, std)
      valid = batch["valid"].astype(jnp.float32)
      # The batch mean runs over the *global* batch: under pmap each device divides its sum by
      # the global count and the gradients are summed, so the square is of the same gradient
      # that one device would compute (the square does not commute with averaging).
      count = valid.sum() if axis_name is None else jax.lax.psum(valid.sum(), axis_name)

      def loss_fn(params):
        logits = frozen_logits(model, params, state.batch_stats, images)
        per_example = -jnp.take_along_axis(jax.nn.log_softmax(logits), batch["label"][:, None],
                                           axis=-1)[:, 0]
        return jnp.sum(valid * per_example) / count

      loss, grads = jax.value_and_grad(loss_fn)(state.params)
      if axis_name is not None:
        grads, loss = jax.lax.psum((grads, loss), axis_name)
      new_state = state.replace(
          squared_gradient_sum=jax.tree.map(lambda s, g: s + jnp.square(g),
                                            state.squared_gradient_sum, grads),
          num_batches=state.num_batches + 1)
      return new_state, {"loss": loss}
    return importance_step
  return factory


def _batches_in_order(data: UnlearnData, order: np.ndarray, batch_size: int):
  """``data`` in the row order ``order``, in batches; the last one padded with ``valid`` False."""
  for begin in range(0, len(order), batch_size):
    rows = order[begin:begin + batch_size]
    valid = np.arange(batch_size) < len(rows)
    rows = np.concatenate([rows, np.zeros(batch_size - len(rows), rows.dtype)])  # masked out
    yield {"image": data.images[rows], "label": data.labels[rows], "valid": valid}


def importances(trained: train.Trained, data: UnlearnData, batch_size: int,
                dp: parallel.DataParallel | None = None, *, order: np.ndarray | None = None,
                timings: dict | None = None, timings_key: str = "importance_s",
                step_fn=None, compiled: set | None = None) -> Any:
  """I = mean over batches of (∇θ batch-mean CE)², batches taken from ``data`` in ``order``.

  ``order`` (default: as stored) matters: the square is of a *batch* gradient, so a batch of one
  class alone counts that class's gradient undiluted. SSD's loaders shuffle; so does :func:`ssd`.
  ``step_fn`` (default: compiled here) and ``compiled`` let several passes share one compiled
  step and count its compilation once (see ``run_phase_once_compiled``).

  Returns a tree shaped like ``trained.state.params`` (NumPy float32).
  """
  order = np.arange(len(data)) if order is None else np.asarray(order)
  dp = dp or parallel.DataParallel(trained.config.get("parallel", "mesh"))
  timings = {} if timings is None else timings
  compiled = set() if compiled is None else compiled
  step_fn = step_fn or dp.compile_step(make_importance_step(trained.model, mean=trained.mean,
                                                            std=trained.std))
  params = host_copy(trained.state.params)
  state = dp.put_replicated(ImportanceState(
      squared_gradient_sum=jax.tree.map(np.zeros_like, params),
      num_batches=np.zeros((), np.float32), params=params,
      batch_stats=host_copy(trained.state.batch_stats)))
  batches = (dp.put_batch(b) for b in _batches_in_order(data, order, batch_size))
  state, _ = run_phase_once_compiled(step_fn, state, batches, jax.random.key(0), timings_key,
                                     timings, compiled)
  state = jax.device_get(dp.get_replicated(state))
  return jax.tree.map(lambda s: np.asarray(s / state.num_batches, np.float32),
                      state.squared_gradient_sum)


@jax.jit
def dampen(params: Any, forget_importance: Any, full_importance: Any,
           selection_weighting: float, dampening_constant: float) -> Any:
  """θ · min(λ·I_D/I_f, 1) where I_f > α·I_D, θ unchanged elsewhere (trees shaped like θ)."""

  def dampen_leaf(theta, i_f, i_d):
    selected = i_f > selection_weighting * i_d
    # On selected entries I_f > α·I_D >= 0, so the division is safe; elsewhere it is not used.
    factor = jnp.minimum(dampening_constant * i_d / jnp.where(selected, i_f, 1.0), 1.0)
    return jnp.where(selected, theta * factor, theta)

  return jax.tree.map(dampen_leaf, params, forget_importance, full_importance)


@register("ssd")
def ssd(trained: train.Trained, forget_data: UnlearnData, retain_data: UnlearnData,
        config: ml_collections.ConfigDict, key: jax.Array, *,
        timings: dict | None = None, diagnostics: dict | None = None) -> train.Trained:
  """Unlearns ``forget_data`` by Selective Synaptic Dampening; settings in ``config.ssd``.

  ``key`` shuffles the batches of both importance passes. ``timings`` (if given) receives
  ``importance_s`` (both passes), ``dampen_s`` and ``compile_s``, in seconds; ``diagnostics``
  (if given) ``forget_importance`` and ``full_importance`` (I_f and I_D, trees shaped like θ)
  and ``selected_fraction``.
  """
  timings = {} if timings is None else timings
  dp = parallel.DataParallel(config.get("parallel", "mesh"))
  settings = method_settings(config, "ssd", default_ssd_config())
  check_positive("config.ssd.selection_weighting", settings.selection_weighting, allow_zero=True)
  check_positive("config.ssd.dampening_constant", settings.dampening_constant, allow_zero=True)
  batch_size = resolve_batch_size("config.ssd.batch_size", settings.batch_size, config,
                                  dp.num_devices)
  check_data(trained, forget_data, retain_data)

  rng = np.random.default_rng(seed_from_key(key))
  # One compiled step for both passes; its first call is the one compilation.
  shared = dict(step_fn=dp.compile_step(make_importance_step(trained.model, mean=trained.mean,
                                                             std=trained.std)),
                compiled=set(), timings=timings)
  forget_importance = importances(trained, forget_data, batch_size, dp,
                                  order=rng.permutation(len(forget_data)), **shared)
  full_data = concatenate(forget_data, retain_data)
  full_importance = importances(trained, full_data, batch_size, dp,
                                order=rng.permutation(len(full_data)), **shared)
  args = (trained.state.params, forget_importance, full_importance,
          float(settings.selection_weighting), float(settings.dampening_constant))
  start = time.perf_counter()
  compiled_dampen = dampen.lower(*args).compile()
  timings["compile_s"] = timings.get("compile_s", 0.0) + time.perf_counter() - start
  start = time.perf_counter()
  params = jax.block_until_ready(compiled_dampen(*args))
  timings["dampen_s"] = time.perf_counter() - start
  if diagnostics is not None:
    diagnostics.update(forget_importance=forget_importance, full_importance=full_importance,
                       selected_fraction=selected_fraction(forget_importance, full_importance,
                                                           settings.selection_weighting))
  return with_params(trained, params)


def concatenate(first: UnlearnData, second: UnlearnData) -> UnlearnData:
  """The examples of both, ``first``'s before ``second``'s (D = D_f ∪ D_r)."""
  return UnlearnData(images=np.concatenate([first.images, second.images]),
                     labels=np.concatenate([first.labels, second.labels]),
                     indices=np.concatenate([first.indices, second.indices]))


def selected_fraction(forget_importance: Any, full_importance: Any,
                      selection_weighting: float) -> float:
  """The fraction of all parameters that SSD dampens (for reports)."""
  selected = [np.sum(i_f > selection_weighting * i_d) for i_f, i_d in zip(
      jax.tree.leaves(forget_importance), jax.tree.leaves(full_importance))]
  return float(sum(selected) / max(1, sum(x.size for x in jax.tree.leaves(full_importance))))

