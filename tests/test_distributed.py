"""Multi-process runs (megu_jax.distributed, experiments.launch): real processes on this machine.

Each command runs as 2 processes of 1 CPU device through the launcher and is held against the same
command in this pytest process, which has 2 devices (tests/conftest.py): the same global devices,
batch and seed, so losses agree per step to float32 reduction order and accuracies exactly.
Failure cases (a peer killed, stopped or stalled, a peer that never arrives, bad flags) end in
bounded time with one line; after every test no process the test started is left.

Run as a script (``python tests/test_distributed.py MODULE ARGS...``) this file is the command
runner the tests launch: it runs ``python -m MODULE ARGS...`` unchanged, except that
``MEGU_TEST_LOSSES=PATH`` records every compiled step's scalar metrics to ``PATH.<process>``
(one JSON line per step: megu_jax/harness/step_metrics.py, which experiments.compare_processes
uses too) and ``MEGU_TEST_STALL=P:N`` makes process P hang, alive, at its N-th
batch (what a deadlocked host looks like to the others).
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
LOSSES_ENV = "MEGU_TEST_LOSSES"
STALL_ENV = "MEGU_TEST_STALL"


# --- the command runner (this file run as a script) ----------------------------------------------
from megu_jax.harness import step_metrics  # noqa: E402


def stall_at_batch(process: int, call: int) -> None:
  """Makes process ``process`` hang (sleeping, its threads alive) at its ``call``-th batch."""
  from megu_jax import distributed, parallel  # pylint: disable=import-outside-toplevel
  original = parallel.DataParallel.put_process_batch
  calls = [0]

  def put_process_batch(self, local_batch):
    calls[0] += 1
    if distributed.process_index() == process and calls[0] == call:
      print("EVENT stalling", flush=True)
      time.sleep(3600)
    return original(self, local_batch)
  parallel.DataParallel.put_process_batch = put_process_batch


def run_command() -> None:
  import jax  # pylint: disable=import-outside-toplevel  (jax.process_index: at write time)
  sys.path.insert(0, str(REPO / "tests"))
  import paced_command  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  if os.environ.get(LOSSES_ENV):
    step_metrics.record_step_metrics(os.environ[LOSSES_ENV], jax.process_index)
  if os.environ.get(STALL_ENV):
    process, call = (int(v) for v in os.environ[STALL_ENV].split(":"))
    stall_at_batch(process, call)
  step_metrics.run_module(sys.argv[1], sys.argv[2:])


if __name__ == "__main__":
  run_command()
  sys.exit(0)


# --- the tests -----------------------------------------------------------------------------------
import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import processes  # noqa: E402  (tests/processes.py: Streamed, command_env)

from experiments import launch  # noqa: E402
from megu_jax import distributed  # noqa: E402
from megu_jax import parallel  # noqa: E402
from megu_jax import train  # noqa: E402
from megu_jax.configs import digits as digits_config  # noqa: E402
from megu_jax.harness import experiment  # noqa: E402

WAIT_S = 240  # per command: two processes share two busy cores with other work
# Short timeouts, so that a failure test ends in seconds (the defaults are 60, 20 and 120 s).
FAST_TIMEOUTS = ["--distributed_init_timeout_s=20", "--distributed_heartbeat_timeout_s=5",
                 "--distributed_stall_timeout_s=8"]
TRAIN_ARGS = ["--config=megu_jax/configs/digits.py:quick", "--config.epochs=1",
              "--config.checkpoint_every_steps=20", "--config.log_every_steps=1"]
# A tolerance for what differs: the order of the cross-device reductions (in-process all-reduce
# against gloo's over two processes), a few float32 ulps per step.
LOSS_ATOL = 1e-5


def train_config(**overrides):
  """The command line's config (TRAIN_ARGS) for an in-process run."""
  config = digits_config.get_config("quick")
  config.epochs = 1
  config.checkpoint_every_steps = 20
  config.log_every_steps = 1
  config.update_from_flattened_dict(overrides)
  return config


