"""Tests for the tokenizer losses and the PatchGAN discriminator."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models.discriminator import PatchDiscriminator
from models.tokenizer import Tokenizer
from models.tokenizer_config import TokenizerConfig
from models.tokenizer_loss import LPIPSDistance, PerceptualLoss, TokenizerLoss, load_lpips_if_available
from models.tokenizer_loss_config import TokenizerLossConfig

torch.set_num_threads(1)


class TinyFeatures(nn.Module):
    """Random two-stage conv net returning a list of feature maps; records its input size."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.dropout = nn.Dropout(0.5)  # must be disabled by the frozen wrapper
        self.seen_sizes: list[tuple[int, int]] = []

    def forward(self, x):
        self.seen_sizes.append(tuple(x.shape[-2:]))
        f1 = torch.relu(self.conv1(x))
        f2 = self.dropout(torch.relu(self.conv2(f1)))
        return [f1, f2]


def make_loss(**overrides) -> TokenizerLoss:
    cfg = dict(perceptual_resize=20, discriminator_width=8, discriminator_layers=2)
    cfg.update(overrides)
    return TokenizerLoss(TokenizerLossConfig(**cfg), TinyFeatures())


def make_tokenizer() -> Tokenizer:
    return Tokenizer(TokenizerConfig(image_size=16, patch_size=4, size="nano", num_latent_tokens=8,
                                     codebook_size=64))


def test_perceptual_loss_zero_on_equal_positive_on_different_and_frozen():
    torch.manual_seed(0)
    net = TinyFeatures()
    loss = PerceptualLoss(net, resize=24).train()
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    a = torch.rand(2, 3, 16, 16)
    assert loss(a, a).item() == pytest.approx(0.0, abs=1e-10)  # dropout off: deterministic
    b = torch.rand(2, 3, 16, 16, requires_grad=True)
    d = loss(b, a)
    assert d.item() > 0
    d.backward()
    assert b.grad.abs().sum() > 0
    assert all(p.grad is None for p in net.parameters())
    assert set(net.seen_sizes) == {(24, 24)}


def test_perceptual_loss_matches_manual_formula_and_is_scale_invariant_per_position():
    torch.manual_seed(0)
    net = TinyFeatures()
    loss = PerceptualLoss(net, resize=16)
    a, b = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    fa, fb = net(a), net(b)
    expected = torch.stack([
        (F.normalize(x, dim=1, eps=1e-10) - F.normalize(y, dim=1, eps=1e-10)).pow(2).sum(1).mean()
        for x, y in zip(fa, fb)]).mean()
    assert torch.allclose(loss(a, b), expected, atol=1e-6)

    class Scaled(nn.Module):  # features times a positive constant: normalised away
        def forward(self, x):
            return [5.0 * f for f in net(x)]
    assert torch.allclose(PerceptualLoss(Scaled(), 16)(a, b), expected, atol=1e-6)


def test_perceptual_loss_rejects_non_list_features():
    with pytest.raises(ValueError, match="list of feature maps"):
        PerceptualLoss(nn.Conv2d(3, 4, 3), 16)(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))


def _floats(logs: dict) -> dict[str, float]:
    """The loss's logs are 0-d tensors (the training loop reads them on log steps)."""
    return {k: v.item() for k, v in logs.items()}


def test_generator_loss_is_finite_and_sums_its_terms():
    torch.manual_seed(0)
    tokenizer, loss = make_tokenizer(), make_loss(gan_weight=0.5, perceptual_weight=2.0, l2_weight=3.0)
    images = torch.rand(2, 3, 16, 16)
    out = tokenizer(images)
    total, logs = loss.generator_loss(images, out, step=0)
    # Detached 0-d tensors, not floats: reading them on the host would sync a GPU every step.
    assert all(v.ndim == 0 and not v.requires_grad for v in logs.values())
    logs = _floats(logs)
    assert torch.isfinite(total) and total.ndim == 0
    assert set(logs) >= {"l2", "perceptual", "commitment", "gan", "total", "codebook_usage", "perplexity"}
    expected = 3.0 * logs["l2"] + 2.0 * logs["perceptual"] + logs["commitment"] + 0.5 * logs["gan"]
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert logs["l2"] == pytest.approx(F.mse_loss(out.reconstruction, images).item(), rel=1e-6)

    total.backward()
    assert tokenizer.patch_embed.proj.weight.grad.abs().sum() > 0
    # The generator step leaves no gradient on the discriminator.
    assert all(p.grad is None for p in loss.discriminator.parameters())


def test_gan_term_starts_at_gan_start_step():
    torch.manual_seed(0)
    tokenizer, loss = make_tokenizer(), make_loss(gan_start_step=10)
    images = torch.rand(2, 3, 16, 16)
    out = tokenizer(images)
    _, early = loss.generator_loss(images, out, step=9)
    early = _floats(early)
    _, late = loss.generator_loss(images, out, step=10)
    late = _floats(late)
    assert "gan" not in early and "gan" in late


