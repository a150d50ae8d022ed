"""`tok1d.Tokenizer`: a trained 1D tokenizer on new images, from the store or an exported folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from models.tokenizer import Tokenizer as TokenizerModel
from tasks.export.artifacts import find_artifact
from tasks.export.spec import TokenizerSpec, spec_from_store
from tasks.store import Store
from tasks.training.loop import autocast
from tok1d.images import Images, Output, from_batch, to_batch
from tok1d.text import CaptionEmbedder

CONFIG_FILE = "config.json"


class Tokenizer:
    """A TiTok (discrete ids) or TexTok (continuous tokens, caption-conditioned) tokenizer in eval
    mode, with the preprocessing its training images had and, for TexTok, its text encoder.

    Load it with `Tokenizer.load(artifact id | artifact folder | exported folder)` or
    `Tokenizer.from_pretrained(exported folder | hub repo id)`; then `encode(images)` gives
    tokens and `decode(tokens)` gives images back."""

    def __init__(self, model: TokenizerModel, spec: TokenizerSpec, device: str | torch.device = "cpu"):
        self.model = model.eval().requires_grad_(False)
        self.spec = spec
        self.device = torch.device(device)
        self._text = CaptionEmbedder(spec.text, self.device) if spec.text is not None else None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, source: str | Path, *, store: str | Path | Store | None = None,
             device: str | torch.device = "cpu") -> Tokenizer:
        """A train-tokenizer artifact by id (a unique prefix will do) in `store` (default
        $TOK1D_STORE or ./store), the artifact's folder, or a folder `tok1d export` wrote."""
        path = Path(source).expanduser()
        if path.is_dir() and (path / CONFIG_FILE).is_file():
            return cls.from_pretrained(path, device=device)
        from tasks.train_tokenizer.read import load_tokenizer

        manifest, found = find_artifact(source, "train-tokenizer", store)
        model, _ = load_tokenizer(manifest, found, device=device, ema=True)
        return cls(model, spec_from_store(manifest, found), device)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, *, device: str | torch.device = "cpu",
                        **hub_kwargs: Any) -> Tokenizer:
        """An exported folder or a Hugging Face hub repo id (huggingface_hub's from_pretrained;
        `hub_kwargs`: revision, token, cache_dir, local_files_only...)."""
        from tasks.export.hub import HubTokenizer

        model = HubTokenizer.from_pretrained(path_or_repo, map_location=str(device), **hub_kwargs)
        return cls(model, model.spec, device)

    # ------------------------------------------------------------------ what it is

    @property
    def discrete(self) -> bool:
        """True: tokens are codebook ids [B, N]; False: continuous vectors [B, N, token_dim]."""
        return self.spec.discrete

    @property
    def seq_len(self) -> int:
        return self.spec.seq_len

    @property
    def token_dim(self) -> int:
        return self.spec.token_dim

    @property
    def codebook_size(self) -> int | None:
        return self.spec.codebook_size

    @property
    def resolution(self) -> int:
        """Side of the square images it encodes and decodes."""
        return self.spec.preprocessing.resolution

    @property
    def uses_text(self) -> bool:
        """Whether encode/decode take captions (TexTok)."""
        return self.spec.text is not None

    def __repr__(self) -> str:
        kind = f"{self.seq_len} ids < {self.codebook_size}" if self.discrete else f"{self.seq_len}x{self.token_dim} continuous"
        text = f", captions by {self.spec.text.encoder}" if self.spec.text else ""
        return f"tok1d.Tokenizer({self.resolution}px -> {kind} tokens{text}, {self.spec.lineage.get('tokenizer_artifact')})"

    # ------------------------------------------------------------------ use

    def preprocess(self, images: Images) -> torch.Tensor:
        """Images as the tokenizer sees them: float [B, 3, R, R] in [0, 1] on its device."""
        return to_batch(images, self.spec.preprocessing).to(self.device)

    def embed_captions(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(tokens [B, T, D], mask [B, T]) of captions, by the encoder the tokenizer was trained with."""
        if self._text is None:
            raise ValueError("this tokenizer takes no captions (it was trained without text)")
        return self._text.embed(captions)

    def _text_for(self, captions: Sequence[str] | None, batch: int, where: str) -> tuple[torch.Tensor | None, ...]:
        spec = self.spec.text
        wanted = spec is not None and (spec.in_encoder if where == "encode" else spec.in_decoder)
        if captions is None:
            if wanted:
                raise ValueError(f"this tokenizer {where}s with captions (TexTok): pass captions=[...], one per image")
            return None, None
        if spec is None:
            raise ValueError("this tokenizer takes no captions (it was trained without text); leave captions out")
        if isinstance(captions, str):
            captions = [captions]
        if len(captions) != batch:
            raise ValueError(f"{len(captions)} captions for {batch} images; give one caption per image")
        return self.embed_captions(captions) if wanted else (None, None)

    @torch.no_grad()
    def encode(self, images: Images, captions: Sequence[str] | None = None) -> torch.Tensor:
        """Tokens of `images` (PIL images, uint8 arrays or float tensors of any size, made square and
        resized as the training images were): ids [B, N] (int64) for a discrete tokenizer, else
        float32 [B, N, token_dim] (the posterior mean). A TexTok needs one caption per image."""
        pixels = self.preprocess(images)
        text, mask = self._text_for(captions, pixels.shape[0], "encode")
        with autocast(self.device, "auto"):
            tokens, _, _ = self.model.encode(pixels, text, mask)
        return tokens.long() if self.discrete else tokens.float()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor | np.ndarray, captions: Sequence[str] | None = None,
               output: Output = "pil") -> list[Image.Image] | np.ndarray | torch.Tensor:
        """Images of `tokens` (as `encode` returns them; one image's tokens alone will do): a list of
        PIL images (output="pil"), uint8 [B, R, R, 3] ("uint8") or float [B, 3, R, R] in [0, 1] ("tensor")."""
        tokens = self._check_tokens(torch.as_tensor(tokens))
        text, mask = self._text_for(captions, tokens.shape[0], "decode")
        with autocast(self.device, "auto"):
            images = self.model.decode(tokens, text, mask)
        return from_batch(images, output)

    def _check_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        single = 1 if self.discrete else 2
        if tokens.ndim == single:
            tokens = tokens.unsqueeze(0)
        if self.discrete:
            if tokens.is_floating_point() or tokens.ndim != 2 or tokens.shape[1] != self.seq_len:
                raise ValueError(f"expected integer ids [B, {self.seq_len}], got {tokens.dtype} {list(tokens.shape)}")
            if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= int(self.codebook_size or 0)):
                raise ValueError(f"token ids must lie in [0, {self.codebook_size}); got {int(tokens.min())}..{int(tokens.max())}")
            return tokens.long().to(self.device)
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != (self.seq_len, self.token_dim):
            raise ValueError(f"expected continuous tokens [B, {self.seq_len}, {self.token_dim}], got {list(tokens.shape)}")
        return tokens.float().to(self.device)