class Launched(processes.Streamed):
  """``experiments.launch`` of this file's runner, its stdout (process 0's) read in a thread."""

  def __init__(self, tmp_path, name, module, args, *, num_processes=2, launcher_args=(),
               env=None):
    argv = [sys.executable, "-m", "experiments.launch", f"--num_processes={num_processes}",
            "--local_devices=1", *launcher_args, "--", sys.executable, __file__, module, *args]
    super().__init__(argv, stderr_path=tmp_path / f"{name}.launcher.stderr",
                     env=env or processes.command_env(), name="the launcher", wait_s=WAIT_S)

  def pids(self):
    """The processes' ids, from the launcher's ``launch: process I: pid P`` lines."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
      found = dict(re.findall(r"launch: process (\d+): pid (\d+)", self.stderr_path.read_text()))
      if found:
        return {int(i): int(p) for i, p in found.items()}
      time.sleep(0.1)
    pytest.fail("the launcher printed no pids")


def alive(pid):
  """Whether ``pid`` is a running (not zombie) process."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.fixture
def launcher(tmp_path):
  """Starts launchers; afterwards, fails if any process a launcher started is still running."""
  started = []

  def start(*args, **kwargs):
    launched = Launched(tmp_path, *args, **kwargs)
    started.append(launched)
    return launched
  yield start
  left = []
  for launched in started:
    if launched.proc.poll() is None:
      launched.proc.kill()
      left.append(f"launcher {launched.proc.pid}")
    pids = dict(re.findall(r"launch: process (\d+): pid (\d+)", launched.stderr_path.read_text()))
    left += [f"process {i} (pid {p})" for i, p in pids.items() if alive(int(p))]
  for entry in left:  # cleaned up, then reported
    pid = int(re.search(r"(\d+)\)?$", entry).group(1))
    if alive(pid):
      os.kill(pid, signal.SIGKILL)
  assert not left, f"left running: {left}"


def read_jsonl(path):
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def per_step_losses(records):
  return np.array([r["loss"] for r in records])


def assert_same_run(reference_dir, other_dir):
  """Two training workdirs: losses per step within LOSS_ATOL, accuracies equal, one log line
  per step (process 0's only), parameters close."""
  reference = read_jsonl(reference_dir / "metrics.jsonl")
  other = read_jsonl(other_dir / "metrics.jsonl")
  assert [r["step"] for r in other] == [r["step"] for r in reference]
  np.testing.assert_allclose(per_step_losses(other), per_step_losses(reference), rtol=0,
                             atol=LOSS_ATOL)
  final_ref = json.loads((reference_dir / "final_metrics.json").read_text())
  final = json.loads((other_dir / "final_metrics.json").read_text())
  for key in ("test_acc", "train_acc", "steps", "devices"):
    assert final[key] == final_ref[key], key
  a = jax.device_get(train.restore_trained(str(reference_dir)).state.params)
  b = jax.device_get(train.restore_trained(str(other_dir)).state.params)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-5)


def error_lines(text):
  return [line for line in text.splitlines() if line.startswith("error:")]


# --- flags and helpers, no processes -------------------------------------------------------------
@pytest.mark.parametrize("spec, message", [
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2),
     "--process_id=2 must be below --num_processes=2"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=-1),
     "--process_id=-1 must be >= 0"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=0, process_id=0),
     "--num_processes=0 must be at least 1"),
    (dict(coordinator_address="127.0.0.1", num_processes=2, process_id=0),
     "--coordinator_address='127.0.0.1' is not HOST:PORT"),
    (dict(coordinator_address="host:70000", num_processes=2, process_id=0),
     "is not HOST:PORT with a port in 1..65535"),
    (dict(coordinator_address="a b:12", num_processes=2, process_id=0), "is not HOST:PORT"),
    (dict(num_processes=2), "--coordinator_address, --process_id missing"),
    (dict(mode="auto", heartbeat_timeout_s=0), "--distributed_heartbeat_timeout_s=0 must be"),
])
def test_bad_distributed_specs_are_named(spec, message):
  with pytest.raises(distributed.DistributedInputError, match=re.escape(message)):
    distributed.check_spec(distributed.DistributedSpec(**spec))


