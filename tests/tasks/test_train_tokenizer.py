"""The train-tokenizer stage: VQ and KL (+text) training, outputs, exact resume after kill -9."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tasks.config import EmbedTextConfig, RuntimeConfig, TrainTokenizerConfig
from tasks.embed_text.read import TextSource
from tasks.pipeline_config import PipelineConfig
from tasks.runner import execute_stage
from tasks.train_tokenizer.data import BatchLoader, TrainImages
from tasks.train_tokenizer.read import load_tokenizer
from tasks.train_tokenizer.stage import STAGE, run_train_tokenizer
from tasks.train_tokenizer.trainer import TokenizerTrainer
from tasks.training.distributed import setup
from tasks.training.job import TrainingJob

from builders.fashion import IMAGES, build_inputs
from builders.tokenizer import tiny_config, train_and_commit
from builders.tokenizer import tokenizer_context as context
from helpers import start_and_kill_after_checkpoint


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    torch.set_num_threads(1)
    return build_inputs(tmp_path_factory.mktemp("inputs"))


def test_the_tokenizer_reads_captions_only_with_use_text():
    assert STAGE.name == "train-tokenizer" and STAGE.config is TrainTokenizerConfig
    assert STAGE.inputs(PipelineConfig(name="vq")) == ("ingest",)
    textok = PipelineConfig(name="textok", train_tokenizer=TrainTokenizerConfig(use_text=True))
    assert STAGE.inputs(textok) == ("ingest", "caption", "embed-text")


def test_vq_training_writes_the_artifact(tmp_path, inputs):
    store, manifests = inputs
    output, manifest = train_and_commit(store, manifests, tiny_config("vq"), tmp_path / "work")
    summary = output.summary
    assert summary["steps"] == 6 and summary["resumed_from"] == 0 and summary["processes"] == 1
    assert summary["eval_images"] == 6 and summary["eval_split"] == "val"
    for key in ("psnr", "ssim", "rfid", "codebook_usage", "perplexity", "final_l2", "final_d_loss"):
        assert np.isfinite(summary[key]), key
    assert 0 < summary["codebook_usage"] <= 1 and 1 <= summary["perplexity"] <= 64
    files = {f.path for f in manifest.files}
    assert {"tokenizer.safetensors", "tokenizer-raw.safetensors", "tokenizer.json", "losses.png",
            "reconstructions.png", "losses.jsonl", "reconstructions/part-00000.parquet"} <= files
    assert summary["loss_plot"] in files and summary["reconstruction_grid"] in files
    steps = [json.loads(line)["step"] for line in manifest.path(store, "losses.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert output.tables["reconstructions"].rows == 6

    # Originals on top, reconstructions below: 4 cells of 16px upscaled to 64px, two rows.
    grid = np.asarray(Image.open(manifest.path(store, "reconstructions.png")))
    assert grid.shape[1] == 4 * 64 + 5 * 2 and grid.shape[0] > 2 * 64

    model, info = load_tokenizer(manifest, store)
    assert not model.training and info["discrete"] and info["seq_len"] == 8 and info["codebook_size"] == 64
    assert info["text"] == {"uses_text": False} and info["config"]["image_size"] == 16
    ema = load_file(manifest.path(store, "tokenizer.safetensors"))
    raw = load_file(manifest.path(store, "tokenizer-raw.safetensors"))
    assert all(torch.equal(model.state_dict()[k], v) for k, v in ema.items())
    assert not all(torch.equal(ema[k], raw[k]) for k in raw)  # EMA weights lag the raw ones
    tokens, _, _ = model.encode(torch.rand(2, 3, 16, 16))
    assert tokens.shape == (2, 8) and tokens.dtype == torch.long


def test_kl_with_text_and_inception_perceptual(tmp_path, inputs):
    store, manifests = inputs
    config = tiny_config("kl", use_text=True, perceptual="inception", train={"steps": 3, "checkpoint_every": 3})
    output, manifest = train_and_commit(store, manifests, config, tmp_path / "work")
    assert np.isfinite(output.summary["final_perceptual"]) and output.summary["final_perceptual"] > 0
    assert "codebook_usage" not in output.summary and np.isfinite(output.summary["final_kl"])
    model, info = load_tokenizer(manifest, store)
    text = info["text"]
    assert text["uses_text"] and text["dim"] == 384 and text["max_tokens"] == 8
    assert text["embed_text_artifact"] == manifests["embed-text"].artifact_id
    assert model.uses_text and not info["discrete"]
    source = TextSource(manifests["caption"], manifests["embed-text"], store)
    image_ids = list(source.caption_of)[:2]
    tokens, mask = source.lookup(image_ids)
    latents, _, _ = model.encode(torch.rand(2, 3, 16, 16), tokens, mask)
    assert latents.shape == (2, 8, 8)
    with pytest.raises(ValueError, match="needs text"):
        model.encode(torch.rand(2, 3, 16, 16))


def test_ema_warms_up_so_a_short_run_keeps_little_of_the_initial_weights(tmp_path, inputs):
    store, manifests = inputs
    # KL and no GAN: every weight that moves is moved by the optimizer (no dead-code restarts).
    config = tiny_config("kl", loss={"gan_weight": 0.0}, train={"ema_decay": 0.999}, eval_images=2, grid_images=0)
    ctx = context(store, manifests, config, tmp_path / "work")
    # The weights training starts from, as the trainer builds them.
    init = TokenizerTrainer(TrainingJob.from_context(TokenizerTrainer, ctx), setup("cpu")).model.state_dict()
    _, manifest = train_and_commit(store, manifests, config, tmp_path / "work")
    ema = load_file(manifest.path(store, "tokenizer.safetensors"))
    raw = load_file(manifest.path(store, "tokenizer-raw.safetensors"))
    moved = [key for key in raw if raw[key].is_floating_point() and not torch.equal(raw[key], init[key])]
    assert moved
    init, ema, raw = (torch.cat([state[key].float().flatten() for key in moved]) for state in (init, ema, raw))
    # A fixed 0.999 keeps 0.999**6 = 99.4% of the initial weights; warmed up, 6 steps keep 2e-4.
    assert (ema - raw).norm() < 0.5 * (init - raw).norm()


def test_training_lowers_the_reconstruction_loss(tmp_path, inputs):
    store, manifests = inputs
    config = tiny_config("kl", loss={"gan_weight": 0.0}, train={"steps": 30, "checkpoint_every": 30, "ema_decay": 0.0,
                                                             "warmup_steps": 5}, eval_images=4)
    output, manifest = train_and_commit(store, manifests, config, tmp_path / "work")
    history = [json.loads(line) for line in manifest.path(store, "losses.jsonl").read_text().splitlines()]
    first, last = np.mean([h["l2"] for h in history[:3]]), np.mean([h["l2"] for h in history[-3:]])
    assert last < 0.6 * first, (first, last)
    assert "final_d_loss" not in output.summary  # no discriminator without gan_weight


def test_kill_then_resume_gives_the_uninterrupted_weights(tmp_path, inputs):
    torch.set_num_threads(1)
    store, manifests = inputs
    # KL sampling, drop path, the GAN and hflip all draw random numbers that must replay exactly.
    config = tiny_config("kl", model={"drop_path": 0.1}, hflip=True,
                         train={"steps": 9, "checkpoint_every": 3, "ema_decay": 0.9}, eval_images=2, grid_images=2)
    killed_work = tmp_path / "killed"
    checkpoint_step = start_and_kill_after_checkpoint(tmp_path, store, manifests, config, killed_work)
    assert checkpoint_step < 9
    assert not (killed_work / "output" / "tokenizer.safetensors").exists()

    resumed, resumed_manifest = train_and_commit(store, manifests, config, killed_work)
    assert resumed.summary["steps"] == 9 and resumed.summary["resumed_from"] == checkpoint_step >= 3
    steps = [json.loads(line)["step"] for line in resumed_manifest.path(store, "losses.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 10))  # entries of the killed run after its checkpoint were dropped, not doubled

    straight, straight_manifest = train_and_commit(store, manifests, config, tmp_path / "straight")
    assert straight.summary["resumed_from"] == 0
    for name in ("tokenizer.safetensors", "tokenizer-raw.safetensors"):
        a, b = load_file(resumed_manifest.path(store, name)), load_file(straight_manifest.path(store, name))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}:{key} differs after resume"
    model, _ = load_tokenizer(resumed_manifest, store)
    assert model.config.bottleneck == "kl"


def test_train_order_flips_and_prefetch_are_deterministic(inputs):
    store, manifests = inputs
    images = TrainImages(manifests["ingest"], store, seed=3, shuffle_group=2, hflip=True)
    val = TrainImages(manifests["ingest"], store, seed=3, shuffle_group=2, split="val")
    assert len(images) + len(val) == IMAGES
    assert np.array_equal(images.flips(1), TrainImages(manifests["ingest"], store, 3, 2, hflip=True).flips(1))
    assert not np.array_equal(images.flips(0), images.flips(1))
    rows = images.order.epoch(0)[:8]
    plain = TrainImages(manifests["ingest"], store, seed=3, shuffle_group=2).batch(rows, 0)
    flipped = images.batch(rows, 0)
    mirrored = images.flips(0)[rows]
    assert mirrored.any() and not mirrored.all()
    assert torch.equal(flipped.images[mirrored], plain.images[mirrored].flip(-1))
    assert torch.equal(flipped.images[~mirrored], plain.images[~mirrored])
    # A small split is decoded once and kept; decoding every batch gives the same batches.
    assert images.decoded() is not None
    per_batch = TrainImages(manifests["ingest"], store, seed=3, shuffle_group=2, hflip=True, decoded_limit_bytes=0)
    assert per_batch.decoded() is None
    rows = images.order.epoch(1)  # every row, across shards
    kept, decoded_now = images.batch(rows, 1), per_batch.batch(rows, 1)
    assert kept.image_ids == decoded_now.image_ids and np.array_equal(kept.label_ids, decoded_now.label_ids)
    assert torch.equal(kept.images, decoded_now.images) and kept.images.stride() == decoded_now.images.stride()

    direct = BatchLoader(images, 8, rank=1, world=2, workers=0)
    steps_per_epoch = len(images) // 8
    for workers in (1, 2):  # one worker once deadlocked: the prefetch waited for its own decodes
        threaded = BatchLoader(images, 8, rank=1, world=2, workers=workers)
        for step in range(steps_per_epoch + 2):  # crosses an epoch boundary
            rows = direct.rows_of(step)
            assert len(rows) == 4
            a, b = direct.get(rows, step), threaded.get(rows, step)
            assert a.image_ids == b.image_ids and torch.equal(a.images, b.images)
        threaded.close()


def test_bad_settings_are_named(tmp_path, inputs):
    store, manifests = inputs
    with pytest.raises(ValueError, match="exceeds the .* training images"):
        run_train_tokenizer(context(store, manifests, tiny_config(train={"batch_size": 4096}), tmp_path / "a"))
    with pytest.raises(ValueError, match="multiple of the 3 training processes"):
        run_train_tokenizer(context(store, manifests, tiny_config(), tmp_path / "b", RuntimeConfig(device="cpu", processes=3)))
    with pytest.raises(FileNotFoundError, match="lpips_path"):
        run_train_tokenizer(context(store, manifests, tiny_config(perceptual="lpips"), tmp_path / "c"))
    no_text = execute_stage("embed-text", EmbedTextConfig(backend="none"), {"caption": manifests["caption"]}, store).manifest
    with pytest.raises(ValueError, match="embed_text.backend"):
        run_train_tokenizer(context(store, {**manifests, "embed-text": no_text}, tiny_config(use_text=True), tmp_path / "d"))


def test_training_curves_are_queryable_in_duckdb(tmp_path, inputs):
    import duckdb

    from tasks import lineage
    from tasks.store import Store

    import shutil

    source, manifests = inputs
    shutil.copytree(source.root, tmp_path / "store")  # a copy: the module's store stays as it is
    store = Store(tmp_path / "store")
    result = execute_stage("train-tokenizer", tiny_config(), {"ingest": manifests["ingest"]}, store)
    logged = [json.loads(line) for line in (store.root / result.manifest.root / "losses.jsonl").read_text().splitlines()]
    lineage.ensure_database(store)
    with duckdb.connect(str(store.duckdb_path), read_only=True) as connection:
        rows = connection.execute(
            "select t.step, t.value from train_steps t join stages s using (stage_run_id) "
            "where s.status = 'completed' and t.name = 'total' order by t.step").fetchall()
        names = {n for (n,) in connection.execute("select distinct name from train_steps").fetchall()}
    assert rows == [(entry["step"], entry["total"]) for entry in logged] and len(rows) == 6
    assert {"total", "lr_factor"} <= names
