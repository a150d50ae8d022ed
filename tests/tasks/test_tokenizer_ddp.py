"""train-tokenizer with 2 torchrun processes (gloo, CPU): equal to 1 process with the same global
batch, a killed stage takes its workers down and resumes, failed workers name the resume folder."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks.config import RuntimeConfig

from builders.fashion import build_inputs
from builders.tokenizer import tiny_config, train_and_commit
from helpers import start_and_kill_after_checkpoint


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("ddp-inputs"))


def test_two_processes_match_one(tmp_path, inputs, caplog):
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
    caplog.clear()
    caplog.set_level(logging.INFO, logger="tok1d")
    double, double_manifest = train_and_commit(
        store, manifests, config, tmp_path / "two", RuntimeConfig(device="cpu", processes=2, threads=1)
    )
    assert double.summary["processes"] == 2 and double.summary["steps"] == 4
    # The main worker's loss lines reach the stage's own logger (and so the terminal and the UI).
    steps = [r.getMessage() for r in caplog.records if r.name == "tok1d" and ": step " in r.getMessage()]
    assert steps and steps[-1].startswith("train-tokenizer: step 4/4 "), caplog.text
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


KILL_SCRIPT = """
import json, sys, torch
from pathlib import Path
from tasks.config import RuntimeConfig, TrainTokenizerConfig
from tasks.stage import StageContext
from tasks.store import Manifest, Store
from tasks.train_tokenizer.stage import run_train_tokenizer

store_root, inputs_path, config_path, work = sys.argv[1:]
inputs = {k: Manifest.model_validate(v) for k, v in json.loads(Path(inputs_path).read_text()).items()}
config = TrainTokenizerConfig.model_validate_json(Path(config_path).read_text())
runtime = RuntimeConfig(device="cpu", processes=2, threads=1)
run_train_tokenizer(StageContext("train-tokenizer", config, inputs, Store(store_root), runtime, "k" * 64, Path(work)))
"""


def workers_of(job_file: Path) -> list[int]:
    """Processes whose command line names this job file (the torchrun agent and its workers)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and str(job_file).encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue  # exited meanwhile
    return found


def test_killing_the_stage_stops_its_workers_and_a_rerun_resumes(tmp_path, inputs):
    torch.set_num_threads(1)
    store, manifests = inputs
    config = tiny_config("vq", model={"drop_path": 0.0}, loss={"gan_weight": 0.0},
                         train={"steps": 40, "checkpoint_every": 5, "log_every": 5}, eval_images=2, grid_images=2)
    work = tmp_path / "work"
    latest = work / "checkpoints" / "latest"
    start_and_kill_after_checkpoint(tmp_path, store, manifests, config, work, script=KILL_SCRIPT, timeout_s=180)
    # The agent dies with the stage and stops its workers: orphans would train on to step 40.
    deadline = time.monotonic() + 60
    while workers_of(work / "job.json"):
        assert time.monotonic() < deadline, f"workers {workers_of(work / 'job.json')} outlived the stage"
        time.sleep(0.2)
    checkpoint_step = int(latest.read_text().strip().split("-")[1])
    assert 5 <= checkpoint_step < 40, checkpoint_step
    assert not (work / "output" / "tokenizer.safetensors").exists()

    resumed, resumed_manifest = train_and_commit(store, manifests, config, work,
                                                 RuntimeConfig(device="cpu", processes=2, threads=1))
    assert resumed.summary["steps"] == 40 and resumed.summary["resumed_from"] >= checkpoint_step
    single, single_manifest = train_and_commit(store, manifests, config, tmp_path / "one")
    one = load_file(single_manifest.path(store, "tokenizer-raw.safetensors"))
    two = load_file(resumed_manifest.path(store, "tokenizer-raw.safetensors"))
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=5e-5, msg=key)


def test_failing_workers_name_the_folder_a_rerun_resumes_from(tmp_path, inputs):
    store, manifests = inputs
    # A multiple of 2 passes the launcher's check; every worker then fails on the image count.
    config = tiny_config("vq", train={"batch_size": 4096})
    with pytest.raises(RuntimeError, match=r"2 torchrun workers failed .* resumes from the last checkpoint in "
                                           + str(tmp_path / "work" / "checkpoints")):
        train_and_commit(store, manifests, config, tmp_path / "work", RuntimeConfig(device="cpu", processes=2, threads=1))
