"""A local HTTP server speaking the Gemini REST `generateContent` API, for tests of the caption stage.

The real google-genai client is pointed at it through `base_url`. What the server answers is
scripted per image: the test registers, for the sha256 of an image's PNG bytes, a list of
behaviours that successive requests for that image consume; when a list runs out (or none was
registered) the image gets `default`. Every request is recorded.

    with FakeGemini() as server:
        server.script(png_sha, [Status(429, retry_after=0.05), Ok()])
        ...  # GeminiConfig(base_url=server.url, ...)
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

_ROUTE = re.compile(r"^/(?P<version>v1(?:beta|alpha)?)/models/(?P<model>[^/:]+):generateContent$")


@dataclass(frozen=True)
class Ok:
    """A normal answer; `text=None` answers `caption_for(sha)`."""

    text: str | None = None
    delay_s: float = 0.0


@dataclass(frozen=True)
class Status:
    """An error status with Google's error body (and a Retry-After header when given)."""

    code: int
    retry_after: float | None = None
    message: str = "scripted error"
    # google.rpc.ErrorInfo reason (e.g. API_KEY_INVALID) and google.rpc.RetryInfo delay ("2s").
    reason: str | None = None
    retry_delay: str | None = None


@dataclass(frozen=True)
class Sleep:
    """Sleep before answering (longer than the client's timeout: the client gives up)."""

    seconds: float


@dataclass(frozen=True)
class BlockedPrompt:
    """`promptFeedback.blockReason` set and no candidates."""

    reason: str = "SAFETY"


@dataclass(frozen=True)
class Finish:
    """A candidate that stopped for another reason than STOP, without content."""

    reason: str = "SAFETY"


@dataclass(frozen=True)
class Malformed:
    """HTTP 200 with a body that is not JSON."""

    body: bytes = b'{"candidates": [{"content": '


@dataclass(frozen=True)
class Empty:
    """A candidate whose only part is empty text."""


Behaviour = Ok | Status | Sleep | BlockedPrompt | Finish | Malformed | Empty


def caption_for(sha: str) -> str:
    return f"a scripted caption of image {sha[:12]} with a red square"


@dataclass
class Request:
    model: str
    api_version: str
    image_sha: str | None
    mime_type: str | None
    prompt: str | None
    headers: dict[str, str]
    behaviour: str
    at: float = field(default_factory=time.monotonic)


