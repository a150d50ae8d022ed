"""The public Python API (`import tok1d`) on artifacts of real tiny pipeline runs: the README's
example as written, every input form, ids and continuous tokens, captions, generator samples."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

import tok1d
from builders.cli import python_imports
from builders.pipeline import tiny_run
from tasks.config import SourceConfig
from tasks.embed_text.read import load_text_embeddings
from tasks.evaluate.sampling import balanced_labels
from tasks.ingest.read import image_table
from tasks.ingest.sources import open_source
from tasks.pretokenize.read import load_token_table
from tasks.train_tokenizer.read import load_tokenizer

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- api-example: tests/test_api.py runs this block as written -->"


def readme_example() -> str:
    text = README.read_text()
    assert MARKER in text, "the README lost its API example"
    match = re.search(r"```python\n(.*?)```", text[text.index(MARKER):], re.S)
    assert match is not None
    return match.group(1)


def stored_images(run, split: str | None = None) -> tuple[list[str], np.ndarray]:
    table = image_table(run.manifests["ingest"], run.store, columns=["image_id", "image"], split=split)
    images = [np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) for data in table["image"].to_pylist()]
    return table["image_id"].to_pylist(), np.stack(images)


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    run = tiny_run("smoke")
    code = readme_example()
    assert len(code.strip().splitlines()) <= 10
    (tmp_path / "store").symlink_to(run.store.root)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TOK1D_STORE", raising=False)
    exec(compile(code, "README.md", "exec"), {})
    reconstruction = Image.open(tmp_path / "reconstruction.png")
    assert reconstruction.size == (16, 16) and reconstruction.mode == "RGB"
    assert [Image.open(tmp_path / f"sample-{i}.png").size for i in range(3)] == [(16, 16)] * 3


def test_import_is_light():
    result, heavy = python_imports("import tok1d; print(sorted(tok1d.__all__))")
    assert result.returncode == 0, result.stderr
    assert heavy == [] and "Tokenizer" in result.stdout


def test_raw_source_images_of_any_size_encode_to_the_pretokenized_ids():
    # The 28x28 Fashion-MNIST originals, made square and resized by the API, give the ids
    # pretokenize stored for the ingested 16x16 images: the ingest's preprocessing, reused.
    run = tiny_run("smoke")
    tokenizer = tok1d.Tokenizer.load(run.manifests["train-tokenizer"].artifact_id, store=run.store.root)
    assert tokenizer.discrete and tokenizer.resolution == 16 and tokenizer.spec.preprocessing.fit == "center-crop"
    items = list(open_source(SourceConfig(kind="fashion-mnist", max_images=48)).items(0, 12))
    originals = [np.frombuffer(item.data, np.uint8).reshape(item.shape) for item in items]
    assert originals[0].shape == (28, 28)
    table = load_token_table(run.manifests["pretokenize"], run.store)
    by_id = dict(zip(table.image_ids, table.tokens))
    import hashlib

    expected = np.stack([by_id[hashlib.sha256(item.data).hexdigest()] for item in items])
    ids = tokenizer.encode(originals)
    assert ids.dtype == torch.int64 and ids.shape == (12, 8)
    assert np.array_equal(ids.numpy(), expected)


def test_every_input_form_gives_the_same_tokens():
    run = tiny_run("smoke")
    tokenizer = tok1d.Tokenizer.load(run.manifests["train-tokenizer"].artifact_id, store=run.store.root)
    _, images = stored_images(run)
    batch = images[:4]  # uint8 [4, 16, 16, 3]
    reference = tokenizer.encode(batch)
    floats = torch.from_numpy(batch).permute(0, 3, 1, 2).float() / 255
    assert torch.equal(tokenizer.encode(floats), reference)  # float [B, 3, H, W] at the resolution
    assert torch.equal(tokenizer.encode([Image.fromarray(a) for a in batch]), reference)  # PIL
    assert torch.equal(tokenizer.encode(list(torch.from_numpy(batch).permute(0, 3, 1, 2))), reference)  # uint8 CHW
    rgba = np.concatenate([batch[0], np.full((16, 16, 1), 255, np.uint8)], axis=2)
    assert torch.equal(tokenizer.encode(rgba), reference[:1])  # opaque RGBA
    # Other sizes: a 48x32 image and a float tensor of 40x40 go through the ingest's crop + resize.
    big = np.asarray(Image.fromarray(batch[1]).resize((32, 48), Image.Resampling.NEAREST))
    mixed = tokenizer.encode([Image.fromarray(big), torch.rand(3, 40, 40), Image.fromarray(batch[2]).convert("L")])
    assert mixed.shape == (3, 8) and int(mixed.max()) < tokenizer.codebook_size
    with pytest.raises(TypeError, match="uint8"):
        tokenizer.encode(batch.astype(np.float32))
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        tokenizer.encode(torch.rand(16, 16))
    with pytest.raises(ValueError, match="takes no captions"):
        tokenizer.encode(batch, captions=["a"] * 4)


def test_decode_gives_the_models_reconstructions_in_three_forms():
    run = tiny_run("smoke")
    manifest = run.manifests["train-tokenizer"]
    tokenizer = tok1d.Tokenizer.load(manifest.directory(run.store))  # the artifact folder
    model, _ = load_tokenizer(manifest, run.store)
    _, images = stored_images(run)
    ids = tokenizer.encode(images[:3])
    with torch.no_grad():
        expected = model.decode(ids).clamp(0, 1)
    tensor = tokenizer.decode(ids, output="tensor")
    assert tensor.shape == (3, 3, 16, 16) and torch.equal(tensor, expected)
    arrays = tokenizer.decode(ids, output="uint8")
    assert arrays.dtype == np.uint8 and arrays.shape == (3, 16, 16, 3)
    assert np.array_equal(arrays, (expected * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
    pictures = tokenizer.decode(ids[0])  # one image's ids alone
    assert len(pictures) == 1 and np.array_equal(np.asarray(pictures[0]), arrays[0])
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, 256\)"):
        tokenizer.decode(torch.full((1, 8), 256))
    with pytest.raises(ValueError, match=r"\[B, 8\]"):
        tokenizer.decode(torch.zeros(1, 7, dtype=torch.long))


def test_text_tokenizer_embeds_captions_with_its_training_encoder():
    run = tiny_run("smoke-textok")
    tokenizer = tok1d.Tokenizer.load(run.manifests["train-tokenizer"].artifact_id[:10], store=run.store.root)
    assert not tokenizer.discrete and tokenizer.uses_text
    assert tokenizer.spec.text.backend == "sentence-transformers" and tokenizer.spec.text.dtype == "float16"
    # The embeddings the tokenizer trained on, and the API's for the same captions.
    stored = load_text_embeddings(run.manifests["embed-text"], run.store)
    captions = pq.read_table(run.manifests["embed-text"].table_files(run.store, "embeddings")[0],
                             columns=["caption_id", "caption"]).slice(0, 3)
    ids, texts = captions["caption_id"].to_pylist(), captions["caption"].to_pylist()
    tokens, mask = tokenizer.embed_captions(texts)
    want_tokens, want_mask = stored.lookup(ids)
    assert torch.equal(mask, want_mask)
    assert torch.allclose(tokens, want_tokens.float(), atol=2e-3)

    _, images = stored_images(run)
    z = tokenizer.encode(images[:3], captions=texts)
    assert z.dtype == torch.float32 and z.shape == (3, 8, 8)
    assert not torch.equal(z, tokenizer.encode(images[:3], captions=list(reversed(texts))))  # captions are used
    decoded = tokenizer.decode(z, captions=texts, output="tensor")
    assert decoded.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="pass captions"):
        tokenizer.encode(images[:3])
    with pytest.raises(ValueError, match="2 captions for 3 images"):
        tokenizer.decode(z, captions=texts[:2])


def test_generator_samples_are_the_evaluate_stages_samples():
    run = tiny_run("smoke")
    generator = tok1d.Generator.load(run.manifests["train-generator"].artifact_id, store=run.store.root)
    assert generator.sampling.steps == 4 and generator.sampling.temperature == 1.0  # the smoke preset's
    # evaluate drew 8 balanced labels with seed 0 in one batch of 8: the same call gives its images.
    table = pq.read_table(run.manifests["evaluate"].table_files(run.store, "samples")[0]).sort_by("sample_index")
    stored = np.stack([np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) for png in table["image"].to_pylist()])
    labels = balanced_labels(8, generator.num_classes)
    samples = generator.sample(labels=labels.tolist(), seed=0, output="uint8")
    assert np.array_equal(samples, stored)
    other = generator.sample(labels=labels.tolist(), seed=1, output="uint8")
    assert not np.array_equal(other, stored)
    assert len(generator.sample(labels=[3], steps=2)) == 1
    with pytest.raises(ValueError, match="sampling setting stepz"):
        generator.sample(labels=[0], stepz=2)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 10\)"):
        generator.sample(labels=[10])


def test_generator_with_a_text_tokenizer_decodes_with_pool_or_given_captions():
    run = tiny_run("smoke-textok")
    generator = tok1d.Generator.load(run.store.root / run.manifests["train-generator"].root)
    assert generator.tokenizer.uses_text and generator.caption_pool and not generator.uses_text
    pooled = generator.sample(labels=[0, 1], seed=0, output="tensor")
    assert pooled.shape == (2, 3, 16, 16)
    given = generator.sample(labels=[0, 1], captions=["a red shirt", "a pair of boots"], seed=0, output="tensor")
    assert given.shape == (2, 3, 16, 16) and not torch.equal(given, pooled)
