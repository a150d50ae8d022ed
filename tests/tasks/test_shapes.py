"""The procedural `shapes` source: determinism, scenes within bounds, captions that state what
was drawn (read back from the pixels), and the source run through the real ingest stage."""

from __future__ import annotations

import colorsys
import hashlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from tasks.config import IngestConfig, RuntimeConfig, SourceConfig
from tasks.ingest.read import decode_stored
from tasks.ingest.sources import open_source
from tasks.ingest.sources.shapes import ShapesSource, draw
from tasks.ingest.sources.shapes_caption import caption, class_name
from tasks.config import MAX_OBJECTS, ShapesConfig
from tasks.ingest.sources.shapes_scene import BACKGROUNDS, COLOURS, GRID, SIZES, Scene, SceneObject
from tasks.ingest.stage import run_ingest
from tasks.stage import StageContext
from tasks.store import Store

# Where each place phrase is, written out here rather than read from the module under test.
PLACE_CELLS = {
    "in the top left": 0, "at the top": 1, "in the top right": 2,
    "on the left": 3, "in the centre": 4, "on the right": 5,
    "in the bottom left": 6, "at the bottom": 7, "in the bottom right": 8,
}  # fmt: skip
# "a large red circle in the top left", in the order the detailed caption names objects.
OBJECT_PHRASE = re.compile(
    rf"an? ({'|'.join(SIZES)}) ({'|'.join(COLOURS)}) (\w+) ({'|'.join(sorted(PLACE_CELLS, key=len, reverse=True))})"
)
# Hue (degrees) each colour name means.
HUES = {"red": 0, "orange": 33, "yellow": 55, "green": 128, "cyan": 185, "blue": 230, "purple": 282, "pink": 322}
PALETTE = {**COLOURS, **BACKGROUNDS}


def nearest_colour(pixel: np.ndarray) -> str:
    """The palette name (object or background colour) closest to an RGB pixel."""
    return min(PALETTE, key=lambda name: float(np.sum((pixel.astype(float) - PALETTE[name]) ** 2)))


def cell_centre(pixels: np.ndarray, cell: int) -> np.ndarray:
    row, column = divmod(cell, GRID)
    side = pixels.shape[0] / GRID
    return pixels[int((row + 0.5) * side), int((column + 0.5) * side)]


def scenes(config: ShapesConfig, count: int) -> list[tuple[Scene, np.ndarray]]:
    return [draw(config, index) for index in range(count)]


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_bytes_other_seed_differs():
    config = ShapesConfig(num_images=40)
    first = [pixels.tobytes() for _, pixels in scenes(config, 40)]
    assert first == [pixels.tobytes() for _, pixels in scenes(config, 40)]
    other = [pixels.tobytes() for _, pixels in scenes(ShapesConfig(num_images=40, seed=1), 40)]
    assert all(a != b for a, b in zip(first, other))
    assert len(set(first)) == 40  # 40 different pictures, not one repeated


def test_image_i_depends_only_on_seed_and_i():
    source = ShapesSource(ShapesConfig(num_images=30, noise_std=5.0), max_images=None)
    whole = list(source.items(0, 30))
    middle = list(source.items(12, 17))
    assert [(i.source, i.data, i.caption, i.label_id) for i in middle] == [
        (i.source, i.data, i.caption, i.label_id) for i in whole[12:17]
    ]
    assert [item.source for item in middle] == [f"shapes/0#{index}" for index in range(12, 17)]
    # A longer dataset of the same seed starts with the same images.
    longer = ShapesSource(ShapesConfig(num_images=300, noise_std=5.0), max_images=None)
    assert [item.data for item in longer.items(0, 30)] == [item.data for item in whole]


def test_noise_is_deterministic_and_off_at_zero():
    clean = ShapesConfig()
    noisy = ShapesConfig(noise_std=10.0)
    scene, plain = draw(clean, 3)
    same_scene, grainy = draw(noisy, 3)
    assert same_scene == scene  # noise is drawn after the scene: it never changes the layout
    assert np.array_equal(grainy, draw(noisy, 3)[1])
    difference = grainy.astype(float) - plain
    assert 7.0 < difference.std() < 12.0
    empty = [cell for cell in range(GRID * GRID) if cell not in {obj.cell for obj in scene.objects}]
    assert tuple(cell_centre(plain, empty[0])) == BACKGROUNDS[scene.background]


# ----------------------------------------------------------------------------- scenes


