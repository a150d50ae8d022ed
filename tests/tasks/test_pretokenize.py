"""The pretokenize stage: token tables (VQ ids, KL float16), DuckDB, readers, resume, decode check."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import tasks.pretokenize.compute as pretokenize_stage
from tasks.config import PretokenizeConfig, RuntimeConfig
from tasks.embed_text.read import TextSource
from tasks.ingest.read import decode_images, image_table
from tasks.pretokenize.read import iter_token_batches, load_token_table, token_meta
from tasks.pretokenize.stage import run_pretokenize
from tasks.stage import StageContext
from tasks.train_tokenizer.read import load_tokenizer

from builders.fashion import IMAGES, build_inputs
from builders.store import commit_output
from builders.tokenizer import tiny_config, train_and_commit
from builders.processes import kill_when_ready


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Inputs plus a VQ tokenizer and a text-conditioned KL tokenizer (a few steps each)."""
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("pretokenize")
    store, manifests = build_inputs(root)
    # Enough steps at full weight (no EMA lag) that reconstructions depend on the tokens.
    short = {"train": {"steps": 20, "checkpoint_every": 20, "ema_decay": 0.0}, "eval_images": 2, "grid_images": 2}
    # Dead-code restarts keep 20 steps from collapsing every token onto one code.
    _, vq = train_and_commit(store, manifests, tiny_config("vq", model={"dead_code_restart_steps": 2}, **short), root / "vq")
    _, kl = train_and_commit(store, manifests, tiny_config("kl", use_text=True, **short), root / "kl")
    return store, manifests, vq, kl


def context(store, manifests, tokenizer, work: Path, **config) -> StageContext:
    values = {"batch_size": 8, "shard_rows": 12, "decode_check_images": 6, **config}
    return StageContext(
        stage="pretokenize", config=PretokenizeConfig(**values),
        inputs={**manifests, "train-tokenizer": tokenizer}, store=store,
        runtime=RuntimeConfig(device="cpu"), cache_key="k" * 64, work_dir=work,
    )


def test_vq_tokens_table(tmp_path, trained):
    store, manifests, vq, _ = trained
    ctx = context(store, manifests, vq, tmp_path / "work")
    output = run_pretokenize(ctx)
    manifest = commit_output(store, ctx, output)
    images = image_table(manifests["ingest"], store, columns=["image_id", "split", "label_id"])
    summary = output.summary
    assert summary["rows"] == output.tables["tokens"].rows == IMAGES
    assert summary["rows_train"] + summary["rows_val"] == IMAGES and summary["skipped_no_caption"] == 0
    assert summary["decode_check_images"] == 6 and summary["decode_check_max_abs_diff"] < 1e-4
    assert summary["decode_check_token_mismatch"] == 0
    # Two ingest shards of 32 rows, parts of 12 rows: 3 parts each.
    assert sorted(f.path for f in manifest.files if f.path.startswith("tokens/")) == [
        f"tokens/part-0000{s}-000{k}.parquet" for s in range(2) for k in range(3)
    ]

    glob = manifest.table_glob(store, "tokens")
    stored_type = pq.read_schema(manifest.table_files(store, "tokens")[0]).field("tokens").type
    assert pa.types.is_list(stored_type) and stored_type.value_type == pa.uint16()
    count, length, distinct = duckdb.sql(f"select count(*), avg(len(tokens)), count(distinct image_id) from '{glob}'").fetchall()[0]
    assert (count, length, distinct) == (IMAGES, 8, IMAGES)
    by_split = dict(duckdb.sql(f"select split, count(*) from '{glob}' group by split").fetchall())
    assert by_split == {s: images.column("split").to_pylist().count(s) for s in ("train", "val")}

    meta = token_meta(manifest, store)
    assert meta["discrete"] and meta["seq_len"] == 8 and meta["codebook_size"] == 64 and not meta["uses_text"]
    assert meta["num_classes"] == 10 and meta["class_names"][0] == "T-shirt/top"
    assert meta["tokenizer_artifact"] == vq.artifact_id and meta["rows"] == by_split

    table = load_token_table(manifest, store)
    assert table.tokens.dtype == np.int64 and table.tokens.shape == (IMAGES, 8)
    assert table.tokens.min() >= 0 and table.tokens.max() < 64
    assert sorted(table.image_ids) == sorted(images.column("image_id").to_pylist())
    labels = dict(zip(images.column("image_id").to_pylist(), images.column("label_id").to_pylist()))
    assert [labels[i] for i in table.image_ids] == table.labels.tolist()
    assert all(c is not None for c in table.caption_ids)  # the caption stage captioned every image
    val = load_token_table(manifest, store, split="val")
    assert len(val) == by_split["val"]
    batches = list(iter_token_batches(manifest, store, batch_size=10))
    assert sum(len(b) for b in batches) == IMAGES
    assert np.array_equal(np.concatenate([b.tokens for b in batches]), table.tokens)

    # The stored ids are the tokenizer's encoding of each image.
    model, _ = load_tokenizer(vq, store)
    first = images.column("image_id").to_pylist()[:5]
    pngs = image_table(manifests["ingest"], store, columns=["image_id", "image"]).column("image").to_pylist()[:5]
    with torch.no_grad():
        fresh, _, _ = model.encode(decode_images(pngs))
    rows = [table.image_ids.index(i) for i in first]
    assert np.array_equal(table.tokens[rows], fresh.numpy())


