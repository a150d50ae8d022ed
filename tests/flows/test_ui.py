"""What the Prefect UI is given, without a server: summary rows with units and N, pictures sized
for an artifact, run names, and the log handler's run for lines from other threads. The server
side (a deployment run's page) is tests/flows/test_deployment_retry.py."""

from __future__ import annotations

import base64
import io
import logging
import re
import threading
import uuid

import numpy as np
from PIL import Image

from flows.full_pipeline import MAX_RUN_NAME, run_name
from flows.run_logs import FlowRunLogHandler
from flows.sweep import sweep_name
from flows.ui import MAX_IMAGE_BYTES, MAX_SIDE, MIN_SIDE, display_png, images_markdown, run_metrics_table
from tasks.measurement import Measurement, measurements
from tasks.store import FileRecord, Manifest, Store
from tasks.summary_table import COLUMNS, format_spread, headline, summary_rows


def test_summary_rows_round_with_units_and_carry_n_and_protocol():
    summary = {
        "images": 5400, "parameters": 51_750_000, "final_l2": 0.0123456789, "psnr": 21.2131, "psnr_low": 21.02,
        "psnr_high": 21.39, "gkid": 0.0123, "gkid_std": 0.0004, "codebook_usage": 0.5, "images_per_s": 1908.36166,
        "discrete": True, "source": "x" * 300, "nothing": None,
        "measurements": measurements(
            psnr=Measurement(21.2131, n=587, implementation="tok1d psnr", reference="ingest/abc val split", seed=0,
                             low=21.02, high=21.39),
            gkid=Measurement(0.0123, n=500, implementation="default_1.pt / unbiased KID", std=0.0004)),
    }
    rows = summary_rows(summary)
    assert all(tuple(row) == COLUMNS for row in rows)
    by_name = {row["metric"]: row for row in rows}
    # Measured metrics first, with their spread, N and protocol; their bare spread keys folded in.
    assert [row["metric"] for row in rows[:2]] == ["psnr", "gkid"]
    assert by_name["psnr"] == {"metric": "psnr", "value": "21.21 dB [21.02, 21.39] (95%)", "N": "587",
                               "protocol": "tok1d psnr; vs ingest/abc val split; seed 0"}
    assert by_name["gkid"]["value"] == "0.0123 ± 0.0004 (std)" and by_name["gkid"]["N"] == "500"
    assert not {"psnr_low", "psnr_high", "gkid_std", "measurements"} & set(by_name)
    assert by_name["images"]["value"] == "5,400" and by_name["parameters"]["value"] == "51,750,000"
    assert by_name["final_l2"]["value"] == "0.01235" and by_name["codebook_usage"]["value"] == "50 %"
    assert by_name["images_per_s"]["value"] == "1908 images/s" and by_name["discrete"]["value"] == "yes"
    assert len(by_name["source"]["value"]) == 120 and by_name["nothing"]["value"] == "-"
    assert headline(summary) == "psnr 21.21 dB [21.02, 21.39] (95%) N=587, gkid 0.0123 ± 0.0004 (std) N=500"
    assert headline({"images": 3}) == ""


def _png(path, size, mode="RGB", noise=False):
    rng = np.random.default_rng(0)
    channels = len(mode)
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8) if noise else \
        np.full((size[1], size[0], channels), 90, np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path)
    return path


