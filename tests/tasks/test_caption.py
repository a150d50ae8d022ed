"""The caption stage's backend table, its `label`, `dataset` and `none` backends, its tables and caption pools."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter

import duckdb
import pyarrow.parquet as pq
import pytest

from tasks.caption.backends import BACKENDS, caption_id, open_backend
from tasks.caption.backends.label import check_templates, template_index
from tasks.caption.read import load_caption_pool, load_captions, load_failures
from tasks.caption.stage import run_caption
from tasks.config import CaptionConfig, RuntimeConfig
from tasks.stage import StageContext

from builders.ingest import ingest_artifact
from builders.store import commit_output
from helpers import REPO

CLASSES = ("t-shirt", "sneaker", "bag")


def run(tmp_path, store, manifest, **config):
    ctx = StageContext(
        stage="caption",
        config=CaptionConfig(**config),
        inputs={"ingest": manifest},
        store=store,
        runtime=RuntimeConfig(),
        cache_key="k" * 64,
        work_dir=tmp_path / "work",
    )
    output = run_caption(ctx)
    return output, commit_output(store, ctx, output)


def test_the_config_accepts_exactly_the_backend_table():
    # The table is the one list: every name in it loads, any other fails when the config loads.
    from tasks.config import ConfigError
    from tasks.presets import load_config

    for name in BACKENDS:
        assert load_config("smoke", [f"caption.backend={name}"]).caption.backend == name
    with pytest.raises(ConfigError, match=r"caption\.backend: unknown backend 'gemni'; known: \['dataset'"):
        load_config("smoke", ["caption.backend=gemni"])


def test_unknown_backend_names_the_known_ones():
    # Loading the config normally stops this earlier; a section built directly must not reach a
    # bare KeyError either.
    with pytest.raises(ValueError, match="caption.backend: unknown backend 'blip'") as error:
        open_backend(CaptionConfig(backend="blip"))
    assert all(name in str(error.value) for name in BACKENDS)


def test_the_gemini_client_is_imported_only_when_images_are_sent():
    # Runs of the other backends (and all-cached Gemini runs) must work without the SDK installed.
    script = (
        "import sys; import tasks.caption.stage, tasks.caption.backends; "
        "print(sorted(m for m in sys.modules if m.startswith(('google.genai', 'tasks.caption.backends.gemini.client'))))"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout


def test_label_backend_one_template_per_image(tmp_path, store):
    templates = ["a photo of a {label}", "a drawing of a {label}", "the {label} alone"]
    manifest = ingest_artifact(store, 40, CLASSES)
    output, artifact = run(tmp_path, store, manifest, backend="label", templates=templates)

    captions = load_captions(artifact, store)
    assert captions.num_rows == 40
    assert captions.column_names == ["image_id", "split", "label_id", "caption_id", "caption", "origin"]
    assert len(set(captions["image_id"].to_pylist())) == 40
    used = Counter()
    for row in captions.to_pylist():
        index = template_index(row["image_id"], len(templates))
        assert row["origin"] == f"label:{index}"
        assert row["caption"] == templates[index].format(label=CLASSES[row["label_id"]])
        assert row["caption_id"] == caption_id(row["caption"])
        used[index] += 1
    assert len(used) == 3  # 40 images spread over every template
    assert output.complete
    assert output.summary["captioned"] == 40 and output.summary["failed"] == 0 and output.summary["coverage"] == 1.0
    assert output.summary["requests"] == 0

    pool = load_caption_pool(artifact, store)
    assert sorted(pool) == [0, 1, 2]
    for label, entries in pool.items():
        assert [caption for _, caption in entries] == [t.format(label=CLASSES[label]) for t in templates]
        assert all(cid == caption_id(caption) for cid, caption in entries)


def test_label_backend_is_deterministic(tmp_path, store):
    manifest = ingest_artifact(store, 12, CLASSES)
    _, first = run(tmp_path / "a", store, manifest, backend="label")
    _, second = run(tmp_path / "b", store, manifest, backend="label")
    assert first.artifact_id == second.artifact_id


def test_label_backend_pool_lists_classes_without_images(tmp_path, store):
    # 2 images, 3 classes: the `classes` table still names class 2, and its pool must exist.
    manifest = ingest_artifact(store, 2, CLASSES)
    _, artifact = run(tmp_path, store, manifest, backend="label", templates=["a {label}"])
    assert load_caption_pool(artifact, store) == {
        label: [(caption_id(f"a {name}"), f"a {name}")] for label, name in enumerate(CLASSES)
    }


@pytest.mark.parametrize(
    "templates, message",
    [([], "empty"), (["a photo"], "{label}"), (["a {label} on {background}"], "background"), (["a {label"], "valid")],
)
def test_bad_templates_are_named(templates, message):
    with pytest.raises(ValueError, match="caption.templates") as error:
        check_templates(templates)
    assert message in str(error.value)


def test_dataset_backend_records_missing_source_captions(tmp_path, store):
    source = {i: f"  a   photo number {i}\n of a thing " for i in range(20) if i % 3 != 0}
    source[3] = "   "  # blank counts as missing
    manifest = ingest_artifact(store, 20, CLASSES, source_captions=source)
    output, artifact = run(tmp_path, store, manifest, backend="dataset", pool_per_class=1)

    captions = {r["image_id"]: r for r in load_captions(artifact, store).to_pylist()}
    expected = {f"img-{i:04d}" for i in range(20) if i % 3 != 0}
    assert set(captions) == expected
    assert captions["img-0001"]["caption"] == "a photo number 1 of a thing"
    assert {r["origin"] for r in captions.values()} == {"dataset"}

    failures = load_failures(artifact, store).to_pylist()
    assert sorted(f["image_id"] for f in failures) == sorted(f"img-{i:04d}" for i in range(20) if i % 3 == 0)
    assert {f["reason"] for f in failures} == {"no-source-caption"}
    assert output.summary["failed"] == 7 and output.summary["pending"] == 0
    assert output.summary["coverage"] == pytest.approx(13 / 20)
    assert not output.complete  # failures remain: the next run must compute again


def test_dataset_pool_holds_validation_captions_only(tmp_path, store):
    source = {i: f"caption {i}" for i in range(60)}
    manifest = ingest_artifact(store, 60, CLASSES, source_captions=source)
    _, artifact = run(tmp_path, store, manifest, backend="dataset", pool_per_class=3)

    pool = load_caption_pool(artifact, store)
    # Validation images are i % 4 == 0; class is i % 3 -> class 0: 0, 12, 24, ... (first three kept)
    assert pool == {
        0: [(caption_id(f"caption {i}"), f"caption {i}") for i in (0, 12, 24)],
        1: [(caption_id(f"caption {i}"), f"caption {i}") for i in (4, 16, 28)],
        2: [(caption_id(f"caption {i}"), f"caption {i}") for i in (8, 20, 32)],
    }
    table = pq.read_table(artifact.table_files(store, "caption_pool")[0])
    assert set(table["origin"].to_pylist()) == {"dataset"}
    assert table["label_name"].to_pylist()[:3] == ["t-shirt"] * 3


def test_none_backend_writes_empty_tables(tmp_path, store):
    manifest = ingest_artifact(store, 5, CLASSES)
    output, artifact = run(tmp_path, store, manifest, backend="none")
    assert output.complete and output.summary["captioned"] == 0 and output.summary["pending"] == 0
    assert load_captions(artifact, store).num_rows == 0
    assert load_caption_pool(artifact, store) == {}


def test_output_tables_are_readable_from_duckdb(tmp_path, store):
    manifest = ingest_artifact(store, 10, CLASSES)
    _, artifact = run(tmp_path, store, manifest, backend="label")
    for table, rows in (("captions", 10), ("failures", 0), ("caption_pool", 12)):
        glob = artifact.table_glob(store, table)
        assert duckdb.sql(f"select count(*) from '{glob}'").fetchall() == [(rows,)]


def test_ingest_without_required_columns_is_a_clear_error(tmp_path, store):
    manifest = ingest_artifact(store, 3, CLASSES)
    for path in manifest.table_files(store, "images"):
        pq.write_table(pq.read_table(path).drop_columns(["source_caption"]), path)
    with pytest.raises(ValueError, match="lacks columns.*source_caption"):
        run(tmp_path, store, manifest, backend="label")
