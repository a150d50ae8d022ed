"""`tok1d export`'s folder: a train-tokenizer artifact as a Hugging Face-style model folder.

    config.json         the TokenizerSpec (tasks/export/spec.py): network config, token shape,
                        preprocessing, text encoder, lineage ids
    model.safetensors   the EMA weights (a byte copy of the artifact's tokenizer.safetensors)
    README.md           the model card (tasks/export/card.py)

It loads with `tasks.export.hub.HubTokenizer.from_pretrained(DIR)` and `tok1d.Tokenizer.load(DIR)`.
The folder is written beside its target and renamed into place: a kill leaves no half export.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from tasks.export.card import card_facts, render_card
from tasks.export.spec import spec_from_store
from tasks.store import Manifest, Store
from tasks.training.export import copy_file

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"  # huggingface_hub's constants.SAFETENSORS_SINGLE_FILE
CARD_FILE = "README.md"
EMA_WEIGHTS = "tokenizer.safetensors"  # tasks/train_tokenizer/read.py EMA_WEIGHTS (that module imports torch)


def export_tokenizer(manifest: Manifest, store: Store, directory: Path) -> Path:
    """Write the export of `manifest` to `directory` (which must be new or empty); returns it."""
    directory = directory.expanduser().resolve()
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise FileExistsError(f"{directory} exists and is not an empty folder; export into a new folder")
    spec = spec_from_store(manifest, store)
    card = render_card(spec, card_facts(manifest, store))
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        (staging / CONFIG_FILE).write_text(json.dumps(spec.to_json(), indent=2, sort_keys=True) + "\n")
        copy_file(manifest.path(store, EMA_WEIGHTS), staging / WEIGHTS_FILE)
        (staging / CARD_FILE).write_text(card)
        staging.chmod(0o755)  # mkdtemp makes it private; an export is meant to be shared
        if directory.exists():
            directory.rmdir()
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory
