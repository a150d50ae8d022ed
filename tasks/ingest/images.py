"""Robust image decoding for ingest: bytes -> RGB uint8 array, or `ImageRejected` with a reason.

Every way an input can be unusable maps to a short reason string that ends up in the rejects
table (and as `rejected_<reason>` in the stage summary):

    empty-file    zero bytes
    not-an-image  Pillow recognises no image format (e.g. a text file named .png)
    truncated     the file ends before the image data does
    corrupt       the file starts like an image but its header or data cannot be decoded
    too-large     more pixels than `max_image_pixels` (Pillow's decompression-bomb guard)
    bad-svg       an SVG that cairosvg cannot parse or render
    unsupported-mode  a pixel format with no sensible RGB meaning

and, before any byte is read (tasks/ingest/process.py, tasks/ingest/sources/folder.py):

    not-a-file      a named pipe, socket or device (reading could block forever)
    file-too-large  more bytes than `ingest.max_file_bytes`
    outside-source  a symlink leading out of the source folder (never followed)
    unreadable      the operating system refused to read it
"""

from __future__ import annotations

import io
import math
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

WHITE = (255, 255, 255)

# Leading bytes of formats people put in image folders; used to tell a damaged image from a
# file that is not an image at all.
_SIGNATURES = {
    b"\x89PNG\r\n\x1a\n": "PNG",
    b"\xff\xd8\xff": "JPEG",
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"BM": "BMP",
}


class ImageRejected(Exception):
    """An input that cannot become a training image; `reason` is a short stable key."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _signature(data: bytes) -> str | None:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, name in _SIGNATURES.items():
        if data.startswith(magic):
            return name
    return None


def _failure(error: BaseException) -> str:
    """Pillow reports a file that ends early as EOFError or an error mentioning truncation."""
    return "truncated" if isinstance(error, EOFError) or "truncated" in str(error).lower() else "corrupt"


@contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's decompression-bomb limit set to `max_pixels`, its warning raised as an error.

    Both are process-wide settings; ingest decodes in one thread per process, and restores them.
    """
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


@dataclass(frozen=True)
class SourceInfo:
    """What storage needs to know about a decoded source file to keep its bytes as they are."""

    format: str | None  # Pillow's format name: "JPEG", "PNG", "WEBP", ...
    # The file decodes straight to these RGB pixels: mode RGB, one frame, no transparency, no
    # EXIF rotation (nothing `to_rgb` or `exif_transpose` would change).
    as_is: bool


def _orientation(image: Image.Image) -> int | None:
    try:
        return image.getexif().get(0x0112)
    except Exception:  # a damaged EXIF block: exif_transpose fails too, and keeps the pixels
        return None


