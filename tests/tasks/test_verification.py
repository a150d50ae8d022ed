"""Verifying artifacts: cache hits by stat fingerprint (no bytes read), `tok1d verify` by full hash,
`tok1d status` by stat alone; a damaged artifact is recomputed, never handed out."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tasks.fingerprints as fingerprints
import tasks.hashing as hashing
import tasks.registry as registry
from flows.cli import main as tok1d
from flows.status import print_status
from tasks.config import IngestConfig
from tasks.fingerprints import (Depth, FileStat, check_artifact, fingerprints_path, forget_fingerprints,
                                read_fingerprints, write_fingerprints)
from tasks.runner import execute_stage
from tasks.stage import Stage, StageOutput, fixed_inputs
from tasks.store import TableRecord

CALLS: list[str] = []


def _write(ctx, n: int, name: str) -> StageOutput:
    CALLS.append(ctx.stage)
    pq.write_table(pa.table({"x": list(range(n))}), ctx.output_dir / f"{name}.parquet")
    (ctx.output_dir / "blob.bin").write_bytes(bytes(range(256)) * n)
    return StageOutput(tables={name: TableRecord(glob=f"{name}.parquet", rows=n, columns={"x": "int64"})})


def _first(ctx):
    return _write(ctx, ctx.config.resolution, "first")


def _second(ctx):
    return _write(ctx, ctx.inputs["first"].rows * 2, "second")


STAGES = {
    "first": Stage("first", "toy", IngestConfig, fixed_inputs(), _first, code="tasks.hashing"),
    "second": Stage("second", "toy", IngestConfig, fixed_inputs("first"), _second, code="tasks.hashing"),
}


@pytest.fixture
def toy(monkeypatch):
    for name, stage in STAGES.items():
        monkeypatch.setitem(registry.stages(), name, stage)
    CALLS.clear()


@pytest.fixture
def hashed(monkeypatch, store) -> list[Path]:
    """Every artifact file (under the store's artifacts/) that anything hashes, in order: each
    module's `sha256_file` is wrapped, so old and new verification paths alike are counted."""
    original = hashing.sha256_file
    seen: list[Path] = []

    def spy(path):
        if Path(path).resolve().is_relative_to(store.root / "artifacts"):
            seen.append(Path(path))
        return original(path)

    for module in list(sys.modules.values()):
        if module is not None and vars(module).get("sha256_file") is original:
            monkeypatch.setattr(module, "sha256_file", spy)
    return seen


def run_first(store, resolution: int = 5, **fields):
    return execute_stage("first", IngestConfig(resolution=resolution, **fields), {}, store)


def tamper_in_place(path: Path) -> None:
    """Change bytes without changing the size, then put the mtime back (what `os.utime` allows)."""
    before = os.stat(path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    with open(path, "r+b") as handle:
        handle.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (before.st_size, before.st_mtime_ns, before.st_ino)


def touch(path: Path) -> None:
    """A new mtime, the bytes as they were."""
    now = os.stat(path)
    os.utime(path, ns=(now.st_atime_ns, now.st_mtime_ns + 10**9))


# ---------------------------------------------------------------------------- cache hits


def test_a_cache_hit_reads_no_artifact_bytes(store, toy, hashed):
    first = run_first(store)
    assert hashed == []  # the commit hashed the files in the work folder; recording fingerprints read nothing
    assert set(read_fingerprints(store, first.manifest)) == {"first.parquet", "blob.bin"}
    for _ in range(3):
        again = run_first(store)
        assert again.cache_hit and again.manifest == first.manifest
    assert hashed == [] and CALLS == ["first"]


def test_a_touched_file_is_hashed_once_accepted_and_trusted_again(store, toy, hashed):
    first = run_first(store)
    path = first.manifest.path(store, "blob.bin")
    touch(path)
    time.sleep(fingerprints.SETTLE_NS / 1e9)  # a change younger than a clock tick is never vouched for
    assert run_first(store).cache_hit
    assert hashed == [path]  # only the touched file, and its bytes still match
    hashed.clear()
    assert run_first(store).cache_hit and hashed == []  # its fingerprint was refreshed
    assert CALLS == ["first"]


def test_a_file_rehashed_right_after_a_change_is_hashed_again_next_time(store, toy, hashed, monkeypatch):
    first = run_first(store)
    path = first.manifest.path(store, "blob.bin")
    touch(path)
    # Every change counts as within a clock tick: a write in that tick could leave the stat as it
    # is, so the fingerprint taken now could hide it.
    monkeypatch.setattr(fingerprints, "SETTLE_NS", 10**15)
    assert run_first(store).cache_hit and run_first(store).cache_hit
    assert hashed == [path, path]
    monkeypatch.setattr(fingerprints, "SETTLE_NS", 0)
    assert run_first(store).cache_hit and run_first(store).cache_hit
    assert hashed == [path, path, path]


def test_an_artifact_without_fingerprints_is_hashed_once(store, toy, hashed):
    first = run_first(store)
    forget_fingerprints(store, first.manifest)  # as an artifact committed before fingerprints existed
    assert run_first(store).cache_hit
    assert sorted(p.name for p in hashed) == ["blob.bin", "first.parquet"]
    hashed.clear()
    assert run_first(store).cache_hit and hashed == [] and fingerprints_path(store, first.manifest).exists()


@pytest.mark.parametrize("replacement", ["longer", "same size"])
def test_a_replaced_file_is_rejected_and_recomputed(store, toy, hashed, replacement):
    first = run_first(store)
    path = first.manifest.path(store, "blob.bin")
    data = path.read_bytes()
    new = data + b"more" if replacement == "longer" else bytes(len(data))
    tmp = path.with_name(".blob.tmp")
    tmp.write_bytes(new)
    os.replace(tmp, path)
    redo = run_first(store)
    assert not redo.cache_hit and CALLS == ["first", "first"]
    assert redo.manifest.artifact_id == first.manifest.artifact_id and path.read_bytes() == data
    assert check_artifact(store, redo.manifest, Depth.FULL).intact


def test_bytes_edited_with_mtime_restored_are_caught_on_a_hit_by_their_ctime(store, toy):
    first = run_first(store)
    path = first.manifest.path(store, "first.parquet")
    time.sleep(fingerprints.SETTLE_NS / 1e9)  # past the file system's clock tick: no one can set ctime back
    tamper_in_place(path)
    assert os.stat(path).st_ctime_ns != read_fingerprints(store, first.manifest)["first.parquet"].ctime_ns
    redo = run_first(store)
    assert not redo.cache_hit and CALLS == ["first", "first"]


def test_same_content_from_another_key_hashes_no_file_twice(store, toy, hashed):
    a = run_first(store)
    b = run_first(store, val_fraction=0.5)  # another cache key, the same bytes: the store keeps its copy
    assert not b.cache_hit and a.manifest.artifact_id == b.manifest.artifact_id
    assert len(hashed) == len(set(hashed))  # the commit's check of the kept copy, not again for fingerprints
    hashed.clear()
    assert run_first(store, val_fraction=0.5).cache_hit and hashed == []


# ---------------------------------------------------------------------------- tok1d verify


def _two_stages(store):
    first = run_first(store)
    second = execute_stage("second", IngestConfig(), {"first": first.manifest}, store)
    return first.manifest, second.manifest


def test_verify_hashes_every_file_and_names_the_tampered_one(store, toy, hashed, capsys):
    first, second = _two_stages(store)
    assert tok1d(["verify", "--store", str(store.root)]) == 0
    assert "4 files" in capsys.readouterr().out and len(hashed) == 4
    path = second.path(store, "second.parquet")
    tamper_in_place(path)  # same size, same mtime: only the bytes say so
    assert tok1d(["verify", "--store", str(store.root)]) == 1
    out = capsys.readouterr().out
    assert f"BAD second: altered {path} (sha256 differs from the manifest)" in out
    assert out.count("BAD") == 1 and "1 bad file" in out
    assert tok1d(["verify", "--store", str(store.root), "--stage", "first"]) == 0
    assert "BAD" not in capsys.readouterr().out


def test_verify_reports_missing_files_and_unknown_stages(store, toy, capsys):
    first, _ = _two_stages(store)
    first.path(store, "blob.bin").unlink()
    assert tok1d(["verify", "--store", str(store.root)]) == 1
    assert f"BAD first: missing {first.path(store, 'blob.bin')}" in capsys.readouterr().out
    assert tok1d(["verify", "--store", str(store.root), "--stage", "frist"]) == 2
    err = capsys.readouterr().err
    assert "no artifacts of stage 'frist'" in err and "stages with artifacts: first, second" in err


def test_bit_rot_under_a_matching_fingerprint_is_found_by_verify_then_recomputed(store, toy):
    first = run_first(store)
    path = first.manifest.path(store, "blob.bin")
    tamper_in_place(path)
    # Bit rot changes bytes and no stat: fingerprints matching the rotten file stand for it.
    fingerprints = read_fingerprints(store, first.manifest)
    record = next(r for r in first.manifest.files if r.path == "blob.bin")
    write_fingerprints(store, first.manifest, {**fingerprints, "blob.bin": FileStat.of(record.sha256, os.stat(path))})
    assert run_first(store).cache_hit  # what stat cannot see, a hit cannot either
    assert tok1d(["verify", "--store", str(store.root)]) == 1
    assert not fingerprints_path(store, first.manifest).exists()  # forgotten: the next hit hashes
    redo = run_first(store)
    assert not redo.cache_hit and CALLS == ["first", "first"]
    assert tok1d(["verify", "--store", str(store.root)]) == 0


# ---------------------------------------------------------------------------- tok1d status


def test_status_reads_no_artifact_bytes(store, toy, hashed, capsys):
    first = run_first(store)
    cache_line = lambda: next(l for l in capsys.readouterr().out.splitlines() if l.startswith("  first"))  # noqa: E731
    assert print_status(store.root) == 0
    assert "intact" in cache_line()
    path = first.manifest.path(store, "blob.bin")
    touch(path)
    print_status(store.root)
    assert "unverified" in cache_line()
    path.unlink()
    print_status(store.root)
    assert "damaged" in cache_line()
    assert hashed == []


def test_verification_code_is_outside_every_stage_code_version():
    # Editing how hits are verified must not change any stage's cache key (an ImageNet ingest
    # would be recomputed): no stage may import the runner, cache or verification modules.
    from tasks.code_version import import_closure, package_modules

    for stage in registry.stages().values():
        reached = import_closure(package_modules(stage.package))
        assert not reached & {"tasks.fingerprints", "tasks.verify", "tasks.cache", "tasks.runner"}, stage.name
