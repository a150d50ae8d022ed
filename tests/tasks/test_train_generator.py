"""The train-generator stage on fabricated token tables: MaskGIT, DiT (class and text), exact resume."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from safetensors.torch import load_file

from tasks.config import RuntimeConfig, SamplingConfig, TrainConfig, TrainGeneratorConfig
from tasks.pipeline_config import PipelineConfig
from tasks.stage import StageContext
from tasks.store import Manifest, Store
from tasks.train_generator.kind_names import KIND_NAMES
from tasks.train_generator.kinds import KINDS, resolve_kind
from tasks.train_generator.read import EMA_WEIGHTS, RAW_WEIGHTS, load_generator
from tasks.train_generator.stage import STAGE, run_train_generator

from builders.embed_text import embed_artifact, random_batch
from builders.store import commit_output
from builders.tokens import token_artifact as build_tokens

REPO = Path(__file__).resolve().parents[2]
SEQ_LEN, CODEBOOK, TOKEN_DIM, CLASSES = 8, 16, 4, 3


def token_artifact(store: Store, discrete: bool, rows: int = 64, seed: int = 0) -> Manifest:
    """A pretokenize artifact in two shards (so the epoch order really spans shards): train tokens
    that depend on the label; every 8th row is "val" and holds values no training may see (an
    out-of-codebook id, or 1e4 for continuous tokens)."""
    rng = np.random.default_rng(seed)
    labels = np.arange(rows) % CLASSES
    split = np.where(np.arange(rows) % 8 == 7, "val", "train")
    if discrete:
        values = (labels[:, None] * 5 + rng.integers(0, 2, (rows, SEQ_LEN))) % CODEBOOK
        values[split == "val"] = CODEBOOK  # not a codebook id: MaskGIT rejects it
    else:
        # Channels with their own offsets, so the pooled std differs from any per-channel one.
        values = rng.normal(size=(rows, SEQ_LEN, TOKEN_DIM)) * 3 + labels[:, None, None] + 2 * np.arange(TOKEN_DIM)
        values[split == "val"] = 1e4
    return build_tokens(store, values, labels, split, class_names=[f"class {k}" for k in range(CLASSES)],
                        token_dim=TOKEN_DIM, codebook_size=CODEBOOK,
                        caption_ids=[f"cap-{label}-{i % 2}" for i, label in enumerate(labels)], shards=2)


def text_artifact(store: Store, dim: int = 6, max_tokens: int = 5) -> Manifest:
    """An embed-text artifact holding every caption id the token tables use."""
    ids = [f"cap-{label}-{i}" for label in range(CLASSES) for i in range(2)]
    return embed_artifact(store, ids, ids, random_batch(len(ids), max_tokens, dim, seed=1))


def generator_config(steps: int = 6, **overrides) -> TrainGeneratorConfig:
    train = dict(steps=steps, batch_size=8, lr=3e-3, warmup_steps=2, checkpoint_every=2, log_every=1, ema_decay=0.5)
    train.update(overrides.pop("train", {}))
    fields = dict(width=32, depth=1, heads=2, diffusion_steps=100, train=TrainConfig(**train))
    fields.update(overrides)
    return TrainGeneratorConfig(**fields)


def context(store: Store, config: TrainGeneratorConfig, inputs: dict[str, Manifest], work: Path,
            threads: int | None = None) -> StageContext:
    return StageContext("train-generator", config, inputs, store, RuntimeConfig(device="cpu", threads=threads),
                        "k" * 64, work)


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_the_generator_reads_captions_only_when_text_conditioned():
    assert STAGE.name == "train-generator" and STAGE.config is TrainGeneratorConfig
    assert STAGE.inputs(PipelineConfig(name="class")) == ("pretokenize",)
    text = PipelineConfig(name="text", train_generator=TrainGeneratorConfig(conditioning="text"))
    assert STAGE.inputs(text) == ("caption", "embed-text", "pretokenize")


def test_the_config_check_knows_exactly_the_kinds():
    # The config validates against a torch-free copy of the table's names: one source of truth.
    assert sorted(KIND_NAMES) == sorted(KINDS)


def test_auto_picks_the_kind_whose_tokens_match():
    for discrete in (True, False):
        kind = resolve_kind(TrainGeneratorConfig(), {"discrete": discrete})
        assert kind.discrete == discrete and KINDS[kind.name] is kind
    assert resolve_kind(TrainGeneratorConfig(conditioning="text"), {"discrete": False}).supports_text


def test_maskgit_learns_the_train_tokens_only(tmp_path, store):
    tokens = token_artifact(store, discrete=True)
    ctx = context(store, generator_config(steps=40), {"pretokenize": tokens}, tmp_path / "w")
    output = run_train_generator(ctx)

    summary = output.summary
    assert summary["kind"] == "maskgit" and summary["steps"] == 40 and summary["train_rows"] == 56
    history = [json.loads(line) for line in (ctx.output_dir / "losses.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 41))
    first, last = np.mean([h["loss"] for h in history[:5]]), np.mean([h["loss"] for h in history[-5:]])
    assert last < first - 0.3, (first, last)  # tokens follow the label: a small model learns them
    assert summary["final_loss"] == pytest.approx(history[-1]["loss"])
    assert {p.name for p in ctx.output_dir.iterdir()} == {
        "generator.safetensors", "generator-raw.safetensors", "generator.json", "losses.jsonl", "losses.png"}

    artifact = commit_output(store, ctx, output)
    ema_gen, info = load_generator(artifact, store)
    raw_gen, _ = load_generator(artifact, store, ema=False)
    assert info["tokens_artifact"] == tokens.artifact_id and info["model"]["vocab_size"] == CODEBOOK
    assert not torch.equal(ema_gen.model.head.weight, raw_gen.model.head.weight)  # EMA is its own copy
    rng = torch.Generator().manual_seed(0)
    ids = raw_gen.sample(torch.arange(6) % CLASSES, SamplingConfig(steps=4, guidance_scale=1.0), rng)
    assert ids.shape == (6, SEQ_LEN) and int(ids.max()) < CODEBOOK
    # Class k's tokens are 5k or 5k+1: the trained model should mostly produce those.
    expected = (torch.arange(6) % CLASSES)[:, None] * 5
    assert ((ids == expected) | (ids == expected + 1)).float().mean() > 0.5


def test_dit_uses_the_train_token_scale(tmp_path, store):
    tokens = token_artifact(store, discrete=False)
    ctx = context(store, generator_config(steps=4), {"pretokenize": tokens}, tmp_path / "w")
    output = run_train_generator(ctx)

    table = pq.read_table([str(p) for p in tokens.table_files(store, "tokens")])
    train = np.array([row for row, split in zip(table["tokens"].to_pylist(), table["split"].to_pylist())
                      if split == "train"], np.float64)
    assert output.summary["kind"] == "dit"
    # One scale for every value, combined from pretokenize's per-channel statistics.
    assert output.summary["token_scale"] == pytest.approx(train.std(), rel=1e-6)
    artifact = commit_output(store, ctx, output)
    generator, info = load_generator(artifact, store)
    assert info["scale"] == output.summary["token_scale"] and info["diffusion"] == {"steps": 100, "learn_sigma": True}
    sampling = SamplingConfig(steps=5, guidance_scale=2.0)
    labels = torch.arange(4) % CLASSES
    a = generator.sample(labels, sampling, torch.Generator().manual_seed(3))
    b = generator.sample(labels, sampling, torch.Generator().manual_seed(3))
    assert a.shape == (4, SEQ_LEN, TOKEN_DIM) and torch.equal(a, b)


def test_ema_warms_up_so_a_short_run_keeps_little_of_the_initial_weights(tmp_path, store):
    tokens = token_artifact(store, discrete=False)
    ctx = context(store, generator_config(steps=30, train={"ema_decay": 0.999}), {"pretokenize": tokens}, tmp_path / "w")
    run_train_generator(ctx)
    ema, raw = load_file(ctx.output_dir / EMA_WEIGHTS), load_file(ctx.output_dir / RAW_WEIGHTS)
    # adaLN-Zero starts the output layer at zero: a fixed 0.999 would leave the EMA's at ~3% of the raw one's.
    final = [key for key in raw if key.startswith("final_layer.linear.weight")]
    assert final, sorted(raw)
    for key in final:
        assert ema[key].norm() > 0.5 * raw[key].norm(), key


def test_text_conditioned_dit_and_clear_errors(tmp_path, store):
    continuous, discrete, texts = token_artifact(store, False), token_artifact(store, True), text_artifact(store)
    ctx = context(store, generator_config(steps=2, conditioning="text"),
                  {"pretokenize": continuous, "embed-text": texts}, tmp_path / "text")
    output = run_train_generator(ctx)
    info = json.loads((ctx.output_dir / "generator.json").read_text())
    assert output.summary["conditioning"] == "text"
    assert info["model"]["text_dim"] == 6 and info["model"]["num_classes"] == 0 and info["text"]["max_tokens"] == 5

    with pytest.raises(ValueError, match="MaskGIT supports only class conditioning"):
        run_train_generator(context(store, generator_config(conditioning="text"),
                                    {"pretokenize": discrete, "embed-text": texts}, tmp_path / "a"))
    with pytest.raises(ValueError, match="kind=dit needs continuous"):
        run_train_generator(context(store, generator_config(kind="dit"), {"pretokenize": discrete}, tmp_path / "b"))
    with pytest.raises(ValueError, match="kind=maskgit needs discrete"):
        run_train_generator(context(store, generator_config(kind="maskgit"), {"pretokenize": continuous}, tmp_path / "c"))
    with pytest.raises(ValueError, match="batch size 100 is larger than the table"):
        run_train_generator(context(store, generator_config(train={"batch_size": 100}), {"pretokenize": discrete},
                                    tmp_path / "d"))


CHILD = textwrap.dedent("""
    import json, sys, time
    from pathlib import Path
    import torch
    import tasks.training.loop as loop
    from tasks.config import RuntimeConfig, TrainGeneratorConfig
    from tasks.stage import StageContext
    from tasks.store import Manifest, Store
    from tasks.train_generator.stage import run_train_generator

    spec = json.loads(Path(sys.argv[1]).read_text())
    original = loop.lr_factor

    def lr_factor(step, *rest):
        # Called once per step: slow after the first checkpoint, so the parent's SIGKILL lands mid-training.
        if step >= 2:
            time.sleep(0.4)
        return original(step, *rest)

    loop.lr_factor = lr_factor
    ctx = StageContext("train-generator", TrainGeneratorConfig.model_validate(spec["config"]),
                       {"pretokenize": Manifest.model_validate(spec["manifest"])}, Store(spec["store"]),
                       RuntimeConfig(device="cpu", threads=1), "k" * 64, Path(spec["work"]))
    run_train_generator(ctx)
