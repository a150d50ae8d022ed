"""Tests for the TiTok/TexTok tokenizer, its EMA and its AdamW parameter groups."""

import re

import pytest
import torch
import torch.nn.functional as F

from models.ema import EMA, param_groups_for_adamw
from models.quantizers import BOTTLENECKS, KLBottleneck
from models.tokenizer import Tokenizer, TokenizerOutput
from models import tokenizer_config
from models.tokenizer_config import BOTTLENECK_NAMES, TOKENIZER_SIZES, TokenizerConfig

torch.set_num_threads(1)

TEXT_DIM, TEXT_LEN = 16, 5


def tiny_config(**overrides) -> TokenizerConfig:
    base = dict(image_size=16, patch_size=4, size="nano", num_latent_tokens=8, codebook_size=64)
    base.update(overrides)
    return TokenizerConfig(**base)


def text_inputs(batch: int, real: int = 3):
    text = torch.randn(batch, TEXT_LEN, TEXT_DIM)
    mask = torch.zeros(batch, TEXT_LEN, dtype=torch.bool)
    mask[:, :real] = True
    return text, mask


TEXT_MODES = {
    "none": dict(),
    "encoder": dict(text_dim=TEXT_DIM, max_text_tokens=8, text_in_encoder=True, text_in_decoder=False),
    "decoder": dict(text_dim=TEXT_DIM, max_text_tokens=8, text_in_encoder=False, text_in_decoder=True),
    "both": dict(text_dim=TEXT_DIM, max_text_tokens=8),
}


@pytest.mark.parametrize("bottleneck", ["vq", "kl"])
@pytest.mark.parametrize("text_mode", list(TEXT_MODES))
def test_shapes(bottleneck, text_mode):
    torch.manual_seed(0)
    token_dim = 8 if bottleneck == "kl" else 12
    model = Tokenizer(tiny_config(bottleneck=bottleneck, token_dim=token_dim, **TEXT_MODES[text_mode]))
    images = torch.rand(2, 3, 16, 16)
    text, mask = text_inputs(2) if model.uses_text else (None, None)
    out = model(images, text, mask)
    assert isinstance(out, TokenizerOutput)
    assert out.reconstruction.shape == images.shape
    if bottleneck == "vq":
        assert model.is_discrete
        assert out.tokens.shape == (2, 8) and out.tokens.dtype == torch.long
        assert set(out.losses) == {"commitment"}
        assert set(out.stats) >= {"codebook_usage", "perplexity"}
    else:
        assert not model.is_discrete
        assert out.tokens.shape == (2, 8, 8) and out.tokens.is_floating_point()
        assert set(out.losses) == {"kl"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.losses.values())
    assert model.uses_text == (text_mode != "none")
    # encode -> decode round trip equals forward in eval mode
    model.eval()
    out = model(images, text, mask)
    tokens, _, _ = model.encode(images, text, mask)
    assert torch.equal(tokens, out.tokens)
    assert torch.allclose(model.decode(tokens, text, mask), out.reconstruction, atol=1e-6)


@pytest.mark.parametrize("text_mode", ["encoder", "decoder", "both"])
def test_text_mask_hides_padded_positions(text_mode):
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(bottleneck="kl", token_dim=8, **TEXT_MODES[text_mode])).eval()
    images = torch.rand(2, 3, 16, 16)
    text, mask = text_inputs(2, real=3)
    ref = model(images, text, mask)
    changed = text.clone()
    changed[:, 3:] = 100.0 * torch.randn(2, TEXT_LEN - 3, TEXT_DIM)  # padded positions only
    out = model(images, changed, mask)
    assert torch.allclose(out.tokens, ref.tokens, atol=1e-5)
    assert torch.allclose(out.reconstruction, ref.reconstruction, atol=1e-5)
    # Control: the same change is visible when those positions are marked real.
    unmasked = model(images, changed, torch.ones_like(mask))
    assert not torch.allclose(unmasked.reconstruction, ref.reconstruction, atol=1e-3)
    # No mask means every text token is real.
    assert torch.allclose(model(images, changed).reconstruction, unmasked.reconstruction, atol=1e-6)
    # ... and changing a real position changes the output.
    real_changed = text.clone()
    real_changed[:, 0] += 1.0
    assert not torch.allclose(model(images, real_changed, mask).reconstruction, ref.reconstruction, atol=1e-4)


