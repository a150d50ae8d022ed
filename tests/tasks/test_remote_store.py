"""A store on object storage (tasks/remote_store.py, tasks/mirror.py) against a real S3 server
(moto's server mode on 127.0.0.1): commits that stay atomic without rename, slots counted only
when manifest and files verify, a second machine's mirror sharing the results, the slot lock."""

from __future__ import annotations

import functools
import json
import threading
import time

import pytest

import flows.gc
from builders.s3_server import BUCKET, s3_server
from builders.toy_stages import CALLS, TOY_STAGES, use_stages
from flows.gc import print_gc
from tasks import lineage, remote_gc
from tasks.config import IngestConfig
from tasks.remote_store import RemoteStore
from tasks.runner import execute_stage
from tasks.store import Store


@pytest.fixture(scope="module")
def s3():
    with s3_server() as env:
        yield env


@pytest.fixture
def url(s3, request):
    return f"s3://{BUCKET}/{request.node.name}"


@pytest.fixture
def toy(monkeypatch):
    use_stages(monkeypatch, TOY_STAGES)
    CALLS.clear()


def machine(tmp_path, monkeypatch, url: str, name: str) -> Store:
    """The store as a process on machine `name` sees it: its own mirror of `url`."""
    monkeypatch.setenv("TOK1D_STORE_MIRROR", str(tmp_path / name))
    return Store(url)


def test_a_second_machine_gets_the_first_ones_results_from_the_bucket(tmp_path, monkeypatch, url, toy):
    first = machine(tmp_path, monkeypatch, url, "a")
    a1 = execute_stage("first", IngestConfig(resolution=5), {}, first)
    a2 = execute_stage("second", IngestConfig(), {"first": a1.manifest}, first)
    remote = RemoteStore(url)
    listed = remote.list_files("")
    assert f"{a1.manifest.root}/manifest.json" in listed and f"{a2.manifest.root}/second.parquet" in listed
    assert not [path for path in listed if "/." in path or path.endswith(".tmp")], listed  # no renames, no temp names
    assert not [path for path in listed if path.startswith(("work/", "leases/", "locks/"))], listed

    second = machine(tmp_path, monkeypatch, url, "b")
    assert second.root != first.root
    b1 = execute_stage("first", IngestConfig(resolution=5), {}, second)
    b2 = execute_stage("second", IngestConfig(), {"first": b1.manifest}, second)
    assert b1.cache_hit and b2.cache_hit and CALLS == ["first", "second"]
    assert b2.manifest.artifact_id == a2.manifest.artifact_id
    assert not b2.manifest.problems(second)  # pulled into b's mirror, every file verified
    # A process given the mirror's folder is the same remote store (stage tasks get the folder).
    assert Store(second.root).remote.url == url

    # Each machine's lineage records reach the other: four computed and two hit stage runs.
    rows = lineage.connect(Store(first.root)).execute(
        "select stage, cache_hit from stages where status = 'completed' order by stage, cache_hit").fetchall()
    assert rows == [("first", False), ("first", True), ("second", False), ("second", True)]


def test_a_slot_counts_only_when_its_manifest_exists_and_every_file_verifies(tmp_path, monkeypatch, url, toy):
    writer = machine(tmp_path, monkeypatch, url, "writer")
    done = execute_stage("first", IngestConfig(resolution=5), {}, writer)
    remote = RemoteStore(url)
    manifest_key = f"{done.manifest.root}/manifest.json"
    saved = remote.read_bytes(manifest_key)

    # A kill between the files and the manifest: the cache record would not be there yet, but
    # even with it there a slot whose manifest is missing is no hit.
    remote.delete(manifest_key)
    missing = execute_stage("first", IngestConfig(resolution=5), {}, machine(tmp_path, monkeypatch, url, "b"))
    assert not missing.cache_hit and missing.manifest.artifact_id == done.manifest.artifact_id
    # The recompute uploaded the same artifact again, manifest included.
    assert json.loads(remote.read_bytes(manifest_key))["files"] == json.loads(saved)["files"]

    # A file altered on the bucket: no mirror takes it; the stage recomputes into the next slot.
    data_key = f"{done.manifest.root}/first.parquet"
    remote.write_bytes(data_key, remote.read_bytes(data_key)[:-3] + b"xyz")
    fresh = machine(tmp_path, monkeypatch, url, "c")
    altered = execute_stage("first", IngestConfig(resolution=5), {}, fresh)
    assert not altered.cache_hit and not altered.manifest.problems(fresh)
    assert CALLS == ["first", "first", "first"]
    slots = [path for path in remote.list_files("cache/first")]
    assert len(slots) == 3, slots


