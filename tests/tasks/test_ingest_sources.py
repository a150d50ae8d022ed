"""Image sources: real Fashion-MNIST idx files and Tux Paint stamps, local folders, local HF datasets."""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tasks.config import SourceConfig
from tasks.ingest.sources import SourceError, open_source
from tasks.ingest.sources.fashion_mnist import CLASSES, DEFAULT_DIR, IdxSource
from tasks.ingest.sources.tuxpaint import DEFAULT_DIR as TUXPAINT_DIR

FASHION = Path(DEFAULT_DIR)
TUXPAINT = Path(TUXPAINT_DIR)
needs_fashion = pytest.mark.skipif(
    not (FASHION / "train-images-idx3-ubyte.gz").exists(), reason="Debian package dataset-fashion-mnist not installed"
)
needs_tuxpaint = pytest.mark.skipif(not TUXPAINT.is_dir(), reason="Debian package tuxpaint-stamps-default not installed")


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (6, 4)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def raw_idx(name: str) -> bytes:
    return gzip.decompress((FASHION / name).read_bytes())


# ----------------------------------------------------------------------------- Fashion-MNIST


@needs_fashion
def test_fashion_mnist_idx_order_labels_and_pixels():
    source = open_source(SourceConfig(kind="fashion-mnist"))
    assert isinstance(source, IdxSource)
    assert len(source) == 70_000 and source.classes == CLASSES
    items = list(source.items(59_998, 60_002))  # across the train -> t10k boundary
    assert [item.source for item in items] == [
        "fashion-mnist/train-images-idx3-ubyte.gz#59998",
        "fashion-mnist/train-images-idx3-ubyte.gz#59999",
        "fashion-mnist/t10k-images-idx3-ubyte.gz#0",
        "fashion-mnist/t10k-images-idx3-ubyte.gz#1",
    ]
    train_labels, test_labels = raw_idx("train-labels-idx1-ubyte.gz")[8:], raw_idx("t10k-labels-idx1-ubyte.gz")[8:]
    assert [item.label_id for item in items] == [train_labels[59998], train_labels[59999], test_labels[0], test_labels[1]]
    test_images = raw_idx("t10k-images-idx3-ubyte.gz")
    assert items[2].data == test_images[16 : 16 + 784] and items[2].shape == (28, 28)
    assert len(open_source(SourceConfig(kind="fashion-mnist", max_images=300))) == 300


def write_idx(directory: Path, name: str, magic: int, dims: tuple[int, ...], payload: bytes) -> None:
    header = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in dims)
    (directory / f"{name}.gz").write_bytes(gzip.compress(header + payload))


