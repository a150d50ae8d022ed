"""`tok1d export ARTIFACT DIR [--push REPO]`: a train-tokenizer artifact as a Hugging Face-style
folder (tasks/export/folder.py), optionally uploaded to the hub (tasks/export/push.py)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable


def add_export(commands, default_store: str, debug: Callable[[argparse.ArgumentParser], None]) -> None:
    """The `export` subcommand's arguments."""
    parser = commands.add_parser(
        "export", help="write a tokenizer as a Hugging Face-style folder (config.json, model.safetensors, README.md "
                       "model card from the lineage database); loads with tok1d.Tokenizer.from_pretrained(DIR)")
    parser.add_argument("artifact", help="train-tokenizer artifact id (a unique prefix will do) or its folder")
    parser.add_argument("directory", help="the folder to write (new or empty)")
    parser.add_argument("--push", metavar="REPO", default=None,
                        help="then upload it to this hub model repo (NAMESPACE/NAME); needs a token (HF_TOKEN or "
                             "`hf auth login`), the network and HF_HUB_OFFLINE=0")
    parser.add_argument("--private", action="store_true", help="with --push: create the repo private")
    parser.add_argument("--store", default=default_store, help="artifact store directory (default: %(default)s)")
    debug(parser)


def export_cli(args: argparse.Namespace) -> int:
    if args.push and os.environ.get("HF_HUB_OFFLINE") == "1":
        # tok1d runs offline unless told otherwise (flows/cli.py); pushing is the one exception.
        raise RuntimeError("--push needs the network: HF_HUB_OFFLINE=1 (tok1d's default); run with HF_HUB_OFFLINE=0")
    from tasks.export.artifacts import find_artifact
    from tasks.export.folder import export_tokenizer

    manifest, store = find_artifact(args.artifact, "train-tokenizer", args.store)
    directory = export_tokenizer(manifest, store, Path(args.directory))
    print(directory)
    print(f"train-tokenizer/{manifest.artifact_id} exported to {directory}", file=sys.stderr)
    if args.push:
        from tasks.export.push import push_folder

        print(f"uploaded to {push_folder(directory, args.push, private=args.private)}", file=sys.stderr)
    return 0