def test_object_counts_within_bounds_one_per_cell_and_labels():
    config = ShapesConfig(num_images=300, min_objects=2, max_objects=5)
    source = ShapesSource(config, max_images=None)
    assert source.classes == ["two objects", "three objects", "four objects", "five objects"]
    counts = []
    for (scene, _), item in zip(scenes(config, 300), source.items(0, 300)):
        cells = [obj.cell for obj in scene.objects]
        assert cells == sorted(set(cells)), "one object per cell, named in cell order"
        counts.append(len(cells))
        assert source.classes[item.label_id] == class_name(len(cells))
    assert set(counts) == {2, 3, 4, 5}


def test_palette_colours_look_like_their_names():
    for name, rgb in COLOURS.items():
        hue, lightness, saturation = colorsys.rgb_to_hls(*(c / 255 for c in rgb))
        off = abs((hue * 360 - HUES[name] + 180) % 360 - 180)
        assert off < 20 and saturation > 0.6, (name, rgb)
    for name, rgb in BACKGROUNDS.items():
        assert max(rgb) - min(rgb) < 10, f"background {name} should be neutral"
    lightness = [sum(rgb) for rgb in BACKGROUNDS.values()]
    assert list(BACKGROUNDS) == ["white", "light grey", "dark grey", "black"] and lightness == sorted(lightness, reverse=True)


def test_background_is_never_an_object_colour():
    assert not set(BACKGROUNDS) & set(COLOURS)
    # Far apart in RGB as well as in name: an object never blends into its background.
    gaps = [np.abs(np.subtract(c, b)).max() for c in COLOURS.values() for b in BACKGROUNDS.values()]
    assert min(gaps) >= 60
    for scene, _ in scenes(ShapesConfig(max_objects=MAX_OBJECTS), 200):
        assert scene.background in BACKGROUNDS
        assert all(obj.colour in COLOURS for obj in scene.objects)


@pytest.mark.parametrize("resolution", [32, 64])
def test_resolutions_and_objects_inside_their_cells(resolution):
    config = ShapesConfig(resolution=resolution, jitter=0.5)
    for scene, pixels in scenes(config, 50):
        assert pixels.shape == (resolution, resolution, 3) and pixels.dtype == np.uint8
        occupied = {obj.cell for obj in scene.objects}
        background = np.array(BACKGROUNDS[scene.background])
        side = resolution / GRID
        for cell in set(range(GRID * GRID)) - occupied:
            row, column = divmod(cell, GRID)
            # The inner part of an empty cell is pure background: no neighbour spills into it.
            top, left = int(row * side) + 1, int(column * side) + 1
            block = pixels[top : int((row + 1) * side) - 1, left : int((column + 1) * side) - 1]
            assert (block == background).all()


# ----------------------------------------------------------------------------- captions


def test_detailed_caption_states_what_was_drawn():
    """Read the caption alone, then check the picture: every named large object has its colour at
    its cell's centre, every cell the caption leaves out shows the named background."""
    config = ShapesConfig(num_images=150, caption_level="detailed")
    checked = 0
    for scene, pixels in scenes(config, 150):
        text = caption(scene, "detailed")
        background = re.match(r"on an? (.+?) background: ", text).group(1)
        named = OBJECT_PHRASE.findall(text)
        assert len(named) == len(scene.objects)
        named_cells = [PLACE_CELLS[place] for _, _, _, place in named]
        assert named_cells == sorted(named_cells)
        for size, colour, shape, place in named:
            if size == "large":
                assert nearest_colour(cell_centre(pixels, PLACE_CELLS[place])) == colour, text
                checked += 1
        for cell in set(range(GRID * GRID)) - set(named_cells):
            assert nearest_colour(cell_centre(pixels, cell)) == background, text
        assert [(s, c, sh) for s, c, sh, _ in named] == [(o.size, o.colour, o.shape) for o in scene.objects]
    assert checked > 50


# Filled share of an object's bounding box, by shape (squares come out a little over 1: the
# box of 19.2 pixels is drawn on whole pixels).
COVERAGE = {"square": 1.0, "circle": np.pi / 4, "cross": 0.62, "diamond": 0.5, "star": 0.33}


