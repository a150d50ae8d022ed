"""`caption.gemini.mode: batch` against the local fake of the Batch and Files APIs (real google-genai
client, real HTTP on 127.0.0.1), and the synchronous path's rate limits (in-process, and Prefect's
global concurrency limits on a real ephemeral Prefect API)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
import uuid
from pathlib import Path

import pytest

from tasks.caption.backends.cache import CaptionCache
from tasks.caption.backends.gemini import gemini_cache_key
from tasks.caption.backends.gemini.client import GeminiFatalError
from tasks.caption.read import load_captions, load_failures
from tasks.caption.stage import run_caption
from tasks.config import CaptionConfig, ConfigError, GeminiConfig, RuntimeConfig
from tasks.presets import load_config
from tasks.stage import StageContext
from tasks.store import Store

from builders.ingest import colour_png, ingest_artifact
from builders.store import commit_output
from fake_gemini import (
    BlockedPrompt,
    Empty,
    FakeGemini,
    Finish,
    Malformed,
    Missing,
    Ok,
    Status,
    caption_for,
)

ROOT = Path(__file__).resolve().parents[2]
KEY = "tok1d-TEST-KEY-batch-4d2e8b"
MODEL = "gemini-test-flash"


def sha(index: int) -> str:
    return hashlib.sha256(colour_png(index)).hexdigest()


def image_id(index: int) -> str:
    return f"img-{index:04d}"


def index_of(image: str) -> int:
    return int(image.removeprefix("img-"))


def batch_config(server: FakeGemini, **overrides) -> GeminiConfig:
    values = dict(
        model=MODEL,
        base_url=server.url,
        timeout_s=5.0,
        max_retries=2,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        max_words=12,
        mode="batch",
        batch_size=4,
        batch_poll_s=0.02,
    )
    values.update(overrides)
    return GeminiConfig(**values)


def run(work: Path, store: Store, manifest, gemini: GeminiConfig, **config):
    ctx = StageContext(
        stage="caption",
        config=CaptionConfig(backend="gemini", gemini=gemini, **config),
        inputs={"ingest": manifest},
        store=store,
        runtime=RuntimeConfig(),
        cache_key="k" * 64,
        work_dir=work,
    )
    output = run_caption(ctx)
    return output, commit_output(store, ctx, output)


def ledger(work: Path) -> list[dict]:
    path = work / "gemini-batch" / "jobs.json"
    return json.loads(path.read_text())["entries"] if path.exists() else []


def lines_of(job) -> list[str]:
    return [line["key"] for line in job.lines]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


def test_batch_splits_records_before_polling_and_stores_captions(tmp_path, store, caplog):
    caplog.set_level(logging.INFO, logger="tok1d")
    manifest = ingest_artifact(store, 10)
    work = tmp_path / "w"
    seen_at_poll: list[tuple[str, bool, bool]] = []

    with FakeGemini() as server:
        def check_recorded(job) -> None:
            entries = {e["job"]: e for e in ledger(work)}
            entry = entries.get(job.name)
            uploaded = server.files.get(job.input_file, b"")
            seen_at_poll.append((job.name, entry is not None,
                                 entry is not None and entry["digest"] == hashlib.sha256(uploaded).hexdigest()))

        server.on_poll = check_recorded
        output, artifact = run(work, store, manifest, batch_config(server), shard_rows=3)

    # Request files of 4 images, cut from the missing image ids in ingest order, one job each.
    ids = [image_id(i) for i in range(10)]
    assert [lines_of(job) for job in server.submissions] == [ids[0:4], ids[4:8], ids[8:10]]
    assert len(server.uploads) == 3
    assert all(job.display_name.startswith("tok1d-caption-") for job in server.submissions)
    assert {job.headers["x-goog-api-key"] for job in server.submissions} == {KEY}
    # Every poll found its job and the digest of exactly the file that was uploaded already recorded.
    assert seen_at_poll and all(recorded and digest_ok for _, recorded, digest_ok in seen_at_poll)
    assert {name for name, _, _ in seen_at_poll} == {job.name for job in server.submissions}
    # The request lines carried the image and the prompt; nothing went through generateContent.
    assert all(r.batch is not None for r in server.requests)
    assert sorted(r.image_sha for r in server.requests) == sorted(sha(i) for i in range(10))
    assert {r.prompt for r in server.requests} == {GeminiConfig().prompt}
    assert {r.mime_type for r in server.requests} == {"image/png"}

    captions = {r["image_id"]: r for r in load_captions(artifact, store).to_pylist()}
    assert {i: c["caption"] for i, c in captions.items()} == {image_id(i): caption_for(sha(i)) for i in range(10)}
    assert {c["origin"] for c in captions.values()} == {f"gemini:{MODEL}"}
    summary = output.summary
    assert output.complete and summary["failed"] == 0 and summary["requests"] == 10
    assert (summary["batch_jobs_submitted"], summary["batch_jobs_resumed"], summary["batch_jobs_failed"]) == (3, 0, 0)
    assert "gemini batch: 3 of 3 jobs done (3 succeeded)" in caplog.text  # the progress line
    # Done jobs' request files are gone; the ledger says every job is done.
    assert all(entry["done"] for entry in ledger(work))
    assert not list((work / "gemini-batch" / "requests").glob("*.jsonl"))

    # The captions are in the store-wide cache the synchronous path uses too: nothing more to send.
    with FakeGemini() as again:
        output, _ = run(tmp_path / "w2", store, manifest, batch_config(again, mode="sync"))
    assert output.complete and again.requests == [] and output.summary["requests"] == 0


LONG = " ".join(f"word{i}" for i in range(30))
# By image index: (scripted line, expected outcome). Images 4-7 and 12-15 are in jobs that fail.
LINE_FAULTS = {
    0: (Status(500, message="internal"), "server-error"),
    1: (Malformed(), "malformed"),
    2: (BlockedPrompt("SAFETY"), "blocked"),
    3: (Finish("MAX_TOKENS"), "incomplete"),
    8: (Empty(), "empty"),
    9: (Missing(), "malformed"),
    10: (Status(429, message="quota"), "rate-limited"),
    11: (Ok(text=f'  "{LONG}" '), "ok"),
}


def test_failed_lines_and_jobs_are_recorded_never_cached_and_retried_next_run(tmp_path, store):
    manifest = ingest_artifact(store, 16)
    with FakeGemini() as server:
        for index, (behaviour, _) in LINE_FAULTS.items():
            server.script(sha(index), [behaviour])
        server.script_jobs(["BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED", "BATCH_STATE_SUCCEEDED", "BATCH_STATE_EXPIRED"])
        output, artifact = run(tmp_path / "w1", store, manifest, batch_config(server))

        failures = {r["image_id"]: r for r in load_failures(artifact, store).to_pylist()}
        captions = {r["image_id"]: r["caption"] for r in load_captions(artifact, store).to_pylist()}
        expected = {index: outcome for index, (_, outcome) in LINE_FAULTS.items()}
        expected.update({i: "batch-failed" for i in range(4, 8)})
        expected.update({i: "batch-expired" for i in range(12, 16)})
        for index, outcome in expected.items():
            if outcome == "ok":
                assert image_id(index) in captions and image_id(index) not in failures
            else:
                assert image_id(index) not in captions, index
                assert failures[image_id(index)]["reason"] == outcome, index
                assert failures[image_id(index)]["attempts"] == 1
        assert "SAFETY" in failures[image_id(2)]["detail"] and "internal" in failures[image_id(0)]["detail"]
        assert "could not be read" in failures[image_id(1)]["detail"]  # the line that was not JSON
        assert "ended in JOB_STATE_FAILED" in failures[image_id(4)]["detail"]
        assert captions[image_id(11)] == " ".join(f"word{i}" for i in range(12))  # cut to max_words
        summary = output.summary
        assert summary["truncated"] == 1 and summary["batch_jobs_failed"] == 2
        assert summary["failed"] == 15 and summary["captioned"] == 1 and summary["pending"] == 0
        assert not output.complete

        # Nothing but real captions went to the cache.
        cache = CaptionCache(store.root / "caches" / "captions" / gemini_cache_key(batch_config(server)), 1)
        assert set(cache.load()) == set(captions)

        # The next run (a new slot, so a new work dir) asks again for exactly the failed images.
        before = len(server.submissions)
        rerun, artifact = run(tmp_path / "w2", store, manifest, batch_config(server))
        asked = sorted(key for job in server.submissions[before:] for key in lines_of(job))
    assert asked == sorted(failures)
    assert rerun.complete and rerun.summary["captioned"] == 16 and rerun.summary["failed"] == 0
    assert rerun.summary["requests"] == 15 and rerun.summary["batch_jobs_submitted"] == 4


def test_max_wait_stops_the_run_and_the_rerun_resumes_without_resubmitting(tmp_path, store):
    manifest = ingest_artifact(store, 6)
    work = tmp_path / "w"
    with FakeGemini() as server:
        server.hold = True  # the jobs stay PENDING
        with pytest.raises(RuntimeError, match="rerun the stage to resume them"):
            run(work, store, manifest, batch_config(server, batch_max_wait_s=0.3))
        assert len(server.submissions) == 2 and server.batch_polls >= 2
        assert [e["job"] for e in ledger(work)] == [job.name for job in server.submissions]

        server.hold = False
        output, artifact = run(work, store, manifest, batch_config(server, batch_max_wait_s=30.0))
        assert len(server.submissions) == 2 and len(server.uploads) == 2  # nothing submitted twice
    assert output.complete and output.summary["captioned"] == 6
    assert (output.summary["batch_jobs_submitted"], output.summary["batch_jobs_resumed"]) == (0, 2)
    assert output.summary["requests"] == 0
    assert load_captions(artifact, store).num_rows == 6


def test_resume_finds_an_unrecorded_job_and_rebuilds_a_lost_request_file(tmp_path, store):
    manifest = ingest_artifact(store, 12)
    work = tmp_path / "w"
    with FakeGemini() as server:
        server.hold = True
        with pytest.raises(RuntimeError, match="not done after"):
            run(work, store, manifest, batch_config(server, batch_max_wait_s=0.1))
        assert len(server.submissions) == 3
        path = work / "gemini-batch" / "jobs.json"
        data = json.loads(path.read_text())
        # As if the process died while batches.create was in flight: uploaded, but no job recorded.
        data["entries"][1]["job"] = None
        # As if it died after recording the request file, before uploading it; and the file is lost.
        data["entries"][2]["job"] = data["entries"][2]["file"] = None
        (work / "gemini-batch" / "requests" / f"{data['entries'][2]['digest'][:16]}.jsonl").unlink()
        path.write_text(json.dumps(data))

        server.hold = False
        output, _ = run(work, store, manifest, batch_config(server))
        # Entry 1's job was found among the project's batches; entry 2 was rebuilt and submitted.
        assert len(server.submissions) == 4
        rebuilt = server.files[server.submissions[3].input_file]
    assert hashlib.sha256(rebuilt).hexdigest() == data["entries"][2]["digest"]  # the same file again
    assert output.complete and output.summary["captioned"] == 12
    assert (output.summary["batch_jobs_resumed"], output.summary["batch_jobs_submitted"]) == (2, 1)


def test_poll_errors_are_retried_and_a_vanished_job_fails_its_images(tmp_path, store):
    manifest = ingest_artifact(store, 8)
    work = tmp_path / "w"
    with FakeGemini() as server:
        server.hold = True
        with pytest.raises(RuntimeError, match="not done after"):
            run(work, store, manifest, batch_config(server, batch_max_wait_s=0.1))
        server.hold = False
        del server.batches[server.submissions[0].name]  # the service no longer knows the first job
        server.script_polls([Status(503), Status(500)])  # the next two polls fail: tried again later
        output, artifact = run(work, store, manifest, batch_config(server))
        assert len(server.submissions) == 2
    failures = {r["image_id"]: r for r in load_failures(artifact, store).to_pylist()}
    assert sorted(failures) == [image_id(i) for i in range(4)]
    assert {r["reason"] for r in failures.values()} == {"batch-missing"}
    captions = load_captions(artifact, store)
    assert sorted(captions["image_id"].to_pylist()) == [image_id(i) for i in range(4, 8)]
    assert output.summary["batch_jobs_failed"] == 1 and not output.complete


KILL_SCRIPT = """
import sys
from pathlib import Path
from tasks.caption.stage import run_caption
from tasks.config import CaptionConfig, RuntimeConfig
from tasks.stage import StageContext
from tasks.store import Manifest, Store

