"""The EMA of model weights: the update rule, the warm-up of its decay, safetensors round trip."""

import math

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from models.ema import EMA

torch.set_num_threads(1)


def test_update_math_and_safetensors_round_trip(tmp_path):
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    ema = EMA(model, decay=0.9, warmup=False)
    assert not any(p.requires_grad for p in ema.module.parameters())
    with torch.no_grad():
        model[0].weight.fill_(3.0)
        model[1].running_mean.fill_(7.0)
    ema.update(model, step=0)
    assert torch.allclose(ema.module[0].weight, torch.full((2, 3), 0.9 * 1.0 + 0.1 * 3.0))
    assert torch.equal(ema.module[1].running_mean, torch.full((2,), 7.0))  # buffers copied
    ema.update(model, step=1)
    assert torch.allclose(ema.module[0].weight, torch.full((2, 3), 0.9 * 1.2 + 0.1 * 3.0))
    assert model[0].weight.eq(3.0).all()  # the live model is untouched

    save_file(ema.state_dict(), str(tmp_path / "ema.safetensors"))
    restored = EMA(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2)), decay=0.9)
    restored.load_state_dict(load_file(str(tmp_path / "ema.safetensors")))
    assert torch.equal(restored.module[0].weight, ema.module[0].weight)

    with pytest.raises(ValueError, match="parameters"):
        ema.update(nn.Linear(3, 2), step=2)


def test_warmup_decay_schedule():
    ema = EMA(nn.Linear(2, 2), decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(1) == pytest.approx(2 / 11)
    assert ema.decay_at(10**6) == 0.999  # capped at the configured decay
    assert all(ema.decay_at(s) <= ema.decay_at(s + 1) for s in range(0, 20000, 97))
    # Share of the initial weights left after 1500 steps: 0.999**1500 = 22% without warm-up.
    assert math.prod(ema.decay_at(step) for step in range(1500)) < 1e-3
    assert EMA(nn.Linear(2, 2), decay=0.999, warmup=False).decay_at(0) == 0.999
    assert EMA(nn.Linear(2, 2), decay=0.05).decay_at(0) == 0.05  # below the warm-up curve: the decay itself


def test_warmed_up_ema_follows_the_weights_early():
    model = nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    warm, fixed = EMA(model, decay=0.999), EMA(model, decay=0.999, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for step in range(20):
        warm.update(model, step)
        fixed.update(model, step)
    # Warmed up, the initial zeros keep prod_s (1 + s) / (10 + s) of the weight: < 1e-5 after 20 steps.
    assert torch.allclose(warm.module.weight, torch.ones(4, 4), atol=1e-4)
    assert torch.allclose(fixed.module.weight, torch.full((4, 4), 1 - 0.999**20), atol=1e-5)
