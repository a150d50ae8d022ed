"""bench/gpu.py: its pure helpers (peak TFLOP/s by device name, MFU, batch halving on OOM, SDPA
backend, compile-time estimate, loader verdicts) and one `--device cpu --tiny` run end to end, whose
JSON must hold every section with positive, finite figures (timings are not asserted)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "gpu.py"


def _load_script():
    # bench/ is not a package of the project: load the script as a module by its path.
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


gpu = _load_script()


def positive(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


# --------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0),   # the SXM5 part, as torch names it
    ("NVIDIA H100 SXM5 80GB", 989.0),
    ("NVIDIA H100 PCIe", 756.0),
    ("nvidia h100 pcie", 756.0),        # case does not matter
    ("NVIDIA H200", 989.0),
    ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0),
    ("NVIDIA A100 80GB PCIe", 312.0),
    ("NVIDIA H100 NVL", None),          # lower clocks than the SXM part: n/a rather than a guess
    ("NVIDIA H200 NVL", None),
    ("NVIDIA GeForce RTX 4090", None),
    ("x86_64", None),
])
def test_peak_lookup_by_device_name(name, peak):
    assert gpu.peak_tflops(name) == peak


def test_mfu_arithmetic():
    # 1 TFLOP per image at 500 images/s is 500 TFLOP/s: half of a 1000 TFLOP/s peak.
    tflops = gpu.achieved_tflops(1e12, 500.0)
    assert tflops == pytest.approx(500.0)
    assert gpu.mfu(tflops, 1000.0) == pytest.approx(0.5)
    assert gpu.mfu(gpu.achieved_tflops(2.5e9, 100.0), 989.0) == pytest.approx(0.25 / 989.0)
    assert gpu.mfu(tflops, None) is None
    assert gpu.mfu(tflops, 0.0) is None


class FakeStep:
    """A step function that runs out of CUDA memory above `fits` images, recording every call."""

    def __init__(self, fits: int):
        self.fits, self.calls, self.released = fits, [], 0

    def __call__(self, batch: int) -> dict:
        self.calls.append(batch)
        if batch > self.fits:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory at batch {batch} (fake)")
        return {"step_s": 0.1 * batch}

    def release(self) -> None:
        self.released += 1


def test_fit_batch_halves_until_the_step_fits():
    step = FakeStep(fits=48)
    fitted = gpu.fit_batch(step, 256, release=step.release)
    assert (fitted.batch, fitted.result, fitted.out_of_memory) == (32, {"step_s": 3.2}, [256, 128, 64])
    assert step.calls == [256, 128, 64, 32]
    assert step.released == 3  # memory is released after every failed attempt


def test_fit_batch_keeps_a_batch_that_fits_at_once():
    step = FakeStep(fits=256)
    fitted = gpu.fit_batch(step, 256, release=step.release)
    assert (fitted.batch, fitted.out_of_memory, step.calls, step.released) == (256, [], [256], 0)


def test_fit_batch_gives_up_below_one_image_and_passes_other_errors_through():
    step = FakeStep(fits=0)
    with pytest.raises(RuntimeError, match="even at batch size 1"):
        gpu.fit_batch(step, 6, release=step.release)
    assert step.calls == [6, 3, 1]

    def broken(batch: int):
        raise ValueError("not a memory problem")

    with pytest.raises(ValueError, match="not a memory problem"):
        gpu.fit_batch(broken, 8, release=lambda: None)
    with pytest.raises(ValueError, match=">= 1"):
        gpu.fit_batch(step, 0)


def test_sdpa_backend_is_read_off_the_ops():
    assert gpu.sdpa_backend(["aten.mm", "aten._scaled_dot_product_flash_attention",
                             "aten._scaled_dot_product_flash_attention_backward"], True) == "flash"
    assert gpu.sdpa_backend(["aten._scaled_dot_product_cudnn_attention"], True) == "cudnn"
    assert gpu.sdpa_backend(["aten.bmm", "aten.mm"], True).startswith("math")
    assert gpu.sdpa_backend(["aten.bmm"], False).startswith("none")


def test_compile_estimate_scales_with_the_blocks():
    assert gpu.compile_estimate_s(None, 48) == 60.0
    assert gpu.compile_estimate_s((40.0, 16), 48) == pytest.approx(1.25 * 40.0 * 3)
    assert gpu.compile_estimate_s((4.0, 4), 4) == 60.0  # never below the reserve


def test_loader_verdicts_compare_the_best_training_rate():
    train = [{"model": "S-128", "mode": "eager", "images_per_s": 900.0},
             {"model": "S-128", "mode": "compile", "images_per_s": 1200.0}]
    loader = {"runs": [{"workers": 0, "images_per_s": 600.0}, {"workers": 8, "images_per_s": 3000.0}]}
    (verdict,) = gpu.loader_verdicts(train, loader)
    assert (verdict["mode"], verdict["train_images_per_s"]) == ("compile", 1200.0)
    serial, pooled = verdict["by_workers"]
    assert (serial["loader_bound"], serial["serial_overhead"]) == (True, pytest.approx(2.0))
    assert pooled["loader_bound"] is False
    assert gpu.loader_verdicts(train, None) == []


# --------------------------------------------------------------------------- the script, tiny, on CPU


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(stdout, figures) of one `bench/gpu.py --device cpu --tiny --json` run."""
    out = tmp_path_factory.mktemp("bench-gpu") / "figures.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--json", str(out)],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, f"bench/gpu.py failed:\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return result.stdout, json.loads(out.read_text())


