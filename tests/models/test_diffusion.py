"""Tests for the Gaussian diffusion (models/diffusion.py), checked against closed forms."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.diffusion import GaussianDiffusion, space_timesteps
from models.dit import DiT, DiTConfig

torch.set_num_threads(1)

# The DDPM linear schedule, computed independently in float64 numpy.
BETAS = np.linspace(1e-4, 0.02, 1000)
ABAR = np.cumprod(1 - BETAS)


def gaussian_oracle(diffusion: GaussianDiffusion, mu: float, s: float, v: float = -1.0):
    """Exact E[eps | x_t] for data ~ N(mu, s^2), called with original timesteps (as models are)."""
    abar = torch.tensor(ABAR, dtype=torch.float32)

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        a = abar[t].view(-1, *([1] * (x.dim() - 1)))
        eps = (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s**2 + 1 - a)
        return torch.cat([eps, torch.full_like(eps, v)], -1) if diffusion.learn_sigma else eps

    return fn


def test_schedule_and_q_sample_closed_form():
    d = GaussianDiffusion.linear(1000)
    assert d.num_timesteps == 1000
    np.testing.assert_allclose(d.tables["alphas_cumprod"].numpy(), ABAR, rtol=1e-12)
    assert ABAR[-1] == pytest.approx(4.036e-5, rel=1e-3)  # the well-known terminal SNR of this schedule
    x0, noise = torch.randn(4, 3, 2), torch.randn(4, 3, 2)
    t = torch.tensor([0, 10, 500, 999])
    a = torch.tensor(ABAR[t.numpy()], dtype=torch.float32).view(-1, 1, 1)
    torch.testing.assert_close(d.q_sample(x0, t, noise), a.sqrt() * x0 + (1 - a).sqrt() * noise)
    # 2x the steps keeps about the same total noise (scaled betas).
    assert GaussianDiffusion.linear(2000).tables["alphas_cumprod"][-1].item() == pytest.approx(ABAR[-1], rel=0.05)


def test_posterior_matches_bayes_rule():
    """q(x_{t-1} | x_t, x0) from the product of q(x_{t-1} | x0) and q(x_t | x_{t-1})."""
    d = GaussianDiffusion.linear(1000)
    t = np.array([1, 5, 100, 999])
    prec = 1 / (1 - ABAR[t - 1]) + (1 - BETAS[t]) / BETAS[t]
    x0, xt = np.random.default_rng(0).normal(size=(2, 4))
    mean = (np.sqrt(ABAR[t - 1]) * x0 / (1 - ABAR[t - 1]) + np.sqrt(1 - BETAS[t]) * xt / BETAS[t]) / prec
    got_mean, got_log_var = d.q_posterior(torch.tensor(x0).float(), torch.tensor(xt).float(), torch.tensor(t))
    np.testing.assert_allclose(got_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got_log_var.numpy(), np.log(1 / prec), rtol=1e-5)


def test_learned_sigma_interpolation_and_pred_x0():
    d = GaussianDiffusion.linear(1000)
    x0, noise = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    t = torch.tensor([3, 300, 900])
    xt = d.q_sample(x0, t, noise)
    lo = torch.tensor(np.log(BETAS[t] * (1 - ABAR[t - 1]) / (1 - ABAR[t])), dtype=torch.float32).view(-1, 1, 1)
    hi = torch.tensor(np.log(BETAS[t]), dtype=torch.float32).view(-1, 1, 1)
    for v, expected in ((-1.0, lo), (1.0, hi), (0.0, (lo + hi) / 2)):
        out = d.p_mean_variance(torch.cat([noise, torch.full_like(noise, v)], -1), xt, t)
        torch.testing.assert_close(out["log_variance"], expected.expand_as(xt))
        torch.testing.assert_close(out["pred_x0"], x0, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="learn_sigma=True"):
        d.p_mean_variance(noise, xt, t)


def test_vb_loss_trains_only_sigma_and_vanishes_at_the_truth():
    d = GaussianDiffusion.linear(1000)
    x0, noise = torch.randn(3, 4, 2), torch.randn(3, 4, 2)
    t = torch.tensor([1, 300, 999])
    xt = d.q_sample(x0, t, noise)
    # Exact eps and v = -1 (the true posterior variance): the KL is zero.
    truth = torch.cat([noise, -torch.ones_like(noise)], -1)
    assert d.vb_loss(truth, x0, xt, t).abs().max() < 1e-4
    out = torch.cat([noise + 0.3 * torch.randn_like(noise), torch.zeros_like(noise)], -1).requires_grad_()
    vb = d.vb_loss(out, x0, xt, t)
    assert (vb > 0).all()
    vb.sum().backward()
    assert torch.all(out.grad[..., :2] == 0)  # stop-grad on the mean
    assert out.grad[..., 2:].abs().sum() > 0


def test_training_loss_terms_and_determinism():
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_size("nano", token_dim=2, seq_len=4, num_classes=3))
    x0, labels = torch.randn(256, 4, 2), torch.randint(0, 3, (256,))
    d = GaussianDiffusion.linear(1000)
    loss, logs = d.training_loss(model, x0, {"labels": labels}, generator=torch.Generator().manual_seed(0))
    again, _ = d.training_loss(model, x0, {"labels": labels}, generator=torch.Generator().manual_seed(0))
    logs = {k: v.item() for k, v in logs.items()}  # 0-d tensors: the training loop reads them on log steps
    assert set(logs) == {"loss", "mse", "vb"} and loss.item() == pytest.approx(logs["mse"] + logs["vb"], rel=1e-5)
    assert loss.item() == again.item()
    # The zero-initialised DiT predicts eps = 0, so the MSE is E[noise^2] ~ 1.
    assert logs["mse"] == pytest.approx(1.0, abs=0.15)
    loss.backward()
    assert all(p.grad is not None for p in model.final_layer.parameters())
    fixed = GaussianDiffusion.linear(1000, learn_sigma=False)
    loss, logs = fixed.training_loss(lambda x, t: torch.zeros_like(x), x0, generator=torch.Generator().manual_seed(0))
    assert set(logs) == {"loss", "mse"} and loss.item() == pytest.approx(logs["mse"].item())


def test_respacing():
    assert space_timesteps(1000, 250).tolist()[:3] == [0, 4, 8]
    d = GaussianDiffusion.linear(1000)
    r = d.respace(250)
    assert r.num_timesteps == 250
    tmap = r.timestep_map
    assert tmap[0] == 0 and tmap[-1] == 999 and torch.all(tmap[1:] > tmap[:-1])
    np.testing.assert_allclose(r.tables["alphas_cumprod"].numpy(), ABAR[tmap.numpy()], rtol=1e-10)
    np.testing.assert_allclose(d.respace(1000).tables["betas"].numpy(), BETAS, rtol=1e-9)
    assert r.respace(10).timestep_map.tolist() == tmap[space_timesteps(250, 10)].tolist()
    with pytest.raises(ValueError, match="steps must be in"):
        d.respace(0)

    seen = []

    def model_fn(x, t):
        seen.append(t[0].item())
        return torch.zeros(*x.shape[:-1], 2 * x.shape[-1])

    d.ddim_sample(model_fn, (2, 3, 1), steps=50)
    assert len(seen) == 50 and seen[0] == 999 and seen[-1] == 0 and seen == sorted(seen, reverse=True)
    seen.clear()
    d.ddpm_sample(model_fn, (2, 3, 1), steps=25)
    assert len(seen) == 25 and seen == d.respace(25).timestep_map.flip(0).tolist()


def test_samplers_deterministic_for_a_fixed_generator():
    d = GaussianDiffusion.linear(1000)
    fn = gaussian_oracle(d, mu=0.5, s=0.3, v=0.0)
    shape = (4, 3, 2)
    for sample in (lambda g: d.ddpm_sample(fn, shape, steps=20, generator=g),
                   lambda g: d.ddim_sample(fn, shape, steps=20, generator=g),
                   lambda g: d.ddim_sample(fn, shape, steps=20, eta=1.0, generator=g)):
        a = sample(torch.Generator().manual_seed(0))
        assert torch.equal(a, sample(torch.Generator().manual_seed(0)))
        assert not torch.allclose(a, sample(torch.Generator().manual_seed(1)))


def test_samplers_recover_a_gaussian_with_the_exact_eps():
    """With the exact eps of N(0.5, 0.3^2) data, samples have that mean and std."""
    for learn_sigma in (True, False):
        d = GaussianDiffusion.linear(1000, learn_sigma=learn_sigma)
        fn = gaussian_oracle(d, mu=0.5, s=0.3)
        for x in (d.ddpm_sample(fn, (4000, 2, 1), steps=250, generator=torch.Generator().manual_seed(0)),
                  d.ddim_sample(fn, (4000, 2, 1), steps=250, generator=torch.Generator().manual_seed(0))):
            assert x.mean().item() == pytest.approx(0.5, abs=0.02)
            assert x.std().item() == pytest.approx(0.3, abs=0.02)
    # A single data point: DDIM must land on it exactly (wrong timestep maps would not).
    d = GaussianDiffusion.linear(1000)
    point = gaussian_oracle(d, mu=0.7, s=0.0)
    x = d.ddim_sample(point, (8, 2, 1), steps=10, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x, torch.full_like(x, 0.7), atol=1e-4, rtol=0)


def test_tiny_dit_fits_two_modes():
    torch.manual_seed(0)
    model = DiT(DiTConfig.from_size("nano", token_dim=2, seq_len=4, num_classes=0))
    d = GaussianDiffusion.linear(1000)
    g = torch.Generator().manual_seed(0)
    mode = torch.tensor([[1.0, -1.0], [0.5, 0.5], [-1.0, 1.0], [-0.5, -0.5]])
    modes = torch.stack([mode, -mode])

    def nearest(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return ((x[:, None] - modes[None]) ** 2).mean((2, 3)).sqrt().min(1)

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / 250)  # decay to 0: less end noise
    for _ in range(250):
        x0 = modes[torch.randint(0, 2, (64,), generator=g)] + 0.05 * torch.randn(64, 4, 2, generator=g)
        loss, _ = d.training_loss(model, x0, generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    x = d.ddim_sample(model, (200, 4, 2), steps=50, generator=torch.Generator().manual_seed(1))
    dist, which = nearest(x)
    # Standard normal draws sit ~1.3 from the nearest mode.
    assert nearest(torch.randn(200, 4, 2, generator=g))[0].median() > 1.0
    assert (dist < 0.3).float().mean() > 0.7
    assert dist.median() < 0.15
    assert 0.25 < which.float().mean() < 0.75  # both modes are covered
