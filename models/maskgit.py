"""MaskGIT generator over 1D token ids (the TiTok generator recipe).

A bidirectional transformer sees ``[class token, t_1 .. t_N]`` where some ``t_i`` are the
mask id (``vocab_size``) and predicts the codebook id of every position. Training masks a
random subset whose size follows the arccos schedule; sampling starts fully masked and
unmasks the most confident predictions over a few steps (Chang et al. 2022, Yu et al. 2024).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.models.vision_transformer import Block

GUIDANCE_SCHEDULES = ("linear", "constant")


@dataclass
class MaskGITConfig:
    vocab_size: int = 4096  # codebook size; the mask token id is vocab_size
    seq_len: int = 32
    num_classes: int = 1000  # the extra "null" class id num_classes is the unconditional label
    width: int = 768
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    class_dropout: float = 0.1  # probability to replace the class by the null class in training
    label_smoothing: float = 0.1

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "width", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"MaskGITConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_classes < 0:
            raise ValueError(f"MaskGITConfig.num_classes must be >= 0 (0 = unconditional), got {self.num_classes}")
        if self.width % self.heads:
            raise ValueError(f"MaskGITConfig.width ({self.width}) must be divisible by heads ({self.heads})")
        for name in ("dropout", "class_dropout", "label_smoothing"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"MaskGITConfig.{name} must be in [0, 1], got {getattr(self, name)}")


def arccos_mask_ratio(u: torch.Tensor) -> torch.Tensor:
    """Fraction of tokens to mask for u in [0, 1]: arccos(u) / (pi/2), 1 at u=0 and 0 at u=1."""
    return torch.arccos(u) / (math.pi / 2)


def gumbel_noise(like: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel noise -log(-log(u)) shaped like ``like`` (float32), drawn from ``generator``.

    Computed in place in the one buffer: sampling draws it over [B, N, vocab] every step, where
    each extra temporary is a pass over (and on CPU a fresh page-faulted allocation of) that size.
    """
    u = torch.rand(like.shape, generator=generator, device=like.device, dtype=torch.float32)
    return u.clamp_min_(1e-20).log_().neg_().log_().neg_()