def test_a_killed_pull_leaves_nothing_trusted_and_the_next_completes_it(tmp_path, monkeypatch, url, toy):
    done = execute_stage("first", IngestConfig(resolution=5), {}, machine(tmp_path, monkeypatch, url, "a"))
    reader = machine(tmp_path, monkeypatch, url, "b")
    folder = reader.root / done.manifest.root
    # What a pull killed after its first file leaves: the file, no manifest.
    folder.mkdir(parents=True)
    RemoteStore(url).get_file(f"{done.manifest.root}/first.parquet", folder / "first.parquet")
    assert Store.read_manifest_in(folder) is None
    again = execute_stage("first", IngestConfig(resolution=5), {}, reader)
    assert again.cache_hit and not again.manifest.problems(reader)
    assert CALLS == ["first"]


def test_uploads_cut_off_by_a_lost_connection_are_finished_by_the_next_run(tmp_path, monkeypatch, url, toy, caplog):
    a = machine(tmp_path, monkeypatch, url, "a")
    put_file = RemoteStore.put_file
    unreachable = []

    def lost_connection(self, local, relative):
        if relative.startswith(tuple(unreachable)):
            raise ConnectionError(f"connection reset uploading {relative}")
        return put_file(self, local, relative)

    monkeypatch.setattr(RemoteStore, "put_file", lost_connection)
    # The connection drops after the artifact is uploaded, before its cache record is.
    unreachable[:] = ["cache/"]
    with pytest.raises(ConnectionError):
        execute_stage("first", IngestConfig(resolution=5), {}, a)
    assert not RemoteStore(url).list_files("cache")
    unreachable[:] = ["lineage/"]  # now lineage uploads fail: the records wait in the mirror
    again = execute_stage("first", IngestConfig(resolution=5), {}, a)  # the commit stands: published now
    assert again.cache_hit and CALLS == ["first"]
    assert "could not upload" in caplog.text
    unreachable.clear()

    b = machine(tmp_path, monkeypatch, url, "b")
    hit = execute_stage("first", IngestConfig(resolution=5), {}, b)
    assert hit.cache_hit and hit.manifest.artifact_id == again.manifest.artifact_id
    # The records a could not upload reach the bucket with a's next look at its lineage.
    lineage.connect(a).close()
    events = lineage.connect(b).execute(
        "select status, cache_hit from stage_events where stage = 'first' order by event_time").fetchall()
    assert events == [("running", False), ("failed", False), ("completed", True), ("completed", True)]


def test_the_slot_lock_makes_another_machine_wait(url):
    one, other = RemoteStore(url), RemoteStore(url)
    order, held = [], []

    def wait_then_hold():
        with other.lock("first/slot", "first"):
            order.append("other")
            held.append(json.loads(other.read_bytes("locks/first/slot.json")))

    with one.lock("first/slot", "first"):
        waiter = threading.Thread(target=wait_then_hold)
        waiter.start()
        time.sleep(1.0)
        order.append("one done")
    waiter.join(timeout=30)
    assert order == ["one done", "other"]
    assert held[0]["pid"] > 0 and other.read_bytes("locks/first/slot.json") is None


