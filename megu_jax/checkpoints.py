"""Atomic, resumable checkpoints of a training state through orbax-checkpoint.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact (the temporary directory is removed on the next
start). Next to the state pytree we store a small JSON record (elapsed training time, and the
SHA-256 of the state) so that a resumed run reports the same numbers as an uninterrupted one and a
damaged checkpoint is detected rather than trusted: orbax reads back flipped bytes without
complaint. :meth:`Checkpointer.restore_latest` moves a damaged checkpoint aside, says so, and falls
back to the previous one.

With several processes (:mod:`megu_jax.distributed`) every process calls :meth:`Checkpointer.save`
and :meth:`Checkpointer.restore` alike (orbax writes the replicated state once, process 0 the
JSON record, and synchronises them); moving a damaged checkpoint aside is process 0's alone.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from megu_jax import distributed


logger = logging.getLogger(__name__)

# Orbax's messages can carry a whole tensorstore spec; the start names the file and the fault.
_MAX_CAUSE_CHARS = 300


class CheckpointError(RuntimeError):
  """A checkpoint directory exists but cannot be read back, or holds other bytes than were saved."""


def state_sha256(host_state: Any) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes (host arrays)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(host_state)[0]:
    array = np.asarray(leaf)
    digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape};".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _drop_closed_event_loop_reports() -> None:
  """Silences one known echo of a failed restore.

  When orbax gives up on a damaged checkpoint, tensorstore reads still in flight finish on the
  event loop orbax has closed, and each reports ``RuntimeError('Event loop is closed')`` as an
  unraisable exception: a screenful of tracebacks after an error that is already reported (and
  that the commands print as one line). Every other unraisable exception is reported as before.
  """
  previous = sys.unraisablehook
  if getattr(previous, "drops_closed_event_loop", False):
    return

  def hook(unraisable):
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
      return
    previous(unraisable)

  hook.drops_closed_event_loop = True
  sys.unraisablehook = hook


class Checkpointer:
  """Saves ``{"state": pytree, "meta": json}`` every ``every_steps`` steps and on demand."""

  def __init__(self, directory: str, every_steps: int, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=max(1, every_steps), create=True,
        # A save cut short by SIGKILL leaves a temporary directory; it is never a step, so drop it.
        cleanup_tmp_directories=True,
        # Synchronous saves: the state is donated to the next step, and a resumed run must see
        # exactly what was saved before the process could be killed.
        enable_async_checkpointing=False)
    self.manager = ocp.CheckpointManager(self.directory, options=options,
                                         item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
    """Saves when ``step`` is on the interval (or ``force``); returns whether it saved."""
    distributed.note_progress()
    host_state = jax.device_get(state)
    meta = {**meta, "state_sha256": state_sha256(host_state)}
    saved = self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                meta=ocp.args.JsonSave(meta)),
        force=force)
    self.manager.wait_until_finished()
    return bool(saved)

  def step_directory(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Reads step ``step`` into the structure of ``abstract_state`` (host numpy arrays).

    Raises:
      CheckpointError: naming the step's directory, when it cannot be read or its bytes differ
        from the SHA-256 recorded at save time (checkpoints from before the hash was recorded are
        read unchecked).
    """
    target = jax.tree.map(
        lambda x: np.zeros(np.shape(x), dtype=np.asarray(x).dtype) if hasattr(x, "shape") else x,
        jax.device_get(abstract_state))
    where = self.step_directory(step)
    distributed.note_progress()
    _drop_closed_event_loop_reports()  # before: the reports can come while orbax still raises
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                        meta=ocp.args.JsonRestore()))
      meta = dict(restored["meta"])
    except Exception as error:  # orbax raises many types for damaged files
      cause = " ".join(f"{type(error).__name__}: {error}".split())
      if len(cause) > _MAX_CAUSE_CHARS:
        cause = cause[:_MAX_CAUSE_CHARS] + " ..."
      raise CheckpointError(f"checkpoint {where} cannot be read ({cause})") from error
    expected = meta.get("state_sha256")
    if expected is not None and state_sha256(restored["state"]) != expected:
      raise CheckpointError(f"checkpoint {where} is damaged: its arrays do not match the SHA-256 "
                            "recorded when it was saved")
    return restored["state"], meta

  def quarantine(self, step: int) -> str:
    """Moves a damaged step out of the manager's sight (kept for inspection); returns where to."""
    damaged_root = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
    os.makedirs(damaged_root, exist_ok=True)
    destination = os.path.join(damaged_root, str(step))
    suffix = 1
    while os.path.exists(destination):
      destination = os.path.join(damaged_root, f"{step}.{suffix}")
      suffix += 1
    # Every process found the same damage and named the same destination (the barrier keeps a
    # late one from seeing the move already made); one process moves it.
    distributed.barrier("quarantine-named")
    if distributed.is_primary():
      os.replace(self.step_directory(step), destination)
    distributed.barrier("quarantine-moved")
    self.manager.reload()
    return destination

  def restore_latest(self, abstract_state: Any,
                     warn: Callable[[str], None] = logger.warning
                     ) -> tuple[int, Any, dict] | None:
    """The newest readable checkpoint as ``(step, host_state, meta)``; None when there is none.

    A damaged checkpoint is moved to ``damaged_checkpoints/`` next to the checkpoint directory,
    with a warning naming it, and the previous one is tried.

    Raises:
      CheckpointError: every checkpoint was damaged (all were moved aside, so the next run starts
        from step 0).
    """
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        return (step, *self.restore(step, abstract_state))
      except CheckpointError as error:
        moved_to = self.quarantine(step)
        damaged.append(step)
        warn(f"{error}; moved it to {moved_to} and falling back to the previous checkpoint")
    if damaged:
      raise CheckpointError(
          f"no readable checkpoint under {self.directory}: steps {damaged} were damaged and moved "
          f"to {os.path.join(os.path.dirname(self.directory), 'damaged_checkpoints')}; run the "
          "same command again to train from step 0")
    return None

  def close(self) -> None:
    self.manager.close()
