"""Failure behaviour (docs/failures.md), case by case.

Kills and stop signals resume to the uninterrupted result, damaged files are reported or fallen
back from, NaNs stop training at a named step, bad input fails in one line before any compute,
and the Gemini key reaches no file and no output.

The commands run as real processes where that matters (signals, exit codes, what is printed),
through tests/paced_command.py, which pauses them after each save so that a signal lands at a
known step instead of racing a run that lasts a second. Reruns whose point is the library's
resume logic run in-process, to keep this file near a minute on two busy cores.
"""
import ast
import dataclasses
import json
import os
import pathlib
import shutil
import signal
import sys

import jax
import numpy as np
import pytest

from experiments import build_transition
from megu_jax.configs import digits as digits_config
from fake_gemini_server import Answer, FakeGeminiServer, Status, matrix_responder
import processes
from megu_jax import checkpoints
from megu_jax import datasets
from megu_jax import interruption
from megu_jax import splits
from megu_jax import train
from megu_jax import transition
from megu_jax.harness import benchmark
from megu_jax.harness import cli
from megu_jax.harness import experiment
from megu_jax.oracles import gemini

REPO = pathlib.Path(__file__).resolve().parents[1]
SECRET = "fault-test-key-SECRET-5678"
WAIT_S = 300  # per command; generous for two cores shared with other work
# The command-line twin of quick_config().
CONFIG_ARGS = ["--config=megu_jax/configs/digits.py:quick", "--config.epochs=1",
               "--config.checkpoint_every_steps=20", "--config.methods=original"]


def quick_config(**overrides):
  """Digits, one epoch of 44 steps, checkpoints at steps 20, 40 and 44."""
  config = digits_config.get_config("quick")
  config.epochs = 1
  config.checkpoint_every_steps = 20
  config.methods = "original"
  config.update_from_flattened_dict(overrides)  # dotted keys reach nested fields
  return config


def command_env():
  # The key is set for every command, so that the search for it below can find a leak anywhere.
  return processes.command_env(GEMINI_API_KEY=SECRET)


class Command(processes.Streamed):
  """A command in a subprocess (through tests/paced_command.py unless ``paced=False``)."""

  def __init__(self, module, args, tmp_path, name, paced=True):
    self.module = module
    prefix = ([str(REPO / "tests" / "paced_command.py"), module] if paced else ["-m", module])
    super().__init__([sys.executable, *prefix, *args], stderr_path=tmp_path / f"{name}.stderr",
                     env=command_env(), name=module, wait_s=WAIT_S)


def files_under(directory):
  return sorted(p for p in pathlib.Path(directory).rglob("*") if p.is_file())


def assert_no_secret(directories=(), texts=()):
  """The key is in no file under ``directories`` and in none of ``texts`` (searched as bytes)."""
  paths = [p for d in directories for p in files_under(d)]
  leaks = [str(p) for p in paths if SECRET.encode() in p.read_bytes()]
  leaks += [f"text {i}" for i, text in enumerate(texts) if SECRET in text]
  assert not leaks, leaks
  return len(paths)


@dataclasses.dataclass(frozen=True)
class StoredArray:
  """Where orbax put the bytes of one array chunk: ``length`` bytes at ``offset`` in ``path``."""
  key: str
  path: pathlib.Path
  offset: int
  length: int