def test_good_specs_pass_and_a_single_process_joins_nothing():
  for address in ("127.0.0.1:1234", "node-7.cluster:80", "[::1]:8476"):
    distributed.check_spec(distributed.DistributedSpec(coordinator_address=address,
                                                       num_processes=3, process_id=2))
  assert distributed.parse_address("[::1]:8476") == ("[::1]", 8476)
  assert not distributed.DistributedSpec().enabled
  assert not distributed.initialize(distributed.DistributedSpec())  # no-op, no JAX call
  assert not distributed.is_multi_process() and distributed.is_primary()


def test_the_stall_detector_names_the_process_left_behind_and_no_one_else():
  stalls = distributed.StallDetector(stall_timeout_s=10)
  # Level processes are never stalled, however long they take (a long compilation).
  assert stalls.observe({0: 5, 1: 5}, now=0) == []
  assert stalls.observe({0: 5, 1: 5}, now=100) == []
  # Process 1 falls behind: its clock starts now, not at its last move (t = 0).
  assert stalls.observe({0: 7, 1: 5}, now=101) == []
  assert stalls.observe({0: 7, 1: 5}, now=110) == []
  assert stalls.observe({0: 7, 1: 6}, now=112) == []  # it moved: its clock restarts
  assert stalls.observe({0: 7, 1: 6}, now=121) == []
  assert stalls.observe({0: 8, 1: 6}, now=123) == [1]  # behind without moving for 11 s
  assert stalls.observe({0: 8, 1: 8}, now=124) == []  # caught up


def test_in_a_single_process_batches_and_outputs_are_unchanged():
  dp = parallel.DataParallel("mesh")
  assert dp.process_rows(32) == slice(0, 32)
  assert dp.home_device == jax.devices()[0]
  assert distributed.gather_rows({"x": 1}) == {"x": 1}
  assert not isinstance(dp.compile_step(lambda axis: lambda s, b, k: (s, {})),
                        parallel._CountedCall)  # pylint: disable=protected-access


def test_step_records_are_compared_step_by_step(tmp_path):
  # What experiments.compare_processes records and reports, on made-up records.
  (tmp_path / "steps.0").write_text(
      "\n".join(json.dumps(r) for r in [{"step_fn": 0, "loss": 2.0}, {"step_fn": 1, "ce": 1.0},
                                         {"step_fn": 0, "loss": 1.0}]) + "\n")
  records = step_metrics.by_step_fn(step_metrics.read_records(str(tmp_path / "steps.0")))
  assert records == {0: [{"loss": 2.0}, {"loss": 1.0}], 1: [{"ce": 1.0}]}
  other = [{"loss": 2.0}, {"loss": 1.5}]
  compared = step_metrics.compare_steps(records[0], [other, other])
  assert compared["steps"] == 2 and compared["same_steps"] and compared["processes_identical"]
  assert compared["max_abs_loss_diff"] == 0.5 and compared["max_rel_loss_diff"] == 0.5
  assert compared["worst_step"] == {"step": 1, "metric": "loss"}
  assert not step_metrics.compare_steps(records[0], [other[:1], other])["same_steps"]
  final = {"test_acc": 0.5, "train_acc": 0.75, "margin_auc": 0.6, "steps": 88, "time_s": 3.0,
           "parallel": "mesh"}
  same = step_metrics.compare_metrics(final, {**final, "time_s": 9.0, "margin_auc": 0.625})
  assert same["accuracies_equal"] and same["other_fields_equal"]
  assert same["max_abs_other_metric_diff"] == pytest.approx(0.025)  # the timing is left out
  differs = step_metrics.compare_metrics(final, {**final, "test_acc": 0.51, "parallel": "pmap"})
  assert differs["unequal_accuracies"] == ["test_acc"] and not differs["other_fields_equal"]


