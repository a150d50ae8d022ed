"""Prefect's artifacts as the run UI: progress bars and summary tables (tasks/progress.py), the
stage's pictures (reconstructions, samples, loss plots) and the run's headline metrics.

Pictures go into a markdown artifact as data: URIs. Prefect's image artifact only holds a URL,
and the store's files are not served to the browser; embedded, they show offline, and are
scaled so one stage's artifact stays well under a megabyte (the API keeps artifacts in its
database).
"""

from __future__ import annotations

import base64
import io
import logging
from pathlib import Path
from typing import Any

from PIL import Image
from prefect.artifacts import (create_markdown_artifact, create_progress_artifact, create_table_artifact,
                               update_progress_artifact)

from tasks.store import Manifest, Store
from tasks.summary_table import UNITS, format_number, format_spread

log = logging.getLogger("tok1d")

MAX_IMAGES = 4  # per stage
MAX_SIDE = 1024  # pixels, longest side
MAX_IMAGE_BYTES = 256 * 1024  # PNG bytes of one picture before base64
# Sample grids of 16-32 px images are tiny: shown at least this large (nearest neighbour, so
# pixels stay pixels), else a browser draws them as a speck.
MIN_SIDE = 256


def artifact_key(text: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes) from a stage name."""
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


class PrefectArtifacts:
    """Progress and table artifacts of the current Prefect task or flow run."""

    def create_progress(self, key: str, description: str, percent: float) -> Any:
        return create_progress_artifact(progress=percent, key=key, description=description)

    def update_progress(self, handle: Any, percent: float) -> None:
        update_progress_artifact(handle, progress=percent)

    def publish_table(self, key: str, description: str, rows: list[dict[str, str]]) -> None:
        create_table_artifact(table=rows, key=key, description=description)


def display_png(path: Path, max_side: int = MAX_SIDE, max_bytes: int = MAX_IMAGE_BYTES) -> bytes:
    """The picture as PNG bytes for the UI: small ones enlarged by a whole factor, large ones
    shrunk until they fit `max_side` and `max_bytes`."""
    with Image.open(path) as opened:
        image = opened.convert("RGBA" if opened.mode in ("RGBA", "LA", "P") else "RGB")
    longest = max(image.size)
    if longest < MIN_SIDE:
        factor = MIN_SIDE // longest + (MIN_SIDE % longest > 0)
        image = image.resize((image.width * factor, image.height * factor), Image.NEAREST)
    while True:
        if max(image.size) > max_side:
            scale = max_side / max(image.size)
            image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))), Image.LANCZOS)
        buffer = io.BytesIO()
        image.save(buffer, format="PNG", optimize=True)
        if buffer.tell() <= max_bytes or max(image.size) <= 64:
            return buffer.getvalue()
        max_side = max(image.size) // 2


def images_markdown(stage: str, store: Store, manifest: Manifest) -> str | None:
    """Markdown showing the artifact's PNGs (None without any)."""
    pictures = sorted(f.path for f in manifest.files if f.path.lower().endswith(".png"))[:MAX_IMAGES]
    if not pictures:
        return None
    parts = [f"### {stage}: {manifest.artifact_id}", ""]
    for name in pictures:
        encoded = base64.b64encode(display_png(manifest.path(store, name))).decode("ascii")
        parts += [f"**{name}**", "", f"![{stage} {name}](data:image/png;base64,{encoded})", "",
                  f"`{store.root / manifest.root / name}`", ""]
    return "\n".join(parts)


def publish_images(stage: str, store: Store, manifest: Manifest) -> None:
    """The stage's pictures as a markdown artifact of the current run (nothing without any)."""
    try:
        markdown = images_markdown(stage, store, manifest)
        if markdown is not None:
            create_markdown_artifact(markdown=markdown, key=f"{artifact_key(stage)}-images",
                                     description=f"Pictures of {stage} ({manifest.artifact_id})")
    except Exception as error:  # the UI is a convenience; never fail the stage over it
        log.warning("could not publish the pictures of %s: %s", stage, error)


def run_metrics_table(rows: list[tuple]) -> list[dict[str, str]]:
    """(stage, name, value, n, std, ci_low, ci_high) rows, as flows/status.py reads them, rounded
    with their units like the stage summaries."""
    table = []
    for stage, name, value, n, std, low, high in rows:
        unit = UNITS.get(name)
        shown = format_number(value, unit) if value is not None else "-"
        table.append({"stage": stage, "metric": name, "value": shown,
                      "spread": format_spread(std, low, high, unit), "N": format_number(n) if n is not None else "?"})
    return table


def publish_run_metrics(rows: list[tuple]) -> None:
    """The run's headline metrics as one table artifact of the flow run."""
    if not rows:
        return
    table = run_metrics_table(rows)
    try:
        create_table_artifact(table=table, key="run-metrics",
                              description="Headline metrics of this run (N = images or samples the value is on)")
    except Exception as error:
        log.warning("could not publish the run's metrics: %s", error)
