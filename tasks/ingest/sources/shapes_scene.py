"""What a shapes scene is, and how scene i of a seed is drawn from its own random stream.

A scene is a background colour and 1-8 objects, each in its own cell of a 3x3 grid (so a
caption that names an object's cell names exactly one object). All the randomness of image i
comes from `numpy.random.default_rng([seed, i])`, so an image never depends on how many
images come before it or which worker makes it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tasks.config import ShapesConfig

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star")

# Saturated object colours and neutral backgrounds: the two palettes share no colour, and every
# object colour stands out from every background (a test checks the distances).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "orange": (245, 140, 0),
    "yellow": (240, 220, 20),
    "green": (30, 160, 50),
    "cyan": (0, 200, 220),
    "blue": (30, 60, 220),
    "purple": (140, 40, 190),
    "pink": (250, 120, 200),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light grey": (185, 185, 185),
    "dark grey": (80, 80, 80),
    "black": (10, 10, 10),
}

# Side of an object's bounding box as a fraction of its cell's side.
SIZES: dict[str, float] = {"small": 0.4, "medium": 0.65, "large": 0.9}

GRID = 3
# Cell names in row-major order (index = row * GRID + column), as captions say them.
CELLS = (
    "top left", "top", "top right",
    "left", "centre", "right",
    "bottom left", "bottom", "bottom right",
)  # fmt: skip


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    cell: int  # index into CELLS
    # Shift of the centre from the cell centre, in cell sides (within the cell for its size).
    offset: tuple[float, float]


@dataclass(frozen=True)
class Scene:
    background: str
    objects: tuple[SceneObject, ...]  # sorted by cell: the order captions name them in


def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of image `index`: independent of every other image's."""
    return np.random.default_rng([seed, index])


def sample_scene(config: ShapesConfig, rng: np.random.Generator) -> Scene:
    """One scene; `rng` is left positioned after it (the drawing's noise comes next)."""
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    cells = sorted(int(c) for c in rng.choice(GRID * GRID, size=count, replace=False))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    objects = []
    for cell in cells:
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        size = list(SIZES)[int(rng.integers(len(SIZES)))]
        # Large objects have little room left in their cell: cap the shift so they stay inside.
        reach = min(config.jitter, (1.0 - SIZES[size]) / 2)
        dx, dy = rng.uniform(-reach, reach, size=2) if reach > 0 else (0.0, 0.0)
        objects.append(SceneObject(shape, colour, size, cell, (float(dx), float(dy))))
    return Scene(background, tuple(objects))
