"""`embed_text.backend: t5`: the encoder half of a T5 checkpoint (TexTok uses T5-XL)."""

from __future__ import annotations

from pathlib import Path

from tasks.embed_text.encoders.base import EncodedBatch, TextEncoder


class T5TextEncoder(TextEncoder):
    """T5 encoder hidden states per token; pooled = mean over real tokens."""

    def __init__(self, path: Path, max_tokens: int, device: str):
        from transformers import AutoTokenizer, T5EncoderModel

        self.tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        self.model = T5EncoderModel.from_pretrained(str(path), local_files_only=True).to(device).eval()
        self.max_tokens = max_tokens

    def encode(self, texts: list[str]) -> EncodedBatch:
        # torch here, not at module level: the backend table (encoders/__init__.py) is read when a
        # config loads, which must not import torch.
        import torch

        with torch.inference_mode():
            device = next(self.model.parameters()).device
            batch = self.tokenizer(
                texts, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
            ).to(device)
            # bf16 on accelerators (T5 overflows in fp16); full precision elsewhere.
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            mask = batch["attention_mask"].bool()
            hidden = hidden.float() * mask[..., None]
            pooled = hidden.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            return EncodedBatch(hidden.cpu().numpy(), mask.cpu().numpy(), pooled.cpu().numpy())
