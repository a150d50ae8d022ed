"""A local HTTP server speaking the Gemini REST API, for tests of the caption stage.

The real google-genai client is pointed at it through `base_url`. What the server answers is
scripted per image: the test registers, for the sha256 of an image's PNG bytes, a list of
behaviours that successive requests for that image consume; when a list runs out (or none was
registered) the image gets `default`. Every request is recorded.

    with FakeGemini() as server:
        server.script(png_sha, [Status(429, retry_after=0.05), Ok()])
        ...  # GeminiConfig(base_url=server.url, ...)

Besides the synchronous `models/{model}:generateContent` it speaks the Batch API the way the
v1beta REST reference describes it (and google-genai 3.x calls it): the Files API's resumable
upload (`POST /upload/v1beta/files`, start then `upload, finalize` with X-Goog-Upload-* headers),
`POST /v1beta/models/{model}:batchGenerateContent` with `batch.inputConfig.fileName`, which
answers a long-running operation named `batches/{id}` whose `metadata` is the GenerateContentBatch
(`state`: BATCH_STATE_PENDING, _RUNNING, _SUCCEEDED, _FAILED, _CANCELLED, _EXPIRED), polled with
`GET /v1beta/batches/{id}`; a succeeded job names its JSONL results in `metadata.output.responsesFile`
(and `response.responsesFile`), downloaded from `GET /v1beta/files/{id}:download?alt=media`: one
line per request, `{"key", "response": GenerateContentResponse}` or `{"key", "error": Status}`.
Each line of a job consumes the image's script like a synchronous request; `Malformed` writes a
line that is not JSON and `Missing` writes none. Jobs advance one state per poll unless `hold` is
set, and end in the state `script_jobs` queued for them (default BATCH_STATE_SUCCEEDED).
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
from typing import Callable

_ROUTE = re.compile(r"^/(?P<version>v1(?:beta|alpha)?)/models/(?P<model>[^/:]+):generateContent$")
_BATCH_CREATE = re.compile(r"^/(?P<version>v1(?:beta|alpha)?)/models/(?P<model>[^/:]+):batchGenerateContent$")
_BATCH_GET = re.compile(r"^/(?P<version>v1(?:beta|alpha)?)/batches/(?P<id>[^/:]+)$")
_BATCH_LIST = re.compile(r"^/(?P<version>v1(?:beta|alpha)?)/batches$")
_UPLOAD = re.compile(r"^/upload/(?P<version>v1(?:beta|alpha)?)/files$")
_DOWNLOAD = re.compile(r"^(?:/download)?/(?P<version>v1(?:beta|alpha)?)/files/(?P<id>[^/:]+):download$")
_BATCH_METADATA_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatch"
_BATCH_OUTPUT_TYPE = "type.googleapis.com/google.ai.generativelanguage.v1beta.GenerateContentBatchOutput"
TERMINAL_STATES = frozenset({"BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_CANCELLED", "BATCH_STATE_EXPIRED"})


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


@dataclass(frozen=True)
class Missing:
    """Batch only: the results file has no line for this request."""


Behaviour = Ok | Status | Sleep | BlockedPrompt | Finish | Malformed | Empty | Missing


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
    # The batch job that carried the request (None: a synchronous generateContent).
    batch: str | None = None


@dataclass
class FakeBatch:
    """One submitted batch job: its input lines, where it stands, and its results file."""

    name: str
    model: str
    display_name: str
    input_file: str
    lines: list[dict]
    outcome: str
    headers: dict[str, str]
    state: str = "BATCH_STATE_PENDING"
    polls: int = 0
    output_file: str | None = None
    created_at: float = field(default_factory=time.time)


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
        # Batch API state: uploaded and generated files, jobs in submission order, scripts.
        self.files: dict[str, bytes] = {}
        self.uploads: list[str] = []
        self.batches: dict[str, FakeBatch] = {}
        self.submissions: list[FakeBatch] = []
        self.batch_polls = 0
        # While set, jobs stay BATCH_STATE_PENDING however often they are polled.
        self.hold = False
        # Polls a job takes from PENDING to its final state (RUNNING in between).
        self.polls_to_finish = 2
        # Called with the job before each poll is answered (a test looks at what was recorded by then).
        self.on_poll: Callable[[FakeBatch], None] | None = None
        self._job_outcomes: list[str] = []
        self._create_answers: list[Behaviour] = []
        self._poll_answers: list[Behaviour] = []
        self._uploading: dict[str, bytearray] = {}
        self._ids = 0
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

    def script_jobs(self, outcomes: list[str]) -> None:
        """Final states of the next jobs submitted, in order (then BATCH_STATE_SUCCEEDED)."""
        with self._lock:
            self._job_outcomes = list(outcomes)

    def script_submissions(self, answers: list[Behaviour]) -> None:
        """What the next batchGenerateContent calls answer: a `Status` is an error, else the job is created."""
        with self._lock:
            self._create_answers = list(answers)

    def script_polls(self, answers: list[Behaviour]) -> None:
        """What the next batches.get calls answer: a `Status` is an error, else the job as it stands."""
        with self._lock:
            self._poll_answers = list(answers)

    def _new_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}{self._ids:04d}x{hashlib.sha256(str(time.time_ns()).encode()).hexdigest()[:8]}"

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
                path = self.path.split("?", 1)[0]
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                try:
                    if _UPLOAD.match(path):
                        self._upload(body)
                        return
                    batch = _BATCH_CREATE.match(path)
                    if batch:
                        self._create_batch(batch["model"], body)
                        return
                except (BrokenPipeError, ConnectionResetError):
                    return
                match = _ROUTE.match(path)
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

            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                try:
                    if match := _BATCH_GET.match(path):
                        self._get_batch(f"batches/{match['id']}")
                    elif _BATCH_LIST.match(path):
                        with server._lock:
                            jobs = [_operation(job) for job in server.submissions]
                        self._send_json(200, {"operations": jobs})
                    elif match := _DOWNLOAD.match(path):
                        data = server.files.get(f"files/{match['id']}")
                        if data is None:
                            self._send_json(404, _error(404, f"file {match['id']} not found", "NOT_FOUND"))
                        else:
                            self._send_raw(200, data, "application/octet-stream")
                    else:
                        self._send_json(404, _error(404, f"no route {self.path}", "NOT_FOUND"))
                except (BrokenPipeError, ConnectionResetError):
                    pass

            # -------------------------------------------------------------- batch API

            def _upload(self, body: bytes) -> None:
                command = self.headers.get("X-Goog-Upload-Command", "")
                if command == "start":
                    if self.headers.get("X-Goog-Upload-Protocol") != "resumable":
                        self._send_json(400, _error(400, "only resumable uploads", "INVALID_ARGUMENT"))
                        return
                    upload_id = server._new_id("up")
                    with server._lock:
                        server._uploading[upload_id] = bytearray()
                    url = f"{server.url}/upload/v1beta/files?upload_id={upload_id}&upload_protocol=resumable"
                    self._send_raw(200, b"", "text/plain", {"X-Goog-Upload-URL": url, "X-Goog-Upload-Status": "active"})
                    return
                upload_id = dict(part.split("=", 1) for part in self.path.split("?", 1)[1].split("&")).get("upload_id", "")
                with server._lock:
                    buffer = server._uploading.get(upload_id)
                    if buffer is None or int(self.headers.get("X-Goog-Upload-Offset", "-1")) != len(buffer):
                        buffer = None
                    else:
                        buffer.extend(body)
                if buffer is None:
                    self._send_json(400, _error(400, "unknown upload or wrong offset", "INVALID_ARGUMENT"),
                                    {"X-Goog-Upload-Status": "final"})
                    return
                if "finalize" not in command:
                    self._send_raw(200, b"", "text/plain", {"X-Goog-Upload-Status": "active"})
                    return
                name = f"files/{server._new_id('in')}"
                with server._lock:
                    server.files[name] = bytes(server._uploading.pop(upload_id))
                    server.uploads.append(name)
                    size = len(server.files[name])
                payload = {"file": {"name": name, "mimeType": "application/jsonl", "sizeBytes": str(size),
                                    "state": "ACTIVE", "source": "UPLOADED", "uri": f"{server.url}/v1beta/{name}"}}
                self._send_json(200, payload, {"X-Goog-Upload-Status": "final"})

            def _create_batch(self, model: str, body: bytes) -> None:
                with server._lock:
                    answer = server._create_answers.pop(0) if server._create_answers else None
                if isinstance(answer, Status):
                    self._answer(answer, "")
                    return
                batch = json.loads(body).get("batch", {})
                input_file = (batch.get("inputConfig") or {}).get("fileName")
                data = server.files.get(input_file or "")
                if data is None:
                    self._send_json(400, _error(400, f"input file {input_file!r} not found", "INVALID_ARGUMENT"))
                    return
                lines = [json.loads(line) for line in data.decode().splitlines() if line.strip()]
                with server._lock:
                    outcome = server._job_outcomes.pop(0) if server._job_outcomes else "BATCH_STATE_SUCCEEDED"
                job = FakeBatch(
                    name=f"batches/{server._new_id('job')}",
                    model=f"models/{model}",
                    display_name=batch.get("displayName", ""),
                    input_file=input_file,
                    lines=lines,
                    outcome=outcome,
                    headers={k.lower(): v for k, v in self.headers.items()},
                )
                with server._lock:
                    server.batches[job.name] = job
                    server.submissions.append(job)
                self._send_json(200, _operation(job))

            def _get_batch(self, name: str) -> None:
                with server._lock:
                    job = server.batches.get(name)
                    server.batch_polls += 1
                    answer = server._poll_answers.pop(0) if server._poll_answers else None
                if isinstance(answer, Status):
                    self._answer(answer, "")
                    return
                if job is None:
                    self._send_json(404, _error(404, f"{name} not found", "NOT_FOUND"))
                    return
                if server.on_poll is not None:
                    server.on_poll(job)
                if job.state not in TERMINAL_STATES and not server.hold:
                    job.polls += 1
                    if job.polls >= server.polls_to_finish:
                        self._finish(job)
                    else:
                        job.state = "BATCH_STATE_RUNNING"
                self._send_json(200, _operation(job))

            def _finish(self, job: FakeBatch) -> None:
                job.state = job.outcome
                if job.outcome != "BATCH_STATE_SUCCEEDED":
                    return
                out: list[bytes] = []
                for line in job.lines:
                    image_sha, mime_type, prompt = _parse_request(json.dumps(line.get("request", {})).encode())
                    behaviour = server._next_behaviour(image_sha)
                    with server._lock:
                        server.requests.append(
                            Request(job.model.split("/", 1)[1], "v1beta", image_sha, mime_type, prompt,
                                    job.headers, type(behaviour).__name__, batch=job.name)
                        )
                    result = _batch_line(line.get("key"), behaviour, image_sha or "", server.echo_key, job.headers)
                    if result is not None:
                        out.append(result)
                job.output_file = f"files/{server._new_id('out')}"
                with server._lock:
                    server.files[job.output_file] = b"\n".join(out) + b"\n"

            def _answer(self, behaviour: Behaviour, image_sha: str) -> None:
                if isinstance(behaviour, Ok):
                    time.sleep(behaviour.delay_s)
                    self._send_json(200, _candidate(behaviour.text or caption_for(image_sha), "STOP"))
                elif isinstance(behaviour, Status):
                    headers = {}
                    if behaviour.retry_after is not None:
                        headers["Retry-After"] = f"{behaviour.retry_after:g}"
                    status = _status_name(behaviour.code)
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


def _status_name(code: int) -> str:
    return {400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL"}.get(
        code, "UNAVAILABLE" if code >= 500 else "FAILED_PRECONDITION"
    )


def _batch_line(key: str | None, behaviour: Behaviour, image_sha: str, echo_key: bool, headers: dict) -> bytes | None:
    """The results-file line a batch writes for one request (None: no line at all)."""
    if isinstance(behaviour, Missing):
        return None
    if isinstance(behaviour, Malformed):
        return behaviour.body
    if isinstance(behaviour, Status):
        message = behaviour.message
        if echo_key:
            message += f" (request key: {headers.get('x-goog-api-key')})"
        return json.dumps({"key": key, "error": {"code": behaviour.code, "message": message,
                                                 "status": _status_name(behaviour.code)}}).encode()
    if isinstance(behaviour, BlockedPrompt):
        response: dict = {"promptFeedback": {"blockReason": behaviour.reason}}
    elif isinstance(behaviour, Finish):
        response = {"candidates": [{"finishReason": behaviour.reason, "index": 0}]}
    elif isinstance(behaviour, Empty):
        response = _candidate("", "STOP")
    elif isinstance(behaviour, Ok):
        response = _candidate(behaviour.text or caption_for(image_sha), "STOP")
    else:  # Sleep: a batch has no timeouts to provoke
        response = _candidate(caption_for(image_sha), "STOP")
    return json.dumps({"key": key, "response": response}).encode()


def _operation(job: FakeBatch) -> dict:
    """A batch job as the API shows it: a long-running operation whose metadata is the batch."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(job.created_at))
    metadata: dict = {
        "@type": _BATCH_METADATA_TYPE,
        "name": job.name,
        "model": job.model,
        "displayName": job.display_name,
        "inputConfig": {"fileName": job.input_file},
        "createTime": created,
        "updateTime": created,
        "state": job.state,
        "batchStats": {"requestCount": str(len(job.lines))},
    }
    operation: dict = {"name": job.name, "metadata": metadata}
    if job.state in TERMINAL_STATES:
        operation["done"] = True
        metadata["endTime"] = created
        if job.output_file:
            metadata["output"] = {"responsesFile": job.output_file}
            operation["response"] = {"@type": _BATCH_OUTPUT_TYPE, "responsesFile": job.output_file}
        else:
            operation["error"] = {"code": 13, "message": f"batch ended in {job.state}"}
    return operation