def test_the_launcher_checks_its_command_before_starting_anything():
  with pytest.raises(launch.LaunchInputError, match="no command"):
    launch.check_command([], 2, 0)
  with pytest.raises(launch.LaunchInputError, match="--num_processes=0 must be at least 1"):
    launch.check_command(["python"], 0, 0)
  with pytest.raises(launch.LaunchInputError, match="the command sets --process_id"):
    launch.check_command(["python", "--process_id=1"], 2, 0)
  env = launch.process_env(3, {"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=2"})
  assert env["XLA_FLAGS"] == "--a=1 --xla_force_host_platform_device_count=3"
  assert launch.exit_description(-9) == ("was killed by SIGKILL", 137)


def test_bad_multi_process_flags_fail_in_one_line_with_exit_code_2_before_any_compute(tmp_path):
  cases = {
      "id_too_large": ["--coordinator_address=127.0.0.1:1234", "--num_processes=2",
                       "--process_id=2"],
      "no_processes": ["--coordinator_address=127.0.0.1:1234", "--num_processes=0",
                       "--process_id=0"],
      "bad_address": ["--coordinator_address=127.0.0.1", "--num_processes=2", "--process_id=0"],
  }
  # All at once: each is a Python start-up and nothing else.
  running = {name: subprocess.Popen(
      [sys.executable, "-m", "experiments.train", *TRAIN_ARGS, f"--workdir={tmp_path / name}",
       *flags], cwd=REPO, env=processes.command_env(), stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True) for name, flags in cases.items()}
  launcher_case = subprocess.run(
      [sys.executable, "-m", "experiments.launch", "--num_processes=0", "--", "python"],
      cwd=REPO, env=processes.command_env(), capture_output=True, text=True, timeout=WAIT_S,
      check=False)
  expected = {"id_too_large": "error: --process_id=2 must be below --num_processes=2",
              "no_processes": "error: --num_processes=0 must be at least 1",
              "bad_address": "error: --coordinator_address='127.0.0.1' is not HOST:PORT"}
  for name, proc in running.items():
    stdout, stderr = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 2, (name, stderr)
    assert stderr.splitlines() == error_lines(stderr) and len(error_lines(stderr)) == 1, stderr
    assert stderr.startswith(expected[name]), stderr
    assert not (tmp_path / name).exists()  # nothing was computed or written
    assert stdout == ""
  assert launcher_case.returncode == 2
  assert launcher_case.stderr == "error: --num_processes=0 must be at least 1\n"


# --- real processes ------------------------------------------------------------------------------
UNLEARN_OVERRIDES = {"methods": "megu", "megu.steps": 12, "megu.noise_steps": 6}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
  """The unlearning workdir's trained models (original and Retrain), trained in this process:
  the original is the train test's reference, both are the unlearn test's starting point."""
  workdir = tmp_path_factory.mktemp("one_process")
  config = train_config(**UNLEARN_OVERRIDES)
  experiment.prepare(config, str(workdir))
  return workdir, experiment.model_dirs(config, str(workdir / "models"))


def test_two_processes_train_as_one_process_does(tmp_path, launcher, one_process):
  reference = pathlib.Path(one_process[1]["original"])
  workdir = tmp_path / "two_processes"
  run = launcher("train", "experiments.train", [*TRAIN_ARGS, f"--workdir={workdir}"])
  code, stdout, stderr = run.finish()
  assert code == 0, stderr
  assert_same_run(reference, workdir)
  # Process 0 printed the result; process 1's output went to its file in the workdir.
  assert "test_acc=" in stdout
  assert "test_acc=" in (workdir / "process_1.log").read_text()
  # Every file written once, whole: no temporary files left by a second writer.
  assert not list(workdir.rglob(".tmp-*"))


