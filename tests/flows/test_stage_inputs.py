"""What a stage reads depends on its config: a text-free tokenizer reads no captions."""

from __future__ import annotations

from flows.run_plan import stages_to_run
from tasks.presets import load_config
from tasks.registry import get_stage
from tasks.runner import StageResult, execute_stage, plan_stage_run
from tasks.store import Store

TINY = ["ingest.source.max_images=120", "train_tokenizer.train.steps=3", "train_tokenizer.train.checkpoint_every=3",
        "train_tokenizer.eval_images=16", "runtime.threads=1"]
TEMPLATE = "caption.templates=['a drawing of a {label}']"


def run_until(config, store: Store, until: str) -> dict[str, StageResult]:
    """The pipeline's stage loop (flows/pipeline.py) through the plain runner, without Prefect."""
    results: dict[str, StageResult] = {}
    for name in stages_to_run(config, until):
        inputs = {upstream: results[upstream].manifest for upstream in get_stage(name).inputs(config)}
        results[name] = execute_stage(name, config.section(name), inputs, store, config.runtime)
    return results


def test_text_free_tokenizer_stays_cached_when_captions_change(tmp_path):
    store = Store(tmp_path / "store")
    config = load_config("smoke", [*TINY, "train_tokenizer.use_text=false"])
    assert stages_to_run(config, "train-tokenizer") == ["ingest", "train-tokenizer"]
    first = run_until(config, store, "train-tokenizer")
    assert not first["train-tokenizer"].cache_hit

    edited = load_config("smoke", [*TINY, "train_tokenizer.use_text=false", TEMPLATE])
    again = run_until(edited, store, "train-tokenizer")
    assert again["train-tokenizer"].cache_hit
    assert again["train-tokenizer"].manifest == first["train-tokenizer"].manifest


def test_textok_reads_the_captions_so_a_template_edit_retrains_it(tmp_path):
    store = Store(tmp_path / "store")
    keys = []
    for extra in ([], [TEMPLATE]):
        config = load_config("smoke-textok", [*TINY, *extra])
        assert stages_to_run(config, "train-tokenizer") == ["ingest", "caption", "embed-text", "train-tokenizer"]
        upstream = run_until(config, store, "embed-text")
        inputs = {name: upstream[name].manifest for name in get_stage("train-tokenizer").inputs(config)}
        keys.append(plan_stage_run("train-tokenizer", config.train_tokenizer, inputs, store).slot.key)
    assert keys[0] != keys[1]


def test_a_preset_without_text_runs_no_text_stage():
    config = load_config("smoke", ["train_tokenizer.use_text=false", "stages=[ingest,train-tokenizer,pretokenize,"
                                                                       "train-generator,evaluate]"])
    assert "caption" not in stages_to_run(config) and "embed-text" not in stages_to_run(config)
    text_generator = load_config("smoke-textok", ["train_tokenizer.use_text=false", "train_generator.conditioning=text"])
    assert {"caption", "embed-text"} <= set(stages_to_run(text_generator))
