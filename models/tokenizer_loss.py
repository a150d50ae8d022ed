"""Training losses for the tokenizer: pixel L2 + perceptual + hinge GAN with LeCAM
regularisation (the TiTok / MaskGIT recipe), plus the bottleneck terms from the tokenizer.

The perceptual term is LPIPS-style: squared differences of channel-normalised features of a
frozen network, averaged over layers, without LPIPS's learned per-channel weights (real LPIPS
is used instead when the `lpips` package and its weights are available, see
``load_lpips_if_available``).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from models.discriminator import PatchDiscriminator
from models.tokenizer import TokenizerOutput
from models.tokenizer_loss_config import TokenizerLossConfig


def _resize(images: Tensor, size: int) -> Tensor:
    if images.shape[-2:] == (size, size):
        return images
    downsampling = min(images.shape[-2:]) > size
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False, antialias=downsampling)


class PerceptualLoss(nn.Module):
    """Distance between images in [0, 1] under a frozen feature network.

    ``feature_net(images)`` must return a list of feature maps [B, C, ...]. Per layer the
    features are l2-normalised over channels, the squared difference is summed over
    channels and averaged over batch and positions; the result is the mean over layers.
    """

    def __init__(self, feature_net: nn.Module, resize: int):
        super().__init__()
        self.feature_net = feature_net.eval().requires_grad_(False)
        self.resize = resize

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.feature_net.eval()  # frozen: dropout/batch-norm must stay in inference mode
        return self

    def _features(self, images: Tensor) -> list[Tensor]:
        feats = self.feature_net(_resize(images, self.resize))
        if not isinstance(feats, (list, tuple)) or not feats:
            raise ValueError("PerceptualLoss: feature_net must return a non-empty list of feature maps, "
                             f"got {type(feats).__name__}")
        return [F.normalize(f.float(), dim=1, eps=1e-10) for f in feats]

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            target_feats = self._features(target)
        recon_feats = self._features(reconstruction)
        per_layer = [(r - t).pow(2).sum(dim=1).mean() for r, t in zip(recon_feats, target_feats)]
        return torch.stack(per_layer).mean()


class LPIPSDistance(nn.Module):
    """Wraps an ``lpips.LPIPS`` network as a [0, 1]-image distance with PerceptualLoss's
    interface: forward(reconstruction, target) -> scalar."""

    def __init__(self, lpips_net: nn.Module, resize: int | None = None):
        super().__init__()
        self.lpips_net = lpips_net.eval().requires_grad_(False)
        self.resize = resize

    def train(self, mode: bool = True) -> "LPIPSDistance":
        super().train(mode)
        self.lpips_net.eval()
        return self

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        if self.resize is not None:
            reconstruction, target = _resize(reconstruction, self.resize), _resize(target, self.resize)
        return self.lpips_net(reconstruction.float(), target.float(), normalize=True).mean()


def load_lpips_if_available(path: str | None, resize: int | None = None) -> nn.Module | None:
    """LPIPS(VGG) as an ``LPIPSDistance`` if the `lpips` package is importable and ``path`` is a
    full ``lpips.LPIPS(net="vgg")`` state dict (.pt/.pth or .safetensors: backbone and linear
    layers, so nothing is downloaded). Returns None otherwise."""
    if path is None or not Path(path).is_file():
        return None
    try:
        import lpips  # optional dependency, imported lazily
    except ImportError:
        return None
    net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file
        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    net.load_state_dict(state)
    return LPIPSDistance(net, resize)


def _mean_over_ranks(x: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        x = x.clone()
        dist.all_reduce(x)
        x = x / dist.get_world_size()
    return x


class TokenizerLoss(nn.Module):
    """Generator and discriminator objectives for tokenizer training.

    ``feature_net`` is either a feature network (wrapped in ``PerceptualLoss``) or a ready
    distance module (``PerceptualLoss`` / the result of ``load_lpips_if_available``); it may be
    None only when ``perceptual_weight == 0``. Optimise ``self.discriminator.parameters()``
    with the discriminator optimizer.
    """

    def __init__(self, config: TokenizerLossConfig, feature_net: nn.Module | None):
        super().__init__()
        self.config = config
        self.perceptual: nn.Module | None = None
        if config.perceptual_weight > 0:
            if feature_net is None:
                raise ValueError("TokenizerLoss: perceptual_weight > 0 needs a feature_net "
                                 "(e.g. the Inception features); pass one or set perceptual_weight=0")
            self.perceptual = (feature_net if isinstance(feature_net, (PerceptualLoss, LPIPSDistance))
                               else PerceptualLoss(feature_net, config.perceptual_resize))
        self.discriminator = (PatchDiscriminator(config.channels, config.discriminator_width,
                                                 config.discriminator_layers)
                              if config.gan_weight > 0 else None)
        # LeCAM anchors: EMAs of the mean real / fake discriminator logits.
        self.register_buffer("ema_real_logits", torch.zeros(()))
        self.register_buffer("ema_fake_logits", torch.zeros(()))

    @property
    def has_discriminator(self) -> bool:
        return self.config.gan_weight > 0

    def gan_active(self, step: int) -> bool:
        return self.has_discriminator and step >= self.config.gan_start_step

    def generator_loss(self, images: Tensor, output: TokenizerOutput, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Total generator loss (reconstruction + perceptual + bottleneck + GAN) and float logs."""
        cfg = self.config
        recon, images = output.reconstruction.float(), images.float()
        if recon.shape != images.shape:
            raise ValueError(f"reconstruction {tuple(recon.shape)} and images {tuple(images.shape)} differ in shape")
        l2 = F.mse_loss(recon, images)
        total = cfg.l2_weight * l2
        logs: dict[str, Tensor] = {"l2": l2}
        if self.perceptual is not None:
            perceptual = self.perceptual(recon, images)
            total = total + cfg.perceptual_weight * perceptual
            logs["perceptual"] = perceptual
        for name, value in output.losses.items():
            total = total + value
            logs[name] = value
        if self.gan_active(step):
            # Detached discriminator weights: the generator step must not leave gradients on
            # the discriminator (nor mutate its requires_grad flags, which DDP dislikes).
            params = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            logits = functional_call(self.discriminator, params, (recon,)).float()
            gan = -logits.mean()
            total = total + cfg.gan_weight * gan
            logs["gan"] = gan
        logs["total"] = total
        logs.update(output.stats)
        return total, _detached(logs)

    def discriminator_loss(self, images: Tensor, reconstruction: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Hinge loss + LeCAM regulariser. Before gan_start_step the loss is multiplied by 0
        (still attached to the discriminator, so backward and DDP behave the same)."""
        if self.discriminator is None:
            raise RuntimeError("TokenizerLoss has no discriminator (gan_weight == 0); skip the discriminator step")
        cfg = self.config
        real = self.discriminator(images.detach()).float()
        fake = self.discriminator(reconstruction.detach()).float()
        hinge = F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()
        lecam = (F.relu(real - self.ema_fake_logits).pow(2).mean()
                 + F.relu(self.ema_real_logits - fake).pow(2).mean())
        active = self.gan_active(step)
        loss = float(active) * (hinge + cfg.lecam_weight * lecam)
        if active:
            with torch.no_grad():
                means = _mean_over_ranks(torch.stack([real.mean(), fake.mean()]))
                self.ema_real_logits.lerp_(means[0], 1.0 - cfg.lecam_decay)
                self.ema_fake_logits.lerp_(means[1], 1.0 - cfg.lecam_decay)
        logs = {"d_loss": loss, "d_hinge": hinge, "lecam": lecam, "logits_real": real.mean(),
                "logits_fake": fake.mean(), "ema_logits_real": self.ema_real_logits,
                "ema_logits_fake": self.ema_fake_logits}
        return loss, _detached(logs)


def _detached(logs: dict[str, Tensor]) -> dict[str, Tensor]:
    # Tensors, not floats: reading them on the host would sync a GPU every step; the training
    # loop reads them, all in one copy, only on the steps it logs.
    return {k: v.detach().float().reshape(()) for k, v in logs.items()}
