"""What the `pretokenize` stage computes: every ingested image -> its 1D tokens under the trained
(EMA) tokenizer. Declared, without torch, in tasks/pretokenize/stage.py.

Output table `tokens` (`tokens/part-SSSSS-KKKK.parquet`): image_id, split, label_id, caption_id,
tokens. Discrete tokenizers store ids as list<uint16> (N per image), continuous ones the KL
mean as list<list<halffloat>> ([N][D]). Part KKKK of shard SSSSS holds ingest rows
[K * shard_rows, (K + 1) * shard_rows) of ingest shard SSSSS (tasks/shards.py): memory stays
flat in the dataset size, each part is one shard of the fan-out (in this process, or one Prefect
task per part on Ray with `runtime.task_runner: ray`), written atomically, and a rerun after a
kill computes only the missing parts. The parts' bytes do not depend on where they ran.

A decode-back check re-decodes a few validation images from the stored tokens and compares
them with the tokenizer's own reconstructions; the stage fails if they differ.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import torch

from models.tokenizer import Tokenizer
from tasks.caption.read import load_captions
from tasks.config import PretokenizeConfig
from tasks.embed_text.read import TextSource
from tasks.ingest.read import class_names, decode_images, image_resolution, iter_decoded_images
from tasks.pretokenize.read import META_FILE, TABLE, decode_tokens, tokens_schema
from tasks.shards import Shard, ShardResult, fan_out, iter_shard_batches, plan_shards, shard_done
from tasks.stage import StageContext, StageOutput
from tasks.store import Manifest, Store, TableRecord, write_json
from tasks.tables import write_parquet_atomic
from tasks.train_tokenizer.read import load_tokenizer
from tasks.training.loop import autocast

log = logging.getLogger("tok1d")

# Largest tolerated |decode(stored tokens) - reconstruction| in [0, 1] pixel units: float16
# rounding of KL tokens moves pixels by ~1e-3; a misaligned row or a wrong dtype by ~1e-1.
DECODE_CHECK_TOLERANCE = 0.02
# Stored VQ ids may differ from a fresh encoding only through float ties (batch-size dependent
# kernels); KL tokens only by float16 rounding (relative 2^-11).
TOKEN_MISMATCH_TOLERANCE = 0.01
TOKEN_REL_TOLERANCE = 2e-3
INPUT_COLUMNS = ["image_id", "split", "label_id", "image"]


def part_name(shard: int, part: int) -> str:
    return f"part-{shard:05d}-{part:04d}.parquet"


def tokens_array(tokens: torch.Tensor, discrete: bool) -> pa.Array:
    """Encoder output -> the `tokens` column: list<uint16> ids or list<list<halffloat>> [N][D]."""
    batch, length = tokens.shape[:2]
    if discrete:
        values = pa.array(tokens.cpu().numpy().astype(np.uint16).ravel())
        return pa.ListArray.from_arrays(pa.array(np.arange(batch + 1, dtype=np.int32) * length), values)
    dim = tokens.shape[2]
    values = pa.array(tokens.float().cpu().numpy().astype(np.float16).ravel())
    inner = pa.ListArray.from_arrays(pa.array(np.arange(batch * length + 1, dtype=np.int32) * dim), values)
    return pa.ListArray.from_arrays(pa.array(np.arange(batch + 1, dtype=np.int32) * length), inner)


class Encoder:
    """The tokenizer in eval mode plus what it needs per image (captions -> text tokens)."""

    def __init__(self, model: Tokenizer, text: TextSource | None, caption_of: dict[str, str]):
        self.model = model
        self.text = text
        self.caption_of = caption_of
        self.device = next(model.parameters()).device
        self.discrete = model.is_discrete

    def keep(self, image_ids: list[str]) -> np.ndarray:
        """Rows this tokenizer can encode: all, or with text those whose image has a caption."""
        return self.text.has_caption(image_ids) if self.text is not None else np.ones(len(image_ids), bool)

    def text_of(self, image_ids: list[str]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The caption tokens and mask of the images on the model's device (None, None without text)."""
        if self.text is None:
            return None, None
        text, mask = self.text.lookup(image_ids)
        return text.to(self.device, non_blocking=True), mask.to(self.device, non_blocking=True)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, image_ids: list[str]) -> torch.Tensor:
        text, mask = self.text_of(image_ids)
        with autocast(self.device, "auto"):
            tokens, _, _ = self.model.encode(images.to(self.device, non_blocking=True), text, mask)
        return tokens if self.discrete else tokens.float()