def stored_arrays(checkpoint):
  """Every array chunk the restore of ``checkpoint`` reads from a data file, largest first.

  Orbax stores the state in an OCDBT database; the B-tree its manifest points to names, for each
  chunk, a byte range of a data file. The data files also hold bytes nothing reads (each process's
  own B-tree nodes, which the merged tree replaces), and which file gets what changes from run to
  run, so damage meant to be noticed must land inside one of these ranges.
  """
  import tensorstore as ts  # pylint: disable=import-outside-toplevel  (orbax's storage layer)
  state = pathlib.Path(checkpoint) / "state"
  store = ts.KvStore.open(f"file://{state}/").result()
  found = []

  def visit(location):
    for entry in ts.ocdbt.dump(store, location).result()["entries"]:
      for value in entry.values():
        if isinstance(value, str) and value.startswith("btreenode:"):
          visit(value)
      reference = entry.get("indirect_value")
      if reference:  # "value:<prefix>:<file>:<offset>:<length>"
        where, offset, length = reference[len("value:"):].rsplit(":", 2)
        prefix, name = where.split(":", 1)
        found.append(StoredArray(entry["key"].decode(), state / prefix / name, int(offset),
                                 int(length)))

  visit(ts.ocdbt.dump(store).result()["versions"][-1]["root"]["location"])
  assert found, f"no array data found under {state}: has orbax's storage format changed?"
  return sorted(found, key=lambda a: (-a.length, a.key))


