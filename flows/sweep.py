"""The `sweep` flow: presets x token counts (x text on/off) through the pipeline, tabulated like
the TexTok paper.

Each grid point is one `run_pipeline` call up to `evaluate`, with
`--set train_tokenizer.model.num_latent_tokens=N` (and, when the text axis is given,
`--set train_tokenizer.use_text=true|false`) added to the sweep's overrides. Points share
every stage whose section and inputs they share (ingest, caption and embed-text are computed once
per dataset), because each stage's cache key only covers what it reads.

Results: `<store>/sweeps/<sweep_id>.parquet` (one row per point), the DuckDB view `sweep_results`
over every sweep's file in `<store>/experiments.duckdb` (created in a short write window, retried
while another process holds the file), and `<store>/sweeps/<sweep_id>.png`: a table of rFID,
gFID and PSNR per token count, with and without text, plus the same numbers as curves.

    tok1d sweep --presets fashion-mnist-textok --tokens 16,32,64 --text on,off --store S
"""

from __future__ import annotations

import fcntl
import logging
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import duckdb
import pyarrow as pa
from prefect import flow

from flows.pipeline import run_pipeline
from tasks.config import ConfigError, PipelineConfig, load_config
from tasks.hashing import hash_value
from tasks.stage import StageResult
from tasks.store import Store
from tasks.tables import write_parquet_atomic

log = logging.getLogger("tok1d")

SWEEPS_DIR = "sweeps"
VIEW = "sweep_results"
TOKENS_KEY = "train_tokenizer.model.num_latent_tokens"
TEXT_KEY = "train_tokenizer.use_text"
# (column, stage whose summary holds it, summary key)
METRICS = (
    ("rfid", "train-tokenizer", "rfid"),
    ("psnr", "train-tokenizer", "psnr"),
    ("ssim", "train-tokenizer", "ssim"),
    ("gfid", "evaluate", "gfid"),
    ("inception_score", "evaluate", "inception_score"),
    ("precision", "evaluate", "precision"),
    ("recall", "evaluate", "recall"),
    ("clip_score", "evaluate", "clip_score"),
)
SCHEMA = pa.schema(
    [
        ("sweep_id", pa.string()),
        ("preset", pa.string()),
        ("num_tokens", pa.int64()),
        ("use_text", pa.bool_()),
        ("bottleneck", pa.string()),
        ("generator", pa.string()),
        ("status", pa.string()),
        ("error", pa.string()),
        ("config_hash", pa.string()),
        ("tokenizer_artifact", pa.string()),
        ("generator_artifact", pa.string()),
        ("evaluate_artifact", pa.string()),
        ("computed_stages", pa.int64()),
        *[(name, pa.float64()) for name, _, _ in METRICS],
    ]
)
# The table of the plot: (column, title, lower is better).
TABLE_METRICS = (("rfid", "rFID", True), ("gfid", "gFID", True), ("psnr", "PSNR", False))


