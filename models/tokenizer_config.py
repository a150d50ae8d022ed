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
# The keys of models.quantizers.BOTTLENECKS, whose classes are torch modules: validating a config
# must not import torch. tests/models/test_tokenizer.py ties the two (a new bottleneck goes in both).
BOTTLENECK_NAMES: tuple[str, ...] = ("vq", "kl")


@dataclass
class TokenizerConfig:
    """A tokenizer's shape: image and patch size, transformer size, latent tokens, bottleneck, text."""

    image_size: int = 256
    channels: int = 3
    patch_size: int = 16
    size: str = "B"  # key of TOKENIZER_SIZES
    num_latent_tokens: int = 64
    bottleneck: str = "vq"  # one of BOTTLENECK_NAMES (the keys of models.quantizers.BOTTLENECKS)
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
    # The reference layout of bytedance/1d-tokenizer's TiTok, which imported checkpoints use
    # (models/titok_import.py); the defaults are tok1d's own layout and parameter names.
    decoder_size: str = ""  # key of TOKENIZER_SIZES for the decoder; "" = the same as `size`
    class_token: bool = False  # a learned class token before the patch tokens, in encoder and decoder
    pre_norm: bool = False  # a LayerNorm before the first block (TiTok's ln_pre)
    output_conv: bool = False  # a 3x3 conv (channels -> channels) after unpatchify (TiTok's conv_out)
    centre_pixels: bool = True  # [0, 1] input centred to [-1, 1], output mapped back; False: raw
    l2_norm: bool = True  # vq: look up l2-normalised latents among l2-normalised codes; False: euclidean
    block_norm_eps: float = 1e-6  # the blocks' LayerNorm eps (timm's 1e-6; TiTok's nn.LayerNorm: 1e-5)

    def __post_init__(self) -> None:
        if self.size not in TOKENIZER_SIZES:
            raise ValueError(f"TokenizerConfig.size={self.size!r}; choose one of {sorted(TOKENIZER_SIZES)}")
        if self.decoder_size and self.decoder_size not in TOKENIZER_SIZES:
            raise ValueError(f"TokenizerConfig.decoder_size={self.decoder_size!r}; choose one of "
                             f"{sorted(TOKENIZER_SIZES)} or \"\" (the encoder's size)")
        if self.block_norm_eps <= 0:
            raise ValueError(f"block_norm_eps must be > 0, got {self.block_norm_eps}")
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} must be a multiple of patch_size={self.patch_size}")
        if not 8 <= self.num_latent_tokens <= 256:
            raise ValueError(f"num_latent_tokens={self.num_latent_tokens} must be in [8, 256]")
        if self.bottleneck not in BOTTLENECK_NAMES:
            raise ValueError(f"TokenizerConfig.bottleneck={self.bottleneck!r}; known: {sorted(BOTTLENECK_NAMES)}")
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
    def encoder_dims(self) -> tuple[int, int, int]:
        """(width, depth, heads) of the encoder."""
        return TOKENIZER_SIZES[self.size]

    @property
    def decoder_dims(self) -> tuple[int, int, int]:
        """(width, depth, heads) of the decoder (`decoder_size`, else the encoder's)."""
        return TOKENIZER_SIZES[self.decoder_size or self.size]

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2
