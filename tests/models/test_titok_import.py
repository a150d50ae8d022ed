"""Importing official TiTok checkpoints: the shared reference (saved by bytedance/1d-tokenizer's own
code, with what it computes) reproduces exactly, and anything that does not map is refused."""

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from models.quantizers import VectorQuantizer
from models.titok_import import TitokImportError, convert_state_dict, import_titok, titok_config
from models.tokenizer import Tokenizer
from models.tokenizer_config import TokenizerConfig

torch.set_num_threads(1)

REFERENCE = Path("/work/shared/reference/titok-tiny")
# The reference's "tiny" is not in its size tables; the folder's README states it: 64 wide, 2 layers, 2 heads.
TINY = {"tiny": (64, 2, 2)}

pytestmark = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"no TiTok reference checkpoints at {REFERENCE}")


def reference(kind: str) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    folder = REFERENCE / f"titok-tiny-{kind}"
    settings = json.loads((folder / "config.json").read_text())
    return settings, load_file(folder / "model.safetensors"), load_file(folder / "expected.safetensors")


def test_vq_reproduces_the_reference_tokens_exactly_and_reconstructions_within_1e5():
    settings, state, expected = reference("vq")
    model, weights = import_titok(settings, state, TINY)
    images = expected["images"]
    with torch.no_grad():
        tokens, _, _ = model.encode(images)
        assert tokens.dtype == torch.long
        assert torch.equal(tokens, expected["tokens"][:, 0])  # reference: [B, 1, N]
        # The quantized latents, as the reference lays them out: [B, token_size, 1, N].
        quantized = model.quantizer.embed(tokens).permute(0, 2, 1)[:, :, None]
        assert torch.allclose(quantized, expected["z_quantized"], atol=1e-5, rtol=0)
        reconstructions = model.decode(tokens)
        assert (reconstructions - expected["reconstructions"]).abs().max() < 1e-5
    # Every reference parameter consumed, every tok1d parameter filled: only the VQ's dead-code
    # counters (tok1d's own, not in TiTok) come from elsewhere.
    assert set(weights) == set(model.state_dict())
    assert len(state) == len(weights) - 1 and torch.count_nonzero(weights["quantizer.steps_unused"]) == 0


def test_vae_reproduces_the_reference_posterior_and_reconstruction_within_1e5():
    settings, state, expected = reference("vae")
    model, weights = import_titok(settings, state, TINY)
    assert model.config.bottleneck == "kl" and not model.is_discrete
    captured = {}
    model.to_bottleneck.register_forward_hook(lambda module, args, out: captured.update(h=out))
    with torch.no_grad():
        tokens, _, _ = model.encode(expected["images"])  # eval: the posterior mean
        mean, logvar = model.quantizer.posterior(captured["h"])
        as_reference = lambda t: t.permute(0, 2, 1)[:, :, None]  # [B, N, C] -> [B, C, 1, N]
        assert (as_reference(mean) - expected["posterior_mean"]).abs().max() < 1e-5
        assert (as_reference(torch.exp(0.5 * logvar)) - expected["posterior_std"]).abs().max() < 1e-5
        assert torch.equal(tokens, mean)
        mean_tokens = expected["posterior_mean"][:, :, 0].permute(0, 2, 1)
        assert (model.decode(mean_tokens) - expected["reconstructions_from_mean"]).abs().max() < 1e-5
    assert set(weights) == set(model.state_dict()) and len(state) == len(weights)


def test_the_reference_layout_is_what_the_settings_say():
    settings, _, _ = reference("vq")
    config = titok_config(settings, TINY)
    assert (config.image_size, config.patch_size, config.size, config.decoder_size) == (32, 8, "nano", "nano")
    assert (config.num_latent_tokens, config.codebook_size, config.token_dim, config.bottleneck) == (8, 64, 8, "vq")
    assert config.class_token and config.pre_norm and config.output_conv and config.l2_norm
    assert not config.centre_pixels and config.block_norm_eps == 1e-5
    # The official single-stage BL-64 VQ: base encoder, large decoder, 8192 codes of 64, euclidean lookup.
    official = copy.deepcopy(settings)
    official["model"]["vq_model"].update(vit_enc_model_size="base", vit_dec_model_size="large", vit_enc_patch_size=16,
                                         vit_dec_patch_size=16, num_latent_tokens=64, codebook_size=8192,
                                         token_size=64, use_l2_norm=False)
    official["dataset"]["preprocessing"]["crop_size"] = 256
    config = titok_config(official)
    assert (config.size, config.decoder_size, config.l2_norm, config.codebook_size) == ("B", "L", False, 8192)
    with torch.device("meta"):
        model = Tokenizer(config)
    assert model.encoder.blocks[0].attn.qkv.in_features == 768 and model.decoder.blocks[0].attn.qkv.in_features == 1024
    assert len(model.encoder.blocks) == 12 and len(model.decoder.blocks) == 24


