"""The Gemini oracle with the real google-genai client against a local generateContent server."""
import json
import pathlib
import re
import time

import numpy as np
import pytest

from fake_gemini_server import Answer, FakeGeminiServer, RecordedRequest, Sleep, Status
from fake_gemini_server import matrix_responder, query_class, similarity_answer
from megu_jax.oracles import gemini

SECRET = "test-key-SECRET-1234"
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat")
SCORES = np.array([[0, 1, 8, 3, 7.5],
                   [1, 0, 1, 2, 0],
                   [8, 0.5, 0, 2, 9],
                   [4, 2, 2, 0, 3],
                   [7, 0, 9.5, 3, 0]], dtype=float)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
  for name in ("GEMINI_API_KEY", "GOOGLE_API_KEY", gemini.BASE_URL_ENV_VAR,
               "GOOGLE_GEMINI_BASE_URL", "GOOGLE_GENAI_USE_VERTEXAI"):
    monkeypatch.delenv(name, raising=False)
  monkeypatch.setenv("GEMINI_API_KEY", SECRET)


class SleepRecorder:
  def __init__(self):
    self.delays = []

  def __call__(self, seconds):
    self.delays.append(seconds)


def make_oracle(server, tmp_path, **overrides):
  kwargs = dict(base_url=server.base_url, cache_dir=str(tmp_path / "cache"), timeout_s=5.0,
                max_retries=2, backoff_base_s=0.001, sleep=SleepRecorder())
  kwargs.update(overrides)
  return gemini.GeminiOracle(**kwargs)


def files_under(directory):
  return sorted(p for p in pathlib.Path(directory).rglob("*") if p.is_file())


def expected_scores():
  expected = SCORES.copy()
  np.fill_diagonal(expected, 0.0)
  return expected


def test_full_build_sends_one_well_formed_request_per_class(tmp_path):
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES)) as server:
    oracle = make_oracle(server, tmp_path, model="gemini-test-flash")
    scores, record = oracle.class_scores_with_provenance(CLASSES)
  np.testing.assert_array_equal(scores, expected_scores())
  assert server.request_count == len(CLASSES) == oracle.requests_sent
  assert sorted(query_class(r) for r in server.requests) == sorted(CLASSES)
  for request in server.requests:
    assert re.fullmatch(r"/v1[a-z0-9]*/models/gemini-test-flash:generateContent", request.path)
    assert request.headers["x-goog-api-key"] == SECRET
    assert all(f"- {name}\n" in request.prompt for name in CLASSES)
    assert request.num_images == 0
    config = request.body["generationConfig"]
    assert config["responseMimeType"] == "application/json"
    enum = config["responseJsonSchema"]["properties"]["similarities"]["items"]["properties"][
        "class"]["enum"]
    assert sorted(enum) == sorted(set(CLASSES) - {query_class(request)})
  assert record["oracle"] == "gemini" and record["model"] == "gemini-test-flash"
  assert record["model_versions"] == ["fake-gemini-001"]
  assert len(record["prompt_sha256"]) == 64 and record["images_per_class"] == 0


def test_rerun_is_served_from_the_cache_with_zero_requests(tmp_path):
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES)) as server:
    first = make_oracle(server, tmp_path).class_scores(CLASSES)
  with FakeGeminiServer() as server:  # no responder: any request would get an error
    rerun = make_oracle(server, tmp_path)
    second = rerun.class_scores(CLASSES)
  assert server.request_count == 0 and rerun.cache_hits == len(CLASSES)
  np.testing.assert_array_equal(first, second)


def test_cache_is_keyed_by_model(tmp_path):
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES)) as server:
    make_oracle(server, tmp_path, model="model-a").class_scores(CLASSES)
    make_oracle(server, tmp_path, model="model-b").class_scores(CLASSES)
  assert server.request_count == 2 * len(CLASSES)


def test_multimodal_variant_sends_the_example_images_of_the_query_class(tmp_path):
  rng = np.random.default_rng(0)
  examples = [rng.integers(0, 255, (2, 28, 28, 1), dtype=np.uint8) for _ in CLASSES]
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES)) as server:
    oracle = make_oracle(server, tmp_path)
    scores, record = oracle.class_scores_with_provenance(CLASSES, examples)
    text_only = make_oracle(server, tmp_path).class_scores(CLASSES)  # other key: new requests
  np.testing.assert_array_equal(scores, expected_scores())
  np.testing.assert_array_equal(text_only, expected_scores())
  assert server.request_count == 2 * len(CLASSES)
  assert [r.num_images for r in server.requests[:len(CLASSES)]] == [2] * len(CLASSES)
  assert record["images_per_class"] == 2 and len(record["images_sha256"]) == 64
  first_part = server.requests[0].body["contents"][0]["parts"][0]
  assert '"image/png"' in json.dumps(first_part)


