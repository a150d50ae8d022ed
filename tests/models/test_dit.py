"""Tests for the 1D-token DiT (models/dit.py)."""
from __future__ import annotations

import pytest
import torch

from models.dit import DIT_SIZES, DiT, DiTConfig

torch.set_num_threads(1)


def make(**kw) -> DiT:
    cfg = dict(token_dim=4, seq_len=6, num_classes=3)
    cfg.update(kw)
    torch.manual_seed(0)
    return DiT(DiTConfig.from_size("nano", **cfg))


def randomize(model: DiT) -> DiT:
    """Replace the zero init so every branch (adaLN, cross-attention, output) is active."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def text_inputs(b: int = 2, length: int = 5, dim: int = 12):
    g = torch.Generator().manual_seed(2)
    text = torch.randn(b, length, dim, generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, 3:] = False
    return text, mask


def test_sizes_and_output_shape():
    assert DIT_SIZES["XL"] == (1152, 28, 16) and DIT_SIZES["nano"] == (64, 2, 2)
    cfg = DiTConfig.from_size("tiny", token_dim=4, seq_len=6)
    assert (cfg.width, cfg.depth, cfg.heads) == DIT_SIZES["tiny"]
    with pytest.raises(ValueError, match="unknown DiT size"):
        DiTConfig.from_size("XXL")
    x, t, y = torch.randn(3, 6, 4), torch.tensor([0, 10, 999]), torch.tensor([0, 2, 3])
    assert make(learn_sigma=True)(x, t, y).shape == (3, 6, 8)
    assert make(learn_sigma=False)(x, t, y).shape == (3, 6, 4)
    assert make(num_classes=0)(x, t).shape == (3, 6, 8)


def test_input_checks():
    m = make()
    x, t = torch.randn(2, 6, 4), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="pass labels"):
        m(x, t)
    with pytest.raises(ValueError, match="labels must be in"):
        m(x, t, torch.tensor([0, 4]))
    with pytest.raises(ValueError, match=r"x must have shape \[B, 6, 4\]"):
        m(torch.randn(2, 5, 4), t, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="t must have shape"):
        m(x, torch.tensor(3), torch.tensor([0, 1]))
    mt = make(num_classes=0, text_dim=12)
    with pytest.raises(ValueError, match="text-conditional"):
        mt(x, t)
    text, mask = text_inputs()
    mask[1] = False
    with pytest.raises(ValueError, match="no real token"):
        mt(x, t, text=text, text_mask=mask)


@pytest.mark.parametrize("text_dim", [0, 12])
def test_adaln_zero_init_is_identity(text_dim):
    m = make(text_dim=text_dim)
    x, t, y = torch.randn(2, 6, 4), torch.tensor([5, 500]), torch.tensor([1, 2])
    text, mask = text_inputs()
    kw = {"text": text, "text_mask": mask} if text_dim else {}
    c = m.t_embedder(t) + m.y_embedder(y, torch.zeros(2, dtype=torch.bool))
    ctx = m.text_embedder(text, mask, torch.zeros(2, dtype=torch.bool)) if text_dim else (None, None, None)
    h = torch.randn(2, 6, 64)
    for block in m.blocks:
        assert torch.equal(block(h, c, ctx[0], ctx[1]), h)
    assert torch.equal(m(x, t, y, **kw), torch.zeros(2, 6, 8))
    # ... and stops being one once the gates open.
    randomize(m)
    assert not torch.allclose(m.blocks[0](h, c, ctx[0], ctx[1]), h)


def test_text_variant_respects_key_padding_mask():
    m = randomize(make(num_classes=0, text_dim=12)).eval()
    x, t = torch.randn(2, 6, 4), torch.tensor([3, 700])
    text, mask = text_inputs()
    out = m(x, t, text=text, text_mask=mask)
    padded = text.clone()
    padded[0, 3:] = float("nan")  # garbage (even NaN) behind the mask must not matter
    assert torch.equal(m(x, t, text=padded, text_mask=mask), out)
    # Padding is the same as leaving those tokens out.
    torch.testing.assert_close(m(x[:1], t[:1], text=text[:1, :3])[0], out[0], atol=1e-5, rtol=1e-5)
    real = text.clone()
    real[0, 1] += 1.0
    changed = m(x, t, text=real, text_mask=mask)
    assert not torch.allclose(changed[0], out[0])
    assert torch.equal(changed[1], out[1])  # rows do not mix
    # Without a mask every token counts, so the padding changes the result.
    assert not torch.allclose(m(x, t, text=text)[0], out[0])


def test_condition_dropout_and_cfg():
    m = randomize(make(class_dropout=1.0))
    x, t, y = torch.randn(2, 6, 4), torch.tensor([3, 700]), torch.tensor([0, 2])
    null = torch.full_like(y, 3)
    m.train()
    assert torch.equal(m(x, t, y), m(x, t, null))  # every label dropped in training
    m.eval()
    cond, uncond = m(x, t, y), m(x, t, null)
    assert not torch.allclose(cond, uncond)
    assert torch.allclose(m.forward_with_cfg(x, t, y, guidance_scale=1.0), cond, atol=1e-5)
    g0 = m.forward_with_cfg(x, t, y, guidance_scale=0.0)
    assert torch.allclose(g0[..., :4], uncond[..., :4], atol=1e-5)
    assert torch.allclose(g0[..., 4:], cond[..., 4:], atol=1e-5)  # sigma channels stay conditional
    g4 = m.forward_with_cfg(x, t, y, guidance_scale=4.0)
    assert torch.allclose(g4[..., :4], uncond[..., :4] + 4.0 * (cond[..., :4] - uncond[..., :4]), atol=1e-4)

    mt = randomize(make(num_classes=0, text_dim=12)).eval()
    text, mask = text_inputs()
    drop = torch.ones(2, dtype=torch.bool)
    uncond_t = mt(x, t, text=text, text_mask=mask, drop=drop)
    other_text = torch.randn(2, 5, 12)
    assert torch.equal(mt(x, t, text=other_text, text_mask=mask, drop=drop), uncond_t)  # null text only
    g0 = mt.forward_with_cfg(x, t, text=text, text_mask=mask, guidance_scale=0.0)
    assert torch.allclose(g0[..., :4], uncond_t[..., :4], atol=1e-5)
    with pytest.raises(ValueError, match="conditional DiT"):
        make(num_classes=0).forward_with_cfg(x, t, guidance_scale=2.0)
