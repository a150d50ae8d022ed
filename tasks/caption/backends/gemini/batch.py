"""Gemini captions through the Batch API (`caption.gemini.mode: batch`): half the price of
synchronous requests, results within the service's 24-hour target.

Written against the Gemini API v1beta Batch API as google-genai 3.x calls it (the REST
reference's `models.batchGenerateContent`, `batches.get`, and the Files API's resumable upload
and `files/{id}:download`):

1. The images still missing are cut, in ingest order, into request files of `batch_size`
   images: the same missing set of the same ingest artifact always gives the same files (one
   pass over the images, whatever their number). Each line is
   `{"key": <image_id>, "request": GenerateContentRequest}` with the PNG inline and the prompt.
2. Each file is uploaded (`client.files.upload`, mime type jsonl) and submitted as one job
   (`client.batches.create(model, src="files/...")`), its display name carrying the file's
   sha256. The file's digest, its upload and its job are recorded in the work dir before
   anything else happens (batch_ledger.py), so a rerun after a kill resumes those jobs and
   submits nothing twice.
3. The jobs are polled every `batch_poll_s` (`client.batches.get`) until each ends:
   JOB_STATE_SUCCEEDED (the SDK's name for BATCH_STATE_SUCCEEDED) names a JSONL results file
   (`dest.file_name`), downloaded with `client.files.download`; each line is
   `{"key", "response": GenerateContentResponse}` or `{"key", "error": Status}`.
4. Results go through the same checks as synchronous answers (`parse_response`): blocked,
   empty, cut-short or malformed answers, error lines, lines missing from the file and jobs that
   failed, were cancelled or expired are failures of their images, recorded with a reason, never
   stored as captions, and asked for again by the next run in a new job. A rejected key or
   unknown model stops the run (`GeminiFatalError`), as in the synchronous path.

After `batch_max_wait_s` the run stops with an error that leaves the recorded jobs to the next
run. Nothing here holds the API key: the SDK client does, and every text we write is redacted.
"""

from __future__ import annotations

import base64
import itertools
import json
import logging
import random
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from tasks.caption.backends.base import CaptionResult
from tasks.caption.backends.gemini.batch_ledger import BatchEntry, BatchLedger, file_digest, write_request_file
from tasks.caption.backends.gemini.client import (
    RETRYABLE_STATUS,
    GeminiFatalError,
    enum_name,
    transport_errors,
    backoff_delay,
    error_detail,
    fatal_error,
    make_client,
    parse_response,
    resolve_api_key,
    status_reason,
)
from tasks.caption.images import IngestImages
from tasks.config import GeminiConfig
from tasks.secrets import redact

log = logging.getLogger("tok1d")

SUCCEEDED = "JOB_STATE_SUCCEEDED"
# Vertex's name for a job where some requests failed: it has a results file like a success.
PARTIAL = "JOB_STATE_PARTIALLY_SUCCEEDED"
ENDED = {
    SUCCEEDED: None,
    PARTIAL: None,
    "JOB_STATE_FAILED": "batch-failed",
    "JOB_STATE_CANCELLED": "batch-cancelled",
    "JOB_STATE_EXPIRED": "batch-expired",
}
# How far back the resuming run looks for a job whose creation it did not get to record.
_LIST_LIMIT = 1000


class _NotSubmitted(Exception):
    """A request file that could not be uploaded or submitted (after retries): its images fail."""

    def __init__(self, reason: str, detail: str):
        super().__init__(reason)
        self.reason = reason
        self.detail = detail


@dataclass
class BatchStats:
    """What one run did with batch jobs (the stage summary reports it)."""

    requests: int = 0
    retries: int = 0
    truncated: int = 0
    jobs_submitted: int = 0
    jobs_resumed: int = 0
    jobs_failed: int = 0


def request_line(image_id: str, png: bytes, prompt: str) -> bytes:
    """One line of a request file: the image inline (base64) and the prompt, keyed by image id."""
    request = {
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png).decode("ascii")}},
                    {"text": prompt},
                ],
            }
        ]
    }
    return json.dumps({"key": image_id, "request": request}, separators=(",", ":"), sort_keys=True).encode()


