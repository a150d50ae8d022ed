"""ImageNet-shaped sources: WebDataset tar shards and streamed Hugging Face datasets, through
the real ingest stage (one and two worker processes give the same artifact)."""

from __future__ import annotations

import gzip
import hashlib
import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tasks.config import IngestConfig, SourceConfig, StorageConfig
from tasks.ingest.fingerprint import source_fingerprint
from tasks.ingest.read import decode_stored
from tasks.ingest.sources import SourceError, open_source
from tasks.ingest.stage import run_ingest

from builders.ingest_run import artifact_bytes, make_ctx, read_dir, smooth

RES = 16


def jpeg(seed: int, height: int = RES, width: int = RES) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(smooth(seed, height, width)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def shards(tmp_path) -> Path:
    """Two shards (listed out of order on purpose) of ImageNet-style samples, plus bad ones."""
    root = tmp_path / "wds"
    write_tar(root / "train-000001.tar", [
        ("s10.jpg", jpeg(10, 30, 20)), ("s10.cls", b"1"),
        ("s11.jpg", jpeg(11)), ("s11.cls", b"0"), ("s11.txt", b"  a small\n red thing "),
        ("s12.cls", b"1"), ("s12.txt", b"no image here"),  # missing-image
        ("s13.jpg", jpeg(13)), ("s13.cls", b"cat"),  # not a class number
    ])  # fmt: skip
    write_tar(root / "train-000000.tar", [
        ("dir/s00.cls", b"2"), ("dir/s00.jpg", jpeg(0)), ("dir/s00.seg.png", b"ignored"),
        ("s01.png", b"\x89PNG\r\n\x1a\nbroken"), ("s01.cls", b"0"),  # corrupt image
        ("s02.webp", b"x"), ("s02.jpg", jpeg(2, 40, 40)), ("s02.cls", b"1"),  # jpg preferred
        ("s03.jpg", jpeg(10, 30, 20)), ("s03.cls", b"0"),  # same bytes as s10: duplicate
    ])  # fmt: skip
    (root / "notes.md").write_text("not a shard")
    return root


def wds_config(root: Path, **overrides) -> IngestConfig:
    values = dict(source=SourceConfig(kind="webdataset", path=str(root)), resolution=RES, shard_rows=3,
                  val_fraction=0.3, storage=StorageConfig(policy="auto"))
    values.update(overrides)
    return IngestConfig(**values)


def test_webdataset_ingest_end_to_end(tmp_path, shards):
    source = open_source(wds_config(shards).source)
    assert source.classes == ["0", "1", "2"] and len(source) == 8
    items = list(source.items(0, 8))
    assert [item.source for item in items] == [
        "train-000000.tar/dir/s00.jpg", "train-000000.tar/s01.png", "train-000000.tar/s02.jpg",
        "train-000000.tar/s03.jpg", "train-000001.tar/s10.jpg", "train-000001.tar/s11.jpg",
        "train-000001.tar/s12", "train-000001.tar/s13.jpg",
    ]  # fmt: skip
    assert [item.label_id for item in items] == [2, 0, 1, 0, 1, 0, None, None]
    assert items[5].caption == "a small red thing" and items[0].caption is None
    assert items[6].reject[0] == "missing-image" and items[7].reject[0] == "no-label"

    serial = make_ctx(tmp_path, wds_config(shards), work="serial")
    output = run_ingest(serial)
    images = read_dir(serial.output_dir / "images")
    assert images.column("source").to_pylist() == [items[i].source for i in (0, 2, 3, 5)]
    assert images.column("label_name").to_pylist() == ["2", "1", "0", "0"]
    rejects = dict(zip(*(read_dir(serial.output_dir / "rejects").column(c).to_pylist() for c in ("source", "reason"))))
    assert rejects == {
        "train-000000.tar/s01.png": "corrupt",
        "train-000001.tar/s10.jpg": "duplicate",
        "train-000001.tar/s12": "missing-image",
        "train-000001.tar/s13.jpg": "no-label",
    }
    rows = {row["source"]: row for row in images.to_pylist()}
    first = rows["train-000000.tar/dir/s00.jpg"]
    assert first["image_id"] == hashlib.sha256(jpeg(0)).hexdigest()
    assert first["kept_source"] and first["image"] == jpeg(0)  # 16x16 RGB JPEG: the member's own bytes
    resized = rows["train-000000.tar/s02.jpg"]
    assert (resized["image_format"], resized["kept_source"]) == ("jpeg", False)
    assert (resized["orig_width"], resized["orig_height"]) == (40, 40)
    assert decode_stored(resized["image"]).shape == (RES, RES, 3)
    assert output.summary["images"] == 4 and output.summary["stored_source"] == 2

    pooled = make_ctx(tmp_path, wds_config(shards), work="pooled", threads=2)
    run_ingest(pooled)
    assert artifact_bytes(pooled.output_dir) == artifact_bytes(serial.output_dir)


def test_webdataset_class_names_file_limit_and_unlabelled(tmp_path, shards):
    (shards / "classes.txt").write_text("tench\ngoldfish\nshark\n")
    source = open_source(wds_config(shards, source=SourceConfig(kind="webdataset", path=str(shards), max_images=2)).source)
    assert source.classes == ["tench", "goldfish", "shark"] and len(source) == 2

    plain = tmp_path / "plain.tar"
    write_tar(plain, [("a.jpg", jpeg(1)), ("b.jpg", jpeg(2)), ("b.txt", b"two")])
    source = open_source(SourceConfig(kind="webdataset", path=str(plain)))
    assert source.classes == ["image"]
    assert [(i.source, i.label_id, i.caption) for i in source.items(0, 2)] == [
        ("plain.tar/a.jpg", 0, None), ("plain.tar/b.jpg", 0, "two")]
    # The cache key follows the one shard's contents.
    before = source_fingerprint(IngestConfig(source=SourceConfig(kind="webdataset", path=str(plain))))
    write_tar(plain, [("a.jpg", jpeg(1)), ("b.jpg", jpeg(3)), ("b.txt", b"three")])
    assert source_fingerprint(IngestConfig(source=SourceConfig(kind="webdataset", path=str(plain)))) != before


def test_webdataset_errors_are_clear(tmp_path):
    with pytest.raises(SourceError, match="needs ingest.source.path"):
        open_source(SourceConfig(kind="webdataset"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SourceError, match="no .tar shards"):
        open_source(SourceConfig(kind="webdataset", path=str(tmp_path / "empty")))
    write_tar(tmp_path / "x.tar", [("a.jpg", jpeg(1))])
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "x.tar").write_bytes(gzip.compress((tmp_path / "x.tar").read_bytes()))
    with pytest.raises(SourceError, match="uncompressed .tar"):
        open_source(SourceConfig(kind="webdataset", path=str(tmp_path / "gz")))


# ------------------------------------------------------------------- streamed Hugging Face


def parquet_dataset(directory: Path, label_feature=None) -> None:
    import datasets

    labels = [1, 0, 1, 0, 1] if label_feature is None else ["pear", "apple", "pear", "apple", "pear"]
    features = datasets.Features({
        "image": datasets.Image(),
        "label": label_feature or datasets.ClassLabel(names=["apple", "pear"]),
        "text": datasets.Value("string"),
    })  # fmt: skip
    rows = {
        "image": [{"bytes": jpeg(20 + i, 24 if i % 2 else RES, RES), "path": None} for i in range(5)],
        "label": labels,
        "text": [f"fruit {i}" for i in range(5)],
    }
    (directory / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(directory / "data" / "train-00000-of-00001.parquet"))


def hf_config(directory: Path, **source) -> IngestConfig:
    return IngestConfig(
        source=SourceConfig(kind="huggingface", hf_name=str(directory), hf_caption_column="text", **source),
        resolution=RES, shard_rows=2, storage=StorageConfig(policy="source"),
    )


def test_streamed_dataset_gives_the_same_artifact_as_the_mapped_one(tmp_path):
    directory = tmp_path / "fruit"
    parquet_dataset(directory)
    mapped = make_ctx(tmp_path, hf_config(directory), work="mapped")
    run_ingest(mapped)
    streamed = make_ctx(tmp_path, hf_config(directory, hf_streaming=True, max_images=5), work="streamed")
    output = run_ingest(streamed)
    assert output.summary["images"] == 5 and output.summary["shards"] == 3
    assert artifact_bytes(streamed.output_dir) == artifact_bytes(mapped.output_dir)
    images = read_dir(streamed.output_dir / "images")
    assert images.column("source").to_pylist() == [f"fruit/train#{i}" for i in range(5)]
    assert images.column("kept_source").to_pylist() == [True, False, True, False, True]
    assert images.column("source_caption").to_pylist() == [f"fruit {i}" for i in range(5)]

    # A slice from the middle (what a resumed run reads) is the same rows.
    source = open_source(hf_config(directory, hf_streaming=True, max_images=5).source)
    assert [item.source for item in source.items(3, 5)] == ["fruit/train#3", "fruit/train#4"]
    assert [item.label_id for item in source.items(1, 3)] == [0, 1]


def test_streamed_dataset_string_labels_and_unknown_length(tmp_path):
    import datasets

    directory = tmp_path / "fruit"
    parquet_dataset(directory, label_feature=datasets.Value("string"))
    source = open_source(hf_config(directory, hf_streaming=True, max_images=4).source)
    assert source.classes == ["apple", "pear"] and len(source) == 4
    assert [item.label_id for item in source.items(0, 4)] == [1, 0, 1, 0]
    with pytest.raises(SourceError, match="set ingest.source.max_images"):
        open_source(hf_config(directory, hf_streaming=True).source)
