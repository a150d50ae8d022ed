"""The model card (README.md) of an exported tokenizer, built from DuckDB queries over the store's
lineage views (tasks/lineage.py): the data it was trained on, its config, the steps trained,
every metric with its protocol (N, implementation, reference, seed, spread) — its own and those
of the evaluate runs that decoded with it — and the ids that trace it back."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import ModelCardData

from tasks import lineage
from tasks.export.spec import TokenizerSpec, training_run
from tasks.store import Manifest, Store

METRIC_COLUMNS = ("stage", "artifact_id", "name", "value", "n", "implementation", "reference", "seed", "std",
                  "ci_low", "ci_high")


@dataclass
class CardFacts:
    """What the card states, each read from DuckDB (empty where lineage has no record)."""

    tokenizer_artifact: str
    stage_run: dict[str, Any] = field(default_factory=dict)  # the stage run that computed it
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> artifact id
    data_metrics: dict[str, float] = field(default_factory=dict)  # the ingest artifact's counts
    run_config: dict[str, Any] = field(default_factory=dict)  # the training run's resolved config
    steps: int | None = None
    final_losses: dict[str, float] = field(default_factory=dict)  # last logged value of each quantity
    metrics: list[dict[str, Any]] = field(default_factory=list)  # with protocol: own + downstream evaluate
    weights_sha256: str | None = None


def card_facts(manifest: Manifest, store: Store) -> CardFacts:
    """The facts of `manifest`'s card, one DuckDB query each."""
    facts = CardFacts(manifest.artifact_id)
    run = training_run(store, "train-tokenizer", manifest.artifact_id)
    facts.run_config = run["config"] if run else {}
    connection = lineage.connect(store)
    try:
        def rows(sql: str, *params: Any) -> list[dict[str, Any]]:
            cursor = connection.execute(sql, list(params))
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row)) for row in cursor.fetchall()]

        tid = manifest.artifact_id
        computed = rows("""select stage_run_id, run_id, code_version, git_revision, config_hash, started_at, ended_at, host
                           from stages where stage = 'train-tokenizer' and output_artifact = ? and status = 'completed'
                           order by cache_hit, event_time limit 1""", tid)
        facts.stage_run = {k: (str(v) if v is not None else None) for k, v in computed[0].items()} if computed else {}
        facts.inputs = {r["input_name"]: r["input_artifact"] for r in rows(
            "select distinct input_name, input_artifact from lineage where stage = 'train-tokenizer' and output_artifact = ?",
            tid)}
        if "ingest" in facts.inputs:
            facts.data_metrics = {r["name"]: r["value"] for r in rows(
                "select distinct name, value from metrics where stage = 'ingest' and artifact_id = ?", facts.inputs["ingest"])}
        steps = rows("select value from metrics where artifact_id = ? and name = 'steps' limit 1", tid)
        facts.steps = int(steps[0]["value"]) if steps else None
        facts.final_losses = {r["name"]: r["value"] for r in rows(
            """select name, arg_max(value, step) as value from (select distinct step, name, value from train_steps
               where stage = 'train-tokenizer' and artifact_id = ?) group by name order by name""", tid)}
        # Its own metrics, then those of every evaluate run that decoded with it (the same artifact
        # recorded twice, e.g. by a cached rerun, is one row).
        facts.metrics = rows(f"""
            select distinct {', '.join(METRIC_COLUMNS)} from metrics
            where n is not null and (artifact_id = ? or (stage = 'evaluate' and artifact_id in (
                select output_artifact from lineage where stage = 'evaluate' and input_name = 'train-tokenizer'
                and input_artifact = ?)))
            order by stage desc, artifact_id, name""", tid, tid)
        generators = rows("select distinct output_artifact, input_artifact from lineage where stage = 'evaluate' "
                          "and input_name = 'train-generator'")
        generator_of = {r["output_artifact"]: r["input_artifact"] for r in generators}
        for metric in facts.metrics:
            metric["generator"] = generator_of.get(metric["artifact_id"]) if metric["stage"] == "evaluate" else None
        weights = rows("select sha256 from artifacts where artifact_id = ? and file = 'tokenizer.safetensors' limit 1", tid)
        facts.weights_sha256 = weights[0]["sha256"] if weights else None
    finally:
        connection.close()
    return facts


