"""Tests for the MaskGIT generator (models/maskgit.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate, stats

from models.maskgit import MaskGIT, MaskGITConfig

torch.set_num_threads(1)


def tiny(**kw) -> MaskGIT:
    cfg = dict(vocab_size=16, seq_len=8, num_classes=4, width=32, depth=2, heads=4, dropout=0.0)
    cfg.update(kw)
    torch.manual_seed(0)
    return MaskGIT(MaskGITConfig(**cfg))


def test_forward_shape_and_input_checks():
    m = tiny()
    tokens = torch.randint(0, 17, (3, 8))  # 16 = mask id is a valid input
    logits = m(tokens, torch.tensor([0, 3, 4]))  # 4 = null class
    assert logits.shape == (3, 8, 16)
    with pytest.raises(ValueError, match="tokens must be ids"):
        m(torch.full((2, 8), 17), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"shape \[B, 8\]"):
        m(torch.zeros(2, 9, dtype=torch.long), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="labels must be in"):
        m(torch.zeros(2, 8, dtype=torch.long), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="tokens must be ids"):
        m.training_loss(torch.full((2, 8), 16), torch.tensor([0, 1]))  # targets may not be masks


def test_masking_ratio_follows_arccos_schedule():
    g = torch.Generator().manual_seed(0)
    # Long rows: the masked fraction is ~ the continuous ratio r = arccos(u)/(pi/2), whose CDF
    # is P(r <= x) = 1 - cos(pi x / 2). (A cosine schedule has the same mean 2/pi but a different CDF.)
    m = tiny(seq_len=1000)
    _, mask = m.mask_tokens(torch.zeros(4000, 1000, dtype=torch.long), generator=g)
    frac = mask.float().mean(1).numpy()
    assert abs(frac.mean() - 2 / math.pi) < 0.015
    ks = stats.kstest(frac, lambda x: 1 - np.cos(np.pi * np.clip(x, 0, 1) / 2))
    assert ks.pvalue > 1e-3, ks
    wrong = stats.kstest(frac, lambda x: 1 - 2 * np.arccos(np.clip(x, 0, 1)) / np.pi)  # cosine schedule
    assert wrong.pvalue < 1e-6

    # Short rows: the exact expectation of max(1, round(N r)) / N, integrated over u.
    n = 8
    m = tiny(seq_len=n)
    tokens = torch.randint(0, 16, (20000, n), generator=g)
    masked, mask = m.mask_tokens(tokens, generator=g)
    expected, _ = integrate.quad(lambda u: max(1, round(n * math.acos(u) / (math.pi / 2))) / n, 0, 1, limit=200)
    assert abs(mask.float().mean().item() - expected) < 0.01
    assert mask.sum(1).min() >= 1
    assert torch.equal(masked[mask], torch.full_like(masked[mask], 16))
    assert torch.equal(masked[~mask], tokens[~mask])


def test_loss_only_on_masked_positions():
    m = tiny()
    captured = {}
    m.register_forward_pre_hook(lambda mod, args: captured.update(inputs=args[0].clone()))

    def keep_logits(mod, args, out):
        out.retain_grad()
        captured["logits"] = out

    m.head.register_forward_hook(keep_logits)
    tokens = torch.randint(0, 16, (16, 8))
    loss, logs = m.training_loss(tokens, torch.randint(0, 4, (16,)), generator=torch.Generator().manual_seed(0))
    loss.backward()
    grad = captured["logits"].grad.abs().sum(-1)
    masked = captured["inputs"] == m.mask_token_id
    assert masked.any() and (~masked).any()
    assert torch.all(grad[~masked] == 0)
    assert torch.all(grad[masked] > 0)
    assert set(logs) == {"loss", "masked_acc", "mask_ratio"}
    assert logs["mask_ratio"] == pytest.approx(masked.float().mean().item())


def test_class_dropout_only_in_training():
    seen = []
    m = tiny(class_dropout=1.0)
    m.register_forward_pre_hook(lambda mod, args: seen.append(args[1].clone()))
    tokens, labels = torch.randint(0, 16, (8, 8)), torch.randint(0, 4, (8,))
    m.train()
    m.training_loss(tokens, labels)
    assert torch.all(seen[-1] == 4)
    m.eval()
    m.training_loss(tokens, labels)
    assert torch.equal(seen[-1], labels)
    m = tiny(class_dropout=0.5).train()
    dropped = (m.drop_labels(torch.zeros(10000, dtype=torch.long), torch.Generator().manual_seed(0)) == 4).float()
    assert abs(dropped.mean().item() - 0.5) < 0.03


def test_sample_valid_and_deterministic():
    m = tiny().eval()
    labels = torch.tensor([0, 1, 2, 3])
    a = m.sample(labels, generator=torch.Generator().manual_seed(0))
    b = m.sample(labels, generator=torch.Generator().manual_seed(0))
    c = m.sample(labels, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, 8) and a.dtype == torch.long
    assert a.min() >= 0 and a.max() < 16  # no mask ids left
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    for steps in (1, 3, 12):  # fewer and more steps than tokens
        s = m.sample(labels, steps=steps, guidance_schedule="constant", generator=torch.Generator().manual_seed(0))
        assert s.max() < 16
    with pytest.raises(ValueError, match="guidance_schedule"):
        m.sample(labels, guidance_schedule="cosine")


def test_guidance_scale_zero_ignores_null_class():
    """Scale 0 is the conditional model alone: the null-class embedding must not matter."""
    m = tiny().eval()
    labels = torch.tensor([0, 1, 2, 3] * 4)

    def run(scale: float) -> torch.Tensor:
        return m.sample(labels, guidance_scale=scale, guidance_schedule="constant", temperature=1.0,
                        generator=torch.Generator().manual_seed(0))

    before = {s: run(s) for s in (0.0, 3.0)}
    with torch.no_grad():
        m.cls_emb.weight[m.null_class_id].normal_(0, 5.0)
    assert torch.equal(run(0.0), before[0.0])
    assert not torch.equal(run(3.0), before[3.0])
    # The linear schedule starts at scale 0, so its first step matches the unguided model too.
    lin = m.sample(labels, steps=1, guidance_scale=3.0, guidance_schedule="linear", temperature=1.0,
                   generator=torch.Generator().manual_seed(0))
    ref = m.sample(labels, steps=1, guidance_scale=0.0, temperature=1.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(lin, ref)


def test_learns_class_to_sequence_mapping():
    torch.manual_seed(0)
    m = MaskGIT(MaskGITConfig(vocab_size=16, seq_len=8, num_classes=4, width=64, depth=2, heads=4,
                              dropout=0.0, class_dropout=0.1, label_smoothing=0.1))
    g = torch.Generator().manual_seed(0)
    seqs = torch.randint(0, 16, (4, 8), generator=g)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(200):
        labels = torch.randint(0, 4, (32,), generator=g)
        loss, logs = m.training_loss(seqs[labels], labels, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    labels = torch.arange(4).repeat(16)
    out = m.sample(labels, temperature=1.0, guidance_scale=3.0, generator=torch.Generator().manual_seed(1))
    acc = (out == seqs[labels]).float().mean().item()
    assert acc > 0.9, acc
