"""Training checkpoints: tensors in safetensors, everything else in JSON, written atomically.

A checkpoint is a folder `step-XXXXXXXX/` written under a temporary name and renamed, and the
`latest` file naming it is replaced atomically afterwards, so a kill at any moment leaves either
the previous checkpoint or the new one, never a half one. Nothing is loaded with pickle.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from tasks.store import atomic_write_text

LATEST = "latest"


def flatten_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state_dict as (tensors for safetensors, the rest for JSON)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param_id, values in state["state"].items():
        for name, value in values.items():
            key = f"{param_id}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value.detach().cpu().contiguous()
            else:
                scalars[key] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        param_id, name = key.split(".", 1)
        state.setdefault(int(param_id), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = state
    numpy_state = np.random.get_state()
    meta = {
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "python": _jsonable(random.getstate()),
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda_states and torch.cuda.is_available() and len(cuda_states) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_states)
    kind, keys, *rest = meta["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(_tupled(meta["python"]))


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


def _tupled(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_tupled(v) for v in value)
    return value


class CheckpointDir:
    """The checkpoints of one training run, in `<work_dir>/checkpoints`."""

    def __init__(self, directory: Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    def latest(self) -> Path | None:
        pointer = self.directory / LATEST
        if not pointer.exists():
            return None
        path = self.directory / pointer.read_text().strip()
        return path if (path / "state.json").exists() else None

    def save(
        self,
        step: int,
        modules: dict[str, torch.nn.Module | dict[str, torch.Tensor]],
        optimizers: dict[str, torch.optim.Optimizer],
        state: dict[str, Any],
    ) -> Path:
        name = f"step-{step:08d}"
        final = self.directory / name
        tmp = self.directory / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for key, module in modules.items():
            tensors = module.state_dict() if isinstance(module, torch.nn.Module) else module
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / f"{key}.safetensors")
        optimizer_meta = {}
        for key, optimizer in optimizers.items():
            tensors, meta = flatten_optimizer_state(optimizer.state_dict())
            save_file(tensors, tmp / f"optimizer-{key}.safetensors")
            optimizer_meta[key] = meta
        rng_tensors, rng_meta = rng_state()
        save_file(rng_tensors, tmp / "rng.safetensors")
        payload = {"step": step, "optimizers": optimizer_meta, "rng": rng_meta, **state}
        (tmp / "state.json").write_text(json.dumps(payload))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(self.directory / LATEST, name)
        self._prune(keep_name=name)
        return final

    def _prune(self, keep_name: str) -> None:
        checkpoints = sorted(p for p in self.directory.glob("step-*") if p.is_dir())
        for old in checkpoints[: -self.keep]:
            if old.name != keep_name:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def load(
        path: Path,
        modules: dict[str, torch.nn.Module],
        optimizers: dict[str, torch.optim.Optimizer],
        map_location: str | torch.device = "cpu",
    ) -> dict[str, Any]:
        """Restore modules, optimizers and RNG states; returns the JSON state."""
        state = json.loads((path / "state.json").read_text())
        for key, module in modules.items():
            module.load_state_dict(load_file(path / f"{key}.safetensors", device=str(map_location)))
        for key, optimizer in optimizers.items():
            tensors = load_file(path / f"optimizer-{key}.safetensors", device=str(map_location))
            optimizer.load_state_dict(unflatten_optimizer_state(tensors, state["optimizers"][key]))
        restore_rng_state(load_file(path / "rng.safetensors"), state["rng"])
        return state