def fake_fashion_dir(directory: Path, images_magic: int = 0x803, cut: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", 3), ("t10k", 2)):
        pixels = bytes(range(count * 4))
        write_idx(directory, f"{prefix}-images-idx3-ubyte", images_magic, (count, 2, 2), pixels[: len(pixels) - cut])
        write_idx(directory, f"{prefix}-labels-idx1-ubyte", 0x801, (count,), bytes(range(count)))
    return directory


def test_idx_parser_on_small_files(tmp_path):
    source = open_source(SourceConfig(kind="fashion-mnist", path=str(fake_fashion_dir(tmp_path))))
    items = list(source.items(0, len(source)))
    assert len(items) == 5
    assert [item.label_id for item in items] == [0, 1, 2, 0, 1]
    assert items[1].data == bytes([4, 5, 6, 7]) and items[3].data == bytes([0, 1, 2, 3])


def test_idx_wrong_magic_is_a_clear_error(tmp_path):
    with pytest.raises(SourceError, match=r"magic number 0x00000802.*dataset-fashion-mnist"):
        open_source(SourceConfig(kind="fashion-mnist", path=str(fake_fashion_dir(tmp_path, images_magic=0x802))))


def test_idx_truncated_images_file_is_a_clear_error(tmp_path):
    source = open_source(SourceConfig(kind="fashion-mnist", path=str(fake_fashion_dir(tmp_path, cut=3))))
    with pytest.raises(SourceError, match="ends early"):
        list(source.items(0, len(source)))


def test_idx_not_gzip_is_a_clear_error(tmp_path):
    directory = fake_fashion_dir(tmp_path)
    (directory / "train-labels-idx1-ubyte.gz").write_bytes(b"definitely not gzip")
    with pytest.raises(SourceError, match="corrupt Fashion-MNIST file .*train-labels"):
        open_source(SourceConfig(kind="fashion-mnist", path=str(directory)))


def test_fashion_mnist_missing_everywhere_names_package_and_key(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    config = SourceConfig(kind="fashion-mnist", path=str(empty), hf_name=str(tmp_path / "no-such-dataset"))
    with pytest.raises(SourceError) as caught:
        open_source(config)
    assert "dataset-fashion-mnist" in str(caught.value) and "ingest.source.path" in str(caught.value)


@needs_fashion
def test_fashion_mnist_hf_fallback_gives_the_same_ids(tmp_path):
    """Without idx files, Hugging Face's copy (here a local one) is used; ids hash the same pixels."""
    import datasets

    idx = open_source(SourceConfig(kind="fashion-mnist"))
    train = list(idx.items(0, 3))
    test = list(idx.items(60_000, 60_002))

    def split(items):
        images = [Image.fromarray(np.frombuffer(item.data, np.uint8).reshape(28, 28), "L") for item in items]
        features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES)})
        return datasets.Dataset.from_dict({"image": images, "label": [i.label_id for i in items]}, features=features)

    local = tmp_path / "fashion_mnist"
    (local / "data").mkdir(parents=True)
    split(train).to_parquet(str(local / "data" / "train-00000-of-00001.parquet"))
    split(test).to_parquet(str(local / "data" / "test-00000-of-00001.parquet"))
    empty = tmp_path / "no-idx"
    empty.mkdir()
    source = open_source(SourceConfig(kind="fashion-mnist", path=str(empty), hf_name=str(local)))
    assert source.classes == CLASSES and len(source) == 5
    items = list(source.items(0, 5))
    assert [item.label_id for item in items] == [item.label_id for item in train + test]
    assert items[3].source == "fashion_mnist/test#0"

    from tasks.config import IngestConfig
    from tasks.ingest.process import process_item

    config = IngestConfig()
    for hf_item, idx_item in zip(items, train + test):
        _, outcome = process_item(hf_item, config)
        assert outcome.image_id == hashlib.sha256(idx_item.data).hexdigest()


# ----------------------------------------------------------------------------- Tux Paint


@needs_tuxpaint
def test_tuxpaint_listing_classes_captions_and_stamp_variants():
    source = open_source(SourceConfig(kind="tuxpaint"))
    assert len(source.classes) == 17 and source.classes == sorted(source.classes)
    assert {"animals", "vehicles", "symbols", "seasonal"} <= set(source.classes)
    items = {item.source: item for item in source.items(0, len(source))}
    koala = items["animals/marsupials/koala.png"]
    assert koala.caption == "A koala." and source.classes[koala.label_id] == "animals"
    # *_mirror.png shares the stamp's .txt; Tux's cartoon faces have no .txt at all.
    assert items["household/tools/measuring_tape_mirror.png"].caption == "Measuring tape."
    assert items["cartoon/tux/tux-drat.png"].caption is None
    # A stamp shipped as both SVG and PNG counts once: the SVG, which Tux Paint itself shows.
    assert "symbols/shapes/thought_balloon.svg" in items
    assert "symbols/shapes/thought_balloon.png" not in items
    # Captions are first lines only, never the translations that follow.
    assert not any(item.caption and ".utf8=" in item.caption for item in items.values())

    pngs = open_source(SourceConfig(kind="tuxpaint", rasterize_svg=False))
    listed = {item.source for item in pngs.items(0, len(pngs))}
    assert "symbols/shapes/thought_balloon.png" in listed and len(pngs) == len(source)


