"""Toy stages for tests of the stage machinery (runner, cache slots, lineage, stores): "first"
writes `resolution` numbers, "second" twice as many as its input has rows. Registered for one
test with `use_stages(monkeypatch, TOY_STAGES)`; CALLS lists the stages that ran."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq

import tasks.registry as registry
from tasks.config import IngestConfig
from tasks.stage import Stage, StageOutput, fixed_inputs
from tasks.store import TableRecord

CALLS: list[str] = []


def _write_numbers(ctx, n: int, name: str) -> StageOutput:
    CALLS.append(ctx.stage)
    pq.write_table(pa.table({"x": list(range(n))}), ctx.output_dir / f"{name}.parquet")
    return StageOutput(tables={name: TableRecord(glob=f"{name}.parquet", rows=n, columns={"x": "int64"})},
                       summary={"count": n})


def _first(ctx):
    return _write_numbers(ctx, ctx.config.resolution, "first")


def _second(ctx):
    return _write_numbers(ctx, ctx.inputs["first"].rows * 2, "second")


def toy_stage(name: str, run, inputs: tuple[str, ...] = (), extra_files: tuple[str, ...] = ()) -> Stage:
    return Stage(name, "toy", IngestConfig, fixed_inputs(*inputs), run, code="tasks.hashing", extra_files=extra_files)


TOY_STAGES = {"first": toy_stage("first", _first), "second": toy_stage("second", _second, ("first",))}


def use_stages(monkeypatch, stages: dict[str, Stage]) -> None:
    for name, stage in stages.items():
        monkeypatch.setitem(registry.stages(), name, stage)
