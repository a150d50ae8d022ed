"""1D image tokenizer: TiTok (An Image is Worth 32 Tokens) with optional TexTok text
conditioning (Language-Guided Image Tokenization).

Encoder: [patch embeddings, (text tokens), latent tokens] -> ViT -> keep the latent tokens
-> linear to the bottleneck (VQ ids or KL Gaussian: `BOTTLENECKS` in models/quantizers.py).
Decoder: [mask token per patch, (text tokens), projected latent tokens] -> ViT -> keep the
patch positions -> linear to pixels -> unpatchify. All tensors are batch-first; attention is
timm's Block, which calls F.scaled_dot_product_attention (padded text tokens are masked out
as attention keys).

Images are in [0, 1]; the encoder centres them to [-1, 1] and the decoder maps back, so the
reconstruction has the input's range (not clamped). Without centring the patch embeddings of
different images share a large common offset and early training collapses to the mean image.

Config fields also express the layout of bytedance/1d-tokenizer's TiTok, so its checkpoints
import exactly (models/titok_import.py): a class token before the patches in encoder and
decoder, a LayerNorm before the blocks, a 3x3 conv after unpatchify, raw (uncentred) pixels,
euclidean VQ lookup, LayerNorm eps 1e-5 and different encoder and decoder sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
from timm.layers import LayerNorm, PatchEmbed, trunc_normal_
from timm.models.vision_transformer import Block
from torch import Tensor

from models.quantizers import BOTTLENECKS, Bottleneck
from models.tokenizer_config import TokenizerConfig


@dataclass
class TokenizerOutput:
    reconstruction: Tensor  # [B, C, H, W], same range as the input, not clamped
    tokens: Tensor  # vq: long [B, N]; kl: float [B, N, token_dim]
    losses: dict[str, Tensor] = field(default_factory=dict)  # weighted scalars to add to the loss
    stats: dict[str, Tensor] = field(default_factory=dict)  # detached scalars for logging


class TextConditioner(nn.Module):
    """Projects precomputed text embeddings [B, T, text_dim] to the model width and adds a
    learned position embedding; also validates the text inputs."""

    def __init__(self, text_dim: int, max_text_tokens: int, width: int):
        super().__init__()
        self.text_dim = text_dim
        self.max_text_tokens = max_text_tokens
        self.proj = nn.Linear(text_dim, width)
        self.pos_embed = nn.Parameter(torch.zeros(1, max_text_tokens, width))

    def forward(self, text: Tensor, text_mask: Tensor | None, batch: int) -> tuple[Tensor, Tensor | None]:
        if text.ndim != 3 or text.shape[0] != batch or text.shape[2] != self.text_dim:
            raise ValueError(f"text must be [B={batch}, T, text_dim={self.text_dim}], got {tuple(text.shape)}")
        if text.shape[1] > self.max_text_tokens:
            raise ValueError(f"text has {text.shape[1]} tokens but max_text_tokens={self.max_text_tokens}; "
                             "truncate the text or raise max_text_tokens")
        if text_mask is not None and (text_mask.shape != text.shape[:2] or text_mask.dtype != torch.bool):
            raise ValueError(f"text_mask must be a bool tensor of shape {tuple(text.shape[:2])}, "
                             f"got {text_mask.dtype} {tuple(text_mask.shape)}")
        x = self.proj(text) + self.pos_embed[:, : text.shape[1]]
        return x, text_mask


class Transformer(nn.Module):
    """A stack of pre-norm timm ViT blocks with a final LayerNorm (and, with `pre_norm`, one
    before the blocks); takes an optional boolean key mask [B, S] (True = attend)."""

    def __init__(self, width: int, depth: int, heads: int, mlp_ratio: float, drop_path: float,
                 pre_norm: bool = False, block_norm_eps: float = 1e-6):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        # Stochastic depth grows linearly with depth (plain floats: this also runs on "meta").
        rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
        norm = partial(LayerNorm, eps=block_norm_eps)
        self.blocks = nn.ModuleList(
            Block(width, heads, mlp_ratio=mlp_ratio, qkv_bias=True, drop_path=r, norm_layer=norm) for r in rates
        )
        # Identity has no parameters: the default layout's state dict is unchanged.
        self.pre_norm = nn.LayerNorm(width) if pre_norm else nn.Identity()
        self.norm = nn.LayerNorm(width)

    def forward(self, x: Tensor, key_mask: Tensor | None = None) -> Tensor:
        # SDPA broadcasts a [B, 1, 1, S] mask over heads and queries.
        attn_mask = key_mask[:, None, None, :] if key_mask is not None else None
        x = self.pre_norm(x)
        for block in self.blocks:
            x = block(x, attn_mask=attn_mask)
        return self.norm(x)


def _sequence_with_text(parts: list[Tensor], text: Tensor | None, text_mask: Tensor | None,
                        text_index: int) -> tuple[Tensor, Tensor | None]:
    """Concatenate parts, inserting text at text_index, and build the key mask (None when no
    text mask is given, so SDPA can use its fastest kernels)."""
    if text is None:
        return torch.cat(parts, dim=1), None
    seq = torch.cat(parts[:text_index] + [text] + parts[text_index:], dim=1)
    if text_mask is None:  # every text token is real
        return seq, None
    masks = [torch.ones(p.shape[:2], dtype=torch.bool, device=p.device) for p in parts]
    key_mask = torch.cat(masks[:text_index] + [text_mask] + masks[text_index:], dim=1)
    return seq, key_mask


class Tokenizer(nn.Module):
    """TiTok-style 1D tokenizer with a pluggable bottleneck (`BOTTLENECKS`: VQ or KL) and
    optional in-context text."""

    def __init__(self, config: TokenizerConfig):
        super().__init__()
        self.config = config
        width, depth, heads = config.encoder_dims
        dec_width, dec_depth, dec_heads = config.decoder_dims
        self.width = width
        n_patch, n_latent = config.num_patches, config.num_latent_tokens
        # The class token (if any) sits before the patches and has the first position row.
        self.num_prefix = 1 if config.class_token else 0
        blocks = dict(pre_norm=config.pre_norm, block_norm_eps=config.block_norm_eps)

        # Encoder
        self.patch_embed = PatchEmbed(config.image_size, config.patch_size, config.channels, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width)) if config.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + n_patch, width))
        self.latent_tokens = nn.Parameter(torch.zeros(1, n_latent, width))
        self.latent_pos_embed = nn.Parameter(torch.zeros(1, n_latent, width))
        self.encoder = Transformer(width, depth, heads, config.mlp_ratio, config.drop_path, **blocks)
        bottleneck = BOTTLENECKS[config.bottleneck]
        self.to_bottleneck = nn.Linear(width, bottleneck.input_dim(config.token_dim))
        self.quantizer: Bottleneck = bottleneck.from_config(config)

        # Decoder
        self.decoder_embed = nn.Linear(config.token_dim, dec_width)
        self.decoder_cls_token = nn.Parameter(torch.zeros(1, 1, dec_width)) if config.class_token else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_width))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + n_patch, dec_width))
        self.decoder_latent_pos_embed = nn.Parameter(torch.zeros(1, n_latent, dec_width))
        self.decoder = Transformer(dec_width, dec_depth, dec_heads, config.mlp_ratio, config.drop_path, **blocks)
        self.to_pixels = nn.Linear(dec_width, config.patch_size ** 2 * config.channels)
        self.output_conv = (nn.Conv2d(config.channels, config.channels, 3, padding=1) if config.output_conv
                            else nn.Identity())

        # Text conditioning (TexTok): separate projections for encoder and decoder.
        uses_text = config.text_dim > 0
        self.encoder_text = (TextConditioner(config.text_dim, config.max_text_tokens, width)
                             if uses_text and config.text_in_encoder else None)
        self.decoder_text = (TextConditioner(config.text_dim, config.max_text_tokens, dec_width)
                             if uses_text and config.text_in_decoder else None)

        self.apply(_init_linear_and_norm)
        for p in (self.pos_embed, self.latent_tokens, self.latent_pos_embed, self.mask_token,
                  self.decoder_pos_embed, self.decoder_latent_pos_embed, self.cls_token, self.decoder_cls_token):
            if p is not None:
                trunc_normal_(p, std=0.02)
        for cond in (self.encoder_text, self.decoder_text):
            if cond is not None:
                trunc_normal_(cond.pos_embed, std=0.02)

    @property
    def uses_text(self) -> bool:
        return self.config.text_dim > 0

    @property
    def is_discrete(self) -> bool:
        """True when tokens are ids [B, N] (vq), False when they are vectors [B, N, token_dim] (kl)."""
        return self.quantizer.discrete

    def _check_text(self, conditioner: TextConditioner | None, text: Tensor | None,
                    text_mask: Tensor | None, where: str) -> None:
        if not self.uses_text and (text is not None or text_mask is not None):
            raise ValueError(f"{where}: this tokenizer has no text conditioning (text_dim=0) but text "
                             "was given; drop the text or build it with text_dim > 0")
        if conditioner is not None and text is None:
            raise ValueError(f"{where}: this tokenizer is text-conditioned (text_dim={self.config.text_dim}) "
                             "and needs text=[B, T, text_dim] (and text_mask=[B, T] for padding)")
        if text is None and text_mask is not None:
            raise ValueError(f"{where}: text_mask given without text")

    def _check_images(self, images: Tensor) -> None:
        c = self.config
        expected = (c.channels, c.image_size, c.image_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images must be [B, {c.channels}, {c.image_size}, {c.image_size}], "
                             f"got {tuple(images.shape)}")

    def _encode(self, images: Tensor, text: Tensor | None, text_mask: Tensor | None):
        self._check_images(images)
        self._check_text(self.encoder_text, text, text_mask, "encode")
        b = images.shape[0]
        # Centre [0, 1] pixels so the patch embedding is not dominated by a shared offset.
        pixels = images * 2.0 - 1.0 if self.config.centre_pixels else images
        patches = _with_prefix(self.cls_token, self.patch_embed(pixels)) + self.pos_embed
        latents = (self.latent_tokens + self.latent_pos_embed).expand(b, -1, -1)
        text_x = None
        if self.encoder_text is not None:
            text_x, text_mask = self.encoder_text(text, text_mask, b)
        x, key_mask = _sequence_with_text([patches, latents], text_x, text_mask, text_index=1)
        x = self.encoder(x, key_mask)
        h = self.to_bottleneck(x[:, -self.config.num_latent_tokens:])
        return self.quantizer(h)  # (decoder latents, tokens, losses, stats)

    def _decode(self, latents: Tensor, text: Tensor | None, text_mask: Tensor | None) -> Tensor:
        c = self.config
        b = latents.shape[0]
        latents = self.decoder_embed(latents) + self.decoder_latent_pos_embed
        masks = _with_prefix(self.decoder_cls_token, self.mask_token.expand(b, c.num_patches, -1))
        masks = masks + self.decoder_pos_embed
        text_x = None
        if self.decoder_text is not None:
            text_x, text_mask = self.decoder_text(text, text_mask, b)
        x, key_mask = _sequence_with_text([masks, latents], text_x, text_mask, text_index=1)
        x = self.decoder(x, key_mask)
        pixels = self.to_pixels(x[:, self.num_prefix: self.num_prefix + c.num_patches])
        images = self.output_conv(self._unpatchify(pixels))
        return images * 0.5 + 0.5 if c.centre_pixels else images  # back to the [0, 1] input range

    def _unpatchify(self, x: Tensor) -> Tensor:
        c = self.config
        g, p = c.grid_size, c.patch_size
        x = x.reshape(x.shape[0], g, g, p, p, c.channels)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(x.shape[0], c.channels, g * p, g * p)

    def encode(self, images: Tensor, text: Tensor | None = None,
               text_mask: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """images [B, C, H, W] -> (tokens, losses, stats). Tokens are ids [B, N] (vq) or
        continuous [B, N, token_dim] (kl: a sample in train mode, the mean in eval)."""
        _, tokens, losses, stats = self._encode(images, text, text_mask)
        return tokens, losses, stats

    def decode(self, tokens: Tensor, text: Tensor | None = None, text_mask: Tensor | None = None) -> Tensor:
        """tokens (ids [B, N] for vq, [B, N, token_dim] for kl) -> images [B, C, H, W]."""
        self._check_text(self.decoder_text, text, text_mask, "decode")
        latents = self.quantizer.latents(tokens, self.config.num_latent_tokens)
        return self._decode(latents, text, text_mask)

    def forward(self, images: Tensor, text: Tensor | None = None,
                text_mask: Tensor | None = None) -> TokenizerOutput:
        self._check_text(self.decoder_text, text, text_mask, "decode")  # fail before encoding
        latents, tokens, losses, stats = self._encode(images, text, text_mask)
        reconstruction = self._decode(latents, text, text_mask)
        return TokenizerOutput(reconstruction, tokens, losses, stats)


def _with_prefix(token: Tensor | None, x: Tensor) -> Tensor:
    """x [B, S, W] with the class token (if any) put before it."""
    if token is None:
        return x
    return torch.cat([token.expand(x.shape[0], -1, -1), x], dim=1)


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