def test_tuxpaint_missing_folder_names_package(tmp_path):
    with pytest.raises(SourceError, match="tuxpaint-stamps-default.*ingest.source.path"):
        open_source(SourceConfig(kind="tuxpaint", path=str(tmp_path / "nowhere")))


# ----------------------------------------------------------------------------- folder


def test_folder_classes_captions_order_and_filters(tmp_path):
    root = tmp_path / "pets"
    (root / "dog" / "puppies").mkdir(parents=True)
    (root / "cat").mkdir()
    (root / ".hidden").mkdir()
    (root / "empty-class").mkdir()
    (root / "dog" / "b.png").write_bytes(png_bytes((1, 2, 3)))
    (root / "dog" / "b.txt").write_text("A brown\n dog  sitting.\n")
    (root / "dog" / "puppies" / "a.jpg").write_bytes(png_bytes((4, 5, 6)))
    (root / "cat" / "z.webp").write_bytes(b"whatever")
    (root / "cat" / "notes.md").write_text("not an input")
    (root / "cat" / ".DS_Store.png").write_bytes(b"hidden")
    (root / ".hidden" / "x.png").write_bytes(png_bytes((0, 0, 0)))
    (root / "loose.png").write_bytes(png_bytes((9, 9, 9)))

    source = open_source(SourceConfig(kind="folder", path=str(root)))
    assert source.classes == ["cat", "dog", "empty-class"]
    items = list(source.items(0, len(source)))
    assert [item.source for item in items] == ["cat/z.webp", "dog/b.png", "dog/puppies/a.jpg", "loose.png"]
    assert [item.label_id for item in items[:3]] == [0, 1, 1]
    assert items[1].caption == "A brown dog sitting." and items[2].caption is None
    assert items[3].reject is not None and items[3].reject[0] == "no-class"
    assert [i.source for i in open_source(SourceConfig(kind="folder", path=str(root), max_images=2)).items(0, 99)] == [
        "cat/z.webp",
        "dog/b.png",
    ]


def test_folder_never_follows_a_symlink_out_of_the_source(tmp_path):
    from tasks.config import IngestConfig
    from tasks.ingest.fingerprint import source_fingerprint

    secret = tmp_path / "elsewhere"
    secret.mkdir()
    (secret / "private.png").write_bytes(png_bytes((7, 7, 7)))
    root = tmp_path / "pets"
    (root / "dog").mkdir(parents=True)
    (root / "dog" / "a.png").write_bytes(png_bytes((1, 1, 1)))
    (root / "leak").symlink_to(secret, target_is_directory=True)  # a class folder leading out
    (root / "dog" / "stolen.png").symlink_to(secret / "private.png")  # a file leading out
    (root / "alias").symlink_to(root / "dog", target_is_directory=True)  # stays inside: followed once

    source = open_source(SourceConfig(kind="folder", path=str(root)))
    assert source.classes == ["alias", "dog"]
    items = {item.source: item for item in source.items(0, len(source))}
    assert items["leak"].reject[0] == "outside-source" and str(secret) in items["leak"].reject[1]
    assert items["dog/stolen.png"].reject[0] == "outside-source"
    assert items["dog/a.png"].reject is None
    assert not any("private" in name for name in items)

    config = IngestConfig(source=SourceConfig(kind="folder", path=str(root)))
    before = source_fingerprint(config)
    (secret / "private.png").write_bytes(png_bytes((8, 8, 8), (9, 9)))  # outside: not read, not a key
    assert source_fingerprint(config) == before
    inside = root / "cats"
    inside.mkdir()
    (inside / "c.png").write_bytes(png_bytes((3, 3, 3)))
    (root / "dog" / "more").symlink_to(inside, target_is_directory=True)
    keyed = source_fingerprint(config)
    (inside / "c.png").write_bytes(png_bytes((4, 4, 4), (8, 8)))  # a changed image in a linked folder
    assert source_fingerprint(config) != keyed