class MaskGIT(nn.Module):
    """Class-conditional masked token transformer over sequences of ``seq_len`` codebook ids.

    Position 0 holds the class embedding (the null class ``num_classes`` stands for "no class"
    and is what classifier-free guidance compares against); positions 1..N hold token
    embeddings, with ``vocab_size`` as the mask id. Logits cover the codebook only.
    """

    def __init__(self, config: MaskGITConfig) -> None:
        super().__init__()
        self.config = config
        self.mask_token_id = config.vocab_size
        self.null_class_id = config.num_classes
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size + 1, c.width)
        self.cls_emb = nn.Embedding(c.num_classes + 1, c.width)
        self.pos_emb = nn.Parameter(torch.zeros(1, c.seq_len + 1, c.width))
        self.drop = nn.Dropout(c.dropout)
        self.blocks = nn.ModuleList(
            Block(c.width, c.heads, c.mlp_ratio, qkv_bias=True, proj_drop=c.dropout, attn_drop=c.dropout)
            for _ in range(c.depth)
        )
        self.norm = nn.LayerNorm(c.width)
        self.head = nn.Linear(c.width, c.vocab_size)
        nn.init.trunc_normal_(self.pos_emb, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # BERT-style init, as TiTok's generator (a BERT) uses.
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.trunc_normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    # ---------------------------------------------------------------- checks
    def _check_tokens(self, tokens: torch.Tensor, allow_mask: bool) -> None:
        if tokens.dim() != 2 or tokens.shape[1] != self.config.seq_len:
            raise ValueError(f"tokens must have shape [B, {self.config.seq_len}], got {tuple(tokens.shape)}")
        if tokens.dtype != torch.long:
            raise ValueError(f"tokens must be int64 codebook ids, got {tokens.dtype}")
        hi = self.mask_token_id if allow_mask else self.mask_token_id - 1
        if tokens.numel() and (tokens.min() < 0 or tokens.max() > hi):
            raise ValueError(
                f"tokens must be ids in [0, {hi}] (vocab_size={self.config.vocab_size}"
                f"{', mask id allowed' if allow_mask else ''}), got range "
                f"[{int(tokens.min())}, {int(tokens.max())}]; check the tokenizer's codebook size"
            )

    def _check_labels(self, labels: torch.Tensor, batch: int | None = None) -> None:
        if labels.dim() != 1 or (batch is not None and labels.shape[0] != batch) or labels.dtype != torch.long:
            raise ValueError(
                f"labels must be an int64 tensor of shape [{batch if batch is not None else 'B'}], "
                f"got {labels.dtype} {tuple(labels.shape)}"
            )
        if labels.numel() and (labels.min() < 0 or labels.max() > self.null_class_id):
            raise ValueError(
                f"labels must be in [0, {self.null_class_id}] (num_classes={self.config.num_classes}; "
                f"{self.null_class_id} is the null class), got range [{int(labels.min())}, {int(labels.max())}]"
            )

    # ---------------------------------------------------------------- model
    def forward(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """tokens [B, N] (mask id allowed), labels [B] (null id allowed) -> logits [B, N, vocab_size]."""
        self._check_tokens(tokens, allow_mask=True)
        self._check_labels(labels, tokens.shape[0])
        x = torch.cat([self.cls_emb(labels)[:, None], self.tok_emb(tokens)], dim=1) + self.pos_emb
        x = self.drop(x)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x[:, 1:]))

    def mask_tokens(
        self, tokens: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask round(N * arccos(u) / (pi/2)) random positions per row (at least one), u ~ U(0, 1).

        Returns (masked tokens, bool mask of the masked positions).
        """
        b, n = tokens.shape
        ratio = arccos_mask_ratio(torch.rand(b, generator=generator, device=tokens.device))
        num_masked = (ratio * n).round().clamp(min=1)
        # A random permutation per row; the positions holding the smallest ranks get masked.
        ranks = torch.rand(b, n, generator=generator, device=tokens.device).argsort(dim=-1)
        mask = ranks < num_masked[:, None]
        return tokens.masked_fill(mask, self.mask_token_id), mask

    def drop_labels(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability ``class_dropout`` (for CFG)."""
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.config.class_dropout
        return labels.masked_fill(drop, self.null_class_id)

    def training_loss(
        self, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Label-smoothed cross-entropy on the masked positions only.

        Class dropout is applied only in train mode, so an eval-mode call gives a validation
        loss of the conditional model.
        """
        self._check_tokens(tokens, allow_mask=False)
        self._check_labels(labels, tokens.shape[0])
        masked, mask = self.mask_tokens(tokens, generator)
        if self.training and self.config.class_dropout > 0:
            labels = self.drop_labels(labels, generator)
        logits = self(masked, labels)[mask].float()
        targets = tokens[mask]
        loss = F.cross_entropy(logits, targets, label_smoothing=self.config.label_smoothing)
        with torch.no_grad():
            acc = (logits.argmax(-1) == targets).float().mean()
        # Tensors: a `.item()` here would sync a GPU every step (the training loop reads logs on log steps).
        logs = {"loss": loss.detach(), "masked_acc": acc, "mask_ratio": mask.float().mean()}
        return loss, logs

    # ---------------------------------------------------------------- sampling
    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        steps: int = 8,
        temperature: float = 9.5,
        temperature_end: float = 0.0,
        guidance_scale: float = 3.0,
        guidance_schedule: str = "linear",
        choice_temperature: float | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Iterative MaskGIT decoding -> token ids [B, seq_len] (never the mask id).

        At step k (ratio r = (k+1)/steps):
          * guided logits = cond + s_k * (cond - uncond), s_k = guidance_scale for "constant" and
            guidance_scale * k / steps for "linear" (TiTok); s_k == 0 skips the unconditional pass;
          * every masked position samples a token at temperature
            temperature + (temperature_end - temperature) * r (Gumbel-max, so 0 means argmax);
          * the floor(N * arccos(r) / (pi/2)) least confident new tokens are masked again, where
            confidence = log p(token) + choice_temperature * (1 - r) * Gumbel noise
            (choice_temperature defaults to ``temperature``, as in TiTok).
        All randomness comes from ``generator`` (on the model's device), so a fixed seed gives
        a fixed result.
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if guidance_schedule not in GUIDANCE_SCHEDULES:
            raise ValueError(f"guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {guidance_schedule!r}")
        if temperature < 0 or temperature_end < 0 or (choice_temperature is not None and choice_temperature < 0):
            raise ValueError("temperatures must be >= 0")
        self._check_labels(labels)
        choice_temperature = temperature if choice_temperature is None else choice_temperature
        b, n = labels.shape[0], self.config.seq_len
        ids = torch.full((b, n), self.mask_token_id, dtype=torch.long, device=labels.device)
        null = torch.full_like(labels, self.null_class_id)
        num_masked = n
        for step in range(steps):
            ratio = (step + 1) / steps
            scale = guidance_scale if guidance_schedule == "constant" else guidance_scale * step / steps
            # The [B, N, vocab] arithmetic runs in place on fresh buffers, in the same operations
            # as cond + scale * (cond - uncond) and log_probs + temp * gumbel (IEEE addition
            # commutes), so the samples are bit for bit those of the out-of-place expressions.
            if scale != 0:
                cond, uncond = self(torch.cat([ids, ids]), torch.cat([labels, null])).float().chunk(2)
                logits = (cond - uncond).mul_(scale).add_(cond)
                del cond, uncond  # the doubled logits: freed before the noise is drawn
            else:
                logits = self(ids, labels).float()
            log_probs = logits.log_softmax(dim=-1)
            del logits
            temp = temperature + (temperature_end - temperature) * ratio
            sampled = gumbel_noise(log_probs, generator).mul_(temp).add_(log_probs).argmax(dim=-1)
            is_mask = ids == self.mask_token_id
            sampled = torch.where(is_mask, sampled, ids)
            if step == steps - 1:
                ids = sampled
                break
            confidence = log_probs.gather(-1, sampled[..., None]).squeeze(-1)
            confidence = confidence + choice_temperature * (1 - ratio) * gumbel_noise(confidence, generator)
            confidence = confidence.masked_fill(~is_mask, math.inf)  # fixed tokens stay fixed
            # Every row has the same number of masked positions, so this is a plain int.
            num_masked = max(1, min(num_masked - 1, math.floor(n * math.acos(ratio) / (math.pi / 2))))
            remask = confidence.argsort(dim=-1)[:, :num_masked]
            ids = sampled.scatter(1, remask, self.mask_token_id)
        return ids
