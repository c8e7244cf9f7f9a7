"""The build_transition command: oracles end to end on Fashion-MNIST, outputs, failures, the key."""
import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from experiments import build_transition
from fake_gemini_server import Answer, FakeGeminiServer, RecordedRequest, Status
from fake_gemini_server import matrix_responder
from megu_jax import datasets
from megu_jax import transition

SECRET = "test-key-SECRET-1234"
REPO = pathlib.Path(__file__).resolve().parents[1]
CLASSES = datasets.FASHION_MNIST_CLASS_NAMES
SCORES = np.random.default_rng(0).uniform(0, 10, (10, 10)).round(1)

if not os.path.exists(os.path.join(datasets.DEFAULT_FASHION_MNIST_DIR,
                                   "train-images-idx3-ubyte.gz")):
  pytest.skip("Fashion-MNIST IDX files are not installed", allow_module_level=True)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
  for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "MEGU_GEMINI_BASE_URL",
               "GOOGLE_GENAI_USE_VERTEXAI"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("GEMINI_API_KEY", SECRET)


def options(tmp_path, **kwargs):
  defaults = dict(dataset="fashion_mnist", oracle="uniform", out=str(tmp_path / "t.npy"),
                  gemini_backoff_s=0.001, gemini_max_retries=1, gemini_timeout_s=5.0)
  defaults.update(kwargs)
  return build_transition.BuildOptions(**defaults)


def run_quietly(opts):
  lines = []
  T = build_transition.run(opts, say=lines.append)
  return T, "\n".join(lines)


def files_under(directory):
  return sorted(p for p in pathlib.Path(directory).rglob("*") if p.is_file())


@pytest.mark.parametrize("oracle", ["uniform", "hierarchy"])
def test_offline_oracles_write_matrix_provenance_and_heatmap(tmp_path, oracle):
  T, printed = run_quietly(options(tmp_path, oracle=oracle, temperature=0.5))
  assert sorted(p.name for p in tmp_path.iterdir()) == ["t.json", "t.npy", "t.png"]
  loaded = np.asarray(transition.load_transition(str(tmp_path / "t.npy"), num_classes=10))
  np.testing.assert_allclose(loaded, T, rtol=1e-6)
  record = transition.load_provenance(str(tmp_path / "t.npy"))
  for key in ("oracle", "model", "prompt_sha256", "date", "class_names", "temperature", "top_k"):
    assert key in record
  assert record["oracle"] == oracle and record["class_names"] == list(CLASSES)
  assert record["temperature"] == 0.5 and record["top_k"] is None
  assert all(name in printed for name in CLASSES)
  assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
  if oracle == "hierarchy":
    shirt, coat = CLASSES.index("Shirt"), CLASSES.index("Coat")
    assert T[shirt, coat] > 0.33 and T[shirt, CLASSES.index("Bag")] < 1e-6


def test_coarse_label_level_builds_T_over_the_superclasses(tmp_path):
  T, printed = run_quietly(options(tmp_path, label_level="coarse"))
  assert T.shape == (5, 5)
  record = transition.load_provenance(str(tmp_path / "t.npy"))
  assert record["class_names"] == list(datasets.FASHION_MNIST_GROUP_NAMES)
  assert "footwear" in printed
  # The coarse labels have no grouping above them: the hierarchy oracle says so.
  with pytest.raises(ValueError, match="needs a class grouping"):
    run_quietly(options(tmp_path, oracle="hierarchy", label_level="coarse",
                        out=str(tmp_path / "h.npy")))


def test_gemini_build_matches_the_scores_and_a_rerun_sends_nothing(tmp_path):
  opts = options(tmp_path, oracle="gemini", top_k=3)
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES)) as server:
    T, printed = run_quietly(dataclasses.replace(opts, gemini_base_url=server.base_url))
  assert server.request_count == 10 and "10 requests sent" in printed
  np.testing.assert_allclose(T, transition.scores_to_transition(SCORES, top_k=3))
  record = transition.load_provenance(str(tmp_path / "t.npy"))
  assert record["oracle"] == "gemini" and record["model"] == opts.gemini_model
  assert len(record["prompt_sha256"]) == 64 and record["top_k"] == 3
  assert os.path.isdir(tmp_path / "gemini_cache")  # default: next to --out

  with FakeGeminiServer() as server:
    again, printed = run_quietly(dataclasses.replace(opts, gemini_base_url=server.base_url))
  assert server.request_count == 0 and "10 answers from the cache" in printed
  np.testing.assert_array_equal(again, T)


