"""train-tokenizer with 2 torchrun processes (gloo, CPU) equals 1 process with the same global batch."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.config import RuntimeConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_tokenizer import build_inputs, tiny_config, train_and_commit  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("ddp-inputs"))


def test_two_processes_match_one(tmp_path, inputs):
    torch.set_num_threads(1)
    store, manifests = inputs
    # No dropout and no dead-code restart: the one place where DDP legitimately differs is the
    # restart, which draws replacement codes from rank 0's half of the batch only.
    config = tiny_config(
        "vq",
        model={"drop_path": 0.0, "dead_code_restart_steps": 0},
        loss={"gan_weight": 0.1},
        train={"steps": 4, "batch_size": 8, "checkpoint_every": 2, "log_every": 1},
        eval_images=2,
        grid_images=2,
    )
    single, single_manifest = train_and_commit(store, manifests, config, tmp_path / "one")
    double, double_manifest = train_and_commit(
        store, manifests, config, tmp_path / "two", RuntimeConfig(device="cpu", processes=2, threads=1)
    )
    assert double.summary["processes"] == 2 and double.summary["steps"] == 4
    assert not (tmp_path / "two" / "output").exists()  # committed by the main worker's result
    for name in ("tokenizer-raw.safetensors", "tokenizer.safetensors"):
        one, two = load_file(single_manifest.path(store, name)), load_file(double_manifest.path(store, name))
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-5, msg=f"{name}:{key}")
    # The discriminator (plain module, gradients averaged by all-reduce) and its LeCAM anchors too.
    gan_one = load_file(tmp_path / "one" / "checkpoints" / "step-00000004" / "gan.safetensors")
    gan_two = load_file(tmp_path / "two" / "checkpoints" / "step-00000004" / "gan.safetensors")
    for key in gan_one:
        torch.testing.assert_close(gan_two[key], gan_one[key], rtol=1e-4, atol=2e-5, msg=f"gan:{key}")
    # Same losses logged (means over the two halves of each batch).
    assert double.summary["final_l2"] == pytest.approx(single.summary["final_l2"], rel=1e-4)