def test_kl_text_tokens_are_float16_means(tmp_path, trained):
    store, manifests, _, kl = trained
    ctx = context(store, manifests, kl, tmp_path / "work")
    output = run_pretokenize(ctx)
    manifest = commit_output(store, ctx, output)
    assert output.summary["decode_check_max_abs_diff"] < 0.02
    assert output.summary["decode_check_token_rel_diff"] < 1e-3
    assert output.tables["tokens"].columns["tokens"] == "list<item: list<item: halffloat>>"
    glob = manifest.table_glob(store, "tokens")
    count, length, width = duckdb.sql(f"select count(*), avg(len(tokens)), avg(len(tokens[1])) from '{glob}'").fetchall()[0]
    assert (count, length, width) == (IMAGES, 8, 8)
    meta = token_meta(manifest, store)
    assert not meta["discrete"] and meta["uses_text"] and meta["text"]["dim"] == 384
    assert len(meta["token_mean"]) == len(meta["token_std"]) == 8 and min(meta["token_std"]) > 0
    table = load_token_table(manifest, store)
    assert table.tokens.dtype == np.float32 and table.tokens.shape == (IMAGES, 8, 8)

    # Eval-mode encoding is the deterministic KL mean: the table equals a fresh encode (to float16).
    model, _ = load_tokenizer(kl, store)
    text = TextSource(manifests["caption"], manifests["embed-text"], store)
    images = image_table(manifests["ingest"], store, columns=["image_id", "image"])
    ids = images.column("image_id").to_pylist()[:4]
    tokens, mask = text.lookup(ids)
    with torch.no_grad():
        fresh, _, _ = model.encode(decode_images(images.column("image").to_pylist()[:4]), tokens, mask)
    rows = [table.image_ids.index(i) for i in ids]
    np.testing.assert_array_equal(table.tokens[rows], fresh.numpy().astype(np.float16).astype(np.float32))
    assert table.caption_ids[rows[0]] == text.caption_of[ids[0]]


def test_decode_check_fails_on_wrong_tokens(tmp_path, trained, monkeypatch):
    store, manifests, vq, _ = trained
    right = pretokenize_stage.tokens_array
    # A bug that stores each image's ids rolled by one position must not pass unnoticed.
    monkeypatch.setattr(pretokenize_stage, "tokens_array", lambda tokens, discrete: right(tokens.roll(1, dims=1), discrete))
    with pytest.raises(RuntimeError, match="decoding the stored tokens differs") as failure:
        run_pretokenize(context(store, manifests, vq, tmp_path / "work"))
    assert "100.0% of the stored ids differ" in str(failure.value)
    assert not (tmp_path / "work" / "output" / "tokens.json").exists()


def test_decode_check_names_each_problem():
    pretokenize_stage.check_decoded({"decode_check_max_abs_diff": 0.001, "decode_check_token_mismatch": 0.0})
    pretokenize_stage.check_decoded({"decode_check_max_abs_diff": 0.001, "decode_check_token_rel_diff": 4e-4})
    with pytest.raises(RuntimeError, match="relative"):
        pretokenize_stage.check_decoded({"decode_check_max_abs_diff": 0.001, "decode_check_token_rel_diff": 0.1})
    with pytest.raises(RuntimeError, match="decoded pixels differ by up to 0.1000"):
        pretokenize_stage.check_decoded({"decode_check_max_abs_diff": 0.1, "decode_check_token_mismatch": 0.0})


KILL_SCRIPT = """
import sys, time, json, torch
torch.set_num_threads(1)
from pathlib import Path
import tasks.pretokenize.compute as stage
from tasks.config import PretokenizeConfig, RuntimeConfig
from tasks.stage import StageContext
from tasks.store import Manifest, Store

encode = stage.Encoder.encode
def slow_encode(self, images, image_ids):  # slow batches leave time to kill mid-run
    time.sleep(0.4)
    return encode(self, images, image_ids)
stage.Encoder.encode = slow_encode
store_root, inputs_path, work = sys.argv[1:]
inputs = {k: Manifest.model_validate(v) for k, v in json.loads(Path(inputs_path).read_text()).items()}
config = PretokenizeConfig(batch_size=8, shard_rows=12, decode_check_images=6)
ctx = StageContext("pretokenize", config, inputs, Store(store_root), RuntimeConfig(device="cpu"), "k" * 64, Path(work))
stage.run_pretokenize(ctx)
"""