Decoded = tuple[int, pa.RecordBatch, torch.Tensor | None]


def _decoded(batches: Iterator[pa.RecordBatch], keep_fn) -> Iterator[Decoded]:
    """(rows read, rows to encode, their images) per batch, decoded one batch ahead in a
    background thread so PNG decoding overlaps the model's forward pass."""

    def load(batch: pa.RecordBatch) -> Decoded:
        keep = keep_fn(batch.column("image_id").to_pylist())
        kept = batch.filter(pa.array(keep))
        pngs = kept.column("image").to_pylist()
        return batch.num_rows, kept.drop_columns(["image"]), decode_images(pngs) if pngs else None

    with ThreadPoolExecutor(1) as pool:
        pending = None
        for batch in batches:
            future = pool.submit(load, batch)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def _write_part(rows: list[pa.Table], schema: pa.Schema, path: Path) -> int:
    table = pa.concat_tables(rows).cast(schema) if rows else schema.empty_table()
    write_parquet_atomic(table, path, compression="zstd")
    return table.num_rows


def token_statistics(token_files: list[Path], seq_len: int, token_dim: int) -> dict[str, list[float]]:
    """Per-channel mean and std of the continuous training tokens (diffusion models rescale by them).

    Read back from the finished table, so a resumed run reports what an uninterrupted one does.
    """
    count, total, squares = 0, np.zeros(token_dim), np.zeros(token_dim)
    for path in token_files:
        for batch in pq.ParquetFile(path).iter_batches(columns=["split", "tokens"]):
            batch = batch.filter(pc.equal(batch.column("split"), "train"))
            if batch.num_rows:
                flat = decode_tokens(batch.column("tokens"), False, seq_len, token_dim).reshape(-1, token_dim)
                count += len(flat)
                total += flat.sum(0, dtype=np.float64)
                squares += np.square(flat, dtype=np.float64).sum(0)
    if not count:
        return {}
    mean = total / count
    return {"token_mean": mean.tolist(), "token_std": np.sqrt(np.maximum(squares / count - mean**2, 0)).tolist()}


def _rows(piece: pa.RecordBatch, tokens: torch.Tensor, encoder: Encoder) -> pa.Table:
    image_ids = piece.column("image_id").to_pylist()
    return pa.table(
        {
            "image_id": piece.column("image_id"),
            "split": piece.column("split"),
            "label_id": piece.column("label_id").cast(pa.int64()),
            "caption_id": pa.array([encoder.caption_of.get(i) for i in image_ids], pa.string()),
            "tokens": tokens_array(tokens, encoder.discrete),
        }
    )


@dataclass(frozen=True)
class Setup:
    """What every shard of one run encodes with: the tokenizer, its text source, the table schema."""

    encoder: Encoder
    info: dict[str, Any]
    schema: pa.Schema


# One setup per process and run: the in-process fan-out reuses the stage's own, a Ray worker
# loads the tokenizer once for all the shards it is given.
_SETUPS: dict[tuple, Setup] = {}


def load_setup(store_root: str, inputs: dict[str, Manifest], device: str) -> Setup:
    """The tokenizer of `inputs` on `device` with its captions and text embeddings (cached per process)."""
    key = (store_root, device, tuple(sorted((name, m.artifact_id) for name, m in inputs.items())))
    if key in _SETUPS:
        return _SETUPS[key]
    store = Store(store_root)
    model, info = load_tokenizer(inputs["train-tokenizer"], store, device)
    text = TextSource(inputs["caption"], inputs["embed-text"], store) if info["text"]["uses_text"] else None
    if text is not None and text.dim != info["text"]["dim"]:
        raise ValueError(
            f"pretokenize: the tokenizer expects {info['text']['dim']}-d text embeddings, "
            f"embed-text/{text.embed_artifact} has {text.dim}-d ones; use the embed-text output it was trained with"
        )
    if text is not None:
        caption_of = text.caption_of
    else:  # without captions in the run, the table's caption_id is null
        caption_of = _captions(inputs["caption"], store) if "caption" in inputs else {}
    setup = Setup(Encoder(model, text, caption_of), info, tokens_schema(model.is_discrete, model.config.codebook_size))
    _SETUPS.clear()  # one run's tokenizer at a time: a long-lived worker must not pile them up
    _SETUPS[key] = setup
    return setup


