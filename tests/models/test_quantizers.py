"""Tests for the VQ and KL bottlenecks and the bottleneck table."""

import math

import pytest
import torch
import torch.nn.functional as F

from models.quantizers import BOTTLENECKS, Bottleneck, KLBottleneck, VectorQuantizer, codebook_stats
from models.tokenizer_config import TokenizerConfig

torch.set_num_threads(1)


def _vq_with_codebook(codes: torch.Tensor, **kwargs) -> VectorQuantizer:
    vq = VectorQuantizer(codes.shape[0], codes.shape[1], **kwargs)
    with torch.no_grad():
        vq.codebook.weight.copy_(codes)
    return vq


def test_vq_picks_nearest_code_by_cosine_and_returns_unit_codes():
    # Code 1 is far longer than code 0 but less aligned: the lookup must ignore norms.
    codes = torch.tensor([[1.0, 0.0], [10.0, 10.0], [-1.0, 0.0]])
    vq = _vq_with_codebook(codes)
    z = torch.tensor([[[2.0, 0.1], [0.1, 3.0], [-5.0, 1.0]]])
    quantized, ids, losses, _ = vq(z)
    assert ids.tolist() == [[0, 1, 2]]
    assert torch.allclose(quantized, F.normalize(codes, dim=-1)[ids])
    assert torch.allclose(vq.embed(ids), quantized)


def test_vq_commitment_loss_value():
    codes = torch.eye(3)
    vq = _vq_with_codebook(codes, commitment=0.25)
    z = torch.tensor([[[3.0, 1.0, 0.0], [0.0, 0.5, 2.0]]])
    _, ids, losses, _ = vq(z)
    zn = F.normalize(z, dim=-1)
    mse = F.mse_loss(zn, codes[ids])
    assert torch.allclose(losses["commitment"], 1.25 * mse)


def test_vq_straight_through_gradient_reaches_input():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4)
    z = torch.randn(2, 5, 4, requires_grad=True)
    quantized, _, _, _ = vq(z)
    (quantized * torch.randn_like(quantized)).sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # Without the straight-through estimator the argmax would block all gradient.
    assert vq.codebook.weight.grad is None


def test_vq_codebook_loss_trains_codebook():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4)
    _, _, losses, _ = vq(torch.randn(2, 5, 4))
    losses["commitment"].backward()
    assert vq.codebook.weight.grad.abs().sum() > 0


def test_codebook_usage_and_perplexity_on_crafted_input():
    vq = _vq_with_codebook(torch.eye(4))
    z = torch.eye(4)[[0, 0, 1, 2]].unsqueeze(0)  # ids 0, 0, 1, 2
    _, ids, _, stats = vq(z)
    assert ids.tolist() == [[0, 0, 1, 2]]
    assert stats["codebook_usage"].item() == pytest.approx(0.75)
    # p = (1/2, 1/4, 1/4): H = 1.5 ln 2, perplexity = 2 ** 1.5
    assert stats["perplexity"].item() == pytest.approx(2 ** 1.5, rel=1e-5)
    uniform = codebook_stats(torch.arange(8), 8)
    assert uniform["perplexity"].item() == pytest.approx(8.0, rel=1e-5)
    assert uniform["codebook_usage"].item() == 1.0


def _always_code_zero_setup(restart_steps: int):
    codes = torch.zeros(6, 3)
    codes[0] = torch.tensor([1.0, 0.0, 0.0])
    codes[1:] = torch.tensor([-1.0, 0.0, 0.0]) + 0.01 * torch.arange(5.0)[:, None]
    vq = _vq_with_codebook(codes, dead_code_restart_steps=restart_steps)
    z = torch.tensor([1.0, 0.0, 0.0]) + 0.3 * torch.rand(1, 10, 3)  # all nearest to code 0
    return vq, z


def test_dead_code_restart_replaces_unused_codes_with_batch_outputs():
    torch.manual_seed(0)
    vq, z = _always_code_zero_setup(restart_steps=2)
    before = vq.codebook.weight.detach().clone()
    vq.train()
    vq(z)
    vq(z)
    assert vq.steps_unused.tolist() == [0, 2, 2, 2, 2, 2]
    assert torch.equal(vq.codebook.weight, before)  # not dead yet when the step started
    vq(z)  # codes 1..5 reached the threshold: restarted from this batch's outputs
    after = vq.codebook.weight.detach()
    assert torch.equal(after[0], before[0])
    zn = F.normalize(z.reshape(-1, 3), dim=-1)
    for row in after[1:]:
        assert torch.isclose((zn - row).norm(dim=-1).min(), torch.tensor(0.0), atol=1e-6)
    assert not torch.allclose(after[1:], before[1:])