def shape_of(mask: np.ndarray, box: float) -> str:
    """Which shape a filled mask is: a triangle (apex up) has a quarter of its area in its top
    half, a diamond half; the others differ in how much of their box they fill."""
    if mask[: mask.shape[0] // 2].sum() / mask.sum() < 0.35:
        return "triangle"
    return min(COVERAGE, key=lambda shape: abs(mask.sum() / box - COVERAGE[shape]))


def test_shapes_are_drawn_as_named():
    config = ShapesConfig(resolution=64, jitter=0.0)
    side = 64 / GRID
    seen = set()
    for scene, pixels in scenes(config, 120):
        for obj in scene.objects:
            if obj.size != "large":
                continue
            row, column = divmod(obj.cell, GRID)
            block = pixels[round(row * side) : round((row + 1) * side), round(column * side) : round((column + 1) * side)]
            mask = np.array([[nearest_colour(p) == obj.colour for p in line] for line in block])
            assert shape_of(mask, (SIZES["large"] * side) ** 2) == obj.shape, obj
            seen.add(obj.shape)
    assert seen == {"triangle", *COVERAGE}


def test_short_and_class_captions():
    scene = Scene(
        "white",
        (
            SceneObject("circle", "red", "small", 0, (0.0, 0.0)),
            SceneObject("square", "orange", "large", 4, (0.0, 0.0)),
            SceneObject("star", "green", "medium", 7, (0.0, 0.0)),
        ),
    )
    assert caption(scene, "class") == "three objects"
    assert caption(scene, "short") == "a red circle, an orange square and a green star"
    assert caption(scene, "detailed") == (
        "on a white background: a small red circle in the top left, a large orange square in the "
        "centre and a medium green star at the bottom"
    )
    one = Scene("black", (SceneObject("cross", "blue", "large", 5, (0.0, 0.0)),))
    assert (caption(one, "class"), caption(one, "short")) == ("one object", "a blue cross")
    assert caption(one, "detailed") == "on a black background: a large blue cross on the right"


def test_captions_stay_within_75_words():
    longest = Scene(
        "light grey",
        tuple(SceneObject("triangle", "purple", "medium", cell, (0.0, 0.0)) for cell in range(MAX_OBJECTS)),
    )
    assert len(caption(longest, "detailed").split()) <= 75
    for scene, _ in scenes(ShapesConfig(min_objects=MAX_OBJECTS, max_objects=MAX_OBJECTS), 50):
        assert len(caption(scene, "detailed").split()) <= 75


def test_config_rejects_bad_values():
    for bad in ({"min_objects": 0}, {"max_objects": MAX_OBJECTS + 1}, {"min_objects": 3, "max_objects": 2},
                {"jitter": 0.6}, {"noise_std": -1.0}, {"resolution": 8}, {"num_images": 0}):
        with pytest.raises(ValidationError, match=next(iter(bad))):
            ShapesConfig(**bad)
    with pytest.raises(ValidationError):
        ShapesConfig(caption_level="long")


# ----------------------------------------------------------------------------- ingest


def test_ingest_stage_stores_the_drawn_pixels_captions_and_labels(tmp_path):
    shapes = ShapesConfig(num_images=60, max_objects=3, caption_level="short", noise_std=4.0)
    config = IngestConfig(source=SourceConfig(kind="shapes", shapes=shapes), resolution=32, shard_rows=25)
    assert len(open_source(SourceConfig(kind="shapes", shapes=shapes, max_images=10))) == 10
    ctx = StageContext(
        stage="ingest", config=config, inputs={}, store=Store(tmp_path / "store"),
        runtime=RuntimeConfig(), cache_key="k" * 64, work_dir=tmp_path / "work",
    )
    output = run_ingest(ctx)
    images = pa.concat_tables(pq.read_table(p) for p in sorted((ctx.output_dir / "images").glob("*.parquet")))
    assert output.summary["images"] == images.num_rows == 60 and output.summary["shards"] == 3
    assert output.summary["classes"] == 3
    for index, row in enumerate(images.to_pylist()):
        scene, pixels = draw(shapes, index)
        assert row["source"] == f"shapes/0#{index}"
        assert np.array_equal(decode_stored(row["image"]), pixels)  # stored losslessly, not resampled
        assert row["image_id"] == hashlib.sha256(pixels.tobytes()).hexdigest()
        assert row["source_caption"] == caption(scene, "short")
        assert row["label_name"] == class_name(len(scene.objects)) and row["label_id"] == len(scene.objects) - 1
    classes = pa.concat_tables(pq.read_table(p) for p in (ctx.output_dir / "classes").glob("*.parquet"))
    assert classes.column("label_name").to_pylist() == ["one object", "two objects", "three objects"]
