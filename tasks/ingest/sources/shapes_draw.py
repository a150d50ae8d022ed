"""A shapes scene -> RGB pixels: filled polygons drawn large, box-filtered down, optional noise."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

from tasks.config import ShapesConfig
from tasks.ingest.sources.shapes_scene import BACKGROUNDS, COLOURS, GRID, SIZES, Scene, SceneObject

# Width of a cross's bars, as a fraction of its bounding box.
CROSS_BAR = 0.36
# Inner radius of the five-pointed star, as a fraction of its outer radius.
STAR_INNER = 0.45

Point = tuple[float, float]


def outline(shape: str, cx: float, cy: float, r: float) -> list[Point]:
    """The polygon of `shape` centred at (cx, cy) inside a box of half-side r (circle excepted)."""
    if shape == "square":
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        b = r * CROSS_BAR
        return [
            (cx - b, cy - r), (cx + b, cy - r), (cx + b, cy - b), (cx + r, cy - b),
            (cx + r, cy + b), (cx + b, cy + b), (cx + b, cy + r), (cx - b, cy + r),
            (cx - b, cy + b), (cx - r, cy + b), (cx - r, cy - b), (cx - b, cy - b),
        ]  # fmt: skip
    if shape == "star":
        points = []
        for k in range(10):  # alternate outer and inner vertices, the first pointing up
            radius = r if k % 2 == 0 else r * STAR_INNER
            angle = -math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy + radius * math.sin(angle)))
        return points
    raise ValueError(f"no outline for shape {shape!r}")


def _draw_object(draw: ImageDraw.ImageDraw, obj: SceneObject, cell_side: float) -> None:
    row, column = divmod(obj.cell, GRID)
    cx = (column + 0.5 + obj.offset[0]) * cell_side
    cy = (row + 0.5 + obj.offset[1]) * cell_side
    r = SIZES[obj.size] * cell_side / 2
    colour = COLOURS[obj.colour]
    if obj.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    else:
        draw.polygon(outline(obj.shape, cx, cy, r), fill=colour)


def render(scene: Scene, config: ShapesConfig, rng: np.random.Generator) -> np.ndarray:
    """[resolution, resolution, 3] uint8 pixels of `scene`; `rng` supplies the pixel noise."""
    side = config.resolution * config.supersample
    image = Image.new("RGB", (side, side), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        _draw_object(draw, obj, side / GRID)
    # PIL draws without antialiasing; averaging supersample^2 blocks gives clean edges.
    pixels = np.asarray(image.reduce(config.supersample) if config.supersample > 1 else image)
    if config.noise_std > 0:
        noise = rng.normal(0.0, config.noise_std, size=pixels.shape)
        pixels = np.clip(np.rint(pixels + noise), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(pixels)
