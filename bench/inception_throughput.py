"""Throughput of the FID Inception feature extractor against the matmul rate of the same machine.

Prints, in one run: the FLOPs of one image (counted by torch's FlopCounterMode), and for each batch
size the fp32 matmul rate (best 2048^2 product, timed alternately with the runs below), the images/s of
``models.metrics.extract_features`` (uint8 images -> clean-fid resize -> Inception) with the
folded network (default) and the scripted network as loaded (``reference=True``, the old path),
the share of time spent resizing, the network's GFLOP/s as a fraction of the matmul rate, and the
speedup. Last, the max |difference| of our features from clean-fid's own pipeline (PNG files ->
``get_folder_features(mode="clean")`` with its ``InceptionV3W`` wrapper) on the same images.

    .venv/bin/python bench/inception_throughput.py --threads 2 --batch-sizes 16 64
    .venv/bin/python bench/inception_throughput.py --no-reference      # only the fast path

Figures are wall-clock, best of --repeats alternating runs after a warm-up; the load average is
printed because other jobs on a small machine change them a lot.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.inception import InceptionFeatures, inception_weights_path, to_uint8_clean_resized  # noqa: E402
from models.metrics import extract_features  # noqa: E402

warnings.filterwarnings("ignore", message=r".*torch\.jit\.", category=FutureWarning)


def smooth_images(count: int, size: int, seed: int = 0) -> np.ndarray:
    """uint8 [N,size,size,3] images with smooth structure (bicubic-upsampled noise)."""
    low = torch.from_numpy(np.random.default_rng(seed).random((count, 3, 8, 8)) * 255)
    up = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return up.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


MATMUL_N = 2048


def matmul_fn() -> Callable[[], object]:
    """One fp32 MATMUL_N^2 product, the machine's best-case FLOP rate for dense work."""
    a, b = torch.randn(MATMUL_N, MATMUL_N), torch.randn(MATMUL_N, MATMUL_N)
    return lambda: a @ b


def flops_per_image(net: InceptionFeatures) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.forward_clean(torch.zeros(1, 3, 299, 299))
    return float(counter.get_total_flops())


def best_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time of each function; runs alternate (order reversed every round) so that
    load from other jobs falls on all of them alike."""
    for fn in fns.values():
        fn()  # warm-up: allocator, oneDNN primitive cache
    best = dict.fromkeys(fns, float("inf"))
    for round_ in range(repeats):
        for name in list(fns)[:: 1 if round_ % 2 == 0 else -1]:
            start = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def clean_fid_features(images: np.ndarray, batch_size: int) -> np.ndarray:
    """Features from clean-fid's own folder pipeline and wrapper, offline.

    ``cleanfid.features.build_feature_extractor("clean")`` builds ``InceptionV3W("/tmp")`` and
    downloads inception-2015-12-05.pt there if it is missing; here the shipped weights are saved
    under that name in a temporary folder and the same wrapper loads them without downloading.
    """
    from PIL import Image
    from cleanfid.fid import get_folder_features
    from cleanfid.inception_torchscript import InceptionV3W

    with tempfile.TemporaryDirectory() as tmp:
        scripted = torch.jit.load(str(inception_weights_path()), map_location="cpu")
        torch.jit.save(scripted.net, os.path.join(tmp, "inception-2015-12-05.pt"))
        model = InceptionV3W(tmp, download=False).eval()
        folder = Path(tmp) / "images"
        folder.mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(folder / f"{i:05d}.png")
        return get_folder_features(str(folder), model=model, num_workers=0, batch_size=batch_size,
                                   device=torch.device("cpu"), mode="clean", verbose=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per setting (after one warm-up)")
    parser.add_argument("--image-size", type=int, default=64, help="source resolution, resized to 299")
    parser.add_argument("--check-images", type=int, default=16, help="images compared with clean-fid (0: skip)")
    parser.add_argument("--no-reference", action="store_true", help="skip the old (scripted, unfolded) path")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    matmul = matmul_fn()
    fast = InceptionFeatures()
    flops = flops_per_image(fast)
    print(f"Inception at 299: {flops / 1e9:.2f} GFLOP/image (FlopCounterMode); the matmul column is a "
          f"{MATMUL_N}^2 fp32 product timed in the same alternating rounds")

    paths = [("folded (default)", fast)]
    if not args.no_reference:
        paths.append(("scripted (reference=True)", InceptionFeatures(reference=True)))
    images = smooth_images(max(*args.batch_sizes, args.check_images), args.image_size)

    print(f"\n{'path':<26} {'batch':>5} {'images/s':>9} {'s/image':>8} {'resize':>7} {'net GFLOP/s':>12} "
          f"{'matmul':>7} {'of matmul':>9} {'speedup':>8}")
    for batch_size in args.batch_sizes:
        batch = images[:batch_size]
        fns = {name: (lambda net=net: extract_features([batch], net, batch_size=batch_size)) for name, net in paths}
        fns["resize"] = lambda: to_uint8_clean_resized(batch)
        fns["matmul"] = matmul
        best = best_seconds(fns, args.repeats)
        peak = 2 * MATMUL_N**3 / best.pop("matmul") / 1e9
        resize = best.pop("resize") / batch_size
        per_image = {name: seconds / batch_size for name, seconds in best.items()}
        for name, s in per_image.items():
            # FLOPs are all in the network: its rate leaves out the (single-threaded) PIL resize.
            net_rate = flops / (s - resize) / 1e9
            speedup = f"{per_image[paths[-1][0]] / s:.2f}x" if len(paths) > 1 and name == paths[0][0] else ""
            print(f"{name:<26} {batch_size:>5} {1 / s:>9.2f} {s:>8.3f} {resize / s:>7.1%} {net_rate:>12.1f} "
                  f"{peak:>7.1f} {net_rate / peak:>9.0%} {speedup:>8}", flush=True)

    if args.check_images:
        check = images[: args.check_images]
        theirs = clean_fid_features(check, batch_size=16)
        print(f"\nmax |features - clean-fid's| on {len(check)} images (largest feature {np.abs(theirs).max():.2f}):")
        for name, net in paths:
            ours = extract_features([check], net, batch_size=16)["pool"]
            print(f"  {name:<26} {np.abs(ours - theirs).max():.2e}")

if __name__ == "__main__":
    main()
