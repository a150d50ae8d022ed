"""The `tok1d` command when things go wrong: one-line errors, a SIGKILLed run found and recorded
killed, four processes with different configs at once on one store. Apart from
test_cli_pipeline.py so the two heavy files run on different test workers."""

from __future__ import annotations

import os
import subprocess

import duckdb

from builders.cli import REPO, TOK1D, tok1d


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