def test_discriminator_loss_hinge_and_lecam_buffers():
    torch.manual_seed(0)
    loss = make_loss(gan_start_step=5, lecam_decay=0.9, lecam_weight=0.1)
    images, recon = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)

    d_loss, logs = loss.discriminator_loss(images, recon, step=0)  # before start: zero, no EMA
    logs = _floats(logs)
    assert d_loss.item() == 0.0 and d_loss.requires_grad
    assert loss.ema_real_logits.item() == 0.0 and loss.ema_fake_logits.item() == 0.0

    d_loss, logs = loss.discriminator_loss(images, recon, step=5)
    logs = _floats(logs)
    real, fake = loss.discriminator(images), loss.discriminator(recon)
    hinge = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
    lecam = F.relu(real).pow(2).mean() + F.relu(-fake).pow(2).mean()  # EMAs were 0 before this step
    assert torch.isfinite(d_loss)
    assert d_loss.item() == pytest.approx((hinge + 0.1 * lecam).item(), rel=1e-5)
    assert loss.ema_real_logits.item() == pytest.approx(0.1 * real.mean().item(), rel=1e-5)
    assert loss.ema_fake_logits.item() == pytest.approx(0.1 * fake.mean().item(), rel=1e-5)
    assert logs["ema_logits_real"] == pytest.approx(loss.ema_real_logits.item())

    d_loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in loss.discriminator.parameters())
    assert "ema_real_logits" in loss.state_dict()


def test_discriminator_step_improves_separation():
    torch.manual_seed(0)
    loss = make_loss()
    opt = torch.optim.Adam(loss.discriminator.parameters(), lr=1e-3)
    real = torch.rand(4, 3, 16, 16)
    fake = torch.rand(4, 3, 16, 16) * 0.2  # darker "reconstructions"
    first = None
    for _ in range(30):
        d_loss, _ = loss.discriminator_loss(real, fake, step=0)
        opt.zero_grad()
        d_loss.backward()
        opt.step()
        first = d_loss.item() if first is None else first
    assert d_loss.item() < 0.5 * first


def test_no_discriminator_when_gan_weight_is_zero():
    loss = make_loss(gan_weight=0.0)
    assert not loss.has_discriminator and loss.discriminator is None
    with pytest.raises(RuntimeError, match="no discriminator"):
        loss.discriminator_loss(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16), step=0)
    out = make_tokenizer()(torch.rand(1, 3, 16, 16))
    _, logs = loss.generator_loss(torch.rand(1, 3, 16, 16), out, step=100)
    logs = _floats(logs)
    assert "gan" not in logs


def test_perceptual_needs_a_feature_net():
    with pytest.raises(ValueError, match="feature_net"):
        TokenizerLoss(TokenizerLossConfig(), None)
    loss = TokenizerLoss(TokenizerLossConfig(perceptual_weight=0.0, gan_weight=0.0), None)
    out = make_tokenizer()(torch.rand(1, 3, 16, 16))
    _, logs = loss.generator_loss(torch.rand(1, 3, 16, 16), out, step=0)
    logs = _floats(logs)
    assert "perceptual" not in logs


def test_ready_distance_module_is_used_as_is():
    net = TinyFeatures()
    distance = PerceptualLoss(net, resize=16)
    loss = TokenizerLoss(TokenizerLossConfig(perceptual_resize=99, gan_weight=0.0), distance)
    assert loss.perceptual is distance


def test_load_lpips_if_available_returns_none_without_package_or_weights(tmp_path):
    assert load_lpips_if_available(None) is None
    assert load_lpips_if_available(str(tmp_path / "missing.pth")) is None
    weights = tmp_path / "lpips_vgg.pth"
    weights.write_bytes(b"not loaded unless lpips is installed")
    try:
        import lpips  # noqa: F401
    except ImportError:
        assert load_lpips_if_available(str(weights)) is None
    else:
        pytest.skip("lpips is installed; the no-package path cannot be exercised")


def test_lpips_wrapper_interface():
    class FakeLPIPS(nn.Module):  # same call signature as lpips.LPIPS
        def forward(self, a, b, normalize=False):
            assert normalize
            return (a - b).abs().mean(dim=(1, 2, 3), keepdim=True)
    d = LPIPSDistance(FakeLPIPS(), resize=8)
    assert d(torch.ones(2, 3, 16, 16), torch.zeros(2, 3, 16, 16)).item() == pytest.approx(1.0)


def test_patch_discriminator_shapes_and_small_input_error():
    disc = PatchDiscriminator(3, width=8, num_layers=3)
    assert disc(torch.rand(2, 3, 32, 32)).shape == (2, 1, 4, 4)
    assert disc(torch.rand(2, 3, 8, 8)).shape == (2, 1, 1, 1)
    with pytest.raises(ValueError, match="discriminator_layers"):
        disc(torch.rand(2, 3, 4, 4))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in disc.modules())
