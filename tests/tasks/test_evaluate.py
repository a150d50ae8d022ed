"""The evaluate stage end to end on fabricated artifacts: images -> a random nano tokenizer ->
tokens -> a briefly trained generator -> samples, metrics, grid; determinism and the reference
cache. Artifacts come from `builders` (each stage's own writers) and are read by the stages' own loaders.
"""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import tasks.evaluate.reference as reference
import tasks.evaluate.samples as evaluate_samples
from models.tokenizer_config import TokenizerConfig
from tasks.caption.backends import caption_id
from tasks.config import EvaluateConfig, RuntimeConfig, SamplingConfig
from tasks.embed_text.read import load_text_embeddings
from tasks.evaluate.stage import run_evaluate
from tasks.stage import StageContext
from tasks.store import Manifest, Store

from builders.caption import caption_artifact
from builders.embed_text import embed_artifact, random_batch
from builders.evaluate import CLASSES, NAMES, RES, image_ids, ingest_artifact, pretokenize, train_generator
from builders.tokenizer import random_tokenizer

TEXT_DIM, TEXT_TOKENS = 6, 4
TEMPLATES = ["a photo of a {}", "a picture of a {}"]


def caption_artifacts(store: Store, labels: np.ndarray) -> tuple[Manifest, Manifest]:
    """Captions (template 0 per image), the pool (every template per class) and their embeddings."""
    captions = [TEMPLATES[0].format(NAMES[label]) for label in labels]
    pool = {label: [template.format(NAMES[label]) for template in TEMPLATES] for label in range(CLASSES)}
    caption = caption_artifact(store, captions, pool, labels=labels, image_ids=image_ids(len(labels)),
                               class_names=NAMES, origin="label:0", pool_origin="label")
    texts = sorted({c for entries in pool.values() for c in entries})
    batch = random_batch(len(texts), TEXT_TOKENS, TEXT_DIM, seed=2, min_tokens=2)
    return caption, embed_artifact(store, [caption_id(t) for t in texts], texts, batch)


