"""The tokenizer's configuration (`TokenizerConfig`) and its sizes, without torch.

The pipeline validates a tokenizer section against these fields when a config loads
(tasks/config.py); `tok1d presets`, `status` and config errors must not pay for importing torch
and timm, so the dataclass lives apart from the network (models/tokenizer.py).
"""

from __future__ import annotations

from dataclasses import dataclass

# size name -> (width, depth, heads)
TOKENIZER_SIZES: dict[str, tuple[int, int, int]] = {
    "nano": (64, 2, 2),
    "tiny": (128, 4, 4),
    "S": (512, 8, 8),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
}


@dataclass
class TokenizerConfig:
    """A tokenizer's shape: image and patch size, transformer size, latent tokens, bottleneck, text."""

    image_size: int = 256
    channels: int = 3
    patch_size: int = 16
    size: str = "B"  # key of TOKENIZER_SIZES
    num_latent_tokens: int = 64
    bottleneck: str = "vq"  # key of models.quantizers.BOTTLENECKS: "vq" | "kl"
    codebook_size: int = 4096
    token_dim: int = 12
    commitment: float = 0.25
    dead_code_restart_steps: int = 0  # 0 = off
    text_dim: int = 0  # 0 = no text conditioning
    max_text_tokens: int = 0
    text_in_encoder: bool = True
    text_in_decoder: bool = True
    drop_path: float = 0.0
    kl_weight: float = 1e-6  # kl bottleneck only; scales the summed-per-image KL
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        # The bottleneck table holds torch modules; an instance is only made to build or load a
        # tokenizer, which imports torch anyway (a config section only reads the fields).
        from models.quantizers import BOTTLENECKS

        if self.size not in TOKENIZER_SIZES:
            raise ValueError(f"TokenizerConfig.size={self.size!r}; choose one of {sorted(TOKENIZER_SIZES)}")
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if not 8 <= self.num_latent_tokens <= 256:
            raise ValueError(f"num_latent_tokens={self.num_latent_tokens} must be in [8, 256]")
        if self.bottleneck not in BOTTLENECKS:
            raise ValueError(f"TokenizerConfig.bottleneck={self.bottleneck!r}; known: {sorted(BOTTLENECKS)}")
        if self.token_dim < 1:
            raise ValueError(f"token_dim must be >= 1, got {self.token_dim}")
        if not 0.0 <= self.drop_path < 1.0:
            raise ValueError(f"drop_path must be in [0, 1), got {self.drop_path}")
        if self.text_dim < 0:
            raise ValueError(f"text_dim must be >= 0 (0 = no text), got {self.text_dim}")
        if self.text_dim > 0:
            if self.max_text_tokens < 1:
                raise ValueError("text conditioning (text_dim > 0) needs max_text_tokens >= 1")
            if not (self.text_in_encoder or self.text_in_decoder):
                raise ValueError("text_dim > 0 but text_in_encoder and text_in_decoder are both False; "
                                 "set text_dim=0 for an unconditioned tokenizer")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2