@pytest.mark.timeout(300)
def test_tiny_run_has_every_section_with_positive_figures(tiny_run):
    stdout, data = tiny_run
    assert data["errors"] == []
    assert data["device"]["type"] == "cpu" and data["device"]["peak_tflops"] is None

    smoke = data["smoke"]
    assert positive(smoke["wall_s"])
    assert set(smoke["stages"]) >= {"ingest", "train-tokenizer", "pretokenize", "train-generator", "evaluate"}

    train = data["train"]
    assert {(row["model"], row["mode"]) for row in train} >= {("S-128", "eager"), ("B-64", "eager"),
                                                            ("L-32", "eager"), ("S-128", "compile")}
    for row in train:
        for key in ("images_per_s", "step_s", "gflop_per_image", "tflops", "batch", "params_m"):
            assert positive(row[key]), (row["model"], row["mode"], key, row[key])
        assert row["mfu"] is None and row["peak_memory_gib"] is None  # CPU: no peak, no allocator stats
        assert row["sdpa"] == "flash (cpu)"
        assert positive(row["compile_s"]) if row["mode"] == "compile" else row["compile_s"] is None
    skipped = {entry["what"] for entry in data["skipped"]}
    assert {"train B-64 (compile)", "train L-32 (compile)"} <= skipped  # with the printed reason

    assert [row["model"] for row in data["pretokenize"]] == ["S-128", "B-64", "L-32"]
    assert all(positive(row["images_per_s"]) and positive(row["batch"]) for row in data["pretokenize"])

    generation = {(row["kind"], row["tokens"]): row for row in data["generation"]}
    assert set(generation) == {("maskgit", 32), ("maskgit", 256), ("dit", 32), ("dit", 256)}
    assert all(positive(row["samples_per_s"]) and positive(row["batch"]) for row in generation.values())

    loader = data["loader"]
    assert positive(loader["png_kib"]) and [run["workers"] for run in loader["runs"]] == [0, 1]
    assert all(positive(run["images_per_s"]) for run in loader["runs"])
    assert [verdict["model"] for verdict in data["loader_bound"]] == ["S-128", "B-64", "L-32"]
    for verdict in data["loader_bound"]:
        assert all(isinstance(run["loader_bound"], bool) for run in verdict["by_workers"])

    # The printed table: every figure with its unit, MFU shown as n/a.
    for header in ("images/s", "GFLOP/image", "TFLOP/s", "MFU", "compile s", "peak GiB", "samples/s", "batch"):
        assert header in stdout
    assert "n/a" in stdout and "loader-bound" in stdout