def _as_is(image: Image.Image) -> bool:
    return (
        image.mode == "RGB"
        and "transparency" not in image.info
        and getattr(image, "n_frames", 1) == 1
        and _orientation(image) in (None, 1)
    )


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Open and fully decode encoded image bytes (first frame), applying the EXIF orientation."""
    return open_image_info(data, max_pixels)[0]


def open_image_info(data: bytes, max_pixels: int) -> tuple[Image.Image, SourceInfo]:
    """`open_image`, and what the file was before any orientation was applied."""
    if not data:
        raise ImageRejected("empty-file", "the file has zero bytes")
    try:
        with _pixel_limit(max_pixels):
            try:
                image = Image.open(io.BytesIO(data))
            except UnidentifiedImageError as error:
                kind = _signature(data)
                if kind is None:
                    raise ImageRejected("not-an-image", f"no image format recognised ({len(data)} bytes)") from error
                raise ImageRejected(
                    "corrupt", f"starts like a {kind} file but its header cannot be read (damaged or cut short)"
                ) from error
            except (OSError, SyntaxError, ValueError, EOFError) as error:
                raise ImageRejected(_failure(error), f"cannot read the image header: {error}") from error
            try:
                image.load()
            except (OSError, SyntaxError, ValueError, EOFError) as error:
                raise ImageRejected(_failure(error), f"{image.format} data cannot be decoded: {error}") from error
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise ImageRejected("too-large", f"{error} (raise ingest.max_image_pixels to accept it)") from error
    info = SourceInfo(image.format, _as_is(image))
    try:
        return ImageOps.exif_transpose(image), info
    except Exception:  # a damaged EXIF block: the pixels are fine, keep them as stored
        return image, info


def _composite_on_white(image: Image.Image) -> np.ndarray:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, WHITE + (255,))
    return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))


def _scale_to_uint8(values: np.ndarray) -> np.ndarray:
    """High-bit-depth grey levels -> 0..255 by scaling, keeping the tonal range (never clipping)."""
    is_float = values.dtype.kind == "f"
    values = values.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    if is_float or low < 0 or high > 65535:
        # Float or unusual integer data: no known full scale, so stretch what is there.
        if low < 0.0 or high > 1.0:
            values = (values - low) / (high - low) if high > low else np.zeros_like(values)
        values = values * 255.0
    else:
        values = values / 257.0  # 16-bit full scale 65535 -> 255
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def to_rgb(image: Image.Image) -> np.ndarray:
    """A decoded Pillow image -> [H, W, 3] uint8 RGB; transparency is composited on white."""
    mode = image.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info):
        return _composite_on_white(image)
    if mode in ("RGB", "L", "1", "P", "CMYK", "YCbCr", "LAB", "HSV"):
        return np.asarray(image.convert("RGB"))
    if mode.startswith("I") or mode == "F":
        grey = _scale_to_uint8(np.asarray(image))
        return np.repeat(grey[..., None], 3, axis=2)
    try:
        return np.asarray(image.convert("RGB"))
    except (ValueError, OSError) as error:
        raise ImageRejected("unsupported-mode", f"pixel mode {mode} has no RGB conversion: {error}") from error


def decode_image(data: bytes, max_pixels: int) -> np.ndarray:
    """Encoded image bytes -> [H, W, 3] uint8 RGB (upright, alpha on white); raises ImageRejected."""
    return to_rgb(open_image(data, max_pixels))


def decode_image_info(data: bytes, max_pixels: int) -> tuple[np.ndarray, SourceInfo]:
    """`decode_image`, and what the source file was (for keeping its bytes)."""
    image, info = open_image_info(data, max_pixels)
    return to_rgb(image), info


# ------------------------------------------------------------------------------------ SVG


def svg_size(data: bytes) -> tuple[float, float]:
    """The natural size of an SVG in pixels (width/height attributes, else its viewBox)."""
    from cairosvg.helpers import node_format

    tree = _svg_tree(data)
    # node_format only needs the unit context of a surface; no rendering happens here.
    units = types.SimpleNamespace(dpi=96, context_width=None, context_height=None, font_size=16.0)
    width, height, _ = node_format(units, tree)
    return float(width), float(height)


def _svg_tree(data: bytes, **kwargs):
    from cairosvg.parser import Tree
    from cairosvg.url import safe_fetch
    from defusedxml import EntitiesForbidden

    try:
        return Tree(bytestring=data, **kwargs)
    except EntitiesForbidden:
        # Illustrator exports declare internal entities (<!ENTITY ns_svg "...">). Parse them,
        # still without fetching anything outside the file (expat limits entity expansion).
        return Tree(bytestring=data, unsafe=True, url_fetcher=safe_fetch, **kwargs)


def rasterize_svg(data: bytes, min_side: int, max_pixels: int) -> tuple[bytes, tuple[int, int]]:
    """Render an SVG to PNG bytes whose shorter side is about `min_side` pixels.

    Returns the PNG and the SVG's natural size (width, height), rounded to whole pixels.
    """
    from cairosvg.surface import PNGSurface

    if not data:
        raise ImageRejected("empty-file", "the file has zero bytes")
    try:
        width, height = svg_size(data)
    except Exception as error:
        raise ImageRejected("bad-svg", f"cannot parse the SVG: {type(error).__name__}: {error}") from error
    if not (width > 0 and height > 0 and math.isfinite(width * height)):
        raise ImageRejected("bad-svg", f"the SVG has no usable size (width={width}, height={height})")
    scale = min(min_side / min(width, height), math.sqrt(max_pixels / (width * height)))
    out_w, out_h = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    try:
        tree = _svg_tree(data)
        output = io.BytesIO()
        surface = PNGSurface(tree, output, 96, output_width=out_w, output_height=out_h)
        surface.finish()
    except Exception as error:
        raise ImageRejected("bad-svg", f"cannot render the SVG: {type(error).__name__}: {error}") from error
    return output.getvalue(), (max(1, round(width)), max(1, round(height)))


# ------------------------------------------------------------------------------ resizing


def resize_square(rgb: np.ndarray, resolution: int, fit: Literal["center-crop", "pad"]) -> Image.Image:
    """[H, W, 3] uint8 -> a resolution x resolution RGB image (centre crop, or white padding)."""
    image = Image.fromarray(rgb, "RGB")
    width, height = image.size
    size = (resolution, resolution)
    if fit == "center-crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        return image.resize(size, Image.Resampling.LANCZOS, box=(left, top, left + side, top + side), reducing_gap=3.0)
    if fit == "pad":
        # Resize the whole image into the square first, then pad: the same picture as padding
        # first, without allocating a huge square canvas for very elongated inputs.
        scale = resolution / max(width, height)
        inner = (max(1, round(width * scale)), max(1, round(height * scale)))
        canvas = Image.new("RGB", size, WHITE)
        canvas.paste(
            image.resize(inner, Image.Resampling.LANCZOS, reducing_gap=3.0),
            ((resolution - inner[0]) // 2, (resolution - inner[1]) // 2),
        )
        return canvas
    raise ValueError(f"unknown fit {fit!r}; expected 'center-crop' or 'pad'")


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