def test_429_is_retried_with_backoff_then_succeeds(tmp_path):
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES), script=[Status(429)]) as server:
    oracle = make_oracle(server, tmp_path, backoff_base_s=0.5)
    scores = oracle.class_scores(CLASSES)
  np.testing.assert_array_equal(scores, expected_scores())
  assert server.request_count == len(CLASSES) + 1
  assert len(oracle._sleep.delays) == 1 and 0.5 <= oracle._sleep.delays[0] <= 0.625


def test_backoff_doubles_per_retry(tmp_path):
  script = [Status(503), Status(503), Status(503)]
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES), script=script) as server:
    oracle = make_oracle(server, tmp_path, max_retries=3, backoff_base_s=0.1)
    oracle.class_scores(CLASSES)
  lower_bounds = np.array([0.1, 0.2, 0.4])
  assert np.all(np.array(oracle._sleep.delays) >= lower_bounds)
  assert np.all(np.array(oracle._sleep.delays) <= 1.25 * lower_bounds + 1e-9)


def test_500_is_retried_then_succeeds(tmp_path):
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES), script=[Status(500)]) as server:
    scores = make_oracle(server, tmp_path).class_scores(CLASSES)
  np.testing.assert_array_equal(scores, expected_scores())
  assert server.request_count == len(CLASSES) + 1


def test_persistent_500_fails_cleanly_after_the_retries(tmp_path):
  with FakeGeminiServer(lambda request: Status(500, "backend down")) as server:
    oracle = make_oracle(server, tmp_path, max_retries=2)
    with pytest.raises(gemini.GeminiRequestError, match="after 3 attempts.*HTTP 500.*backend down"):
      oracle.class_scores(CLASSES)
  assert server.request_count == 3  # a server failure stops the run: no hammering on other rows
  assert not [p for p in files_under(tmp_path / "cache") if p.suffix == ".json"]


@pytest.mark.parametrize("code", [400, 403, 404])
def test_a_client_error_is_not_retried(tmp_path, code):
  with FakeGeminiServer(lambda request: Status(code, "no such thing")) as server:
    with pytest.raises(gemini.GeminiRequestError, match=f"rejected, HTTP {code}"):
      make_oracle(server, tmp_path).class_scores(CLASSES)
  assert server.request_count == 1


def test_a_timeout_is_retried(tmp_path):
  responder = matrix_responder(CLASSES, SCORES)
  with FakeGeminiServer(responder, script=[Sleep(2.0)]) as server:
    oracle = make_oracle(server, tmp_path, timeout_s=0.4)
    start = time.monotonic()
    scores = oracle.class_scores(CLASSES)
    elapsed = time.monotonic() - start
  np.testing.assert_array_equal(scores, expected_scores())
  assert server.request_count == len(CLASSES) + 1
  assert elapsed < 1.9  # the client gave up on the slow answer instead of waiting for it


def test_timeouts_that_persist_fail_cleanly(tmp_path):
  with FakeGeminiServer(lambda request: Sleep(1.0)) as server:
    with pytest.raises(gemini.GeminiRequestError, match="after 2 attempts.*Timeout"):
      make_oracle(server, tmp_path, timeout_s=0.2, max_retries=1).class_scores(CLASSES)


def test_a_connection_error_is_retried(tmp_path):
  with FakeGeminiServer() as server:
    dead_url = server.base_url  # nothing listens here once the server is closed
  oracle = gemini.GeminiOracle(base_url=dead_url, cache_dir=str(tmp_path / "cache"),
                               timeout_s=2.0, max_retries=1, backoff_base_s=0.001,
                               sleep=SleepRecorder())
  with pytest.raises(gemini.GeminiRequestError, match="after 2 attempts.*ConnectError"):
    oracle.class_scores(CLASSES)
  assert len(oracle._sleep.delays) == 1