""")


@pytest.mark.parametrize("discrete", [True, False], ids=["maskgit", "dit"])
def test_resume_after_sigkill_gives_the_uninterrupted_weights(tmp_path, store, discrete):
    tokens = token_artifact(store, discrete=discrete)
    config = generator_config(steps=8)
    killed_work = tmp_path / "killed"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"config": config.model_dump(mode="json"), "manifest": tokens.model_dump(mode="json"),
                                "store": str(store.root), "work": str(killed_work)}))
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(tmp_path / "child.log", "w") as log:
        child = subprocess.Popen([sys.executable, str(script), str(spec)], cwd=REPO, env=env, stdout=log, stderr=log)
        latest = killed_work / "checkpoints" / "latest"
        deadline = time.monotonic() + 90
        while not latest.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL, (tmp_path / "child.log").read_text()[-2000:]
    assert not (killed_work / "output" / "generator.safetensors").exists()  # it really died mid-run

    resumed = run_train_generator(context(store, config, {"pretokenize": tokens}, killed_work, threads=1))
    plain_ctx = context(store, config, {"pretokenize": tokens}, tmp_path / "plain", threads=1)
    plain = run_train_generator(plain_ctx)

    assert resumed.summary["resumed_from"] >= 2 and plain.summary["resumed_from"] == 0
    for name in ("generator.safetensors", "generator-raw.safetensors", "losses.jsonl"):
        assert (killed_work / "output" / name).read_bytes() == (plain_ctx.output_dir / name).read_bytes(), name
    assert resumed.summary["final_loss"] == plain.summary["final_loss"]
    assert math.isfinite(plain.summary["final_loss"])


def test_two_processes_through_torchrun(tmp_path, store):
    """runtime.processes=2 launches torchrun (gloo on CPU); each process takes half of every batch."""
    tokens = token_artifact(store, discrete=True)
    ctx = StageContext("train-generator", generator_config(steps=3), {"pretokenize": tokens}, store,
                       RuntimeConfig(device="cpu", processes=2, threads=1), "k" * 64, tmp_path / "w")
    output = run_train_generator(ctx)
    assert output.summary["processes"] == 2 and output.summary["steps"] == 3
    assert math.isfinite(output.summary["final_loss"])
    assert (ctx.output_dir / "generator.safetensors").is_file()
    with pytest.raises(ValueError, match="multiple of the 3 training processes"):
        run_train_generator(StageContext("train-generator", generator_config(), {"pretokenize": tokens}, store,
                                         RuntimeConfig(device="cpu", processes=3), "k" * 64, tmp_path / "x"))