def test_kill_then_resume_writes_every_row_once(tmp_path, trained):
    store, manifests, vq, _ = trained
    inputs = {**manifests, "train-tokenizer": vq}
    (tmp_path / "inputs.json").write_text(json.dumps({k: m.model_dump(mode="json") for k, m in inputs.items()}))
    work = tmp_path / "killed"
    parts = work / "output" / "tokens"
    kill_when_ready(tmp_path, KILL_SCRIPT, [str(store.root), str(tmp_path / "inputs.json"), str(work)],
                    lambda: len(list(parts.glob("part-*.parquet"))) >= 2, "token part", 120)
    written = sorted(p.name for p in parts.glob("part-*.parquet"))
    assert 2 <= len(written) < 6, written  # killed in the middle

    ctx = context(store, manifests, vq, work)
    output = run_pretokenize(ctx)
    assert output.summary["rows"] == IMAGES
    assert 0 < output.summary["encoded_this_run"] < IMAGES  # finished parts were not encoded again
    glob = str(parts / "*.parquet")
    assert duckdb.sql(f"select count(*), count(distinct image_id) from '{glob}'").fetchall()[0] == (IMAGES, IMAGES)

    straight = context(store, manifests, vq, tmp_path / "straight")
    run_pretokenize(straight)
    names = sorted(p.name for p in parts.glob("*.parquet"))
    assert names == sorted(p.name for p in (straight.output_dir / "tokens").glob("*.parquet"))
    for name in names:
        resumed = pq.read_table(parts / name)
        assert resumed.equals(pq.read_table(straight.output_dir / "tokens" / name)), name
    assert (work / "output" / "tokens.json").read_text() == (straight.output_dir / "tokens.json").read_text()


def test_bad_settings_are_named(tmp_path, trained):
    store, manifests, vq, _ = trained
    with pytest.raises(ValueError, match="pretokenize.batch_size"):
        run_pretokenize(context(store, manifests, vq, tmp_path / "a", batch_size=0))
    with pytest.raises(ValueError, match="expected a train-tokenizer artifact"):
        run_pretokenize(context(store, manifests, manifests["ingest"], tmp_path / "b"))


@pytest.mark.parametrize("discrete", [True, False])
def test_token_tables_load_with_hugging_face_datasets(tmp_path, discrete):
    from datasets import load_dataset

    from builders.tokens import token_artifact
    from tasks.store import Store

    store = Store(tmp_path / "store")
    generator = torch.Generator().manual_seed(0)
    rows, seq_len, dim = 10, 6, 4
    tokens = (torch.randint(0, 1000, (rows, seq_len), generator=generator) if discrete
              else torch.randn(rows, seq_len, dim, generator=generator))
    labels, splits = [i % 3 for i in range(rows)], ["train"] * 7 + ["val"] * 3
    captions = [f"cap-{i}" if i % 2 else None for i in range(rows)]
    manifest = token_artifact(store, tokens, labels, splits, class_names=["a", "b", "c"], codebook_size=1024 if discrete else None,
                              caption_ids=captions, shards=3)
    # As the README shows it: the artifact's tokens/*.parquet, whole or one split by its column.
    files = sorted(str(path) for path in manifest.table_files(store, "tokens"))
    assert len(files) == 3
    loaded = load_dataset("parquet", data_files=files, split="train", cache_dir=str(tmp_path / "hf-cache"))
    assert loaded.column_names == ["image_id", "split", "label_id", "caption_id", "tokens"]
    assert loaded.num_rows == rows
    assert loaded["image_id"] == [f"img-{i}" for i in range(rows)] and loaded["caption_id"] == captions
    assert loaded["label_id"] == labels and loaded["split"] == splits
    stored = loaded.with_format("numpy")[:]["tokens"]
    expected = load_token_table(manifest, store).tokens  # tok1d's own reader: int64 [M, N] or float32 [M, N, D]
    assert stored.shape == expected.shape == tuple(tokens.shape) and stored.dtype == expected.dtype
    np.testing.assert_array_equal(stored, expected)
    np.testing.assert_array_equal(stored, tokens.numpy().astype(np.uint16 if discrete else np.float16))
    glob = manifest.table_glob(store, "tokens")  # <store>/artifacts/pretokenize/<id>/tokens/*.parquet
    val = load_dataset("parquet", data_files=glob, split="train", cache_dir=str(tmp_path / "hf-cache")).filter(
        lambda row: row["split"] == "val")
    assert val["image_id"] == ["img-7", "img-8", "img-9"]