def _malformed_for(target, bad_text):
  """A responder that answers ``bad_text`` for the target class and correctly for the others."""
  good = matrix_responder(CLASSES, SCORES)
  return lambda request: Answer(bad_text) if query_class(request) == target else good(request)


def _answer_without(query, dropped):
  return json.dumps({"similarities": [
      {"class": n, "score": 1.0} for n in CLASSES if n not in (query, dropped)]})


@pytest.mark.parametrize("bad_text, message", [
    ("the classes are similar", "not JSON"),
    (_answer_without("Dress", "Coat"), "no score for ['Coat']"),
    (similarity_answer(CLASSES, "Dress", [1, 1, 1, 0, 1]).replace("Coat", "Hoodie"),
     "unknown class 'Hoodie'"),
    (similarity_answer(CLASSES, "Dress", [1, 1, 11, 0, 1]), "must be a number in [0, 10], got 11"),
])
def test_a_malformed_answer_is_retried_then_reported_with_its_raw_text(tmp_path, bad_text,
                                                                       message):
  with FakeGeminiServer(_malformed_for("Dress", bad_text)) as server:
    oracle = make_oracle(server, tmp_path, max_retries=2)
    with pytest.raises(gemini.GeminiAnswerError) as error:
      oracle.class_scores(CLASSES)
  assert message in str(error.value) and "row 3 (Dress)" in str(error.value)
  assert "1 of 5 rows had no valid answer" in str(error.value)
  assert server.request_count == len(CLASSES) - 1 + 3  # the other rows were still asked
  rejected = [p for p in files_under(tmp_path / "cache") if ".rejected-" in p.name]
  assert len(rejected) == 3 and all(p.read_text() == bad_text for p in rejected)
  assert str(rejected[-1]) in str(error.value)

  # The rerun continues where the first stopped: only the failed row is asked again.
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES)) as server:
    scores = make_oracle(server, tmp_path).class_scores(CLASSES)
  assert server.request_count == 1
  np.testing.assert_array_equal(scores, expected_scores())


def test_a_malformed_answer_followed_by_a_good_one_is_accepted(tmp_path):
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES), script=[Answer("{}")]) as server:
    scores = make_oracle(server, tmp_path).class_scores(CLASSES)
  np.testing.assert_array_equal(scores, expected_scores())
  assert server.request_count == len(CLASSES) + 1


def test_no_api_key_fails_at_once_naming_the_variable(tmp_path, monkeypatch):
  monkeypatch.delenv("GEMINI_API_KEY")
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES)) as server:
    with pytest.raises(gemini.MissingApiKeyError, match="set the environment variable "
                       "GEMINI_API_KEY"):
      make_oracle(server, tmp_path)
  assert server.request_count == 0
  assert not (tmp_path / "cache").exists()


def test_google_api_key_is_the_fallback_and_env_sets_the_base_url(tmp_path, monkeypatch):
  monkeypatch.delenv("GEMINI_API_KEY")
  monkeypatch.setenv("GOOGLE_API_KEY", "other-key-5678")
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES)) as server:
    monkeypatch.setenv(gemini.BASE_URL_ENV_VAR, server.base_url)
    oracle = gemini.GeminiOracle(cache_dir=str(tmp_path / "cache"), backoff_base_s=0.0)
    oracle.class_scores(CLASSES)
  assert oracle.base_url == server.base_url
  assert {r.headers["x-goog-api-key"] for r in server.requests} == {"other-key-5678"}


def test_the_key_never_reaches_a_file_a_message_or_a_repr(tmp_path):
  # A hostile endpoint that echoes the key back in errors and answers.
  script = [Status(429, f"quota for key={SECRET}"), Status(400, f"bad key {SECRET}")]
  with FakeGeminiServer(script=script) as server:
    oracle = make_oracle(server, tmp_path)
    with pytest.raises(gemini.GeminiRequestError) as request_error:
      oracle.class_scores(CLASSES)
  with FakeGeminiServer(lambda request: Answer(f'{{"similarities": "{SECRET}"}}')) as server:
    with pytest.raises(gemini.GeminiAnswerError) as answer_error:
      make_oracle(server, tmp_path, max_retries=0).class_scores(CLASSES)
  texts = [str(request_error.value), repr(request_error.value), str(answer_error.value),
           repr(oracle), str(vars(oracle).get("cache_dir"))]
  assert request_error.value.__cause__ is None and request_error.value.__suppress_context__
  assert "[REDACTED]" in str(request_error.value)
  for path in files_under(tmp_path):
    texts.append(path.read_text(errors="replace"))
  assert len(texts) > 6
  assert not [t for t in texts if SECRET in t]


