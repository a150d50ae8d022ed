"""The shapes caption-level sweep as tables: mean +- std over seeds per point, and the paired
effect of each caption level against the same tokenizer without text (where that was run) and
against the `class` caption (the object count only), at each token count.

    .venv/bin/python bench/shapes_sweep_report.py --store store/shapes [--sweeps ID,ID]
    .venv/bin/python bench/shapes_sweep_report.py --results docs/results/shapes-<sweep id>.parquet

Reads every sweep of the store (or the given ids) from `sweeps/*.parquet`, the same rows as the
DuckDB view `sweep_results`, or one such file (the README's sweeps are kept in docs/results/),
keeps the completed shapes-textok points and prints markdown.
Differences are paired by seed (models.metrics.paired_difference: 95% t-interval, p-value);
one is called real only when its interval excludes 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import duckdb
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.metrics import paired_difference  # noqa: E402

LEVEL_KEY = "ingest.source.shapes.caption_level"
NO_TEXT = "no text"
LEVELS = (NO_TEXT, "class", "short", "detailed")
METRICS = (("psnr", "PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.3f}"), ("rkid", "rKID", "{:.4f}"), ("rfid", "rFID", "{:.1f}"))


def load(pattern: str, sweeps: list[str] | None) -> list[dict]:
    rows = duckdb.sql(f"select * from read_parquet('{pattern}', union_by_name = true) where status = 'completed'")
    records = [dict(zip(rows.columns, values)) for values in rows.fetchall()]
    if sweeps:
        records = [r for r in records if r["sweep_id"] in sweeps]
    for record in records:
        # A tokenizer without text reads no caption, whatever level its config names: the control.
        level = json.loads(record.get("axes") or "{}").get(LEVEL_KEY)
        record["level"] = NO_TEXT if record["use_text"] is False else level
    return [r for r in records if r["level"] is not None]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--store", type=Path, help="a store: every sweep in its sweeps/*.parquet")
    source.add_argument("--results", type=Path, help="one sweep's rows (a sweeps/<id>.parquet file)")
    parser.add_argument("--sweeps", default=None, help="comma-separated sweep ids (default: all)")
    args = parser.parse_args()
    pattern = (args.results if args.results else args.store / "sweeps" / "*.parquet").as_posix()
    records = load(pattern, args.sweeps.split(",") if args.sweeps else None)
    if not records:
        print(f"no completed shapes sweep points in {pattern}")
        return 1
    by_point: dict[tuple[int, str], dict[int, dict]] = {}
    for record in records:
        by_point.setdefault((record["num_tokens"], record["level"]), {})[record["seed"]] = record
    levels = [level for level in LEVELS if any(level == key[1] for key in by_point)]
    n_images = sorted({int(r["eval_images"]) for r in records if r.get("eval_images")})
    n_kid = sorted({int(r["rfid_n"]) for r in records if r.get("rfid_n")})
    print(f"sweeps: {sorted({r['sweep_id'] for r in records})}; PSNR/SSIM on N={n_images} validation images, "
          f"rKID/rFID on N={n_kid}\n")
    print("| tokens | caption | seeds | " + " | ".join(title for _, title, _ in METRICS) + " |")
    print("|---|---|---|" + "---|" * len(METRICS))
    for (tokens, level), seeds in sorted(by_point.items(), key=lambda item: (item[0][0], levels.index(item[0][1]))):
        cells = []
        for name, _, fmt in METRICS:
            values = np.array([r[name] for r in seeds.values() if r.get(name) is not None], float)
            spread = f" +- {fmt.format(values.std(ddof=1))}" if len(values) > 1 else ""
            cells.append(fmt.format(values.mean()) + spread if len(values) else "-")
        print(f"| {tokens} | {level} | {len(seeds)} | " + " | ".join(cells) + " |")
    print("\nPaired by seed, each caption level minus a baseline: no text (where measured) and the `class` "
          "caption (95% t-interval; * = excludes 0):\n")
    print("| tokens | caption | baseline | metric | difference | 95% interval | p | n |")
    print("|---|---|---|---|---|---|---|---|")
    for tokens in sorted({key[0] for key in by_point}):
        for baseline in (NO_TEXT, "class"):
            base = by_point.get((tokens, baseline))
            if not base:
                continue
            for level in levels[levels.index(baseline) + 1:]:
                if (tokens, level) not in by_point:
                    continue
                other = by_point[(tokens, level)]
                seeds = sorted(set(base) & set(other))
                if len(seeds) < 2:
                    continue
                for name, title, fmt in METRICS:
                    a = [other[s][name] for s in seeds]
                    b = [base[s][name] for s in seeds]
                    if any(v is None for v in a + b):
                        continue
                    d = paired_difference(a, b)
                    mark = "*" if d.low > 0 or d.high < 0 else ""
                    print(f"| {tokens} | {level} | {baseline} | {title} | {fmt.format(d.mean)}{mark} | "
                          f"[{fmt.format(d.low)}, {fmt.format(d.high)}] | {d.p_value:.3f} | {d.n} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
