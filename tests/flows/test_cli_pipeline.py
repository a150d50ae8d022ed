"""The `tok1d` command end to end: real Prefect runs, a real store, the real DuckDB file."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

REPO = Path(__file__).resolve().parents[2]
TOK1D = [sys.executable, "-m", "flows.cli"]
# The pipeline stages that need no trained model: fast enough to run many times in tests.
DATA_STAGES = "stages=[ingest,caption,embed-text]"


def tok1d(*args: str, env: dict | None = None, check: bool = True, unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in unset}
    result = subprocess.run([*TOK1D, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=environment)
    if check and result.returncode != 0:
        raise AssertionError(f"tok1d {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return result


def stage_results(output: str) -> dict[str, str]:
    """stage -> computed|cached, from the table `tok1d run` prints."""
    results = {}
    for line in output.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[1] in ("computed", "cached"):
            results[parts[0]] = parts[1]
    return results


def test_run_twice_then_everything_is_cached_and_status_agrees_with_duckdb(tmp_path):
    store = tmp_path / "store"
    first = tok1d("run", "--preset", "smoke", "--store", str(store), "--set", DATA_STAGES)
    assert stage_results(first.stdout) == {"ingest": "computed", "caption": "computed", "embed-text": "computed"}
    # No Prefect server can be reached at this address: the fully cached run must not need one.
    offline = {"PREFECT_API_URL": "http://127.0.0.1:9/api"}
    second = tok1d("run", "--preset", "smoke", "--store", str(store), "--set", DATA_STAGES, env=offline)
    assert stage_results(second.stdout) == {"ingest": "cached", "caption": "cached", "embed-text": "cached"}
    assert "every stage of full-pipeline is cached: answered from the store without starting Prefect" in second.stdout
    third = tok1d("run", "--preset", "smoke", "--store", str(store), "--set", DATA_STAGES, "--flow")
    assert stage_results(third.stdout) == {"ingest": "cached", "caption": "cached", "embed-text": "cached"}
    assert "without starting Prefect" not in third.stdout

    status = tok1d("status", "--store", str(store)).stdout
    connection = duckdb.connect(str(store / "experiments.duckdb"), read_only=True)
    latest = connection.execute(
        "select stage, status, cache_hit from stages qualify row_number() over (partition by stage order by event_time desc) = 1"
    ).fetchall()
    runs = connection.execute("select count(*), count(*) filter (where status = 'completed') from runs").fetchone()
    connection.close()
    assert sorted(latest) == [("caption", "completed", True), ("embed-text", "completed", True), ("ingest", "completed", True)]
    assert runs == (3, 3)
    assert "runs: 3 (0 failed)" in status
    for stage, state, cache_hit in latest:
        line = next(l for l in status.splitlines() if l.startswith(stage + " "))
        assert state in line and ("yes" if cache_hit else "no") in line


def test_deleting_one_output_file_recomputes_that_stage_only(tmp_path):
    store = tmp_path / "store"
    tok1d("run", "--preset", "smoke", "--store", str(store), "--set", DATA_STAGES)
    victim = next((store / "artifacts" / "caption").glob("*/captions/*.parquet"))
    victim.unlink()
    rerun = tok1d("run", "--preset", "smoke", "--store", str(store), "--set", DATA_STAGES)
    # caption's content is deterministic, so its artifact comes back identical and embed-text hits.
    assert stage_results(rerun.stdout) == {"ingest": "cached", "caption": "computed", "embed-text": "cached"}
    assert victim.exists()
    assert "damaged" not in tok1d("status", "--store", str(store)).stdout


def test_bad_override_is_a_clear_error_before_anything_runs(tmp_path):
    result = tok1d("run", "--preset", "smoke", "--store", str(tmp_path / "s"), "--set", "ingest.resolutoin=8", check=False)
    assert result.returncode == 2
    assert "ingest.resolutoin: unknown key" in result.stderr
    assert not (tmp_path / "s").exists()


def test_run_time_errors_end_in_one_line_naming_the_key_or_file(tmp_path):
    # As a user runs it: the suite quiets Prefect's logs itself, tok1d does so unless --debug.
    def tok1d(*args, check=True):
        return globals()["tok1d"](*args, check=check, unset=("PREFECT_LOGGING_LEVEL",))

    def error_lines(result):
        assert result.returncode != 0
        return [line for line in result.stderr.splitlines() if line.startswith("tok1d:") or "Traceback" in line]

    missing = tok1d("run", "--preset", "smoke", "--store", str(tmp_path / "s"), "--set", "stages=[ingest]",
                    "--set", "ingest.source.kind=folder", "--set", f"ingest.source.path={tmp_path / 'nowhere'}",
                    check=False)
    assert error_lines(missing) == [
        f"tok1d: run failed: ingest.source.path {tmp_path / 'nowhere'} is not a folder (SourceError) "
        "(--debug shows the traceback)"]
    assert "Traceback" not in missing.stderr
    (tmp_path / "a-file").write_text("not a folder")
    unwritable = tok1d("stage", "ingest", "--preset", "smoke", "--store", str(tmp_path / "a-file" / "store"), check=False)
    assert error_lines(unwritable) == [
        f"tok1d: stage failed: Not a directory: {tmp_path / 'a-file' / 'store' / 'artifacts'} (NotADirectoryError) "
        "(--debug shows the traceback)"]
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("stages: [ingest\n  bad: : x\n")
    malformed = tok1d("run", "--preset", str(bad_yaml), "--store", str(tmp_path / "s"), check=False)
    assert error_lines(malformed) == [f"tok1d: preset {bad_yaml}: malformed YAML: expected ',' or ']', but got ':', line 2 column 6"]
    zero = tok1d("run", "--preset", "smoke", "--store", str(tmp_path / "s"), "--set", "ingest.resolution=0", check=False)
    assert error_lines(zero) == ["tok1d: invalid configuration for preset 'smoke': ingest.resolution must be >= 1, got 0"]
    debug = tok1d("stage", "ingest", "--preset", "smoke", "--store", str(tmp_path / "a-file" / "store"), "--debug",
                  check=False)
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "NotADirectoryError" in debug.stderr


def test_a_killed_run_is_recorded_killed_by_the_next_status(tmp_path):
    import signal
    import time

    store = tmp_path / "store"
    # Long enough to be caught working: 30k procedural scenes.
    command = [*TOK1D, "stage", "ingest", "--preset", "smoke", "--store", str(store),
               "--set", "ingest.source.kind=shapes", "--set", "ingest.source.shapes.num_images=30000",
               "--set", "ingest.source.max_images=30000"]
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)  # its own group: the Prefect server it starts dies too
    deadline = time.monotonic() + 300
    while not list(store.glob("leases/stage-*.json")):  # the stage is at work
        assert process.poll() is None and time.monotonic() < deadline, "ingest never started"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()

    status = tok1d("status", "--store", str(store)).stdout
    assert "runs: 1 (0 failed, 1 killed)" in status
    assert next(line for line in status.splitlines() if line.startswith("ingest ")).split()[1] == "killed"
    connection = duckdb.connect(str(store / "experiments.duckdb"), read_only=True)
    runs = connection.execute("select status, error from runs").fetchall()
    stages = connection.execute("select stage, status, pid from stages").fetchall()
    connection.close()
    assert runs[0][0] == "killed" and "found by tok1d status" in runs[0][1]
    assert stages == [("ingest", "killed", process.pid)]
    assert tok1d("status", "--store", str(store)).stdout == status  # found once, recorded once


def test_four_concurrent_processes_with_different_seeds_lose_no_record(tmp_path):
    store = tmp_path / "store"
    # Four seeds of one preset at once: ingest is one config (computed once, the others wait on
    # its slot's lock and hit), train-tokenizer four (each computed once).
    processes = [
        subprocess.Popen(
            [*TOK1D, "stage", "train-tokenizer", "--preset", "smoke", "--store", str(store),
             "--set", f"train_tokenizer.train.seed={seed}", "--set", "train_tokenizer.train.steps=10",
             "--set", "train_tokenizer.eval_images=10", "--set", "train_tokenizer.fid_images=10"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for seed in range(4)
    ]
    outputs = [p.communicate(timeout=900) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, f"{out}\n{err}"
        assert "database is locked" not in err
    connection = duckdb.connect(str(store / "experiments.duckdb"), read_only=True)
    computed = dict(connection.execute(
        "select stage, count(*) from stages where status = 'completed' and not cache_hit group by stage").fetchall())
    hits = dict(connection.execute(
        "select stage, count(*) from stages where status = 'completed' and cache_hit group by stage").fetchall())
    tokenizers = connection.execute(
        "select count(distinct output_artifact), count(distinct config_hash) from stages "
        "where stage = 'train-tokenizer' and status = 'completed'").fetchone()
    runs = connection.execute("select count(*) from runs where status = 'completed'").fetchone()[0]
    events = connection.execute("select count(*) from stage_events").fetchone()[0]
    open_rows = connection.execute("select count(*) from stages where status = 'running'").fetchone()[0]
    connection.close()
    assert computed == {"ingest": 1, "train-tokenizer": 4}
    assert hits == {"ingest": 3}
    assert tokenizers == (4, 4)
    assert runs == 4 and open_rows == 0
    assert events == 2 * 5 + 3  # running + completed per computed stage run, one event per hit


@pytest.mark.parametrize("preset", ["smoke"])
def test_presets_listed(preset):
    assert preset in tok1d("presets").stdout


ALL_STAGES = ["ingest", "caption", "embed-text", "train-tokenizer", "pretokenize", "train-generator", "evaluate"]


TEXT_FREE_STAGES = [stage for stage in ALL_STAGES if stage not in ("caption", "embed-text")]


@pytest.mark.parametrize("preset, generator, stages", [("smoke", "maskgit", TEXT_FREE_STAGES),
                                                       ("smoke-textok", "dit", ALL_STAGES)])
def test_smoke_runs_every_stage_and_records_every_metric(tmp_path, preset, generator, stages):
    # A text-free tokenizer and a class-conditional generator read no captions: no text stage runs.
    store = tmp_path / "store"
    first = tok1d("run", "--preset", preset, "--store", str(store))
    assert stage_results(first.stdout) == {stage: "computed" for stage in stages}
    second = tok1d("run", "--preset", preset, "--store", str(store))
    assert stage_results(second.stdout) == {stage: "cached" for stage in stages}

    connection = duckdb.connect(str(store / "experiments.duckdb"), read_only=True)
    metrics = dict(connection.execute("select name, value from metrics where stage in ('train-tokenizer', 'evaluate')").fetchall())
    # Every FID and KID row says what it was measured on, and every FID has its KID beside it.
    protocol = connection.execute(
        "select name, n, implementation, reference from metrics where name in ('rfid', 'rkid', 'gfid', 'gkid')"
    ).fetchall()
    connection.close()
    for name in ("rfid", "rkid", "psnr", "ssim", "gfid", "gkid", "inception_score", "precision", "recall"):
        assert name in metrics, f"{name} missing from metrics: {sorted(metrics)}"
    assert {row[0] for row in protocol} == {"rfid", "rkid", "gfid", "gkid"}
    for name, n, implementation, reference in protocol:
        assert n and n > 1 and ".pt:" in implementation, (name, implementation)  # the network file and its hash
        assert "ingest/" in reference, (name, reference)
    assert metrics["gfid"] > 0 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    generator_json = next((store / "artifacts" / "train-generator").glob("*/generator.json")).read_text()
    assert f'"{generator}"' in generator_json
    assert next((store / "artifacts" / "evaluate").glob("*/samples.png")).stat().st_size > 0
