"""The pipeline core: config validation, artifact store, verified cache slots, lineage records."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import lineage
from tasks.config import ConfigError, IngestConfig, RuntimeConfig
from tasks.presets import load_config
from tasks.runner import execute_stage
from tasks.store import Store

from builders.toy_stages import CALLS, TOY_STAGES, _first, toy_stage, use_stages


@pytest.fixture
def toy_stages(monkeypatch):
    use_stages(monkeypatch, TOY_STAGES)
    CALLS.clear()
    return TOY_STAGES


# ---------------------------------------------------------------------------- config


def test_overrides_are_typed_and_validated():
    config = load_config("smoke", ["ingest.resolution=16", "embed-text.max_tokens=4", "ingest.val_fraction=2e-1"])
    assert config.ingest.resolution == 16
    assert config.embed_text.max_tokens == 4
    assert config.ingest.val_fraction == pytest.approx(0.2)


@pytest.mark.parametrize(
    "override, message",
    [
        ("ingest.colour=red", "ingest.colour: unknown key"),
        ("ingest.resolution=abc", "ingest.resolution: Input should be a valid integer"),
        ("ingest.source.kind=camera", "ingest.source.kind"),
        ("nonsense", "must look like key.path=value"),
        # Model values the tokenizer rejects fail here, before any stage runs (not after ingest).
        ("train_tokenizer.model.size=XXL", "train_tokenizer.model: TokenizerConfig.size='XXL'"),
        ("train_tokenizer.model.num_latent_tokens=300", "train_tokenizer.model: num_latent_tokens=300 must be"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("smoke", [override])


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known presets: .*smoke"):
        load_config("no-such-preset")


def test_section_hash_follows_the_section_only():
    base = load_config("smoke")
    other_ingest = load_config("smoke", ["ingest.resolution=16"])
    assert base.ingest.digest() != other_ingest.ingest.digest()
    assert base.caption.digest() == other_ingest.caption.digest()


# ---------------------------------------------------------------------------- cache


def test_second_run_is_a_verified_hit(tmp_path, toy_stages):
    store = Store(tmp_path / "store")
    first = execute_stage("first", IngestConfig(resolution=5), {}, store)
    second = execute_stage("second", IngestConfig(), {"first": first.manifest}, store)
    assert not first.cache_hit and not second.cache_hit
    again = execute_stage("first", IngestConfig(resolution=5), {}, store)
    assert again.cache_hit and again.manifest == first.manifest
    assert CALLS == ["first", "second"]
    assert pq.read_table(second.manifest.path(store, "second.parquet")).num_rows == 10


def test_config_change_misses_and_same_content_shares_the_artifact(tmp_path, toy_stages):
    store = Store(tmp_path / "store")
    a = execute_stage("first", IngestConfig(resolution=5), {}, store)
    b = execute_stage("first", IngestConfig(resolution=5, val_fraction=0.5), {}, store)
    assert not b.cache_hit
    # Same bytes -> same content address, even from another cache key.
    assert a.manifest.artifact_id == b.manifest.artifact_id


def test_deleted_or_altered_output_is_recomputed_not_trusted(tmp_path, toy_stages):
    store = Store(tmp_path / "store")
    first = execute_stage("first", IngestConfig(resolution=5), {}, store)
    path = first.manifest.path(store, "first.parquet")
    path.unlink()
    redo = execute_stage("first", IngestConfig(resolution=5), {}, store)
    assert not redo.cache_hit and path.exists()
    assert not redo.manifest.problems(store)
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")  # altered in place
    assert redo.manifest.problems(store)
    third = execute_stage("first", IngestConfig(resolution=5), {}, store)
    assert not third.cache_hit and not third.manifest.problems(store)
    assert CALLS == ["first", "first", "first"]


def test_code_change_invalidates(tmp_path, toy_stages, monkeypatch):
    store = Store(tmp_path / "store")
    execute_stage("first", IngestConfig(resolution=5), {}, store)
    use_stages(monkeypatch, {"first": toy_stage("first", _first, extra_files=("tasks/secrets.py",))})
    assert not execute_stage("first", IngestConfig(resolution=5), {}, store).cache_hit


def test_incomplete_output_is_handed_on_but_recomputed_next_time(tmp_path, monkeypatch):
    def partial(ctx):
        out = _first(ctx)
        out.complete = False
        return out

    use_stages(monkeypatch, {"first": toy_stage("first", partial)})
    store = Store(tmp_path / "store")
    one = execute_stage("first", IngestConfig(resolution=3), {}, store)
    two = execute_stage("first", IngestConfig(resolution=3), {}, store)
    assert not one.cache_hit and not two.cache_hit
    assert one.manifest.artifact_id == two.manifest.artifact_id


def test_failure_is_recorded_with_its_reason(tmp_path, monkeypatch):
    def broken(ctx):
        raise RuntimeError("disk on fire")

    use_stages(monkeypatch, {"first": toy_stage("first", broken)})
    store = Store(tmp_path / "store")
    with pytest.raises(RuntimeError):
        execute_stage("first", IngestConfig(), {}, store)
    connection = lineage.connect(store)
    status, error = connection.execute("select status, error from stages").fetchone()
    assert status == "failed" and "disk on fire" in error


# ---------------------------------------------------------------------------- lineage


def test_lineage_views_in_the_duckdb_file(tmp_path, toy_stages):
    store = Store(tmp_path / "store")
    first = execute_stage("first", IngestConfig(resolution=4), {}, store, RuntimeConfig(), run_id="r1")
    execute_stage("second", IngestConfig(), {"first": first.manifest}, store, RuntimeConfig(), run_id="r1")
    execute_stage("first", IngestConfig(resolution=4), {}, store, RuntimeConfig(), run_id="r2")
    assert lineage.ensure_database(store)
    connection = duckdb.connect(str(store.duckdb_path), read_only=True)
    stages = connection.execute("select stage, status, cache_hit from stages order by event_time").fetchall()
    assert stages == [("first", "completed", False), ("second", "completed", False), ("first", "completed", True)]
    edges = connection.execute("select input_artifact, output_artifact from lineage where stage = 'second'").fetchall()
    assert edges[0][0] == first.manifest.artifact_id
    metrics = connection.execute("select stage, name, value from metrics order by event_time").fetchall()
    assert ("second", "count", 8.0) in metrics
    artifacts = connection.execute("select count(distinct artifact_id) from artifacts").fetchone()[0]
    assert artifacts == 2
    connection.close()


def test_a_user_holding_the_database_does_not_block_stage_runs(tmp_path, toy_stages):
    store = Store(tmp_path / "store")
    lineage.ensure_database(store)
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import duckdb, sys, time
            connection = duckdb.connect({str(store.duckdb_path)!r})  # a writer, as a duckdb shell is
            print("holding", flush=True)
            sys.stdin.readline()
        """)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "holding"
        result = execute_stage("first", IngestConfig(resolution=6), {}, store)
        assert not result.cache_hit
    finally:
        holder.communicate("done\n", timeout=30)
    connection = duckdb.connect(str(store.duckdb_path), read_only=True)
    assert connection.execute("select count(*) from stages where status = 'completed'").fetchone()[0] == 1
    connection.close()


