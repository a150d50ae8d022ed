"""The caption stage's Gemini backend against a real local HTTP server, with the real google-genai client."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tasks.caption.backends.cache import CaptionCache
from tasks.caption.backends.gemini import gemini_cache_key
from tasks.caption.backends.gemini.client import GeminiFatalError, backoff_delay, parse_response, retry_after_seconds
from tasks.caption.read import load_captions, load_failures
from tasks.caption.stage import run_caption
from tasks.config import CaptionConfig, GeminiConfig, RuntimeConfig
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
    Ok,
    Sleep,
    Status,
    caption_for,
)

ROOT = Path(__file__).resolve().parents[2]
KEY = "tok1d-TEST-KEY-7f3a9c1e5b"
MODEL = "gemini-test-flash"


def sha(index: int) -> str:
    return hashlib.sha256(colour_png(index)).hexdigest()


def image_id(index: int) -> str:
    return f"img-{index:04d}"


def gemini_config(server: FakeGemini, **overrides) -> GeminiConfig:
    values = dict(
        model=MODEL,
        base_url=server.url,
        timeout_s=0.4,
        max_retries=3,
        backoff_base_s=0.01,
        backoff_max_s=0.5,
        concurrency=4,
        max_words=12,
    )
    values.update(overrides)
    return GeminiConfig(**values)


def caption_context(work: Path, store: Store, manifest, gemini: GeminiConfig, **config) -> StageContext:
    return StageContext(
        stage="caption",
        config=CaptionConfig(backend="gemini", gemini=gemini, **config),
        inputs={"ingest": manifest},
        store=store,
        runtime=RuntimeConfig(),
        cache_key="k" * 64,
        work_dir=work,
    )


def run(work: Path, store: Store, manifest, gemini: GeminiConfig, **config):
    ctx = caption_context(work, store, manifest, gemini, **config)
    output = run_caption(ctx)
    return output, commit_output(store, ctx, output)


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", KEY)
    monkeypatch.delenv("HTTP_PROXY", raising=False)
    monkeypatch.delenv("HTTPS_PROXY", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")


# The fault cases, by image index: (behaviours, expected outcome).
LONG = " ".join(f"word{i}" for i in range(30))
FAULTS = {
    1: ([Status(429, retry_after=0.3), Ok()], "ok"),
    2: ([Status(500), Status(503), Ok()], "ok"),
    3: ([Sleep(1.5), Ok()], "ok"),
    4: ([BlockedPrompt("SAFETY")], "blocked"),
    5: ([Finish("SAFETY")], "blocked"),
    6: ([Finish("MAX_TOKENS")], "incomplete"),
    7: ([Malformed()], "malformed"),
    8: ([Empty()], "empty"),
    9: ([Status(500)] * 4, "server-error"),
    10: ([Status(429, retry_delay="0.02s")] * 4, "rate-limited"),
    11: ([Sleep(1.5)] * 4, "timeout"),
    12: ([Status(400, message="image too large")], "bad-request"),
    13: ([Ok(text=f"  \"{LONG}\"  ")], "ok"),
}


def script_faults(server: FakeGemini) -> None:
    for index, (behaviours, _) in FAULTS.items():
        server.script(sha(index), behaviours)


def test_success_sends_the_image_prompt_and_key(tmp_path, store):
    manifest = ingest_artifact(store, 10)
    with FakeGemini() as server:
        output, artifact = run(tmp_path / "w", store, manifest, gemini_config(server), shard_rows=3)

    captions = {r["image_id"]: r for r in load_captions(artifact, store).to_pylist()}
    assert set(captions) == {image_id(i) for i in range(10)}
    for i in range(10):
        assert captions[image_id(i)]["caption"] == caption_for(sha(i))
        assert captions[image_id(i)]["origin"] == f"gemini:{MODEL}"
    assert output.complete and output.summary["requests"] == 10 and output.summary["retries"] == 0
    request = server.requests[0]
    assert request.model == MODEL and request.mime_type == "image/png"
    assert request.prompt == GeminiConfig().prompt
    assert request.headers["x-goog-api-key"] == KEY
    assert {r.image_sha for r in server.requests} == {sha(i) for i in range(10)}
    # 10 captions in shards of 3 rows under the store-wide cache.
    cache_dir = store.root / "caches" / "captions" / gemini_cache_key(gemini_config(server))
    assert sorted(pq.read_table(p).num_rows for p in cache_dir.glob("part-*.parquet")) == [1, 3, 3, 3]


def test_fault_cases_then_rerun_retries_only_failures(tmp_path, store):
    manifest = ingest_artifact(store, 16)
    with FakeGemini() as server:
        script_faults(server)
        output, artifact = run(tmp_path / "w1", store, manifest, gemini_config(server))

        failures = {r["image_id"]: r for r in load_failures(artifact, store).to_pylist()}
        captions = {r["image_id"]: r["caption"] for r in load_captions(artifact, store).to_pylist()}
        for index, (behaviours, outcome) in FAULTS.items():
            if outcome == "ok":
                assert image_id(index) in captions, index
                assert image_id(index) not in failures
            else:
                assert image_id(index) not in captions, index
                assert failures[image_id(index)]["reason"] == outcome, index
        assert "SAFETY" in failures[image_id(4)]["detail"] and "SAFETY" in failures[image_id(5)]["detail"]
        # Retryable failures were retried max_retries times; answers that are final were not.
        assert failures[image_id(9)]["attempts"] == 4 and failures[image_id(11)]["attempts"] == 4
        assert failures[image_id(4)]["attempts"] == 1 and failures[image_id(7)]["attempts"] == 1
        # A caption over max_words is cut (and stripped of its quotes), and counted.
        assert captions[image_id(13)] == " ".join(f"word{i}" for i in range(12))
        assert output.summary["truncated"] == 1

        # Retry-After was honoured: the retry came no sooner than the server asked.
        first, second = server.requests_for(sha(1))
        assert second.at - first.at >= 0.3
        assert len(server.requests_for(sha(2))) == 3

        summary = output.summary
        assert summary["failed"] == 9 and summary["captioned"] == 7 and summary["pending"] == 0
        assert summary["coverage"] == pytest.approx(7 / 16)
        assert summary["retries"] == 1 + 2 + 1 + 3 + 3 + 3
        assert summary["requests"] == 16 + summary["retries"] == len(server.requests)  # the SDK retried nothing
        assert not output.complete

        # Nothing but real captions went to the cache.
        cache = CaptionCache(store.root / "caches" / "captions" / gemini_cache_key(gemini_config(server)), 1)
        assert set(cache.load()) == set(captions)

        # The next run asks again for exactly the failed images (scripts are used up: all succeed).
        before = len(server.requests)
        rerun, artifact = run(tmp_path / "w2", store, manifest, gemini_config(server))
        again = {r.image_sha for r in server.requests[before:]}
        assert again == {sha(int(i[4:])) for i in failures}
        assert len(server.requests) - before == len(failures)
    assert rerun.complete and rerun.summary["captioned"] == 16 and rerun.summary["failed"] == 0
    rows = load_captions(artifact, store)
    assert rows.num_rows == 16 and len(set(rows["image_id"].to_pylist())) == 16


def test_cache_is_shared_across_runs_and_keyed_by_prompt(tmp_path, store):
    manifest = ingest_artifact(store, 6)
    with FakeGemini() as server:
        run(tmp_path / "a", store, manifest, gemini_config(server))
        assert len(server.requests) == 6
        # Another preset with other run settings but the same model and prompt: all cached.
        output, _ = run(tmp_path / "b", store, manifest, gemini_config(server, concurrency=1), shard_rows=2)
        assert len(server.requests) == 6 and output.summary["requests"] == 0 and output.complete
        # A new prompt is a new cache.
        output, _ = run(tmp_path / "c", store, manifest, gemini_config(server, prompt="Say what it is."))
        assert len(server.requests) == 12 and output.summary["requests"] == 6
    assert len(list((store.root / "caches" / "captions").iterdir())) == 2


def test_all_cached_needs_no_key(tmp_path, store, monkeypatch):
    manifest = ingest_artifact(store, 3)
    with FakeGemini() as server:
        run(tmp_path / "a", store, manifest, gemini_config(server))
        monkeypatch.delenv("GEMINI_API_KEY")
        output, _ = run(tmp_path / "b", store, manifest, gemini_config(server))
    assert output.summary["captioned"] == 3


def test_missing_key_is_a_clear_error(tmp_path, store, monkeypatch):
    monkeypatch.delenv("GEMINI_API_KEY")
    manifest = ingest_artifact(store, 2)
    with FakeGemini() as server, pytest.raises(RuntimeError, match="GEMINI_API_KEY"):
        run(tmp_path / "w", store, manifest, gemini_config(server))
    assert server.requests == []


def test_key_from_prefect_secret_block(tmp_path, store, monkeypatch):
    # A real Secret block in a real (ephemeral) Prefect, read through the vault flows/ attaches.
    from prefect.blocks.system import Secret

    from flows.prefect_secrets import PrefectSecrets
    from tasks.secrets import attached_vault

    Secret(value="block-key-0123456789").save("gemini-key", overwrite=True)
    monkeypatch.delenv("GEMINI_API_KEY")
    manifest = ingest_artifact(store, 2)
    with FakeGemini() as server:
        with pytest.raises(RuntimeError, match="secret_block.*gemini-key"):  # no vault outside a Prefect task
            run(tmp_path / "w0", store, manifest, gemini_config(server, secret_block="gemini-key"))
        with attached_vault(PrefectSecrets()):
            output, _ = run(tmp_path / "w", store, manifest, gemini_config(server, secret_block="gemini-key"))
    assert {r.headers["x-goog-api-key"] for r in server.requests} == {"block-key-0123456789"}
    assert output.summary["captioned"] == 2


@pytest.mark.parametrize(
    "answer, match",
    [
        (Status(400, message="API key not valid. Please pass a valid API key.", reason="API_KEY_INVALID"), "API key"),
        (Status(403, message="permission denied"), "API key"),
        (Status(404, message="models/x is not found"), "does not know model"),
    ],
)
def test_rejected_key_or_model_stops_the_run(tmp_path, store, answer, match):
    manifest = ingest_artifact(store, 4)
    with FakeGemini(default=answer, echo_key=True) as server:
        with pytest.raises(GeminiFatalError, match=match) as error:
            run(tmp_path / "w", store, manifest, gemini_config(server, concurrency=1))
    text = "".join(traceback.format_exception(error.type, error.value, error.tb))
    assert KEY not in text
    assert len(server.requests) == 1  # stops at the first answer instead of failing every image


def test_key_never_appears_in_outputs_logs_or_errors(tmp_path, store, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    manifest = ingest_artifact(store, 16)
    with FakeGemini(echo_key=True) as server:
        script_faults(server)
        output, artifact = run(tmp_path / "w1", store, manifest, gemini_config(server))
        server.default = Status(401, message="unauthorized")
        with pytest.raises(GeminiFatalError) as fatal:
            run(tmp_path / "w2", store, manifest, gemini_config(server, prompt="another prompt"))
    assert server.requests[0].headers["x-goog-api-key"] == KEY  # the key did travel
    details = " ".join(r["detail"] for r in load_failures(artifact, store).to_pylist())
    assert "***" in details  # the server echoed the key into error messages; we redacted it

    haystacks = {
        "log": caplog.text + "".join(str(record.__dict__) for record in caplog.records),
        "output": "".join(capfd.readouterr()),
        "error": "".join(traceback.format_exception(fatal.type, fatal.value, fatal.tb)),
        "summary": json.dumps(output.summary),
    }
    for name, text in haystacks.items():
        assert KEY not in text, name
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


KILL_SCRIPT = """
import sys
from tasks.caption.stage import run_caption
from tasks.config import CaptionConfig, RuntimeConfig
from tasks.stage import StageContext
from tasks.store import Manifest, Store

