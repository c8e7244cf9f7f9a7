"""Atomic file writes: write to a temporary file in the same directory, then ``os.replace``.

A reader (or a rerun after a crash) therefore sees either the old file or the complete new one.

With several processes (:mod:`megu_jax.distributed`) every process calls the same writes, process
0 alone writes, and all of them wait until it has (a barrier): no process goes on to read a file
that is not there yet, and no two write the same file.
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any

import numpy as np

from megu_jax import distributed


def atomic_write_bytes(path: str, data: bytes) -> None:
  """Writes ``data`` to ``path`` atomically (process 0 only, the others waiting for it)."""
  if distributed.is_primary():
    _atomic_write_bytes(path, data)
  distributed.barrier("write")


def remove_file(path: str) -> None:
  """Deletes ``path`` (process 0 only, the others waiting for it, as for a write)."""
  if distributed.is_primary():
    os.remove(path)
  distributed.barrier("remove")


def _atomic_write_bytes(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix="-" + os.path.basename(path))
  try:
    # mkstemp creates the file readable by its owner only; a written file gets the mode any
    # other new file would (0666 less the umask), so that other users and hosts can read it.
    os.fchmod(fd, 0o666 & ~_UMASK)
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def _read_umask() -> int:
  mask = os.umask(0)  # the only way to read it is to set it: done once, at import
  os.umask(mask)
  return mask


_UMASK = _read_umask()


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def atomic_save_npy(path: str, array: np.ndarray) -> None:
  buffer = io.BytesIO()
  np.save(buffer, np.asarray(array), allow_pickle=False)
  atomic_write_bytes(path, buffer.getvalue())


def atomic_save_npz(path: str, **arrays: np.ndarray) -> None:
  """Several named arrays in one ``.npz`` (uncompressed; no pickles), written atomically."""
  buffer = io.BytesIO()
  np.savez(buffer, **{name: np.asarray(array) for name, array in arrays.items()})
  atomic_write_bytes(path, buffer.getvalue())


def _json_default(value: Any) -> Any:
  if isinstance(value, np.generic):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, tuple):
    return list(value)
  raise TypeError(f"cannot write {type(value).__name__} to JSON")
