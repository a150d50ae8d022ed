"""Captions per second of the embed-text stage's sentence-transformers encoder (all-MiniLM-L6-v2).

Runs the stage's own encoder class on distinct synthetic captions, for each batch size, and
prints a small table. Time covers encoding and conversion to the stored Parquet layout.

    .venv/bin/python bench/text_embedding_throughput.py --captions 512 --batch-sizes 32 128
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from tasks.embed_text.cache import embeddings_table  # noqa: E402
from tasks.embed_text.encoders import PACKAGED_MINILM, SentenceTransformerEncoder, resolve_model  # noqa: E402

COLOURS = ["red", "grey", "navy", "white", "black", "green", "beige", "pink"]
THINGS = ["t-shirt", "sneaker", "bag", "coat", "sandal", "dress", "pullover", "ankle boot"]
SCENES = [
    "on a white table",
    "against a plain grey background",
    "folded next to a small wooden box",
    "photographed from above in soft light",
    "hanging on a metal rail in a shop",
    "lying on a striped blanket",
    "in the centre of the frame with a long shadow",
    "beside a potted plant",
]


def synthetic_captions(count: int) -> list[str]:
    combos = itertools.product(COLOURS, THINGS, SCENES, range(1 + count // 512))
    captions = [f"a {colour} {thing} {scene}" + (f", photo {n}" if n else "") for colour, thing, scene, n in combos]
    if len(captions) < count:
        raise ValueError(f"can make at most {len(captions)} distinct captions")
    return captions[:count]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", type=int, default=512)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    captions = synthetic_captions(args.captions)
    encoder = SentenceTransformerEncoder(resolve_model(PACKAGED_MINILM).path, args.max_tokens, args.device)
    encoder.encode(captions[:8])  # warm-up: lazy initialisation, allocator

    print(f"\nall-MiniLM-L6-v2 on {args.device} ({torch.get_num_threads()} threads), {len(captions)} distinct captions, max_tokens={args.max_tokens}")
    print(f"{'batch':>6} {'seconds':>8} {'captions/s':>11}")
    for batch_size in args.batch_sizes:
        start = time.perf_counter()
        for offset in range(0, len(captions), batch_size):
            chunk = captions[offset : offset + batch_size]
            batch = encoder.encode(chunk)
            embeddings_table([str(i) for i in range(len(chunk))], chunk, batch, "float16", "bench")
        seconds = time.perf_counter() - start
        print(f"{batch_size:>6} {seconds:>8.2f} {len(captions) / seconds:>11.1f}")


if __name__ == "__main__":
    main()