def evaluate(store: Store, inputs: dict[str, Manifest], work: Path, **fields):
    config = EvaluateConfig(**{"num_samples": 18, "batch_size": 12, "reference_images": 24, "grid_images": 6,
                               "sampling": SamplingConfig(steps=4), **fields})
    ctx = StageContext("evaluate", config, inputs, store, RuntimeConfig(device="cpu"), "e" * 64, work)
    return run_evaluate(ctx), ctx.output_dir


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One store with ingest, caption and embed-text artifacts, shared by the tests below."""
    store = Store(tmp_path_factory.mktemp("evaluate") / "store")
    ingest, images, labels = ingest_artifact(store)
    caption, embed = caption_artifacts(store, labels)
    return {"store": store, "ingest": ingest, "caption": caption, "embed-text": embed, "images": images,
            "labels": labels}


def read_samples(output: Path) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((output / "samples").glob("*.parquet"))])


def test_maskgit_metrics_determinism_and_reference_cache(tmp_path, world, monkeypatch):
    store = world["store"]
    config = TokenizerConfig(image_size=RES, patch_size=8, size="nano", num_latent_tokens=8, bottleneck="vq",
                             codebook_size=16, token_dim=4)
    tokenizer_manifest, tokenizer = random_tokenizer(store, config)
    tokens = pretokenize(store, tokenizer, world["images"], world["labels"])
    generator = train_generator(store, {"pretokenize": tokens}, tmp_path / "gen")
    inputs = {name: world[name] for name in ("ingest", "caption", "embed-text")}
    inputs.update({"train-tokenizer": tokenizer_manifest, "pretokenize": tokens, "train-generator": generator})

    shutil.rmtree(store.root / "caches" / "reference-stats", ignore_errors=True)  # whatever ran before
    computed = len(reference.COMPUTED)
    first, out1 = evaluate(store, inputs, tmp_path / "e1")
    assert len(reference.COMPUTED) == computed + 1
    summary = first.summary
    cache = store.root / "caches" / "reference-stats" / f"{summary['reference_key']}.npz"
    stamp = cache.stat().st_mtime_ns

    assert summary["num_samples"] == 18 and summary["reference_images"] == 24
    assert summary["is_classifier"] == "dataset-linear-probe" and 0 < summary["is_probe_accuracy"] <= 1
    assert math.isfinite(summary["gfid"]) and summary["gfid"] > 0
    assert 1.0 <= summary["inception_score"] <= CLASSES and summary["inception_score_std"] >= 0
    assert 0 <= summary["precision"] <= 1 and 0 <= summary["recall"] <= 1
    assert "clip_score" not in summary and summary["samples_per_second"] > 0

    samples = read_samples(out1)
    assert first.tables["samples"].rows == samples.num_rows == 18
    assert samples["sample_index"].to_pylist() == list(range(18))
    assert samples["label_id"].to_pylist() == [i % CLASSES for i in range(18)]
    assert samples["caption_id"].null_count == 18  # no text anywhere in this run
    assert Image.open(io.BytesIO(samples["image"][0].as_py())).size == (RES, RES)
    grid = Image.open(out1 / "samples.png")  # 3 class rows x 2 columns of 16px images, 2px padding
    assert grid.size == (2 * (RES + 2) + 2, 3 * (RES + 2) + 2)

    # The second run must come from the cache: computing reference features now fails the test.
    monkeypatch.setattr(reference, "compute_reference", lambda *a, **k: pytest.fail("reference features recomputed"))
    second, out2 = evaluate(store, inputs, tmp_path / "e2")
    assert cache.stat().st_mtime_ns == stamp
    drop = {"samples_per_second"}
    assert {k: v for k, v in second.summary.items() if k not in drop} == {k: v for k, v in summary.items() if k not in drop}
    assert (out1 / "samples.png").read_bytes() == (out2 / "samples.png").read_bytes()
    assert read_samples(out2).equals(samples)

    # A different seed gives different samples (so the equality above is not vacuous).
    third, out3 = evaluate(store, inputs, tmp_path / "e3", seed=1, num_samples=4)
    assert read_samples(out3)["image"].to_pylist() != samples["image"].to_pylist()[:4]


def test_text_conditioned_dit_with_textok_tokenizer(tmp_path, world, monkeypatch):
    store = world["store"]
    config = TokenizerConfig(image_size=RES, patch_size=8, size="nano", num_latent_tokens=8, bottleneck="kl",
                             token_dim=4, text_dim=TEXT_DIM, max_text_tokens=TEXT_TOKENS)
    tokenizer_manifest, tokenizer = random_tokenizer(store, config)
    texts = load_text_embeddings(world["embed-text"], store)
    captions = [TEMPLATES[0].format(NAMES[label]) for label in world["labels"]]
    tokens = pretokenize(store, tokenizer, world["images"], world["labels"], texts, captions)
    generator = train_generator(store, {"pretokenize": tokens, "embed-text": world["embed-text"]}, tmp_path / "gen",
                                conditioning="text")
    inputs = {name: world[name] for name in ("ingest", "caption", "embed-text")}
    inputs.update({"train-tokenizer": tokenizer_manifest, "pretokenize": tokens, "train-generator": generator})

    scored: list[tuple[int, list[str]]] = []

    def fake_clip(images, prompts, model_path, device=None):
        assert model_path == "/models/clip" and len(images) == len(prompts)
        scored.append((len(images), list(prompts)))
        return 25.0

    monkeypatch.setattr(evaluate_samples, "clip_score", fake_clip)
    # Shards of 5 samples: CLIP scores each shard's samples, the summary weighs the shards by size.
    output, out = evaluate(store, inputs, tmp_path / "e", num_samples=12, clip_path="/models/clip", shard_rows=5,
                           sampling=SamplingConfig(steps=4, guidance_scale=2.0))
    summary = output.summary
    assert summary["generator"] == "dit" and summary["text_conditioned"] and summary["clip_score"] == 25.0
    samples = read_samples(out)
    pool = {label: {caption_id(TEMPLATES[t].format(NAMES[label])) for t in range(len(TEMPLATES))}
            for label in range(CLASSES)}
    for label, cid in zip(samples["label_id"].to_pylist(), samples["caption_id"].to_pylist()):
        assert cid in pool[label]  # each sample's caption comes from its class's pool
    assert [n for n, _ in scored] == [5, 5, 2] and summary["shards"] == 3
    prompts = [prompt for _, chunk in scored for prompt in chunk]
    assert [caption_id(p) for p in prompts] == samples["caption_id"].to_pylist()
    assert len(set(prompts)) > CLASSES  # captions are drawn, not always the first of the pool
    assert math.isfinite(summary["gfid"]) and 0 <= summary["precision"] <= 1


def test_mismatched_tokens_are_rejected(tmp_path, world):
    store = world["store"]
    config = TokenizerConfig(image_size=RES, patch_size=8, size="nano", num_latent_tokens=8, bottleneck="vq",
                             codebook_size=16, token_dim=4)
    tokenizer_manifest, tokenizer = random_tokenizer(store, config)
    tokens = pretokenize(store, tokenizer, world["images"], world["labels"])
    other = pretokenize(store, tokenizer, world["images"][:-9], world["labels"][:-9])
    generator = train_generator(store, {"pretokenize": tokens}, tmp_path / "gen")
    inputs = {name: world[name] for name in ("ingest", "caption", "embed-text")}
    inputs.update({"train-tokenizer": tokenizer_manifest, "pretokenize": other, "train-generator": generator})
    with pytest.raises(ValueError, match="the generator was trained on tokens"):
        evaluate(store, inputs, tmp_path / "e")