def test_parse_similarity_answer_ignores_the_query_class_and_matches_names_loosely():
  text = json.dumps({"similarities": [
      {"class": "t-shirt/TOP", "score": 3}, {"class": "Trouser", "score": 99},  # query: ignored
      {"class": "Pullover", "score": 0}, {"class": " Dress ", "score": 10.0},
      {"class": "coat", "score": 2.5}]})
  np.testing.assert_array_equal(gemini.parse_similarity_answer(text, CLASSES, 1),
                                [3, 0, 0, 10, 2.5])


@pytest.mark.parametrize("text, message", [
    ("[1, 2]", "must be a JSON object"),
    ('{"scores": []}', 'no "similarities" list'),
    ('{"similarities": [{"class": "Coat"}]}', '{"class": NAME, "score": NUMBER}'),
    ('{"similarities": [{"class": "Coat", "score": true}]}', "got True"),
    ('{"similarities": [{"class": "Coat", "score": "5"}]}', "got '5'"),
    ('{"similarities": [{"class": "Coat", "score": -1}]}', "got -1"),
    ('{"similarities": [{"class": 3, "score": 1}]}', "must be a string"),
    ('{"similarities": [{"class": "Coat", "score": 1}, {"class": "coat", "score": 1}]}',
     "'Coat' appears more than once"),
])
def test_parse_similarity_answer_rejects(text, message):
  with pytest.raises(gemini.MalformedAnswerError) as error:
    gemini.parse_similarity_answer(text, CLASSES, 0)
  assert message in str(error.value)


def _sample_responder(answer_for_source):
  def respond(request: RecordedRequest):
    source = re.search(r'is labelled "([^"]*)"', request.prompt).group(1)
    return Answer(json.dumps({"class": answer_for_source[source]}))
  return respond


def test_per_sample_mode_labels_each_image_and_caches_per_image(tmp_path):
  rng = np.random.default_rng(1)
  images = rng.integers(0, 255, (4, 28, 28, 1), dtype=np.uint8)
  sources = np.array([4, 4, 0, 2])
  answers = {"Coat": "Pullover", "T-shirt/top": "Dress", "Pullover": "Coat"}
  with FakeGeminiServer(_sample_responder(answers)) as server:
    labels = make_oracle(server, tmp_path).label_samples(images, CLASSES, sources)
    assert server.request_count == 4
    assert all(r.num_images == 1 for r in server.requests)
    again = make_oracle(server, tmp_path).label_samples(images[::-1], CLASSES, sources[::-1])
    assert server.request_count == 4  # every image was cached
  assert labels.dtype == np.int32
  np.testing.assert_array_equal(labels, [2, 2, 3, 4])
  np.testing.assert_array_equal(again, labels[::-1])


def test_per_sample_answer_naming_the_own_class_is_rejected(tmp_path):
  images = np.zeros((2, 8, 8, 3), np.uint8)
  with FakeGeminiServer(_sample_responder({"Coat": "Coat"})) as server:
    with pytest.raises(gemini.GeminiAnswerError, match="own class 'Coat'"):
      make_oracle(server, tmp_path, max_retries=0).label_samples(images, CLASSES, [4, 4])


@pytest.mark.parametrize("kwargs, message", [
    ({"timeout_s": 0}, "timeout_s"),
    ({"max_retries": -1}, "max_retries"),
    ({"model": ""}, "model"),
])
def test_bad_constructor_arguments_fail_early(tmp_path, kwargs, message):
  with pytest.raises(ValueError, match=message):
    gemini.GeminiOracle(cache_dir=str(tmp_path), **kwargs)


def test_bad_class_names_fail_before_any_request(tmp_path):
  with FakeGeminiServer(matrix_responder(CLASSES, SCORES)) as server:
    oracle = make_oracle(server, tmp_path)
    with pytest.raises(ValueError, match="distinct"):
      oracle.class_scores(["Coat", "coat"])
    with pytest.raises(ValueError, match="one array per class"):
      oracle.class_scores(CLASSES, [np.zeros((1, 8, 8, 1), np.uint8)])
  assert server.request_count == 0
