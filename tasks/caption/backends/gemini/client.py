"""Captions from Gemini through the google-genai client, with our own retries.

The SDK's retries are switched off (`HttpRetryOptions(attempts=1)`) so that one policy decides:
429, 5xx, 408 and transport errors (timeouts, dropped connections) are retried up to
`max_retries` times with exponential backoff and full jitter, waiting what the server asks for
(Retry-After, or Google's RetryInfo) when it says. Answers that carry no usable caption
(blocked, stopped early, empty, malformed) are failures of that image: recorded with a reason,
never stored as captions, and retried on the next run. A rejected key or an unknown model stops
the run (`GeminiFatalError`): every further request would fail the same way.

The API key comes from an environment variable or a Prefect Secret block and is registered with
`tasks.secrets`, so that it is redacted from every text this module writes.

With `requests_per_minute` set, every request (retries too) first takes a slot of the named rate
limit (`tasks.rate_limits`): Prefect's global limit when the stage runs as a Prefect task, shared
with every other process on that API, else a bucket within this process.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Iterable, Iterator

from tasks.caption.backends.base import CaptionResult, clean_caption
from tasks.config import GeminiConfig
from tasks.rate_limits import RateLimiter, rate_limiter
from tasks.secrets import load_named_secret, redact, register_secret

log = logging.getLogger("tok1d")

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
# Finish reasons other than STOP that mean the answer was withheld, not merely cut short.
_BLOCKING_WORDS = ("SAFETY", "BLOCK", "PROHIBITED", "RECITATION", "SPII")
_DETAIL_CHARS = 500


class GeminiFatalError(RuntimeError):
    """The service refuses every request (bad key, unknown model): stop instead of failing each image."""


def resolve_api_key(config: GeminiConfig) -> str:
    """The key from the configured Prefect Secret block, else from the environment variable."""
    if config.secret_block:
        try:
            key = load_named_secret(config.secret_block)
        except Exception as error:  # Prefect raises ValueError, ObjectNotFound, httpx errors...
            raise RuntimeError(
                f"caption.gemini.secret_block: could not load the Prefect Secret block "
                f"{config.secret_block!r} ({type(error).__name__}); create it with "
                f"`prefect block create secret` or set caption.gemini.secret_block=null to use "
                f"${config.api_key_env}"
            ) from None
        source = f"Prefect Secret block {config.secret_block!r}"
    else:
        key = os.environ.get(config.api_key_env, "")
        source = f"environment variable {config.api_key_env}"
    key = (key or "").strip()
    if not key:
        raise RuntimeError(
            f"caption backend gemini needs an API key: the {source} is empty or unset; set it, or "
            f"name a Prefect Secret block with caption.gemini.secret_block"
        )
    register_secret(key)
    return key


def make_client(config: GeminiConfig, api_key: str) -> Any:
    """A google-genai client with the SDK's own retries off and our timeout."""
    from google import genai
    from google.genai import types

    options = types.HttpOptions(
        base_url=config.base_url,
        timeout=max(1, int(config.timeout_s * 1000)),  # the SDK takes milliseconds
        retry_options=types.HttpRetryOptions(attempts=1),
    )
    return genai.Client(api_key=api_key, http_options=options)


def transport_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(timeout, other transport) exception types of httpx and httpx2 (the SDK uses either)."""
    timeouts: list[type] = []
    transports: list[type] = []
    for name in ("httpx", "httpx2"):
        try:
            module = __import__(name)
        except ImportError:
            continue
        timeouts.append(module.TimeoutException)
        transports.append(module.TransportError)
    return tuple(timeouts), tuple(transports)


def retry_after_seconds(error: Any) -> float | None:
    """Seconds the server asked us to wait: the Retry-After header, else Google's RetryInfo."""
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    value = headers.get("retry-after") if headers is not None else None
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            try:
                return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
            except (TypeError, ValueError):
                pass
    details = getattr(error, "details", None)
    if isinstance(details, dict):
        for item in (details.get("error") or {}).get("details") or []:
            delay = item.get("retryDelay") if isinstance(item, dict) else None
            if isinstance(delay, str) and delay.endswith("s"):
                try:
                    return max(0.0, float(delay[:-1]))
                except ValueError:
                    pass
    return None


def backoff_delay(retry: int, base_s: float, max_s: float, rng: random.Random) -> float:
    """Full jitter: uniform in [0, min(max, base * 2^retry)] (retry counts from 0)."""
    return rng.uniform(0.0, min(max_s, base_s * (2.0**retry)))


def parse_response(response: Any, max_words: int) -> tuple[str | None, str | None, str, bool]:
    """(caption, failure reason, detail, truncated) of a generateContent answer."""
    feedback = getattr(response, "prompt_feedback", None)
    block = getattr(feedback, "block_reason", None) if feedback is not None else None
    if block:
        return None, "blocked", f"promptFeedback.blockReason={enum_name(block)}", False
    candidates = getattr(response, "candidates", None) or []
    if not candidates:
        return None, "empty", "the answer has no candidates", False
    candidate = candidates[0]
    finish = enum_name(candidate.finish_reason) if candidate.finish_reason is not None else "STOP"
    if finish not in ("STOP", "FINISH_REASON_UNSPECIFIED"):
        reason = "blocked" if any(word in finish for word in _BLOCKING_WORDS) else "incomplete"
        return None, reason, f"finishReason={finish}", False
    parts = candidate.content.parts if candidate.content is not None and candidate.content.parts else []
    text = " ".join(part.text for part in parts if part.text and not part.thought)
    caption = clean_caption(text)
    if not caption:
        return None, "empty", f"finishReason={finish} with no text", False
    words = caption.split()
    if len(words) > max_words:
        return " ".join(words[:max_words]), None, f"cut from {len(words)} to {max_words} words", True
    return caption, None, "", False


