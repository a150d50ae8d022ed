"""Images/s of the pretokenize stage against the bare encoder forward pass on the same images.

Builds a store from a preset (ingest, caption, embed-text, then a train-tokenizer artifact of
a few steps: speed does not depend on the weights), runs the stage, and times
`Tokenizer.encode` alone on the same images already decoded in memory, in the same batches.
The stage's figure covers reading Parquet, PNG decoding (in a background thread), text lookup,
encoding and writing the token shards; target: >= 90% of the bare forward.

    .venv/bin/python bench/pretokenize_throughput.py --preset fashion-mnist-titok --images 10000
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from tasks.config import RuntimeConfig  # noqa: E402
from tasks.presets import load_config  # noqa: E402
from tasks.embed_text.read import TextSource  # noqa: E402
from tasks.ingest.read import decode_images, iter_image_batches  # noqa: E402
from tasks.pretokenize.stage import run_pretokenize  # noqa: E402
from tasks.runner import execute_stage  # noqa: E402
from tasks.stage import StageContext  # noqa: E402
from tasks.store import Manifest, Store  # noqa: E402
from tasks.train_tokenizer.read import load_tokenizer  # noqa: E402
from tasks.train_tokenizer.stage import run_train_tokenizer  # noqa: E402


def prepare(store: Store, preset: str, images: int | None) -> dict[str, Manifest]:
    """Inputs of pretokenize for `preset` (first `images` source images), tokenizer of 2 steps."""
    overrides = [f"ingest.source.max_images={images}"] if images else []
    overrides += ["train_tokenizer.train.steps=2", "train_tokenizer.train.checkpoint_every=2",
                  "train_tokenizer.eval_images=2", "train_tokenizer.grid_images=2"]
    config = load_config(preset, overrides)
    manifests: dict[str, Manifest] = {}
    manifests["ingest"] = execute_stage("ingest", config.ingest, {}, store).manifest
    manifests["caption"] = execute_stage("caption", config.caption, {"ingest": manifests["ingest"]}, store).manifest
    manifests["embed-text"] = execute_stage("embed-text", config.embed_text, {"caption": manifests["caption"]}, store).manifest
    ctx = StageContext("train-tokenizer", config.train_tokenizer, dict(manifests), store, RuntimeConfig(device="cpu"),
                       "b" * 64, Path(tempfile.mkdtemp(dir=store.root / "work")))
    output = run_train_tokenizer(ctx)
    manifests["train-tokenizer"] = store.commit_artifact(
        "train-tokenizer", ctx.output_dir, tables=output.tables, config_hash="bench", cache_key="b" * 64,
        code_version="bench", summary=output.summary,
    )
    return manifests


def run_stage(store: Store, manifests: dict[str, Manifest], preset: str, batch_size: int | None = None) -> dict:
    """One pretokenize run in a fresh work dir; returns its summary plus the wall time."""
    config = load_config(preset).pretokenize
    if batch_size:
        config = config.model_copy(update={"batch_size": batch_size})
    work = Path(tempfile.mkdtemp(dir=store.root / "work"))
    ctx = StageContext("pretokenize", config, manifests, store, RuntimeConfig(device="cpu"), "p" * 64, work)
    start = time.perf_counter()
    output = run_pretokenize(ctx)
    seconds = time.perf_counter() - start
    shutil.rmtree(work)
    return {**output.summary, "seconds": seconds, "batch_size": config.batch_size}


@torch.no_grad()
def bare_encode(store: Store, manifests: dict[str, Manifest], batch_size: int) -> tuple[float, int]:
    """(images/s, images) of model.encode alone over every image, decoded beforehand."""
    model, info = load_tokenizer(manifests["train-tokenizer"], store)
    text = TextSource(manifests["caption"], manifests["embed-text"], store) if info["text"]["uses_text"] else None
    batches = []
    for record in iter_image_batches(manifests["ingest"], store, batch_size, columns=["image_id", "image"]):
        image_ids = record.column("image_id").to_pylist()
        batches.append((decode_images(record.column("image").to_pylist()), *(text.lookup(image_ids) if text else (None, None))))
    count = sum(len(b[0]) for b in batches)
    model.encode(*batches[0])  # warm-up
    start = time.perf_counter()
    for images, tokens, mask in batches:
        model.encode(images, tokens, mask)
    return count / (time.perf_counter() - start), count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="fashion-mnist-titok")
    parser.add_argument("--images", type=int, default=10000, help="source images to ingest (0 = all)")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the preset's pretokenize.batch_size")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the best counts")
    parser.add_argument("--store", default=None, help="reuse a store (default: a temporary one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.store) if args.store else Path(tempfile.mkdtemp(prefix="tok1d-bench-"))
    store = Store(root)
    manifests = prepare(store, args.preset, args.images or None)
    # Alternating repeats, best of each: other processes on shared cores only ever slow a run down.
    loop, whole, bare = [], [], []
    for _ in range(args.repeats):
        stage = run_stage(store, manifests, args.preset, args.batch_size)
        loop.append(stage["images_per_s"])
        whole.append(stage["rows"] / stage["seconds"])
        speed, count = bare_encode(store, manifests, stage["batch_size"])
        bare.append(speed)
    print(f"\npretokenize of {args.preset} on cpu ({torch.get_num_threads()} threads), {count} images, "
          f"batch {stage['batch_size']}, best of {args.repeats}")
    print(f"{'':<40} {'images/s':>9} {'% of bare':>10}")
    rows = [("bare model.encode (images in memory)", max(bare)),
            ("stage encode loop (read, decode, write)", max(loop)),
            ("stage end to end (+ decode check)", max(whole))]
    for name, value in rows:
        print(f"{name:<40} {value:>9.1f} {100 * value / max(bare):>9.1f}%")
    if not args.store:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
