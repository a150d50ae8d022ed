"""`HubTokenizer`: the tokenizer network as a huggingface_hub `PyTorchModelHubMixin`, so an exported
folder (config.json + model.safetensors) loads with `HubTokenizer.from_pretrained(DIR or repo id)`.

config.json is the whole `TokenizerSpec` (tasks/export/spec.py); the mixin hands it to `__init__`
as `config`, and `save_pretrained` writes it back unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import PyTorchModelHubMixin, constants, hf_hub_download
from safetensors.torch import load_file

from models.tokenizer import Tokenizer
from models.tokenizer_config import TokenizerConfig
from tasks.export.spec import TokenizerSpec

WEIGHTS_FILE = constants.SAFETENSORS_SINGLE_FILE  # model.safetensors


class HubTokenizer(
    Tokenizer,
    PyTorchModelHubMixin,
    library_name="tok1d",
    tags=["tok1d", "image-tokenizer", "1d-tokenizer"],
):
    """A tok1d tokenizer (TiTok / TexTok) whose `config` is an export's config.json (a
    `TokenizerSpec` as a dict); `spec` is that config parsed."""

    def __init__(self, config: dict[str, Any]):
        spec = TokenizerSpec.from_json(config)
        super().__init__(TokenizerConfig(**spec.model))
        self.spec = spec

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs: Any,
    ) -> HubTokenizer:
        # The mixin's default builds a randomly initialised model and then loads non-strictly; here
        # the network is built without memory and given the stored tensors, and a missing or extra
        # tensor is an error (strict), as in tasks/train_tokenizer/read.py.
        if os.path.isdir(model_id):
            weights = Path(model_id) / WEIGHTS_FILE
            if not weights.is_file():
                raise FileNotFoundError(f"{model_id} has no {WEIGHTS_FILE}; export the tokenizer again (tok1d export)")
        else:
            weights = Path(hf_hub_download(repo_id=model_id, filename=WEIGHTS_FILE, revision=revision,
                                           cache_dir=cache_dir, force_download=force_download, token=token,
                                           local_files_only=local_files_only))
        with torch.device("meta"):
            model = cls(**model_kwargs)
        model.load_state_dict(load_file(weights, device=str(map_location)), strict=strict, assign=True)
        return model.eval()
