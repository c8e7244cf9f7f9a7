"""The Gemini oracle: a multimodal LLM scores how much each class resembles each other class.

It talks to the Gemini API through the google-genai client (``from google import genai``), one
``generateContent`` request per class row (or per image in per-sample mode), with a JSON response
schema. Every accepted raw answer is cached on disk, keyed by the hashes of the model name, the
prompt, the request configuration and the images, so a rerun after a failure continues where it
stopped and a complete rerun sends no request at all. Each entry carries the SHA-256 of its text; a
damaged entry (unreadable, cut off, or edited) is discarded with a warning naming it and asked for
again.

The API key is read from the environment only (GEMINI_API_KEY, else GOOGLE_API_KEY) and never
reaches a file, a log line, a cache entry, an exception message or a repr: it lives only inside the
google-genai client and a scrubbing closure that removes it from any text this module emits.

Failures are never papered over: a transient error (429, 5xx, timeout, connection) is retried with
exponential backoff; a malformed answer (not JSON, a missing or unknown class, a score outside
0..10) is retried, saved next to the cache as ``<key>.rejected-<attempt>.txt``, and finally reported.
No score matrix is returned from incomplete answers.
"""
from __future__ import annotations

import datetime
import hashlib
import importlib
import io
import json
import logging
import math
import os
import random
import re
import time
from typing import Any, Callable, Optional, Sequence

import numpy as np

from megu_jax import io_utils

DEFAULT_MODEL = "gemini-3.8-flash"
API_KEY_ENV_VARS = ("GEMINI_API_KEY", "GOOGLE_API_KEY")
BASE_URL_ENV_VAR = "MEGU_GEMINI_BASE_URL"
DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "megu_jax", "gemini")
# 408 and 429 are the server asking us to slow down; 5xx are its own transient failures.
RETRYABLE_STATUS_CODES = frozenset({408, 429, 500, 502, 503, 504})
MAX_SCORE = 10.0
# Small images (28 x 28 Fashion-MNIST) are enlarged by an integer factor until their short side is
# at least this many pixels, so the model sees shapes rather than a few blurred pixels.
MIN_IMAGE_SIDE = 224

logger = logging.getLogger(__name__)


class GeminiOracleError(RuntimeError):
  """The Gemini oracle could not produce a complete answer; the message says why."""


class MissingApiKeyError(GeminiOracleError, ValueError):
  """No API key in the environment; the message names the variable to set."""


class GeminiRequestError(GeminiOracleError):
  """A request failed for good: a non-retryable HTTP status, or retries were exhausted."""


class GeminiAnswerError(GeminiOracleError):
  """Answers stayed malformed after all retries; the raw texts are saved next to the cache."""


class MalformedAnswerError(ValueError):
  """One answer does not follow the requested format; the message says where it breaks."""


def _transport_errors() -> tuple:
  """Network-level failures of the HTTP library google-genai uses (httpx2, or httpx)."""
  errors = [ConnectionError]
  for module_name in ("httpx2", "httpx"):
    try:
      errors.append(importlib.import_module(module_name).TransportError)
    except (ImportError, AttributeError):
      continue
  return tuple(errors)


def read_api_key(env_names: Sequence[str] = API_KEY_ENV_VARS) -> str:
  """Returns the first non-empty API key among ``env_names``; raises MissingApiKeyError if none."""
  if isinstance(env_names, str):
    env_names = (env_names,)
  for name in env_names:
    value = os.environ.get(name, "").strip()
    if value:
      return value
  others = f" (or {', '.join(env_names[1:])})" if len(env_names) > 1 else ""
  raise MissingApiKeyError(
      f"no Gemini API key found: set the environment variable {env_names[0]}{others}")


def _make_scrubber(secret: str) -> Callable[[str], str]:
  """Returns a function that removes ``secret`` from any text (the secret stays in the closure)."""

  def scrub(text: Any) -> str:
    text = str(text)
    return text.replace(secret, "[REDACTED]") if secret else text

  return scrub


def _sha256(data: bytes | str) -> str:
  if isinstance(data, str):
    data = data.encode("utf-8")
  return hashlib.sha256(data).hexdigest()


def image_sha256(image: np.ndarray) -> str:
  """Hash of an image's pixels, shape and dtype (stable across image-encoder versions)."""
  image = np.ascontiguousarray(image)
  header = f"{image.dtype.str}{image.shape}".encode("ascii")
  return _sha256(header + image.tobytes())