def parse_results(
    data: bytes, image_ids: list[str], origin: str, max_words: int
) -> tuple[list[CaptionResult], int]:
    """A result for every image of a job from its JSONL results file; (results, truncated count)."""
    from google.genai import types

    wanted = set(image_ids)
    results: dict[str, CaptionResult] = {}
    unreadable = 0
    truncated = 0
    for raw in data.splitlines():
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            key = line.get("key") if isinstance(line, dict) else None
        except ValueError:
            unreadable += 1
            continue
        if not isinstance(key, str) or key not in wanted or key in results:
            unreadable += 1  # no key, a key we did not send, or one answered twice
            continue
        if isinstance(line.get("error"), dict):
            error = line["error"]
            code = error.get("code") if isinstance(error.get("code"), int) else 0
            detail = redact(f"{code} {error.get('status', '')}: {error.get('message', '')}")[:500]
            results[key] = CaptionResult(key, None, origin, status_reason(code), detail, 1)
            continue
        try:
            response = types.GenerateContentResponse.model_validate(line["response"])
        except (KeyError, TypeError, ValueError) as error:  # pydantic's ValidationError is a ValueError
            results[key] = CaptionResult(key, None, origin, "malformed", error_detail(error), 1)
            continue
        caption, reason, detail, cut = parse_response(response, max_words)
        if caption is None:
            results[key] = CaptionResult(key, None, origin, reason, detail, 1)
        else:
            truncated += int(cut)
            results[key] = CaptionResult(key, caption, origin, None, detail, 1, cut)
    for image_id in image_ids:
        if image_id not in results:
            detail = "the results file has no line for this request"
            if unreadable:
                detail += f" ({unreadable} of its lines could not be read)"
            results[image_id] = CaptionResult(image_id, None, origin, "malformed", detail, 1)
    return [results[image_id] for image_id in image_ids], truncated