@dataclass(frozen=True)
class EncodeShard:
    """Encode one shard of ingest rows into its part of the tokens table (picklable, so it runs
    on a Ray worker as well as here). A part that exists and reads back is left as it is."""

    store_root: str
    inputs: dict[str, Manifest]
    config: PretokenizeConfig
    device: str
    out_dir: str
    schema: pa.Schema

    def __call__(self, shard: Shard) -> ShardResult:
        path = Path(self.out_dir) / f"{shard.name}.parquet"
        if shard_done(path, self.schema):
            return ShardResult(shard.name, shard.rows, 0, False)
        encoder = load_setup(self.store_root, self.inputs, self.device).encoder
        rows, encoded = [], 0
        batches = iter_shard_batches(shard, self.config.batch_size, INPUT_COLUMNS)
        for _, piece, images in _decoded(batches, encoder.keep):
            if images is not None:
                rows.append(_rows(piece, encoder.encode(images, piece.column("image_id").to_pylist()), encoder))
                encoded += len(images)
        _write_part(rows, self.schema, path)
        log.info("pretokenize: computed shard %s (%d images)", shard.name, encoded)
        return ShardResult(shard.name, shard.rows, encoded, True)


@torch.no_grad()
def decode_check(encoder: Encoder, ingest: Manifest, store: Store, token_files: list[Path], count: int) -> dict[str, float]:
    """Decode stored tokens of `count` validation images and compare with fresh reconstructions."""
    model = encoder.model
    batch = None
    for split in ("val", "train"):
        batch = next(iter_decoded_images(ingest, store, count, count, split, encoder.keep), None)
        if batch is not None:
            break
    if batch is None:
        raise ValueError("pretokenize: no images for the decode check")
    stored = pads.dataset([str(p) for p in token_files], format="parquet").to_table(
        columns=["image_id", "tokens"], filter=pc.field("image_id").isin(batch.image_ids)
    )
    position = {image_id: row for row, image_id in enumerate(stored.column("image_id").to_pylist())}
    missing = [i for i in batch.image_ids if i not in position]
    if missing:
        raise RuntimeError(f"pretokenize: images {missing[:3]} are missing from the tokens table")
    stored = stored.take(pa.array([position[i] for i in batch.image_ids]))
    config = model.config
    tokens = decode_tokens(stored.column("tokens"), encoder.discrete, config.num_latent_tokens, config.token_dim)
    tokens = torch.from_numpy(tokens).to(encoder.device)
    images = batch.images.to(encoder.device)
    text, mask = encoder.text_of(batch.image_ids)
    with autocast(encoder.device, "auto"):
        reference = model(images, text, mask)
        decoded = model.decode(tokens, text, mask)
    diff = (decoded.float().clamp(0, 1) - reference.reconstruction.float().clamp(0, 1)).abs()
    result = {"decode_check_images": float(len(batch.image_ids)), "decode_check_max_abs_diff": float(diff.max())}
    if encoder.discrete:
        result["decode_check_token_mismatch"] = float((reference.tokens != tokens).float().mean())
    else:
        fresh = reference.tokens.float()
        result["decode_check_token_rel_diff"] = float(((tokens - fresh).abs() / fresh.abs().clamp_min(1.0)).max())
    return result


def check_decoded(check: dict[str, float]) -> None:
    """Fail the stage when the stored tokens do not reproduce the tokenizer's output."""
    problems = []
    if check["decode_check_max_abs_diff"] > DECODE_CHECK_TOLERANCE:
        problems.append(f"decoded pixels differ by up to {check['decode_check_max_abs_diff']:.4f} "
                        f"(tolerance {DECODE_CHECK_TOLERANCE})")
    if check.get("decode_check_token_mismatch", 0.0) > TOKEN_MISMATCH_TOLERANCE:
        problems.append(f"{check['decode_check_token_mismatch']:.1%} of the stored ids differ from a fresh encoding")
    if check.get("decode_check_token_rel_diff", 0.0) > TOKEN_REL_TOLERANCE:
        problems.append(f"stored tokens differ from a fresh encoding by up to {check['decode_check_token_rel_diff']:.2e} "
                        f"(relative; float16 rounding gives < {TOKEN_REL_TOLERANCE})")
    if problems:
        raise RuntimeError(
            "pretokenize: decoding the stored tokens differs from the tokenizer's reconstructions: "
            + "; ".join(problems) + ". The tokens table is wrong; nothing was committed"
        )


