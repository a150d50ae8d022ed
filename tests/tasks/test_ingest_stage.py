"""The ingest stage end to end: rejects, summary, determinism, resume after a kill, readers."""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

import tasks.ingest.shard as ingest_shard
from tasks.config import IngestConfig, SourceConfig
from tasks.ingest.read import class_names, decode_stored, image_table, iter_image_batches
from tasks.ingest.sources.fashion_mnist import CLASSES, DEFAULT_DIR as FASHION_DIR
from tasks.ingest.sources.tuxpaint import DEFAULT_DIR as TUXPAINT_DIR
from tasks.ingest.stage import run_ingest, split_of
from tasks.ingest.tables import part_path, write_parquet
from tasks.shards import plan_range_shards

from builders.ingest_run import artifact_bytes, make_ctx, read_dir
from builders.store import commit_output

IMAGE_COLUMNS = {
    "image_id": "string",
    "split": "string",
    "label_id": "int32",
    "label_name": "string",
    "source_caption": "string",
    "source": "string",
    "orig_width": "int32",
    "orig_height": "int32",
    "image": "binary",
    "image_format": "string",
    "kept_source": "bool",
}



def encoded(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def picture(seed: int, height: int = 24, width: int = 36) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


@pytest.fixture
def folder(tmp_path) -> Path:
    """Two classes of good images plus one of every kind of bad input.

    Sorted order (shard_rows=3): cat/a..c | cat/d..f | dog/g..i | dog/j..
    """
    root = tmp_path / "animals"
    cat, dog = root / "cat", root / "dog"
    cat.mkdir(parents=True)
    dog.mkdir()
    (cat / "a_good.png").write_bytes(encoded(picture(1)))
    (cat / "a_good.txt").write_text("A striped cat.\n")
    (cat / "b_empty.png").write_bytes(b"")
    (cat / "c_good.jpg").write_bytes(encoded(picture(2, 40, 30), "JPEG"))
    truncated = encoded(picture(3))
    (cat / "d_truncated.png").write_bytes(truncated[: len(truncated) // 2])
    (cat / "e_text.png").write_text("I am not a picture")
    (cat / "f_shape.svg").write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="20" height="10"><rect width="20" height="10" fill="red"/></svg>'
    )
    (dog / "g_good.png").write_bytes(encoded(picture(4)))
    (dog / "h_copy_of_a.png").write_bytes((cat / "a_good.png").read_bytes())  # duplicate, a later shard
    (dog / "i_good.png").write_bytes(encoded(picture(5, 30, 30)))
    (dog / "j_good.bmp").write_bytes(encoded(picture(6), "BMP"))
    (dog / "j_good.txt").write_text("A dog on a beach.")
    (root / "stray.png").write_bytes(encoded(picture(7)))  # not inside a class folder
    return root


def folder_config(root: Path, **overrides) -> IngestConfig:
    values = dict(source=SourceConfig(kind="folder", path=str(root)), resolution=16, shard_rows=3, val_fraction=0.3)
    values.update(overrides)
    return IngestConfig(**values)




EXPECTED_REJECTS = {
    "cat/b_empty.png": "empty-file",
    "cat/d_truncated.png": "truncated",
    "cat/e_text.png": "not-an-image",
    "dog/h_copy_of_a.png": "duplicate",
    "stray.png": "no-class",
}
EXPECTED_IMAGES = ["cat/a_good.png", "cat/c_good.jpg", "cat/f_shape.svg", "dog/g_good.png", "dog/i_good.png", "dog/j_good.bmp"]


def test_folder_run_tables_rejects_and_summary(tmp_path, folder):
    ctx = make_ctx(tmp_path, folder_config(folder))
    output = run_ingest(ctx)

    images = read_dir(ctx.output_dir / "images")
    assert output.tables["images"].columns == IMAGE_COLUMNS
    assert output.tables["images"].glob == "images/*.parquet" and output.tables["images"].rows == 6
    assert images.column("source").to_pylist() == EXPECTED_IMAGES
    assert images.schema.field("label_id").type == pa.int32()
    assert images.column("label_name").to_pylist() == ["cat"] * 3 + ["dog"] * 3
    assert images.column("label_id").to_pylist() == [0, 0, 0, 1, 1, 1]
    assert images.column("source_caption").to_pylist() == ["A striped cat.", None, None, None, None, "A dog on a beach."]
    assert images.column("orig_width").to_pylist() == [36, 30, 20, 36, 30, 36]
    assert images.column("orig_height").to_pylist() == [24, 40, 10, 24, 30, 24]
    assert images.column("image_id")[0].as_py() == hashlib.sha256((folder / "cat/a_good.png").read_bytes()).hexdigest()
    for row in images.to_pylist():
        pixels = decode_stored(row["image"])
        assert pixels.shape == (16, 16, 3)
        assert row["split"] == split_of(row["image_id"], "tok1d-split-v1", 0.3)
    svg = decode_stored(images.column("image")[2].as_py())
    assert (np.abs(svg.astype(int) - [255, 0, 0]).max(axis=2) <= 2).all()  # centre crop of a red rectangle

    rejects = read_dir(ctx.output_dir / "rejects")
    assert dict(zip(rejects.column("source").to_pylist(), rejects.column("reason").to_pylist())) == EXPECTED_REJECTS
    duplicate = rejects.filter(pa.compute.equal(rejects.column("reason"), "duplicate")).to_pylist()[0]
    assert duplicate["detail"] == f"duplicate of {images.column('image_id')[0].as_py()}"
    assert all(rejects.column("detail").to_pylist())

    classes = read_dir(ctx.output_dir / "classes")
    assert classes.to_pylist() == [
        {"label_id": 0, "label_name": "cat", "images": 3, "train": classes["train"][0].as_py(), "val": classes["val"][0].as_py()},
        {"label_id": 1, "label_name": "dog", "images": 3, "train": classes["train"][1].as_py(), "val": classes["val"][1].as_py()},
    ]
    splits = images.column("split").to_pylist()
    summary = output.summary
    assert summary["images"] == 6 and summary["rejected"] == 5 and summary["classes"] == 2
    assert summary["train"] == splits.count("train") and summary["val"] == splits.count("val")
    assert summary["train"] == sum(classes.column("train").to_pylist())
    for reason in set(EXPECTED_REJECTS.values()):
        assert summary[f"rejected_{reason}"] == list(EXPECTED_REJECTS.values()).count(reason)
    assert output.tables["rejects"].rows == 5 and output.tables["classes"].rows == 2
    assert not list(ctx.output_dir.rglob(".*"))  # no temporary files left behind


def test_rerun_gives_identical_files_and_skips_done_shards(tmp_path, folder, monkeypatch):
    config = folder_config(folder)
    first = make_ctx(tmp_path, config, work="one")
    second = make_ctx(tmp_path, config, work="two")
    run_ingest(first)
    run_ingest(second)
    assert artifact_bytes(first.output_dir) == artifact_bytes(second.output_dir)

    written = []
    monkeypatch.setattr(ingest_shard, "finish_shard", lambda writer, rejects: written.append(writer.index))
    assert run_ingest(first).summary["shards_computed_this_run"] == 0  # everything is there already
    assert written == []


def test_kill_after_first_shard_then_resume(tmp_path, folder, monkeypatch):
    config = folder_config(folder)
    clean = make_ctx(tmp_path, config, work="clean")
    run_ingest(clean)

    real_finish = ingest_shard.finish_shard
    calls = []

    def dying_finish(writer, rejects):
        calls.append(writer.index)
        if writer.index == 1:
            # Killed half way: the rejects part is in place, the images part a stray temporary
            # (a real kill leaves the writer's own temporary; the stage's clean-up removes it).
            write_parquet(rejects, part_path(writer.output_dir, "rejects", 1))
            (writer.output_dir / "images" / ".part-00001.parquet.0badf00d.tmp").write_bytes(b"PAR1 half")
            raise KeyboardInterrupt("killed while writing shard 1")
        real_finish(writer, rejects)

    killed = make_ctx(tmp_path, config, work="killed")
    computed = killed.work_dir / "shards"  # where shard tasks write, before the stage finishes them
    monkeypatch.setattr(ingest_shard, "finish_shard", dying_finish)
    with pytest.raises(KeyboardInterrupt):
        run_ingest(killed)
    # Shard 0 was finished into the artifact before shard 1 started; shard 1 left its halves.
    assert sorted(p.name for p in (killed.output_dir / "images").glob("*.parquet")) == ["part-00000.parquet"]
    assert [p.name for p in (computed / "images").glob(".*")] == [".part-00001.parquet.0badf00d.tmp"]
    assert [p.name for p in (computed / "rejects").glob("*")] == ["part-00001.parquet"]

    calls.clear()
    monkeypatch.setattr(ingest_shard, "finish_shard", lambda *args: (calls.append(args[0].index), real_finish(*args)))
    output = run_ingest(killed)
    assert calls == [1, 2, 3]  # shard 0 was kept, not recomputed
    assert output.summary["shards_computed_this_run"] == 3
    images = read_dir(killed.output_dir / "images")
    assert images.column("source").to_pylist() == EXPECTED_IMAGES
    assert len(set(images.column("image_id").to_pylist())) == images.num_rows
    # The copy in shard 2 of an image from shard 0 is still found after the resume.
    rejects = read_dir(killed.output_dir / "rejects")
    assert "dog/h_copy_of_a.png" in rejects.column("source").to_pylist()
    assert output.summary["rejected_duplicate"] == 1
    assert artifact_bytes(killed.output_dir) == artifact_bytes(clean.output_dir)
    assert not [p for p in computed.rglob("*") if p.is_file()]  # every computed part moved into the artifact


def test_shards_computed_but_not_finished_are_finished_without_recomputing(tmp_path, folder, monkeypatch):
    """A kill after the fan-out computed every shard but before the stage moved them: the rerun
    finishes them (duplicates judged across shards as before) and computes none again."""
    config = folder_config(folder)
    clean = make_ctx(tmp_path, config, work="clean")
    run_ingest(clean)

    ctx = make_ctx(tmp_path, config, work="computed")
    shards = plan_range_shards(len(ingest_shard.open_source(config.source)), config.shard_rows, "ingest.shard_rows")
    job = ingest_shard.IngestShard(config, ctx.cache_key, str(ctx.work_dir / "shards"), 1)
    assert [job(shard).computed for shard in shards] == [True] * 4
    monkeypatch.setattr(ingest_shard, "process_shard", lambda *args: pytest.fail("a computed shard was computed again"))
    output = run_ingest(ctx)
    assert output.summary["shards_computed_this_run"] == 0 and output.summary["rejected_duplicate"] == 1
    assert artifact_bytes(ctx.output_dir) == artifact_bytes(clean.output_dir)


def test_process_pool_gives_the_same_files(tmp_path, folder):
    config = folder_config(folder)
    serial, pooled = make_ctx(tmp_path, config, work="serial"), make_ctx(tmp_path, config, work="pool", threads=2)
    run_ingest(serial)
    run_ingest(pooled)
    assert artifact_bytes(serial.output_dir) == artifact_bytes(pooled.output_dir)


def test_svgs_rejected_when_not_rasterised(tmp_path, folder):
    config = folder_config(folder, source=SourceConfig(kind="folder", path=str(folder), rasterize_svg=False))
    output = run_ingest(make_ctx(tmp_path, config))
    assert output.summary["rejected_svg-not-rasterised"] == 1 and output.summary["images"] == 5


def test_decompression_bomb_limit_from_config(tmp_path, folder):
    # Every raster picture has 864-1200 pixels (the truncated one too: its header is whole, and
    # the copy of a/ is no longer a duplicate once a/ is rejected); the SVG renders within it.
    config = folder_config(folder, max_image_pixels=500)
    output = run_ingest(make_ctx(tmp_path, config))
    assert output.summary["images"] == 1 and output.summary["rejected_too-large"] == 7
    rejects = read_dir(make_ctx(tmp_path, config).output_dir / "rejects")
    assert "ingest.max_image_pixels" in rejects.column("detail")[0].as_py()


def test_bad_config_values_are_named(tmp_path, folder):
    with pytest.raises(ValueError, match="ingest.val_fraction"):
        run_ingest(make_ctx(tmp_path, folder_config(folder, val_fraction=1.5)))


def test_split_is_deterministic_and_near_the_fraction():
    ids = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(4000)]
    splits = [split_of(i, "salt", 0.1) for i in ids]
    assert splits == [split_of(i, "salt", 0.1) for i in ids]
    assert 0.08 < splits.count("val") / len(ids) < 0.12
    assert splits != [split_of(i, "other-salt", 0.1) for i in ids]
    assert {split_of(i, "salt", 0.0) for i in ids} == {"train"} and {split_of(i, "salt", 1.0) for i in ids} == {"val"}


# ----------------------------------------------------------------------------- readers


def test_readers_on_a_committed_artifact(tmp_path, folder):
    ctx = make_ctx(tmp_path, folder_config(folder, val_fraction=0.5))
    output = run_ingest(ctx)
    manifest = commit_output(ctx.store, ctx, output)
    everything = image_table(manifest, ctx.store)
    assert everything.num_rows == 6 and everything.column_names == list(IMAGE_COLUMNS)
    small = image_table(manifest, ctx.store, columns=["image_id", "label_id"], split="val")
    assert small.column_names == ["image_id", "label_id"]
    val_ids = [r["image_id"] for r in everything.to_pylist() if r["split"] == "val"]
    assert small.column("image_id").to_pylist() == val_ids and 0 < len(val_ids) < 6

    batches = list(iter_image_batches(manifest, ctx.store, batch_size=4))
    assert [b.num_rows for b in batches] == [4, 2]
    assert pa.Table.from_batches(batches).equals(everything)
    val_batches = list(iter_image_batches(manifest, ctx.store, 1, split="val", columns=["image"]))
    assert [b.num_rows for b in val_batches] == [1] * len(val_ids)
    assert val_batches[0].schema.names == ["image"]
    assert decode_stored(val_batches[0].column("image")[0].as_py()).shape == (16, 16, 3)

    assert class_names(manifest, ctx.store) == ["cat", "dog"]
    with pytest.raises(KeyError, match="no column"):
        image_table(manifest, ctx.store, columns=["pixels"])
    with pytest.raises(ValueError, match="split"):
        image_table(manifest, ctx.store, split="test")


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not Path(FASHION_DIR, "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist missing")
def test_real_fashion_mnist(tmp_path):
    config = IngestConfig(source=SourceConfig(kind="fashion-mnist", max_images=300), shard_rows=128)
    ctx = make_ctx(tmp_path, config)
    output = run_ingest(ctx)
    images = read_dir(ctx.output_dir / "images")
    labels = gzip.decompress(Path(FASHION_DIR, "train-labels-idx1-ubyte.gz").read_bytes())[8:308]
    pixels = gzip.decompress(Path(FASHION_DIR, "train-images-idx3-ubyte.gz").read_bytes())[16 : 16 + 300 * 784]
    assert output.summary["images"] + output.summary["rejected"] == 300 and output.summary["shards"] == 3
    assert images.column("label_id").to_pylist() == list(labels[: images.num_rows])
    assert images.column("label_name").to_pylist() == [CLASSES[i] for i in labels[: images.num_rows]]
    assert images.column("source")[5].as_py() == "fashion-mnist/train-images-idx3-ubyte.gz#5"
    assert images.column("image_id")[0].as_py() == hashlib.sha256(pixels[:784]).hexdigest()
    assert read_dir(ctx.output_dir / "classes").column("label_name").to_pylist() == CLASSES
    first = decode_stored(images.column("image")[0].as_py())
    original = np.frombuffer(pixels[:784], np.uint8).reshape(28, 28)
    assert first.shape == (32, 32, 3) and (first[..., 0] == first[..., 1]).all()
    # Upscaled 28 -> 32 (crop of a square is the whole image): the same picture, roughly.
    small = np.asarray(Image.fromarray(first[..., 0]).resize((28, 28), Image.Resampling.BILINEAR), dtype=float)
    assert np.corrcoef(small.ravel(), original.ravel())[0, 1] > 0.95


@pytest.mark.skipif(not Path(TUXPAINT_DIR).is_dir(), reason="tuxpaint-stamps-default missing")
def test_real_tuxpaint_stamps(tmp_path):
    # The first 40 stamps in source order include animals/birds/swallow.svg.
    config = IngestConfig(source=SourceConfig(kind="tuxpaint", max_images=40), fit="pad", shard_rows=16)
    ctx = make_ctx(tmp_path, config)
    output = run_ingest(ctx)
    images = read_dir(ctx.output_dir / "images")
    classes = read_dir(ctx.output_dir / "classes")
    assert classes.num_rows == 17 and output.summary["classes"] == 17
    assert "animals" in classes.column("label_name").to_pylist()
    rows = {row["source"]: row for row in images.to_pylist()}
    assert output.summary["images"] + output.summary["rejected"] == 40
    root = Path(TUXPAINT_DIR)
    for source, row in rows.items():
        txt = (root / source).with_suffix(".txt")
        if txt.exists():
            assert row["source_caption"] == txt.read_text().splitlines()[0].strip()
    assert rows["animals/amphibians/frog.png"]["source_caption"] == "A frog."
    swallow = rows["animals/birds/swallow.svg"]
    assert swallow["label_name"] == "animals" and (swallow["orig_width"], swallow["orig_height"]) == (1416, 1038)
    pixels = decode_stored(swallow["image"])
    assert pixels.shape == (32, 32, 3) and pixels.min() < 100 and (pixels[0] == 255).all()  # drawn, white pad on top


def test_huggingface_dataset_end_to_end(tmp_path):
    """A local Parquet dataset read through `datasets.load_dataset`: labels, captions, bad rows."""
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["circle", "square"]), "text": datasets.Value("string")}
    )
    rows = {
        "image": [
            {"bytes": encoded(picture(10, 20, 40)), "path": None},
            {"bytes": b"not an image at all", "path": None},
            {"bytes": encoded(picture(11)), "path": None},
            {"bytes": encoded(picture(12)), "path": None},
        ],
        "label": [1, 0, -1, 0],  # -1: ClassLabel's "no label"
        "text": ["a red square", "broken", "unlabelled", None],
    }
    directory = tmp_path / "shapes"
    (directory / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(directory / "data" / "train-00000-of-00001.parquet"))

    source = SourceConfig(kind="huggingface", hf_name=str(directory), hf_caption_column="text")
    ctx = make_ctx(tmp_path, IngestConfig(source=source, resolution=8, fit="pad"))
    output = run_ingest(ctx)
    images = read_dir(ctx.output_dir / "images")
    assert images.column("source").to_pylist() == ["shapes/train#0", "shapes/train#3"]
    assert images.column("label_name").to_pylist() == ["square", "circle"]
    assert images.column("source_caption").to_pylist() == ["a red square", None]
    assert images.column("orig_width").to_pylist() == [40, 36]
    expected_id = hashlib.sha256(picture(10, 20, 40).tobytes()).hexdigest()  # the decoded pixel buffer
    assert images.column("image_id")[0].as_py() == expected_id
    padded = decode_stored(images.column("image")[0].as_py())
    assert (padded[:2] == 255).all() and (padded[-2:] == 255).all()  # 2:1 picture padded with white
    assert output.summary["rejected_not-an-image"] == 1 and output.summary["rejected_no-label"] == 1
    assert read_dir(ctx.output_dir / "classes").column("label_name").to_pylist() == ["circle", "square"]
