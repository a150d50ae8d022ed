"""Tiny whole pipeline runs (every stage, real lineage) for tests of what users do with the
results: the Python API and `tok1d export`. Run the way the flow runs them (execute_stage per
stage, the run recorded with its config), without Prefect; one store per test process, built
once per preset in a store of its own (about 10 s each on 2 cores)."""

from __future__ import annotations

import functools
import tempfile
from dataclasses import dataclass
from pathlib import Path

from flows.run_plan import run_record, stages_to_run
from tasks import lineage
from tasks.presets import load_config
from tasks.registry import get_stage
from tasks.runner import execute_stage
from tasks.store import Manifest, Store

# 48 Fashion-MNIST images at 16 px, 2 training steps per model, 8 samples scored against 12 training images.
TINY = [
    "ingest.source.max_images=48", "ingest.shard_rows=64", "ingest.resolution=16",
    "train_tokenizer.model.patch_size=4", "train_tokenizer.model.num_latent_tokens=8",
    "train_tokenizer.train.steps=2", "train_tokenizer.train.batch_size=8", "train_tokenizer.train.checkpoint_every=2",
    "train_tokenizer.train.log_every=1", "train_tokenizer.eval_images=8", "train_tokenizer.fid_images=-1",
    "train_tokenizer.grid_images=4", "train_tokenizer.perceptual=none", "pretokenize.decode_check_images=4",
    "train_generator.train.steps=2", "train_generator.train.batch_size=8", "train_generator.train.checkpoint_every=2",
    "train_generator.train.log_every=1", "evaluate.num_samples=8", "evaluate.batch_size=8",
    "evaluate.reference_split=train", "evaluate.reference_images=12", "evaluate.grid_images=4", "runtime.device=cpu",
    "runtime.threads=1",
]


@dataclass(frozen=True)
class PipelineRun:
    """A completed run: its store, run id and each stage's artifact."""

    store: Store
    run_id: str
    manifests: dict[str, Manifest]


@functools.lru_cache(maxsize=None)
def _root() -> Path:
    return Path(tempfile.mkdtemp(prefix="tok1d-tiny-pipeline-"))


@functools.lru_cache(maxsize=None)
def tiny_run(preset: str) -> PipelineRun:
    """`preset` (smoke: VQ + MaskGIT; smoke-textok: captions, KL TexTok + DiT) at the TINY sizes,
    in a store holding only this run."""
    config = load_config(preset, TINY)
    store = Store(_root() / preset)
    lineage.ensure_database(store)
    record = run_record(config, preset=preset, flow="tests-tiny-pipeline", flow_run_id=None, overrides=TINY)
    lineage.record_run(store, status="running", **record)
    results: dict[str, Manifest] = {}
    for name in stages_to_run(config):
        inputs = {upstream: results[upstream] for upstream in get_stage(name).inputs(config)}
        results[name] = execute_stage(name, config.section(name), inputs, store, config.runtime,
                                      run_id=record["run_id"]).manifest
    lineage.record_run(store, status="completed", ended_at=lineage.now(), **record)
    return PipelineRun(store, record["run_id"], results)
