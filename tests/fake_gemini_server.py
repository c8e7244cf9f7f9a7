"""A local stand-in for the Gemini API's generateContent endpoint, for tests of the real client.

It is a real HTTP server on 127.0.0.1 (ThreadingHTTPServer on a free port, in a thread) serving
``POST /{api_version}/models/{model}:generateContent`` the way google-genai expects: a JSON body
with ``candidates[0].content.parts[*].text`` on success, ``{"error": {...}}`` with the status code
otherwise. Replies come from a script (consumed in order), then from a ``responder`` function of
the request; every request is recorded (path, headers, parsed body).
"""
from __future__ import annotations

import dataclasses
import http.server
import json
import re
import threading
import time
from typing import Any, Callable, Optional, Sequence

_PATH = re.compile(r"^/(?P<version>[^/]+)/models/(?P<model>[^/:]+):generateContent$")
_QUERY = re.compile(r'Query class: "(?P<name>[^"\n]*)"')
_STATUS_NAMES = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND",
                 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}


@dataclasses.dataclass
class Answer:
  """HTTP 200 whose single candidate carries ``text`` (what the model 'said')."""
  text: str


@dataclasses.dataclass
class Status:
  """An error status with a Google-style error body."""
  code: int
  message: str = "scripted failure"


@dataclasses.dataclass
class Sleep:
  """Waits ``seconds`` (past the client's timeout), then sends ``then`` if anyone still listens."""
  seconds: float
  then: Optional[Any] = None


Reply = Answer | Status | Sleep


@dataclasses.dataclass
class RecordedRequest:
  path: str
  headers: dict
  body: dict

  @property
  def prompt(self) -> str:
    """The concatenated text parts of the request."""
    parts = self.body["contents"][0]["parts"]
    return "\n".join(part["text"] for part in parts if "text" in part)

  @property
  def num_images(self) -> int:
    return sum("inlineData" in part or "inline_data" in part
               for part in self.body["contents"][0]["parts"])


def query_class(request: RecordedRequest) -> str:
  """The class a similarity request asks about (the prompt has a line ``Query class: "NAME"``)."""
  match = _QUERY.search(request.prompt)
  if match is None:
    raise ValueError(f"no query class in prompt: {request.prompt!r}")
  return match.group("name")


def similarity_answer(class_names: Sequence[str], query: str, row: Sequence[float]) -> str:
  """A well-formed answer giving ``row[j]`` as the score of every class j other than ``query``."""
  return json.dumps({"similarities": [
      {"class": name, "score": float(score)}
      for name, score in zip(class_names, row) if name != query]})


def matrix_responder(class_names: Sequence[str], scores: Any) -> Callable[[RecordedRequest], Reply]:
  """Answers each similarity request with the matching row of ``scores``."""

  def respond(request: RecordedRequest) -> Reply:
    query = query_class(request)
    return Answer(similarity_answer(class_names, query, scores[list(class_names).index(query)]))

  return respond


class FakeGeminiServer:
  """Usage: ``with FakeGeminiServer(responder) as server: ... server.base_url ...``."""

  def __init__(self, responder: Optional[Callable[[RecordedRequest], Reply]] = None,
               script: Sequence[Reply] = ()):
    self.responder = responder
    self.script = list(script)
    self.requests: list[RecordedRequest] = []
    self._lock = threading.Lock()
    self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
    # A handler still sleeping past the client's timeout must not hold up shutdown.
    self._httpd.daemon_threads = True
    self._httpd.block_on_close = False
    # A short poll interval: shutdown() waits for the serving loop to notice, 0.5 s by default.
    self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02},
                                    daemon=True)

  @property
  def base_url(self) -> str:
    return f"http://127.0.0.1:{self._httpd.server_address[1]}"

  @property
  def request_count(self) -> int:
    with self._lock:
      return len(self.requests)

  def __enter__(self) -> "FakeGeminiServer":
    self._thread.start()
    return self

  def __exit__(self, *exc_info: Any) -> None:
    self._httpd.shutdown()
    self._httpd.server_close()

  def _next_reply(self, request: RecordedRequest) -> Reply:
    with self._lock:
      self.requests.append(request)
      if self.script:
        return self.script.pop(0)
    if self.responder is None:
      return Status(500, "no scripted reply left and no responder")
    return self.responder(request)

  def _handler_class(self) -> type:
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"
      # Headers and body go out in separate writes; without TCP_NODELAY, Nagle's algorithm and
      # the client's delayed ACK add ~40 ms to every response.
      disable_nagle_algorithm = True

      def log_message(self, *args: Any) -> None:  # Keep test output clean.
        pass

      def _send(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode("utf-8")
        try:
          self.send_response(code)
          self.send_header("Content-Type", "application/json")
          self.send_header("Content-Length", str(len(data)))
          self.end_headers()
          self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
          pass  # The client gave up (its timeout): nothing left to do.

      def _send_reply(self, reply: Reply) -> None:
        if isinstance(reply, Sleep):
          time.sleep(reply.seconds)
          self._send_reply(reply.then or Status(500, "answer after timeout"))
        elif isinstance(reply, Status):
          self._send(reply.code, {"error": {
              "code": reply.code, "message": reply.message,
              "status": _STATUS_NAMES.get(reply.code, "UNKNOWN")}})
        else:
          self._send(200, {
              "candidates": [{"content": {"role": "model", "parts": [{"text": reply.text}]},
                              "finishReason": "STOP", "index": 0}],
              "modelVersion": "fake-gemini-001"})

      def do_POST(self) -> None:  # pylint: disable=invalid-name
        length = int(self.headers.get("Content-Length", 0))
        raw_body = self.rfile.read(length)
        if not _PATH.match(self.path):
          self._send(404, {"error": {"code": 404, "message": f"no route {self.path}",
                                     "status": "NOT_FOUND"}})
          return
        request = RecordedRequest(self.path, dict(self.headers), json.loads(raw_body or b"{}"))
        self._send_reply(server._next_reply(request))

    return Handler
