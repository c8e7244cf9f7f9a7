"""Running one pure step on many devices: a 1-D device mesh by default, ``jax.pmap`` as an option.

A step is a pure function ``step(state, batch, key) -> (state, metrics)`` built by a factory that
takes ``axis_name``. On the mesh the factory gets ``axis_name=None``: the step is written for the
global batch and ``jax.jit`` partitions it (batch sharded over ``'data'``, state replicated), so it is
the single-device program by construction. Under ``pmap`` the step sees only its device's slice and
gets ``axis_name='data'`` so that it can average gradients (and models synchronise BatchNorm
statistics) across devices, which makes it compute the same thing as one device.

Several processes (one per host, :mod:`megu_jax.distributed`) run the same program over the
global device list, ordered by process, so process p owns one block of rows of every global batch
(:meth:`DataParallel.process_rows`): :meth:`DataParallel.put_batch` takes the global batch that
every process holds and transfers only that block, :meth:`DataParallel.put_process_batch` the
block a process assembled alone (``train.local_batch``). Evaluation outputs come back sharded
over the processes; ``train.predict`` gathers them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from megu_jax import distributed

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
      devices = jax.devices()
      if distributed.is_multi_process():
        # Process p's devices form the p-th block of the mesh, so its rows of a batch are the
        # p-th block too (what train.local_batch slices).
        devices = sorted(devices, key=lambda d: (d.process_index, d.id))
      object.__setattr__(self, "devices", tuple(devices))

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

  @property
  def home_device(self):
    """Where :meth:`get_replicated` puts its copy: the first of this process's devices."""
    return next(d for d in self.devices if d.process_index == jax.process_index())

  def process_rows(self, global_batch_size: int) -> slice:
    """The rows of a global batch this process feeds: all of them in a single process."""
    return _process_rows(self, global_batch_size)

  def _find_process_rows(self, global_batch_size: int) -> slice:
    sharding = NamedSharding(self.mesh, PartitionSpec(AXIS))
    slices = sorted((index[0].start or 0, index[0].stop or global_batch_size) for index in
                    sharding.addressable_devices_indices_map((global_batch_size,)).values())
    rows = slice(slices[0][0], slices[-1][1])
    # train.local_batch and the gathering of pmap's outputs take process p's rows to be block p.
    per_process = global_batch_size // jax.process_count()
    if (any(stop != start for (_, stop), (start, _) in zip(slices, slices[1:]))
        or rows != slice(jax.process_index() * per_process,
                         (jax.process_index() + 1) * per_process)):
      raise ValueError(f"process {jax.process_index()}'s devices hold rows {slices} of a batch of "
                       f"{global_batch_size}, not block {jax.process_index()}: list the devices "
                       "by process (DataParallel's default)")
    return rows

  def check_batch_size(self, batch_size: int, field: str = "batch_size") -> None:
    if batch_size <= 0 or batch_size % self.num_devices:
      raise ValueError(f"config.{field}={batch_size} must be a positive multiple of the device "
                       f"count ({self.num_devices})")

  # --- placement -------------------------------------------------------------------------------
  def put_replicated(self, tree: Any) -> Any:
    """Host or device pytree -> the same values on every device."""
    distributed.note_progress()
    if self.mode == "mesh":
      if distributed.is_multi_process():
        # Every process holds the same values; JAX places host arrays (not arrays already on one
        # of this process's devices) on the other processes' devices by each placing its own.
        tree = jax.device_get(tree)
      return jax.device_put(tree, NamedSharding(self.mesh, PartitionSpec()))
    # pmap's layout: a leading axis of one copy per device, that axis sharded over the devices.
    n = self.num_devices
    stacked = jax.tree.map(lambda x: np.broadcast_to(np.asarray(x), (n,) + np.shape(x)),
                           jax.device_get(tree))
    return jax.device_put(stacked, NamedSharding(self.mesh, PartitionSpec(AXIS)))

  def get_replicated(self, tree: Any) -> Any:
    """Inverse of :meth:`put_replicated`: one copy, as device arrays on this process's first
    device (the first device, in a single process)."""
    distributed.note_progress()
    if not distributed.is_multi_process():
      if self.mode == "pmap":
        tree = jax.tree.map(lambda x: x[0], tree)
      return jax.device_put(tree, self.devices[0])
    # Every process holds copies on its own devices only: read the first local one. (Under pmap
    # its shard is [1, ...], of the global array put_replicated made or of a step's local output.)
    def first_local_copy(x):
      if not isinstance(x, jax.Array):
        return x[0] if self.mode == "pmap" else x
      copy = x.addressable_shards[0].data
      return copy[0] if self.mode == "pmap" else copy
    return jax.device_put(jax.tree.map(first_local_copy, tree), self.home_device)

  def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """The global batch, as every process holds it -> arrays sharded over the batch axis.

    Each process transfers only its rows (:meth:`process_rows`): in a single process, all.
    Leaves may differ in batch size (MeGU's forget and retain halves); each is split alone.
    """
    if distributed.is_multi_process():
      batch = jax.tree.map(lambda x: np.asarray(x)[self.process_rows(len(x))], batch)
    return self.put_process_batch(batch)

  def put_process_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of the global batch (:meth:`process_rows`) -> arrays sharded over
    the batch axis. In a single process, the whole batch."""
    distributed.note_progress()
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
      return counted(jax.jit(step, in_shardings=(replicated, batch_sharded, replicated),
                             out_shardings=(replicated, replicated), donate_argnums=donate))
    compiled = jax.pmap(step, axis_name=AXIS, in_axes=(0, 0, None), donate_argnums=donate,
                        devices=self.devices)

    def run(state, batch, key):
      state, metrics = compiled(state, batch, key)
      # Metrics were reduced across devices inside the step: every replica holds the same value.
      # (With several processes, pmap's outputs are this process's devices' only.)
      return state, jax.tree.map(lambda x: x[0], metrics)
    return counted(run)

  def compile_eval(self, eval_factory: StepFactory) -> Callable:
    """``eval(state, batch) -> per-example outputs`` with the batch axis first, not donated."""
    fn = eval_factory(self.axis_name)
    if self.mode == "mesh":
      replicated = NamedSharding(self.mesh, PartitionSpec())
      batch_sharded = NamedSharding(self.mesh, PartitionSpec(AXIS))
      return counted(jax.jit(fn, in_shardings=(replicated, batch_sharded),
                             out_shardings=batch_sharded))
    compiled = jax.pmap(fn, axis_name=AXIS, devices=self.devices)

    def run(state, batch):
      out = compiled(state, batch)
      # With several processes these are this process's rows only (pmap's outputs are local).
      return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), out)
    return counted(run)


@functools.lru_cache(maxsize=256)
def _process_rows(dp: DataParallel, global_batch_size: int) -> slice:
  return dp._find_process_rows(global_batch_size)  # pylint: disable=protected-access


class _CountedCall:
  """A compiled function whose every call counts as progress for the multi-process watchdog.

  A process that stops calling its steps while the others wait in the step's collectives is the
  one that stalled (:class:`megu_jax.distributed.StallDetector`). Attributes (``lower``...)
  are the function's own.
  """

  def __init__(self, fn: Callable):
    self._fn = fn

  def __call__(self, *args, **kwargs):
    distributed.note_progress()
    return self._fn(*args, **kwargs)

  def __getattr__(self, name: str):
    return getattr(self._fn, name)


def counted(fn: Callable) -> Callable:
  """``fn`` itself in a single process; with several, ``fn`` counting its calls as progress."""
  return _CountedCall(fn) if distributed.is_multi_process() else fn


def fold_in_step(key: jax.Array, step: int) -> jax.Array:
  """The key of one step, so that a resumed run draws exactly what an uninterrupted one would."""
  return jax.random.fold_in(key, jnp.uint32(step))