def flip_a_bit(path, position=None):
  """Flips one bit of the file at ``path``: at byte ``position``, or in the middle."""
  data = bytearray(path.read_bytes())
  data[len(data) // 2 if position is None else position] ^= 0x10
  path.write_bytes(bytes(data))


def flip_a_bit_of_array(stored):
  """Flips one bit in the middle of a :class:`StoredArray`'s bytes."""
  flip_a_bit(stored.path, stored.offset + stored.length // 2)


def checkpoint_steps(workdir):
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def same_params(workdir_a, workdir_b):
  a = jax.device_get(train.restore_trained(str(workdir_a)).state)
  b = jax.device_get(train.restore_trained(str(workdir_b)).state)
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def without_timings(methods):
  """Method metrics without wall-clock fields (``*_s``), which differ between any two runs."""
  return {m: {k: v for k, v in values.items() if not k.endswith("_s")}
          for m, values in methods.items()}


@dataclasses.dataclass
class Reference:
  workdir: pathlib.Path
  summary: dict
  original_dir: pathlib.Path
  original_final: dict


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """The uninterrupted main job (original, Retrain, their evaluation), run in-process."""
  workdir = tmp_path_factory.mktemp("reference")
  # Every compilation is cached here, eager ops included, so the commands below load them.
  previous = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  try:
    summary = experiment.run_unlearning(quick_config(), str(workdir))
  finally:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
  original_dir = pathlib.Path(experiment.model_dirs(quick_config(), str(workdir / "models"))[
      "original"])
  return Reference(workdir=workdir, summary=summary, original_dir=original_dir,
                   original_final=summary["original_train"])


# --- 1. Interrupted work resumes ------------------------------------------------------------------
def test_train_stopped_killed_and_damaged_still_ends_as_the_uninterrupted_run(tmp_path, reference,
                                                                              caplog):
  workdir = tmp_path / "run"
  args = [*CONFIG_ARGS, f"--workdir={workdir}"]
  total = reference.original_final["steps"]

  # SIGTERM while the run pauses after its step-20 checkpoint: step 21 ends, is saved, and it
  # says so.
  run = Command("experiments.train", args, tmp_path, "sigterm")
  run.wait_for("EVENT checkpoint 20 ")
  run.proc.send_signal(signal.SIGTERM)
  code, out_term, err_term = run.finish()
  assert code == 128 + signal.SIGTERM
  assert err_term.splitlines() == [
      f"error: stopped by SIGTERM after step 21 of {total}; checkpoint saved in "
      f"{workdir}/checkpoints/21: run the same command again to resume"]
  assert checkpoint_steps(workdir) == [20, 21]

  # SIGKILL (no handler runs) after the resumed run's checkpoint at step 40.
  run = Command("experiments.train", args, tmp_path, "sigkill")
  run.wait_for("EVENT checkpoint 40 ")
  run.proc.kill()
  code, out_kill, err_kill = run.finish()
  assert code == -signal.SIGKILL
  assert checkpoint_steps(workdir) == [21, 40]
  assert not (workdir / "final_metrics.json").exists()

  # Then the newest checkpoint is damaged (a flipped bit inside the largest array's bytes: orbax
  # either fails to decompress it or reads it back without complaint, for the SHA-256 to catch),
  # and a save cut short by a kill left orbax's temporary directory behind. The rerun (the
  # command's library call, in-process) falls back to step 21.
  flip_a_bit_of_array(stored_arrays(workdir / "checkpoints" / "40")[0])
  partial = workdir / "checkpoints" / "44.orbax-checkpoint-tmp-1700000000"
  partial.mkdir()
  (partial / "_CHECKPOINT_METADATA").write_text("{")
  train.train_and_evaluate(quick_config(), str(workdir))
  warning, = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
  assert (warning.startswith(f"checkpoint {workdir}/checkpoints/40 ")
          and ("cannot be read" in warning or "is damaged" in warning)
          and warning.endswith(f"moved it to {workdir}/damaged_checkpoints/40 and falling back "
                               "to the previous checkpoint")), warning
  assert not partial.exists()

  final = json.loads((workdir / "final_metrics.json").read_text())
  assert final["test_acc"] == reference.original_final["test_acc"]
  assert same_params(workdir, reference.original_dir)  # bitwise on CPU
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").open()]
  assert steps == sorted(set(steps)) and steps[-1] == total
  assert_no_secret([workdir], [out_term, err_term, out_kill, err_kill])


def test_unlearn_killed_while_training_resumes_to_the_uninterrupted_results(tmp_path, reference,
                                                                            monkeypatch):
  workdir = tmp_path / "unlearn"
  run = Command("experiments.unlearn", [*CONFIG_ARGS, f"--workdir={workdir}"], tmp_path, "unlearn")
  line = run.wait_for("EVENT checkpoint 20 ")
  assert f"{workdir}/models/original_" in line
  run.proc.kill()
  code, out, err = run.finish()
  assert code == -signal.SIGKILL and not (workdir / "results.json").exists()

  # The rerun: the command's own library call, in-process, so that the restore can be watched.
  restored = []
  restore_latest = checkpoints.Checkpointer.restore_latest

  def watched(self, *args, **kwargs):
    result = restore_latest(self, *args, **kwargs)
    restored.append((os.path.basename(os.path.dirname(self.directory)),
                     None if result is None else result[0]))
    return result

  monkeypatch.setattr(checkpoints.Checkpointer, "restore_latest", watched)
  summary = experiment.run_unlearning(quick_config(), str(workdir))
  assert restored[0][0].startswith("original_") and restored[0][1] == 20
  assert restored[1][0].startswith("retrain_") and restored[1][1] is None
  assert without_timings(summary["methods"]) == without_timings(reference.summary["methods"])
  assert json.loads((workdir / "results.json").read_text())["methods"] == summary["methods"]
  assert_no_secret([workdir], [out, err])


def test_benchmark_killed_after_a_method_skips_that_method_on_the_rerun(tmp_path, reference,
                                                                        monkeypatch):
  workdir = tmp_path / "bench"
  shutil.copytree(reference.workdir / "models", workdir / "models")  # trained models are reused
  cell = workdir / "cells" / "full_class_3_seed0" / "methods"
  run = Command("experiments.benchmark", [*CONFIG_ARGS, "--config.benchmark_scenarios=full_class:3",
                                          "--config.seeds=1", f"--workdir={workdir}"],
                tmp_path, "benchmark")
  line = run.wait_for("EVENT result ")
  assert line.strip().endswith(f"{cell}/retrain.json")
  run.proc.kill()
  code, out, err = run.finish()
  assert code == -signal.SIGKILL
  assert [p.name for p in cell.iterdir()] == ["retrain.json"]
  finished = (cell / "retrain.json").stat()

  ran = []
  run_method = experiment.run_method
  monkeypatch.setattr(experiment, "run_method",
                      lambda setting, name: ran.append(name) or run_method(setting, name))
  result = benchmark.run_benchmark(quick_config(benchmark_scenarios="full_class:3", seeds=1),
                                   str(workdir))
  assert ran == ["original"]
  after = (cell / "retrain.json").stat()
  assert (after.st_ino, after.st_mtime_ns) == (finished.st_ino, finished.st_mtime_ns)
  assert (without_timings(result["cells"][0]["methods"])
          == without_timings(reference.summary["methods"]))
  assert_no_secret([workdir], [out, err])


# --- 2. Damaged files are reported, not trusted ---------------------------------------------------
def _truncate_largest(checkpoint):
  # Cut inside the largest array's bytes, so that the restore is certain to miss some of them.
  largest = stored_arrays(checkpoint)[0]
  os.truncate(largest.path, largest.offset + largest.length // 2)


def _swap_in_the_previous_state(checkpoint):
  # Well-formed orbax data, other arrays: only the recorded SHA-256 tells.
  previous = max(int(p.name) for p in checkpoint.parent.iterdir()
                 if p.name.isdigit() and int(p.name) < int(checkpoint.name))
  shutil.rmtree(checkpoint / "state")
  shutil.copytree(checkpoint.parent / str(previous) / "state", checkpoint / "state")


@pytest.mark.parametrize("damage,message", [
    (_truncate_largest, "cannot be read"),
    (_swap_in_the_previous_state, "is damaged: its arrays do not match the SHA-256"),
], ids=["truncated", "other_arrays"])
def test_a_damaged_final_checkpoint_is_moved_aside_and_its_last_steps_trained_again(
    tmp_path, reference, caplog, damage, message):
  workdir = tmp_path / "original"
  shutil.copytree(reference.original_dir, workdir)
  final_step = reference.original_final["steps"]
  damaged = workdir / "checkpoints" / str(final_step)
  damage(damaged)
  with pytest.raises(checkpoints.CheckpointError, match=f"checkpoint {damaged} {message}"):
    train.restore_trained(str(workdir))

  trained, final = train.train_and_restore(quick_config(), str(workdir))
  assert f"moved it to {workdir}/damaged_checkpoints/{final_step}" in caplog.text
  assert (workdir / "damaged_checkpoints" / str(final_step)).is_dir()
  assert final["test_acc"] == reference.original_final["test_acc"]
  assert same_params(workdir, reference.original_dir)
  del trained


def test_a_flipped_bit_in_any_array_the_restore_reads_is_caught(tmp_path, reference):
  final_step = reference.original_final["steps"]
  arrays = stored_arrays(reference.original_dir / "checkpoints" / str(final_step))
  assert {a.key.split("/")[0] for a in arrays} >= {"params.classifier.kernel",
                                                   "opt_state.1.0.trace.classifier.kernel"}
  for stored in arrays:
    workdir = tmp_path / stored.key.replace("/", "_")
    shutil.copytree(reference.original_dir, workdir)
    flip_a_bit_of_array(dataclasses.replace(
        stored, path=workdir / stored.path.relative_to(reference.original_dir)))
    with pytest.raises(checkpoints.CheckpointError,
                       match=f"checkpoint {workdir}/checkpoints/{final_step} "
                             "(cannot be read|is damaged)"):
      train.restore_trained(str(workdir))
    shutil.rmtree(workdir)


def test_with_every_checkpoint_damaged_training_stops_naming_them(tmp_path, reference):
  workdir = tmp_path / "original"
  shutil.copytree(reference.original_dir, workdir)
  (workdir / "final_metrics.json").unlink()  # as if killed before the end
  steps = checkpoint_steps(workdir)
  for step in steps:
    (workdir / "checkpoints" / str(step) / "meta" / "metadata").write_text('{"elapsed')
  with pytest.raises(checkpoints.CheckpointError) as error:
    train.train_and_evaluate(quick_config(), str(workdir))
  message = cli.one_line(error.value)
  assert f"no readable checkpoint under {workdir}/checkpoints: steps {steps[::-1]}" in message
  assert "train from step 0" in message
  assert checkpoint_steps(workdir) == []  # moved aside: the next run starts afresh


def _write_npy_then(path, damage):
  transition.save_transition(str(path), transition.scores_to_transition(np.zeros((10, 10))),
                             {"oracle": "uniform"})
  damage(path)


@pytest.mark.parametrize("damage", [
    lambda p: os.truncate(p, p.stat().st_size // 2),
    lambda p: p.write_bytes(b""),
    lambda p: p.write_bytes(b"\x93NUMPY garbage" + p.read_bytes()[14:]),
    lambda p: np.save(p, np.array([{"T": 1}], dtype=object), allow_pickle=True),
    lambda p: np.save(p, np.full((10, 10), 0.1)),  # valid .npy, but a non-zero diagonal
], ids=["truncated", "empty", "bad_header", "pickle", "not_a_transition"])
def test_a_damaged_transition_file_is_named(tmp_path, damage):
  path = tmp_path / "T.npy"
  _write_npy_then(path, damage)
  with pytest.raises(transition.InvalidTransitionError, match=f"^{path}: "):
    transition.load_transition(str(path), num_classes=10)


@pytest.mark.parametrize("damage,message", [
    (lambda p: os.truncate(p, p.stat().st_size - 8), "is damaged"),
    (flip_a_bit, "does not match the SHA-256"),
], ids=["truncated", "flipped_bit"])
def test_a_damaged_split_file_stops_a_retrain_run_before_training(tmp_path, damage, message):
  config = quick_config(retrain=True)
  dataset = datasets.load_dataset("digits")
  workdir = tmp_path / "retrain"
  splits.save_split(train.split_from_config(config, dataset), workdir / "split")
  index_file = workdir / "split" / "forget_train.npy"
  damage(index_file)
  with pytest.raises(splits.SplitFileError, match=f"index file {index_file} {message}"):
    train.train_and_evaluate(config, str(workdir), dataset=dataset)
  assert not (workdir / "checkpoints").exists()


def test_a_retrain_workdir_of_another_split_is_not_reused(tmp_path):
  dataset = datasets.load_dataset("digits")
  workdir = tmp_path / "retrain"
  splits.save_split(train.split_from_config(quick_config(forget="5"), dataset), workdir / "split")
  with pytest.raises(splits.SplitFileError, match="holds another split"):
    train.train_and_evaluate(quick_config(retrain=True), str(workdir), dataset=dataset)


def test_a_damaged_gemini_cache_entry_is_discarded_and_asked_again(tmp_path, monkeypatch,
                                                                   caplog):
  monkeypatch.setenv("GEMINI_API_KEY", SECRET)
  monkeypatch.delenv(gemini.BASE_URL_ENV_VAR, raising=False)
  classes = ("cat", "dog", "car")
  scores = np.array([[0, 8, 1], [7, 0, 2], [1, 3, 0]], float)
  with FakeGeminiServer(matrix_responder(classes, scores)) as server:
    def oracle():
      return gemini.GeminiOracle(base_url=server.base_url, cache_dir=str(tmp_path / "cache"),
                                 timeout_s=5.0, max_retries=0, sleep=lambda s: None)
    first = oracle().class_scores(classes)
    entries = files_under(tmp_path / "cache")
    assert len(entries) == 3
    # One entry still parses but says something else (a score changed on disk), one is cut off.
    changed, cut = entries[0], entries[1]
    record = json.loads(changed.read_text())
    record["raw_text"] = record["raw_text"].replace('"score": 8', '"score": 9').replace(
        '"score": 7', '"score": 9').replace('"score": 3', '"score": 9')
    changed.write_text(json.dumps(record))
    os.truncate(cut, cut.stat().st_size // 2)
    rerun = oracle()
    again = rerun.class_scores(classes)
  np.testing.assert_array_equal(again, first)
  assert rerun.requests_sent == 2 and rerun.cache_hits == 1
  for path in (changed, cut):
    assert f"discarding damaged Gemini cache entry {path}" in caplog.text
  assert "asking again" in caplog.text


# --- 3. Numerical faults --------------------------------------------------------------------------
@pytest.mark.parametrize("debug_nans", [False, True])
def test_a_diverging_run_stops_at_the_step_naming_the_last_good_checkpoint(tmp_path, debug_nans):
  # SGD at learning rate 1000 overflows within a few steps on digits.
  config = quick_config(learning_rate=1000.0, schedule="constant", checkpoint_every_steps=2,
                        debug_nans=debug_nans)
  try:
    with pytest.raises(FloatingPointError) as error:
      train.train_and_evaluate(config, str(tmp_path))
    if debug_nans:
      # JAX's own check is on, and the state is checked after every step: the parameters that
      # went bad are named before their loss is (by the parameter check, or by JAX itself).
      assert jax.config.jax_debug_nans
      assert not isinstance(error.value, train.NonFiniteLossError), error.value
      return
  finally:
    jax.config.update("jax_debug_nans", False)
  step, last_good = error.value.step, error.value.checkpoint
  assert isinstance(error.value, train.NonFiniteError) and 2 < step < 20
  good_step = (step - 1) // 2 * 2
  assert last_good == str(tmp_path / "checkpoints" / str(good_step))
  assert f"step {step}; last good checkpoint: step {good_step} in {last_good}" in str(error.value)
  # What it names is good: finite, and nothing later was kept.
  assert checkpoint_steps(tmp_path)[-1] == good_step
  state = train.restore_trained(str(tmp_path)).state
  assert all(np.isfinite(leaf).all() for leaf in jax.tree.leaves(jax.device_get(state.params)))
  assert cli.exit_code(error.value) == cli.EXIT_FAILED


# --- 4. Bad input fails before any compute, in one line -------------------------------------------
def test_bad_command_lines_fail_in_one_line_with_exit_code_2_creating_nothing(tmp_path):
  cut = tmp_path / "cut.npy"
  _write_npy_then(cut, lambda p: os.truncate(p, p.stat().st_size // 2))
  cases = [
      ("experiments.train", ["--config.learning_rate=-0.1"],
       "error: config.learning_rate=-0.1 must be positive"),
      ("experiments.train", ["--config.batch_sise=32"],
       "error: --config.batch_sise: the config has no field 'batch_sise'; did you mean "
       "'batch_size'?"),
      ("experiments.unlearn", [f"--config.megu.transition={cut}"],
       f"error: {cut}: cannot be read as a numeric .npy array"),
  ]
  runs = [Command(module, [*CONFIG_ARGS, f"--workdir={tmp_path / f'w{i}'}", *args], tmp_path,
                  f"bad{i}", paced=False)
          for i, (module, args, _) in enumerate(cases)]
  # The other checks of the list run in-process below, through the same report function.
  for i, (run, (module, args, expected)) in enumerate(zip(runs, cases)):
    code, out, err = run.finish()
    assert code == cli.EXIT_BAD_INPUT, (module, args, err)
    assert len(err.splitlines()) == 1 and err.startswith(expected), (module, args, err)
    assert not (tmp_path / f"w{i}").exists(), (module, args)
    assert_no_secret(texts=[out, err])


@pytest.mark.parametrize("overrides,expected", [
    ({"learning_rate": 0.0}, "config.learning_rate=0.0 must be positive"),
    ({"batch_size": -32}, "config.batch_size=-32 must be a positive multiple of the device count"),
    ({"eval_batch_size": 127}, "config.eval_batch_size=127 must be a positive multiple"),
    ({"scenario": "everything"},
     "unknown scenario 'everything'; valid scenarios: full_class, sub_class, random"),
    ({"megu.transition": "oracle_of_delphi"},
     "unknown oracle 'oracle_of_delphi'; available: ['gemini', 'hierarchy', 'prototype', "),
    ({"forget": "Shirt"}, "unknown class name 'Shirt' for data set 'digits'; valid names: 0, 1"),
    ({"methods": "megu,unlearn_everything"}, "unknown unlearning method 'unlearn_everything'"),
    ({"dataset": "imagenet"}, "config.dataset='imagenet' is not one of"),
])
def test_each_bad_field_is_named_with_its_value_and_what_is_allowed(overrides, expected, capsys):
  with pytest.raises(ValueError) as error:
    experiment.validate_before_compute(quick_config(**overrides))
  assert cli.report(error.value) == cli.EXIT_BAD_INPUT
  assert capsys.readouterr().err == f"error: {cli.one_line(error.value)}\n"
  assert expected in str(error.value)


def test_a_transition_of_the_wrong_size_fails_before_any_compute(tmp_path):
  path = tmp_path / "T3.npy"
  transition.save_transition(str(path), transition.scores_to_transition(np.zeros((3, 3))),
                             {"oracle": "uniform"})
  with pytest.raises(ValueError, match=f"^{path}: transition matrix is 3 x 3 but the data set has "
                     "10 classes$"):
    experiment.validate_before_compute(quick_config(**{"megu.transition": str(path)}))


def test_a_bad_benchmark_scenario_fails_before_any_cell_runs(tmp_path):
  config = quick_config(benchmark_scenarios="full_class:3;sideways:3", seeds=1)
  with pytest.raises(ValueError, match="unknown scenario 'sideways'"):
    benchmark.run_benchmark(config, str(tmp_path / "bench"))
  assert not (tmp_path / "bench").exists()


# --- 5. Secrets -----------------------------------------------------------------------------------
def test_the_gemini_key_reaches_no_file_output_or_help_text(tmp_path, monkeypatch, capsys,
                                                            caplog):
  # build_transition's own subprocess tests cover its printed lines on Fashion-MNIST; here the
  # builds run in-process on digits, so that every log record is searched as well.
  monkeypatch.setenv("GEMINI_API_KEY", SECRET)
  monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
  monkeypatch.delenv(gemini.BASE_URL_ENV_VAR, raising=False)
  caplog.set_level("DEBUG")
  help_run = Command("experiments.build_transition", ["--help"], tmp_path, "help", paced=False)
  class_names = datasets.load_dataset("digits").class_names
  scores = np.random.default_rng(0).uniform(0, 10, (10, 10)).round(1)
  out = tmp_path / "T" / "digits.npy"
  rows = matrix_responder(class_names, scores)

  def respond(request):  # class rows, and per-sample questions ("which class is this image?")
    return rows(request) if "Query class:" in request.prompt else Answer('{"class": "8"}')

  def build(server, **options):
    return build_transition.run(build_transition.BuildOptions(
        dataset="digits", oracle="gemini", out=str(out), gemini_base_url=server.base_url,
        gemini_backoff_s=0.001, gemini_max_retries=1, gemini_timeout_s=5.0, **options))

  with FakeGeminiServer(respond) as server:
    build(server)
    build(server, per_sample_out=str(tmp_path / "T" / "labels.npy"), forget=("3",),
          per_sample_limit=2)
  # A hostile endpoint echoes the key in an error status and in malformed answers.
  script = [Status(429, f"slow down, key={SECRET}"), Answer(f"oops {SECRET}"),
            Answer(f"oops again {SECRET}")]
  with FakeGeminiServer(matrix_responder(class_names, scores), script=script) as server:
    with pytest.raises(gemini.GeminiAnswerError) as error:
      build(server, gemini_model="other")
  assert cli.report(error.value) == cli.EXIT_FAILED
  printed = capsys.readouterr()
  assert printed.err.startswith("error: 1 of 10 rows had no valid answer")
  code, help_text, help_err = help_run.finish()
  assert code in (0, 1) and "--gemini_base_url" in help_text  # absl's --help exits with 1

  written = files_under(tmp_path / "T")
  assert any(b"oops" in p.read_bytes() for p in written)  # the echoed answers were kept...
  assert "[REDACTED]" in caplog.text  # ...and the retry was logged, ...
  assert len([p for p in written if "gemini_cache" in str(p)]) >= 12
  texts = [printed.out, printed.err, caplog.text, help_text, help_err, repr(error.value)]
  assert_no_secret([tmp_path], texts)  # ...without the key


def test_no_np_load_allows_pickles_and_no_code_is_evaluated():
  offenders = []
  for path in [*(REPO / "megu_jax").rglob("*.py"), *(REPO / "experiments").rglob("*.py")]:
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
      if not isinstance(node, ast.Call):
        continue
      func = node.func
      name = (f"{func.value.id}.{func.attr}" if isinstance(func, ast.Attribute)
              and isinstance(func.value, ast.Name) else getattr(func, "id", ""))
      if name in ("np.load", "numpy.load", "jnp.load"):
        safe = any(k.arg == "allow_pickle" and isinstance(k.value, ast.Constant)
                   and k.value.value is False for k in node.keywords)
        if not safe:
          offenders.append(f"{path}:{node.lineno} {name} without allow_pickle=False")
      if name in ("eval", "exec", "compile", "pickle.loads", "pickle.load", "yaml.load",
                  "marshal.loads"):
        offenders.append(f"{path}:{node.lineno} {name}")
  assert not offenders, offenders


@pytest.mark.parametrize("name", ["../../etc/passwd", ".hidden", "T-shirt/top", "a" * 300,
                                  "Shirt,Coat", "x\x00y"])
def test_file_names_from_class_names_stay_inside_their_directory(tmp_path, name):
  slug = experiment._slug(name)
  assert "/" not in slug and not slug.startswith(".") and ".." not in slug and "\x00" not in slug
  assert len(slug) <= 80
  path = tmp_path / f"retrain_full_class_{slug}_seed0"
  path.mkdir()
  assert path.parent == tmp_path


def test_names_that_sanitise_alike_get_different_directories():
  assert experiment._slug("T-shirt/top") != experiment._slug("T-shirt_top")
  assert experiment._slug("Shirt") == "Shirt"  # plain names stay readable


# --- How failures are printed ---------------------------------------------------------------------
def test_expected_failures_print_one_scrubbed_line_and_unexpected_ones_a_traceback(
    monkeypatch, capsys):
  monkeypatch.setenv("GEMINI_API_KEY", SECRET)
  assert cli.report(ValueError(f"bad value\n  near {SECRET}")) == cli.EXIT_BAD_INPUT
  assert capsys.readouterr().err == "error: bad value near [REDACTED]\n"

  try:
    raise TypeError(f"a bug with {SECRET}")
  except TypeError as error:
    assert cli.report(error) == cli.EXIT_FAILED
  err = capsys.readouterr().err
  assert err.startswith("Traceback (most recent call last):")
  assert err.endswith("error: unexpected TypeError: a bug with [REDACTED]\n")
  assert SECRET not in err

  try:
    raise checkpoints.CheckpointError("checkpoint /w/checkpoints/8 cannot be read")
  except checkpoints.CheckpointError as error:
    assert cli.report(error, verbose=True) == cli.EXIT_FAILED
  err = capsys.readouterr().err
  assert "Traceback" in err and err.endswith("error: checkpoint /w/checkpoints/8 cannot be read\n")

  stop = interruption.Interrupted("stopped by SIGTERM", signal.SIGTERM)
  assert cli.report(stop) == 143
  assert capsys.readouterr().err == "error: stopped by SIGTERM\n"