def test_missing_or_unexpected_text_raises():
    images = torch.rand(1, 3, 16, 16)
    text, mask = text_inputs(1)
    with_text = Tokenizer(tiny_config(**TEXT_MODES["both"]))
    with pytest.raises(ValueError, match="text-conditioned"):
        with_text(images)
    with pytest.raises(ValueError, match="text-conditioned"):
        with_text.encode(images)
    tokens, _, _ = with_text.encode(images, text, mask)
    with pytest.raises(ValueError, match="text-conditioned"):
        with_text.decode(tokens)
    without_text = Tokenizer(tiny_config())
    with pytest.raises(ValueError, match="no text conditioning"):
        without_text(images, text, mask)
    with pytest.raises(ValueError, match="no text conditioning"):
        without_text.decode(without_text.encode(images)[0], text)
    with pytest.raises(ValueError, match="max_text_tokens"):
        with_text(images, torch.randn(1, 9, TEXT_DIM))
    with pytest.raises(ValueError, match="text_mask"):
        with_text(images, text, mask.float())
    # decoder-only text: encoding needs no text, decoding does
    dec_only = Tokenizer(tiny_config(**TEXT_MODES["decoder"]))
    tokens, _, _ = dec_only.encode(images)
    assert dec_only.decode(tokens, text, mask).shape == images.shape
    with pytest.raises(ValueError, match="text-conditioned"):
        dec_only.decode(tokens)


def test_config_validation():
    with pytest.raises(ValueError, match="num_latent_tokens"):
        tiny_config(num_latent_tokens=4)
    with pytest.raises(ValueError, match="num_latent_tokens"):
        tiny_config(num_latent_tokens=512)
    with pytest.raises(ValueError, match="size"):
        tiny_config(size="XL")
    with pytest.raises(ValueError, match="multiple of patch_size"):
        tiny_config(image_size=18)
    with pytest.raises(ValueError, match="bottleneck"):
        tiny_config(bottleneck="fsq")
    with pytest.raises(ValueError, match="max_text_tokens"):
        tiny_config(text_dim=16)
    with pytest.raises(ValueError, match="both False"):
        tiny_config(text_dim=16, max_text_tokens=4, text_in_encoder=False, text_in_decoder=False)
    model = Tokenizer(tiny_config())
    with pytest.raises(ValueError, match="images must be"):
        model(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match="vq decode"):
        model.decode(torch.zeros(1, 7, dtype=torch.long))


def test_config_accepts_exactly_the_bottleneck_table():
    # The config validates against a torch-free copy of the table's names: one source of truth.
    assert sorted(BOTTLENECK_NAMES) == sorted(BOTTLENECKS)
    for name, cls in BOTTLENECKS.items():
        model = Tokenizer(tiny_config(bottleneck=name, token_dim=8))
        assert type(model.quantizer) is cls
        assert model.is_discrete == cls.discrete
        assert model.to_bottleneck.out_features == cls.input_dim(8)
    with pytest.raises(ValueError, match=re.escape(f"known: {sorted(BOTTLENECKS)}")):
        tiny_config(bottleneck="fsq")


class _TanhBottleneck(KLBottleneck):
    """A toy continuous bottleneck registered only for the test below."""

    @classmethod
    def input_dim(cls, token_dim):
        return token_dim

    def forward(self, h):
        z = torch.tanh(h)
        return z, z, {}, {}


def test_a_registered_bottleneck_plugs_into_the_tokenizer(monkeypatch):
    monkeypatch.setitem(BOTTLENECKS, "tanh", _TanhBottleneck)
    monkeypatch.setattr(tokenizer_config, "BOTTLENECK_NAMES", (*BOTTLENECK_NAMES, "tanh"))
    model = Tokenizer(tiny_config(bottleneck="tanh", token_dim=8)).eval()
    assert isinstance(model.quantizer, _TanhBottleneck) and not model.is_discrete
    images = torch.rand(2, 3, 16, 16)
    out = model(images)
    assert out.tokens.shape == (2, 8, 8) and out.losses == {}
    assert torch.allclose(model.decode(out.tokens), out.reconstruction, atol=1e-6)


def test_vq_straight_through_gradient_reaches_encoder():
    torch.manual_seed(0)
    model = Tokenizer(tiny_config())
    images = torch.rand(2, 3, 16, 16)
    out = model(images)
    F.mse_loss(out.reconstruction, images).backward()  # no commitment term: only the STE path
    for p in (model.patch_embed.proj.weight, model.encoder.blocks[0].attn.qkv.weight,
              model.to_bottleneck.weight, model.latent_tokens):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_kl_tokenizer_eval_deterministic_train_stochastic():
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(bottleneck="kl", token_dim=8))
    images = torch.rand(2, 3, 16, 16)
    model.train()
    assert not torch.allclose(model.encode(images)[0], model.encode(images)[0])
    model.eval()
    assert torch.equal(model.encode(images)[0], model.encode(images)[0])


