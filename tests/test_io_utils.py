"""Atomic writes: the whole file or the old one, and the mode of any other new file."""
import os
import stat

import numpy as np
import pytest

from megu_jax import io_utils


def test_a_write_replaces_the_file_whole_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "sub" / "a.json"
  io_utils.atomic_write_json(str(path), {"x": np.float32(1.5), "y": (1, 2)})
  io_utils.atomic_write_json(str(path), {"x": 2})
  assert path.read_text() == '{\n  "x": 2\n}\n'
  assert os.listdir(path.parent) == ["a.json"]


def test_written_files_get_the_mode_of_a_new_file_not_owner_only(tmp_path):
  io_utils.atomic_save_npz(str(tmp_path / "m.npz"), a=np.arange(3))
  (tmp_path / "plain").write_text("")
  mode = lambda name: stat.S_IMODE(os.stat(tmp_path / name).st_mode)
  assert mode("m.npz") == mode("plain")


def test_a_failed_write_keeps_the_old_file(tmp_path):
  path = tmp_path / "a.json"
  io_utils.atomic_write_json(str(path), {"x": 1})
  with pytest.raises(TypeError, match="cannot write object"):
    io_utils.atomic_write_json(str(path), {"x": object()})
  assert path.read_text() == '{\n  "x": 1\n}\n'
  assert os.listdir(tmp_path) == ["a.json"]
