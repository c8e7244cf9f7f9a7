"""Speed plumbing: the train step compiles once, the PyTorch twin computes our step, the benchmark
scripts' JSON, the XLA:CPU defaults."""
import contextlib
import json
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from megu_jax import datasets
from megu_jax import parallel
from megu_jax import train
from megu_jax import xla_cpu
from megu_jax.configs import digits as digits_config
from megu_jax.harness import provenance
from megu_jax.harness import throughput
from megu_jax.harness import unlearning_cost

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _CompileCounter(logging.Handler):
  """Records every XLA compilation (``jax_log_compiles``) with the train steps done before it."""

  def __init__(self):
    super().__init__(level=logging.DEBUG)
    self.steps_called = 0
    self.compiles = []  # (steps called before it, message)

  def emit(self, record):
    message = record.getMessage()
    if message.startswith("Compiling "):
      self.compiles.append((self.steps_called, message[:120]))


@contextlib.contextmanager
def counting_compiles():
  counter = _CompileCounter()
  logger = logging.getLogger("jax._src.interpreters.pxla")
  logger.addHandler(counter)
  previous = jax.config.jax_log_compiles
  jax.config.update("jax_log_compiles", True)
  try:
    yield counter
  finally:
    jax.config.update("jax_log_compiles", previous)
    logger.removeHandler(counter)


class _StepCountingParallel(parallel.DataParallel):
  """DataParallel whose compiled steps tell the counter how many steps have been called."""
  counter = None

  def compile_step(self, step_factory, donate_state=True):
    step = super().compile_step(step_factory, donate_state)
    counter = type(self).counter

    def counted(state, batch, key):
      outputs = step(state, batch, key)  # compiles on the first call
      counter.steps_called += 1
      return outputs
    return counted


def test_compile_counter_sees_a_recompile():
  # The counter itself works: a new input shape compiles again and is recorded.
  with counting_compiles() as counter:
    fn = jax.jit(lambda x: x * 2 + 1)
    fn(np.zeros(3, np.float32))
    counter.steps_called = 1
    fn(np.zeros(4, np.float32))
  assert [steps for steps, _ in counter.compiles] == [0, 1]