def run_pretokenize(ctx: StageContext) -> StageOutput:
    config: PretokenizeConfig = ctx.config
    if config.batch_size < 1 or config.shard_rows < 1 or config.decode_check_images < 1:
        raise ValueError("pretokenize.batch_size, shard_rows and decode_check_images must be >= 1")
    store, ingest = ctx.store, ctx.inputs["ingest"]
    tokenizer_manifest = ctx.inputs["train-tokenizer"]
    device = ctx.device
    setup = load_setup(str(store.root), ctx.inputs, device)
    encoder, info, schema = setup.encoder, setup.info, setup.schema
    model, text = encoder.model, encoder.text
    if info["ingest_artifact"] not in (None, ingest.artifact_id):  # None: imported, trained elsewhere
        log.warning("pretokenize: the tokenizer was trained on ingest/%s, encoding ingest/%s",
                    info["ingest_artifact"], ingest.artifact_id)
    resolution = image_resolution(ingest, store)
    if resolution != model.config.image_size:  # e.g. an imported 256 px TiTok on 32 px images
        raise ValueError(f"pretokenize: the tokenizer takes {model.config.image_size}x{model.config.image_size} images, "
                         f"ingest/{ingest.artifact_id} holds {resolution}x{resolution} ones; set "
                         f"ingest.resolution={model.config.image_size}")

    out_dir = ctx.output_dir / TABLE
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = plan_shards(ingest.table_files(store, "images"), config.shard_rows)
    expected = {f"{shard.name}.parquet" for shard in shards}
    for leftover in out_dir.iterdir():  # temporaries of a killed run, parts of another layout
        if leftover.name not in expected:
            leftover.unlink()
    missing = [shard for shard in shards if not shard_done(out_dir / f"{shard.name}.parquet", schema)]

    total = sum(shard.rows for shard in shards)
    job = EncodeShard(str(store.root), dict(ctx.inputs), config, device, str(out_dir), schema)
    started = time.perf_counter()
    encoded = computed = 0
    with ctx.progress(total, "images", unit="img", initial=total - sum(s.rows for s in missing)) as progress:
        for result in fan_out(ctx.stage, job, missing, ctx.runtime):
            encoded += result.encoded
            computed += result.computed
            progress.update(result.rows)
    elapsed = time.perf_counter() - started
    log.info("pretokenize: %d of %d shards computed in this run", computed, len(shards))

    token_files = sorted(out_dir.glob("part-*.parquet"))
    splits = pads.dataset([str(p) for p in token_files], format="parquet").to_table(columns=["split"]).column("split")
    counted = pc.value_counts(splits)
    per_split = dict(zip(counted.field("values").to_pylist(), counted.field("counts").to_pylist()))
    check = decode_check(encoder, ingest, store, token_files, config.decode_check_images)
    check_decoded(check)
    names = class_names(ingest, store)
    meta: dict[str, Any] = {
        "discrete": model.is_discrete,
        "seq_len": model.config.num_latent_tokens,
        "codebook_size": model.config.codebook_size if model.is_discrete else None,
        "token_dim": model.config.token_dim,
        "token_dtype": str(schema.field("tokens").type),
        "image_size": model.config.image_size,
        "uses_text": text is not None,
        "text": info["text"],
        "num_classes": len(names),
        "class_names": names,
        "tokenizer_artifact": tokenizer_manifest.artifact_id,
        "ingest_artifact": ingest.artifact_id,
        "rows": per_split,
        **({} if model.is_discrete else token_statistics(token_files, model.config.num_latent_tokens, model.config.token_dim)),
    }
    write_json(ctx.output_dir / META_FILE, meta)
    rows = sum(per_split.values())
    summary = {
        "rows": rows,
        **{f"rows_{split}": count for split, count in sorted(per_split.items())},
        "skipped_no_caption": total - rows,
        "seq_len": meta["seq_len"],
        "discrete": meta["discrete"],
        "encoded_this_run": encoded,  # fewer than rows when a killed run is resumed
        "shards": len(shards),
        "shards_computed_this_run": computed,
        "images_per_s": encoded / elapsed if encoded else None,
        **check,
    }
    record = TableRecord(glob=f"{TABLE}/*.parquet", rows=rows, columns={f.name: str(f.type) for f in schema})
    return StageOutput(tables={TABLE: record}, summary=summary)


def _captions(manifest: Manifest, store: Store) -> dict[str, str]:
    table = load_captions(manifest, store, columns=["image_id", "caption_id"])
    return dict(zip(table.column("image_id").to_pylist(), table.column("caption_id").to_pylist()))