def test_two_processes_unlearn_with_megu_as_one_process_does(tmp_path, launcher, monkeypatch,
                                                             one_process):
  # Both runs start from the same trained models (the train test's subject) and run MeGU alone.
  reference = one_process[0]
  step_metrics.record_step_metrics(str(tmp_path / "losses"), lambda: "reference",
                                   monkeypatch.setattr)
  experiment.run_unlearning(train_config(**UNLEARN_OVERRIDES), str(reference))
  monkeypatch.undo()
  workdir = tmp_path / "two_processes"
  workdir.mkdir()
  shutil.copytree(reference / "models", workdir / "models")
  args = [*TRAIN_ARGS, *(f"--config.{k}={v}" for k, v in UNLEARN_OVERRIDES.items()),
          f"--workdir={workdir}"]
  run = launcher("unlearn", "experiments.unlearn", args,
                 env=processes.command_env(**{LOSSES_ENV: str(tmp_path / "losses")}))
  code, stdout, stderr = run.finish()
  assert code == 0, stderr
  expected = read_jsonl(tmp_path / "losses.reference")
  assert len(expected) >= 12  # MeGU's finetuning steps (after its noise steps, if any)
  for process in (0, 1):
    got = read_jsonl(tmp_path / f"losses.{process}")
    assert [sorted(r) for r in got] == [sorted(r) for r in expected]  # the same steps, in order
    for step, (mine, theirs) in enumerate(zip(got, expected)):
      for name, value in theirs.items():  # each step's losses (the noise steps': their two CEs)
        assert mine[name] == pytest.approx(value, rel=0, abs=LOSS_ATOL), (process, step, name)
  results = json.loads((workdir / "results.json").read_text())["methods"]
  reference_results = json.loads((reference / "results.json").read_text())["methods"]
  assert set(results) == set(reference_results) == {"retrain", "megu"}
  for method, metrics in reference_results.items():
    for name, value in metrics.items():
      if "acc" in name:
        assert results[method][name] == value, (method, name)
      elif not name.endswith("_s"):  # MIA, gaps: functions of the same outputs
        assert results[method][name] == pytest.approx(value, abs=1e-6), (method, name)
  assert "| megu |" in stdout
  assert (workdir / "per_class_accuracy.png").stat().st_size > 0


def test_a_run_resumes_after_both_processes_were_killed(tmp_path, launcher, one_process):
  # On the pmap path (the mesh has the train test), against the same one-process model: the two
  # paths compute the same steps.
  reference = pathlib.Path(one_process[1]["original"])
  workdir = tmp_path / "two_processes"
  args = [*TRAIN_ARGS, "--config.parallel=pmap", f"--workdir={workdir}"]
  first = launcher("first", "experiments.train", args)
  pids = first.pids()
  first.wait_for("EVENT checkpoint 20")
  for pid in pids.values():
    os.kill(pid, signal.SIGKILL)
  code, _, stderr = first.finish()
  assert code == 128 + signal.SIGKILL and "was killed by SIGKILL" in stderr
  assert not any(alive(pid) for pid in pids.values())
  kept = (workdir / "metrics.jsonl").read_text().splitlines()
  kept = [line for line in kept if json.loads(line)["step"] <= 20]
  assert len(kept) == 20
  second = launcher("second", "experiments.train", args)
  code, _, stderr = second.finish()
  assert code == 0, stderr
  # Resumed, not redone: the first run's records up to its checkpoint are kept as they were.
  assert (workdir / "metrics.jsonl").read_text().splitlines()[:20] == kept
  assert_same_run(reference, workdir)