def enum_name(value: Any) -> str:
    return str(getattr(value, "value", value))


def fatal_error(config: GeminiConfig, error: Any, code: int) -> GeminiFatalError | None:
    """The error that stops the run for an answer no later request can escape (bad key, unknown model)."""
    message = redact(str(getattr(error, "message", None) or error))[:_DETAIL_CHARS]
    if code in (401, 403) or (code == 400 and "API_KEY" in str(getattr(error, "details", ""))):
        return GeminiFatalError(
            f"Gemini rejected the API key ({code}: {message}); check ${config.api_key_env} "
            f"or the Prefect Secret block caption.gemini.secret_block"
        )
    if code == 404:
        return GeminiFatalError(
            f"Gemini does not know model {config.model!r} ({code}: {message}); "
            f"set caption.gemini.model to an available model"
        )
    return None


def status_reason(code: int) -> str:
    """The failure reason of an error status, as both the sync and the batch path record it."""
    if code == 429:
        return "rate-limited"
    if code == 408:
        return "timeout"
    if code in RETRYABLE_STATUS:
        return "server-error"
    return "bad-request"


def error_detail(error: BaseException) -> str:
    return redact(f"{type(error).__name__}: {error}")[:_DETAIL_CHARS]


@dataclass
class GeminiStats:
    """Requests sent and retries made, across threads."""

    requests: int = 0
    retries: int = 0
    truncated: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, count in counts.items():
                setattr(self, name, getattr(self, name) + count)


class GeminiCaptioner:
    """Captions PNG images with one Gemini model and prompt, `config.concurrency` at a time."""

    def __init__(self, config: GeminiConfig, client: Any | None = None, seed: int | None = None):
        self.config = config
        self.client = client if client is not None else make_client(config, resolve_api_key(config))
        self.origin = f"gemini:{config.model}"
        self.stats = GeminiStats()
        self._rng = random.Random(seed)
        self._timeouts, self._transports = transport_errors()
        self._limiter: RateLimiter | None = (
            rate_limiter(config.rate_limit_name, config.requests_per_minute) if config.requests_per_minute else None
        )
        # Set by the first fatal answer; every other worker then stops before its next request.
        self._fatal: GeminiFatalError | None = None
        # Set when the caller stops consuming (error, Ctrl-C): no further retries or backoff sleeps.
        self._stop = threading.Event()

    def caption(self, image_id: str, png: bytes) -> CaptionResult:
        """Caption one image, retrying transient errors; `GeminiFatalError` when no request can succeed."""
        from google.genai import errors, types

        config = self.config
        contents = [types.Part.from_bytes(data=png, mime_type="image/png"), config.prompt]
        attempts = 0
        while True:
            if self._fatal is not None:
                raise self._fatal
            if self._stop.is_set():
                raise RuntimeError("gemini captioning was stopped")
            if self._limiter is not None:
                self._limiter.acquire()
            attempts += 1
            self.stats.add(requests=1)
            try:
                response = self.client.models.generate_content(model=config.model, contents=contents)
            except errors.APIError as error:
                code = int(error.code or 0)
                fatal = fatal_error(config, error, code)
                if fatal is not None:
                    self._fatal = fatal
                    raise fatal from None  # the SDK error's text may quote the request
                reason = status_reason(code)
                if code not in RETRYABLE_STATUS:
                    return self._failure(image_id, reason, error, attempts)
                transient = (reason, error, retry_after_seconds(error) if code == 429 else None)
            except self._timeouts as error:
                transient = ("timeout", error, None)
            except self._transports as error:
                transient = ("connection", error, None)
            except ValueError as error:  # JSON that does not parse, or does not fit the schema
                return self._failure(image_id, "malformed", error, attempts)
            else:
                return self._answer(image_id, response, attempts)

            reason, error, wait_s = transient
            if attempts > config.max_retries:
                return self._failure(image_id, reason, error, attempts)
            delay = backoff_delay(attempts - 1, config.backoff_base_s, config.backoff_max_s, self._rng)
            if wait_s is not None:
                # The server knows when it takes requests again; never wait longer than our cap.
                delay = min(config.backoff_max_s, max(delay, wait_s))
            log.debug("gemini: %s for %s, retry %d/%d in %.2fs", reason, image_id, attempts, config.max_retries, delay)
            self.stats.add(retries=1)
            self._stop.wait(delay)

    def _answer(self, image_id: str, response: Any, attempts: int) -> CaptionResult:
        caption, reason, detail, truncated = parse_response(response, self.config.max_words)
        if caption is None:
            return CaptionResult(image_id, None, self.origin, reason, detail, attempts)
        if truncated:
            self.stats.add(truncated=1)
            log.info("gemini: caption of %s %s", image_id, detail)
        return CaptionResult(image_id, caption, self.origin, None, detail, attempts, truncated)

    def _failure(self, image_id: str, reason: str, error: BaseException, attempts: int) -> CaptionResult:
        return CaptionResult(image_id, None, self.origin, reason, error_detail(error), attempts)

    def caption_many(self, items: Iterable[tuple[str, bytes]]) -> Iterator[CaptionResult]:
        """Results in completion order; at most 2 x concurrency images are held in memory."""
        limit = max(1, self.config.concurrency)
        self._stop.clear()
        pool = ThreadPoolExecutor(max_workers=limit, thread_name_prefix="gemini")
        pending: set[Future] = set()
        try:
            for image_id, png in items:
                pending.add(pool.submit(self.caption, image_id, png))
                if len(pending) >= 2 * limit:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        yield future.result()
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            self._stop.set()
            pool.shutdown(wait=True, cancel_futures=True)
