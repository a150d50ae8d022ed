"""`tok1d.Generator`: a trained generator (MaskGIT or DiT) with the tokenizer it generates tokens for."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from tasks.config import SamplingConfig
from tasks.evaluate.generate import generate_images
from tasks.evaluate.sampling import draw_captions
from tasks.export.artifacts import find_artifact
from tasks.export.spec import embeddings_text_spec, stage_input, training_run
from tasks.store import Store
from tasks.train_generator.read import Generator as GeneratorModel
from tok1d.images import Output, from_batch
from tok1d.text import CaptionEmbedder
from tok1d.tokenizer import Tokenizer


class Generator:
    """A class- or text-conditional generator of 1D tokens and the `Tokenizer` that decodes them.

    `sample(labels)` or `sample(captions=...)` draws images exactly as the evaluate stage does
    (tasks/evaluate/generate.py), with the sampling settings of the run that trained it unless
    told otherwise."""

    def __init__(self, model: GeneratorModel, tokenizer: Tokenizer, sampling: SamplingConfig,
                 caption_pool: dict[int, list[tuple[str, str]]] | None = None, text: CaptionEmbedder | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.sampling = sampling
        self.caption_pool = caption_pool
        self._text = text

    @classmethod
    def load(cls, source: str | Path, *, store: str | Path | Store | None = None,
             device: str | torch.device = "cpu") -> Generator:
        """A train-generator artifact by id (a unique prefix will do) in `store` (default
        $TOK1D_STORE or ./store) or the artifact's folder, with the tokenizer its tokens came from."""
        from tasks.train_generator.read import load_generator

        manifest, found = find_artifact(source, "train-generator", store)
        model, info = load_generator(manifest, found, device=device)
        tokenizer = Tokenizer.load(info["tokens"]["tokenizer_artifact"], store=found, device=device)
        run = training_run(found, "train-generator", manifest.artifact_id)
        sampling = SamplingConfig.model_validate(((run or {}).get("config") or {}).get("evaluate", {}).get("sampling", {}))
        pool = None
        caption_artifact = tokenizer.spec.lineage.get("caption_artifact")
        if tokenizer.uses_text and caption_artifact:
            # A TexTok decodes class-conditional samples with a caption of the class (as evaluate does).
            from tasks.caption.read import load_caption_pool

            pool = load_caption_pool(find_artifact(caption_artifact, "caption", found)[0], found)
        text = None
        if model.uses_text:
            embed = stage_input(found, "train-generator", manifest.artifact_id, "embed-text")
            if embed is None:
                raise ValueError(f"train-generator/{manifest.artifact_id} is text-conditioned but lineage names no "
                                 "embed-text artifact it was trained on")
            text = CaptionEmbedder(embeddings_text_spec(find_artifact(embed, "embed-text", found)[0]), device)
        return cls(model, tokenizer, sampling, pool, text)

    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def uses_text(self) -> bool:
        """Whether samples are conditioned on captions (a text-conditioned DiT)."""
        return self.model.uses_text

    def sample(self, labels: Sequence[int] | None = None, captions: Sequence[str] | None = None, *, seed: int = 0,
               output: Output = "pil", **sampling: Any) -> list[Image.Image] | np.ndarray | torch.Tensor:
        """One image per label (class ids) or per caption, as PIL images (or "uint8" / "tensor",
        see Tokenizer.decode). `sampling` overrides the run's evaluate.sampling fields (steps,
        temperature, guidance_scale, sampler...). A TexTok tokenizer decodes with `captions`, or
        without them with a caption drawn from the class's pool as evaluate does. Deterministic
        in `seed`."""
        if labels is None and captions is None:
            raise ValueError("pass labels=[class ids] or captions=[...] (one per sample)")
        if self.uses_text and captions is None:
            raise ValueError("this generator is text-conditioned: pass captions=[...], one per sample")
        if labels is not None and captions is not None and len(labels) != len(captions):
            raise ValueError(f"{len(labels)} labels and {len(captions)} captions; give one of each per sample")
        count = len(labels) if labels is not None else len(captions or [])
        label_array = np.asarray(labels if labels is not None else [0] * count, dtype=np.int64)
        if labels is not None and not self.uses_text and (label_array.min() < 0 or label_array.max() >= self.num_classes):
            raise ValueError(f"labels must lie in [0, {self.num_classes}); got {label_array.min()}..{label_array.max()}")
        settings = _sampling(self.sampling, sampling)
        if captions is None and self.tokenizer.uses_text and self.tokenizer.spec.text.in_decoder:
            if not self.caption_pool:
                raise ValueError("this tokenizer decodes with captions and no caption pool was found: pass captions=[...]")
            captions = [caption for _, caption in draw_captions(label_array, self.caption_pool, seed)]
        text = mask = None
        if captions is not None:
            embedder = self._text if self.uses_text else self.tokenizer._text
            if embedder is not None:
                text, mask = embedder.embed(list(captions))
        device = self.model.device
        rng = torch.Generator(device=device).manual_seed(seed)
        images = generate_images(self.model, self.tokenizer.model, torch.from_numpy(label_array), settings, rng,
                                 text, mask)
        return from_batch(images, output)


def _sampling(base: SamplingConfig, overrides: dict[str, Any]) -> SamplingConfig:
    """`base` with `overrides`, or a one-line error naming the bad setting."""
    from pydantic import ValidationError

    try:
        return SamplingConfig.model_validate({**base.model_dump(), **overrides})
    except ValidationError as error:
        first = error.errors()[0]
        raise ValueError(f"sampling setting {'.'.join(map(str, first['loc']))}: {first['msg']}; known settings: "
                         f"{', '.join(SamplingConfig.model_fields)}") from None
