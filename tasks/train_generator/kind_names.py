"""The names of the generator kinds and the config check that needs only them, without torch.

The kinds themselves (tasks/train_generator/kinds, `KINDS`) build torch models, and checking
`train_generator.kind` happens when a config loads, which must not import torch (`tok1d status`,
a fully cached run). tests/tasks/test_train_generator.py ties these names to `KINDS`' keys, so a
new kind goes in both.
"""

from __future__ import annotations

from tasks.config import TrainGeneratorConfig

KIND_NAMES: tuple[str, ...] = ("maskgit", "dit")


def check_kind(config: TrainGeneratorConfig) -> None:
    """A clear error for a `train_generator.kind` that is neither auto nor in the table."""
    if config.kind != "auto" and config.kind not in KIND_NAMES:
        raise ValueError(f"train_generator.kind: unknown kind {config.kind!r}; known: auto, {', '.join(sorted(KIND_NAMES))}")
