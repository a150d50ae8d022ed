"""An official TiTok checkpoint through the pipeline: `tok1d import-titok` writes the
train-tokenizer artifact, a run with `train_tokenizer.import_titok.path` gets the same one, and
pretokenize, train-generator and evaluate run on it (the runner, a real store, real DuckDB)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from builders.cli import tok1d
from models.titok_import import TitokImportError
from tasks import lineage
from tasks.config import ConfigError, ImportTitokConfig, TrainTokenizerConfig
from tasks.hashing import sha256_file
from tasks.presets import load_config
from tasks.registry import get_stage
from tasks.runner import execute_stage
from tasks.store import Store
from tasks.train_tokenizer.read import EMA_WEIGHTS, RAW_WEIGHTS, tokenizer_info
from tasks.train_tokenizer.titok_files import fingerprint
from flows.run_plan import stages_to_run

REFERENCE = Path("/work/shared/reference/titok-tiny")
VQ = REFERENCE / "titok-tiny-vq"
TINY = "train_tokenizer.import_titok.sizes.tiny=[64,2,2]"

pytestmark = pytest.mark.skipif(not REFERENCE.is_dir(), reason=f"no TiTok reference checkpoints at {REFERENCE}")


def import_section(path: Path, **fields) -> TrainTokenizerConfig:
    return TrainTokenizerConfig(import_titok=ImportTitokConfig(path=str(path), sizes={"tiny": [64, 2, 2]}, **fields))


def test_imported_titok_runs_pretokenize_and_evaluate_beside_lineage(tmp_path):
    store_dir = tmp_path / "store"
    cli = tok1d("import-titok", str(VQ), "--size", "tiny=64,2,2", "--store", str(store_dir), env={"OMP_NUM_THREADS": "1"})
    imported_id = cli.stdout.split()[0]
    store = Store(store_dir)
    manifest = next(m for _, _, m, _ in store.cache_records() if m.stage == "train-tokenizer")
    assert manifest.artifact_id == imported_id
    info = tokenizer_info(manifest, store)
    assert info["imported_from"]["weights_sha256"] == sha256_file(VQ / "model.safetensors")
    assert info["imported_from"]["settings"] == str(VQ / "config.json")
    # The train-tokenizer format: both weight files (one stored file, hard-linked), same tensors.
    ema, raw = manifest.path(store, EMA_WEIGHTS), manifest.path(store, RAW_WEIGHTS)
    assert sha256_file(ema) == sha256_file(raw) and ema.stat().st_ino == raw.stat().st_ino

    overrides = [f"train_tokenizer.import_titok.path={VQ}", TINY, "stages=[evaluate]",
                 "ingest.source.max_images=90", "ingest.shard_rows=64", "pretokenize.decode_check_images=4",
                 "train_generator.train.steps=3", "train_generator.train.batch_size=16",
                 "train_generator.train.checkpoint_every=3", "evaluate.num_samples=8", "evaluate.batch_size=8",
                 "evaluate.reference_images=12", "evaluate.grid_images=4", "runtime.device=cpu", "runtime.threads=1"]
    config = load_config("smoke", overrides)
    assert stages_to_run(config) == ["ingest", "train-tokenizer", "pretokenize", "train-generator", "evaluate"]
    assert get_stage("train-tokenizer").inputs(config) == ()  # an import reads no images
    lineage.ensure_database(store)
    results = {}
    for name in stages_to_run(config):  # what the flow does, without Prefect
        inputs = {up: results[up].manifest for up in get_stage(name).inputs(config)}
        results[name] = execute_stage(name, config.section(name), inputs, store, config.runtime, run_id="titok-run")
    # Another section (the preset's model fields), the same checkpoint: the same artifact.
    assert not results["train-tokenizer"].cache_hit
    assert results["train-tokenizer"].manifest.artifact_id == imported_id
    pretokenized = results["pretokenize"].manifest
    assert pretokenized.rows == 90 and pretokenized.summary["seq_len"] == 8
    # pretokenize re-decoded stored tokens and compared them with the imported model's reconstructions.
    assert pretokenized.summary["decode_check_max_abs_diff"] < 1e-5
    meta = json.loads(pretokenized.path(store, "tokens.json").read_text())
    assert (meta["tokenizer_artifact"], meta["codebook_size"], meta["image_size"]) == (imported_id, 64, 32)
    evaluated = results["evaluate"].manifest
    assert evaluated.summary["num_samples"] == 8 and math.isfinite(evaluated.summary["gfid"])

    connection = lineage.connect(store)
    try:
        stages = dict(connection.execute(
            "select stage, output_artifact from stages where run_id = 'titok-run' and status = 'completed'").fetchall())
        metric_count = connection.execute(
            "select count(*) from metrics where run_id = 'titok-run' and stage = 'evaluate'").fetchone()[0]
        source = connection.execute(
            "select count(distinct sha256) from artifacts where artifact_id = ? and file = 'tokenizer.json'",
            [imported_id]).fetchone()[0]
    finally:
        connection.close()
    assert stages["train-tokenizer"] == imported_id and stages["evaluate"] == evaluated.artifact_id
    assert metric_count > 0 and source == 1


class NotATensor:
    """A pickled object of the test module: the weights-only unpickler must refuse to build it."""


def test_pytorch_model_bin_and_config_yaml_import_the_same_weights(tmp_path):
    store = Store(tmp_path / "store")
    folder = tmp_path / "bin"
    folder.mkdir()
    settings = json.loads((VQ / "config.json").read_text())
    (folder / "config.yaml").write_text(yaml.safe_dump(settings))
    torch.save(load_file(VQ / "model.safetensors"), folder / "pytorch_model.bin")
    from_bin = execute_stage("train-tokenizer", import_section(folder), {}, store).manifest
    from_safetensors = execute_stage("train-tokenizer", import_section(VQ), {}, store).manifest
    assert from_bin.artifact_id != from_safetensors.artifact_id  # tokenizer.json names other sources
    assert sha256_file(from_bin.path(store, EMA_WEIGHTS)) == sha256_file(from_safetensors.path(store, EMA_WEIGHTS))
    assert tokenizer_info(from_bin, store)["imported_from"]["settings"] == str(folder / "config.yaml")

    # A changed checkpoint file makes a new cache key (the stat fingerprint), not a stale hit.
    before = fingerprint(import_section(folder).import_titok)
    os.utime(folder / "pytorch_model.bin", ns=(1, 1))
    assert fingerprint(import_section(folder).import_titok) != before

    torch.save({"weights": NotATensor()}, folder / "pytorch_model.bin")
    with pytest.raises(TitokImportError, match=r"does not load with torch.load\(weights_only=True\)"):
        execute_stage("train-tokenizer", import_section(folder), {}, store)


def test_two_stage_checkpoint_is_refused_and_nothing_is_committed(tmp_path):
    store = Store(tmp_path / "store")
    folder = tmp_path / "two-stage"
    shutil.copytree(VQ, folder)
    settings = json.loads((folder / "config.json").read_text())
    settings["model"]["vq_model"]["finetune_decoder"] = True
    (folder / "config.json").write_text(json.dumps(settings))
    with pytest.raises(TitokImportError, match="two-stage TiTok checkpoint .* MaskGIT-VQGAN"):
        execute_stage("train-tokenizer", import_section(folder), {}, store, run_id="refused")
    assert not list((store.root / "artifacts").glob("train-tokenizer/*"))
    connection = lineage.connect(store)
    try:
        status, error = connection.execute("select status, error from stages where run_id = 'refused'").fetchone()
    finally:
        connection.close()
    assert status == "failed" and "two-stage" in error


def test_bad_import_settings_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="an imported TiTok takes no text"):
        load_config("smoke", [f"train_tokenizer.import_titok.path={VQ}", "train_tokenizer.use_text=true"])
    store = Store(tmp_path / "store")
    with pytest.raises(FileNotFoundError, match="import_titok.path: no such file or folder"):
        execute_stage("train-tokenizer", import_section(tmp_path / "nowhere"), {}, store)
    lonely = tmp_path / "lonely"
    lonely.mkdir()
    shutil.copy(VQ / "model.safetensors", lonely)
    with pytest.raises(FileNotFoundError, match="no config.json / config.yaml / config.yml beside"):
        execute_stage("train-tokenizer", import_section(lonely), {}, store)
    from flows.import_titok import parse_sizes
    assert parse_sizes(["tiny=64,2,2", "mid=128,4,4"]) == {"tiny": [64, 2, 2], "mid": [128, 4, 4]}
    with pytest.raises(ValueError, match="expected NAME=WIDTH,DEPTH,HEADS"):
        parse_sizes(["tiny=64,2"])


def test_imported_vae_pretokenizes_its_posterior_means(tmp_path):
    store = Store(tmp_path / "store")
    vae = REFERENCE / "titok-tiny-vae"
    config = load_config("smoke", [f"train_tokenizer.import_titok.path={vae}", TINY, "stages=[pretokenize]",
                                   "ingest.source.max_images=40", "pretokenize.decode_check_images=4",
                                   "runtime.device=cpu", "runtime.threads=1"])
    results = {}
    for name in stages_to_run(config):
        inputs = {up: results[up].manifest for up in get_stage(name).inputs(config)}
        results[name] = execute_stage(name, config.section(name), inputs, store, config.runtime)
    tokens = results["pretokenize"].manifest
    meta = json.loads(tokens.path(store, "tokens.json").read_text())
    assert (meta["discrete"], meta["seq_len"], meta["token_dim"], tokens.rows) == (False, 8, 8, 40)
    # float16 means decode back to the reconstructions of the exact means (pretokenize's own check).
    assert tokens.summary["decode_check_max_abs_diff"] < 0.02
    assert tokens.summary["decode_check_token_rel_diff"] < 2e-3
