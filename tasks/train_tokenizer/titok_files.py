"""Where an official TiTok checkpoint's files are, and their fingerprint for the cache key.

Apart from the import itself (tasks/train_tokenizer/titok.py, torch) because the stage's
fingerprint is computed when a run is planned, and planning a fully cached run imports no torch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from tasks.config import ImportTitokConfig

SETTINGS_NAMES = ("config.json", "config.yaml", "config.yml")
WEIGHTS_NAMES = ("model.safetensors", "pytorch_model.bin")


@dataclass(frozen=True)
class TitokFiles:
    """Where a checkpoint's settings and weights are."""

    settings: Path
    weights: Path


def locate(config: ImportTitokConfig) -> TitokFiles:
    """The settings and weights files `import_titok` names; a clear error when one is missing."""
    if not config.path:
        raise ValueError("train_tokenizer.import_titok.path is not set")
    path = Path(config.path).expanduser().resolve()
    if path.is_dir():
        weights = next((path / n for n in WEIGHTS_NAMES if (path / n).is_file()), None)
        if weights is None:
            raise FileNotFoundError(f"train_tokenizer.import_titok.path: {path} has neither {' nor '.join(WEIGHTS_NAMES)}")
    elif path.is_file():
        if path.suffix not in (".safetensors", ".bin", ".pt", ".pth"):
            raise ValueError(f"train_tokenizer.import_titok.path: {path} is neither a folder nor a .safetensors/.bin "
                             "weights file")
        weights = path
    else:
        raise FileNotFoundError(f"train_tokenizer.import_titok.path: no such file or folder {path}")
    if config.config:
        settings = Path(config.config).expanduser().resolve()
        if not settings.is_file():
            raise FileNotFoundError(f"train_tokenizer.import_titok.config: no such file {settings}")
    else:
        settings = next((weights.parent / n for n in SETTINGS_NAMES if (weights.parent / n).is_file()), None)
        if settings is None:
            raise FileNotFoundError(f"train_tokenizer.import_titok: no {' / '.join(SETTINGS_NAMES)} beside {weights}; "
                                    "name the settings file with import_titok.config (tok1d import-titok --config)")
    return TitokFiles(settings, weights)


def fingerprint(config: ImportTitokConfig) -> str:
    """The checkpoint files' paths, sizes and modification times (a changed file: a new cache key);
    empty when nothing is imported, so a trained tokenizer's key is as before."""
    if not config.path:
        return ""
    try:
        files = locate(config)
    except (OSError, ValueError):
        return "missing"  # the stage run itself says what is wrong
    digest = hashlib.sha256()
    for path in (files.settings, files.weights):
        stat = path.stat()
        digest.update(f"{path}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
