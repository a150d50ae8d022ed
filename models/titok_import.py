"""Official TiTok checkpoints (bytedance/1d-tokenizer, `modeling/titok.py` class `TiTok`) as tok1d
tokenizers: the reference settings become a `TokenizerConfig` in the reference layout, and every
parameter is mapped by name and shape onto `models.tokenizer.Tokenizer`.

Nothing is guessed: a setting, parameter or shape the mapping does not know, a parameter the
model needs that the checkpoint lacks, and a two-stage checkpoint (its decoder feeds a
MaskGIT-VQGAN pixel decoder that tok1d does not implement) are refused with a `TitokImportError`
naming them. Pure PyTorch: reading files and writing the artifact live in
tasks/train_tokenizer/titok.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
from torch import Tensor

from models.tokenizer import Tokenizer
from models.tokenizer_config import TOKENIZER_SIZES, TokenizerConfig

# The reference's size tables (TiTokEncoder / TiTokDecoder): name -> (width, depth, heads).
TITOK_SIZES: dict[str, tuple[int, int, int]] = {
    "small": (512, 8, 8),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
# model.vq_model keys that shape the network (read below) and ones that only matter to training.
ARCHITECTURE_KEYS = frozenset({
    "codebook_size", "token_size", "use_l2_norm", "commitment_cost", "vit_enc_model_size",
    "vit_dec_model_size", "vit_enc_patch_size", "vit_dec_patch_size", "num_latent_tokens",
    "finetune_decoder", "is_legacy", "quantize_mode",
})
TRAINING_KEYS = frozenset({"pretrained_tokenizer_weight", "clustering_vq"})
SINGLE_STAGE = "BL-64/BL-128/SL-256 VQ or LL-32/BL-64/BL-128 VAE"
TWO_STAGE = (f"a two-stage TiTok checkpoint (L-32/B-64/S-128): its decoder predicts MaskGIT-VQGAN codes "
             f"for a pixel decoder tok1d does not implement; import a single-stage one ({SINGLE_STAGE})")


class TitokImportError(ValueError):
    """A TiTok checkpoint that cannot be imported exactly; the message says what and why."""


@dataclass(frozen=True)
class _Rule:
    """Reference parameter names matching `pattern` become `target` (with the match's groups)."""

    pattern: re.Pattern[str]
    target: str
    reshape: Callable[[Tensor], Tensor]


def _same(t: Tensor) -> Tensor:
    return t


def _batch_row(t: Tensor) -> Tensor:
    """[S, W] -> [1, S, W]: tok1d keeps tokens and position rows with a batch axis."""
    return t.unsqueeze(0)


def _kernel_1x1(t: Tensor) -> Tensor:
    """A 1x1 conv kernel [O, I, 1, 1] is the weight [O, I] of the equivalent nn.Linear."""
    if t.ndim != 4 or t.shape[2:] != (1, 1):
        raise TitokImportError(f"expected a 1x1 conv kernel [O, I, 1, 1], got {tuple(t.shape)}")
    return t[:, :, 0, 0]


_BLOCK = r"^(encoder|decoder)\.transformer\.(\d+)\."
# timm's Block with qkv_bias packs q, k, v like nn.MultiheadAttention's in_proj (same order), and
# both scale by head_dim ** -0.5; TiTok's mlp is c_fc -> GELU (erf) -> c_proj like timm's Mlp.
_RULES = [
    _Rule(re.compile(p), t, f) for p, t, f in [
        (r"^latent_tokens$", "latent_tokens", _batch_row),
        (r"^encoder\.patch_embed\.(weight|bias)$", r"patch_embed.proj.\1", _same),
        (r"^encoder\.class_embedding$", "cls_token", _batch_row),
        (r"^encoder\.positional_embedding$", "pos_embed", _batch_row),
        (r"^encoder\.latent_token_positional_embedding$", "latent_pos_embed", _batch_row),
        (r"^(encoder|decoder)\.ln_pre\.(weight|bias)$", r"\1.pre_norm.\2", _same),
        (r"^(encoder|decoder)\.ln_post\.(weight|bias)$", r"\1.norm.\2", _same),
        (_BLOCK + r"ln_1\.(weight|bias)$", r"\1.blocks.\2.norm1.\3", _same),
        (_BLOCK + r"ln_2\.(weight|bias)$", r"\1.blocks.\2.norm2.\3", _same),
        (_BLOCK + r"attn\.in_proj_(weight|bias)$", r"\1.blocks.\2.attn.qkv.\3", _same),
        (_BLOCK + r"attn\.out_proj\.(weight|bias)$", r"\1.blocks.\2.attn.proj.\3", _same),
        (_BLOCK + r"mlp\.c_fc\.(weight|bias)$", r"\1.blocks.\2.mlp.fc1.\3", _same),
        (_BLOCK + r"mlp\.c_proj\.(weight|bias)$", r"\1.blocks.\2.mlp.fc2.\3", _same),
        (r"^encoder\.conv_out\.weight$", "to_bottleneck.weight", _kernel_1x1),
        (r"^encoder\.conv_out\.bias$", "to_bottleneck.bias", _same),
        (r"^quantize\.embedding\.weight$", "quantizer.codebook.weight", _same),
        (r"^decoder\.decoder_embed\.(weight|bias)$", r"decoder_embed.\1", _same),
        (r"^decoder\.class_embedding$", "decoder_cls_token", _batch_row),
        (r"^decoder\.positional_embedding$", "decoder_pos_embed", _batch_row),
        (r"^decoder\.mask_token$", "mask_token", _same),
        (r"^decoder\.latent_token_positional_embedding$", "decoder_latent_pos_embed", _batch_row),
        (r"^decoder\.ffn\.0\.weight$", "to_pixels.weight", _kernel_1x1),
        (r"^decoder\.ffn\.0\.bias$", "to_pixels.bias", _same),
        (r"^decoder\.conv_out\.(weight|bias)$", r"output_conv.\1", _same),
    ]
]
# tok1d state with no counterpart in TiTok: the VQ's dead-code counters (all codes "just used").
_TOK1D_ONLY = {"quantizer.steps_unused": lambda shape: torch.zeros(shape, dtype=torch.long)}
# State TiTok keeps only for training: clustering_vq's code-usage average.
_TRAINING_STATE = re.compile(r"^quantize\.embed_prob$")
_TWO_STAGE_STATE = re.compile(r"^pixel_(quantize|decoder)\.")


def _lookup_size(vq: Mapping[str, Any], key: str, sizes: Mapping[str, tuple[int, int, int]]) -> str:
    """The tok1d size with the (width, depth, heads) of the reference size named by `key`."""
    name = vq.get(key)
    table = {**TITOK_SIZES, **{k: tuple(v) for k, v in sizes.items()}}
    if name not in table:
        raise TitokImportError(
            f"model.vq_model.{key}={name!r} is not a TiTok size ({', '.join(TITOK_SIZES)}); give its "
            f"width, depth and heads (tok1d import-titok --size {name}=WIDTH,DEPTH,HEADS)")
    dims = table[name]
    for tok1d_name, tok1d_dims in TOKENIZER_SIZES.items():
        if tok1d_dims == dims:
            return tok1d_name
    raise TitokImportError(f"model.vq_model.{key}={name!r} is width/depth/heads {dims}, which no tok1d size has "
                           f"({', '.join(f'{k}={v}' for k, v in TOKENIZER_SIZES.items())})")


def titok_config(settings: Mapping[str, Any], sizes: Mapping[str, tuple[int, int, int]] | None = None) -> TokenizerConfig:
    """The `TokenizerConfig` of a TiTok checkpoint's settings (its config.json / config.yaml:
    `model.vq_model.*` and `dataset.preprocessing.crop_size`), in the reference layout.

    `sizes` names size tables beyond the reference's small/base/large (name -> width, depth,
    heads): the heads are not visible in the weights, so an unknown name is refused.
    """
    try:
        vq = settings["model"]["vq_model"]
        image_size = settings["dataset"]["preprocessing"]["crop_size"]
    except (KeyError, TypeError):
        raise TitokImportError("the settings have no model.vq_model section or no dataset.preprocessing.crop_size; "
                               "is this a TiTok config.json / config.yaml?") from None
    unknown = sorted(set(vq) - ARCHITECTURE_KEYS - TRAINING_KEYS)
    if unknown:
        raise TitokImportError(f"model.vq_model has setting(s) {unknown} that the TiTok importer does not know "
                               "(another model of the repository, e.g. TA-TiTok?); nothing was imported")
    # The reference's own defaults for absent keys (TiTok.__init__, TiTokEncoder).
    if vq.get("finetune_decoder", True):
        raise TitokImportError(f"finetune_decoder is true: {TWO_STAGE}")
    if vq.get("is_legacy", True):
        raise TitokImportError(f"is_legacy is true (the default when absent): the decoder ends in 1024 "
                               f"MaskGIT-VQGAN code logits, i.e. {TWO_STAGE}")
    mode = vq.get("quantize_mode", "vq")
    if mode not in ("vq", "vae"):
        raise TitokImportError(f"model.vq_model.quantize_mode={mode!r}; TiTok has vq and vae")
    enc_patch, dec_patch = vq.get("vit_enc_patch_size"), vq.get("vit_dec_patch_size")
    if enc_patch != dec_patch:
        raise TitokImportError(f"encoder patch {enc_patch} and decoder patch {dec_patch} differ; tok1d has one "
                               "patch size for both")
    required = ["token_size", "num_latent_tokens"] + (["codebook_size", "use_l2_norm"] if mode == "vq" else [])
    missing = [key for key in required if key not in vq]
    if missing:
        raise TitokImportError(f"model.vq_model lacks {missing}")
    fields = dict(
        image_size=image_size, channels=3, patch_size=enc_patch,
        size=_lookup_size(vq, "vit_enc_model_size", sizes or {}),
        decoder_size=_lookup_size(vq, "vit_dec_model_size", sizes or {}),
        num_latent_tokens=vq["num_latent_tokens"], token_dim=vq["token_size"],
        bottleneck="vq" if mode == "vq" else "kl",
        class_token=True, pre_norm=True, output_conv=True, centre_pixels=False, block_norm_eps=1e-5,
    )
    if mode == "vq":
        fields.update(codebook_size=vq["codebook_size"], commitment=float(vq.get("commitment_cost", 0.25)),
                      l2_norm=bool(vq["use_l2_norm"]))
    try:
        return TokenizerConfig(**fields)
    except (TypeError, ValueError) as error:
        raise TitokImportError(f"the TiTok settings make no valid tok1d tokenizer: {error}") from None


def convert_state_dict(state: Mapping[str, Tensor], config: TokenizerConfig) -> dict[str, Tensor]:
    """The tok1d state dict (float32) of a TiTok state dict; refuses unmapped, missing, misplaced
    and misshapen parameters, all of them named in one message."""
    two_stage = sorted(k for k in state if _TWO_STAGE_STATE.match(k))
    if two_stage:
        raise TitokImportError(f"the checkpoint holds {two_stage[0]} and {len(two_stage) - 1} more pixel_* "
                               f"parameter(s): {TWO_STAGE}")
    with torch.device("meta"):
        expected = {k: v for k, v in Tokenizer(config).state_dict().items()}
    converted: dict[str, Tensor] = {}
    problems: list[str] = []
    for name, tensor in state.items():
        if _TRAINING_STATE.match(name):
            continue  # training-only statistics, not part of the model
        rule = next((r for r in _RULES if r.pattern.match(name)), None)
        if rule is None:
            problems.append(f"unmapped parameter {name} {tuple(tensor.shape)}")
            continue
        target = rule.pattern.sub(rule.target, name)
        if target not in expected:
            problems.append(f"{name} (tok1d {target}) has no place in a {config.size}/{config.decoder_size or config.size} "
                            f"model of {config.num_latent_tokens} tokens")
            continue
        try:
            value = rule.reshape(tensor)
        except TitokImportError as error:
            problems.append(f"{name}: {error}")
            continue
        if tuple(value.shape) != tuple(expected[target].shape):
            problems.append(f"{name} has shape {tuple(tensor.shape)}; the settings imply {tuple(expected[target].shape)} "
                            f"(tok1d {target})")
            continue
        if target in converted:
            problems.append(f"{name} maps onto {target} a second time")
            continue
        converted[target] = value.detach().to(torch.float32) if value.is_floating_point() else value.detach()
    for target, meta in expected.items():
        if target not in converted:
            if target in _TOK1D_ONLY:
                converted[target] = _TOK1D_ONLY[target](meta.shape)
            else:
                problems.append(f"missing parameter for tok1d {target} {tuple(meta.shape)}")
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise TitokImportError(f"the TiTok checkpoint does not map exactly onto tok1d ({len(problems)} problem(s)): "
                               f"{shown}; nothing was imported")
    return converted


def import_titok(settings: Mapping[str, Any], state: Mapping[str, Tensor],
                 sizes: Mapping[str, tuple[int, int, int]] | None = None) -> tuple[Tokenizer, dict[str, Tensor]]:
    """The tok1d tokenizer (eval mode) of a TiTok checkpoint and its state dict."""
    config = titok_config(settings, sizes)
    weights = convert_state_dict(state, config)
    with torch.device("meta"):
        model = Tokenizer(config)
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval(), weights