def test_training_loop_compiles_nothing_after_its_first_step():
  # A recompiling step (weak types flipping, a new batch shape, a Python scalar turned into a
  # traced one...) or any per-step eager op that recompiles would show up after the first step.
  dataset = datasets.load_dataset("digits")
  config = digits_config.get_config()
  # Two epochs of 22 steps: the epoch boundary is crossed once.
  config.epochs, config.batch_size, config.progress = 2, 64, False
  model = train.models.create_model(config.model, dataset.num_classes)
  with counting_compiles() as counter:
    _StepCountingParallel.counter = counter
    dp = _StepCountingParallel("mesh", tuple(jax.devices()[:1]))
    _, info = train.fit(config, model, dataset.train_images, dataset.train_labels,
                        np.arange(len(dataset.train_labels)), mean=dataset.mean,
                        std=dataset.std, key=jax.random.key(0), dp=dp)
  assert counter.steps_called == info["steps"] == 2 * (len(dataset.train_labels) // 64)
  # The rate counts the steps the clock saw: all but the first, compiling one.
  assert info["images_per_s"] == pytest.approx((info["steps"] - 1) * 64 / info["time_s"])
  assert any("train_step" in message for _, message in counter.compiles)
  late = [(steps, message) for steps, message in counter.compiles if steps >= 1]
  assert not late, f"compiled after the first step: {late}"


def test_torch_twin_computes_our_train_step():
  torch_reference = pytest.importorskip("experiments.torch_reference")
  setup = throughput.MODEL_SETUPS["small_cnn"]
  jax_step = throughput.JaxTrainStep("small_cnn", batch_size=16, num_batches=2)
  host = jax.device_get(jax_step.state)
  twin = torch_reference.create_twin(setup["model"], setup["image_shape"], setup["num_classes"])
  torch_reference.load_flax_params(twin, host.params, host.batch_stats)
  channels = setup["image_shape"][-1]
  torch_step = torch_reference.TorchTrainStep(
      twin, throughput.synthetic_batches(2, 16, setup["image_shape"], setup["num_classes"]),
      mean=np.full(channels, 0.5, np.float32), std=np.full(channels, 0.25, np.float32))
  for _ in range(2):
    jax_loss = float(jax_step.run(1)["loss"])
    torch_loss = float(torch_step.run(1))
    # Same float32 program up to summation order: agreement to ~1e-6 relative.
    assert torch_loss == pytest.approx(jax_loss, rel=1e-4)
  params = jax.device_get(jax_step.state.params)
  np.testing.assert_allclose(twin.classifier.weight.detach().numpy(),
                             np.asarray(params["classifier"]["kernel"]).T, rtol=1e-3, atol=1e-5)
  # A few ReLU inputs sit within float32 noise of 0 and route their gradient differently in the
  # two programs: sparse, small differences; a wrong layout or optimiser would differ everywhere.
  difference = np.abs(twin.convs[1].weight.detach().numpy()
                      - np.asarray(params["conv2"]["kernel"]).transpose(3, 2, 0, 1))
  assert difference.max() < 1e-3 and np.mean(difference > 1e-5) < 0.05


def test_bench_throughput_writes_its_json(tmp_path):
  out = tmp_path / "throughput.json"
  done = subprocess.run(
      [sys.executable, "-m", "experiments.bench_throughput", "--models=small_cnn",
       "--batch_size=8", "--steps=1", "--repetitions=2", "--warmup_steps=0", "--fit_steps=3",
       f"--out={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
  assert done.returncode == 0, done.stderr[-3000:]
  result = json.loads(out.read_text())
  for key in ("cpu_model", "cpu_count", "jax", "date", "command", "load_average_1_5_15"):
    assert key in result["machine"]
  cnn = result["results"]["small_cnn"]
  assert cnn["batch_size"] == 8 and cnn["jax"]["compile_s"] > 0
  assert len(cnn["jax"]["images_per_s_blocks"]) == 2 and cnn["jax"]["images_per_s"] > 0
  assert cnn["jax_fit_loop"]["steps"] == 3 and cnn["jax_fit_loop"]["images_per_s"] > 0
  if result["torch_available"]:
    best = cnn["torch_best"]
    assert cnn["ratio_jax_over_torch"] == pytest.approx(
        cnn["jax"]["images_per_s"] / cnn[best]["images_per_s"])
  assert result["peak_rss_mb"] > 0


def test_two_device_paths_measure_and_aggregate():
  runs = {}
  for mode in ("mesh", "pmap"):
    dp = parallel.DataParallel(mode, tuple(jax.devices()[:2]))
    runs[("small_cnn", mode, 2)] = [throughput.measure_jax_step(
        "small_cnn", batch_size=8, steps=1, warmup_steps=0, repetitions=1, dp=dp)]
    assert runs[("small_cnn", mode, 2)][0]["devices"] == 2
  runs[("small_cnn", "mesh", 1)] = [{"images_per_s_blocks": [100.0, 300.0], "compile_s": 1.0}]
  results = throughput.aggregate_scaling(runs, batch_size=8)
  assert results["small_cnn"]["mesh"]["1"]["images_per_s"] == 200.0
  assert results["small_cnn"]["mesh"]["2"]["per_device_batch"] == 4
  assert results["small_cnn"]["mesh"]["2"]["speedup_over_1_device"] == pytest.approx(
      results["small_cnn"]["mesh"]["2"]["images_per_s"] / 200.0)
  assert "speedup_over_1_device" not in results["small_cnn"]["pmap"]["2"]  # no 1-device run


def _write_cell(root, cell, records):
  directory = root / "cells" / cell / "methods"
  directory.mkdir(parents=True)
  for name, metrics in records.items():
    (directory / f"{name}.json").write_text(json.dumps({"metrics": metrics}))


def test_unlearning_cost_from_a_benchmark_workdir(tmp_path):
  retrain = {"time_s": 100.0, "compile_s": 2.0, "test_acc": 0.9}
  megu = {"time_s": 20.0, "compile_s": 8.0, "transition_s": 5.0, "noise_s": 1.0,
          "finetune_s": 12.0}
  _write_cell(tmp_path, "full_class_Shirt_seed0", {"retrain": retrain, "megu": megu})
  _write_cell(tmp_path, "full_class_Shirt_seed1",
              {"retrain": dict(retrain, time_s=50.0), "megu": megu})
  _write_cell(tmp_path, "random_100_seed0", {"megu": megu})  # no Retrain yet: skipped
  (tmp_path / "cells" / "full_class_Shirt_seed1" / "methods" / "ssd.json").write_text("{trunc")
  result = unlearning_cost.from_benchmark(str(tmp_path))
  assert sorted(result["cells"]) == ["full_class_Shirt_seed0", "full_class_Shirt_seed1"]
  cost = result["cells"]["full_class_Shirt_seed0"]["megu"]
  assert cost["relative_to_retrain"] == pytest.approx(0.2)
  assert cost["relative_to_retrain_with_compile"] == pytest.approx(28.0 / 102.0)
  assert cost["phases"]["other_s"] == pytest.approx(2.0)
  assert sum(cost["phases"]["shares"].values()) == pytest.approx(1.0)
  with_oracle = unlearning_cost.megu_phases(cost, oracle_s=3.0)
  assert with_oracle["oracle_s"] == 3.0 and "oracle_s" not in with_oracle["shares"]
  # The stand-in's heads are a phase of their own, taken out of the guidance's time.
  with_stand_in = unlearning_cost.megu_phases(dict(cost, stand_in_s=4.0))
  assert with_stand_in["stand_in_s"] == 4.0 and with_stand_in["transition_s"] == 1.0
  assert with_stand_in["other_s"] == pytest.approx(2.0)
  assert sum(with_stand_in["shares"].values()) == pytest.approx(1.0)
  assert result["summary"]["megu"]["relative_to_retrain"]["mean"] == pytest.approx(0.3)
  assert result["summary"]["retrain"]["relative_to_retrain"]["mean"] == 1.0
  with pytest.raises(FileNotFoundError, match="retrain.json"):
    unlearning_cost.from_benchmark(str(tmp_path / "nothing"))


def test_cold_and_warm_counts_the_first_calls_extra_cost_as_compilation(monkeypatch):
  calls = []

  def call(timings):  # 3 s the first time (1 of them a compiled step's first call), then 1 s
    calls.append(len(calls))
    timings["compile_s"] = 1.0 if len(calls) == 1 else 0.25
    timings["finetune_s"] = 0.5
    fake_clock[0] += 3.0 if len(calls) == 1 else 1.0

  fake_clock = [0.0]
  monkeypatch.setattr(unlearning_cost.time, "perf_counter", lambda: fake_clock[0])
  record = unlearning_cost.cold_and_warm(call)
  assert calls == [0, 1]
  # The work is the warm call less its own compilation; the cold call's excess is compilation.
  assert record["time_s"] == pytest.approx(0.75)
  assert record["compile_s"] == pytest.approx(2.25)
  assert record["time_s"] + record["compile_s"] == pytest.approx(record["wall_s"]) == 3.0
  assert record["warm_wall_s"] == 1.0 and record["finetune_s"] == 0.5


def test_machine_info_names_the_code_as_this_process_loaded_it(monkeypatch):
  # A benchmark runs for minutes: a commit or an edit made meanwhile is not the code it ran.
  loaded = provenance.loaded_commit()
  monkeypatch.setattr(provenance, "_git", lambda *args: "edited while it ran")
  info = throughput.machine_info()
  assert {"commit": info["commit"], "dirty": info["dirty"]} == loaded


def test_xla_cpu_defaults_respect_the_user():
  if xla_cpu._jaxlib_version().startswith(xla_cpu._TESTED_JAXLIB):
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    assert xla_cpu.apply_cpu_defaults(environ)
    assert environ["XLA_FLAGS"].split() == ["--xla_force_host_platform_device_count=2",
                                            *xla_cpu.CPU_FLAGS]
    assert not xla_cpu.apply_cpu_defaults(environ)  # already there: not added twice
    if os.environ.get("MEGU_JAX_XLA_CPU_DEFAULTS", "1") != "0":
      assert xla_cpu.active()  # this test process got them from conftest, as the commands do
  mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=dot"}
  assert not xla_cpu.apply_cpu_defaults(mine) and mine["XLA_FLAGS"].endswith("=dot")
  off = {"MEGU_JAX_XLA_CPU_DEFAULTS": "0"}
  assert not xla_cpu.apply_cpu_defaults(off) and "XLA_FLAGS" not in off
