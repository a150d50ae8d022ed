"""Samples per second of generation + decoding: compact 1D token sequences vs 2D-grid-sized ones.

For MaskGIT (VQ tokens) and DiT (KL tokens), the same generator width/depth samples N tokens
and a tokenizer of the same size decodes them to images, once with N = 32 (a TiTok-style 1D
sequence) and once with N = 256 (the 16x16 grid of a 2D tokenizer at 256 px, patch 16). Random
weights: the cost of a step does not depend on what the weights are. Sampling is the evaluate
stage's own code (tasks/evaluate/sampling.py) with the SamplingConfig defaults (8 MaskGIT steps
or 8 DDIM steps, classifier-free guidance 3.0, so each step runs the batch twice).

    .venv/bin/python bench/generation_throughput.py --batch 16 --repeats 3 --threads 2
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from models.diffusion import GaussianDiffusion  # noqa: E402
from models.dit import DiT, DiTConfig  # noqa: E402
from models.maskgit import MaskGIT, MaskGITConfig  # noqa: E402
from models.tokenizer import Tokenizer  # noqa: E402
from models.tokenizer_config import TokenizerConfig  # noqa: E402
from tasks.config import SamplingConfig, TrainGeneratorConfig  # noqa: E402
from tasks.train_generator.kinds import KINDS  # noqa: E402
from tasks.train_generator.read import Generator  # noqa: E402

NUM_CLASSES = 10
CODEBOOK = 4096
TOKEN_DIM = 12


def build(kind: str, tokens: int, size: str, width: int, depth: int, heads: int, image_size: int,
          device: torch.device) -> tuple[Generator, Tokenizer]:
    torch.manual_seed(0)
    tokenizer_config = TokenizerConfig(image_size=image_size, patch_size=16, size=size, num_latent_tokens=tokens,
                                       bottleneck="vq" if kind == "maskgit" else "kl", codebook_size=CODEBOOK,
                                       token_dim=TOKEN_DIM)
    tokenizer = Tokenizer(tokenizer_config).to(device).eval()
    info = {"tokens": {"num_classes": NUM_CLASSES}}
    if kind == "maskgit":
        model = MaskGIT(MaskGITConfig(vocab_size=CODEBOOK, seq_len=tokens, num_classes=NUM_CLASSES, width=width,
                                      depth=depth, heads=heads))
        generator = Generator(KINDS["maskgit"], "class", model.to(device).eval(), None, None, info)
    else:
        model = DiT(DiTConfig(token_dim=TOKEN_DIM, seq_len=tokens, num_classes=NUM_CLASSES, width=width, depth=depth,
                              heads=heads))
        generator = Generator(KINDS["dit"], "class", model.to(device).eval(), GaussianDiffusion.linear(1000), 1.0, info)
    return generator, tokenizer


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def throughput(generator: Generator, tokenizer: Tokenizer, batch: int, repeats: int,
               sampling: SamplingConfig) -> tuple[float, float]:
    """(samples/s of generation + decoding, fraction of the time spent decoding) of the fastest
    repeat: on a shared machine, other processes only ever add time (as timeit, take the minimum)."""
    device = generator.device
    labels = torch.arange(batch) % NUM_CLASSES
    times, decode_share = [], []
    for repeat in range(repeats + 1):  # the first round warms up allocators and kernels
        rng = torch.Generator(device=device).manual_seed(repeat)
        _sync(device)
        start = time.perf_counter()
        tokens = generator.sample(labels, sampling, rng)
        _sync(device)
        sampled = time.perf_counter()
        tokenizer.decode(tokens)
        _sync(device)
        end = time.perf_counter()
        if repeat:
            times.append(end - start)
            decode_share.append((end - sampled) / (end - start))
    best = min(range(len(times)), key=times.__getitem__)
    return batch / times[best], decode_share[best]


def main() -> None:
    defaults = TrainGeneratorConfig()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--short", type=int, default=32, help="1D sequence length")
    parser.add_argument("--long", type=int, default=256, help="2D-grid-sized sequence length")
    parser.add_argument("--width", type=int, default=defaults.width)
    parser.add_argument("--depth", type=int, default=defaults.depth)
    parser.add_argument("--heads", type=int, default=defaults.heads)
    parser.add_argument("--tokenizer-size", default="tiny")
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sampling = SamplingConfig()

    print(f"device {device}, {torch.get_num_threads()} CPU threads, batch {args.batch}, best of {args.repeats}")
    print(f"generator width {args.width} depth {args.depth} heads {args.heads}; tokenizer {args.tokenizer_size} at "
          f"{args.image_size}px patch 16; {sampling.steps} steps, guidance {sampling.guidance_scale}")
    print(f"\n{'generator':<10}{'tokens':>7}{'samples/s':>12}{'decode share':>14}")
    for kind in ("maskgit", "dit"):
        rates = {}
        for tokens in (args.short, args.long):
            generator, tokenizer = build(kind, tokens, args.tokenizer_size, args.width, args.depth, args.heads,
                                         args.image_size, device)
            rate, share = throughput(generator, tokenizer, args.batch, args.repeats, sampling)
            rates[tokens] = rate
            print(f"{kind:<10}{tokens:>7}{rate:>12.2f}{share:>13.0%}")
        print(f"{kind:<10}{'ratio':>7}{rates[args.short] / rates[args.long]:>11.2f}x  ({args.short} vs {args.long} tokens)")


if __name__ == "__main__":
    main()