class FakeGemini:
    """ThreadingHTTPServer on 127.0.0.1 (random free port) in a daemon thread."""

    def __init__(self, default: Behaviour = Ok(), delay_s: float = 0.0, echo_key: bool = False):
        self.default = default
        # Every answer waits this long (to make a run slow enough to kill in the middle).
        self.delay_s = delay_s
        # Error messages repeat the API key the request carried (to test that we redact it).
        self.echo_key = echo_key
        self.requests: list[Request] = []
        self._scripts: dict[str, list[Behaviour]] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def script(self, image_sha: str, behaviours: list[Behaviour]) -> None:
        with self._lock:
            self._scripts[image_sha] = list(behaviours)

    def requests_for(self, image_sha: str) -> list[Request]:
        with self._lock:
            return [r for r in self.requests if r.image_sha == image_sha]

    def __enter__(self) -> "FakeGemini":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    # ------------------------------------------------------------------ request handling

    def _next_behaviour(self, image_sha: str | None) -> Behaviour:
        with self._lock:
            queue = self._scripts.get(image_sha or "")
            return queue.pop(0) if queue else self.default

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
                pass

            def do_POST(self) -> None:
                match = _ROUTE.match(self.path.split("?", 1)[0])
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if match is None:
                    self._send_json(404, _error(404, f"no route {self.path}", "NOT_FOUND"))
                    return
                image_sha, mime_type, prompt = _parse_request(body)
                behaviour = server._next_behaviour(image_sha)
                with server._lock:
                    server.requests.append(
                        Request(
                            model=match["model"],
                            api_version=match["version"],
                            image_sha=image_sha,
                            mime_type=mime_type,
                            prompt=prompt,
                            headers={k.lower(): v for k, v in self.headers.items()},
                            behaviour=type(behaviour).__name__,
                        )
                    )
                if server.delay_s:
                    time.sleep(server.delay_s)
                try:
                    self._answer(behaviour, image_sha or "")
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout) or was killed

            def _answer(self, behaviour: Behaviour, image_sha: str) -> None:
                if isinstance(behaviour, Ok):
                    time.sleep(behaviour.delay_s)
                    self._send_json(200, _candidate(behaviour.text or caption_for(image_sha), "STOP"))
                elif isinstance(behaviour, Status):
                    headers = {}
                    if behaviour.retry_after is not None:
                        headers["Retry-After"] = f"{behaviour.retry_after:g}"
                    status = {400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL"}.get(
                        behaviour.code, "UNAVAILABLE" if behaviour.code >= 500 else "FAILED_PRECONDITION"
                    )
                    message = behaviour.message
                    if server.echo_key:
                        message += f" (request key: {self.headers.get('x-goog-api-key')})"
                    payload = _error(behaviour.code, message, status)
                    if behaviour.reason:
                        payload["error"]["details"] = [
                            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": behaviour.reason}
                        ]
                    if behaviour.retry_delay:
                        payload["error"].setdefault("details", []).append(
                            {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": behaviour.retry_delay}
                        )
                    self._send_json(behaviour.code, payload, headers)
                elif isinstance(behaviour, Sleep):
                    time.sleep(behaviour.seconds)
                    self._send_json(200, _candidate(caption_for(image_sha), "STOP"))
                elif isinstance(behaviour, BlockedPrompt):
                    self._send_json(200, {"promptFeedback": {"blockReason": behaviour.reason}})
                elif isinstance(behaviour, Finish):
                    self._send_json(200, {"candidates": [{"finishReason": behaviour.reason, "index": 0}]})
                elif isinstance(behaviour, Malformed):
                    self._send_raw(200, behaviour.body, "application/json")
                elif isinstance(behaviour, Empty):
                    self._send_json(200, _candidate("", "STOP"))
                else:
                    raise TypeError(f"unknown behaviour {behaviour!r}")

            def _send_json(self, code: int, payload: dict, headers: dict[str, str] | None = None) -> None:
                self._send_raw(code, json.dumps(payload).encode(), "application/json; charset=UTF-8", headers)

            def _send_raw(
                self, code: int, body: bytes, content_type: str, headers: dict[str, str] | None = None
            ) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in (headers or {}).items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

        return Handler


def _parse_request(body: bytes) -> tuple[str | None, str | None, str | None]:
    """(sha256 of the inline image, its mime type, the text prompt) of a generateContent body."""
    payload = json.loads(body)
    image_sha = mime_type = prompt = None
    for content in payload.get("contents", []):
        for part in content.get("parts", []):
            inline = part.get("inlineData") or part.get("inline_data")
            if inline:
                data = inline["data"]  # the SDK sends URL-safe base64, possibly unpadded
                raw = base64.urlsafe_b64decode(data.replace("+", "-").replace("/", "_") + "=" * (-len(data) % 4))
                image_sha = hashlib.sha256(raw).hexdigest()
                mime_type = inline.get("mimeType") or inline.get("mime_type")
            if "text" in part:
                prompt = part["text"]
    return image_sha, mime_type, prompt


def _candidate(text: str, finish_reason: str) -> dict:
    return {
        "candidates": [
            {
                "content": {"parts": [{"text": text}], "role": "model"},
                "finishReason": finish_reason,
                "index": 0,
            }
        ],
        "usageMetadata": {"promptTokenCount": 300, "candidatesTokenCount": 20, "totalTokenCount": 320},
        "modelVersion": "fake-gemini",
    }


def _error(code: int, message: str, status: str) -> dict:
    return {"error": {"code": code, "message": message, "status": status}}