def test_pictures_are_enlarged_when_tiny_and_shrunk_to_the_size_limits(tmp_path):
    tiny = Image.open(io.BytesIO(display_png(_png(tmp_path / "grid.png", (38, 30)))))
    assert tiny.size == (38 * 7, 30 * 7) and max(tiny.size) >= MIN_SIDE  # a whole factor: pixels stay square
    wide = Image.open(io.BytesIO(display_png(_png(tmp_path / "plot.png", (1200, 600), "RGBA"))))
    assert wide.size == (MAX_SIDE, MAX_SIDE // 2) and wide.mode == "RGBA"
    noisy = display_png(_png(tmp_path / "noise.png", (1000, 1000), noise=True))  # 3 MB raw, incompressible
    assert len(noisy) <= MAX_IMAGE_BYTES and max(Image.open(io.BytesIO(noisy)).size) < 1000


def test_images_markdown_embeds_each_png_of_the_artifact(tmp_path):
    store = Store(tmp_path / "store")
    folder = store.root / "artifacts" / "evaluate" / "abc"
    folder.mkdir(parents=True)
    _png(folder / "samples.png", (20, 20))
    files = [FileRecord(path=name, sha256="0" * 64, bytes=1) for name in ("samples.png", "samples/part-0.parquet")]
    manifest = Manifest(stage="evaluate", artifact_id="abc", root="artifacts/evaluate/abc", files=files, rows=1,
                        config_hash="c", cache_key="k", code_version="v", created_at="t")
    markdown = images_markdown("evaluate", store, manifest)
    [encoded] = re.findall(r"!\[evaluate samples\.png\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert Image.open(io.BytesIO(base64.b64decode(encoded))).size == (260, 260)
    assert str(folder / "samples.png") in markdown
    assert images_markdown("evaluate", store, manifest.model_copy(update={"files": files[1:]})) is None


def test_run_names_say_what_was_overridden():
    assert run_name("smoke", None) == "smoke"
    assert run_name("smoke", ["train_tokenizer.use_text=true"]) == "smoke +train_tokenizer.use_text=true"
    long = run_name("default", [f"key{i}.value={i}" for i in range(100)])
    assert len(long) == MAX_RUN_NAME and long.startswith("default +key0.value=0 +key1.value=1") and long.endswith("…")
    sweep = {"presets": ["smoke-textok", "smoke"], "token_counts": [16, 32], "text": [True, False], "seeds": [0, 1],
             "axes": {"ingest.shard_rows": ["64"]}, "overrides": ["train_tokenizer.train.steps=7"],
             "until": "train-tokenizer", "part": [1, 2]}
    assert sweep_name(sweep) == ("smoke-textok,smoke tokens=16,32 text=on,off ingest.shard_rows=64 seeds=0,1 "
                                 "until=train-tokenizer part=1/2 +train_tokenizer.train.steps=7")
    assert sweep_name({"presets": ["smoke"], "token_counts": None, "text": None, "seeds": None}) == "smoke"


def test_the_run_metrics_table_rounds_with_the_units_of_the_stage_summaries():
    rows = [("train-tokenizer", "psnr", 21.2131, 587, None, 21.02, 21.39),
            ("evaluate", "gfid", 41.23456, 500, 1.2345, None, None),
            ("train-tokenizer", "codebook_usage", 0.5, 4096, None, 0.45, 0.55),
            ("train-tokenizer", "psnr", 20.5, None, 0.125, None, None)]
    assert run_metrics_table(rows) == [
        {"stage": "train-tokenizer", "metric": "psnr", "value": "21.21 dB", "spread": "[21.02, 21.39] (95%)", "N": "587"},
        {"stage": "evaluate", "metric": "gfid", "value": "41.23", "spread": "± 1.234 (std)", "N": "500"},
        # A fraction shows as a percentage, its interval on the same scale.
        {"stage": "train-tokenizer", "metric": "codebook_usage", "value": "50 %", "spread": "[45, 55] (95%)", "N": "4,096"},
        {"stage": "train-tokenizer", "metric": "psnr", "value": "20.5 dB", "spread": "± 0.125 dB (std)", "N": "?"}]
    assert format_spread(None, None, None) == "" and format_spread(None, 1.0, None) == ""


def test_a_line_from_a_thread_without_a_prefect_context_goes_to_the_flow_run():
    flow_run_id = uuid.uuid4()
    handler = FlowRunLogHandler(flow_run_id)
    prepared = {}

    def log_from_thread():
        record = logging.LogRecord("tok1d", logging.INFO, __file__, 1, "ingest: %d images", (48,), None)
        prepared["log"] = handler.prepare(record)
        prepared["record"] = record

    thread = threading.Thread(target=log_from_thread)
    thread.start()
    thread.join()
    log = prepared["log"]
    assert log["flow_run_id"] == str(flow_run_id) and log["task_run_id"] is None
    assert log["message"] == "ingest: 48 images" and log["name"] == "tok1d" and log["level"] == logging.INFO
    assert not hasattr(prepared["record"], "flow_run_id")  # the terminal's handlers get the record unchanged