def test_runs_hold_their_config_as_queryable_json(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    store = Store(tmp_path / "store")
    config = load_config("smoke-textok", ["train_tokenizer.use_text=false"])
    common = dict(flow_run_id=None, flow="full-pipeline", git_revision=None, started_at=lineage.now())
    lineage.record_run(store, run_id="new", preset="smoke-textok", config_hash=config.digest(), status="completed",
                       config=config.model_dump_json(), **common)
    # A record written before the column existed still reads (as NULL) next to the new ones.
    old_schema = pa.schema([field for field in lineage.SCHEMAS["run_events"] if field.name != "config"])
    old = pa.Table.from_pylist([dict(run_id="old", flow="full-pipeline", preset="smoke", status="completed",
                                     event_time=lineage.now())], schema=old_schema)
    pq.write_table(old, store.root / "lineage" / "run_events" / "0-old.parquet")
    assert lineage.ensure_database(store)
    connection = duckdb.connect(str(store.duckdb_path), read_only=True)
    rows = connection.execute(
        "select run_id, config->>'$.train_tokenizer.use_text', config->>'$.train_tokenizer.model.bottleneck' "
        "from runs order by run_id").fetchall()
    connection.close()
    assert rows == [("new", "false", "kl"), ("old", None, None)]


def test_a_store_from_before_the_overrides_column_gets_it_and_the_provenance_view(tmp_path):
    store = Store(tmp_path / "store")
    assert lineage.ensure_database(store)
    # As an older tok1d left it: seed and records without `overrides`, views of version 4.
    folder = store.root / "lineage" / "run_events"
    old_schema = pa.schema([field for field in lineage.SCHEMAS["run_events"] if field.name != "overrides"])
    pq.write_table(old_schema.empty_table(), folder / "_schema.parquet")
    pq.write_table(pa.Table.from_pylist([dict(run_id="old", flow="full-pipeline", preset="smoke", status="completed",
                                              event_time=lineage.now())], schema=old_schema), folder / "0-old.parquet")
    (store.root / "lineage" / ".views").write_text(f"4 {store.root.as_posix()}")
    assert lineage.ensure_database(store)
    lineage.record_run(store, run_id="new", flow_run_id=None, flow="full-pipeline", preset="smoke", config_hash="h",
                       status="completed", git_revision=None, started_at=lineage.now(), overrides=["ingest.resolution=16"])
    connection = duckdb.connect(str(store.duckdb_path), read_only=True)
    try:
        assert connection.execute("select run_id, overrides from runs order by run_id").fetchall() == [
            ("new", ["ingest.resolution=16"]), ("old", None)]
        assert connection.execute("select count(*) from provenance").fetchone() == (0,)
    finally:
        connection.close()


def test_metrics_carry_their_protocol_as_columns(tmp_path, monkeypatch):
    from tasks.measurement import Measurement, measurements

    def measured(ctx):
        out = _first(ctx)
        out.summary.update(rfid=12.5, steps=3, measurements=measurements(
            rfid=Measurement(12.5, n=1000, implementation="inception sha256:abc / clean-fid", reference="ingest/x val",
                             seed=0),
            psnr=Measurement(21.0, n=1000, implementation="tok1d psnr", low=20.5, high=21.5, seed=0)))
        return out

    use_stages(monkeypatch, {"first": toy_stage("first", measured)})
    store = Store(tmp_path / "store")
    execute_stage("first", IngestConfig(resolution=3), {}, store)
    # A metrics file written before the protocol columns existed still reads, with nulls.
    old_schema = pa.schema([f for f in lineage.SCHEMAS["metrics"] if f.name in
                            ("stage_run_id", "run_id", "stage", "artifact_id", "name", "value", "event_time")])
    pq.write_table(pa.Table.from_pylist([dict(stage="old", name="rfid", value=99.0, event_time=lineage.now())],
                                        schema=old_schema), store.root / "lineage" / "metrics" / "0-old.parquet")
    connection = lineage.connect(store)
    rows = connection.execute(
        "select stage, name, value, n, implementation, reference, seed, ci_low, ci_high from metrics order by stage, name"
    ).fetchall()
    connection.close()
    assert ("first", "rfid", 12.5, 1000, "inception sha256:abc / clean-fid", "ingest/x val", 0, None, None) in rows
    assert ("first", "psnr", 21.0, 1000, "tok1d psnr", None, 0, 20.5, 21.5) in rows
    assert ("first", "steps", 3.0, None, None, None, None, None, None) in rows
    assert [r for r in rows if r[1] == "rfid" and r[0] == "first"].__len__() == 1  # not twice
    assert ("old", "rfid", 99.0, None, None, None, None, None, None) in rows
