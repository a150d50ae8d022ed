"""Decoding of real (Pillow-written) good and bad image files, SVG rasterising, square resizing."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tasks.ingest.images import (
    ImageRejected,
    decode_image,
    encode_png,
    rasterize_svg,
    resize_square,
)

MAX_PIXELS = 64_000_000


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def noise(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), "RGB")


def reason_of(data: bytes, max_pixels: int = MAX_PIXELS) -> str:
    with pytest.raises(ImageRejected) as caught:
        decode_image(data, max_pixels)
    assert caught.value.detail  # every rejection says what was wrong
    return caught.value.reason


# ----------------------------------------------------------------------------- bad inputs


def test_zero_byte_file_is_empty():
    assert reason_of(b"") == "empty-file"


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file(fmt):
    data = encode(noise(64, 64), fmt)
    assert reason_of(data[: len(data) // 2]) == "truncated"


def test_png_cut_inside_its_header_is_corrupt_not_unknown():
    data = encode(noise(64, 64), "PNG")
    assert reason_of(data[:40]) == "corrupt"


def test_text_file_named_png_is_not_an_image(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("this is a shopping list, not a picture\n")
    assert reason_of(path.read_bytes()) == "not-an-image"


@pytest.mark.parametrize("max_pixels", [300, 100])  # 400 pixels: warning range, then error range
def test_decompression_bomb_is_too_large_and_limit_restored(max_pixels):
    before = Image.MAX_IMAGE_PIXELS
    data = encode(noise(20, 20), "PNG")
    assert reason_of(data, max_pixels=max_pixels) == "too-large"
    assert Image.MAX_IMAGE_PIXELS == before
    assert decode_image(data, 400).shape == (20, 20, 3)  # at the limit: accepted


# ----------------------------------------------------------------------------- pixel formats


def test_cmyk_jpeg_becomes_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # no cyan/black, full magenta+yellow = red
    rgb = decode_image(encode(cmyk, "JPEG", quality=95), MAX_PIXELS)
    assert rgb.shape == (16, 16, 3) and rgb.dtype == np.uint8
    assert np.abs(rgb.astype(int) - [255, 0, 0]).max() <= 8


def test_16bit_grey_png_is_scaled_not_clipped():
    values = (np.arange(256, dtype=np.uint32) * 257).astype(np.uint16).reshape(16, 16)
    values[0, 0], values[0, 1] = 1000, 65535
    image = Image.fromarray(values)
    data = encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    rgb = decode_image(data, MAX_PIXELS)
    expected = (values >> 8).astype(int)
    assert np.abs(rgb[..., 0].astype(int) - expected).max() <= 1
    assert (rgb[..., 0] == rgb[..., 2]).all()
    assert rgb[0, 0, 0] in (3, 4) and rgb[0, 1, 0] == 255  # clipping would give 255 for both


def test_palette_png_with_transparency_composited_on_white():
    image = Image.new("P", (8, 8), 0)
    image.putpalette([10, 20, 30, 200, 0, 0] + [0] * (254 * 3))
    image.paste(1, (0, 0, 4, 8))  # left half: palette index 1 (red), right half index 0
    data = encode(image, "PNG", transparency=0)  # index 0 is fully transparent
    rgb = decode_image(data, MAX_PIXELS)
    assert (rgb[:, :4] == [200, 0, 0]).all()
    assert (rgb[:, 4:] == 255).all()  # transparent -> white, not the palette's (10, 20, 30)


def test_rgba_and_la_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:2, :, 3] = 255  # top: opaque red
    rgba[2:, :, 3] = 128  # bottom: half-transparent red
    rgb = decode_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"), MAX_PIXELS)
    assert (rgb[:2] == [255, 0, 0]).all()
    assert np.abs(rgb[2:].astype(int) - [255, 127, 127]).max() <= 1

    la = Image.fromarray(np.dstack([np.zeros((4, 4), np.uint8), np.full((4, 4), 0, np.uint8)]), "LA")
    assert (decode_image(encode(la, "PNG"), MAX_PIXELS) == 255).all()  # transparent black -> white


def test_exif_orientation_is_applied():
    stored = np.zeros((20, 40, 3), np.uint8)  # wide: left half red, right half blue
    stored[:, :20] = [255, 0, 0]
    stored[:, 20:] = [0, 0, 255]
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    data = encode(Image.fromarray(stored), "JPEG", quality=95, exif=exif.tobytes())
    rgb = decode_image(data, MAX_PIXELS)
    assert rgb.shape == (40, 20, 3)  # displayed upright: tall
    top, bottom = rgb[:15].reshape(-1, 3).mean(0), rgb[25:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60  # the stored left side (red) is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_grey_and_bilevel_images_become_rgb():
    grey = Image.fromarray(np.full((5, 7), 77, np.uint8), "L")
    assert (decode_image(encode(grey, "PNG"), MAX_PIXELS) == 77).all()
    bilevel = Image.new("1", (6, 6), 1)
    assert (decode_image(encode(bilevel, "PNG"), MAX_PIXELS) == 255).all()


# ----------------------------------------------------------------------------- SVG

SVG = b"""<svg xmlns="http://www.w3.org/2000/svg" width="200" height="100">
<rect x="0" y="0" width="100" height="100" fill="#ff0000"/>
<rect x="100" y="0" width="100" height="100" fill="#0000ff"/></svg>"""

# Illustrator writes internal entities; cairosvg's safe mode refuses them, we must not.
SVG_WITH_ENTITIES = b"""<?xml version="1.0"?>
<!DOCTYPE svg PUBLIC "-//W3C//DTD SVG 1.1//EN" "http://www.w3.org/Graphics/SVG/1.1/DTD/svg11.dtd" [
  <!ENTITY ns_svg "http://www.w3.org/2000/svg">
]>
<svg xmlns="&ns_svg;" viewBox="0 0 50 50"><circle cx="25" cy="25" r="25" fill="#00ff00"/></svg>"""


def test_svg_rasterised_at_requested_size_with_natural_size():
    png, natural = rasterize_svg(SVG, min_side=64, max_pixels=MAX_PIXELS)
    assert natural == (200, 100)
    rgb = decode_image(png, MAX_PIXELS)
    assert rgb.shape == (64, 128, 3)
    assert (rgb[:, :60] == [255, 0, 0]).all() and (rgb[:, 68:] == [0, 0, 255]).all()


def test_svg_with_entities_and_transparent_background():
    png, natural = rasterize_svg(SVG_WITH_ENTITIES, min_side=50, max_pixels=MAX_PIXELS)
    assert natural == (50, 50)
    rgb = decode_image(png, MAX_PIXELS)
    assert (rgb[25, 25] == [0, 255, 0]).all()
    assert (rgb[0, 0] == 255).all()  # outside the circle: transparent -> white


@pytest.mark.parametrize("data", [b"<svg><rect", b"<svg xmlns='http://www.w3.org/2000/svg'/>"])
def test_broken_svg_is_rejected(data):
    with pytest.raises(ImageRejected) as caught:
        rasterize_svg(data, min_side=32, max_pixels=MAX_PIXELS)
    assert caught.value.reason == "bad-svg"


def test_svg_render_size_respects_pixel_limit():
    png, _ = rasterize_svg(SVG, min_side=1000, max_pixels=5000)
    width, height = Image.open(io.BytesIO(png)).size
    assert width * height <= 5000 * 1.05 and width == 2 * height


# ----------------------------------------------------------------------------- resizing


def test_center_crop_keeps_the_centre():
    wide = np.full((10, 30, 3), 255, np.uint8)
    wide[:, 10:20] = 0  # black centre square, white sides
    out = np.asarray(resize_square(wide, 8, "center-crop"))
    assert out.shape == (8, 8, 3) and out.max() < 40


def test_pad_keeps_everything_on_white():
    wide = np.zeros((10, 30, 3), np.uint8)  # all black, 3:1
    out = np.asarray(resize_square(wide, 30, "pad"))
    assert out.shape == (30, 30, 3)
    assert (out[:9] == 255).all() and (out[21:] == 255).all()  # white bars above and below
    assert out[11:19].max() < 10  # the black picture in the middle


def test_upscaling_and_png_roundtrip():
    small = np.asarray(noise(28, 28))
    image = resize_square(small, 32, "center-crop")
    data = encode_png(image)
    back = np.asarray(Image.open(io.BytesIO(data)))
    assert back.shape == (32, 32, 3) and back.dtype == np.uint8
