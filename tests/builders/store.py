"""Committing test artifacts through the real store, with fixed test hashes."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from tasks.stage import StageContext, StageOutput
from tasks.store import Manifest, Store, TableRecord

CONFIG_HASH, CACHE_KEY, CODE_VERSION = "h" * 64, "k" * 64, "test"


def work_folder(store: Store) -> Path:
    """A fresh folder in the store's work area for a builder to write an artifact into."""
    return Path(tempfile.mkdtemp(dir=store.root / "work"))


def commit_folder(store: Store, stage: str, folder: Path, tables: dict[str, TableRecord],
                  summary: dict[str, Any] | None = None, config_hash: str = CONFIG_HASH) -> Manifest:
    """Move a written artifact folder into the store as `stage`'s output (Store.commit_artifact)."""
    return store.commit_artifact(stage, folder, tables=tables, config_hash=config_hash, cache_key=CACHE_KEY,
                                 code_version=CODE_VERSION, summary=summary or {})


def commit_output(store: Store, ctx: StageContext, output: StageOutput, config_hash: str = CONFIG_HASH) -> Manifest:
    """Commit a stage run's output folder as execute_stage would, with fixed test hashes."""
    return commit_folder(store, ctx.stage, ctx.output_dir, output.tables, output.summary, config_hash)
