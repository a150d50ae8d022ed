"""Encode and decode images/s of 1D tokenizers: TiTok S-128 / B-64 / L-32 at 256x256 and the
models of the given presets (their ingest resolution and text width).

Weights are random (speed does not depend on them); the timed loops run under torch.no_grad in
eval mode, the way the pretokenize stage and the generators' decoders use the model.

    .venv/bin/python bench/tokenizer_throughput.py --threads 2 --batch 8 --iterations 3
    .venv/bin/python bench/tokenizer_throughput.py --models --presets fashion-mnist-titok fashion-mnist-textok
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from models.tokenizer import Tokenizer  # noqa: E402
from models.tokenizer_config import TokenizerConfig  # noqa: E402
from tasks.presets import load_config  # noqa: E402

# The paper's single-stage TiTok models: (size, latent tokens) with a 4096 x 12 VQ, patch 16.
PAPER_MODELS = {"TiTok-S-128": ("S", 128), "TiTok-B-64": ("B", 64), "TiTok-L-32": ("L", 32)}
# Width of the text encoders the presets use (tokens of all-MiniLM-L6-v2, of T5 v1.1 XL).
TEXT_DIMS = {"sentence-transformers": 384, "t5": 2048}


def paper_config(size: str, tokens: int, resolution: int) -> TokenizerConfig:
    return TokenizerConfig(image_size=resolution, patch_size=16, size=size, num_latent_tokens=tokens,
                           bottleneck="vq", codebook_size=4096, token_dim=12)


def preset_config(name: str) -> TokenizerConfig:
    config = load_config(name)
    section = config.train_tokenizer
    text_dim = TEXT_DIMS.get(config.embed_text.backend, 0) if section.use_text else 0
    return section.model.to_dataclass(
        image_size=config.ingest.resolution, channels=3, text_dim=text_dim,
        max_text_tokens=config.embed_text.max_tokens if text_dim else 0,
    )


def time_per_call(fn, iterations: int) -> float:
    fn()  # warm-up: allocator, kernel selection
    start = time.perf_counter()
    for _ in range(iterations):
        fn()
    return (time.perf_counter() - start) / iterations


@torch.no_grad()
def measure(config: TokenizerConfig, batch: int, iterations: int, device: torch.device) -> tuple[float, float, int]:
    """(encode images/s, decode images/s, parameters) of one model."""
    model = Tokenizer(config).to(device).eval()
    images = torch.rand(batch, config.channels, config.image_size, config.image_size, device=device)
    text = mask = None
    if config.text_dim:
        text = torch.randn(batch, config.max_text_tokens, config.text_dim, device=device)
        mask = torch.ones(batch, config.max_text_tokens, dtype=torch.bool, device=device)
    tokens, _, _ = model.encode(images, text, mask)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def encode():
        model.encode(images, text, mask)
        synchronize()

    def decode():
        model.decode(tokens, text, mask)
        synchronize()

    encode_s = time_per_call(encode, iterations)
    decode_s = time_per_call(decode, iterations)
    return batch / encode_s, batch / decode_s, sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=3)
    parser.add_argument("--resolution", type=int, default=256, help="image size of the paper models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--paper", nargs="*", default=list(PAPER_MODELS), help=f"of {list(PAPER_MODELS)}")
    parser.add_argument("--presets", nargs="*", default=["fashion-mnist-titok", "fashion-mnist-textok", "tuxpaint-textok"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = [(name, paper_config(*PAPER_MODELS[name], args.resolution)) for name in args.paper]
    rows += [(f"preset {name}", preset_config(name)) for name in args.presets]
    print(f"\n1D tokenizers on {device} ({torch.get_num_threads()} threads), fp32, batch {args.batch}, "
          f"{args.iterations} timed iterations")
    print(f"{'model':<30} {'image':>6} {'tokens':>7} {'bottleneck':>10} {'params':>9} {'encode img/s':>13} {'decode img/s':>13}")
    for name, config in rows:
        encode, decode, params = measure(config, args.batch, args.iterations, device)
        print(f"{name:<30} {config.image_size:>6} {config.num_latent_tokens:>7} {config.bottleneck:>10} "
              f"{params / 1e6:>8.1f}M {encode:>13.1f} {decode:>13.1f}")


if __name__ == "__main__":
    main()
