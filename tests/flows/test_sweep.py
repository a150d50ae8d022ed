"""The sweep: grid building and CLI parsing, the per-point statistics and paired text effects on
hand-made rows (checked against scipy), the flow's bookkeeping with a fabricated pipeline, and one
real tokenizer-only sweep through `tok1d sweep`."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from scipy import stats

import flows.sweep as sweep_flow
import flows.sweep_jobs as sweep_jobs
from flows.cli import build_parser
from flows.sweep import (
    SCHEMA,
    SEED_KEYS,
    TEXT_KEY,
    TOKENS_KEY,
    aggregate,
    build_grid,
    create_results_view,
    named_axes,
    parse_axes,
    parse_seeds,
    parse_text_axis,
    points_table,
    report_text,
    write_effects,
    write_results,
)
from tasks.runner import StageResult
from tasks.store import Manifest, Store

REPO = Path(__file__).resolve().parents[2]


def row(preset="p", tokens=16, text=False, seed=0, axes="{}", status="completed", **metrics) -> dict:
    """One sweep result row with the given metrics (every other metric null)."""
    values = {name: None for name in SCHEMA.names}
    values.update(sweep_id="s1", preset=preset, num_tokens=tokens, use_text=text, seed=seed, axes=axes,
                  until="evaluate", status=status, error=None if status == "completed" else "RuntimeError: boom",
                  computed_stages=0)
    values.update(metrics)
    return values


# --------------------------------------------------------------------------- statistics


def paired_rows(on: list[float], off: list[float]) -> list[dict]:
    """Text on/off runs of one point, seed i giving on[i] / off[i] rFID (listed off-first, seeds
    reversed: pairing must go by seed, not by position)."""
    return ([row(text=False, seed=seed, rfid=value) for seed, value in reversed(list(enumerate(off)))]
            + [row(text=True, seed=seed, rfid=value) for seed, value in enumerate(on)])


@pytest.mark.parametrize(
    "on, off, excludes_zero",
    [
        ([10.0, 11.0, 12.5, 11.2], [8.0, 9.5, 10.0, 9.4], True),  # text moves every seed alike
        ([10.0, 8.0, 12.5], [9.0, 9.5, 11.0], False),  # seeds disagree: no evidence either way
    ],
)
def test_text_effect_is_the_paired_t_test_over_seeds(on, off, excludes_zero):
    [effect] = aggregate(paired_rows(on, off))[1]
    reference = stats.ttest_rel(on, off)
    low, high = reference.confidence_interval(0.95)
    assert (effect.metric, effect.n, effect.seeds) == ("rfid", len(on), list(range(len(on))))
    assert effect.difference == pytest.approx(statistics.mean(on) - statistics.mean(off))
    assert (effect.mean_on, effect.mean_off) == (pytest.approx(statistics.mean(on)), pytest.approx(statistics.mean(off)))
    assert effect.p_value == pytest.approx(reference.pvalue)
    assert (effect.ci_low, effect.ci_high) == (pytest.approx(low), pytest.approx(high))
    assert effect.significant is excludes_zero
    assert bool(reference.pvalue < 0.05) is excludes_zero


def test_text_effect_of_one_seed_or_no_spread():
    [one] = aggregate(paired_rows([3.0], [1.5]))[1]
    assert (one.n, one.difference, one.ci_low, one.ci_high, one.p_value, one.significant) == (1, 1.5, None, None, None, None)
    [constant] = aggregate(paired_rows([3.0, 4.0, 5.0], [1.0, 2.0, 3.0]))[1]
    assert (constant.difference, constant.ci_low, constant.ci_high, constant.significant) == (2.0, 2.0, 2.0, True)
    [same] = aggregate(paired_rows([1.0, 2.0], [1.0, 2.0]))[1]
    assert (same.difference, same.ci_low, same.ci_high, same.p_value, same.significant) == (0.0, 0.0, 0.0, None, False)


def hand_made_rows() -> list[dict]:
    """Text on/off at 16 tokens x 3 seeds (seed 2 of "on" failed), listed out of seed order so that
    pairing by position would be wrong; a second point at 32 tokens whose runs all failed; a
    metric (gfid) that only some runs have."""
    on = {0: 10.0, 1: 11.6}
    off = {0: 13.0, 1: 14.5, 2: 15.0}
    return [
        row(text=True, seed=1, rfid=on[1], psnr=20.0),
        row(text=False, seed=2, rfid=off[2], psnr=19.0, gfid=50.0),
        row(text=True, seed=0, rfid=on[0], psnr=21.0, gfid=40.0),
        row(text=False, seed=0, rfid=off[0], psnr=18.0, gfid=44.0),
        row(text=True, seed=2, status="failed"),
        row(text=False, seed=1, rfid=off[1], psnr=18.5),
        row(tokens=32, text=True, seed=0, status="failed"),
    ]


def test_points_hold_mean_std_and_n_over_seeds_and_count_failed_runs():
    points, _ = aggregate(hand_made_rows())
    found = {(p.num_tokens, p.use_text, p.metric): p for p in points}
    on_rfid = found[(16, True, "rfid")]
    assert (on_rfid.n, on_rfid.seeds, on_rfid.completed, on_rfid.failed) == (2, [0, 1], 2, 1)
    assert on_rfid.mean == pytest.approx(10.8) and on_rfid.std == pytest.approx(statistics.stdev([10.0, 11.6]))
    off_psnr = found[(16, False, "psnr")]
    assert (off_psnr.n, off_psnr.failed) == (3, 0)
    assert off_psnr.mean == pytest.approx(18.5) and off_psnr.std == pytest.approx(statistics.stdev([18.0, 18.5, 19.0]))
    # gfid: the runs that have it; one run -> no std.
    assert (found[(16, False, "gfid")].n, found[(16, False, "gfid")].mean) == (2, pytest.approx(47.0))
    assert (found[(16, True, "gfid")].n, found[(16, True, "gfid")].std) == (1, None)
    # Metrics no run has are absent, not zero; the all-failed point is one row without a metric.
    assert not any(p.metric == "ssim" for p in points)
    dead = [p for p in points if p.num_tokens == 32]
    assert len(dead) == 1 and (dead[0].metric, dead[0].n, dead[0].completed, dead[0].failed) == (None, None, 0, 1)
    # Grid order (the rows' first appearance), then METRICS order.
    assert [(p.use_text, p.metric) for p in points[:3]] == [(True, "rfid"), (True, "psnr"), (True, "gfid")]


def test_tables_show_the_image_count_beside_each_fid_and_kid():
    rows = [row(text=text, seed=seed, rfid=100.0 + seed + 5 * text, rfid_n=500.0, rkid=0.02 + 0.001 * seed,
                gfid=80.0 - seed, num_samples=250.0, psnr=20.0 + seed, eval_images=1214.0)
            for text in (False, True) for seed in range(3)]
    points, effects = aggregate(rows)
    header, cells = points_table(points)
    column = {title.split()[0]: i for i, title in enumerate(header)}
    off = cells[0]
    assert off[column["rFID"]] == "101.00 ± 1.00 (n=3, N=500)"
    assert off[column["rKID"]] == "0.0210 ± 0.0010 (n=3, N=500)"  # KID keeps its significant digits
    assert off[column["gFID"]] == "79.00 ± 1.00 (n=3, N=250)"
    assert off[column["PSNR"]] == "21.00 ± 1.00 (n=3, N=1214)"
    report = report_text(rows, points, effects)
    assert "100.00 (N=500)" in report and "80.00 (N=250)" in report  # the runs table: seed 0's rFID and gFID
    assert re.search(r"rFID ↓\s+106.00\s+101.00\s+\+5.00", report)  # the paired effect, on - off


def test_text_effects_are_paired_by_seed():
    _, effects = aggregate(hand_made_rows())
    by_metric = {e.metric: e for e in effects}
    assert set(by_metric) == {"rfid", "psnr", "gfid"}
    rfid = by_metric["rfid"]
    # Seeds 0 and 1 ran both ways (seed 2 of "on" failed): on - off = -3.0, -2.9.
    reference = stats.ttest_rel([10.0, 11.6], [13.0, 14.5])
    assert (rfid.n, rfid.seeds, rfid.num_tokens) == (2, [0, 1], 16)
    assert rfid.difference == pytest.approx(-2.95)
    assert (rfid.mean_on, rfid.mean_off) == (pytest.approx(10.8), pytest.approx(13.75))
    assert rfid.p_value == pytest.approx(reference.pvalue)
    assert (rfid.ci_low, rfid.ci_high) == tuple(pytest.approx(v) for v in reference.confidence_interval(0.95))
    assert rfid.significant is True  # the two differences are close: the interval stays below 0
    psnr = by_metric["psnr"]
    assert psnr.difference == pytest.approx(2.25) and psnr.significant is False  # 3.0 and 1.5: n=2 is wide
    assert psnr.p_value == pytest.approx(stats.ttest_rel([21.0, 20.0], [18.0, 18.5]).pvalue)
    assert (by_metric["gfid"].n, by_metric["gfid"].difference, by_metric["gfid"].significant) == (1, -4.0, None)


def test_points_that_differ_in_more_than_use_text_are_not_paired():
    axes_a, axes_b = json.dumps({"ingest.x": "a"}), json.dumps({"ingest.x": "b"})
    rows = [row(text=True, axes=axes_a, rfid=1.0), row(text=False, axes=axes_b, rfid=2.0),
            row(preset="q", text=False, axes=axes_a, rfid=3.0), row(tokens=8, text=False, axes=axes_a, rfid=4.0)]
    assert aggregate(rows)[1] == []
    rows.append(row(text=False, axes=axes_a, rfid=0.5))
    [effect] = aggregate(rows)[1]
    assert (effect.axes, effect.difference, effect.n) == (axes_a, 0.5, 1)


def test_duckdb_views_agree_with_the_in_process_tables(tmp_path):
    store = Store(tmp_path / "store")
    rows = hand_made_rows()
    write_results(store, "s1", rows)
    points, effects = aggregate(rows)
    write_effects(store, "s1", effects)
    # A sweep file from before seeds and axes existed: no seed/axes/until columns.
    old = pa.table({"sweep_id": ["old"], "preset": ["p"], "num_tokens": [16], "use_text": [False],
                    "status": ["completed"], "rfid": [99.0]})
    pq.write_table(old, store.root / "sweeps" / "old.parquet")
    write_effects(store, "empty", [])
    assert create_results_view(store)
    connection = duckdb.connect(str(store.duckdb_path), read_only=True)
    try:
        results = connection.execute("select count(*), count(*) filter (where status = 'failed') from sweep_results "
                                     "where sweep_id = 's1'").fetchone()
        view_points = connection.execute(
            "select num_tokens, use_text, metric, n, mean, std, completed, failed from sweep_points "
            "where sweep_id = 's1' order by num_tokens, use_text, metric").fetchall()
        legacy = connection.execute("select axes, n, mean from sweep_points where sweep_id = 'old'").fetchall()
        view_effects = connection.execute(
            "select metric, n, seeds, difference, ci_low, ci_high, p_value, significant from sweep_text_effects "
            "order by metric").fetchall()
    finally:
        connection.close()
    assert results == (7, 2)
    expected = sorted((p.num_tokens, p.use_text, p.metric, p.n, p.mean, p.std, p.completed, p.failed)
                      for p in points if p.metric is not None) + [(32, True, None, None, None, None, 0, 1)]
    assert view_points == expected
    assert legacy == [("{}", 1, 99.0)]
    assert view_effects == sorted((e.metric, e.n, e.seeds, e.difference, e.ci_low, e.ci_high, e.p_value, e.significant)
                                  for e in effects)


# --------------------------------------------------------------------------- grid and CLI


def sweep_args(*argv: str, store: str = "unused") -> argparse.Namespace:
    return build_parser().parse_args(["sweep", "--presets", "smoke-textok", "--store", store, *argv])


def test_seeds_and_axes_reach_every_seeded_key_of_every_point():
    args = sweep_args("--seeds", "3, 5", "--text", "on,off", "--axis", "ingest.shard_rows=64,96",
                      "--axis", "train-tokenizer.train.steps=2", "--until", "train_tokenizer")
    assert (parse_seeds(args.seeds), parse_text_axis(args.text)) == ([3, 5], [True, False])
    axes = parse_axes(args.axes)
    assert axes == {"ingest.shard_rows": ["64", "96"], "train_tokenizer.train.steps": ["2"]}
    assert sweep_flow.check_until(args.until) == "train-tokenizer"
    grid = build_grid(["smoke-textok"], [], named_axes(None, [True, False], axes), [3, 5])
    assert len(grid) == 2 * 2 * 2
    seen = [(p.seed, p.config.train_tokenizer.use_text, p.config.ingest.shard_rows) for p in grid]
    assert seen == [(s, t, r) for s in (3, 5) for t in (True, False) for r in (64, 96)]
    for point in grid:
        config = point.config
        assert (config.train_tokenizer.train.seed, config.train_generator.train.seed, config.evaluate.seed) == (point.seed,) * 3
        assert config.train_tokenizer.train.steps == 2 and point.recorded_seed == point.seed
        assert json.loads(point.axes_json()) == {"ingest.shard_rows": config.ingest.shard_rows,
                                                 "train_tokenizer.train.steps": 2}
    # Without --seeds: the preset's own seeds, one run per point; without --tokens: its own count.
    [plain] = build_grid(["smoke"], ["train_tokenizer.train.seed=7"])
    assert (plain.seed, plain.recorded_seed, plain.config.train_tokenizer.model.num_latent_tokens) == (None, 7, 16)
    assert plain.axes_json() == "{}"
    # An axis overrides each preset's setting; what is not swept keeps each preset's own.
    grid = build_grid(["smoke", "smoke-textok"], [], named_axes([8], None, None))
    assert [(p.config.train_tokenizer.use_text, p.config.train_tokenizer.model.num_latent_tokens,
             p.config.train_tokenizer.model.bottleneck) for p in grid] == [(False, 8, "vq"), (True, 8, "kl")]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
        (["--seeds", "0,0"], "--seeds needs distinct values"),
        (["--seeds", "-1"], "--seeds values must be >= 0"),
        (["--seeds", " , "], "--seeds needs a comma-separated list"),
        (["--tokens", "16,many"], "--tokens must be comma-separated integers"),
        (["--tokens", "0"], "--tokens values must be >= 1"),
        (["--text", "on,maybe"], "--text takes on and/or off"),
        (["--axis", "ingest.shard_rows"], "must look like key.path=value1,value2"),
        (["--axis", "ingest.shard_rows="], "--axis needs a comma-separated list"),
        (["--axis", "ingest.shard_rows=64,64"], "needs distinct values"),
        (["--axis", "ingest.shard_rows=64", "--axis", "ingest.shard_rows=96"], "given twice"),
        (["--axis", "ingest.shard_rows=many"], "ingest.shard_rows"),
        (["--axis", "ingest.colour=red"], "ingest.colour: unknown key"),
        (["--axis", f"{TOKENS_KEY}=8", "--tokens", "16"], "given twice"),
        (["--axis", f"{SEED_KEYS[1]}=1,2"], "sweep seeds with --seeds"),
        (["--seeds", "0,1", "--set", f"{SEED_KEYS[2]}=4"], "is also swept"),
        (["--text", "on", "--set", f"{TEXT_KEY}=false"], "is also swept"),
        (["--until", "sampling"], "--until 'sampling' is not a stage"),
        (["--jobs", "0"], "--jobs 0: expected a number of processes >= 1"),
        (["--part", "2/2"], "--part '2/2': expected K/N"),
    ],
)
def test_bad_sweep_arguments_fail_before_anything_runs(argv, message, monkeypatch, capsys):
    monkeypatch.setattr(sweep_flow, "sweep", lambda **kwargs: pytest.fail("a bad grid must fail before running"))
    assert sweep_flow.run_sweep_cli(sweep_args(*argv)) == 2
    assert message in capsys.readouterr().err


# --------------------------------------------------------------------------- the flow, fabricated stages


def test_jobs_split_the_grid_into_disjoint_parts_with_a_share_of_the_cores():
    """`--jobs 3`: child K gets points K, K+3, ...; together the children cover the grid once,
    each with cores/3 torch threads unless runtime.threads is set."""
    args = sweep_args("--seeds", "0,1", "--tokens", "8,16", "--axis", "ingest.shard_rows=64,96,128",
                      "--until", "ingest", "--jobs", "3", "--set", "ingest.source.max_images=50")
    grid = build_grid(["smoke-textok"], args.overrides, named_axes([8, 16], None, parse_axes(args.axes)), [0, 1])
    parts = [grid[k::3] for k in range(3)]
    assert sorted(p.describe() for part in parts for p in part) == sorted(p.describe() for p in grid)
    assert len(grid) == 12 and [len(part) for part in parts] == [4, 4, 4]

    command = sweep_jobs.child_command(args, 1, 3, threads=2)
    assert command[command.index("--part") + 1] == "1/3"
    assert "runtime.threads=2" in command and "ingest.source.max_images=50" in command
    assert command[command.index("--axis") + 1] == "ingest.shard_rows=64,96,128"
    assert "--jobs" not in command  # a child never splits again
    own = sweep_args("--jobs", "2", "--set", "runtime.threads=1")
    assert [c for c in sweep_jobs.child_command(own, 0, 2, threads=4) if "threads" in c] == ["runtime.threads=1"]
    assert (sweep_jobs.threads_per_job(2, cores=2), sweep_jobs.threads_per_job(3, cores=8),
            sweep_jobs.threads_per_job(4, cores=2)) == (1, 2, 1)
    assert sweep_jobs.parse_part(" 1 / 3 ") == (1, 3)


def test_sweep_flow_records_every_run_and_fails_at_the_end(tmp_path, monkeypatch, capsys):
    """`tok1d sweep` through the real Prefect flow with the pipeline replaced by fabricated stage
    results: every run reaches run_pipeline with its seed and `until`, a failing run is recorded,
    the others kept, and the exit code says so after the tables are printed."""
    seen = []

    recorded = []

    def fake_pipeline(config, store, *, preset, flow, until=None, overrides=None):
        n, text, seed = (config.train_tokenizer.model.num_latent_tokens, config.train_tokenizer.use_text,
                         config.evaluate.seed)
        seen.append((n, text, seed, config.ingest.shard_rows, flow, until))
        recorded.append(overrides)
        if n == 32 and text and seed == 1:
            raise RuntimeError("out of memory")

        def result(stage, summary, hit=False):
            manifest = Manifest(stage=stage, artifact_id=f"{stage}-{n}-{text}-{seed}", root="x", files=[],
                                config_hash="c", cache_key="k", code_version="v", summary=summary, created_at="now")
            return StageResult(manifest, hit, "")

        # rfid falls with text by 1 + seed/10; the summary has no ssim (a missing key is null).
        return {"ingest": result("ingest", {}, hit=len(seen) > 1),
                "train-tokenizer": result("train-tokenizer", {"rfid": 100 / n - text * (1 + seed / 10), "psnr": 10.0})}

    monkeypatch.setattr(sweep_flow, "run_pipeline", fake_pipeline)
    store = tmp_path / "store"
    args = sweep_args("--tokens", "16,32", "--text", "on,off", "--seeds", "0,1", "--axis", "ingest.shard_rows=64",
                      "--until", "pretokenize", "--set", "train_tokenizer.train.steps=7", store=str(store))
    # The flow's function without Prefect (a minute of ephemeral-server start on this machine; the
    # end-to-end test below runs the real flow).
    monkeypatch.setattr(sweep_flow, "sweep", sweep_flow.sweep.fn)
    assert sweep_flow.run_sweep_cli(args) == 1
    assert seen == [(n, t, s, 64, "sweep", "pretokenize") for s in (0, 1) for n in (16, 32) for t in (True, False)]
    # Lineage records what each run changed from its preset: the --set list, its axis values, its seed.
    assert recorded[0] == ["train_tokenizer.train.steps=7", "train_tokenizer.model.num_latent_tokens=16",
                           "train_tokenizer.use_text=true", "ingest.shard_rows=64", "train_tokenizer.train.seed=0",
                           "train_generator.train.seed=0", "evaluate.seed=0"], recorded[0]
    printed = capsys.readouterr()
    assert "text on - off, paired by seed" in printed.out and "1 ok, 1 failed" in printed.out
    assert re.search(r"1 of 8 runs failed .*smoke-textok .*=32 .*seed=1: RuntimeError: out of memory", printed.err)
    # Prefect may pickle a flow's exception into result storage: the report must survive it.
    failure = pickle.loads(pickle.dumps(sweep_flow.SweepFailed("2 of 3 runs failed", "the tables")))
    assert (str(failure), failure.report) == ("2 of 3 runs failed", "the tables")

    [sweep_file] = (store / "sweeps").glob("*.parquet")
    assert sweep_file.with_suffix(".png").is_file() and (store / "sweeps" / "effects" / sweep_file.name).is_file()
    connection = duckdb.connect(str(store / "experiments.duckdb"), read_only=True)
    try:
        runs = connection.execute("select num_tokens, use_text, seed, until, status, rfid, ssim, gfid from "
                                  "sweep_results order by seed, num_tokens, use_text desc").fetchall()
        axes = connection.execute("select distinct axes from sweep_results").fetchall()
        effects = connection.execute("select num_tokens, metric, n, difference from sweep_text_effects "
                                     "order by num_tokens, metric").fetchall()
    finally:
        connection.close()
    assert len(runs) == 8 and axes == [('{"ingest.shard_rows": 64}',)]
    assert runs[:2] == [(16, True, 0, "pretokenize", "completed", 100 / 16 - 1, None, None),
                        (16, False, 0, "pretokenize", "completed", 100 / 16, None, None)]
    assert runs[6][:5] == (32, True, 1, "pretokenize", "failed") and runs[6][5] is None
    assert effects == [(16, "psnr", 2, 0.0), (16, "rfid", 2, pytest.approx(-1.05)),
                       (32, "psnr", 1, 0.0), (32, "rfid", 1, pytest.approx(-1.0))]


# --------------------------------------------------------------------------- end to end


def test_tokenizer_only_sweep_with_seeds_and_text_end_to_end(tmp_path):
    """`tok1d sweep --jobs 2` for real: 2 seeds x text on/off of the smoke TexTok preset up to
    train-tokenizer (5 training steps, few images) in two child processes, then the one pass
    that finds every point cached and writes the tables and DuckDB views."""
    store = tmp_path / "store"
    tiny = ["ingest.source.max_images=120", "train_tokenizer.train.steps=5", "train_tokenizer.train.warmup_steps=1",
            "train_tokenizer.train.checkpoint_every=5", "train_tokenizer.eval_images=8",
            "train_tokenizer.eval_batch_size=8", "train_tokenizer.grid_images=4"]
    command = [sys.executable, "-m", "flows.cli", "sweep", "--presets", "smoke-textok", "--seeds", "0,1",
               "--text", "on,off", "--until", "train-tokenizer", "--store", str(store), "--jobs", "2",
               *(part for override in tiny for part in ("--set", override))]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "text on - off, paired by seed" in result.stdout and re.search(r"\(n=2, N=\d+\)", result.stdout)
    assert "sweep: 2 jobs x 1 torch thread(s)" in result.stdout or sweep_jobs.available_cores() != 2
    logs = sorted((store / sweep_jobs.LOG_DIR).glob("*-job*.log"))
    assert [log.name[-8:] for log in logs] == ["job0.log", "job1.log"]
    assert all("train-tokenizer: done in" in log.read_text() for log in logs), "each child trained its points"

    connection = duckdb.connect(str(store / "experiments.duckdb"), read_only=True)
    try:
        runs = connection.execute("select use_text, seed, status, until, rfid is not null, psnr is not null, "
                                  "gfid, tokenizer_artifact is not null, generator_artifact from sweep_results "
                                  "order by use_text, seed").fetchall()
        points = connection.execute("select use_text, n, seeds, std is not null, completed, failed from sweep_points "
                                    "where metric = 'psnr' order by use_text").fetchall()
        metrics = {m for (m,) in connection.execute("select distinct metric from sweep_points").fetchall()}
        effect = connection.execute("select n, seeds, ci_low <= difference and difference <= ci_high, p_value "
                                    "between 0 and 1 from sweep_text_effects where metric = 'psnr'").fetchall()
        stages = connection.execute("select distinct stage from stages").fetchall()
        recorded = connection.execute("select distinct list_sort(overrides) from runs where flow = 'sweep'").fetchall()
        # The pass that writes the tables computed nothing: the children had.
        final = connection.execute("select max(computed_stages), count(*) from sweep_results").fetchall()
    finally:
        connection.close()
    assert runs == [(text, seed, "completed", "train-tokenizer", True, True, None, True, None)
                    for text in (False, True) for seed in (0, 1)]
    assert points == [(False, 2, [0, 1], True, 2, 0), (True, 2, [0, 1], True, 2, 0)]
    assert "gfid" not in metrics and {"rfid", "psnr", "ssim"} <= metrics
    assert effect == [(2, [0, 1], True, True)]
    assert final == [(0, 4)]
    # Every run's lineage says what it changed from smoke-textok: the --set list, its text value and
    # seed; the --jobs children's runs also their thread share.
    share = [[o for o in overrides if o.startswith("runtime.threads=")] for (overrides,) in recorded]
    assert share.count(["runtime.threads=1"]) == 4 or sweep_jobs.available_cores() != 2, share
    assert sorted({tuple(o for o in overrides if not o.startswith("runtime.threads="))
                   for (overrides,) in recorded}) == sorted(
        tuple(sorted([*tiny, f"train_tokenizer.use_text={str(text).lower()}",
                      *(f"{key}={seed}" for key in sweep_flow.SEED_KEYS)]))
        for text in (True, False) for seed in (0, 1)), recorded
    # --until: no generator stage ran.
    assert {s for (s,) in stages} == {"ingest", "caption", "embed-text", "train-tokenizer"}