def grid_configs(presets: list[str], token_counts: list[int], overrides: list[str],
                 text: list[bool] | None = None) -> list[tuple[str, int, PipelineConfig]]:
    """Every (preset, token count[, text on/off]) point's validated config; fails before anything runs.

    `text=None` keeps each preset's own `use_text`; a list sweeps it (the same model with and
    without the caption's text tokens: the TexTok paper's ablation).
    """
    if not presets or not token_counts:
        raise ConfigError("a sweep needs at least one preset and one token count")
    for count in token_counts:
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ConfigError(f"token counts must be positive integers, got {count!r}")
    if text is not None and (not text or len(set(text)) != len(text)):
        raise ConfigError(f"the text axis needs distinct values from on/off, got {text!r}")
    text_overrides = [[]] if text is None else [[f"{TEXT_KEY}={'true' if on else 'false'}"] for on in text]
    return [
        (preset, count, load_config(preset, [*overrides, f"{TOKENS_KEY}={count}", *extra]))
        for preset in presets
        for extra in text_overrides
        for count in token_counts
    ]


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def result_row(sweep_id: str, preset: str, count: int, config: PipelineConfig,
               results: dict[str, StageResult] | None, error: str | None = None) -> dict[str, Any]:
    results = results or {}

    def artifact(stage: str) -> str | None:
        return results[stage].manifest.artifact_id if stage in results else None

    row: dict[str, Any] = {
        "sweep_id": sweep_id,
        "preset": preset,
        "num_tokens": count,
        "use_text": config.train_tokenizer.use_text,
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


def write_results(store: Store, sweep_id: str, rows: list[dict[str, Any]]) -> Path:
    path = store.root / SWEEPS_DIR / f"{sweep_id}.parquet"
    write_parquet_atomic(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


@contextmanager
def _duckdb_lock(store: Store) -> Iterator[None]:
    # The lock lineage.ensure_database takes, so the two never write the file at once.
    path = store.root / "lineage" / ".duckdb.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def create_results_view(store: Store, attempts: int = 20) -> bool:
    """(Re)define `sweep_results` over every sweep file; False if the database stayed locked.

    The file is open only for this one statement, so users' sessions are not blocked; if one
    holds it, retry with backoff and then give up quietly (the Parquet files hold the results).
    """
    pattern = (store.root / SWEEPS_DIR / "*.parquet").as_posix().replace("'", "''")
    sql = f"create or replace view {VIEW} as select * from read_parquet('{pattern}', union_by_name = true)"
    with _duckdb_lock(store):
        for attempt in range(attempts):
            try:
                # The storage version lineage.ensure_database writes, which the duckdb 1.x CLI can open.
                connection = duckdb.connect(str(store.duckdb_path), config={"storage_compatibility_version": "v1.0.0"})
            except duckdb.IOException:
                time.sleep(min(0.1 * 2**attempt, 2.0))
                continue
            try:
                connection.execute(sql)
            finally:
                connection.close()
            return True
    log.warning("sweep: %s is locked by another process; view %s not updated (results are in %s)",
                store.duckdb_path, VIEW, store.root / SWEEPS_DIR)
    return False


def _display(preset: str) -> str:
    """A preset given as a YAML path is shown by its file name."""
    return Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset


def _series_label(preset: str, use_text: bool) -> str:
    return f"{_display(preset)} ({'w/ text' if use_text else 'w/o text'})"


def plot_sweep(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """A TexTok-style table (rows: token counts; columns: rFID / gFID / PSNR for each preset, with
    and without text) above the same numbers drawn as curves over the token count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = list(dict.fromkeys((row["preset"], row["use_text"]) for row in rows))
    counts = sorted({row["num_tokens"] for row in rows})
    value = {(row["preset"], row["use_text"], row["num_tokens"]): row for row in rows}

    def cell(key: tuple, metric: str) -> str:
        number = value.get(key, {}).get(metric)
        return "-" if number is None else f"{number:.2f}"

    columns = ["tokens"] + [f"{name}{' ↓' if lower else ' ↑'}\n{_series_label(*s)}"
                            for _, name, lower in TABLE_METRICS for s in series]
    cells = [[str(count)] + [cell((*s, count), metric) for metric, _, _ in TABLE_METRICS for s in series]
             for count in counts]
    figure = plt.figure(figsize=(max(8.0, 2.3 * len(columns)), 7.0))
    table_axis = figure.add_axes((0.02, 0.55, 0.96, 0.4))
    table_axis.axis("off")
    table = table_axis.table(cellText=cells, colLabels=columns, loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 2.2)
    table_axis.set_title(title)
    for index, (metric, name, lower) in enumerate(TABLE_METRICS):
        axis = figure.add_axes((0.07 + index * 0.32, 0.08, 0.26, 0.36))
        for s in series:
            points = [(c, value[(*s, c)][metric]) for c in counts if (*s, c) in value and value[(*s, c)][metric] is not None]
            if points:
                axis.plot(*zip(*points), marker="o", label=_series_label(*s))
        axis.set_xscale("log", base=2)
        axis.set_xticks(counts, [str(c) for c in counts])
        axis.set_xlabel("tokens")
        axis.set_title(f"{name} ({'lower' if lower else 'higher'} is better)")
        axis.grid(alpha=0.3)
        if index == 0 and axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=7)
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=110)
    plt.close(figure)
    os.replace(tmp, path)
    return path


def _publish(rows: list[dict[str, Any]], sweep_id: str) -> None:
    """The results as a table artifact in the Prefect UI (best effort: the files are the record)."""
    from prefect.context import FlowRunContext

    if FlowRunContext.get() is None:  # called outside a flow run (e.g. `sweep.fn`): no UI to publish to
        return
    try:
        from prefect.artifacts import create_table_artifact

        columns = ("preset", "num_tokens", "use_text", "status", *(name for name, _, _ in METRICS))
        create_table_artifact(table=[{key: row[key] for key in columns} for row in rows], key="sweep-results",
                              description=f"sweep {sweep_id}")
    except Exception as error:
        log.warning("sweep: could not publish the results artifact: %s", error)


@flow(name="sweep")
def sweep(presets: list[str], token_counts: list[int], store: str, overrides: list[str] | None = None,
          text: list[bool] | None = None) -> dict:
    """Run every preset x token count (x text) point up to `evaluate`; returns the results and files.

    A failing point is recorded (status "failed", its error) and the others still run; the flow
    fails at the end if any point failed, after writing the table, view and plot.
    """
    overrides = list(overrides or [])
    grid = grid_configs(presets, token_counts, overrides, text)
    target = Store(store)
    digest = hash_value({"presets": presets, "tokens": token_counts, "overrides": overrides, "text": text})[:8]
    sweep_id = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{digest}"
    rows = []
    for preset, count, config in grid:
        point = f"{preset} with {count} tokens, text {'on' if config.train_tokenizer.use_text else 'off'}"
        log.info("sweep %s: %s", sweep_id, point)
        try:
            results = run_pipeline(config, target, preset=preset, flow="sweep", until="evaluate")
            rows.append(result_row(sweep_id, preset, count, config, results))
        except Exception as error:  # one bad point must not lose the others' results
            log.error("sweep %s: %s failed: %r", sweep_id, point, error)
            rows.append(result_row(sweep_id, preset, count, config, None, error=f"{type(error).__name__}: {error}"))
    table_path = write_results(target, sweep_id, rows)
    view = VIEW if create_results_view(target) else None
    plot_path = plot_sweep(rows, target.root / SWEEPS_DIR / f"{sweep_id}.png", f"sweep {sweep_id}")
    _publish(rows, sweep_id)
    failed = [f"{row['preset']}@{row['num_tokens']}{'+text' if row['use_text'] else ''}: {row['error']}"
              for row in rows if row["status"] == "failed"]
    if failed:
        raise RuntimeError(f"sweep {sweep_id}: {len(failed)} of {len(rows)} points failed (results of the others "
                           f"are in {table_path}): " + "; ".join(failed))
    return {"sweep_id": sweep_id, "table": str(table_path), "plot": str(plot_path), "view": view, "rows": rows}


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


def run_sweep_cli(args) -> int:
    """`tok1d sweep --presets a,b --tokens 16,32 [--text on,off] --store S [--set k=v]`; returns the exit code."""
    import sys

    try:
        presets = _split_list(args.presets, "presets")
        try:
            counts = [int(item) for item in _split_list(args.tokens, "tokens")]
        except ValueError:
            raise ConfigError(f"--tokens must be comma-separated integers, got {args.tokens!r}") from None
        text = parse_text_axis(args.text)
        grid_configs(presets, counts, list(args.overrides or []), text)  # fail fast, before Prefect starts
    except ConfigError as error:
        print(f"tok1d: {error}", file=sys.stderr)
        return 2
    result = sweep(presets=presets, token_counts=counts, store=str(Path(args.store).expanduser().resolve()),
                   overrides=list(args.overrides or []), text=text)
    print(f"\n{'preset':<28}{'tokens':>7}{'text':>6}{'rFID':>9}{'gFID':>9}{'PSNR':>8}  status")
    for row in result["rows"]:
        numbers = "".join(f"{'-' if row[m] is None else format(row[m], '.2f'):>{w}}" for m, w in
                          (("rfid", 9), ("gfid", 9), ("psnr", 8)))
        print(f"{_display(row['preset']):<28}{row['num_tokens']:>7}{'yes' if row['use_text'] else 'no':>6}{numbers}  {row['status']}")
    print(f"\ntable: {result['table']}\nplot:  {result['plot']}")
    if result["view"]:
        print(f"query: duckdb {Path(args.store).expanduser().resolve() / 'experiments.duckdb'} "
              f"-c \"select * from {VIEW}\"")
    return 0