def test_dead_code_restart_is_off_in_eval_and_when_disabled():
    torch.manual_seed(0)
    for restart_steps, training in ((1, False), (0, True)):
        vq, z = _always_code_zero_setup(restart_steps)
        vq.train(training)
        before = vq.codebook.weight.detach().clone()
        for _ in range(3):
            vq(z)
        assert torch.equal(vq.codebook.weight, before)
        assert vq.steps_unused.sum().item() == 0


def test_vq_rejects_bad_shapes_and_ids():
    vq = VectorQuantizer(8, 4)
    with pytest.raises(ValueError, match="expects"):
        vq(torch.randn(2, 5, 3))
    with pytest.raises(ValueError, match="torch.long"):
        vq.embed(torch.zeros(2, 3, dtype=torch.int32))


def test_kl_eval_is_deterministic_and_train_is_stochastic():
    torch.manual_seed(0)
    kl = KLBottleneck(token_dim=4)
    h = torch.randn(2, 6, 8)
    kl.eval()
    a, _, _, _ = kl(h)
    b, _, _, _ = kl(h)
    assert torch.equal(a, b) and torch.equal(a, h[..., :4])
    kl.train()
    c, _, _, _ = kl(h)
    d, _, _, _ = kl(h)
    assert not torch.allclose(c, d)
    assert not torch.allclose(c, a)


def test_kl_loss_value():
    kl = KLBottleneck(token_dim=4, kl_weight=0.5).eval()
    h = torch.zeros(2, 3, 8)
    assert kl(h)[2]["kl"].item() == pytest.approx(0.0)
    h[..., :4] = 1.0  # mean 1, logvar 0 -> 0.5 per element, 12 elements per image
    assert kl(h)[2]["kl"].item() == pytest.approx(0.5 * 0.5 * 12)
    h = torch.zeros(1, 1, 8)
    h[..., 4:] = math.log(4.0)  # var 4: 0.5 * (4 - 1 - ln 4) per element
    assert kl(h)[2]["kl"].item() == pytest.approx(0.5 * 4 * 0.5 * (3 - math.log(4.0)), rel=1e-5)


def test_kl_rejects_wrong_width():
    with pytest.raises(ValueError, match="expects"):
        KLBottleneck(token_dim=4)(torch.randn(1, 2, 4))


def test_bottleneck_table_entries_implement_the_interface():
    assert BOTTLENECKS == {"vq": VectorQuantizer, "kl": KLBottleneck}
    assert all(issubclass(cls, Bottleneck) for cls in BOTTLENECKS.values())
    assert VectorQuantizer.discrete and not KLBottleneck.discrete
    assert VectorQuantizer.input_dim(12) == 12 and KLBottleneck.input_dim(12) == 24
    with pytest.raises(TypeError):
        Bottleneck()  # abstract


def test_from_config_reads_the_config_fields():
    config = TokenizerConfig(bottleneck="vq", codebook_size=32, token_dim=6, commitment=0.5,
                             dead_code_restart_steps=3, kl_weight=0.1)
    vq = VectorQuantizer.from_config(config)
    assert (vq.codebook_size, vq.token_dim, vq.commitment, vq.dead_code_restart_steps) == (32, 6, 0.5, 3)
    kl = KLBottleneck.from_config(config)
    assert (kl.token_dim, kl.kl_weight) == (6, 0.1)


def test_latents_look_up_vq_codes_and_pass_kl_tokens_through():
    torch.manual_seed(0)
    vq = VectorQuantizer(8, 4).eval()
    quantized, ids, _, _ = vq(torch.randn(2, 5, 4))
    assert torch.allclose(vq.latents(ids, num_tokens=5), quantized, atol=1e-6)  # quantized carries the STE
    with pytest.raises(ValueError, match=r"vq decode expects ids \[B, 5\]"):
        vq.latents(ids[:, :4], num_tokens=5)
    with pytest.raises(ValueError, match="torch.long"):
        vq.latents(ids.int(), num_tokens=5)
    kl = KLBottleneck(token_dim=4).eval()
    z, tokens, _, _ = kl(torch.randn(2, 5, 8))
    assert kl.latents(tokens, num_tokens=5) is tokens and torch.equal(tokens, z)
    for bad in (torch.randn(2, 4, 4), torch.randn(2, 5, 3), torch.randn(5, 4)):
        with pytest.raises(ValueError, match=r"kl decode expects \[B, 5, 4\]"):
            kl.latents(bad, num_tokens=5)