def encode_png(image: np.ndarray) -> bytes:
  """Encodes a uint8 [H, W, C] image (C = 1 or 3) as PNG, enlarged to a short side >= 224."""
  from PIL import Image  # pylint: disable=g-import-not-at-top  (only needed for images)

  image = np.asarray(image)
  if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(
        f"an image must be uint8 [height, width, 1 or 3], got {image.dtype} {image.shape}")
  factor = max(1, math.ceil(MIN_IMAGE_SIDE / min(image.shape[:2])))
  image = np.repeat(np.repeat(image, factor, axis=0), factor, axis=1)
  pil_image = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
  buffer = io.BytesIO()
  pil_image.save(buffer, format="PNG")
  return buffer.getvalue()


def _normalise_name(name: str) -> str:
  return " ".join(name.split()).casefold()


def _check_class_names(class_names: Sequence[str]) -> list[str]:
  names = list(class_names)
  if len(names) < 2 or not all(isinstance(n, str) and n.strip() for n in names):
    raise ValueError(f"class_names must be >= 2 non-empty strings, got {names!r}")
  normalised = [_normalise_name(n) for n in names]
  if len(set(normalised)) != len(names):
    duplicates = sorted({n for n in names if normalised.count(_normalise_name(n)) > 1})
    raise ValueError(f"class_names must be distinct (ignoring case and spacing); repeated: "
                     f"{duplicates}")
  return names


def _class_index(name: Any, class_names: Sequence[str]) -> int:
  """Index of ``name`` in class_names (case- and spacing-insensitive); MalformedAnswerError if none."""
  if not isinstance(name, str):
    raise MalformedAnswerError(f"a class name must be a string, got {name!r}")
  lookup = {_normalise_name(n): i for i, n in enumerate(class_names)}
  index = lookup.get(_normalise_name(name))
  if index is None:
    raise MalformedAnswerError(f"unknown class {name!r}; allowed: {list(class_names)}")
  return index


def _load_json_object(raw_text: str) -> dict:
  try:
    answer = json.loads(raw_text)
  except (json.JSONDecodeError, TypeError) as e:
    raise MalformedAnswerError(f"the answer is not JSON ({e})") from None
  if not isinstance(answer, dict):
    raise MalformedAnswerError(f"the answer must be a JSON object, got {type(answer).__name__}")
  return answer


def parse_similarity_answer(raw_text: str, class_names: Sequence[str],
                            query_index: int) -> np.ndarray:
  """Parses ``{"similarities": [{"class": NAME, "score": NUMBER}, ...]}`` for one query class.

  Every class other than the query must appear exactly once with a score in [0, 10]; an entry for
  the query class itself is ignored. Names match ignoring case and repeated spaces.

  Returns:
    [K] float64 scores with 0 at ``query_index``.

  Raises:
    MalformedAnswerError: naming what is wrong (not JSON, missing/unknown/repeated class, bad score).
  """
  answer = _load_json_object(raw_text)
  entries = answer.get("similarities")
  if not isinstance(entries, list):
    raise MalformedAnswerError('the answer has no "similarities" list')
  scores = np.full(len(class_names), np.nan)
  scores[query_index] = 0.0
  for entry in entries:
    if not isinstance(entry, dict) or "class" not in entry or "score" not in entry:
      raise MalformedAnswerError(f'an entry is not {{"class": NAME, "score": NUMBER}}: {entry!r}')
    index = _class_index(entry["class"], class_names)
    if index == query_index:
      continue  # The query class's similarity to itself carries no information.
    score = entry["score"]
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not \
        0.0 <= score <= MAX_SCORE:
      raise MalformedAnswerError(
          f"score for {class_names[index]!r} must be a number in [0, 10], got {score!r}")
    if not np.isnan(scores[index]):
      raise MalformedAnswerError(f"class {class_names[index]!r} appears more than once")
    scores[index] = float(score)
  missing = [class_names[i] for i in np.flatnonzero(np.isnan(scores))]
  if missing:
    raise MalformedAnswerError(f"the answer has no score for {missing}")
  return scores


def parse_sample_answer(raw_text: str, class_names: Sequence[str], source_index: int) -> int:
  """Parses ``{"class": NAME}``: the other class an image most resembles (never its own class)."""
  answer = _load_json_object(raw_text)
  if "class" not in answer:
    raise MalformedAnswerError('the answer has no "class" field')
  index = _class_index(answer["class"], class_names)
  if index == source_index:
    raise MalformedAnswerError(
        f"the answer names the image's own class {class_names[index]!r}; it must be another class")
  return index


