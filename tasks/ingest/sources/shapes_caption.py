"""Captions of a shapes scene at three levels of detail, worded from exactly what was drawn.

    class     "three objects"  (the object count: also the scene's class name, so
              class-conditional generation and the class caption agree)
    short     "a red circle, a blue square and a green star"
    detailed  "on a dark grey background: a small red circle in the top left, a large blue
              square in the centre and a medium green star at the bottom"

Objects are named in grid-cell order (row by row), so one scene always gets one wording. The
longest detailed caption (8 objects, every phrase at its longest) is 70 words, within the
75 words TexTok captions are limited to.
"""

from __future__ import annotations

from tasks.config import MAX_OBJECTS
from tasks.ingest.sources.shapes_scene import CELLS, Scene, SceneObject

NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight")
assert len(NUMBERS) == MAX_OBJECTS

# Where an object is, as a phrase that reads naturally after the object ("a red circle ...").
PLACES = {
    "top left": "in the top left",
    "top": "at the top",
    "top right": "in the top right",
    "left": "on the left",
    "centre": "in the centre",
    "right": "on the right",
    "bottom left": "in the bottom left",
    "bottom": "at the bottom",
    "bottom right": "in the bottom right",
}
assert set(PLACES) == set(CELLS)


def class_name(count: int) -> str:
    """The class of a scene with `count` objects: "one object", "two objects", ..."""
    return f"{NUMBERS[count - 1]} object" + ("s" if count > 1 else "")


def _listing(phrases: list[str]) -> str:
    """"a", "a and b", "a, b and c"."""
    if len(phrases) == 1:
        return phrases[0]
    return ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _article(words: str) -> str:
    """"an orange star", "a red star": the article the first word needs."""
    return ("an " if words[0] in "aeiou" else "a ") + words


def _short(obj: SceneObject) -> str:
    return _article(f"{obj.colour} {obj.shape}")


def _detailed(obj: SceneObject) -> str:
    return _article(f"{obj.size} {obj.colour} {obj.shape}") + " " + PLACES[CELLS[obj.cell]]


def caption(scene: Scene, level: str) -> str:
    """The caption of `scene` at `level` (class, short or detailed)."""
    if level == "class":
        return class_name(len(scene.objects))
    if level == "short":
        return _listing([_short(obj) for obj in scene.objects])
    if level == "detailed":
        return f"on a {scene.background} background: " + _listing([_detailed(obj) for obj in scene.objects])
    raise ValueError(f"unknown caption level {level!r}; expected class, short or detailed")
