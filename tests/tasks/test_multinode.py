"""train-tokenizer on two "nodes" of this machine: two stage processes (the real runner) with
runtime.nnodes=2, node_rank 0 and 1, one gloo worker each, meeting at a c10d rendezvous on
127.0.0.1. The weights equal one process with the same global batch; node 0 alone commits and
records the computed run, node 1 returns the same artifact as a cache hit; bad node settings fail
when the config loads."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tasks import lineage
from tasks.config import ConfigError, IngestConfig, RuntimeConfig, SourceConfig
from tasks.presets import load_config
from tasks.runner import execute_stage
from tasks.store import Store

from builders.processes import free_port
from builders.tokenizer import tiny_config, train_and_commit

REPO_ROOT = Path(__file__).resolve().parents[2]

NODE_SCRIPT = """
import json, sys
from pathlib import Path
from tasks.config import RuntimeConfig, TrainTokenizerConfig
from tasks.runner import execute_stage
from tasks.store import Manifest, Store

store_root, inputs_path, config_path, node_rank, endpoint, out = sys.argv[1:]
inputs = {k: Manifest.model_validate(v) for k, v in json.loads(Path(inputs_path).read_text()).items()}
config = TrainTokenizerConfig.model_validate_json(Path(config_path).read_text())
runtime = RuntimeConfig(device="cpu", processes=1, threads=1, nnodes=2, node_rank=int(node_rank), rdzv_endpoint=endpoint)
result = execute_stage("train-tokenizer", config, inputs, Store(store_root), runtime, run_id=f"node-{node_rank}")
Path(out).write_text(json.dumps({"artifact": result.manifest.artifact_id, "cache_hit": result.cache_hit}))
"""


def test_two_nodes_match_one_process_and_node_zero_commits(tmp_path):
    torch.set_num_threads(1)
    store = Store(tmp_path / "store")
    ingest = execute_stage(
        "ingest", IngestConfig(source=SourceConfig(kind="fashion-mnist", max_images=48), resolution=16,
                               shard_rows=32, val_fraction=0.25), {}, store,
    ).manifest
    # As in test_tokenizer_ddp: no dropout and no dead-code restart (it draws from rank 0's rows).
    config = tiny_config("vq", model={"drop_path": 0.0, "dead_code_restart_steps": 0}, loss={"gan_weight": 0.1},
                         train={"steps": 3, "batch_size": 8, "checkpoint_every": 2, "log_every": 1},
                         eval_images=2, grid_images=2)
    inputs_path, config_path = tmp_path / "inputs.json", tmp_path / "config.json"
    inputs_path.write_text(json.dumps({"ingest": ingest.model_dump(mode="json")}))
    config_path.write_text(config.model_dump_json())
    endpoint = f"127.0.0.1:{free_port()}"

    nodes = []
    for rank in (0, 1):
        out = tmp_path / f"node-{rank}.json"
        command = [sys.executable, "-c", NODE_SCRIPT, str(store.root), str(inputs_path), str(config_path), str(rank),
                   endpoint, str(out)]
        nodes.append((subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                       text=True), out))
        if rank == 0:  # node 0 holds the slot's lock when node 1 arrives: node 1 must not wait for it
            deadline = time.monotonic() + 60
            while not list((store.root / "work" / "train-tokenizer").glob("*/job.json")):
                assert nodes[0][0].poll() is None and time.monotonic() < deadline, nodes[0][0].communicate()[0]
                time.sleep(0.1)
    results = []
    try:
        for process, out in nodes:
            log = process.communicate(timeout=240)[0]
            assert process.returncode == 0, log
            results.append(json.loads(out.read_text()))
    finally:
        for process, _ in nodes:
            if process.poll() is None:
                process.kill()
                process.wait()

    assert [r["cache_hit"] for r in results] == [False, True]  # node 0 computed; node 1 returns its commit
    assert results[0]["artifact"] == results[1]["artifact"]
    assert [p.name for p in (store.root / "artifacts" / "train-tokenizer").iterdir()] == [results[0]["artifact"]]
    events = lineage.connect(store).execute(
        "select run_id, status, cache_hit from stages where stage = 'train-tokenizer' order by run_id").fetchall()
    assert events == [("node-0", "completed", False), ("node-1", "completed", True)]

    manifest = next(m for _, _, m, _ in store.cache_records() if m.stage == "train-tokenizer")
    assert manifest.summary["processes"] == 2 and manifest.summary["steps"] == 3
    _, single = train_and_commit(store, {"ingest": ingest}, config, tmp_path / "one")
    for name in ("tokenizer-raw.safetensors", "tokenizer.safetensors"):
        one, two = load_file(single.path(store, name)), load_file(manifest.path(store, name))
        assert one.keys() == two.keys()
        for key in one:
            torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=2e-5, msg=f"{name}:{key}")


def test_node_settings_are_checked_when_the_config_loads():
    config = load_config("smoke", ["runtime.nnodes=2", "runtime.node_rank=1", "runtime.rdzv_endpoint=node0:29400"])
    assert (config.runtime.nnodes, config.runtime.node_rank, config.runtime.rdzv_endpoint) == (2, 1, "node0:29400")
    for overrides, message in [
        (["runtime.nnodes=2", "runtime.node_rank=2", "runtime.rdzv_endpoint=node0:29400"], "node_rank must be in"),
        (["runtime.nnodes=2"], "rdzv_endpoint=HOST:PORT .* is required"),
        (["runtime.nnodes=2", "runtime.rdzv_endpoint=node0"], "must look like HOST:PORT"),
        (["runtime.nnodes=0"], "nnodes must be >= 1"),
        (["runtime.rdzv_id=a/b"], "rdzv_id may hold"),
    ]:
        with pytest.raises(ConfigError, match=message):
            load_config("smoke", overrides)
    assert RuntimeConfig().nnodes == 1 and RuntimeConfig().rdzv_endpoint is None