store = Store(sys.argv[1])
manifest = Manifest.model_validate_json(open(sys.argv[2]).read())
config = CaptionConfig.model_validate_json(open(sys.argv[3]).read())
ctx = StageContext("caption", config, {"ingest": manifest}, store, RuntimeConfig(), "k" * 64, Path(sys.argv[4]))
run_caption(ctx)
print("finished")
"""


def test_killed_while_polling_then_rerun_finishes_the_recorded_jobs(tmp_path, store):
    count = 10
    manifest = ingest_artifact(store, count)
    work = tmp_path / "work"
    with FakeGemini() as server:
        server.hold = True
        gemini = batch_config(server)
        config = CaptionConfig(backend="gemini", gemini=gemini)
        (tmp_path / "manifest.json").write_text(manifest.model_dump_json())
        (tmp_path / "config.json").write_text(config.model_dump_json())
        (tmp_path / "kill.py").write_text(KILL_SCRIPT)
        log_file = open(tmp_path / "kill.log", "wb")
        process = subprocess.Popen(
            [sys.executable, str(tmp_path / "kill.py"), str(store.root), str(tmp_path / "manifest.json"),
             str(tmp_path / "config.json"), str(work)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=log_file, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        # Killed once all three jobs are submitted and being polled.
        while not (len(server.submissions) == 3 and server.batch_polls >= 6):
            assert process.poll() is None, (tmp_path / "kill.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the jobs were not submitted"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        log_file.close()
        assert process.returncode == -signal.SIGKILL
        assert [e["job"] for e in ledger(work)] == [job.name for job in server.submissions]

        server.hold = False
        output, artifact = run(work, store, manifest, gemini)
        assert len(server.submissions) == 3 and len(server.uploads) == 3
        # Each image was answered once: by the job that the killed run submitted.
        assert sorted(r.image_sha for r in server.requests) == sorted(sha(i) for i in range(count))
    assert output.complete and output.summary["batch_jobs_resumed"] == 3
    captions = load_captions(artifact, store)
    assert sorted(captions["image_id"].to_pylist()) == [image_id(i) for i in range(count)]


def test_submission_errors_retry_fail_the_file_or_stop_the_run(tmp_path, store):
    manifest = ingest_artifact(store, 8)
    with FakeGemini() as server:
        # A 503 is retried; a 400 fails that file's images (recorded, asked again next run).
        server.script_submissions([Status(503), Ok(), Status(400, message="file too large")])
        output, artifact = run(tmp_path / "w1", store, manifest, batch_config(server))
        failures = {r["image_id"]: r for r in load_failures(artifact, store).to_pylist()}
        assert sorted(failures) == [image_id(i) for i in range(4, 8)]
        assert {r["reason"] for r in failures.values()} == {"bad-request"}
        assert "file too large" in failures[image_id(4)]["detail"]
        assert output.summary["retries"] == 1 and output.summary["batch_jobs_submitted"] == 1
        assert output.summary["captioned"] == 4 and not output.complete

    with FakeGemini(echo_key=True) as server:
        server.script_submissions([Status(401, message="unauthorized")])
        with pytest.raises(GeminiFatalError, match="API key") as fatal:
            run(tmp_path / "w2", store, manifest, batch_config(server))
        assert server.submissions == []
    assert KEY not in "".join(traceback.format_exception(fatal.type, fatal.value, fatal.tb))


def test_key_never_appears_in_outputs_logs_or_work_files(tmp_path, store, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    manifest = ingest_artifact(store, 8)
    with FakeGemini(echo_key=True) as server:
        server.script(sha(1), [Status(500, message="boom")])  # an error line that quotes the key
        server.hold = True
        with pytest.raises(RuntimeError):  # leaves its work dir (ledger, request files) behind
            run(tmp_path / "w0", store, manifest, batch_config(server, batch_max_wait_s=0.1, prompt="other"))
        server.hold = False
        server.script_jobs(["BATCH_STATE_SUCCEEDED", "BATCH_STATE_FAILED"])
        output, artifact = run(tmp_path / "w1", store, manifest, batch_config(server))
    assert server.submissions[0].headers["x-goog-api-key"] == KEY  # the key did travel
    failures = {r["image_id"]: r for r in load_failures(artifact, store).to_pylist()}
    assert "***" in failures[image_id(1)]["detail"]  # the service echoed it; we redacted it
    haystacks = {
        "log": caplog.text + "".join(str(record.__dict__) for record in caplog.records),
        "output": "".join(capfd.readouterr()),
        "summary": json.dumps(output.summary),
    }
    for name, text in haystacks.items():
        assert KEY not in text, name
    files = [path for path in tmp_path.rglob("*") if path.is_file()]
    assert any(path.name == "jobs.json" for path in files)
    for path in files:
        assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.parametrize(
    "override, message",
    [
        ("caption.gemini.mode=bulk", "caption.gemini.mode"),
        ("caption.gemini.batch_size=0", "caption.gemini.batch_size: .*must be >= 1"),
        ("caption.gemini.batch_poll_s=0", "caption.gemini.batch_poll_s: .*must be > 0 seconds"),
        ("caption.gemini.batch_max_wait_s=-5", "caption.gemini.batch_max_wait_s: .*must be > 0 seconds"),
        ("caption.gemini.requests_per_minute=0", "caption.gemini.requests_per_minute: .*must be > 0"),
        ("caption.gemini.rate_limit_name=a/b", "caption.gemini.rate_limit_name: .*letters, digits"),
    ],
)
def test_batch_and_rate_limit_settings_are_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("default", [override])
    config = load_config("default", ["caption.gemini.mode=batch", "caption.gemini.batch_size=50"])
    assert (config.caption.gemini.mode, config.caption.gemini.batch_size) == ("batch", 50)


# ---------------------------------------------------------------------------- sync path rate limits


def request_span_of(requests) -> float:
    times = sorted(r.at for r in requests)
    return times[-1] - times[0]


def request_span(server: FakeGemini) -> float:
    return request_span_of(server.requests)


def test_sync_rate_limit_within_the_process(tmp_path, store):
    manifest = ingest_artifact(store, 10)
    with FakeGemini() as server:
        # 300/min = 5/s with a burst of 5: the last of 10 requests starts >= 1 s after the first.
        gemini = batch_config(server, mode="sync", concurrency=4, requests_per_minute=300.0,
                              rate_limit_name=f"local-{uuid.uuid4().hex[:8]}")
        output, _ = run(tmp_path / "w", store, manifest, gemini)
    assert output.complete and len(server.requests) == 10
    assert request_span(server) >= 0.9


def test_sync_rate_limit_through_prefect_global_concurrency_limits(tmp_path, store, caplog):
    # A real (ephemeral) Prefect API, as a stage task sees it; flows/stage_task.py attaches the same.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from flows.rate_limits import PrefectRateLimits
    from tasks.rate_limits import attached_rate_limits

    manifest = ingest_artifact(store, 5)
    created = f"tok1d-test-{uuid.uuid4().hex[:8]}"
    tuned = f"tok1d-test-{uuid.uuid4().hex[:8]}"
    with get_client(sync_client=True) as client:
        # One an operator made: 1 slot, 4 released per second.
        client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=tuned, limit=1, slot_decay_per_second=4.0))

    with FakeGemini() as server, attached_rate_limits(PrefectRateLimits()):
        # A missing limit is created from the config: 120/min = 2 per second, burst 2.
        output, _ = run(tmp_path / "a", store, manifest,
                        batch_config(server, mode="sync", concurrency=5, requests_per_minute=120.0, rate_limit_name=created))
        assert output.complete
        # 5 requests at 2/s after a burst of 2 take >= 1.5 s.
        assert request_span(server) >= 1.3
        first = len(server.requests)
        # The operator's limit wins over the config's far higher rate (which alone would not wait).
        output, _ = run(tmp_path / "b", store, manifest,
                        batch_config(server, mode="sync", concurrency=5, requests_per_minute=60000.0,
                                     rate_limit_name=tuned, prompt="another prompt"))
        assert output.complete
        times = sorted(r.at for r in server.requests[first:])
    assert times[-1] - times[0] >= 0.9  # (5 - 1) / 4 per second
    print(f"request spans: created limit {request_span_of(server.requests[:first]):.2f}s, "
          f"operator's limit {times[-1] - times[0]:.2f}s")
    assert "limiting within this process" not in caplog.text  # Prefect did the limiting, no fallback
    with get_client(sync_client=True) as client:
        made = client.read_global_concurrency_limit_by_name(created)
        kept = client.read_global_concurrency_limit_by_name(tuned)
    assert (made.limit, made.slot_decay_per_second) == (2, 2.0)
    assert (kept.limit, kept.slot_decay_per_second) == (1, 4.0)  # left as the operator made it
