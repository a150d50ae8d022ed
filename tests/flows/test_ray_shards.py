"""Sharded fan-out on a real local Ray (prefect-ray's RayTaskRunner) from a real Prefect flow: the
pretokenize, ingest and evaluate artifacts (ids and every file's sha256) are the same in-process
and on Ray with 1 or 2 workers, and a killed (or partly lost) fan-out resumes on Ray computing
only the missing shards; embed-text's artifact is the same in-process and on Ray, and its missing
parts come back from the cache; shard tasks get the CPUs and GPUs their stage asks for."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from prefect import flow  # noqa: E402

from builders.caption import caption_artifact  # noqa: E402
from builders.evaluate import maskgit_inputs  # noqa: E402
from builders.ingest import ingest_artifact  # noqa: E402
from builders.ingest_run import artifact_bytes  # noqa: E402
from builders.processes import kill_when_ready  # noqa: E402
from builders.tokenizer import random_tokenizer  # noqa: E402
from flows.fanout import PrefectFanOut, ray_options  # noqa: E402
from flows.stage_task import run_stage_in_flow  # noqa: E402
from models.tokenizer_config import TokenizerConfig  # noqa: E402
from tasks.config import (  # noqa: E402
    EmbedTextConfig,
    EvaluateConfig,
    IngestConfig,
    PretokenizeConfig,
    RuntimeConfig,
    SamplingConfig,
    SourceConfig,
)
from tasks.embed_text.stage import run_embed_text  # noqa: E402
from tasks.evaluate.compute import run_evaluate  # noqa: E402
from tasks.ingest.stage import run_ingest  # noqa: E402
from tasks.pretokenize.compute import run_pretokenize  # noqa: E402
from tasks.shards import ShardNeeds, attached_fanout  # noqa: E402
from tasks.stage import StageContext  # noqa: E402
from tasks.store import Manifest, Store  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
IMAGES = 40  # two ingest files of 20 rows; parts of 7 rows: 3 shards each
CONFIG = PretokenizeConfig(batch_size=4, shard_rows=7, decode_check_images=4)
SHARDS = [f"part-0000{f}-000{k}.parquet" for f in range(2) for k in range(3)]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module (its start is the slow part): 2 CPUs on 127.0.0.1."""
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def seed_store(tmp_path_factory):
    """A store with an ingest of 8x8 colour squares and an untrained nano VQ tokenizer."""
    store = Store(tmp_path_factory.mktemp("ray-shards") / "store")
    ingest = ingest_artifact(store, IMAGES, shards=2)
    config = TokenizerConfig(image_size=8, patch_size=4, size="nano", num_latent_tokens=8, codebook_size=32, token_dim=4)
    tokenizer, _ = random_tokenizer(store, config, ingest_artifact=ingest.artifact_id)
    return store, {"ingest": ingest, "train-tokenizer": tokenizer}


@flow(name="ray-shards-test")
def pretokenize_flow(store_root: str, inputs: dict[str, Manifest], runtime: RuntimeConfig) -> Manifest:
    return run_stage_in_flow("pretokenize", CONFIG, inputs, Store(store_root), runtime, None).manifest