def similarity_prompt(class_names: Sequence[str], query_index: int, num_images: int = 0,
                      dataset_description: Optional[str] = None) -> str:
  """The text of the request for one row of S (the query class is on a line of its own)."""
  listed = "\n".join(f"- {name}" for name in class_names)
  about = f' ("{dataset_description}")' if dataset_description else ""
  images = (f"The {num_images} attached image(s) are examples of the query class from this data "
            "set.\n" if num_images else "")
  return (
      f"You are building a class-similarity table for an image classification data set{about}.\n"
      f"Its classes are:\n{listed}\n"
      f'Query class: "{class_names[query_index]}"\n'
      f"{images}"
      "For every other class, rate how much it resembles the query class, visually (shape, "
      "texture, typical appearance in images) and semantically, from 0 (nothing in common) to 10 "
      "(easily confused with it).\n"
      'Answer with JSON {"similarities": [{"class": NAME, "score": NUMBER}, ...]} holding exactly '
      f"one entry for each of the {len(class_names) - 1} other classes, names spelled exactly as "
      "listed above.")


def sample_prompt(class_names: Sequence[str], source_index: int,
                  dataset_description: Optional[str] = None) -> str:
  """The text of the per-sample request: which other class does this image most resemble?"""
  listed = "\n".join(f"- {name}" for name in class_names)
  about = f' ("{dataset_description}")' if dataset_description else ""
  source = class_names[source_index]
  return (
      f"The attached image comes from an image classification data set{about} and is labelled "
      f'"{source}".\nIts classes are:\n{listed}\n'
      f'Which class other than "{source}" does this image most resemble?\n'
      'Answer with JSON {"class": NAME}, NAME spelled exactly as listed above.')


def _similarity_schema(other_names: Sequence[str]) -> dict:
  return {
      "type": "object",
      "properties": {
          "similarities": {
              "type": "array",
              "items": {
                  "type": "object",
                  "properties": {
                      "class": {"type": "string", "enum": list(other_names)},
                      "score": {"type": "number", "minimum": 0, "maximum": MAX_SCORE},
                  },
                  "required": ["class", "score"],
              },
          }
      },
      "required": ["similarities"],
  }


def _sample_schema(other_names: Sequence[str]) -> dict:
  return {
      "type": "object",
      "properties": {"class": {"type": "string", "enum": list(other_names)}},
      "required": ["class"],
  }


def _answer_text(response: Any) -> str:
  """The concatenated non-thought text parts of the first candidate ("" when there are none)."""
  candidates = getattr(response, "candidates", None) or []
  if not candidates or candidates[0].content is None or not candidates[0].content.parts:
    return ""
  return "".join(part.text for part in candidates[0].content.parts
                 if isinstance(part.text, str) and not part.thought)


