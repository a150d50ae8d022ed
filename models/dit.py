"""Diffusion Transformer (DiT) over continuous 1D token sequences.

Follows facebookresearch/DiT models.py (adaLN-Zero blocks, timestep and label embedders,
adaLN final layer) with two changes for 1D tokenizers such as TexTok: the input is already a
token sequence [B, N, token_dim] (a Linear embedding replaces patchify, with a fixed 1D sincos
position embedding), and an optional text-to-image variant where each block cross-attends
to projected text tokens (as in PixArt-alpha) and the pooled text joins the condition.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Mlp

DIT_SIZES: dict[str, tuple[int, int, int]] = {  # width, depth, heads
    "nano": (64, 2, 2),
    "tiny": (128, 4, 4),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "XL": (1152, 28, 16),
}


@dataclass
class DiTConfig:
    token_dim: int = 8
    seq_len: int = 64
    num_classes: int = 1000  # 0: no class label (unconditional or text-conditioned)
    width: int = 768
    depth: int = 12
    heads: int = 12
    mlp_ratio: float = 4.0
    class_dropout: float = 0.1  # probability to swap the condition for the null one in training
    learn_sigma: bool = True
    text_dim: int = 0  # >0: cross-attend to text tokens of this width

    def __post_init__(self) -> None:
        for name in ("token_dim", "seq_len", "width", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0 or self.text_dim < 0:
            raise ValueError("DiTConfig.num_classes and DiTConfig.text_dim must be >= 0")
        if self.width % self.heads:
            raise ValueError(f"DiTConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        if not 0.0 <= self.class_dropout <= 1.0:
            raise ValueError(f"DiTConfig.class_dropout must be in [0, 1], got {self.class_dropout}")

    @classmethod
    def from_size(cls, size: str, **overrides) -> DiTConfig:
        """Config for a named size ("nano", "tiny", "S", "B", "L", "XL"), other fields from overrides."""
        if size not in DIT_SIZES:
            raise ValueError(f"unknown DiT size {size!r}; choose one of {sorted(DIT_SIZES)}")
        width, depth, heads = DIT_SIZES[size]
        return cls(width=width, depth=depth, heads=heads, **overrides)

    @property
    def conditional(self) -> bool:
        return self.num_classes > 0 or self.text_dim > 0


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def sincos_pos_embed_1d(length: int, dim: int) -> torch.Tensor:
    """Fixed [length, dim] sin/cos position embedding (the 1D half of DiT's 2D version)."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * omega[None]
    emb = torch.cat([angles.sin(), angles.cos()], dim=1)
    return F.pad(emb, (0, dim - emb.shape[1])).float()  # odd dim: one zero column


def approx_gelu() -> nn.Module:
    return nn.GELU(approximate="tanh")


class TimestepEmbedder(nn.Module):
    """Embeds scalar (possibly fractional) timesteps: sinusoidal features followed by an MLP."""

    def __init__(self, width: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, width), nn.SiLU(), nn.Linear(width, width))

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(emb, (0, dim % 2))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class label table with one extra row, the null class ``num_classes``, used for CFG."""

    def __init__(self, num_classes: int, width: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, width)

    def forward(self, labels: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels.masked_fill(drop, self.num_classes))


class TextEmbedder(nn.Module):
    """Projects text tokens to the model width and pools them into a condition vector.

    Dropped rows (CFG) see a single learned null token instead of their text.
    """

    def __init__(self, text_dim: int, width: int) -> None:
        super().__init__()
        self.proj = Mlp(text_dim, width, width, act_layer=approx_gelu)
        self.pool = nn.Linear(width, width)
        self.null_token = nn.Parameter(torch.randn(1, 1, text_dim) / text_dim**0.5)

    def forward(
        self, text: torch.Tensor, text_mask: torch.Tensor, drop: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        first = torch.zeros_like(text_mask)
        first[:, 0] = True
        text = torch.where(drop[:, None, None], self.null_token.to(text.dtype).expand_as(text), text)
        text_mask = torch.where(drop[:, None], first, text_mask)
        # Zero the padding (masked_fill, not multiply, so even NaN there cannot leak): attention
        # gives it zero weight, but 0 * NaN in the value sum would still poison the row.
        ctx = self.proj(text).masked_fill(~text_mask[..., None], 0)
        pooled = ctx.sum(1) / text_mask.sum(1, keepdim=True).to(ctx.dtype)
        return ctx, text_mask, self.pool(pooled)


class CrossAttention(nn.Module):
    """Multi-head attention from the sequence to text tokens; ``ctx_mask`` True = real token."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor, ctx_mask: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q = self.q(x).view(b, n, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(b, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx_mask[:, None, None, :])
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class DiTBlock(nn.Module):
    """DiT block with adaLN-Zero conditioning, plus cross-attention to text when ``cross_attn``."""

    def __init__(self, width: int, heads: int, mlp_ratio: float = 4.0, cross_attn: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(width, num_heads=heads, qkv_bias=True)
        self.cross_norm = nn.LayerNorm(width, eps=1e-6) if cross_attn else None
        self.cross_attn = CrossAttention(width, heads) if cross_attn else None
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(width, int(width * mlp_ratio), act_layer=approx_gelu)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 6 * width))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        ctx: torch.Tensor | None = None,
        ctx_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.cross_norm(x), ctx, ctx_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a Linear back to token channels."""

    def __init__(self, width: int, out_dim: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(width, out_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(width, 2 * width))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer predicting eps (and the sigma interpolation when learn_sigma)
    for noisy token sequences x [B, seq_len, token_dim] at timesteps t [B].

    Conditioning: class labels (null id ``num_classes``), text tokens (``text_dim`` > 0), both,
    or neither (unconditional). ``drop`` marks rows whose condition is swapped for the null one;
    when it is None, train mode drops rows at random with probability ``class_dropout``.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.out_dim = c.token_dim * (2 if c.learn_sigma else 1)
        self.x_embedder = nn.Linear(c.token_dim, c.width)
        self.register_buffer("pos_embed", sincos_pos_embed_1d(c.seq_len, c.width)[None], persistent=False)
        self.t_embedder = TimestepEmbedder(c.width)
        self.y_embedder = LabelEmbedder(c.num_classes, c.width) if c.num_classes > 0 else None
        self.text_embedder = TextEmbedder(c.text_dim, c.width) if c.text_dim > 0 else None
        self.blocks = nn.ModuleList(
            DiTBlock(c.width, c.heads, c.mlp_ratio, cross_attn=c.text_dim > 0) for _ in range(c.depth)
        )
        self.final_layer = FinalLayer(c.width, self.out_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT init: xavier Linears, N(0, 0.02) embedders, zeroed adaLN and output layers."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every residual branch starts closed, so each block is the identity.
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def _check_inputs(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None,
        text: torch.Tensor | None,
        text_mask: torch.Tensor | None,
    ) -> None:
        c = self.config
        if x.dim() != 3 or x.shape[1:] != (c.seq_len, c.token_dim):
            raise ValueError(f"x must have shape [B, {c.seq_len}, {c.token_dim}], got {tuple(x.shape)}")
        b = x.shape[0]
        if t.shape != (b,):
            raise ValueError(f"t must have shape [{b}] (one timestep per row), got {tuple(t.shape)}")
        if c.num_classes > 0:
            if labels is None or labels.shape != (b,) or labels.dtype != torch.long:
                raise ValueError(f"this DiT is class-conditional: pass labels as int64 [{b}], got "
                                 f"{None if labels is None else (labels.dtype, tuple(labels.shape))}")
            if labels.min() < 0 or labels.max() > c.num_classes:
                raise ValueError(f"labels must be in [0, {c.num_classes}] ({c.num_classes} = null class), "
                                 f"got range [{int(labels.min())}, {int(labels.max())}]")
        elif labels is not None:
            raise ValueError("this DiT has num_classes=0 and takes no labels; pass labels=None")
        if c.text_dim > 0:
            if text is None or text.dim() != 3 or text.shape[0] != b or text.shape[2] != c.text_dim:
                raise ValueError(f"this DiT is text-conditional: pass text as [{b}, L, {c.text_dim}], got "
                                 f"{None if text is None else tuple(text.shape)}")
            if text_mask is not None and (text_mask.shape != text.shape[:2] or text_mask.dtype != torch.bool):
                raise ValueError(f"text_mask must be bool [{b}, {text.shape[1]}] (True = real token), got "
                                 f"{text_mask.dtype} {tuple(text_mask.shape)}")
        elif text is not None or text_mask is not None:
            raise ValueError("this DiT has text_dim=0 and takes no text; pass text=None")

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        drop: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, N, token_dim], t [B], labels [B], text [B, L, text_dim], text_mask [B, L] bool,
        drop [B] bool -> [B, N, token_dim * (2 if learn_sigma else 1)] (eps first)."""
        self._check_inputs(x, t, labels, text, text_mask)
        b = x.shape[0]
        if drop is None:  # random condition dropout in training only; an explicit drop is kept as is
            p = self.config.class_dropout if self.training else 0.0
            drop = torch.rand(b, device=x.device) < p
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            c = c + self.y_embedder(labels, drop)
        ctx = ctx_mask = None
        if self.text_embedder is not None:
            if text_mask is None:
                text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
            if (~text_mask.any(dim=1) & ~drop).any():
                raise ValueError("a text_mask row has no real token; give every prompt at least one token "
                                 "(e.g. the embedding of an empty string) or mark the row in drop")
            ctx, ctx_mask, pooled = self.text_embedder(text, text_mask, drop)
            c = c + pooled
        h = self.x_embedder(x) + self.pos_embed
        for block in self.blocks:
            h = block(h, c, ctx, ctx_mask)
        return self.final_layer(h, c)

    def forward_with_cfg(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        labels: torch.Tensor | None = None,
        text: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        guidance_scale: float = 1.0,
    ) -> torch.Tensor:
        """Classifier-free guidance as in DiT: one batch holds the conditional and the null-condition
        copies of x, and eps = uncond + scale * (cond - uncond); the sigma channels come from the
        conditional half. Takes and returns B rows (the doubling happens inside)."""
        if not self.config.conditional:
            raise ValueError("forward_with_cfg needs a conditional DiT (num_classes > 0 or text_dim > 0)")
        b = x.shape[0]

        def twice(v: torch.Tensor | None) -> torch.Tensor | None:
            return None if v is None else torch.cat([v, v])

        drop = torch.arange(2 * b, device=x.device) >= b
        out = self.forward(twice(x), twice(t), twice(labels), twice(text), twice(text_mask), drop=drop)
        cond, uncond = out.chunk(2)
        d = self.config.token_dim
        eps = uncond[..., :d] + guidance_scale * (cond[..., :d] - uncond[..., :d])
        return torch.cat([eps, cond[..., d:]], dim=-1)