def render_card(spec: TokenizerSpec, facts: CardFacts) -> str:
    """README.md: Hugging Face metadata (YAML front matter), then the facts in Markdown."""
    kind = "TexTok" if spec.text else "TiTok"
    bottleneck = (f"VQ, {spec.codebook_size} codes" if spec.discrete else f"KL, {spec.token_dim}-d continuous")
    size = spec.model.get("size")
    metadata = ModelCardData(library_name="tok1d", tags=["tok1d", "image-tokenizer", "1d-tokenizer", kind.lower(),
                                                         "pytorch_model_hub_mixin", "model_hub_mixin"])
    lines = [
        "---", metadata.to_yaml(), "---", "",
        f"# tok1d {kind}-{size} tokenizer {facts.tokenizer_artifact[:12]}", "",
        f"{spec.image_size}x{spec.image_size} RGB images -> {spec.seq_len} tokens ({bottleneck})"
        + (f", conditioned on captions embedded by `{spec.text.encoder}`" if spec.text else "") + ".",
        "Every statement below was generated from the tok1d store's lineage database (DuckDB).", "",
        "```python", "import tok1d", "",
        'tokenizer = tok1d.Tokenizer.from_pretrained("path/to/this/folder")  # or the hub repo id',
        "tokens = tokenizer.encode(images" + (", captions=captions)" if spec.text else ")")
        + "  # PIL images, uint8 arrays or float tensors, any size",
        "images = tokenizer.decode(tokens" + (", captions=captions)" if spec.text and spec.text.in_decoder else ")"),
        "```", "",
        "## Data", "",
    ]
    ingest = facts.run_config.get("ingest") or {}
    source = ingest.get("source") or {}
    data_id = facts.inputs.get("ingest") or spec.lineage.get("ingest_artifact")
    if data_id:
        counts = ", ".join(f"{name} {_number(facts.data_metrics[name])}" for name in ("images", "train", "val", "classes",
                                                                                       "rejected") if name in facts.data_metrics)
        lines.append(f"- images: ingest artifact `{data_id}`" + (f" ({counts})" if counts else ""))
        if source:
            where = source.get("path") or source.get("hf_name")
            lines.append(f"- source: {source.get('kind')}" + (f" `{where}`" if where else "")
                         + (f", first {source['max_images']} images" if source.get("max_images") else ""))
    if spec.lineage.get("imported_from"):
        lines.append(f"- imported, not trained here: `{json.dumps(spec.lineage['imported_from'], sort_keys=True)}`")
    lines.append(f"- preprocessing: RGB, {spec.preprocessing.fit} to square, LANCZOS to {spec.preprocessing.resolution} px, "
                 f"values in [0, 1] (fit from {spec.preprocessing.fit_from})")
    if spec.text:
        text = spec.text
        caption = (facts.run_config.get("caption") or {}).get("backend")
        lines.append(f"- captions: caption artifact `{facts.inputs.get('caption') or spec.lineage.get('caption_artifact')}`"
                     + (f" (caption.backend={caption})" if caption else ""))
        lines.append(f"- text encoder: `{text.encoder}` ({text.backend}, model `{text.model}`), {text.max_tokens} tokens of "
                     f"{text.dim} dims stored as {text.dtype}, embed-text artifact "
                     f"`{facts.inputs.get('embed-text') or spec.lineage.get('embed_text_artifact')}`; in the encoder: "
                     f"{text.in_encoder}, in the decoder: {text.in_decoder}")
    lines += ["", "## Training", ""]
    lines.append(f"- steps: {facts.steps if facts.steps is not None else spec.lineage.get('steps')}")
    if facts.final_losses:
        lines.append("- last logged: " + ", ".join(f"{name} {_number(value)}" for name, value in facts.final_losses.items()))
    section = facts.run_config.get("train_tokenizer")
    lines += ["", "Model (config.json `model`):", "", "```json", json.dumps(spec.model, indent=1, sort_keys=True), "```"]
    if section:
        lines += ["", "train_tokenizer section of the run's config:", "", "```json",
                  json.dumps({k: section[k] for k in sorted(section) if k != "import_titok" or spec.lineage.get("imported_from")},
                             indent=1, sort_keys=True), "```"]
    lines += ["", "## Metrics", ""]
    if facts.metrics:
        lines += ["| stage | artifact | generator | metric | value | N | implementation | reference | seed | std | 95% CI |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for m in facts.metrics:
            ci = f"[{_number(m['ci_low'])}, {_number(m['ci_high'])}]" if m["ci_low"] is not None else ""
            cells = [m["stage"], f"`{m['artifact_id'][:12]}`", f"`{m['generator'][:12]}`" if m["generator"] else "",
                     m["name"], _number(m["value"]), str(m["n"]), m["implementation"] or "", m["reference"] or "",
                     "" if m["seed"] is None else str(m["seed"]), _number(m["std"]), ci]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    else:
        lines.append("No metric with a recorded protocol.")
    lines += ["", "## Lineage", "", "| what | id |", "|---|---|", f"| train-tokenizer artifact | `{facts.tokenizer_artifact}` |"]
    for name, artifact in sorted(facts.inputs.items()):
        lines.append(f"| {name} artifact | `{artifact}` |")
    for key in ("run_id", "stage_run_id", "git_revision", "code_version", "config_hash", "started_at", "ended_at"):
        if facts.stage_run.get(key):
            lines.append(f"| {key.replace('_', ' ')} | `{facts.stage_run[key]}` |")
    if facts.weights_sha256:
        lines.append(f"| sha256 of the weights (tokenizer.safetensors = model.safetensors) | `{facts.weights_sha256}` |")
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    if value is None:
        return ""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:.6g}"
