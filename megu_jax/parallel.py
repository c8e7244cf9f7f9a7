"""Running one pure step on many devices: a 1-D device mesh by default, ``jax.pmap`` as an option.

A step is a pure function ``step(state, batch, key) -> (state, metrics)`` built by a factory that
takes ``axis_name``. On the mesh the factory gets ``axis_name=None``: the step is written for the
global batch and ``jax.jit`` partitions it (batch sharded over ``'data'``, state replicated), so it is
the single-device program by construction. Under ``pmap`` the step sees only its device's slice and
gets ``axis_name='data'`` so that it can average gradients (and models synchronise BatchNorm
statistics) across devices, which makes it compute the same thing as one device.

Batches are assembled per process: each process hands over only its slice of the global batch,
so a multi-host run through ``jax.distributed`` needs no redesign.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PARALLEL_MODES = ("mesh", "pmap")
AXIS = "data"
StepFactory = Callable[[str | None], Callable]


def cross_device_mean(tree: Any, axis_name: str | None) -> Any:
  """``lax.pmean`` under pmap; the identity on the mesh, where jit already sees the global batch."""
  if axis_name is None:
    return tree
  return jax.lax.pmean(tree, axis_name)


@dataclasses.dataclass(frozen=True)
class DataParallel:
  """Places state and batches on devices and compiles steps for one parallel mode."""
  mode: str = "mesh"
  devices: tuple = ()

  def __post_init__(self):
    if self.mode not in PARALLEL_MODES:
      raise ValueError(f"parallel mode {self.mode!r} is not one of {PARALLEL_MODES}")
    if not self.devices:
      object.__setattr__(self, "devices", tuple(jax.devices()))

  @property
  def num_devices(self) -> int:
    return len(self.devices)

  @property
  def axis_name(self) -> str | None:
    """What a step factory receives: the name to reduce over, or None when jit does it."""
    return AXIS if self.mode == "pmap" else None

  @property
  def mesh(self) -> Mesh:
    return Mesh(np.asarray(self.devices), (AXIS,))

  def check_batch_size(self, batch_size: int, field: str = "batch_size") -> None:
    if batch_size <= 0 or batch_size % self.num_devices:
      raise ValueError(f"config.{field}={batch_size} must be a positive multiple of the device "
                       f"count ({self.num_devices})")

  # --- placement -------------------------------------------------------------------------------
  def put_replicated(self, tree: Any) -> Any:
    """Host or device pytree -> the same values on every device."""
    if self.mode == "mesh":
      return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))
    # pmap's layout: a leading axis of one copy per device, that axis sharded over the devices.
    n = self.num_devices
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)),
                           jax.device_get(tree))
    return jax.device_put(stacked, NamedSharding(self.mesh, PartitionSpec(AXIS)))

  def get_replicated(self, tree: Any) -> Any:
    """Inverse of :meth:`put_replicated`: one copy, as device arrays on the first device."""
    if self.mode == "pmap":
      tree = jax.tree.map(lambda x: x[0], tree)
    return jax.device_put(tree, self.devices[0])

  def put_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's slice of the global batch -> arrays sharded over the batch axis."""
    if self.mode == "mesh":
      sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
      return jax.tree.map(
          lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
    # pmap's layout: [devices, per-device batch, ...], the leading axis sharded over devices.
    sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
    n = sum(d.process_index == jax.process_index() for d in self.devices)

    def split(x):
      x = np.asarray(x)
      return jax.make_array_from_process_local_data(
          sharding, x.reshape((n, x.shape[0] // n) + x.shape[1:]))
    return jax.tree.map(split, local_batch)

  # --- compilation -----------------------------------------------------------------------------
  def compile_step(self, step_factory: StepFactory, donate_state: bool = True) -> Callable:
    """``step(state, batch, key) -> (state, metrics)``, state donated, metrics replicated."""
    step = step_factory(self.axis_name)
    donate = (0,) if donate_state else ()
    if self.mode == "mesh":
      replicated = NamedSharding(self.mesh, PartitionSpec())
      batch_sharded = NamedSharding(self.mesh, PartitionSpec(AXIS))
      return jax.jit(step, in_shardings=(replicated, batch_sharded, replicated),
                     out_shardings=(replicated, replicated), donate_argnums=donate)
    compiled = jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=donate,
                        devices=self.devices)

    def run(state, batch, key):
      state, metrics = compiled(state, batch, key)
      # Metrics were reduced across devices inside the step: every replica holds the same value.
      return state, jax.tree.map(lambda x: x[0], metrics)
    return run

  def compile_eval(self, eval_factory: StepFactory) -> Callable:
    """``eval(state, batch) -> per-example outputs`` with the batch axis first, not donated."""
    fn = eval_factory(self.axis_name)
    if self.mode == "mesh":
      replicated = NamedSharding(self.mesh, PartitionSpec())
      batch_sharded = NamedSharding(self.mesh, PartitionSpec(AXIS))
      return jax.jit(fn, in_shardings=(replicated, batch_sharded), out_shardings=batch_sharded)
    compiled = jax.pmap(fn, axis_name=AXIS, devices=self.devices)

    def run(state, batch):
      out = compiled(state, batch)
      return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)
    return run


def fold_in_step(key: jax.Array, step: int) -> jax.Array:
  """The key of one step, so that a resumed run draws exactly what an uninterrupted one would."""
  return jax.random.fold_in(key, jnp.uint32(step))