def test_multimodal_variant_sends_training_images_of_each_class(tmp_path):
  opts = options(tmp_path, oracle="gemini", images_per_class=2, seed=3)
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES)) as server:
    run_quietly(dataclasses.replace(opts, gemini_base_url=server.base_url))
  assert [r.num_images for r in server.requests] == [2] * 10
  record = transition.load_provenance(str(tmp_path / "t.npy"))
  assert record["images_per_class"] == 2 and record["example_image_seed"] == 3


def test_per_sample_mode_writes_one_label_per_forget_image(tmp_path):
  def respond(request: RecordedRequest):
    assert 'is labelled "Shirt"' in request.prompt and request.num_images == 1
    return Answer(json.dumps({"class": "Coat"}))

  out = str(tmp_path / "labels.npy")
  with FakeGeminiServer(respond) as server:
    run_quietly(options(tmp_path, oracle="gemini", out=None, per_sample_out=out,
                        forget=("shirt",), per_sample_limit=4, gemini_base_url=server.base_url))
  assert server.request_count == 4
  labels = np.load(out, allow_pickle=False)
  assert labels.dtype == np.int32 and list(labels) == [CLASSES.index("Coat")] * 4
  record = json.loads((tmp_path / "labels.json").read_text())
  dataset = datasets.load_dataset("fashion_mnist")
  positions = np.asarray(record["train_positions"])
  assert len(positions) == 4 and np.all(dataset.train_labels[positions] == CLASSES.index("Shirt"))


@pytest.mark.parametrize("changes, message", [
    ({"out": None}, "nothing to do"),
    ({"out": "t.csv"}, "--out must end in .npy"),
    ({"temperature": 0.0}, "--temperature must be > 0"),
    ({"top_k": 2}, "uniform oracle would keep arbitrary classes"),
    ({"oracle": "hierarchy", "top_k": 0}, "--top_k must be >= 1"),
    ({"oracle": "prototype"}, "needs --workdir"),
    ({"images_per_class": 2}, "only applies to --oracle=gemini"),
    ({"per_sample_out": "l.npy"}, "needs --oracle=gemini"),
    ({"oracle": "gemini", "per_sample_out": "l.npy"}, "needs --forget"),
    ({"oracle": "oracle_of_delphi"}, "unknown oracle 'oracle_of_delphi'"),
])
def test_bad_options_fail_before_anything_happens(tmp_path, changes, message):
  with pytest.raises(build_transition.BuildError) as error:
    build_transition.run(options(tmp_path, **changes), say=lambda line: None)
  assert message in str(error.value)
  assert list(tmp_path.iterdir()) == []


def _stub_training_stack(monkeypatch, num_logits):
  """Stand-ins for train.restore_trained / evaluation.predict with known class prototypes."""
  dataset = datasets.load_dataset("fashion_mnist")
  prototypes = np.eye(10, 12)
  prototypes[CLASSES.index("Shirt"), CLASSES.index("Coat")] = 1.0  # Shirt leans towards Coat
  calls = {}

  def restore_trained(workdir):
    calls["workdir"] = workdir
    return types.SimpleNamespace(config={"model": "stub_cnn"})

  def predict(trained, images, batch_size):
    calls["num_images"] = len(images)
    return {"logits": np.zeros((len(images), num_logits)),
            "features": prototypes[dataset.train_labels]}

  import megu_jax  # pylint: disable=g-import-not-at-top
  for name, attrs in (("train", {"restore_trained": restore_trained}),
                      ("evaluation", {"predict": predict})):
    module = types.ModuleType(f"megu_jax.{name}")
    module.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, f"megu_jax.{name}", module)
    monkeypatch.setattr(megu_jax, name, module, raising=False)
  return calls


def test_prototype_oracle_scores_class_mean_features_of_the_trained_model(tmp_path, monkeypatch):
  calls = _stub_training_stack(monkeypatch, num_logits=10)
  T, _ = run_quietly(options(tmp_path, oracle="prototype", workdir=str(tmp_path / "run")))
  assert calls == {"workdir": str(tmp_path / "run"), "num_images": 60_000}
  shirt, coat = CLASSES.index("Shirt"), CLASSES.index("Coat")
  # cosine(Shirt, Coat) = 1/sqrt(2) -> S = 7.07; every other pair is orthogonal -> S = 0.
  assert np.argmax(T[shirt]) == coat and T[shirt, coat] > 0.99
  record = transition.load_provenance(str(tmp_path / "t.npy"))
  assert record["model"] == "stub_cnn" and record["workdir"].endswith("run")
  np.testing.assert_allclose(record["scores"][shirt][coat], 10 / np.sqrt(2))


