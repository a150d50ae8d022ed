"""What evaluate samples: balanced class labels, and a caption per sample from its class's pool.

The tokens themselves come from `Generator.sample` (tasks/train_generator/read.py), whose kind
follows its paper's guidance convention with the one `guidance_scale` of SamplingConfig.
"""

from __future__ import annotations

import numpy as np


def balanced_labels(num_samples: int, num_classes: int) -> np.ndarray:
    """0, 1, ..., K-1, 0, 1, ...: every class gets num_samples // K samples (the first ones one more)."""
    if num_samples < 1:
        raise ValueError(f"evaluate.num_samples must be >= 1, got {num_samples}")
    return np.arange(num_samples, dtype=np.int64) % max(1, num_classes)


def draw_captions(labels: np.ndarray, pool: dict[int, list[tuple[str, str]]], seed: int) -> list[tuple[str, str]]:
    """One (caption_id, caption) per sample from its class's pool, as TexTok does for class-
    conditional generation with a text-conditioned detokenizer. Deterministic in `seed`."""
    missing = sorted({int(label) for label in labels} - {label for label, entries in pool.items() if entries})
    if missing:
        raise ValueError(f"the caption pool has no captions for class(es) {missing}; the caption stage must "
                         "give every class a pool (caption.backend=label, dataset or gemini)")
    rng = np.random.default_rng([seed, 0x7E7])
    picks = rng.random(len(labels))
    return [pool[int(label)][int(pick * len(pool[int(label)]))] for label, pick in zip(labels, picks)]