store = Store(sys.argv[1])
manifest = Manifest.model_validate_json(open(sys.argv[2]).read())
config = CaptionConfig.model_validate_json(open(sys.argv[3]).read())
ctx = StageContext("caption", config, {"ingest": manifest}, store, RuntimeConfig(), "k" * 64, store.root / "kill-work")
run_caption(ctx)
print("finished")
"""


def test_kill_mid_run_then_rerun_captions_each_image_once(tmp_path, store):
    count = 48
    manifest = ingest_artifact(store, count)
    with FakeGemini(delay_s=0.25) as server:
        gemini = gemini_config(server, concurrency=2, timeout_s=5.0)
        config = CaptionConfig(backend="gemini", gemini=gemini, shard_rows=4)
        (tmp_path / "manifest.json").write_text(manifest.model_dump_json())
        (tmp_path / "config.json").write_text(config.model_dump_json())
        (tmp_path / "kill.py").write_text(KILL_SCRIPT)
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        log_file = open(tmp_path / "kill.log", "wb")
        process = subprocess.Popen(
            [sys.executable, str(tmp_path / "kill.py"), str(store.root), str(tmp_path / "manifest.json"), str(tmp_path / "config.json")],
            cwd=ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        cache_dir = store.root / "caches" / "captions" / gemini_cache_key(gemini)
        deadline = time.monotonic() + 40
        while len(list(cache_dir.glob("part-*.parquet"))) < 2:
            assert process.poll() is None, (tmp_path / "kill.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "no caption shards were written"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait()
        log_file.close()
        assert process.returncode == -signal.SIGKILL

        cached = CaptionCache(cache_dir, 1).load()
        assert 8 <= len(cached) < count
        server.delay_s = 0.0
        before = len(server.requests)
        output, artifact = run(tmp_path / "rerun", store, manifest, gemini, shard_rows=4)
        rerun_requests = [r.image_sha for r in server.requests[before:]]

    missing = {sha(i) for i in range(count) if image_id(i) not in cached}
    assert sorted(rerun_requests) == sorted(missing)  # each missing image asked for once, no cached one
    assert output.complete and output.summary["captioned"] == count and output.summary["requests"] == len(missing)
    captions = load_captions(artifact, store)
    assert sorted(captions["image_id"].to_pylist()) == [image_id(i) for i in range(count)]
    by_id = dict(zip(captions["image_id"].to_pylist(), captions["caption"].to_pylist()))
    assert all(by_id[image_id(i)] == caption_for(sha(i)) for i in range(count))
    # The cache itself holds every image exactly once: the rerun added only what was missing.
    cache_ids = [i for p in cache_dir.glob("part-*.parquet") for i in pq.read_table(p)["image_id"].to_pylist()]
    assert sorted(cache_ids) == [image_id(i) for i in range(count)]


def test_cache_read_keeps_first_caption_per_image(tmp_path):
    from tasks.caption.backends import CaptionResult

    cache = CaptionCache(tmp_path / "cache", shard_rows=2)
    cache.add(CaptionResult("a", "first a", "gemini:m"))
    cache.add(CaptionResult("b", "first b", "gemini:m"))
    cache.add(CaptionResult("a", "second a", "gemini:m"))
    cache.flush()
    (tmp_path / "cache" / ".part-half-written.parquet.tmp").write_bytes(b"PAR1 garbage")
    assert cache.load() == {"a": ("first a", "gemini:m"), "b": ("first b", "gemini:m")}


def test_backoff_and_retry_after_parsing():
    rng = random.Random(0)
    delays = [backoff_delay(retry, 0.5, 3.0, rng) for retry in range(8) for _ in range(50)]
    assert min(delays) >= 0.0 and max(delays) <= 3.0
    assert max(backoff_delay(0, 0.5, 3.0, rng) for _ in range(100)) <= 0.5
    assert max(backoff_delay(6, 0.5, 3.0, rng) for _ in range(100)) > 1.0  # grows, then capped

    class Response:
        def __init__(self, headers):
            self.headers = headers

    class Error:
        def __init__(self, headers, details=None):
            self.response = Response(headers)
            self.details = details or {}

    assert retry_after_seconds(Error({"retry-after": "2.5"})) == 2.5
    date = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(time.time() + 30))
    assert 25 < retry_after_seconds(Error({"retry-after": date})) <= 31
    info = {"error": {"details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "7s"}]}}
    assert retry_after_seconds(Error({}, info)) == 7.0
    assert retry_after_seconds(Error({})) is None


def test_parse_response_skips_thoughts():
    from google.genai import types

    response = types.GenerateContentResponse(
        candidates=[
            types.Candidate(
                content=types.Content(
                    role="model",
                    parts=[types.Part(text="let me think", thought=True), types.Part(text=" A grey\nsneaker. ")],
                ),
                finish_reason=types.FinishReason.STOP,
            )
        ]
    )
    assert parse_response(response, 75) == ("A grey sneaker.", None, "", False)
