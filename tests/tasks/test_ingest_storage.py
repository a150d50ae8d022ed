"""Stored encodings (ingest.storage): source bytes kept only when nothing would change them, the
codecs, the per-image format in the table, the reader decoding by it, and the config checks."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tasks.config import ConfigError, IngestConfig, SourceConfig, StorageConfig
from tasks.ingest.read import decode_images, decode_stored
from tasks.ingest.stage import run_ingest
from tasks.presets import load_config

from builders.ingest_run import artifact_bytes, make_ctx, read_dir, smooth

RES = 16



def save(path: Path, image: Image.Image, fmt: str, **options) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format=fmt, **options)
    return path.read_bytes()


@pytest.fixture
def photos(tmp_path) -> Path:
    """An ImageFolder (class subfolders, upper-case .JPEG as in ImageNet) of inputs that can and
    cannot keep their bytes at 16 px."""
    root = tmp_path / "photos"
    a, b = root / "n01", root / "n02"
    save(a / "a_rgb16.JPEG", Image.fromarray(smooth(1, RES, RES)), "JPEG", quality=90)  # kept
    save(a / "b_big.jpg", Image.fromarray(smooth(2, 40, 28)), "JPEG", quality=90)  # resized + cropped
    save(a / "c_grey16.jpg", Image.fromarray(smooth(3, RES, RES)[..., 0]), "JPEG")  # mode L: converted
    rotated = Image.fromarray(smooth(4, RES, RES))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    save(a / "d_rotated16.jpg", rotated, "JPEG", exif=exif.tobytes())
    save(b / "e_rgb16.png", Image.fromarray(smooth(5, RES, RES)), "PNG")  # kept
    rgba = np.dstack([smooth(6, RES, RES), np.full((RES, RES), 128, np.uint8)])
    save(b / "f_rgba16.png", Image.fromarray(rgba, "RGBA"), "PNG")  # alpha: composited on white
    save(b / "g_rgb16.webp", Image.fromarray(smooth(7, RES, RES)), "WEBP", quality=90)  # kept
    save(b / "h_wide.png", Image.fromarray(smooth(8, 20, 50)), "PNG")  # lossless source, resized
    return root


def ingest(tmp_path: Path, root: Path, policy: str, work: str, threads: int | None = None, **storage):
    config = IngestConfig(source=SourceConfig(kind="folder", path=str(root)), resolution=RES, shard_rows=3,
                          storage=StorageConfig(policy=policy, **storage))
    ctx = make_ctx(tmp_path, config, work=work, threads=threads)
    output = run_ingest(ctx)
    return ctx, output, {row["source"]: row for row in read_dir(ctx.output_dir / "images").to_pylist()}


KEPT = {"n01/a_rgb16.JPEG": "jpeg", "n02/e_rgb16.png": "png", "n02/g_rgb16.webp": "webp"}


def test_source_policy_keeps_bytes_only_when_nothing_changes(tmp_path, photos):
    _, png_output, as_png = ingest(tmp_path, photos, "png", "png")
    _, output, rows = ingest(tmp_path, photos, "source", "source")
    assert set(rows) == set(as_png) and len(rows) == 8
    for name, row in rows.items():
        if name in KEPT:
            assert row["kept_source"] and row["image_format"] == KEPT[name]
            assert row["image"] == (photos / name).read_bytes()
        else:  # resize, crop, grey -> RGB, EXIF rotation, alpha: PNG of the processed pixels
            assert not row["kept_source"] and row["image_format"] == "png"
            assert row["image"] == as_png[name]["image"]
        assert row["image_id"] == hashlib.sha256((photos / name).read_bytes()).hexdigest()
        # Kept or not, the reader gives exactly the pixels the png policy stores.
        assert np.array_equal(decode_stored(row["image"], row["image_format"]), decode_stored(as_png[name]["image"]))
    assert all(row["image_format"] == "png" and not row["kept_source"] for row in as_png.values())
    # Per stored format (kept bytes count under their own format), and how many are kept.
    assert output.summary["stored_source"] == 3 and output.summary["stored_png"] == 6
    assert output.summary["stored_jpeg"] == 1 and output.summary["stored_webp"] == 1
    assert output.summary["storage_policy"] == "source" and png_output.summary["stored_source"] == 0
    # The rotated file is stored upright: its 16x16 pixels transposed, not as the file holds them.
    stored = decode_stored(rows["n01/d_rotated16.jpg"]["image"])
    assert np.array_equal(stored, np.asarray(Image.open(photos / "n01/d_rotated16.jpg").transpose(Image.Transpose.ROTATE_270)))


def test_auto_reencodes_lossy_sources_as_jpeg_and_lossless_ones_as_png(tmp_path, photos):
    _, output, rows = ingest(tmp_path, photos, "auto", "auto", quality=90)
    formats = {name: (row["image_format"], row["kept_source"]) for name, row in rows.items()}
    assert formats == {
        "n01/a_rgb16.JPEG": ("jpeg", True),
        "n01/b_big.jpg": ("jpeg", False),
        "n01/c_grey16.jpg": ("jpeg", False),
        "n01/d_rotated16.jpg": ("jpeg", False),
        "n02/e_rgb16.png": ("png", True),
        "n02/f_rgba16.png": ("png", False),
        "n02/g_rgb16.webp": ("webp", True),
        "n02/h_wide.png": ("png", False),
    }
    assert output.summary["stored_jpeg"] == 4 and output.summary["stored_source"] == 3


@pytest.mark.parametrize("codec", ["jpeg", "webp"])
def test_lossy_codecs_store_close_pixels_in_fewer_bytes(tmp_path, photos, codec):
    _, _, as_png = ingest(tmp_path, photos, "png", "png")
    _, output, rows = ingest(tmp_path, photos, codec, codec, quality=95)
    assert output.summary[f"stored_{codec}"] == 8 and output.summary["stored_source"] == 0
    for name, row in rows.items():
        assert row["image_format"] == codec and not row["kept_source"]
        assert Image.open(io.BytesIO(row["image"])).format == codec.upper()
        decoded, exact = decode_stored(row["image"], codec), decode_stored(as_png[name]["image"])
        assert decoded.shape == (RES, RES, 3)
        assert np.abs(decoded.astype(int) - exact).mean() < 6, name
    assert decode_images([row["image"] for row in rows.values()]).shape == (8, 3, RES, RES)


def test_jpeg_policy_with_two_workers_gives_the_same_artifact(tmp_path, photos):
    one, _, _ = ingest(tmp_path, photos, "jpeg", "one")
    two, _, _ = ingest(tmp_path, photos, "jpeg", "two", threads=2)
    assert artifact_bytes(one.output_dir) == artifact_bytes(two.output_dir)
    # One row group per ROW_GROUP_ROWS rows, written as the shard fills.
    assert pq.ParquetFile(next((one.output_dir / "images").glob("*.parquet"))).metadata.num_row_groups == 1


def test_decode_stored_names_bad_input():
    with pytest.raises(ValueError, match="not PNG, JPEG or WebP"):
        decode_stored(b"GIF89a....")
    with pytest.raises(ValueError, match="unknown stored image format 'gif'"):
        decode_stored(b"\x89PNG\r\n\x1a\n", "gif")


@pytest.mark.parametrize(
    "override, message",
    [
        ("ingest.storage.policy=gif", r"ingest\.storage\.policy"),
        ("ingest.storage.quality=0", r"ingest\.storage\.quality: .*within \[1, 100\]"),
        ("ingest.storage.qualty=90", r"ingest\.storage\.qualty: unknown key"),
    ],
)
def test_storage_settings_are_checked_when_the_config_loads(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", [override])
    config = load_config("smoke", ["ingest.storage.policy=auto", "ingest.storage.quality=90"])
    assert (config.ingest.storage.policy, config.ingest.storage.quality) == ("auto", 90)
    assert load_config("smoke", []).ingest.storage.policy == "png"  # today's artifacts by default
