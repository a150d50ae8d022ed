"""tok1d's Python API: trained 1D image tokenizers and generators on new images.

    import tok1d
    tokenizer = tok1d.Tokenizer.load("6a9747b9", store="store")   # or an artifact / exported folder
                                                                    # (tok1d.latest("train-tokenizer"): the newest id)
    tokens = tokenizer.encode(images, captions=None)                # PIL / uint8 / float, any size
    images = tokenizer.decode(tokens)                              # list of PIL images
    generator = tok1d.Generator.load("22f72b1d", store="store")
    samples = generator.sample(labels=[0, 1, 2], seed=0)

`Tokenizer` and `HubTokenizer` (the huggingface_hub `PyTorchModelHubMixin` an export loads with)
import torch when first used, not with this package.
"""

from __future__ import annotations

from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tasks.export.hub import HubTokenizer
    from tok1d.generator import Generator
    from tok1d.tokenizer import Tokenizer

__all__ = ["Generator", "HubTokenizer", "Tokenizer", "latest"]

_HOMES = {"Tokenizer": "tok1d.tokenizer", "Generator": "tok1d.generator", "HubTokenizer": "tasks.export.hub"}


def latest(stage: str, store: str | Path | None = None) -> str:
    """The id of `stage`'s newest artifact (e.g. "train-tokenizer", "train-generator") in `store`
    (default $TOK1D_STORE or ./store); torch-free."""
    from tasks.export.artifacts import latest_artifact

    return latest_artifact(stage, store)


def __getattr__(name: str) -> Any:
    # PEP 562: the heavy modules (torch, the models) load on first use of the class.
    if name in _HOMES:
        value = getattr(import_module(_HOMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'tok1d' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
