"""The smoke preset end to end on a store in object storage: `--store s3://bucket/prefix` against
a real S3-compatible server on 127.0.0.1 (moto's server mode), the same artifacts as on a local
store, and a second machine (another mirror) answered from the bucket without recomputing."""

from __future__ import annotations

from pathlib import Path

import duckdb

from builders.cli import stage_results, tok1d
from builders.s3_server import BUCKET, s3_server
from tasks.remote_store import RemoteStore


def artifact_ids(output: str) -> dict[str, str]:
    """stage -> artifact id, from the table `tok1d run` prints (its last column is the artifact folder)."""
    return {line.split()[0]: Path(line.split()[-1]).name for line in output.splitlines()
            if len(line.split()) >= 4 and line.split()[1] in ("computed", "cached")}


def test_smoke_on_s3_gives_the_local_artifacts_and_a_second_machine_reuses_them(tmp_path):
    local = tok1d("run", "--preset", "smoke", "--store", str(tmp_path / "local"))
    expected = artifact_ids(local.stdout)
    assert len(expected) == 5, local.stdout
    with s3_server() as env:
        url = f"s3://{BUCKET}/smoke"
        first = tok1d("run", "--preset", "smoke", "--store", url, env={**env, "TOK1D_STORE_MIRROR": str(tmp_path / "a")})
        assert set(stage_results(first.stdout).values()) == {"computed"}
        assert artifact_ids(first.stdout) == expected

        remote = RemoteStore(url)
        listed = remote.list_files("")
        for stage, artifact in expected.items():
            assert f"artifacts/{stage}/{artifact}/manifest.json" in listed
        assert [path for path in listed if path.startswith("cache/")], listed
        assert [path for path in listed if path.startswith("lineage/stage_events/")], listed
        assert not [path for path in listed if path.endswith(".tmp") or path.startswith(("work/", "locks/"))]

        # Another machine: its own, empty mirror. Everything is a verified hit pulled from the bucket.
        other = {**env, "TOK1D_STORE_MIRROR": str(tmp_path / "b")}
        second = tok1d("run", "--preset", "smoke", "--store", url, env=other)
        assert set(stage_results(second.stdout).values()) == {"cached"}
        assert artifact_ids(second.stdout) == expected
        status = tok1d("status", "--store", url, env=other).stdout
        assert f"store: {url} (mirror {tmp_path / 'b'})" in status and "runs: 2 (0 failed)" in status

    # The mirror's DuckDB file holds both machines' runs, and the metrics of the first.
    connection = duckdb.connect(str(tmp_path / "b" / "experiments.duckdb"), read_only=True)
    runs = connection.execute("select count(*) from runs where status = 'completed'").fetchone()[0]
    gfid = connection.execute("select count(*) from metrics where name = 'gfid'").fetchone()[0]
    connection.close()
    assert runs == 2 and gfid >= 1