class GeminiBatchCaptioner:
    """Captions images through batch jobs recorded in `ledger`; results are handed to `on_results`
    job by job, before the ledger marks the job done (the caller stores them)."""

    def __init__(
        self,
        config: GeminiConfig,
        ledger: BatchLedger,
        client: Any | None = None,
        seed: int | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.config = config
        self.ledger = ledger
        self.client = client if client is not None else make_client(config, resolve_api_key(config))
        self.origin = f"gemini:{config.model}"
        self.stats = BatchStats()
        self._rng = random.Random(seed)
        self._sleep = sleep
        self._timeouts, self._transports = transport_errors()
        from google.genai import errors

        # What a poll or download may meet and try again at the next poll (other errors are bugs).
        self._transient: tuple[type, ...] = (errors.APIError, *self._timeouts, *self._transports)

    # ------------------------------------------------------------------ the run

    def run(
        self,
        missing: list[str],
        images: IngestImages,
        on_results: Callable[[list[CaptionResult]], None],
    ) -> None:
        """Submit what no recorded job covers, resume the recorded jobs, and wait for them all."""
        ledger = self.ledger
        resumed = [entry for entry in ledger.entries if not entry.done]
        self.stats.jobs_resumed = sum(1 for entry in resumed if entry.job)
        if resumed:
            log.info("gemini batch: resuming %d recorded request files (%d images) from %s",
                     len(resumed), sum(len(e.image_ids) for e in resumed), ledger.path)
        covered = ledger.covered()
        fresh = [image_id for image_id in missing if image_id not in covered]

        # Recorded entries first (a kill may have left them before their upload or job), then new files.
        for entry in resumed:
            if entry.job is None:
                self._submit(entry, images, on_results)
        for entry in self._prepare(images.pngs(fresh)):
            self._submit(entry, images, on_results)
        self._wait(on_results)

    def _prepare(self, pngs: Iterator[tuple[str, bytes]]) -> Iterator[BatchEntry]:
        """Request files of `batch_size` images from one pass over `pngs`, each recorded (digest and
        images) before it is handed on to be uploaded; a file's lines are streamed to disk."""
        stream = iter(pngs)
        while (first := next(stream, None)) is not None:
            image_ids: list[str] = []
            chunk = itertools.chain([first], itertools.islice(stream, self.config.batch_size - 1))
            path, digest = self._write_requests(chunk, image_ids)
            entry = BatchEntry(digest=digest, image_ids=image_ids)
            self.ledger.entries.append(entry)
            self.ledger.save()
            log.debug("gemini batch: request file %s (%d images)", path.name, len(image_ids))
            yield entry

    def _write_requests(self, pngs: Iterable[tuple[str, bytes]], image_ids: list[str]) -> tuple[Path, str]:
        """Write the request file of `pngs`, appending their ids to `image_ids`: (path, sha256)."""

        def lines() -> Iterator[bytes]:
            for image_id, png in pngs:
                image_ids.append(image_id)
                yield request_line(image_id, png, self.config.prompt)

        return write_request_file(self.ledger.root / "requests", lines())

    def _submit(self, entry: BatchEntry, images: IngestImages, on_results: Callable) -> None:
        """Upload the entry's file and create its job, recording each step; failures end the entry."""
        try:
            if entry.file is not None and entry.job is None:
                entry.job = self._find_unrecorded_job(entry)
                if entry.job is not None:
                    log.info("gemini batch: found job %s for request file %s, created before the last run "
                             "could record it", entry.job, entry.digest[:16])
                    self.stats.jobs_resumed += 1
                    self.ledger.save()
                    return
            if entry.file is None:
                path = self.ledger.request_path(entry)
                if file_digest(path) != entry.digest:
                    # Lost or damaged since it was recorded: the same images give the same file.
                    path, digest = self._write_requests(images.pngs(entry.image_ids), [])
                    if digest != entry.digest:
                        log.warning("gemini batch: request file %s rebuilt with another digest", entry.digest[:16])
                        entry.digest = digest
                uploaded = self._call(
                    "upload",
                    lambda: self.client.files.upload(
                        file=str(path), config={"display_name": entry.display_name, "mime_type": "jsonl"}
                    ),
                )
                entry.file = uploaded.name
                self.ledger.save()
            job = self._call(
                "submit",
                lambda: self.client.batches.create(
                    model=self.config.model, src=entry.file, config={"display_name": entry.display_name}
                ),
            )
        except _NotSubmitted as failure:
            self.stats.jobs_failed += 1
            log.warning("gemini batch: request file %s (%d images) was not submitted: %s",
                        entry.digest[:16], len(entry.image_ids), failure.detail)
            self._end(entry, [CaptionResult(i, None, self.origin, failure.reason, failure.detail, 1)
                              for i in entry.image_ids], on_results)
            return
        entry.job = job.name
        entry.state = enum_name(job.state) if job.state is not None else None
        self.ledger.save()  # recorded before any poll: a kill from here on resumes this job
        self.stats.jobs_submitted += 1
        self.stats.requests += len(entry.image_ids)
        log.info("gemini batch: submitted %s (%d images)", job.name, len(entry.image_ids))

    def _find_unrecorded_job(self, entry: BatchEntry) -> str | None:
        """The project's job with this entry's display name, if one was created but not recorded."""
        try:
            for seen, job in enumerate(self.client.batches.list(config={"page_size": 100})):
                if job.display_name == entry.display_name:
                    return job.name
                if seen + 1 >= _LIST_LIMIT:
                    break
        except Exception as error:  # listing is a courtesy: at worst the file is submitted again
            self._raise_if_fatal(error)
            log.warning("gemini batch: could not list batch jobs (%s)", error_detail(error))
        return None

    # ------------------------------------------------------------------ waiting

    def _wait(self, on_results: Callable[[list[CaptionResult]], None]) -> None:
        config = self.config
        deadline = time.monotonic() + config.batch_max_wait_s
        last_line = None
        while True:
            pending = [entry for entry in self.ledger.entries if not entry.done and entry.job]
            if not pending:
                return
            for entry in pending:
                self._poll(entry, on_results)
            states = Counter((entry.state or "?") for entry in self.ledger.entries if entry.job)
            line = ", ".join(f"{count} {state.removeprefix('JOB_STATE_').lower()}" for state, count in sorted(states.items()))
            if line != last_line:  # the progress line, once per change of the jobs' states
                done = sum(1 for entry in self.ledger.entries if entry.done)
                log.info("gemini batch: %d of %d jobs done (%s)", done, len(self.ledger.entries), line)
                last_line = line
            if all(entry.done for entry in pending):
                continue
            if time.monotonic() >= deadline:
                left = [entry for entry in self.ledger.entries if not entry.done]
                raise RuntimeError(
                    f"gemini batch: {len(left)} jobs ({sum(len(e.image_ids) for e in left)} images) not done after "
                    f"caption.gemini.batch_max_wait_s={config.batch_max_wait_s:g}s; they are recorded in "
                    f"{self.ledger.path}: rerun the stage to resume them (nothing is submitted twice)"
                )
            self._sleep(min(config.batch_poll_s, max(0.0, deadline - time.monotonic())))

    def _poll(self, entry: BatchEntry, on_results: Callable[[list[CaptionResult]], None]) -> None:
        try:
            job = self.client.batches.get(name=entry.job)
        except self._transient as error:
            self._raise_if_fatal(error, gone_ok=True)
            if _status(error) == 404:
                self._fail_job(entry, "batch-missing", f"batch job {entry.job} is not known to the service", on_results)
            else:
                log.debug("gemini batch: polling %s failed (%s); next poll tries again", entry.job, error_detail(error))
            return
        state = enum_name(job.state) if job.state is not None else "JOB_STATE_UNSPECIFIED"
        entry.state = state
        if state not in ENDED:
            return
        reason = ENDED[state]
        if reason is not None:
            message = getattr(getattr(job, "error", None), "message", None)
            detail = f"batch job {entry.job} ended in {state}" + (f": {redact(str(message))[:300]}" if message else "")
            self._fail_job(entry, reason, detail, on_results)
            return
        name = getattr(job.dest, "file_name", None) if job.dest is not None else None
        if not name:
            self._fail_job(entry, "malformed", f"batch job {entry.job} succeeded without a results file", on_results)
            return
        try:
            data = self.client.files.download(file=name)
        except self._transient as error:
            self._raise_if_fatal(error, gone_ok=True)
            if _status(error) == 404:
                self._fail_job(entry, "batch-missing", f"results file {name} of {entry.job} is gone", on_results)
            else:
                log.debug("gemini batch: downloading %s failed (%s); next poll tries again", name, error_detail(error))
            return
        results, truncated = parse_results(data, entry.image_ids, self.origin, self.config.max_words)
        self.stats.truncated += truncated
        self._end(entry, results, on_results)

    def _fail_job(self, entry: BatchEntry, reason: str, detail: str, on_results: Callable) -> None:
        self.stats.jobs_failed += 1
        log.warning("gemini batch: %s (%d images; a rerun asks for them again)", detail, len(entry.image_ids))
        self._end(entry, [CaptionResult(i, None, self.origin, reason, detail, 1) for i in entry.image_ids], on_results)

    def _end(self, entry: BatchEntry, results: list[CaptionResult], on_results: Callable) -> None:
        """Hand the results over, then mark the entry done: a kill in between only repeats the download."""
        on_results(results)
        entry.done = True
        self.ledger.save()
        self.ledger.request_path(entry).unlink(missing_ok=True)

    # ------------------------------------------------------------------ calls with retries

    def _call(self, what: str, request: Callable[[], Any]) -> Any:
        """One upload or submit, retried like a synchronous request; `_NotSubmitted` when it cannot be."""
        attempts = 0
        while True:
            attempts += 1
            try:
                return request()
            except Exception as error:
                self._raise_if_fatal(error)
                code = _status(error)
                if code is not None:
                    reason = status_reason(code)
                    retryable = code in RETRYABLE_STATUS
                elif isinstance(error, self._timeouts):
                    reason, retryable = "timeout", True
                elif isinstance(error, self._transports):
                    reason, retryable = "connection", True
                else:
                    raise
                if not retryable or attempts > self.config.max_retries:
                    raise _NotSubmitted(reason, f"{what}: {error_detail(error)}") from None
                delay = backoff_delay(attempts - 1, self.config.backoff_base_s, self.config.backoff_max_s, self._rng)
                log.debug("gemini batch: %s %s, retry %d/%d in %.2fs", what, reason, attempts, self.config.max_retries, delay)
                self.stats.retries += 1
                self._sleep(delay)

    def _raise_if_fatal(self, error: BaseException, gone_ok: bool = False) -> None:
        """Stop the run on a rejected key (and an unknown model, unless a 404 means a job or file is gone)."""
        code = _status(error)
        if code is None or (gone_ok and code == 404):
            return
        fatal = fatal_error(self.config, error, code)
        if fatal is not None:
            raise fatal from None  # the SDK error's text may quote the request


def _status(error: BaseException) -> int | None:
    """The HTTP status of a google-genai API error, None for anything else."""
    from google.genai import errors

    if isinstance(error, errors.APIError):
        return int(error.code or 0)
    return None


__all__ = ["BatchStats", "GeminiBatchCaptioner", "GeminiFatalError", "parse_results", "request_line"]