def test_prototype_oracle_rejects_a_model_with_another_class_count(tmp_path, monkeypatch):
  _stub_training_stack(monkeypatch, num_logits=5)
  with pytest.raises(build_transition.BuildError, match="has 5 classes but fashion_mnist has 10"):
    run_quietly(options(tmp_path, oracle="prototype", workdir=str(tmp_path)))
  assert not (tmp_path / "t.npy").exists()


# --- the command as a user runs it ------------------------------------------------------------

def run_cli(args, env_changes, timeout=120):
  env = {k: v for k, v in os.environ.items()
         if k not in ("GEMINI_API_KEY", "GOOGLE_API_KEY", "MEGU_GEMINI_BASE_URL")}
  env.update(env_changes)
  return subprocess.run([sys.executable, "-m", "experiments.build_transition", *args],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def test_cli_keeps_the_key_out_of_every_output_and_a_failure_keeps_the_old_matrix(tmp_path):
  out = tmp_path / "transitions" / "fm.npy"
  common = ["--dataset=fashion_mnist", "--oracle=gemini", f"--out={out}",
            "--gemini_backoff_s=0.001", "--gemini_max_retries=1"]
  outputs = []

  help_text = build_transition.flags.FLAGS.get_help()  # what --help prints
  outputs.append(help_text)
  assert "--gemini_base_url" in help_text

  with FakeGeminiServer(matrix_responder(CLASSES, SCORES)) as server:
    good = run_cli(common, {"GEMINI_API_KEY": SECRET, "MEGU_GEMINI_BASE_URL": server.base_url})
  outputs += [good.stdout, good.stderr]
  assert good.returncode == 0, good.stderr
  assert server.request_count == 10 and "Ankle boot" in good.stdout
  assert {p.name for p in out.parent.iterdir()} == {"fm.npy", "fm.json", "fm.png", "gemini_cache"}
  before = {p: p.read_bytes() for p in out.parent.iterdir() if p.is_file()}

  # A second build with other class scores (new cache keys: another model) whose server turns
  # hostile: it echoes the key in its errors and in a malformed answer.
  script = [Status(429, f"slow down key={SECRET}"), Answer(f"oops {SECRET}"),
            Answer(f"oops again {SECRET}")]
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES), script=script) as server:
    bad = run_cli(common + [f"--gemini_base_url={server.base_url}", "--gemini_model=other"],
                  {"GEMINI_API_KEY": SECRET})
  outputs += [bad.stdout, bad.stderr]
  assert bad.returncode != 0
  stderr_lines = bad.stderr.strip().splitlines()
  assert len(stderr_lines) == 1 and stderr_lines[0].startswith("error: ")
  assert "1 of 10 rows had no valid answer" in stderr_lines[0]
  assert {p: p.read_bytes() for p in before} == before  # the earlier matrix is untouched

  written = [p.read_text(errors="replace") for p in files_under(tmp_path)]
  assert any("oops" in text for text in written)  # the rejected raw answers were kept...
  assert not [text for text in outputs + written if SECRET in text]  # ...without the key


def test_cli_without_an_api_key_fails_at_once_and_touches_nothing(tmp_path):
  out = tmp_path / "fm.npy"
  transition.save_transition(str(out), transition.scores_to_transition(np.zeros((10, 10))),
                             {"oracle": "uniform"})
  before = {p: p.read_bytes() for p in tmp_path.iterdir()}
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES)) as server:
    start = time.monotonic()
    result = run_cli(["--dataset=fashion_mnist", "--oracle=gemini", f"--out={out}",
                      f"--gemini_base_url={server.base_url}"], {})
    elapsed = time.monotonic() - start
  assert result.returncode != 0 and server.request_count == 0
  assert re.fullmatch(r"error: .*set the environment variable GEMINI_API_KEY.*\n",
                      result.stderr)
  assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before
  assert elapsed < 30  # it does not wait on the network or load data first


@pytest.mark.slow
def test_prototype_oracle_on_a_really_trained_model(tmp_path):
  """Trains the digits CNN for 2 epochs (about a minute on 2 busy cores), then builds T from it."""
  from megu_jax.configs import digits as digits_config  # pylint: disable=g-import-not-at-top
  from megu_jax import train  # pylint: disable=g-import-not-at-top

  workdir = str(tmp_path / "run")
  train.train_and_evaluate(digits_config.get_config("quick"), workdir)
  T, _ = run_quietly(options(tmp_path, dataset="digits", oracle="prototype", workdir=workdir))
  transition.validate_transition(T, 10)
  record = transition.load_provenance(str(tmp_path / "t.npy"))
  scores = np.asarray(record["scores"])
  assert scores.shape == (10, 10) and np.all((scores >= 0) & (scores <= 10))
  # A trained network separates the classes: no two class means point the same way.
  assert scores.max() < 10.0 and np.all(np.diag(scores) == 0)
