"""Generator kinds, one module per `train_generator.kind`: the name -> kind table, and the
choice of a kind for a token table (`auto`: the kind whose discrete flag matches the tokens)."""

from __future__ import annotations

from typing import Any

from tasks.config import TrainGeneratorConfig
from tasks.train_generator.kind_names import check_kind
from tasks.train_generator.kinds.base import Generator, GeneratorKind, TokenBatch
from tasks.train_generator.kinds.dit import DiTKind
from tasks.train_generator.kinds.maskgit import MaskGITKind

KINDS: dict[str, GeneratorKind] = {kind.name: kind for kind in (MaskGITKind(), DiTKind())}

_TOKENS = {True: "discrete (VQ)", False: "continuous (KL)"}
_BOTTLENECK = {True: "vq", False: "kl"}


def get_kind(name: str) -> GeneratorKind:
    if name not in KINDS:
        raise ValueError(f"unknown generator kind {name!r}; known: {sorted(KINDS)}")
    return KINDS[name]


def resolve_kind(config: TrainGeneratorConfig, meta: dict[str, Any]) -> GeneratorKind:
    """The configured kind for a token table (tokens.json), or a clear error when it cannot train on it."""
    discrete = bool(meta["discrete"])
    if config.kind == "auto":
        kind = next(k for k in KINDS.values() if k.discrete == discrete)
    else:
        kind = get_kind(config.kind)
    if kind.discrete != discrete:
        fitting = sorted(k.name for k in KINDS.values() if k.discrete == discrete)
        raise ValueError(f"train_generator.kind={kind.name} needs {_TOKENS[kind.discrete]} tokens, but the "
                         f"tokenizer's tokens are {_TOKENS[discrete]}; use kind={' or '.join(fitting)} or auto, or "
                         f"train_tokenizer.model.bottleneck={_BOTTLENECK[kind.discrete]}")
    if config.conditioning == "text" and not kind.supports_text:
        with_text = " or ".join(f"{k.title} (train_tokenizer.model.bottleneck={_BOTTLENECK[k.discrete]})"
                                for k in KINDS.values() if k.supports_text)
        raise ValueError(f"{kind.title} supports only class conditioning; use train_generator.conditioning=class, "
                         f"or text conditioning with {with_text}")
    return kind


__all__ = ["KINDS", "check_kind", "Generator", "GeneratorKind", "TokenBatch", "get_kind", "resolve_kind"]