class GeminiOracle:
  """Scores class similarity (and labels single images) with a Gemini model, cached on disk.

  Args:
    model: Gemini model name (default: DEFAULT_MODEL, a current Gemini Flash model).
    base_url: API endpoint; None uses env MEGU_GEMINI_BASE_URL, else the library default.
    cache_dir: where accepted answers (and rejected raw texts) are stored.
    timeout_s: per-request timeout in seconds.
    max_retries: retries after the first attempt, for transient failures and malformed answers.
    api_key_env: environment variables searched for the key, in order.
    backoff_base_s: first backoff delay; doubles per retry, capped at max_backoff_s, +0-25% jitter.
    max_backoff_s: cap on one backoff delay (also on a server's Retry-After).
    generation_temperature: sampling temperature sent with each request; None keeps the model's
      default (recommended for Gemini 3 models).
    dataset_description: optional words about the data set put into every prompt.
    sleep: the function used to wait between retries (tests pass a recorder).

  Raises:
    MissingApiKeyError: at construction, when no key is set, before any request.
  """

  def __init__(self, model: str = DEFAULT_MODEL, base_url: Optional[str] = None,
               cache_dir: str = DEFAULT_CACHE_DIR, timeout_s: float = 120.0,
               max_retries: int = 5, api_key_env: Sequence[str] = API_KEY_ENV_VARS, *,
               backoff_base_s: float = 1.0, max_backoff_s: float = 60.0,
               generation_temperature: Optional[float] = None,
               dataset_description: Optional[str] = None,
               sleep: Callable[[float], None] = time.sleep):
    if not isinstance(model, str) or not model.strip():
      raise ValueError(f"model must be a non-empty model name, got {model!r}")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
      raise ValueError(f"timeout_s must be a number > 0, got {timeout_s!r}")
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
      raise ValueError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    if not (backoff_base_s >= 0 and max_backoff_s >= 0):
      raise ValueError(f"backoff delays must be >= 0, got backoff_base_s={backoff_base_s!r}, "
                       f"max_backoff_s={max_backoff_s!r}")
    self.model = model
    self.base_url = base_url or os.environ.get(BASE_URL_ENV_VAR) or None
    self.cache_dir = os.path.expanduser(cache_dir)
    self.timeout_s = float(timeout_s)
    self.max_retries = max_retries
    self.backoff_base_s = float(backoff_base_s)
    self.max_backoff_s = float(max_backoff_s)
    self.generation_temperature = generation_temperature
    self.dataset_description = dataset_description
    self._sleep = sleep
    self._transport_errors = _transport_errors()
    # Counters for the caller's report (and the tests): requests sent, answers read from the cache.
    self.requests_sent = 0
    self.cache_hits = 0
    self.model_versions: set[str] = set()

    api_key = read_api_key(api_key_env)
    self._scrub = _make_scrubber(api_key)
    self._client = self._make_client(api_key)

  def _make_client(self, api_key: str) -> Any:
    from google import genai  # pylint: disable=g-import-not-at-top
    from google.genai import types  # pylint: disable=g-import-not-at-top

    self._types = types
    http_options = types.HttpOptions(
        base_url=self.base_url,
        timeout=max(1, int(round(self.timeout_s * 1000))),  # google-genai takes milliseconds.
        retry_options=None)  # This class retries itself: malformed answers need it anyway.
    try:
      # vertexai=False: the key is a Gemini API key even if GOOGLE_GENAI_USE_VERTEXAI is set.
      return genai.Client(api_key=api_key, vertexai=False, http_options=http_options)
    except Exception as e:  # pylint: disable=broad-except
      raise GeminiRequestError(
          f"cannot create the google-genai client: {self._scrub(e)}") from None

  def __repr__(self) -> str:
    return (f"GeminiOracle(model={self.model!r}, base_url={self.base_url!r}, "
            f"cache_dir={self.cache_dir!r}, timeout_s={self.timeout_s}, "
            f"max_retries={self.max_retries})")

  # --- requests, retries and the cache ---------------------------------------------------------

  def _generation_config(self, schema: dict) -> Any:
    return self._types.GenerateContentConfig(
        response_mime_type="application/json",
        response_json_schema=schema,
        temperature=self.generation_temperature)

  def _cache_key(self, kind: str, prompt: str, schema: dict, image_hashes: Sequence[str]) -> str:
    request = {
        "kind": kind,
        "model": self.model,
        "prompt_sha256": _sha256(prompt),
        "config_sha256": _sha256(json.dumps(
            {"schema": schema, "temperature": self.generation_temperature}, sort_keys=True)),
        "image_sha256": list(image_hashes),
    }
    return _sha256(json.dumps(request, sort_keys=True))

  def _cache_path(self, cache_key: str) -> str:
    return os.path.join(self.cache_dir, f"{cache_key}.json")

  def _read_cache(self, cache_key: str, parse: Callable[[str], Any]) -> Optional[Any]:
    path = self._cache_path(cache_key)
    if not os.path.exists(path):
      return None
    try:
      with open(path, encoding="utf-8") as f:
        entry = json.load(f)
      raw_text = entry["raw_text"]
      # The hash catches an answer changed on disk that still parses (a flipped digit in a score).
      if entry.get("raw_text_sha256") != _sha256(raw_text):
        raise ValueError("its raw_text does not match the raw_text_sha256 recorded with it")
      return parse(raw_text)
    except (OSError, ValueError, KeyError, TypeError) as e:
      # A damaged entry is a miss, not a failure: the answer is simply asked for again (and the
      # new answer replaces the entry).
      logger.warning("discarding damaged Gemini cache entry %s (%s); asking again", path,
                     self._scrub(e))
      return None

  def _backoff_s(self, retry: int, retry_after_s: Optional[float]) -> float:
    delay = min(self.max_backoff_s, self.backoff_base_s * 2.0 ** (retry - 1))
    delay *= 1.0 + 0.25 * random.random()  # Jitter keeps parallel runs from retrying in lockstep.
    if retry_after_s is not None:
      delay = max(delay, min(retry_after_s, self.max_backoff_s))
    return delay

  @staticmethod
  def _retry_after_s(error: Any) -> Optional[float]:
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    try:
      return float(headers.get("retry-after")) if headers is not None else None
    except (TypeError, ValueError):
      return None

  def _ask(self, *, kind: str, prompt: str, images: Sequence[np.ndarray], schema: dict,
           parse: Callable[[str], Any], what: str) -> Any:
    """Returns ``parse(answer)`` for one request, from the cache or from the API.

    Raises:
      GeminiRequestError: non-retryable status, or transient failures outlasted the retries.
      GeminiAnswerError: every attempt's answer was malformed.
    """
    from google.genai import errors as genai_errors  # pylint: disable=g-import-not-at-top

    image_hashes = [image_sha256(image) for image in images]
    cache_key = self._cache_key(kind, prompt, schema, image_hashes)
    cached = self._read_cache(cache_key, parse)
    if cached is not None:
      self.cache_hits += 1
      return cached

    contents = [self._types.Part.from_bytes(data=encode_png(image), mime_type="image/png")
                for image in images] + [prompt]
    config = self._generation_config(schema)
    failure: Optional[GeminiOracleError] = None
    retry_after_s = None
    for attempt in range(self.max_retries + 1):
      if attempt:
        self._sleep(self._backoff_s(attempt, retry_after_s))
      retry_after_s = None
      self.requests_sent += 1
      try:
        response = self._client.models.generate_content(
            model=self.model, contents=contents, config=config)
      except genai_errors.APIError as e:
        message = self._scrub(f"HTTP {e.code} {e.status or ''}: {e.message or e}".strip())
        if e.code not in RETRYABLE_STATUS_CODES:
          raise GeminiRequestError(f"{what}: request rejected, {message}") from None
        failure = GeminiRequestError(
            f"{what}: still failing after {attempt + 1} attempts, last: {message}")
        retry_after_s = self._retry_after_s(e)
        logger.info("%s: attempt %d failed (%s), retrying", what, attempt + 1, message)
        continue
      except self._transport_errors as e:
        message = self._scrub(f"{type(e).__name__}: {e}")
        failure = GeminiRequestError(
            f"{what}: still failing after {attempt + 1} attempts, last: {message}")
        logger.info("%s: attempt %d failed (%s), retrying", what, attempt + 1, message)
        continue

      raw_text = self._scrub(_answer_text(response))
      try:
        result = parse(raw_text)
      except MalformedAnswerError as e:
        rejected_path = os.path.join(self.cache_dir, f"{cache_key}.rejected-{attempt}.txt")
        io_utils.atomic_write_text(rejected_path, raw_text)
        failure = GeminiAnswerError(self._scrub(
            f"{what}: malformed answer after {attempt + 1} attempts ({e}); raw text saved at "
            f"{rejected_path}"))
        logger.info("%s: attempt %d gave a malformed answer (%s), retrying", what,
                    attempt + 1, self._scrub(e))
        continue

      if getattr(response, "model_version", None):
        self.model_versions.add(self._scrub(response.model_version))
      io_utils.atomic_write_json(self._cache_path(cache_key), {
          "kind": kind,
          "model": self.model,
          "model_version": getattr(response, "model_version", None),
          "prompt_sha256": _sha256(prompt),
          "image_sha256": image_hashes,
          "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
          "raw_text": raw_text,
          "raw_text_sha256": _sha256(raw_text),
      })
      return result
    raise failure  # The loop runs at least once, and only falls through after a failure.

  # --- the two public questions ----------------------------------------------------------------

  def _check_images(self, images: Any, what: str) -> np.ndarray:
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
      raise ValueError(f"{what} must be uint8 [n, height, width, 1 or 3], got {images.dtype} "
                       f"{images.shape}")
    return images

  def class_scores_with_provenance(
      self, class_names: Sequence[str],
      example_images: Optional[Sequence[Any]] = None) -> tuple[np.ndarray, dict]:
    """class_scores, plus a JSON-ready record of how S was obtained (for the provenance file)."""
    class_names = _check_class_names(class_names)
    num_classes = len(class_names)
    if example_images is not None and len(example_images) != num_classes:
      raise ValueError(f"example_images must hold one array per class ({num_classes}), got "
                       f"{len(example_images)}")
    scores = np.zeros((num_classes, num_classes))
    prompts, image_hashes, failures = [], [], []
    for query in range(num_classes):
      images = ([] if example_images is None else
                list(self._check_images(example_images[query],
                                        f"example_images[{query}] ({class_names[query]})")))
      prompt = similarity_prompt(class_names, query, len(images), self.dataset_description)
      prompts.append(prompt)
      image_hashes.extend(image_sha256(image) for image in images)
      other_names = [n for i, n in enumerate(class_names) if i != query]
      what = f"row {query} ({class_names[query]})"
      try:
        scores[query] = self._ask(
            kind="class_row", prompt=prompt, images=images, schema=_similarity_schema(other_names),
            parse=lambda text, q=query: parse_similarity_answer(text, class_names, q), what=what)
      except GeminiAnswerError as e:
        # Keep going: the other rows' answers get cached, so the rerun only repeats this one.
        failures.append(str(e))
    if failures:
      raise GeminiAnswerError(
          f"{len(failures)} of {num_classes} rows had no valid answer; no matrix is built. "
          + " | ".join(failures))
    provenance = {
        "oracle": "gemini",
        "model": self.model,
        "model_versions": sorted(self.model_versions),
        "prompt_sha256": _sha256("\n\n".join(prompts)),
        "images_sha256": _sha256("".join(image_hashes)) if image_hashes else None,
        "images_per_class": (0 if example_images is None else
                             int(max(len(images) for images in example_images))),
        "generation_temperature": self.generation_temperature,
        "base_url": "default" if self.base_url is None else _without_userinfo(self.base_url),
        "scores": scores.tolist(),
    }
    return scores, provenance

  def class_scores(self, class_names: Sequence[str],
                   example_images: Optional[Sequence[Any]] = None) -> np.ndarray:
    """Asks, for every class, how much each other class resembles it.

    Args:
      class_names: the K class names in label order.
      example_images: optional, per class a uint8 [k, H, W, C] array of k example images sent with
        that class's request (the multimodal variant).

    Returns:
      S: [K, K] float64 scores in [0, 10], zero diagonal.
    """
    return self.class_scores_with_provenance(class_names, example_images)[0]

  def label_samples(self, images: Any, class_names: Sequence[str],
                    source_labels: Any) -> np.ndarray:
    """Per-sample mode: for each image, the other class it most resembles (cached per image).

    Args:
      images: uint8 [N, H, W, C] forget images (C = 1 or 3), sent inline as PNG.
      class_names: the K class names in label order.
      source_labels: [N] int class of each image.

    Returns:
      [N] int32 labels, each != the image's own label.
    """
    class_names = _check_class_names(class_names)
    images = self._check_images(images, "images")
    source_labels = np.asarray(source_labels)
    if source_labels.shape != (images.shape[0],) or not np.issubdtype(source_labels.dtype,
                                                                       np.integer):
      raise ValueError(f"source_labels must be integers of shape [{images.shape[0]}], got "
                       f"{source_labels.dtype} {source_labels.shape}")
    if source_labels.size and (source_labels.min() < 0 or
                               source_labels.max() >= len(class_names)):
      raise ValueError(f"source_labels must lie in [0, {len(class_names)})")
    labels = np.zeros(images.shape[0], dtype=np.int32)
    failures = []
    for n, (image, source) in enumerate(zip(images, source_labels)):
      source = int(source)
      other_names = [c for i, c in enumerate(class_names) if i != source]
      try:
        labels[n] = self._ask(
            kind="sample", prompt=sample_prompt(class_names, source, self.dataset_description),
            images=[image], schema=_sample_schema(other_names),
            parse=lambda text, s=source: parse_sample_answer(text, class_names, s),
            what=f"image {n} ({class_names[source]})")
      except GeminiAnswerError as e:
        failures.append(str(e))
    if failures:
      raise GeminiAnswerError(
          f"{len(failures)} of {images.shape[0]} images had no valid answer; no labels are "
          "returned. " + " | ".join(failures[:5]) + (" | ..." if len(failures) > 5 else ""))
    return labels


def _without_userinfo(url: str) -> str:
  """Drops ``user:password@`` from a URL before it is written anywhere."""
  return re.sub(r"//[^/@]*@", "//", url)