@pytest.mark.parametrize("change,message", [
    (lambda s: s.update({"encoder.transformer.0.attn.extra_scale": torch.ones(1)}),
     "unmapped parameter encoder.transformer.0.attn.extra_scale"),
    (lambda s: s.update({"encoder.transformer.2.ln_1.weight": torch.ones(64)}),
     r"encoder.transformer.2.ln_1.weight \(tok1d encoder.blocks.2.norm1.weight\) has no place"),
    (lambda s: s.pop("decoder.conv_out.weight"), r"missing parameter for tok1d output_conv.weight \(3, 3, 3, 3\)"),
    (lambda s: s.pop("encoder.ln_pre.bias"), "missing parameter for tok1d encoder.pre_norm.bias"),
    (lambda s: s.update({"quantize.embedding.weight": torch.zeros(128, 8)}),
     r"quantize.embedding.weight has shape \(128, 8\); the settings imply \(64, 8\)"),
    (lambda s: s.update({"pixel_decoder.conv_in.weight": torch.zeros(1)}), "two-stage TiTok checkpoint"),
])
def test_anything_that_does_not_map_exactly_is_refused(change, message):
    settings, state, _ = reference("vq")
    state = dict(state)
    change(state)
    with pytest.raises(TitokImportError, match=message):
        import_titok(settings, state, TINY)


@pytest.mark.parametrize("edit,message", [
    ({"finetune_decoder": True}, "finetune_decoder is true: a two-stage TiTok checkpoint .*MaskGIT-VQGAN"),
    ({"is_legacy": True}, "is_legacy is true .*two-stage"),
    ({"quantize_mode": "fsq"}, "quantize_mode='fsq'"),
    ({"vit_dec_patch_size": 4}, "encoder patch 8 and decoder patch 4 differ"),
    ({"text_guidance": True}, r"setting\(s\) \['text_guidance'\] that the TiTok importer does not know"),
    ({"num_latent_tokens": 4}, "no valid tok1d tokenizer: num_latent_tokens=4"),
])
def test_settings_the_import_cannot_express_are_refused(edit, message):
    settings, state, _ = reference("vq")
    settings = copy.deepcopy(settings)
    settings["model"]["vq_model"].update(edit)
    with pytest.raises(TitokImportError, match=message):
        import_titok(settings, state, TINY)


def test_absent_finetune_decoder_means_two_stage_as_in_the_reference():
    settings, _, _ = reference("vq")
    settings = copy.deepcopy(settings)
    del settings["model"]["vq_model"]["finetune_decoder"]  # TiTok's default: true
    with pytest.raises(TitokImportError, match="two-stage"):
        titok_config(settings, TINY)


def test_unknown_size_names_need_their_heads():
    settings, state, _ = reference("vq")
    with pytest.raises(TitokImportError, match=r"vit_enc_model_size='tiny' is not a TiTok size .*--size tiny="):
        titok_config(settings)
    with pytest.raises(TitokImportError, match=r"\(96, 2, 3\), which no tok1d size has"):
        titok_config(settings, {"tiny": (96, 2, 3)})
    # Right width and depth but the wrong heads: shapes cannot tell, so the size table must.
    config = titok_config(settings, {"tiny": (64, 2, 2)})
    assert set(convert_state_dict(state, config)) == set(Tokenizer(config).state_dict())


def test_euclidean_lookup_without_l2_norm():
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4, l2_norm=False).eval()
    with torch.no_grad():
        vq.codebook.weight.mul_(torch.rand(16, 1) * 3)  # codes of different norms
    z = torch.randn(2, 5, 4) * 2
    quantized, ids, _, _ = vq(z)
    assert torch.equal(ids, torch.cdist(z, vq.codebook.weight[None].expand(2, -1, -1)).argmin(-1))
    assert torch.allclose(quantized, vq.codebook.weight[ids])  # raw codes, not unit-norm
    cosine = VectorQuantizer(16, 4).eval()
    cosine.load_state_dict(vq.state_dict())
    assert not torch.equal(cosine(z)[1], ids)  # the l2-normalised lookup picks other codes here


def test_reference_layout_options_keep_the_default_layout_names():
    base = dict(image_size=16, patch_size=4, size="nano", num_latent_tokens=8, codebook_size=64, token_dim=8)
    plain = set(Tokenizer(TokenizerConfig(**base)).state_dict())
    titok = set(Tokenizer(TokenizerConfig(**base, class_token=True, pre_norm=True, output_conv=True)).state_dict())
    assert titok - plain == {"cls_token", "decoder_cls_token", "encoder.pre_norm.weight", "encoder.pre_norm.bias",
                             "decoder.pre_norm.weight", "decoder.pre_norm.bias", "output_conv.weight", "output_conv.bias"}
    assert plain <= titok
    # A decoder of another size than the encoder (TiTok's BL: base encoder, large decoder).
    torch.manual_seed(0)
    model = Tokenizer(TokenizerConfig(**base, decoder_size="tiny", class_token=True, pre_norm=True)).eval()
    out = model(torch.rand(2, 3, 16, 16))
    assert out.reconstruction.shape == (2, 3, 16, 16) and model.decoder_embed.out_features == 128
    assert torch.allclose(model.decode(out.tokens), out.reconstruction, atol=1e-6)
