"""What a tokenizer needs to run on new images, beside its weights: `TokenizerSpec`.

A train-tokenizer artifact's tokenizer.json says the network and the token shape; how the
training images were made square (the ingest's `fit`) and which text encoder embedded the
captions (the embed-text section) are settings of the run that trained it, found through the
lineage views (tasks/lineage.py). An exported folder's config.json holds the same spec, so the
API treats a store artifact and an export alike. Torch-free.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Literal

from tasks.store import Manifest, Store, read_json

FORMAT = "tok1d-tokenizer/1"
# The ingest's default (tasks/config.py IngestConfig.fit) for tokenizers no recorded run trained.
DEFAULT_FIT = "center-crop"


@dataclass(frozen=True)
class Preprocessing:
    """How any image becomes a training-like input: RGB (alpha on white), made square by `fit`
    (centre crop or white padding) and resized with LANCZOS to `resolution` — the ingest's own
    steps (tasks/ingest/images.py) — then scaled to floats in [0, 1]."""

    resolution: int
    fit: Literal["center-crop", "pad"]
    # Where `fit` was read: the config of the run that trained the tokenizer, or the default.
    fit_from: str = "default"


@dataclass(frozen=True)
class TextSpec:
    """The text encoder a TexTok tokenizer's captions were embedded with (`embed_text.*` of its
    run): captions given to the API are embedded the same way, stored at `dtype` precision."""

    backend: str | None  # None: not recorded (e.g. a test artifact): captions cannot be embedded
    model: str | None
    encoder: str  # the embed-text encoder id: backend:model@revision
    max_tokens: int
    dtype: str
    dim: int
    in_encoder: bool
    in_decoder: bool


@dataclass(frozen=True)
class TokenizerSpec:
    """A tokenizer's network config (TokenizerConfig fields), token shape, preprocessing, text
    encoder (None without text) and the lineage ids it came from."""

    model: dict[str, Any]
    discrete: bool
    seq_len: int
    codebook_size: int | None
    token_dim: int
    image_size: int
    preprocessing: Preprocessing
    text: TextSpec | None
    lineage: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The config.json of an export (also what `HubTokenizer` takes as `config`)."""
        return {"format": FORMAT, **dataclasses.asdict(self)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TokenizerSpec:
        """The spec of an exported config.json; a clear error for a file that is not one."""
        if data.get("format") != FORMAT:
            raise ValueError(f"not a tok1d tokenizer config (format {data.get('format')!r}, expected {FORMAT!r}); "
                             "export one with `tok1d export`")
        text = data.get("text")
        return cls(
            model=dict(data["model"]), discrete=bool(data["discrete"]), seq_len=int(data["seq_len"]),
            codebook_size=data.get("codebook_size"), token_dim=int(data["token_dim"]),
            image_size=int(data["image_size"]), preprocessing=Preprocessing(**data["preprocessing"]),
            text=TextSpec(**text) if text else None, lineage=dict(data.get("lineage") or {}),
        )


def spec_from_store(manifest: Manifest, store: Store) -> TokenizerSpec:
    """The spec of a train-tokenizer artifact: its tokenizer.json plus the settings of the run that
    trained it (ingest.fit, embed_text.*), when lineage records one."""
    from tasks.train_tokenizer.read import INFO_FILE

    if manifest.stage != "train-tokenizer":
        raise ValueError(f"expected a train-tokenizer artifact, got one of stage {manifest.stage!r} ({manifest.artifact_id})")
    info = read_json(manifest.path(store, INFO_FILE))
    run = training_run(store, "train-tokenizer", manifest.artifact_id)
    config = run["config"] if run else {}
    fit = (config.get("ingest") or {}).get("fit")
    preprocessing = Preprocessing(int(info["image_size"]), fit or DEFAULT_FIT,
                                  f"run {run['run_id']}" if fit else "default (no training run recorded)")
    text = info.get("text") or {}
    lineage = {
        "tokenizer_artifact": manifest.artifact_id,
        "ingest_artifact": info.get("ingest_artifact"),
        "caption_artifact": text.get("caption_artifact"),
        "embed_text_artifact": text.get("embed_text_artifact"),
        "run_id": run["run_id"] if run else None,
        "stage_run_id": run["stage_run_id"] if run else None,
        "steps": info.get("steps"),
        "imported_from": info.get("imported_from"),
    }
    return TokenizerSpec(
        model=dict(info["config"]), discrete=bool(info["discrete"]), seq_len=int(info["seq_len"]),
        codebook_size=info.get("codebook_size"), token_dim=int(info["token_dim"]), image_size=int(info["image_size"]),
        preprocessing=preprocessing, text=_text_spec(text, config.get("embed_text")), lineage=lineage,
    )


def _text_spec(text: dict[str, Any], section: dict[str, Any] | None) -> TextSpec | None:
    if not text.get("uses_text"):
        return None
    encoder = str(text["encoder"])
    backend = model = None
    if section and encoder.startswith(f"{section['backend']}:{section['model']}@"):
        backend, model = section["backend"], section["model"]
    elif ":" in encoder and "@" in encoder:
        # The embed-text encoder id is f"{backend}:{model}@{revision}" (tasks/embed_text/stage.py).
        backend, rest = encoder.split(":", 1)
        model = rest.rsplit("@", 1)[0]
    return TextSpec(backend=backend, model=model, encoder=encoder, max_tokens=int(text["max_tokens"]),
                    dtype=str(text["dtype"]), dim=int(text["dim"]), in_encoder=bool(text["in_encoder"]),
                    in_decoder=bool(text["in_decoder"]))


def training_run(store: Store, stage: str, artifact_id: str) -> dict[str, Any] | None:
    """The latest completed run whose `stage` produced `artifact_id` (computed or from the cache):
    {run_id, stage_run_id, config (the whole resolved config as a dict)}; None when lineage has none."""
    from tasks import lineage

    connection = lineage.connect(store)
    try:
        row = connection.execute(
            """select s.run_id, s.stage_run_id, r.config from stages s join runs r on r.run_id = s.run_id
               where s.stage = ? and s.output_artifact = ? and s.status = 'completed' and r.config is not null
               order by s.cache_hit, s.event_time desc limit 1""",
            [stage, artifact_id],
        ).fetchone()
    finally:
        connection.close()
    if row is None:
        return None
    return {"run_id": row[0], "stage_run_id": row[1], "config": json.loads(row[2])}


def embeddings_text_spec(manifest: Manifest) -> TextSpec:
    """The encoder of an embed-text artifact (its summary), e.g. for a text-conditioned generator."""
    if manifest.stage != "embed-text":
        raise ValueError(f"expected an embed-text artifact, got one of stage {manifest.stage!r} ({manifest.artifact_id})")
    summary = manifest.summary
    spec = _text_spec({"uses_text": True, "encoder": summary.get("encoder", ""), "max_tokens": summary.get("max_tokens", 0),
                       "dtype": summary.get("dtype", "float32"), "dim": summary.get("dim", 0), "in_encoder": False,
                       "in_decoder": False}, None)
    assert spec is not None
    return spec


def stage_input(store: Store, stage: str, artifact_id: str, input_name: str) -> str | None:
    """The id of the `input_name` artifact that `stage` read to produce `artifact_id` (lineage)."""
    from tasks import lineage

    connection = lineage.connect(store)
    try:
        row = connection.execute(
            "select input_artifact from lineage where stage = ? and output_artifact = ? and input_name = ? "
            "order by event_time desc limit 1", [stage, artifact_id, input_name]).fetchone()
    finally:
        connection.close()
    return row[0] if row else None
