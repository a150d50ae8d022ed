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


def _reference_sample(m: MaskGIT, labels: torch.Tensor, steps: int, temperature: float, temperature_end: float,
                      guidance_scale: float, guidance_schedule: str, generator: torch.Generator) -> torch.Tensor:
    """MaskGIT.sample as first written, with out-of-place arithmetic over [B, N, vocab]."""
    b, n = labels.shape[0], m.config.seq_len
    ids = torch.full((b, n), m.mask_token_id, dtype=torch.long)
    null = torch.full_like(labels, m.null_class_id)
    num_masked = n
    for step in range(steps):
        ratio = (step + 1) / steps
        scale = guidance_scale if guidance_schedule == "constant" else guidance_scale * step / steps
        if scale != 0:
            cond, uncond = m(torch.cat([ids, ids]), torch.cat([labels, null])).float().chunk(2)
            logits = cond + scale * (cond - uncond)
        else:
            logits = m(ids, labels).float()
        log_probs = logits.log_softmax(dim=-1)
        temp = temperature + (temperature_end - temperature) * ratio
        u = torch.rand(log_probs.shape, generator=generator, dtype=torch.float32)
        sampled = (log_probs + temp * -torch.log(-torch.log(u.clamp_min(1e-20)))).argmax(dim=-1)
        is_mask = ids == m.mask_token_id
        sampled = torch.where(is_mask, sampled, ids)
        if step == steps - 1:
            return sampled
        confidence = log_probs.gather(-1, sampled[..., None]).squeeze(-1)
        u = torch.rand(confidence.shape, generator=generator, dtype=torch.float32)
        confidence = confidence + temperature * (1 - ratio) * -torch.log(-torch.log(u.clamp_min(1e-20)))
        confidence = confidence.masked_fill(~is_mask, math.inf)
        num_masked = max(1, min(num_masked - 1, math.floor(n * math.acos(ratio) / (math.pi / 2))))
        ids = sampled.scatter(1, confidence.argsort(dim=-1)[:, :num_masked], m.mask_token_id)


@pytest.mark.parametrize("threads", [1, 2])
def test_sample_bit_identical_to_the_out_of_place_reference(threads):
    """The in-place [B, N, vocab] arithmetic of sample (a speed fix, bench/generation_throughput.py)
    gives exactly the samples of the plain expressions, and leaves the generator in the same state."""
    m = tiny(vocab_size=512, seq_len=32, num_classes=10, width=64, heads=2).eval()
    labels = torch.arange(6) % 10
    cases = [dict(steps=8, temperature=9.5, temperature_end=0.0, guidance_scale=3.0, guidance_schedule="linear"),
             dict(steps=8, temperature=2.0, temperature_end=0.0, guidance_scale=2.0, guidance_schedule="linear"),
             dict(steps=5, temperature=9.5, temperature_end=0.0, guidance_scale=4.5, guidance_schedule="constant"),
             dict(steps=3, temperature=1.0, temperature_end=0.5, guidance_scale=0.0, guidance_schedule="constant"),
             dict(steps=1, temperature=9.5, temperature_end=0.0, guidance_scale=3.0, guidance_schedule="constant"),
             dict(steps=12, temperature=0.0, temperature_end=0.0, guidance_scale=1.5, guidance_schedule="linear")]
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for seed, case in enumerate(cases):
            ours, ref = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for _ in range(2):  # the second call starts from the generator state the first left
                    assert torch.equal(m.sample(labels, generator=ours, **case),
                                       _reference_sample(m, labels, generator=ref, **case)), case
            assert torch.equal(ours.get_state(), ref.get_state())
    finally:
        torch.set_num_threads(previous)


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
