"""Samples per second of generation + decoding: compact 1D token sequences vs 2D-grid-sized ones.

For MaskGIT (VQ tokens) and DiT (KL tokens), the same generator width/depth samples N tokens
and a tokenizer of the same size decodes them to images, once with N = 32 (a TiTok-style 1D
sequence) and once with N = 256 (the 16x16 grid of a 2D tokenizer at 256 px, patch 16). Random
weights: the cost of a step does not depend on what the weights are. Sampling is the evaluate
stage's own code (`Generator.sample`, tasks/train_generator/kinds/) at one of these settings:

- legacy: the SamplingConfig defaults (8 MaskGIT steps or 8 DDIM steps, classifier-free guidance
  3.0, so each step runs the batch twice), the setting of the first table in docs/benchmarks.md;
- preset: the `evaluate.sampling` of the presets users run on this machine (`--maskgit-preset`,
  default fashion-mnist-titok: 8 steps, linear guidance 2.0, whose first step is unguided;
  `--dit-preset`, default fashion-mnist-textok: 50 DDIM steps, guidance 2.0);
- paper: DiT at the DiT paper's 250 steps (`--paper-steps`; DDIM, the DiT preset's guidance;
  imagenet-textok-b32 runs 250 DDPM steps, the same network calls). MaskGIT's paper setting is its
  8 steps, which `preset` already has, so `paper` times DiT only.

Beside samples/s, FLOPs per sample of sampling (every generator step, the guidance doubling
included) plus the tokenizer decode are counted with torch's FlopCounterMode (matmuls and
attention; elementwise work is not counted) at a small batch: the count is linear in the batch.
The speed ratio 32 vs 256 tokens is set against the FLOP ratio: measured/FLOP near 100% means
both lengths run at the same GFLOP/s; below 100% the short sequence wastes time on fixed costs,
above it the long one does.

With two threads on a machine where another process (of another session: sched_autogroup shares
the CPU between sessions, whatever their nice) keeps a core busy, libgomp's spinning barrier makes
every parallel op wait for a descheduled thread (milliseconds for a 20 us LayerNorm), so short
sequences, with more ops per FLOP, lose most: the header prints OMP_WAIT_POLICY (PASSIVE avoids
it) and the load average before and after.

    .venv/bin/python bench/generation_throughput.py --batch 16 --repeats 3 --threads 2
    .venv/bin/python bench/generation_throughput.py --settings preset,paper --threads 2
    .venv/bin/python bench/generation_throughput.py --settings preset --kinds maskgit --profile
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

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
SETTINGS = ("legacy", "preset", "paper")
WARMUP_STEPS = 8  # the warm-up round needs every shape once, not every step of a 250-step run


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


@dataclass
class Timing:
    samples_per_s: float  # of the fastest repeat
    decode_share: float  # fraction of that repeat's time spent decoding
    seconds: list[float]  # every timed repeat, generation + decoding of one batch


@torch.no_grad()
def measure(generator: Generator, tokenizer: Tokenizer, batch: int, repeats: int, sampling: SamplingConfig,
            warmup_steps: int | None = None) -> Timing:
    """Time generation + decoding of one batch, `repeats` times after one warm-up round, and keep
    the fastest: on a shared machine, other processes only ever add time (as timeit, take the
    minimum). The warm-up round runs `warmup_steps` steps (None: all of them), which meets every
    shape and kernel of a step; the timed rounds always run `sampling.steps`."""
    device = generator.device
    labels = torch.arange(batch) % NUM_CLASSES
    warmup = sampling if warmup_steps is None else sampling.model_copy(
        update={"steps": min(sampling.steps, warmup_steps)})
    times, decode_share = [], []
    for repeat in range(repeats + 1):
        rng = torch.Generator(device=device).manual_seed(repeat)
        _sync(device)
        start = time.perf_counter()
        tokens = generator.sample(labels, sampling if repeat else warmup, rng)
        _sync(device)
        sampled = time.perf_counter()
        tokenizer.decode(tokens)
        _sync(device)
        end = time.perf_counter()
        if repeat:
            times.append(end - start)
            decode_share.append((end - sampled) / (end - start))
    best = min(range(len(times)), key=times.__getitem__)
    return Timing(batch / times[best], decode_share[best], times)


def throughput(generator: Generator, tokenizer: Tokenizer, batch: int, repeats: int,
               sampling: SamplingConfig) -> tuple[float, float]:
    """(samples/s of generation + decoding, fraction of the time spent decoding) of the fastest
    repeat, the warm-up round a full one (what bench/gpu.py times)."""
    timing = measure(generator, tokenizer, batch, repeats, sampling)
    return timing.samples_per_s, timing.decode_share


@torch.no_grad()
def count_flops(generator: Generator, tokenizer: Tokenizer, sampling: SamplingConfig,
                batch: int = 2) -> tuple[float, float]:
    """(sampling FLOPs, decoding FLOPs) per sample, counted by FlopCounterMode over one real run at
    `batch` (every op of the sampler runs, so guidance doubling and an unguided first step count as
    they happen). Matmuls, convolutions and attention only; the count is linear in the batch."""
    labels = torch.arange(batch) % NUM_CLASSES
    rng = torch.Generator(device=generator.device).manual_seed(0)
    with FlopCounterMode(display=False) as counter:
        tokens = generator.sample(labels, sampling, rng)
    sample_flops = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter:
        tokenizer.decode(tokens)
    return sample_flops / batch, counter.get_total_flops() / batch


def settings_for(kind: str, setting: str, maskgit_preset: str, dit_preset: str,
                 paper_steps: int) -> tuple[str, SamplingConfig] | None:
    """(a description, the SamplingConfig) of `setting` for `kind`, or None when it has none."""
    if setting == "legacy":
        return "SamplingConfig defaults", SamplingConfig()
    from tasks.presets import load_config

    preset = maskgit_preset if kind == "maskgit" else dit_preset
    sampling = load_config(preset).evaluate.sampling
    if setting == "preset":
        return f"preset {preset}", sampling
    if kind == "maskgit":
        return None  # the paper's 8 steps: the preset row already
    return f"paper steps, guidance of {preset}", sampling.model_copy(update={"steps": paper_steps, "sampler": "ddim"})


def describe(kind: str, sampling: SamplingConfig) -> str:
    if kind == "maskgit":
        return (f"{sampling.steps} steps, temperature {sampling.temperature:g}->{sampling.temperature_end:g}, "
                f"{sampling.guidance_schedule} guidance {sampling.guidance_scale:g}")
    return f"{sampling.steps} {sampling.sampler.upper()} steps, guidance {sampling.guidance_scale:g}"


def profile(generator: Generator, tokenizer: Tokenizer, batch: int, sampling: SamplingConfig, rows: int) -> None:
    """The torch.profiler table (self CPU time) of one generation + decoding run after a warm-up."""
    from torch.profiler import ProfilerActivity, profile as torch_profile, record_function

    labels = torch.arange(batch) % NUM_CLASSES
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if generator.device.type == "cuda" else [])
    with torch.no_grad():
        generator.sample(labels, sampling, torch.Generator(device=generator.device).manual_seed(0))
        with torch_profile(activities=activities) as prof:
            with record_function("sample"):
                tokens = generator.sample(labels, sampling, torch.Generator(device=generator.device).manual_seed(1))
            with record_function("decode"):
                tokenizer.decode(tokens)
            _sync(generator.device)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


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
    parser.add_argument("--kinds", default="maskgit,dit", help="comma-separated: maskgit, dit")
    parser.add_argument("--settings", default="legacy",
                        help=f"comma-separated sampling settings, of {', '.join(SETTINGS)} (see the module doc)")
    parser.add_argument("--maskgit-preset", default="fashion-mnist-titok", help="preset whose sampling `preset` uses")
    parser.add_argument("--dit-preset", default="fashion-mnist-textok", help="preset whose sampling `preset` uses")
    parser.add_argument("--paper-steps", type=int, default=250, help="DiT steps of the `paper` setting")
    parser.add_argument("--flop-batch", type=int, default=2, help="batch of the FLOP-counting run")
    parser.add_argument("--target", type=float, default=0.9, help="measured/FLOP ratio the table checks")
    parser.add_argument("--profile", action="store_true", help="also print a torch.profiler table per run")
    parser.add_argument("--profile-rows", type=int, default=25)
    args = parser.parse_args()
    kinds = [k for k in args.kinds.split(",") if k]
    settings = [s for s in args.settings.split(",") if s]
    for name in kinds:
        if name not in ("maskgit", "dit"):
            parser.error(f"unknown kind {name!r}; known: maskgit, dit")
    for name in settings:
        if name not in SETTINGS:
            parser.error(f"unknown setting {name!r}; known: {', '.join(SETTINGS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    print(f"device {device}, {torch.get_num_threads()} CPU threads, batch {args.batch}, best of {args.repeats} "
          f"(warm-up round of at most {WARMUP_STEPS} steps); FLOPs counted at batch {args.flop_batch}")
    print(f"generator width {args.width} depth {args.depth} heads {args.heads}; tokenizer {args.tokenizer_size} at "
          f"{args.image_size}px patch 16")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '(unset)')}; load average at start "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    header = (f"{'generator':<10}{'setting':<8}{'tokens':>7}{'samples/s':>11}{'s/batch':>9}{'decode':>8}"
              f"{'GFLOP/sample':>14}{'(decode)':>10}{'GFLOP/s':>9}")
    summary = []
    for kind in kinds:
        for setting in settings:
            chosen = settings_for(kind, setting, args.maskgit_preset, args.dit_preset, args.paper_steps)
            if chosen is None:
                continue
            source, sampling = chosen
            print(f"\n{kind} / {setting}: {describe(kind, sampling)} ({source})")
            print(header)
            rates, flops = {}, {}
            for tokens in (args.short, args.long):
                generator, tokenizer = build(kind, tokens, args.tokenizer_size, args.width, args.depth, args.heads,
                                             args.image_size, device)
                timing = measure(generator, tokenizer, args.batch, args.repeats, sampling, warmup_steps=WARMUP_STEPS)
                sample_flops, decode_flops = count_flops(generator, tokenizer, sampling, args.flop_batch)
                rates[tokens], flops[tokens] = timing.samples_per_s, sample_flops + decode_flops
                print(f"{kind:<10}{setting:<8}{tokens:>7}{timing.samples_per_s:>11.2f}{min(timing.seconds):>9.2f}"
                      f"{timing.decode_share:>8.0%}{flops[tokens] / 1e9:>14.3f}{decode_flops / 1e9:>10.3f}"
                      f"{flops[tokens] * timing.samples_per_s / 1e9:>9.1f}", flush=True)
                if args.profile:
                    profile(generator, tokenizer, args.batch, sampling, args.profile_rows)
                del generator, tokenizer
            measured = rates[args.short] / rates[args.long]
            flop_ratio = flops[args.long] / flops[args.short]
            summary.append((kind, setting, describe(kind, sampling), rates[args.short], rates[args.long], measured,
                            flop_ratio))

    print(f"\n{args.short} vs {args.long} tokens: measured speed ratio against the FLOP ratio "
          f"(target: measured >= {args.target:.0%} of the FLOP ratio)")
    print(f"{'generator':<10}{'setting':<8}{'sampling':<46}{f'/s @{args.short}':>9}{f'/s @{args.long}':>9}"
          f"{'measured':>10}{'FLOP':>8}{'meas/FLOP':>11}  target")
    for kind, setting, text, short, long, measured, flop_ratio in summary:
        share = measured / flop_ratio
        print(f"{kind:<10}{setting:<8}{text:<46}{short:>9.2f}{long:>9.2f}{measured:>9.2f}x{flop_ratio:>7.2f}x"
              f"{share:>11.0%}  {'met' if share >= args.target else 'NOT met'}")
    print(f"load average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