def test_sigterm_to_the_launcher_stops_both_processes_after_the_same_step(tmp_path, launcher):
  workdir = tmp_path / "run"
  run = launcher("sigterm", "experiments.train",
                 [*TRAIN_ARGS, "--config.epochs=3", f"--workdir={workdir}"])
  pids = run.pids()
  run.wait_for("EVENT checkpoint 20")
  run.proc.send_signal(signal.SIGTERM)
  code, _, stderr = run.finish()
  assert code == 128 + signal.SIGTERM, stderr
  lines = [error_lines(stderr)[0], error_lines((workdir / "process_1.log").read_text())[0]]
  steps = {int(re.search(r"after step (\d+) of 132", line).group(1)) for line in lines}
  assert len(steps) == 1, lines  # the same step in both, and a checkpoint of it
  step, = steps
  assert all(line.startswith("error: stopped by SIGTERM after step") for line in lines), lines
  assert (workdir / "checkpoints" / str(step)).is_dir()
  assert not any(alive(pid) for pid in pids.values())


@pytest.mark.parametrize("fault", ["kill", "stop", "stall"])
def test_a_peer_that_dies_stops_or_stalls_ends_every_process_in_bounded_time(tmp_path, launcher,
                                                                           fault):
  workdir = tmp_path / "run"
  args = [*TRAIN_ARGS, "--config.epochs=3", f"--workdir={workdir}", *FAST_TIMEOUTS]
  env = processes.command_env(**({STALL_ENV: "1:30"} if fault == "stall" else {}))
  run = launcher(fault, "experiments.train", args, launcher_args=["--grace_s=15"], env=env)
  pids = run.pids()
  run.wait_for("EVENT checkpoint 20")
  faulted = time.monotonic()
  if fault == "kill":
    os.kill(pids[1], signal.SIGKILL)
  elif fault == "stop":
    os.kill(pids[1], signal.SIGSTOP)
  code, _, stderr = run.finish()
  elapsed = time.monotonic() - faulted
  assert code != 0
  launcher_line = error_lines(stderr)[-1]
  survivor = error_lines(stderr)[:-1]
  assert len(survivor) == 1, stderr  # process 0's one line
  if fault == "kill":
    # The launcher names the killed process; the survivor failed its next collective.
    assert launcher_line.startswith("error: process 1 of 2") and "killed by SIGKILL" in stderr
    assert survivor[0].startswith(
        "error: process 0: a collective with the other processes failed"), stderr
    assert "launch: process 0 exited with code 1" in stderr
  elif fault == "stop":
    assert survivor == ["error: process 1 sent no heartbeat for 5 s "
                        "(--distributed_heartbeat_timeout_s): it died, was stopped or lost its "
                        "network; stopping process 0"]
  else:  # process 0 says it, or repeats process 1's words about itself
    assert "process(es) 1 made no progress for 8 s" in survivor[0], stderr
  # Bounded: the fault's timeout, the watchdog's poll and, for the stopped process, the launcher's
  # grace (15 s) before it kills what did not end by itself.
  assert elapsed < {"kill": 30, "stop": 45, "stall": 45}[fault], elapsed
  assert not any(alive(pid) for pid in pids.values())


def test_a_peer_that_never_arrives_ends_the_other_in_bounded_time(tmp_path):
  started = time.monotonic()
  done = subprocess.run(
      [sys.executable, "-m", "experiments.train", *TRAIN_ARGS, f"--workdir={tmp_path / 'run'}",
       f"--coordinator_address=127.0.0.1:{launch.free_port()}", "--num_processes=2",
       "--process_id=0", "--distributed_init_timeout_s=3"], cwd=REPO, env=processes.command_env(),
      capture_output=True, text=True, timeout=WAIT_S, check=False)
  assert done.returncode == 1
  assert error_lines(done.stderr) == [
      "error: process 0 of 2: not every process reached the coordinator at "
      f"{re.search(r'127.0.0.1:[0-9]+', done.stderr).group(0)} within 3 s "
      "(--distributed_init_timeout_s): a process did not start, or the processes disagree on "
      "--coordinator_address or --num_processes"]
  assert time.monotonic() - started < 30