def test_a_named_pipe_or_an_oversized_file_is_rejected_unread(tmp_path):
    import os

    from tasks.config import IngestConfig
    from tasks.ingest.process import Rejected, process_item

    root = tmp_path / "pets"
    (root / "dog").mkdir(parents=True)
    os.mkfifo(root / "dog" / "pipe.png")  # opening it for reading would block forever
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(noise).save(root / "dog" / "big.png")  # ~3 kB: over the 200-byte limit below
    (root / "dog" / "ok.png").write_bytes(png_bytes((1, 2, 3)))
    source = open_source(SourceConfig(kind="folder", path=str(root)))
    config = IngestConfig(source=SourceConfig(kind="folder", path=str(root)), max_file_bytes=200)
    outcomes = {item.source: process_item(item, config)[1] for item in source.items(0, len(source))}
    assert outcomes["dog/pipe.png"] == Rejected("not-a-file", "a named pipe, socket or device, not a regular file")
    assert isinstance(outcomes["dog/big.png"], Rejected) and outcomes["dog/big.png"].reason == "file-too-large"
    assert not isinstance(outcomes["dog/ok.png"], Rejected)


def test_folder_errors_are_clear(tmp_path):
    with pytest.raises(SourceError, match="needs ingest.source.path"):
        open_source(SourceConfig(kind="folder"))
    with pytest.raises(SourceError, match="is not a folder"):
        open_source(SourceConfig(kind="folder", path=str(tmp_path / "missing")))
    with pytest.raises(SourceError, match="no image files"):
        open_source(SourceConfig(kind="folder", path=str(tmp_path)))


# ----------------------------------------------------------------------------- Hugging Face


def hf_dataset(labels, captions, label_feature=None):
    import datasets

    features = {"image": datasets.Image(), "label": label_feature or datasets.ClassLabel(names=["apple", "pear"])}
    features["text"] = datasets.Value("string")
    images = [Image.new("RGB", (5 + i, 4), (10 * i, 0, 0)) for i in range(len(labels))]
    return datasets.Dataset.from_dict(
        {"image": images, "label": labels, "text": captions}, features=datasets.Features(features)
    )


def test_huggingface_local_parquet_folder(tmp_path):
    directory = tmp_path / "fruit"
    (directory / "data").mkdir(parents=True)
    hf_dataset([1, 0, 1], ["a pear", "  ", None]).to_parquet(str(directory / "data" / "train-00000-of-00001.parquet"))
    config = SourceConfig(kind="huggingface", hf_name=str(directory), hf_caption_column="text")
    source = open_source(config)
    assert source.classes == ["apple", "pear"] and len(source) == 3
    items = list(source.items(0, 3))
    assert [item.label_id for item in items] == [1, 0, 1]
    assert [item.caption for item in items] == ["a pear", None, None]
    assert items[0].source == "fruit/train#0" and items[0].kind == "hf" and items[0].data

    with pytest.raises(SourceError, match="no column.*'caption'"):
        open_source(SourceConfig(kind="huggingface", hf_name=str(directory), hf_caption_column="caption"))


def test_huggingface_save_to_disk_with_string_labels(tmp_path):
    import datasets

    dataset = hf_dataset(["pear", "apple", None], ["x", "y", "z"], label_feature=datasets.Value("string"))
    dataset.save_to_disk(str(tmp_path / "saved"))
    source = open_source(SourceConfig(kind="huggingface", path=str(tmp_path / "saved"), hf_name="fruit"))
    assert source.classes == ["apple", "pear"]  # sorted distinct values -> 0..K-1
    items = list(source.items(0, 3))
    assert [item.label_id for item in items] == [1, 0, None]
    assert items[2].reject is not None and items[2].reject[0] == "no-label"
    assert items[0].source == "fruit/train#0"

    unlabelled = open_source(SourceConfig(kind="huggingface", path=str(tmp_path / "saved"), hf_label_column=None))
    assert unlabelled.classes == ["image"] and {i.label_id for i in unlabelled.items(0, 3)} == {0}


def test_huggingface_needs_a_name():
    with pytest.raises(SourceError, match="hf_name"):
        open_source(SourceConfig(kind="huggingface"))
