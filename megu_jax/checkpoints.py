"""Atomic, resumable checkpoints of a training state through orbax-checkpoint.

Orbax writes each step into a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact. Next to the state pytree we store a small JSON
record (elapsed training time, normalisation statistics) so that a resumed run reports the same
numbers as an uninterrupted one.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint directory exists but cannot be read back."""


class Checkpointer:
  """Saves ``{"state": pytree, "meta": json}`` every ``every_steps`` steps and on demand."""

  def __init__(self, directory: str, every_steps: int, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=max(1, every_steps), create=True,
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
    host_state = jax.device_get(state)
    saved = self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(host_state),
                                meta=ocp.args.JsonSave(meta)),
        force=force)
    self.manager.wait_until_finished()
    return bool(saved)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Reads step ``step`` into the structure of ``abstract_state`` (host numpy arrays)."""
    target = jax.tree.map(
        lambda x: np.zeros(np.shape(x), dtype=np.asarray(x).dtype) if hasattr(x, "shape") else x,
        jax.device_get(abstract_state))
    try:
      restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                        meta=ocp.args.JsonRestore()))
    except Exception as error:  # orbax raises many types for damaged files
      raise CheckpointError(
          f"checkpoint step {step} under {self.directory} cannot be read: "
          f"{type(error).__name__}: {error}") from error
    return restored["state"], dict(restored["meta"])

  def close(self) -> None:
    self.manager.close()
