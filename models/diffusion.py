"""Gaussian diffusion, the DiT/ADM recipe in one compact module.

Linear beta schedule, epsilon prediction, optionally learned variance (the model's extra channels
v in [-1, 1] interpolate log beta_tilde .. log beta) trained with the improved-DDPM hybrid loss
MSE(eps) + VLB, where the VLB sees a stop-gradient mean so it only trains the variance.
Sampling: ancestral DDPM and DDIM, both on a respaced (shorter) timestep schedule. For
classifier-free guidance pass e.g. ``lambda x, t: dit.forward_with_cfg(x, t, labels, guidance_scale=4.0)``
as ``model_fn``. All noise comes from ``generator`` (which must live on the sampling device).
"""
from __future__ import annotations

import math
from typing import Callable

import torch

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t [B, ...], t [B]) -> model output


def linear_betas(num_timesteps: int = 1000) -> torch.Tensor:
    """The DDPM linear schedule 1e-4 .. 0.02, scaled so other step counts keep the same total noise."""
    scale = 1000 / num_timesteps
    return torch.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=torch.float64)


def space_timesteps(num_timesteps: int, steps: int) -> torch.Tensor:
    """``steps`` evenly spaced timesteps from 0 to num_timesteps - 1 (ADM's integer respacing)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return torch.tensor([num_timesteps - 1])
    return torch.linspace(0, num_timesteps - 1, steps, dtype=torch.float64).round().long()


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.dim())))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """-log N(x; mean, e^logvar), elementwise, in nats."""
    return 0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


class GaussianDiffusion:
    """Forward process, loss and samplers for one beta schedule.

    ``timestep_map[i]`` is the original timestep that step i of this (possibly respaced) schedule
    stands for; models are always called with original timesteps.
    """

    def __init__(self, betas: torch.Tensor, learn_sigma: bool = True, timestep_map: torch.Tensor | None = None) -> None:
        betas = betas.to(torch.float64)
        if betas.dim() != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1D tensor with values in (0, 1]")
        self.num_timesteps = len(betas)
        self.learn_sigma = learn_sigma
        self.timestep_map = torch.arange(self.num_timesteps) if timestep_map is None else timestep_map.long()
        if self.timestep_map.shape != betas.shape:
            raise ValueError("timestep_map must have one entry per beta")
        alphas = 1.0 - betas
        ac = torch.cumprod(alphas, dim=0)
        ac_prev = torch.cat([ac.new_ones(1), ac[:-1]])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # float64 master tables; _extract hands out float32 copies on the data's device.
        self.tables: dict[str, torch.Tensor] = {
            "betas": betas,
            "alphas_cumprod": ac,
            "alphas_cumprod_prev": ac_prev,
            "sqrt_alphas_cumprod": ac.sqrt(),
            "sqrt_one_minus_alphas_cumprod": (1.0 - ac).sqrt(),
            "sqrt_recip_alphas_cumprod": (1.0 / ac).sqrt(),
            "sqrt_recipm1_alphas_cumprod": (1.0 / ac - 1.0).sqrt(),
            "posterior_variance": post_var,
            # beta_tilde_0 is 0, so its log is clipped to beta_tilde_1 (as in ADM).
            "posterior_log_variance_clipped": torch.cat([post_var[1:2], post_var[1:]]).log(),
            "posterior_mean_coef1": betas * ac_prev.sqrt() / (1.0 - ac),
            "posterior_mean_coef2": (1.0 - ac_prev) * alphas.sqrt() / (1.0 - ac),
            "log_betas": betas.log(),
            # DiT's fixed variance when sigma is not learned ("fixed large").
            "fixed_log_variance": torch.cat([post_var[1:2], betas[1:]]).log(),
        }
        self._on_device: dict[tuple[str, torch.device], torch.Tensor] = {}

    @classmethod
    def linear(cls, num_timesteps: int = 1000, learn_sigma: bool = True) -> GaussianDiffusion:
        return cls(linear_betas(num_timesteps), learn_sigma=learn_sigma)

    def respace(self, steps: int) -> GaussianDiffusion:
        """A schedule on ``steps`` evenly spaced timesteps with the same alphas_cumprod there."""
        use = space_timesteps(self.num_timesteps, steps)
        ac = self.tables["alphas_cumprod"][use]
        betas = 1.0 - ac / torch.cat([ac.new_ones(1), ac[:-1]])
        return GaussianDiffusion(betas, learn_sigma=self.learn_sigma, timestep_map=self.timestep_map[use])

    def _extract(self, name: str, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at timesteps t [B], shaped to broadcast against x."""
        key = (name, x.device)
        if key not in self._on_device:
            self._on_device[key] = self.tables[name].float().to(x.device)
        return self._on_device[key][t].view(-1, *([1] * (x.dim() - 1)))

    # ---------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Sample x_t ~ q(x_t | x_0) = N(sqrt(abar_t) x0, (1 - abar_t) I) with the given noise."""
        a, s = self._extract("sqrt_alphas_cumprod", t, x0), self._extract("sqrt_one_minus_alphas_cumprod", t, x0)
        return a * x0 + s * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log variance of q(x_{t-1} | x_t, x_0)."""
        mean = self._extract("posterior_mean_coef1", t, x_t) * x0 + self._extract("posterior_mean_coef2", t, x_t) * x_t
        return mean, self._extract("posterior_log_variance_clipped", t, x_t)

    # ---------------------------------------------------------------- reverse process
    def p_mean_variance(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Turn the model output into p(x_{t-1} | x_t): mean, log_variance, pred_x0 and eps."""
        model_out = model_out.float()
        c = x_t.shape[-1]
        expected = 2 * c if self.learn_sigma else c
        if model_out.shape[:-1] != x_t.shape[:-1] or model_out.shape[-1] != expected:
            raise ValueError(f"model output must be {tuple(x_t.shape[:-1]) + (expected,)} "
                             f"(learn_sigma={self.learn_sigma}), got {tuple(model_out.shape)}")
        if self.learn_sigma:
            eps, v = model_out.split(c, dim=-1)
            frac = (v + 1) / 2
            log_var = frac * self._extract("log_betas", t, x_t) + (1 - frac) * self._extract(
                "posterior_log_variance_clipped", t, x_t)
        else:
            eps = model_out
            log_var = self._extract("fixed_log_variance", t, x_t).expand_as(x_t)
        pred_x0 = self._extract("sqrt_recip_alphas_cumprod", t, x_t) * x_t - self._extract(
            "sqrt_recipm1_alphas_cumprod", t, x_t) * eps
        mean, _ = self.q_posterior(pred_x0, x_t, t)
        return {"mean": mean, "log_variance": log_var, "pred_x0": pred_x0, "eps": eps}

    def vb_loss(self, model_out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-row VLB term L_t in bits/dim with the predicted eps detached, so it trains only the
        variance: KL(q(x_{t-1}|x_t,x_0) || p) for t > 0 and the decoder NLL -log p(x_0|x_1) at t = 0.

        The decoder is a continuous Gaussian, not ADM's 8-bit discretized one: tokens are real vectors.
        """
        c = x_t.shape[-1]
        frozen = torch.cat([model_out[..., :c].detach(), model_out[..., c:]], dim=-1)
        p = self.p_mean_variance(frozen, x_t, t)
        true_mean, true_log_var = self.q_posterior(x0, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, p["mean"], p["log_variance"])) / math.log(2.0)
        nll = mean_flat(gaussian_nll(x0, p["mean"], p["log_variance"])) / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_loss(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        model_kwargs: dict | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Hybrid loss at uniformly drawn timesteps: MSE(eps) (+ VLB when learn_sigma)."""
        b = x0.shape[0]
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, self.timestep_map.to(x0.device)[t], **(model_kwargs or {})).float()
        c = x0.shape[-1]
        mse = mean_flat((noise - out[..., :c]) ** 2)
        loss = mse
        # Tensors: a `.item()` here would sync a GPU every step (the training loop reads logs on log steps).
        logs = {"mse": mse.mean().detach()}
        if self.learn_sigma:
            # T * L_t is the unbiased VLB estimate; ADM divides it by 1000 so it cannot swamp the MSE.
            vb = self.vb_loss(out, x0, x_t, t) * (self.num_timesteps / 1000.0)
            loss = loss + vb
            logs["vb"] = vb.mean().detach()
        loss = loss.mean()
        logs["loss"] = loss.detach()
        return loss, logs

    # ---------------------------------------------------------------- samplers
    def _start(
        self, shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device | str | None
    ) -> torch.Tensor:
        if device is None:
            device = generator.device if generator is not None else torch.get_default_device()
        return torch.randn(shape, generator=generator, device=device)

    @torch.no_grad()
    def ddpm_sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        steps: int | None = 250,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Ancestral sampling on ``steps`` respaced timesteps (None: all of them)."""
        diffusion = self if steps is None else self.respace(steps)
        x = self._start(shape, generator, device)
        tmap = diffusion.timestep_map.to(x.device)
        for i in reversed(range(diffusion.num_timesteps)):
            t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
            out = diffusion.p_mean_variance(model_fn(x, tmap[t]), x, t)
            x = out["mean"]
            if i > 0:
                noise = torch.randn(shape, generator=generator, device=x.device)
                x = x + torch.exp(0.5 * out["log_variance"]) * noise
        return x

    @torch.no_grad()
    def ddim_sample(
        self,
        model_fn: ModelFn,
        shape: tuple[int, ...],
        steps: int = 50,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """DDIM on ``steps`` respaced timesteps; eta=0 is deterministic given the start noise."""
        diffusion = self.respace(steps)
        x = self._start(shape, generator, device)
        tmap = diffusion.timestep_map.to(x.device)
        for i in reversed(range(diffusion.num_timesteps)):
            t = torch.full((shape[0],), i, dtype=torch.long, device=x.device)
            out = diffusion.p_mean_variance(model_fn(x, tmap[t]), x, t)
            ac = diffusion._extract("alphas_cumprod", t, x)
            ac_prev = diffusion._extract("alphas_cumprod_prev", t, x)
            sigma = eta * ((1 - ac_prev) / (1 - ac)).sqrt() * (1 - ac / ac_prev).sqrt()
            x = out["pred_x0"] * ac_prev.sqrt() + (1 - ac_prev - sigma**2).clamp_min(0).sqrt() * out["eps"]
            if i > 0 and eta > 0:
                x = x + sigma * torch.randn(shape, generator=generator, device=x.device)
        return x
