"""The `sweep` flow: presets x axes x seeds through the pipeline, with per-point statistics over
seeds and the paired effect of the caption's text tokens.

A grid point is a preset plus one value of every axis: `--tokens` (the tokenizer's latent token
count), `--text` (`train_tokenizer.use_text`) and any `--axis KEY=V1,V2` (values parsed like `--set`
values). `--seeds` repeats every point once per seed; a seed sets the tokenizer's init and data
order, the generator's and the sampler's (SEED_KEYS). Each (point, seed) is one `run_pipeline` call
up to `--until` (default `evaluate`); points share every stage whose section and inputs they share
(ingest, caption and embed-text are computed once per dataset), because each stage's cache key only
covers what it reads.

Results, under `<store>/sweeps/`:
  <sweep_id>.parquet           one row per (point, seed): status, error, artifacts, metrics
  effects/<sweep_id>.parquet   text on - off per point and metric, paired by seed
  <sweep_id>.png               mean +- std per point, the paired text effects, curves over tokens
and three DuckDB views in `<store>/experiments.duckdb` (created in a short write window, retried
while another process holds the file): `sweep_results` (the rows), `sweep_points` (per point and
metric: n, mean, std over seeds; failed runs are counted, not averaged) and `sweep_text_effects`.

    tok1d sweep --presets fashion-mnist-textok --tokens 16,32 --text on,off --seeds 0,1,2 --store S
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import time
from argparse import Namespace
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
from prefect import flow
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.full_pipeline import run_name
from flows.pipeline import run_pipeline
from flows.sweep_jobs import check_jobs, parse_part, run_jobs
from models.metrics import paired_difference
from tasks import lineage
from tasks.config import ConfigError
from tasks.pipeline_config import PipelineConfig
from tasks.presets import load_config, parse_override
from tasks.registry import STAGE_ORDER
from tasks.hashing import hash_value
from tasks.runner import StageResult
from tasks.store import Store
from tasks.tables import write_parquet_atomic

log = logging.getLogger("tok1d")

SWEEPS_DIR = "sweeps"
EFFECTS_DIR = "effects"  # under SWEEPS_DIR, so the `sweeps/*.parquet` glob of the rows never sees it
PARTS_DIR = "parts"  # under SWEEPS_DIR: the files of each `--jobs` child, outside the views' globs
VIEW = "sweep_results"
POINTS_VIEW = "sweep_points"
EFFECTS_VIEW = "sweep_text_effects"
TOKENS_KEY = "train_tokenizer.model.num_latent_tokens"
TEXT_KEY = "train_tokenizer.use_text"
# Every source of randomness of a run: tokenizer init + data order, generator init + data order, sampling.
SEED_KEYS = ("train_tokenizer.train.seed", "train_generator.train.seed", "evaluate.seed")
# Axes with a column of their own in the results; every other axis goes into the `axes` JSON column.
COLUMN_AXES = {TOKENS_KEY: "num_tokens", TEXT_KEY: "use_text"}
# (column, stage whose summary holds it, summary key). Add a metric here and it reaches the rows,
# the per-point statistics and the text effects; a key missing from a summary gives null. All are
# float64 so that the aggregation can unpivot them into one value column.
METRICS = (
    ("rfid", "train-tokenizer", "rfid"),
    ("rfid_n", "train-tokenizer", "rfid_n"),
    ("rkid", "train-tokenizer", "rkid"),
    ("psnr", "train-tokenizer", "psnr"),
    ("ssim", "train-tokenizer", "ssim"),
    ("eval_images", "train-tokenizer", "eval_images"),
    ("gfid", "evaluate", "gfid"),
    ("gkid", "evaluate", "gkid"),
    ("num_samples", "evaluate", "num_samples"),
    ("inception_score", "evaluate", "inception_score"),
    ("precision", "evaluate", "precision"),
    ("recall", "evaluate", "recall"),
    ("clip_score", "evaluate", "clip_score"),
)
METRIC_NAMES = tuple(name for name, _, _ in METRICS)
SCHEMA = pa.schema(
    [
        ("sweep_id", pa.string()),
        ("preset", pa.string()),
        ("num_tokens", pa.int64()),
        ("use_text", pa.bool_()),
        ("seed", pa.int64()),
        # {"dotted.key": value} of the axes without a column of their own, e.g.
        # json_extract_string(axes, '$."ingest.source.shapes.caption_level"') in DuckDB.
        ("axes", pa.string()),
        ("until", pa.string()),
        ("bottleneck", pa.string()),
        ("generator", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("config_hash", pa.string()),
        ("tokenizer_artifact", pa.string()),
        ("generator_artifact", pa.string()),
        ("evaluate_artifact", pa.string()),
        ("computed_stages", pa.int64()),
        *[(name, pa.float64()) for name in METRIC_NAMES],
    ]
)
EFFECT_SCHEMA = pa.schema(
    [
        ("sweep_id", pa.string()),
        ("preset", pa.string()),
        ("num_tokens", pa.int64()),
        ("axes", pa.string()),
        ("metric", pa.string()),
        ("n", pa.int64()),
        ("seeds", pa.list_(pa.int64())),
        ("mean_on", pa.float64()),
        ("mean_off", pa.float64()),
        ("difference", pa.float64()),
        ("ci_low", pa.float64()),
        ("ci_high", pa.float64()),
        ("p_value", pa.float64()),
        ("significant", pa.bool_()),
    ]
)
# The metrics the PNG and the terminal show: (column, title, lower is better). Those without a
# value in the sweep (e.g. gFID of a tokenizer-only sweep) are left out.
TABLE_METRICS = (("rfid", "rFID", True), ("rkid", "rKID", True), ("gfid", "gFID", True), ("gkid", "gKID", True),
                 ("psnr", "PSNR", False), ("ssim", "SSIM", False))
# The image or sample count each shown metric was measured on, shown beside it as N=...
SAMPLE_COUNTS = {"rfid": "rfid_n", "rkid": "rfid_n", "gfid": "num_samples", "gkid": "num_samples",
                 "psnr": "eval_images", "ssim": "eval_images"}
CONFIDENCE = 0.95


# --------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Axis:
    """One swept config key and its values, kept as the raw `--set` text so they parse alike."""

    key: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class GridPoint:
    """One run of the sweep: a preset, one value per axis, a seed (None: the preset's own)."""

    preset: str
    settings: tuple[tuple[str, str], ...]
    seed: int | None
    config: PipelineConfig
    # What the run changes from its preset (`--set`, then the axis values and seed keys), as recorded in lineage.
    overrides: tuple[str, ...] = ()

    @property
    def recorded_seed(self) -> int:
        # Without a seed axis the tokenizer's seed names the run (what pairs on/off points).
        return self.seed if self.seed is not None else self.config.train_tokenizer.train.seed

    def axes_json(self) -> str:
        """The validated config's value of every axis without its own column, as JSON."""
        values = {key: _config_value(self.config, key) for key, _ in self.settings if key not in COLUMN_AXES}
        return json.dumps(values, default=str)

    def describe(self) -> str:
        settings = " ".join(f"{key}={value}" for key, value in self.settings)
        seed = "" if self.seed is None else f" seed={self.seed}"
        return f"{_display(self.preset)}{' ' + settings if settings else ''}{seed}"


def _normalise_key(key: str) -> str:
    # parse_override owns the key syntax (stage names with dashes -> section names).
    parts, _ = parse_override(f"{key}=0")
    return ".".join(parts)


def _config_value(config: PipelineConfig, key: str) -> Any:
    node: Any = config
    for part in key.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node.model_dump(mode="json") if isinstance(node, BaseModel) else node


def seed_overrides(seed: int | None) -> list[str]:
    return [] if seed is None else [f"{key}={seed}" for key in SEED_KEYS]


def _check_axes(axes: Sequence[Axis], overrides: Sequence[str], seeds: Sequence[int] | None) -> None:
    """Reject a key set twice: the later override would silently win over the earlier one."""
    keys = [axis.key for axis in axes]
    repeated = sorted({key for key in keys if keys.count(key) > 1})
    if repeated:
        raise ConfigError(f"axis {', '.join(repeated)} is given twice (--tokens and --text are axes too)")
    seeded = [key for key in keys if key in SEED_KEYS]
    if seeded:
        raise ConfigError(f"axis {', '.join(seeded)}: sweep seeds with --seeds, which sets {', '.join(SEED_KEYS)}")
    for axis in axes:
        if not axis.values or len(set(axis.values)) != len(axis.values):
            raise ConfigError(f"axis {axis.key} needs distinct values, got {list(axis.values)}")
    fixed = {_normalise_key(text.split("=", 1)[0]) for text in overrides if "=" in text}
    clashes = sorted(fixed & {*keys, *(SEED_KEYS if seeds is not None else ())})
    if clashes:
        raise ConfigError(f"--set {', '.join(clashes)} is also swept; drop the --set or the axis")


def build_grid(presets: Sequence[str], overrides: Sequence[str], axes: Sequence[Axis] = (),
               seeds: Sequence[int] | None = None) -> list[GridPoint]:
    """Every (seed, preset, axis values) point's validated config; fails before anything runs.

    Seeds are the outer loop, so an interrupted sweep leaves whole grids of the first seeds.
    """
    if not presets:
        raise ConfigError("a sweep needs at least one preset")
    if seeds is not None and (not seeds or len(set(seeds)) != len(seeds)):
        raise ConfigError(f"--seeds needs distinct values, got {list(seeds)}")
    _check_axes(axes, overrides, seeds)
    grid = []
    for seed in [None] if seeds is None else seeds:
        for preset in presets:
            for values in itertools.product(*(axis.values for axis in axes)):
                settings = tuple(zip((axis.key for axis in axes), values))
                extra = [*(f"{key}={value}" for key, value in settings), *seed_overrides(seed)]
                changes = (*overrides, *extra)
                grid.append(GridPoint(preset, settings, seed, load_config(preset, list(changes)), changes))
    return grid


def named_axes(token_counts: Sequence[int] | None, text: Sequence[bool] | None,
               extra: dict[str, Sequence[str]] | None) -> list[Axis]:
    """`--tokens`, `--text` and `--axis` as Axis objects (None / empty: not swept)."""
    axes = []
    if token_counts is not None:
        for count in token_counts:
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ConfigError(f"token counts must be positive integers, got {count!r}")
        axes.append(Axis(TOKENS_KEY, tuple(str(count) for count in token_counts)))
    if text is not None:
        axes.append(Axis(TEXT_KEY, tuple("true" if on else "false" for on in text)))
    for key, values in (extra or {}).items():
        axes.append(Axis(_normalise_key(key), tuple(values)))
    return axes


# --------------------------------------------------------------------------- rows


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def result_row(sweep_id: str, point: GridPoint, until: str, results: dict[str, StageResult] | None,
               error: str | None = None) -> dict[str, Any]:
    results = results or {}
    config = point.config

    def artifact(stage: str) -> str | None:
        return results[stage].manifest.artifact_id if stage in results else None

    row: dict[str, Any] = {
        "sweep_id": sweep_id,
        "preset": point.preset,
        "num_tokens": config.train_tokenizer.model.num_latent_tokens,
        "use_text": config.train_tokenizer.use_text,
        "seed": point.recorded_seed,
        "axes": point.axes_json(),
        "until": until,
        "bottleneck": config.train_tokenizer.model.bottleneck,
        "generator": results["evaluate"].manifest.summary.get("generator") if "evaluate" in results else None,
        "status": "failed" if error else "completed",
        "error": error,
        "config_hash": config.digest(),
        "tokenizer_artifact": artifact("train-tokenizer"),
        "generator_artifact": artifact("train-generator"),
        "evaluate_artifact": artifact("evaluate"),
        "computed_stages": sum(not result.cache_hit for result in results.values()),
    }
    for name, stage, key in METRICS:
        row[name] = _number(results[stage].manifest.summary.get(key)) if stage in results else None
    return row


def write_results(store: Store, sweep_id: str, rows: list[dict[str, Any]], folder: str = SWEEPS_DIR) -> Path:
    path = store.root / folder / f"{sweep_id}.parquet"
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


# --------------------------------------------------------------------------- aggregation

# A point is everything but the seed; old sweep files lack `axes` and `seed` (null after
# union_by_name), so `axes` is coalesced and seeds are matched with `is not distinct from`.
_POINT = ("sweep_id", "preset", "num_tokens", "use_text", "axes")
_PAIR = ("sweep_id", "preset", "num_tokens", "axes")


def _measured_sql(source: str) -> str:
    """Completed runs, one row per (run, metric) with a value: the input of every statistic."""
    metrics = ", ".join(METRIC_NAMES)
    return f"""
        runs as (
            select sweep_id, preset, num_tokens, use_text, coalesce(axes, '{{}}') as axes, seed, status, {metrics}
            from {source}
        ), measured as (
            unpivot (select * exclude (status) from runs where status = 'completed')
            on {metrics} into name metric value value
        )"""


def points_sql(source: str = VIEW) -> str:
    """Per point and metric: n, mean, std (sample) over seeds, plus the point's completed and
    failed run counts. A point whose runs all failed keeps one row with a null metric."""
    point = ", ".join(_POINT)
    joined = " and ".join(f"p.{key} = s.{key}" for key in _POINT)
    return f"""
        with {_measured_sql(source)}, points as (
            select {point},
                   count(*) filter (where status = 'completed') as completed,
                   count(*) filter (where status is distinct from 'completed') as failed
            from runs group by {point}
        ), stats as (
            select {point}, metric, count(value) as n, avg(value) as mean, stddev_samp(value) as std,
                   list(seed order by seed) as seeds
            from measured group by {point}, metric
        )
        select {", ".join(f"p.{key}" for key in _POINT)}, s.metric, s.n, s.mean, s.std, s.seeds,
               p.completed, p.failed
        from points p left join stats s on {joined}"""


def text_pairs_sql(source: str = VIEW) -> str:
    """Per point without use_text and metric: the on and off values of the seeds both ran, in
    seed order (the t quantiles of the test are not in DuckDB: text_effect computes it)."""
    pair = ", ".join(f"t.{key}" for key in _PAIR)
    joined = " and ".join(f"t.{key} = f.{key}" for key in _PAIR)
    return f"""
        with {_measured_sql(source)}
        select {pair}, t.metric, list(t.seed order by t.seed) as seeds,
               list(t.value order by t.seed) as on_values, list(f.value order by t.seed) as off_values,
               avg(t.value) as mean_on, avg(f.value) as mean_off
        from measured t join measured f
          on {joined} and t.metric = f.metric and t.seed is not distinct from f.seed
        where t.use_text and not f.use_text
        group by {pair}, t.metric"""


@dataclass(frozen=True)
class PointStats:
    """One metric of one point over its seeds (metric None: every run of the point failed)."""

    sweep_id: str
    preset: str
    num_tokens: int
    use_text: bool
    axes: str
    metric: str | None
    n: int | None
    mean: float | None
    std: float | None
    seeds: list[int] | None
    completed: int
    failed: int


@dataclass(frozen=True)
class TextEffect:
    """use_text on - off of one metric at one point, paired by seed."""

    sweep_id: str
    preset: str
    num_tokens: int
    axes: str
    metric: str
    n: int
    seeds: list[int]
    mean_on: float
    mean_off: float
    difference: float
    ci_low: float | None
    ci_high: float | None
    p_value: float | None
    significant: bool | None  # the interval excludes 0; None without an interval (one seed)


def text_effect(pair: dict[str, Any], confidence: float = CONFIDENCE) -> TextEffect:
    """One pair's paired t-test; with one seed only the difference (no interval, no p)."""
    on, off = pair.pop("on_values"), pair.pop("off_values")
    if len(on) < 2:
        return TextEffect(**pair, n=len(on), difference=on[0] - off[0], ci_low=None, ci_high=None, p_value=None,
                          significant=None)
    result = paired_difference(on, off, confidence)
    # nan: every difference is exactly 0, where the test is undefined (the interval is [0, 0]).
    p_value = None if math.isnan(result.p_value) else result.p_value
    return TextEffect(**pair, n=result.n, difference=result.mean, ci_low=result.low, ci_high=result.high,
                      p_value=p_value, significant=result.low > 0 or result.high < 0)


def _records(connection: duckdb.DuckDBPyConnection, sql: str) -> list[dict[str, Any]]:
    cursor = connection.execute(sql)
    names = [column[0] for column in cursor.description]
    return [dict(zip(names, values)) for values in cursor.fetchall()]


def _metric_order(metric: str | None) -> int:
    return METRIC_NAMES.index(metric) if metric in METRIC_NAMES else len(METRIC_NAMES)


def _first_seen(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[tuple, int]:
    """Each distinct key's first row index (axes coalesced as the SQL does)."""
    order: dict[tuple, int] = {}
    for index, row in enumerate(rows):
        order.setdefault(tuple(row[key] or "{}" if key == "axes" else row[key] for key in keys), index)
    return order


def aggregate(rows: list[dict[str, Any]]) -> tuple[list[PointStats], list[TextEffect]]:
    """The per-point statistics and text effects of these rows, by the SQL the DuckDB views run."""
    connection = duckdb.connect()
    try:
        connection.register(VIEW, pa.Table.from_pylist(rows, schema=SCHEMA))
        points = [PointStats(**record) for record in _records(connection, points_sql())]
        pairs = _records(connection, text_pairs_sql())
    finally:
        connection.close()
    effects = [text_effect(pair) for pair in pairs]
    # Grid order (the rows' order), then METRICS order: how the tables read.
    point_order, pair_order = _first_seen(rows, _POINT), _first_seen(rows, _PAIR)
    points.sort(key=lambda p: (point_order[tuple(getattr(p, key) for key in _POINT)], _metric_order(p.metric)))
    effects.sort(key=lambda e: (pair_order[tuple(getattr(e, key) for key in _PAIR)], _metric_order(e.metric)))
    return points, effects


def write_effects(store: Store, sweep_id: str, effects: list[TextEffect], folder: str = SWEEPS_DIR) -> Path:
    # Written even when empty: the view's glob must match a file, and the file says "no pairs".
    path = store.root / folder / EFFECTS_DIR / f"{sweep_id}.parquet"
    write_parquet_atomic(pa.Table.from_pylist([asdict(effect) for effect in effects], schema=EFFECT_SCHEMA), path)
    return path


# --------------------------------------------------------------------------- DuckDB views


def _glob(path: Path) -> str:
    return (path / "*.parquet").as_posix().replace("'", "''")


def view_statements(store: Store) -> list[str]:
    sweeps = store.root / SWEEPS_DIR
    return [
        f"create or replace view {VIEW} as select * from read_parquet('{_glob(sweeps)}', union_by_name = true)",
        f"create or replace view {POINTS_VIEW} as {points_sql(VIEW)}",
        f"create or replace view {EFFECTS_VIEW} as "
        f"select * from read_parquet('{_glob(sweeps / EFFECTS_DIR)}', union_by_name = true)",
    ]


def create_results_view(store: Store, attempts: int = 20) -> bool:
    """(Re)define the sweep views over every sweep's files; False if the database stayed locked.

    The file is open only for these statements, so users' sessions are not blocked; if one
    holds it, retry with backoff and then give up quietly (the Parquet files hold the results).
    """
    statements = view_statements(store)
    with lineage.database_lock(store):
        for attempt in range(attempts):
            try:
                # The storage version lineage.ensure_database writes, which the duckdb 1.x CLI can open.
                connection = duckdb.connect(str(store.duckdb_path), config={"storage_compatibility_version": "v1.0.0"})
            except duckdb.IOException:
                time.sleep(min(0.1 * 2**attempt, 2.0))
                continue
            try:
                for statement in statements:
                    connection.execute(statement)
            finally:
                connection.close()
            return True
    log.warning("sweep: %s is locked by another process; views %s not updated (results are in %s)",
                store.duckdb_path, ", ".join((VIEW, POINTS_VIEW, EFFECTS_VIEW)), store.root / SWEEPS_DIR)
    return False


# --------------------------------------------------------------------------- tables (terminal + PNG)


def _display(preset: str) -> str:
    """A preset given as a YAML path is shown by its file name."""
    return Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset


def _axes_label(axes: str | None) -> str:
    """`{"ingest.source.shapes.caption_level": "class"}` -> `caption_level=class` (the full key
    where two axes end alike)."""
    values = json.loads(axes or "{}")
    tails = [key.rsplit(".", 1)[-1] for key in values]
    return " ".join(f"{tail if tails.count(tail) == 1 else key}={value}"
                    for (key, value), tail in zip(values.items(), tails))


def _point_label(preset: str, num_tokens: int, axes: str | None, use_text: bool | None = None) -> str:
    text = "" if use_text is None else f" text {'on' if use_text else 'off'}"
    extra = _axes_label(axes)
    return f"{_display(preset)} {num_tokens} tok{text}{' ' + extra if extra else ''}"


def _number_text(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _digits(metric: str) -> int:
    # KID is ~1e-3..1e-1 and SSIM lives in [0, 1]: two decimals would hide every difference.
    return {"rkid": 4, "gkid": 4, "ssim": 3}.get(metric, 2)


def _count_text(count: PointStats | None) -> str:
    """`, N=500` from the per-point statistics of a count column (a range if seeds differ)."""
    if count is None or not count.n or count.mean is None:
        return ""
    if count.std:  # seeds measured on different counts (e.g. a split with uncaptioned images)
        return f", N≈{count.mean:.0f}"
    return f", N={count.mean:.0f}"


def shown_metrics(points: list[PointStats]) -> list[tuple[str, str, bool]]:
    measured = {p.metric for p in points if p.n}
    return [metric for metric in TABLE_METRICS if metric[0] in measured] or list(TABLE_METRICS[:3])


def points_table(points: list[PointStats]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per point, `mean ± std (n)` per shown metric, run counts."""
    metrics = shown_metrics(points)
    by_point: dict[tuple, dict[str, PointStats]] = {}
    for p in points:
        by_point.setdefault((p.preset, p.num_tokens, p.use_text, p.axes), {})[p.metric or ""] = p
    header = ["point", *(f"{title} {'↓' if lower else '↑'}" for _, title, lower in metrics), "runs"]
    rows = []
    for (preset, tokens, use_text, axes), stats in by_point.items():
        first = next(iter(stats.values()))
        cells = []
        for metric, _, _ in metrics:
            stat = stats.get(metric)
            if stat is None or not stat.n:
                cells.append("-")
                continue
            spread = "" if stat.std is None else f" ± {_number_text(stat.std, _digits(metric))}"
            count = _count_text(stats.get(SAMPLE_COUNTS.get(metric, "")))
            cells.append(f"{_number_text(stat.mean, _digits(metric))}{spread} (n={stat.n}{count})")
        failed = f", {first.failed} failed" if first.failed else ""
        rows.append([_point_label(preset, tokens, axes, use_text), *cells, f"{first.completed} ok{failed}"])
    return header, rows


def effects_table(effects: list[TextEffect], metrics: list[tuple[str, str, bool]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per (point, shown metric), on - off with its interval and p."""
    titles = {metric: (title, lower) for metric, title, lower in metrics}
    # on / off: means over the seeds both ran (n), so they can differ from the points table's.
    header = ["point", "metric", "on", "off", "on - off", f"{CONFIDENCE:.0%} interval", "p", "n"]
    rows = []
    for e in effects:
        if e.metric not in titles:
            continue
        title, lower = titles[e.metric]
        digits = _digits(e.metric)
        interval = ("-" if e.ci_low is None else
                    f"[{e.ci_low:+.{digits}f}, {e.ci_high:+.{digits}f}]{' *' if e.significant else ''}")
        rows.append([_point_label(e.preset, e.num_tokens, e.axes), f"{title} {'↓' if lower else '↑'}",
                     _number_text(e.mean_on, digits), _number_text(e.mean_off, digits), f"{e.difference:+.{digits}f}",
                     interval,
                     "-" if e.p_value is None else f"{e.p_value:.3g}", str(e.n)])
    return header, rows


def _text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in [header, *rows]]
    return "\n".join(lines)


def _run_cell(row: dict[str, Any], metric: str) -> str:
    """One run's value, with the N it was measured on beside FIDs and KIDs."""
    value = _number_text(row[metric], _digits(metric))
    count = row.get(SAMPLE_COUNTS.get(metric, ""))
    if row[metric] is None or count is None or metric in ("psnr", "ssim"):
        return value
    return f"{value} (N={count:.0f})"


def report_text(rows: list[dict[str, Any]], points: list[PointStats], effects: list[TextEffect]) -> str:
    """What `tok1d sweep` prints: every run, the per-point statistics and the text effects."""
    metrics = shown_metrics(points)
    run_header = ["point", "seed", *(title for _, title, _ in metrics), "status"]
    run_rows = [[_point_label(row["preset"], row["num_tokens"], row["axes"], row["use_text"]), str(row["seed"]),
                 *(_run_cell(row, metric) for metric, _, _ in metrics),
                 row["status"] if row["error"] is None else f"{row['status']}: {row['error'][:80]}"] for row in rows]
    failed = sum(row["status"] == "failed" for row in rows)
    parts = [f"runs ({len(rows) - failed} completed, {failed} failed):", _text_table(run_header, run_rows),
             "\npoints (mean ± sample std over seeds; failed runs are not averaged):", _text_table(*points_table(points))]
    effect_header, effect_rows = effects_table(effects, metrics)
    if effect_rows:
        parts += [f"\ntext on - off, paired by seed (on, off: means over the n seeds both ran; "
                  f"* = the {CONFIDENCE:.0%} t-interval excludes 0):",
                  _text_table(effect_header, effect_rows)]
    return "\n".join(parts)


def _series_label(preset: str, use_text: bool, axes: str | None) -> str:
    extra = _axes_label(axes)
    return f"{_display(preset)} ({'w/ text' if use_text else 'w/o text'}){' ' + extra if extra else ''}"


def _draw_table(figure, box: tuple[float, float, float, float], header: list[str], rows: list[list[str]],
                title: str) -> None:
    axis = figure.add_axes(box)
    axis.axis("off")
    axis.set_title(title, fontsize=9)
    table = axis.table(cellText=rows, colLabels=header, loc="upper center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(7)
    table.scale(1.0, 1.4)


def plot_sweep(points: list[PointStats], effects: list[TextEffect], path: Path, title: str) -> Path:
    """Mean ± std (n) per point, the paired text on - off differences, and the shown metrics as
    curves over the token count (error bars: std over seeds), one curve per preset x text x axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = shown_metrics(points)
    point_header, point_rows = points_table(points)
    effect_header, effect_rows = effects_table(effects, metrics)
    # Heights in inches, so tables of any length keep a readable row height.
    blocks = [(0.28 * (len(point_rows) + 2), point_header, point_rows, f"{title}: mean ± std over seeds (n)")]
    if effect_rows:
        blocks.append((0.28 * (len(effect_rows) + 2), effect_header, effect_rows,
                       f"text on - off, paired by seed ({CONFIDENCE:.0%} t-interval; * excludes 0)"))
    curves = 3.2
    height = sum(block[0] for block in blocks) + curves + 0.4
    figure = plt.figure(figsize=(max(9.0, 3.2 * len(metrics)), height))
    top = 1.0
    for block_height, header, rows, block_title in blocks:
        fraction = block_height / height
        _draw_table(figure, (0.02, top - fraction, 0.96, fraction - 0.25 / height), header, rows, block_title)
        top -= fraction
    series: dict[tuple, list[PointStats]] = {}
    for p in points:
        series.setdefault((p.preset, p.use_text, p.axes), []).append(p)
    counts = sorted({p.num_tokens for p in points})
    width = 0.9 / len(metrics)
    for index, (metric, name, lower) in enumerate(metrics):
        axis = figure.add_axes((0.06 + index * width, 0.5 / height, width - 0.05, (curves - 0.9) / height))
        for key, stats in series.items():
            measured = sorted((p.num_tokens, p.mean, p.std or 0.0) for p in stats if p.metric == metric and p.n)
            if measured:
                x, y, spread = zip(*measured)
                axis.errorbar(x, y, yerr=spread, marker="o", capsize=3, label=_series_label(*key))
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(c) for c in counts])
        axis.set_xlabel("tokens")
        axis.set_title(f"{name} ({'lower' if lower else 'higher'} is better)", fontsize=9)
        axis.grid(alpha=0.3)
        if index == 0 and axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=6)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    os.replace(tmp, path)
    return path


def _publish(points: list[PointStats], effects: list[TextEffect], sweep_id: str) -> None:
    """The statistics as table artifacts in the Prefect UI (best effort: the files are the record)."""
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:  # called outside a flow run (e.g. `sweep.fn`): no UI to publish to
        return
    try:
        from prefect.artifacts import create_table_artifact

        create_table_artifact(table=[asdict(p) for p in points], key="sweep-points", description=f"sweep {sweep_id}")
        if effects:
            create_table_artifact(table=[asdict(e) for e in effects], key="sweep-text-effects",
                                  description=f"sweep {sweep_id}: text on - off, paired by seed")
    except Exception as error:
        log.warning("sweep: could not publish the results artifacts: %s", error)


# --------------------------------------------------------------------------- the flow


class SweepFailed(RuntimeError):
    """Some runs failed; the others' results are written and `report` holds the tables."""

    def __init__(self, message: str, report: str = "") -> None:
        super().__init__(message)
        self.report = report

    def __reduce__(self):
        # Prefect may pickle a flow's exception into result storage; keep the report through it.
        return type(self), (str(self), self.report)


def check_until(until: str) -> str:
    """A stage name (dashes or underscores) -> the stage; the sweep runs each point up to it."""
    stage = until.strip().replace("_", "-")
    if stage not in STAGE_ORDER:
        raise ConfigError(f"--until {until!r} is not a stage; stages: {', '.join(STAGE_ORDER)}")
    return stage


def sweep_run_name() -> str:
    return sweep_name(flow_run.parameters)


def sweep_name(parameters: dict[str, Any]) -> str:
    """`smoke-textok tokens=16,32 text=on,off seeds=0,1 +train_tokenizer.train.steps=7`: the
    presets, every axis and the `--set` list of the sweep flow's parameters, so its run says
    what it swept and changed."""
    text = parameters.get("text")
    axes = {"tokens": parameters.get("token_counts"), "text": ["on" if on else "off" for on in text or []],
            **(parameters.get("axes") or {}), "seeds": parameters.get("seeds")}
    swept = [f"{key}={','.join(str(value) for value in values)}" for key, values in axes.items() if values]
    until = parameters.get("until", "evaluate")
    part = parameters.get("part")
    label = " ".join([",".join(parameters.get("presets") or []), *swept,
                      *([f"until={until}"] if until != "evaluate" else []),
                      *([f"part={part[0]}/{part[1]}"] if part else [])])
    return run_name(label, parameters.get("overrides"))


@flow(name="sweep", flow_run_name=sweep_run_name)
def sweep(presets: list[str], token_counts: list[int] | None, store: str, overrides: list[str] | None = None,
          text: list[bool] | None = None, seeds: list[int] | None = None, axes: dict[str, list[str]] | None = None,
          until: str = "evaluate", part: list[int] | None = None) -> dict:
    """Run every seed x preset x axes point up to `until`; returns the rows, statistics and files.

    `token_counts`, `text`, `seeds` None: each preset's own setting. `part` [K, N]: only grid
    points K, K+N, ... (one process of `--jobs N`, flows/sweep_jobs.py). A failing run is
    recorded (status "failed", its error) and the others still run; the flow fails at the end if
    any run failed, after writing the tables, views and plot.
    """
    overrides = list(overrides or [])
    until = check_until(until)
    grid = build_grid(presets, overrides, named_axes(token_counts, text, axes), seeds)
    if part is not None:
        grid = grid[part[0]::part[1]]
    target = Store(store)
    digest = hash_value({"presets": presets, "tokens": token_counts, "overrides": overrides, "text": text,
                         "seeds": seeds, "axes": axes, "until": until, **({"part": part} if part else {})})[:8]
    sweep_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{digest}"
    # A --jobs child's files stay out of the views: the parent's pass writes the sweep's rows.
    folder = SWEEPS_DIR if part is None else f"{SWEEPS_DIR}/{PARTS_DIR}"
    rows: list[dict[str, Any]] = []
    table_path = write_results(target, sweep_id, rows, folder)
    for index, point in enumerate(grid, 1):
        log.info("sweep %s: %d/%d %s", sweep_id, index, len(grid), point.describe())
        try:
            results = run_pipeline(point.config, target, preset=point.preset, flow="sweep", until=until,
                                   overrides=list(point.overrides))
            rows.append(result_row(sweep_id, point, until, results))
        except Exception as error:  # one bad point must not lose the others' results
            log.error("sweep %s: %s failed: %r", sweep_id, point.describe(), error)
            rows.append(result_row(sweep_id, point, until, None, error=f"{type(error).__name__}: {error}"))
        # Rewritten after every run: a killed sweep keeps what it finished.
        table_path = write_results(target, sweep_id, rows, folder)
    points, effects = aggregate(rows)
    effects_path = write_effects(target, sweep_id, effects, folder)
    views = [VIEW, POINTS_VIEW, EFFECTS_VIEW] if part is None and create_results_view(target) else []
    plot_path = plot_sweep(points, effects, target.root / folder / f"{sweep_id}.png", f"sweep {sweep_id}")
    _publish(points, effects, sweep_id)
    report = report_text(rows, points, effects)
    failed = [f"{grid[i].describe()}: {row['error']}" for i, row in enumerate(rows) if row["status"] == "failed"]
    if failed:
        raise SweepFailed(f"sweep {sweep_id}: {len(failed)} of {len(rows)} runs failed (results of the others "
                          f"are in {table_path}): " + "; ".join(failed), report)
    return {"sweep_id": sweep_id, "table": str(table_path), "effects": str(effects_path), "plot": str(plot_path),
            "views": views, "rows": rows, "points": [asdict(p) for p in points],
            "text_effects": [asdict(e) for e in effects], "report": report}


# --------------------------------------------------------------------------- the CLI


def _split_list(text: str, what: str) -> list[str]:
    items = [item.strip() for item in text.split(",") if item.strip()]
    if not items:
        raise ConfigError(f"--{what} needs a comma-separated list, got {text!r}")
    return items


TEXT_VALUES = {"on": True, "off": False}


def parse_text_axis(text: str | None) -> list[bool] | None:
    """`--text on,off` -> [True, False]; absent -> None (each preset's own setting)."""
    if text is None:
        return None
    items = [item.lower() for item in _split_list(text, "text")]
    unknown = [item for item in items if item not in TEXT_VALUES]
    if unknown:
        raise ConfigError(f"--text takes on and/or off, comma-separated; got {', '.join(unknown)}")
    return [TEXT_VALUES[item] for item in items]


def _integers(text: str | None, what: str, minimum: int) -> list[int] | None:
    if text is None:
        return None
    items = _split_list(text, what)
    try:
        values = [int(item) for item in items]
    except ValueError:
        raise ConfigError(f"--{what} must be comma-separated integers, got {text!r}") from None
    if any(value < minimum for value in values):
        raise ConfigError(f"--{what} values must be >= {minimum}, got {text!r}")
    return values


def parse_seeds(text: str | None) -> list[int] | None:
    """`--seeds 0,1,2` -> [0, 1, 2]; absent -> None (each preset's own seeds, one run per point)."""
    return _integers(text, "seeds", 0)


def parse_axes(texts: Sequence[str] | None) -> dict[str, list[str]]:
    """`--axis KEY=V1,V2` (repeatable) -> {KEY: [V1, V2]}; the values are parsed later like
    `--set KEY=V` values (a value cannot itself hold a comma)."""
    axes: dict[str, list[str]] = {}
    for text in texts or ():
        key, separator, values = text.partition("=")
        if not separator or not key.strip():
            raise ConfigError(f"--axis {text!r} must look like key.path=value1,value2")
        key = _normalise_key(key.strip())
        if key in axes:
            raise ConfigError(f"--axis {key} is given twice")
        axes[key] = _split_list(values, "axis")
    return axes


def run_sweep_cli(args) -> int:
    """`tok1d sweep --presets a,b [--tokens 16,32] [--text on,off] [--seeds 0,1] [--axis k=v1,v2]
    [--until stage] --store S [--set k=v]`; returns the exit code."""
    import sys

    overrides = list(args.overrides or [])
    try:
        presets = _split_list(args.presets, "presets")
        counts = _integers(args.tokens, "tokens", 1)
        text = parse_text_axis(args.text)
        seeds = parse_seeds(args.seeds)
        axes = parse_axes(args.axes)
        until = check_until(args.until)
        jobs = check_jobs(args.jobs)
        part = parse_part(args.part)
        build_grid(presets, overrides, named_axes(counts, text, axes), seeds)  # fail fast, before Prefect starts
    except ConfigError as error:
        print(f"tok1d: {error}", file=sys.stderr)
        return 2
    from tasks.store import local_root

    store = local_root(args.store)
    if jobs > 1 and part is None:
        # The children compute the points; the pass below finds them cached and writes the tables.
        run_jobs(Namespace(**{**vars(args), "store": store}), jobs)
    try:
        result = sweep(presets=presets, token_counts=counts, store=str(store), overrides=overrides, text=text,
                       seeds=seeds, axes=axes, until=until, part=list(part) if part else None)
    except SweepFailed as error:
        print(f"\n{error.report}")
        print(f"\ntok1d: {error}", file=sys.stderr)
        return 1
    print(f"\n{result['report']}")
    print(f"\ntable:   {result['table']}\neffects: {result['effects']}\nplot:    {result['plot']}")
    if result["views"]:
        print(f"query:   duckdb {store / 'experiments.duckdb'} -c \"select * from {POINTS_VIEW}\" "
              f"(views: {', '.join(result['views'])})")
    return 0
