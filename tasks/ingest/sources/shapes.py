"""Procedural captioned scenes of coloured shapes (`ingest.source.kind: shapes`).

A controlled dataset where a caption carries real information about its image: which shapes,
in which colours and sizes, in which cells of a 3x3 grid, on which background. Reconstruction
with few tokens must recover exactly those facts, so text-conditioned tokenizers (TexTok) can
be compared with plain ones at caption levels that say more or less (`caption_level`).

Images are drawn on the fly, never stored by the source: item i is a pure function of
(seed, i), the class is the object count (see shapes_caption.py).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from tasks.config import SourceConfig
from tasks.ingest.sources.base import Item, Source
from tasks.ingest.sources.shapes_caption import caption, class_name
from tasks.config import ShapesConfig
from tasks.ingest.sources.shapes_draw import render
from tasks.ingest.sources.shapes_scene import Scene, sample_scene, scene_rng


def draw(config: ShapesConfig, index: int) -> tuple[Scene, np.ndarray]:
    """Scene `index` of `config.seed` and its pixels [resolution, resolution, 3] uint8."""
    rng = scene_rng(config.seed, index)
    scene = sample_scene(config, rng)
    return scene, render(scene, config, rng)


class ShapesSource(Source):
    """`num_images` scenes in index order; label = object count - min_objects."""

    def __init__(self, config: ShapesConfig, max_images: int | None):
        self.config = config
        self.classes = [class_name(n) for n in range(config.min_objects, config.max_objects + 1)]
        self.description = (
            f"shapes seed {config.seed}: {config.num_images} scenes at {config.resolution}x{config.resolution}, "
            f"{config.min_objects}-{config.max_objects} objects, {config.caption_level} captions"
        )
        super().__init__(config.num_images, max_images)

    def _items(self, start: int, stop: int) -> Iterator[Item]:
        for index in range(start, stop):
            scene, pixels = draw(self.config, index)
            yield Item(
                source=f"shapes/{self.config.seed}#{index}",
                label_id=len(scene.objects) - self.config.min_objects,
                caption=caption(scene, self.config.caption_level),
                kind="pixels",
                data=pixels.tobytes(),
                shape=pixels.shape,
            )


def open_shapes(config: SourceConfig) -> Source:
    return ShapesSource(config.shapes, config.max_images)
