"""Real ingest, caption and embed-text artifacts of a tiny Fashion-MNIST: the stages themselves run
(execute_stage), for tests of the stages downstream that want genuine inputs."""

from __future__ import annotations

from pathlib import Path

from tasks.config import CaptionConfig, EmbedTextConfig, IngestConfig, SourceConfig
from tasks.runner import execute_stage
from tasks.store import Manifest, Store

IMAGES = 64  # Fashion-MNIST images at 16x16: 2 ingest shards, ~48 train / ~16 val


def build_inputs(root: Path, embed_backend: str = "sentence-transformers") -> tuple[Store, dict[str, Manifest]]:
    """A store under `root` holding ingest (IMAGES images, 16x16, shards of 32), caption (label
    templates) and embed-text (`embed_backend`, 8 tokens) outputs; returns it and the manifests."""
    store = Store(root / "store")
    ingest = execute_stage(
        "ingest",
        IngestConfig(source=SourceConfig(kind="fashion-mnist", max_images=IMAGES), resolution=16, shard_rows=32, val_fraction=0.25),
        {},
        store,
    ).manifest
    caption = execute_stage("caption", CaptionConfig(backend="label"), {"ingest": ingest}, store).manifest
    embed = execute_stage("embed-text", EmbedTextConfig(backend=embed_backend, max_tokens=8), {"caption": caption}, store).manifest
    return store, {"ingest": ingest, "caption": caption, "embed-text": embed}
