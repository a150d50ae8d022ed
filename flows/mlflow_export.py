"""`tok1d export-mlflow [--store S] [--to DIR|URI] [--experiment NAME]`: the store's computed stage
runs, metrics and training curves as MLflow runs (tasks/export/mlflow.py); a rerun adds only new ones."""

from __future__ import annotations

import argparse
import sys
from typing import Callable


def add_export_mlflow(commands, default_store: str, debug: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `export-mlflow` subcommand's arguments."""
    parser = commands.add_parser(
        "export-mlflow", help="write every computed stage run (config, metrics, training curves, lineage ids) "
                              "as an MLflow run; a rerun adds only new stage runs (needs the mlflow extra)")
    parser.add_argument("--store", default=default_store, help="artifact store directory (default: %(default)s)")
    parser.add_argument("--to", default=None, metavar="DIR|URI",
                        help="an MLflow file store directory or a tracking URI such as sqlite:///mlflow.db "
                             "(default: <store>/mlruns)")
    parser.add_argument("--experiment", default=None, help="MLflow experiment name (default: 'tok1d <store path>')")
    debug(parser)


def export_mlflow_cli(args: argparse.Namespace) -> int:
    from tasks.export.mlflow import MlflowTarget, export_mlflow
    from tasks.store import Store

    from tasks.store import local_root

    root = local_root(args.store)
    if not (root / "lineage").is_dir():  # checked before Store(), which would create the folders
        raise FileNotFoundError(f"no tok1d lineage at {root} (no lineage/ folder); pass --store or set TOK1D_STORE")
    store = Store(root)
    report = export_mlflow(store, MlflowTarget.of(store, args.to, args.experiment))
    print(report.target.tracking_uri)
    replaced = f", {len(report.replaced)} unfinished replaced" if report.replaced else ""
    print(f"experiment {report.target.experiment!r} ({report.experiment_id}): {len(report.exported)} stage runs "
          f"exported, {len(report.skipped)} already there{replaced}", file=sys.stderr)
    return 0
