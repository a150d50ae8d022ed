"""Helpers shared by the stage tests: running a stage in a child process and killing it
(`builders.processes.kill_when_ready`).

Importable as `helpers` (tests/tasks/conftest.py puts this folder on sys.path); the artifacts
tests start from are built by `builders`.
"""

from __future__ import annotations

import json
from pathlib import Path

from builders.processes import kill_when_ready
from tasks.config import TrainTokenizerConfig
from tasks.store import Manifest, Store

REPO = Path(__file__).resolve().parents[2]


# The train-tokenizer stage in a child process: argv store root, inputs json, config json, work folder.
TOKENIZER_KILL_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from pathlib import Path
import tasks.training.loop as loop
from tasks.config import RuntimeConfig, TrainTokenizerConfig
from tasks.stage import StageContext
from tasks.store import Manifest, Store
from tasks.train_tokenizer.stage import run_train_tokenizer

slow = loop.lr_factor
def lr_factor(*args):  # called once per step: slow steps leave time to kill mid-run
    time.sleep(0.3)
    return slow(*args)
loop.lr_factor = lr_factor
store_root, inputs_path, config_path, work = sys.argv[1:]
import json
inputs = {k: Manifest.model_validate(v) for k, v in json.loads(Path(inputs_path).read_text()).items()}
config = TrainTokenizerConfig.model_validate_json(Path(config_path).read_text())
ctx = StageContext("train-tokenizer", config, inputs, Store(store_root), RuntimeConfig(device="cpu"), "k" * 64, Path(work))
run_train_tokenizer(ctx)
"""


def start_and_kill_after_checkpoint(tmp_path: Path, store: Store, manifests: dict[str, Manifest],
                                    config: TrainTokenizerConfig, work: Path, script: str = TOKENIZER_KILL_SCRIPT,
                                    timeout_s: int = 120) -> int:
    """Run train-tokenizer (`script`, given TOKENIZER_KILL_SCRIPT's arguments) in a child process,
    kill -9 it once a checkpoint exists; returns that checkpoint's step."""
    (tmp_path / "inputs.json").write_text(json.dumps({k: m.model_dump(mode="json") for k, m in manifests.items()}))
    (tmp_path / "config.json").write_text(config.model_dump_json())
    latest = work / "checkpoints" / "latest"
    kill_when_ready(tmp_path, script, [str(store.root), str(tmp_path / "inputs.json"), str(tmp_path / "config.json"),
                                       str(work)], latest.exists, "checkpoint", timeout_s)
    return int(latest.read_text().strip().split("-")[1])