def sha256s(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*.parquet"))}


def test_artifact_is_the_same_in_process_and_on_ray_with_1_or_2_workers(tmp_path, seed_store, ray_cluster):
    store, inputs = seed_store
    artifacts, flow_runs = {}, {}
    for label, runtime in [
        ("in-process", RuntimeConfig(device="cpu")),
        ("ray-1", RuntimeConfig(device="cpu", task_runner="ray", ray_workers=1)),
        ("ray-2", RuntimeConfig(device="cpu", task_runner="ray", ray_workers=2)),
    ]:
        root = tmp_path / label
        shutil.copytree(store.root, root)  # the same inputs, no cache hit from the run before
        state = pretokenize_flow(str(root), inputs, runtime, return_state=True)
        manifest = state.result()
        flow_runs[label] = state.state_details.flow_run_id
        assert manifest.summary["shards"] == 6 and manifest.summary["shards_computed_this_run"] == 6, label
        assert manifest.rows == IMAGES
        artifacts[label] = (manifest.artifact_id, {f.path: f.sha256 for f in manifest.files})
    assert sorted(p for p in artifacts["in-process"][1] if p.startswith("tokens/")) == [f"tokens/{s}" for s in SHARDS]
    assert artifacts["ray-1"] == artifacts["in-process"]
    assert artifacts["ray-2"] == artifacts["in-process"]
    # The Ray workers' own tok1d lines are in the flow run's logs, under each shard's task run.
    logs = run_async(tok1d_logs, flow_runs["ray-2"])
    computed = sorted(message for message, task_run in logs if "computed shard" in message and task_run)
    rows = [7, 7, 6]  # each ingest file's 20 rows in parts of 7
    assert computed == [f"pretokenize: computed shard part-0000{f}-000{k} ({rows[k]} images)"
                        for f in range(2) for k in range(3)], logs


async def tok1d_logs(flow_run_id) -> list[tuple[str, object]]:
    """(message, task run id) of every "tok1d" line of the flow run in the API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async with get_client() as client:
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    return [(log.message, log.task_run_id) for log in logs if log.name == "tok1d"]


def run_async(fn, *args):
    import asyncio

    return asyncio.run(fn(*args))


KILL_SCRIPT = """
import sys, time, torch
torch.set_num_threads(1)
from pathlib import Path
import tasks.pretokenize.compute as stage
from tasks.config import PretokenizeConfig, RuntimeConfig
from tasks.stage import StageContext
from tasks.store import Manifest, Store

encode = stage.Encoder.encode
def slow_encode(self, images, image_ids):  # slow batches leave time to kill mid-fan-out
    time.sleep(0.5)
    return encode(self, images, image_ids)
stage.Encoder.encode = slow_encode
store_root, inputs, work, config = sys.argv[1:]
inputs = {k: Manifest.model_validate_json(v) for k, v in __import__("json").loads(inputs).items()}
ctx = StageContext("pretokenize", PretokenizeConfig.model_validate_json(config), inputs, Store(store_root),
                   RuntimeConfig(device="cpu"), "k" * 64, Path(work))
stage.run_pretokenize(ctx)
"""


@flow(name="ray-shards-resume-test")
def resume_flow(store_root: str, inputs: dict[str, Manifest], runtime: RuntimeConfig, work: str) -> dict:
    """run_pretokenize in a Prefect flow with the fan-out flows/ attaches to stage tasks."""
    ctx = StageContext("pretokenize", CONFIG, inputs, Store(store_root), runtime, "k" * 64, Path(work))
    with attached_fanout(PrefectFanOut()):
        return run_pretokenize(ctx).summary


def test_killed_fan_out_resumes_on_ray_with_only_the_missing_shards(tmp_path, seed_store, ray_cluster):
    store, inputs = seed_store
    work = tmp_path / "killed"
    parts = work / "output" / "tokens"
    args = [str(store.root), json.dumps({k: m.model_dump_json() for k, m in inputs.items()}), str(work),
            CONFIG.model_dump_json()]
    kill_when_ready(tmp_path, KILL_SCRIPT, args, lambda: len(list(parts.glob("part-*.parquet"))) >= 2,
                    "2 token parts", timeout_s=120)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in parts.glob("part-*.parquet")}
    assert 2 <= len(before) < 6, sorted(before)

    runtime = RuntimeConfig(device="cpu", task_runner="ray", ray_workers=2)
    summary = resume_flow(str(store.root), inputs, runtime, str(work))
    assert summary["shards_computed_this_run"] == 6 - len(before)  # finished shards were not computed again
    assert summary["rows"] == IMAGES
    for name, stat in before.items():  # and their files were left as they were
        assert ((parts / name).stat().st_ino, (parts / name).stat().st_mtime_ns) == stat, name

    straight = StageContext("pretokenize", CONFIG, inputs, store, RuntimeConfig(device="cpu"), "k" * 64, tmp_path / "straight")
    run_pretokenize(straight)
    assert sha256s(parts) == sha256s(straight.output_dir / "tokens") and sorted(sha256s(parts)) == SHARDS


EMBED = EmbedTextConfig(max_tokens=6, batch_size=2, shard_rows=3)
CAPTIONS = [f"a {colour} {thing}" for colour in ("red", "grey", "small", "striped") for thing in ("bag", "sneaker", "shirt")]


@flow(name="ray-shards-embed-test")
def embed_flow(store_root: str, inputs: dict[str, Manifest], runtime: RuntimeConfig) -> Manifest:
    return run_stage_in_flow("embed-text", EMBED, inputs, Store(store_root), runtime, None).manifest


@flow(name="ray-shards-embed-resume-test")
def embed_resume_flow(store_root: str, inputs: dict[str, Manifest], runtime: RuntimeConfig, work: str) -> dict:
    ctx = StageContext("embed-text", EMBED, inputs, Store(store_root), runtime, "k" * 64, Path(work))
    with attached_fanout(PrefectFanOut()):
        return run_embed_text(ctx).summary


def test_embed_text_is_the_same_in_process_and_on_ray_and_resumes_from_the_cache(tmp_path, ray_cluster):
    seed = Store(tmp_path / "seed")
    inputs = {"caption": caption_artifact(seed, CAPTIONS, {0: ["a bag"]}, labels=[i % 3 for i in range(len(CAPTIONS))])}
    artifacts = {}
    for label, runtime in [("in-process", RuntimeConfig(device="cpu")),
                           ("ray-2", RuntimeConfig(device="cpu", task_runner="ray", ray_workers=2))]:
        shutil.copytree(seed.root, tmp_path / label)  # an empty embedding cache each time
        manifest = embed_flow(str(tmp_path / label), inputs, runtime)
        assert (manifest.summary["shards"], manifest.summary["embedded_new"]) == (5, 13), label
        artifacts[label] = (manifest.artifact_id, {f.path: f.sha256 for f in manifest.files})
    assert artifacts["ray-2"] == artifacts["in-process"]

    # Two parts of a run lost (as by a kill after their captions reached the cache): a rerun on
    # Ray computes those two shards only, from the cache, and ends with the same files.
    store = Store(tmp_path / "in-process")
    work = tmp_path / "resumed"
    ctx = StageContext("embed-text", EMBED, inputs, store, RuntimeConfig(device="cpu"), "k" * 64, work)
    assert run_embed_text(ctx).summary["embedded_new"] == 0
    parts = work / "output" / "embeddings"
    reference = sha256s(parts)
    for name in ("part-00001.parquet", "part-00004.parquet"):
        (parts / name).unlink()
    runtime = RuntimeConfig(device="cpu", task_runner="ray", ray_workers=2)
    summary = embed_resume_flow(str(store.root), inputs, runtime, str(work))
    assert (summary["shards_computed_this_run"], summary["embedded_new"], summary["captions"]) == (2, 0, 13)
    assert sha256s(parts) == reference


# ---- evaluate: 6 samples in shards of 2


@flow(name="ray-shards-stage-test")
def stage_flow(stage: str, store_root: str, config, inputs: dict[str, Manifest], runtime: RuntimeConfig,
               work: str) -> dict:
    """The stage's run function on a given work dir, with the fan-out flows/ attaches to stage tasks."""
    run = {"ingest": run_ingest, "evaluate": run_evaluate}[stage]
    with attached_fanout(PrefectFanOut()):
        return run(StageContext(stage, config, inputs, Store(store_root), runtime, "k" * 64, Path(work))).summary


EVALUATE = EvaluateConfig(num_samples=6, batch_size=2, shard_rows=2, reference_images=6, grid_images=6,
                          sampling=SamplingConfig(steps=2))


def test_evaluate_is_the_same_in_process_and_on_ray_and_resumes_with_the_missing_shards(tmp_path, ray_cluster):
    store = Store(tmp_path / "store")
    inputs = maskgit_inputs(store, tmp_path / "generator")
    cpu = RuntimeConfig(device="cpu")
    results = {}
    for label, runtime in [("in-process", cpu),
                           ("ray-1", RuntimeConfig(device="cpu", task_runner="ray", ray_workers=1))]:
        summary = stage_flow("evaluate", str(store.root), EVALUATE, inputs, runtime, str(tmp_path / label))
        assert (summary["shards"], summary["shards_computed_this_run"]) == (3, 3), label
        results[label] = (sha256s_of(tmp_path / label / "output"), metrics(summary))
    assert results["ray-1"] == results["in-process"]
    assert sorted(results["in-process"][0]) == ["samples.png"] + [f"samples/part-0000{k}.parquet" for k in range(3)]

    # Shards 1 and 2 lost (the samples part of one, both files of the other): only they run again.
    work = tmp_path / "resumed"
    shutil.copytree(tmp_path / "in-process", work)
    (work / "output" / "samples" / "part-00001.parquet").unlink()
    (work / "output" / "samples" / "part-00002.parquet").unlink()
    (work / "features" / "part-00002.npz").unlink()
    kept = (work / "output" / "samples" / "part-00000.parquet").stat()
    runtime = RuntimeConfig(device="cpu", task_runner="ray", ray_workers=2)
    summary = stage_flow("evaluate", str(store.root), EVALUATE, inputs, runtime, str(work))
    assert summary["shards_computed_this_run"] == 2
    after = (work / "output" / "samples" / "part-00000.parquet").stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    assert (sha256s_of(work / "output"), metrics(summary)) == results["in-process"]


# ---- ingest: a folder whose last shard repeats an image of the first (shard_rows=5: 3 shards)


@pytest.fixture
def animals(tmp_path) -> Path:
    root = tmp_path / "animals"
    for name, seeds in (("cat", range(6)), ("dog", range(6, 11))):
        (root / name).mkdir(parents=True)
        for seed in seeds:
            pixels = np.random.default_rng(seed).integers(0, 256, (12, 10, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{seed:02d}.png")
    (root / "dog" / "98_copy.png").write_bytes((root / "cat" / "00.png").read_bytes())
    (root / "dog" / "99_empty.png").write_bytes(b"")
    return root


def ingest_config(root: Path) -> IngestConfig:
    return IngestConfig(source=SourceConfig(kind="folder", path=str(root)), resolution=8, shard_rows=5)


@flow(name="ray-shards-ingest-test")
def ingest_flow(store_root: str, config: IngestConfig, runtime: RuntimeConfig) -> Manifest:
    return run_stage_in_flow("ingest", config, {}, Store(store_root), runtime, None).manifest


def test_ingest_is_the_same_in_process_and_on_ray_and_resumes_with_the_missing_shards(tmp_path, animals, ray_cluster):
    config = ingest_config(animals)
    artifacts = {}

    def ingest_on(label: str, runtime: RuntimeConfig) -> None:
        manifest = ingest_flow(str(tmp_path / label), config, runtime)
        assert (manifest.summary["shards"], manifest.summary["shards_computed_this_run"]) == (3, 3), label
        assert (manifest.summary["images"], manifest.summary["rejected_duplicate"]) == (11, 1), label
        artifacts[label] = (manifest.artifact_id, {f.path: f.sha256 for f in manifest.files})

    ingest_on("in-process", RuntimeConfig())
    ingest_on("ray-2", RuntimeConfig(task_runner="ray", ray_workers=2))
    assert artifacts["ray-2"] == artifacts["in-process"]

    # Shards 1 and 2 lost (shard 2 holds the copy of shard 0's image): a rerun on Ray computes
    # those two only, judges the copy against the shard it kept, and ends with the same files.
    work = tmp_path / "resumed"
    clean = run_ingest(StageContext("ingest", config, {}, Store(tmp_path / "s"), RuntimeConfig(), "k" * 64, work))
    assert clean.summary["shards_computed_this_run"] == 3
    output = work / "output"
    reference = artifact_bytes(output)
    for table in ("images", "rejects"):
        for index in (1, 2):
            (output / table / f"part-0000{index}.parquet").unlink()
    kept = (output / "images" / "part-00000.parquet").stat()
    runtime = RuntimeConfig(task_runner="ray", ray_workers=2)
    summary = stage_flow("ingest", str(tmp_path / "s"), config, {}, runtime, str(work))
    assert (summary["shards_computed_this_run"], summary["rejected_duplicate"]) == (2, 1)
    after = (output / "images" / "part-00000.parquet").stat()
    assert (after.st_ino, after.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
    assert artifact_bytes(output) == reference

    # One shard at a time, with two worker processes per shard task (it asks Ray for 2 CPUs and
    # runs its own pool). Last: after 2-CPU tasks Ray starts new workers for 1-CPU ones (seconds).
    ingest_on("ray-1", RuntimeConfig(task_runner="ray", ray_workers=1, threads=2))
    assert artifacts["ray-1"] == artifacts["in-process"]


def sha256s_of(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def metrics(summary: dict) -> dict:
    """The summary without what depends on the run rather than the artifact."""
    return {k: v for k, v in summary.items() if k not in ("samples_per_second", "shards_computed_this_run")}


# ---- what a shard task asks Ray for


def test_remote_options_follow_the_device_and_the_stage_needs():
    no_gpu, two_gpus = {"CPU": 8.0}, {"CPU": 8.0, "GPU": 2.0}
    cuda = RuntimeConfig(device="cuda", task_runner="ray")
    device_bound, ingest_like = ShardNeeds(), ShardNeeds(cpus=3, device=False)
    assert ray_options(cuda, device_bound, two_gpus) == {"num_cpus": 1, "num_gpus": 1.0}
    # Asked for even where Ray shows no GPU yet (an autoscaling cluster adds them).
    assert ray_options(cuda, device_bound, no_gpu) == {"num_cpus": 1, "num_gpus": 1.0}
    halves = RuntimeConfig(device="cuda", task_runner="ray", ray_gpus_per_shard=0.5)
    assert ray_options(halves, device_bound, two_gpus) == {"num_cpus": 1, "num_gpus": 0.5}
    assert ray_options(cuda, ingest_like, two_gpus) == {"num_cpus": 3}  # ingest never asks for a GPU
    auto = RuntimeConfig(device="auto", task_runner="ray")
    assert ray_options(auto, device_bound, two_gpus) == {"num_cpus": 1, "num_gpus": 1.0}
    assert ray_options(auto, device_bound, no_gpu) == {"num_cpus": 1}
    assert ray_options(RuntimeConfig(device="cpu", task_runner="ray"), device_bound, two_gpus) == {"num_cpus": 1}


@flow(name="ray-shards-resources-test")
def resources_flow(needs: ShardNeeds, runtime: RuntimeConfig) -> list[dict]:
    def assigned(shard):  # defined here: pickled by value for the Ray worker
        import ray as worker_ray

        return {name: value for name, value in worker_ray.get_runtime_context().get_assigned_resources().items()
                if name in ("CPU", "GPU")}

    from tasks.shards import plan_range_shards

    shards = plan_range_shards(2, 1, "evaluate.shard_rows")
    return list(PrefectFanOut().map("resources", assigned, shards, runtime, needs))


def test_shard_tasks_get_what_the_stage_asks_ray_for(ray_cluster):
    runtime = RuntimeConfig(device="cpu", task_runner="ray")
    assert resources_flow(ShardNeeds(cpus=2, device=False), runtime) == [{"CPU": 2.0}] * 2
    # A GPU per shard on this Ray of 2 CPUs and no GPU: a clear error, not tasks waiting forever.
    with pytest.raises(RuntimeError, match="ask Ray for 1 GPU per shard, the cluster has 0"):
        resources_flow(ShardNeeds(), RuntimeConfig(device="cuda", task_runner="ray"))
    with pytest.raises(RuntimeError, match="3 CPU per shard, the cluster has 2"):
        resources_flow(ShardNeeds(cpus=3, device=False), runtime)