def test_drop_path_runs_and_is_inactive_in_eval():
    torch.manual_seed(0)
    model = Tokenizer(tiny_config(drop_path=0.5, bottleneck="kl", token_dim=8)).eval()
    images = torch.rand(2, 3, 16, 16)
    assert torch.equal(model(images).reconstruction, model(images).reconstruction)


@pytest.mark.parametrize("bottleneck", ["vq", "kl"])
def test_tiny_tokenizer_overfits_four_images(bottleneck):
    torch.manual_seed(0)
    token_dim = 8 if bottleneck == "kl" else 12
    # Restarting dead codes keeps the 4 images from collapsing onto one code sequence.
    model = Tokenizer(tiny_config(bottleneck=bottleneck, token_dim=token_dim, dead_code_restart_steps=5))
    images = torch.rand(4, 3, 16, 16)
    # The best a decoder that ignores its tokens can do is the per-pixel mean image.
    mean_image_mse = F.mse_loss(images.mean(0, keepdim=True).expand_as(images), images).item()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    losses = []
    for _ in range(150):
        out = model(images)
        rec = F.mse_loss(out.reconstruction, images)
        opt.zero_grad()
        (rec + sum(out.losses.values())).backward()
        opt.step()
        losses.append(rec.item())
    assert losses[-1] < losses[0] / 5
    assert losses[-1] < 0.25 * mean_image_mse, "tokens carry no per-image information"


REFERENCE_PARAMS = {("S", 128): 51.75e6, ("B", 64): 171.9e6, ("L", 32): 606.9e6}


@pytest.mark.parametrize("size,num_tokens", list(REFERENCE_PARAMS))
def test_parameter_counts_match_titok(size, num_tokens):
    with torch.device("meta"):
        model = Tokenizer(TokenizerConfig(size=size, num_latent_tokens=num_tokens,
                                          codebook_size=4096, token_dim=12))
    assert all(p.device.type == "meta" for p in model.parameters())
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - REFERENCE_PARAMS[size, num_tokens]) / REFERENCE_PARAMS[size, num_tokens] < 0.03
    width, depth, _ = TOKENIZER_SIZES[size]
    assert len(model.encoder.blocks) == len(model.decoder.blocks) == depth
    assert model.width == width


def test_ema_of_tokenizer_is_savable():
    model = Tokenizer(tiny_config())
    ema = EMA(model, decay=0.99)
    ema.update(model, step=0)
    state = ema.state_dict()
    assert "quantizer.codebook.weight" in state and "quantizer.steps_unused" in state


def test_param_groups_exclude_norms_biases_and_tokens():
    model = Tokenizer(tiny_config(**TEXT_MODES["both"]))
    decay_group, no_decay_group = param_groups_for_adamw(model, weight_decay=0.05)
    assert decay_group["weight_decay"] == 0.05 and no_decay_group["weight_decay"] == 0.0
    decay = {id(p) for p in decay_group["params"]}
    no_decay = {id(p) for p in no_decay_group["params"]}
    named = dict(model.named_parameters())
    assert decay.isdisjoint(no_decay) and decay | no_decay == {id(p) for p in named.values()}
    for name in ("latent_tokens", "mask_token", "pos_embed", "latent_pos_embed", "decoder_pos_embed",
                 "quantizer.codebook.weight", "encoder.norm.weight", "encoder.blocks.0.norm1.weight",
                 "encoder.blocks.0.attn.qkv.bias", "to_pixels.bias", "encoder_text.pos_embed"):
        assert id(named[name]) in no_decay, name
    for name in ("encoder.blocks.0.attn.qkv.weight", "encoder.blocks.0.mlp.fc1.weight",
                 "patch_embed.proj.weight", "to_pixels.weight", "decoder_embed.weight", "encoder_text.proj.weight"):
        assert id(named[name]) in decay, name
    frozen = Tokenizer(tiny_config())
    frozen.latent_tokens.requires_grad_(False)
    groups = param_groups_for_adamw(frozen, 0.1)
    assert all(p is not frozen.latent_tokens for g in groups for p in g["params"])
