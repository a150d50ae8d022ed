"""Writing a trained run's files into the stage's output folder, each atomically.

Every file is written under a temporary name and renamed into place, so a kill during export
never leaves a half-written weights file that looks whole to a rerun or a reader.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from tasks.store import temporary_path


def save_weights(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """A state dict as a safetensors file (CPU, contiguous: safetensors refuses shared storage)."""
    tmp = temporary_path(path)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)


def copy_file(source: Path, target: Path) -> None:
    """`source` copied to `target` (e.g. the loss log from the work folder into the output)."""
    tmp = temporary_path(target)
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