def test_a_lock_whose_holder_died_is_taken_over(url, caplog):
    remote = RemoteStore(url)
    remote.write_bytes("locks/first/dead.json", b'{"host": "gone", "pid": 1}')  # never refreshed again
    time.sleep(1.1)
    with remote.lock("first/dead", "first", expiry_s=1.0):
        pass
    assert "taking over the lock" in caplog.text
    assert remote.read_bytes("locks/first/dead.json") is None


def test_gc_deletes_dead_locks_and_artifacts_no_record_names_from_the_bucket(tmp_path, monkeypatch, url, toy, capsys):
    store = machine(tmp_path, monkeypatch, url, "a")
    done = execute_stage("first", IngestConfig(resolution=5), {}, store)
    remote = RemoteStore(url)
    # An upload cut short (a file, no manifest, no record), a whole artifact no record names, a
    # dead holder's lock; and an unnamed folder of a stage whose lock is live (being uploaded).
    leftovers = {"artifacts/first/cut/first.parquet": b"x" * 10, "artifacts/first/old/first.parquet": b"y" * 20,
                 "artifacts/first/old/manifest.json": b"{}", "locks/first/dead.json": b"{}"}
    for relative, data in leftovers.items():
        remote.write_bytes(relative, data)
    remote.write_bytes("artifacts/second/busy/second.parquet", b"z")
    time.sleep(4.1)  # S3 times have whole seconds: everything above is now older than 3 s
    live = "locks/second/live.json"
    remote.write_bytes(live, b"{}")  # its holder rewrites it before each gc below, as a heartbeat would
    kept = set(remote.list_files("")) - set(leftovers)
    # The thresholds (10 minutes in use) shortened so the test need not wait.
    monkeypatch.setattr(flows.gc, "plan_remote_gc", functools.partial(remote_gc.plan_remote_gc, stale_s=3.0,
                                                                       lock_expiry_s=3.0))

    assert print_gc(store.root, dry_run=True, artifacts=True) == 0
    listed = capsys.readouterr().out
    assert set(remote.list_files("")) == kept | set(leftovers), "a dry run deletes nothing"
    assert f"would remove {url}/artifacts/first/cut (0.0 MiB, 1 object(s)): artifact no cache record on the " \
           "bucket names (an upload cut short: no manifest)" in listed, listed
    assert f"would remove {url}/artifacts/first/old (0.0 MiB, 2 object(s))" in listed
    assert f"would remove {url}/locks/first/dead.json" in listed and "its holder died" in listed
    assert "busy" not in listed and "live.json" not in listed and done.manifest.root not in listed
    assert "3 removal(s)" in listed

    remote.write_bytes(live, b"{}")
    assert print_gc(store.root, artifacts=True) == 0
    assert set(remote.list_files("")) == kept
    assert "3 removal(s)" in capsys.readouterr().out
    # What a record names is untouched: another machine still gets it as a verified hit.
    again = execute_stage("first", IngestConfig(resolution=5), {}, machine(tmp_path, monkeypatch, url, "b"))
    assert again.cache_hit and CALLS == ["first"]
    # Without --artifacts only dead locks go.
    remote.write_bytes("artifacts/first/cut/first.parquet", b"x")
    assert [r.path for r in remote_gc.plan_remote_gc(remote, stale_s=0.0)] == []


def test_a_missing_bucket_or_a_mirror_of_another_store_is_a_clear_error(tmp_path, monkeypatch, s3):
    monkeypatch.setenv("TOK1D_STORE_MIRROR", str(tmp_path / "m"))
    with pytest.raises(FileNotFoundError, match="bucket 'no-such-bucket' does not exist"):
        Store("s3://no-such-bucket/x")
    Store(f"s3://{BUCKET}/one")
    with pytest.raises(ValueError, match=f"mirrors the store s3://{BUCKET}/one, not s3://{BUCKET}/two"):
        Store(f"s3://{BUCKET}/two")
