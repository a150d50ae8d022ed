"""`tok1d import-titok PATH`: an official TiTok checkpoint as a train-tokenizer artifact in the store.

It runs the train-tokenizer stage with `train_tokenizer.import_titok` set (tasks/runner.py, no
Prefect needed), so the artifact, its cache record and its lineage rows are the ones a pipeline run
with `--set train_tokenizer.import_titok.path=PATH` writes, and the id printed is the artifact
such a run hands to pretokenize and evaluate.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable


def add_import_titok(commands, default_store: str, debug: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `import-titok` subcommand's arguments."""
    parser = commands.add_parser(
        "import-titok", help="import an official TiTok checkpoint (bytedance/1d-tokenizer, single-stage) as a "
                             "train-tokenizer artifact; prints its id")
    parser.add_argument("path", help="folder with config.json or config.yaml and model.safetensors or "
                                     "pytorch_model.bin, or the weights file")
    parser.add_argument("--config", default=None, help="the settings file, when it is not beside the weights")
    parser.add_argument("--size", dest="sizes", action="append", default=[], metavar="NAME=WIDTH,DEPTH,HEADS",
                        help="a size name beyond TiTok's small/base/large, e.g. tiny=64,2,2 (repeatable)")
    parser.add_argument("--store", default=default_store, help="artifact store directory (default: %(default)s)")
    debug(parser)


def parse_sizes(items: list[str]) -> dict[str, list[int]]:
    """["tiny=64,2,2"] -> {"tiny": [64, 2, 2]}; a clear error for anything else."""
    sizes: dict[str, list[int]] = {}
    for item in items:
        name, _, dims = item.partition("=")
        try:
            values = [int(v) for v in dims.split(",")]
        except ValueError:
            values = []
        if not name or len(values) != 3 or min(values) < 1:
            raise ValueError(f"--size {item!r}: expected NAME=WIDTH,DEPTH,HEADS with positive integers, e.g. tiny=64,2,2")
        sizes[name] = values
    return sizes


def import_titok_cli(args: argparse.Namespace) -> int:
    from tasks import lineage
    from tasks.config import ImportTitokConfig, RuntimeConfig, TrainTokenizerConfig
    from tasks.runner import execute_stage
    from tasks.store import Store

    path = Path(args.path).expanduser().resolve()
    settings = str(Path(args.config).expanduser().resolve()) if args.config else None
    section = TrainTokenizerConfig(import_titok=ImportTitokConfig(path=str(path), config=settings,
                                                                  sizes=parse_sizes(args.sizes)))
    store = Store(args.store)
    lineage.ensure_database(store)
    result = execute_stage("train-tokenizer", section, {}, store, RuntimeConfig(device="cpu"))
    manifest = result.manifest
    print(manifest.artifact_id)
    print(f"train-tokenizer/{manifest.artifact_id} ({'cached' if result.cache_hit else 'imported'}): "
          f"{store.root / manifest.root}\nuse it in a run with --set train_tokenizer.import_titok.path={path}",
          file=sys.stderr)
    return 0
