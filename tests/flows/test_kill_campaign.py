"""A kill -9 campaign (issue 14 item 3): `tok1d run --preset smoke` SIGKILLed at four points of
the pipeline, each chosen by what the run prints or writes (never by a sleep), rerun on the same
store after each kill; then the run completes. Afterwards the artifacts equal those of an
uninterrupted run, no run or stage row is left `running` (in DuckDB nor in Prefect), `tok1d gc`
leaves no temporary file behind, and a plain rerun is all cache hits.

Every process talks to one real Prefect server (builders/prefect_server.py): an ephemeral server
per process would cost ~13 s each, seven times over. The uninterrupted reference run goes on
beside the campaign (each process uses one torch thread, so on 2 cores they overlap)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import duckdb

from builders.cli import REPO, TOK1D, stage_results, tok1d
from builders.prefect_server import prefect_server

STAGES = ["ingest", "train-tokenizer", "pretokenize", "train-generator", "evaluate"]
# Smoke-sized, with a checkpoint every 5 of the 30 tokenizer steps (so a kill mid-training has
# one to resume from), Inception in evaluate only and on fewer images, and one fixed torch
# thread: training is bitwise deterministic on CPU only with a fixed thread count.
SETS = ["runtime.threads=1", "train_tokenizer.train.checkpoint_every=5", "train_tokenizer.fid_images=-1",
        "train_tokenizer.eval_images=12", "evaluate.num_samples=8", "evaluate.batch_size=8",
        "evaluate.reference_images=12"]
TIMEOUT_S = 300
# Names only an interrupted write leaves: `.<name>.<random>.tmp`, `.<name>.tmp.png`, checkpoint
# folders `.step-N.tmp`, claimed leases `.<lease>.<pid>-<host>.claimed`.
STRAY = re.compile(r"\.tmp(\.|$)|\.claimed$")


def run_command(store: Path) -> list[str]:
    return [*TOK1D, "run", "--preset", "smoke", "--store", str(store), *(a for s in SETS for a in ("--set", s))]


@dataclass(frozen=True)
class KillPoint:
    """When to SIGKILL a run: the first output line (stdout and stderr merged; progress bars
    split at their carriage returns, seen as they are written) or state of the store for which `hit` says so."""

    name: str
    hit: Callable[[str, Path], bool]


def _tokenizer_checkpoint(store: Path) -> bool:
    return any((store / "work" / "train-tokenizer").glob("*/checkpoints/step-*"))


KILL_POINTS = [
    KillPoint("ingest writing its shards", lambda line, store: line.startswith("ingest: images:")),
    KillPoint("tokenizer training, a checkpoint written", lambda line, store: _tokenizer_checkpoint(store)),
    KillPoint("right after train-tokenizer's done line", lambda line, store: "train-tokenizer: done in" in line),
    # The bar's last draw: the reference statistics are written next (a temporary file, renamed).
    KillPoint("evaluate's reference images read", lambda line, store: line.startswith("evaluate: reference images: 100%")),
]


def _env(api: str) -> dict[str, str]:
    return {**os.environ, "PREFECT_API_URL": api}


def run_until(store: Path, api: str, point: KillPoint | None) -> tuple[int, str, int]:
    """Run the pipeline; SIGKILL its whole process group at `point` (None: let it finish).
    (pid, everything it printed, return code: -9 when killed)."""
    process = subprocess.Popen(run_command(store), cwd=REPO, env=_env(api), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, start_new_session=True)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        # Raw reads, split here: a text-mode reader holds a line that ends in "\r" (a progress bar's
        # first draw) until more output shows it is not "\r\n", i.e. until the bar ends.
        pending = b""
        while chunk := os.read(process.stdout.fileno(), 65536):
            *complete, pending = re.split(rb"[\r\n]", pending + chunk)
            for line in complete:
                lines.put(line.decode(errors="replace"))
        lines.put(pending.decode(errors="replace"))
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    seen: list[str] = []
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while True:
            assert time.monotonic() < deadline, f"run did not reach {point and point.name!r}:\n" + "\n".join(seen)
            try:
                line = lines.get(timeout=0.05)
            except queue.Empty:
                line = ""
            if line is None:  # the process closed its output: it ended
                assert point is None, f"run ended before {point.name!r}:\n" + "\n".join(seen)
                break
            if line:
                seen.append(line)
            if point is not None and point.hit(line, store):
                os.killpg(process.pid, signal.SIGKILL)  # its own group: nothing it started survives
                break
    finally:
        if process.poll() is None and point is None:
            os.killpg(process.pid, signal.SIGKILL)  # a timed-out run must not outlive the test
        returncode = process.wait()
        reader.join(timeout=30)
    while not lines.empty():  # what it printed after the kill point
        line = lines.get_nowait()
        if line is not None:
            seen.append(line)
    return process.pid, "\n".join(seen), returncode


def _resumed_steps(output: str) -> int:
    """The step the first train-tokenizer progress bar of `output` starts at (0: from scratch)."""
    match = re.search(r"train-tokenizer: training:.*?\| *(\d+)/\d+", output)
    assert match, f"no tokenizer training in:\n{output}"
    return int(match.group(1))


def _artifact_ids(table: str) -> dict[str, str]:
    """stage -> artifact id, from the stage table `tok1d run` prints."""
    return {line.split()[0]: Path(line.split()[-1]).name for line in table.splitlines()
            if len(line.split()) == 4 and line.split()[1] in ("computed", "cached")}


def test_kill_campaign_resumes_to_the_uninterrupted_artifacts_and_leaves_nothing_running(tmp_path):
    # The session's Prefect home: its database is migrated already once any test used Prefect.
    home = Path(os.environ.get("PREFECT_HOME", tmp_path / "prefect-home"))
    with prefect_server(home, tmp_path / "prefect-server.log") as server:
        # The uninterrupted run, on a store of its own, beside the campaign (into files: a full
        # pipe would stall it while nobody reads).
        reference_log = tmp_path / "reference.log"
        with open(tmp_path / "reference.out", "w") as out, open(reference_log, "w") as err:
            reference = subprocess.Popen(run_command(tmp_path / "reference"), cwd=REPO, env=_env(server.api),
                                         stdout=out, stderr=err, start_new_session=True)
        try:
            store = tmp_path / "store"
            attempts = [run_until(store, server.api, point) for point in KILL_POINTS[:3]]
            # Killed after its first checkpoint, the tokenizer went on from it instead of step 0.
            assert _resumed_steps(attempts[2][1]) >= 5, attempts[2][1]
            attempts.append(run_until(store, server.api, KILL_POINTS[3]))
            # Its cache record was written before the done line: the next attempt hit it.
            assert "train-tokenizer: cache hit" in attempts[3][1], attempts[3][1]
            assert all(code == -signal.SIGKILL for _, _, code in attempts), [a[1] for a in attempts]
            _, final, code = run_until(store, server.api, None)
            assert code == 0, final
            reference.wait(timeout=TIMEOUT_S)
        finally:
            if reference.poll() is None:
                os.killpg(reference.pid, signal.SIGKILL)
                reference.wait()
        reference_out = (tmp_path / "reference.out").read_text()
        assert reference.returncode == 0, reference_out + reference_log.read_text()

        # (a) the interrupted pipeline made exactly what the uninterrupted one made.
        assert stage_results(final)["evaluate"] == "computed"
        assert sorted(_artifact_ids(final)) == sorted(STAGES)
        assert _artifact_ids(final) == _artifact_ids(reference_out)

        # (c) gc removes what the kills left; nothing temporary remains anywhere in the store.
        gc = tok1d("gc", "--store", str(store), env={"PREFECT_API_URL": server.api}).stdout
        stray = [p.relative_to(store).as_posix() for p in store.rglob("*") if STRAY.search(p.name)]
        assert stray == [], f"{stray}\n{gc}"
        assert list((store / "leases").iterdir()) == []
        assert list((store / "work").glob("*/*")) == [], gc  # every stage completed: no work dir is needed

        # (d) a plain rerun is answered from the store.
        rerun = tok1d("run", "--preset", "smoke", "--store", str(store), *(a for s in SETS for a in ("--set", s)),
                      env={"PREFECT_API_URL": server.api})
        assert stage_results(rerun.stdout) == {stage: "cached" for stage in STAGES}
        assert _artifact_ids(rerun.stdout) == _artifact_ids(final)

        # (b) DuckDB: every run and stage run ended; the killed ones say so, naming the dead process.
        connection = duckdb.connect(str(store / "experiments.duckdb"), read_only=True)
        by_status = dict(connection.execute("select status, count(*) from stages group by 1").fetchall())
        runs = connection.execute("select run_id, status, error, flow_run_id from runs order by started_at").fetchall()
        killed = connection.execute("select run_id, stage, pid, error from stages where status = 'killed'").fetchall()
        connection.close()
        # Prefect too: each killed flow run was set Crashed by the next run's reconcile (a killed
        # process leaves it Running forever, Prefect #16746); the final one completed.
        prefect_states = server.flow_run_states([flow_run_id for _, _, _, flow_run_id in runs[:5]])

    assert "running" not in by_status, by_status
    assert [status for _, status, _, _ in runs] == ["killed"] * 4 + ["completed"] * 2
    assert runs[5][3] is None  # the rerun answered from the store started no flow run
    assert prefect_states[runs[4][3]] == "COMPLETED", prefect_states
    for (pid, _, _), (_, _, error, flow_run_id) in zip(attempts, runs):
        assert f"process {pid} " in error and prefect_states[flow_run_id] == "CRASHED", (error, prefect_states)
    run_ids = [run_id for run_id, _, _, _ in runs]
    killed_stages = {(run_ids.index(run_id), stage) for run_id, stage, _, _ in killed}
    # Mid-training and mid-evaluate kills always land inside a stage run; the other two may land
    # between stages (then only the run is killed).
    assert {(1, "train-tokenizer"), (3, "evaluate")} <= killed_stages, killed_stages
    for run_id, _, pid, error in killed:
        assert pid == attempts[run_ids.index(run_id)][0] and f"process {pid} " in error
