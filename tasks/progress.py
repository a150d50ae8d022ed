"""Progress of long loops: a bar in the terminal and, while a run UI is attached, its progress view.

The UI is whatever the orchestrator attaches with `attached_ui` (flows/ui.py attaches Prefect's
artifacts for the duration of a stage task), so nothing under tasks/ imports Prefect.
"""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Protocol, TypeVar

from tqdm.auto import tqdm

from tasks.summary_table import summary_rows

log = logging.getLogger("tok1d")
T = TypeVar("T")

_ARTIFACT_INTERVAL_S = 2.0
# Redraws of a bar written to a file or a worker's log: every 0.1 s there would be megabytes.
_LOG_INTERVAL_S = 30.0


class RunUI(Protocol):
    """Where a run shows progress bars and summary tables besides the terminal."""

    def create_progress(self, key: str, description: str, percent: float) -> Any: ...

    def update_progress(self, handle: Any, percent: float) -> None: ...

    def publish_table(self, key: str, description: str, rows: list[dict[str, str]]) -> None: ...


_ui: RunUI | None = None


@contextmanager
def attached_ui(ui: RunUI) -> Iterator[None]:
    """Mirror progress and summaries to `ui` inside the block."""
    global _ui
    previous, _ui = _ui, ui
    try:
        yield
    finally:
        _ui = previous


class Progress:
    """A tqdm bar mirrored (rate-limited) to the attached run UI, if any."""

    def __init__(self, stage: str, total: int | None, desc: str, unit: str = "it", initial: int = 0):
        self.stage = stage
        self.total = total
        self.count = initial
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=f"{stage}: {desc}", unit=unit, initial=initial, dynamic_ncols=True,
                        mininterval=0.1 if interactive else _LOG_INTERVAL_S)
        self.desc = desc
        self._ui = _ui
        self._artifact_id = None
        self._last_push = 0.0
        if self._ui is not None:
            try:
                self._artifact_id = self._ui.create_progress(f"{_slug(stage)}-progress", f"{stage}: {desc}",
                                                             self._percent())
            except Exception as error:  # the UI is a convenience; never fail the stage over it
                log.warning("could not create progress artifact: %s", error)

    def _percent(self) -> float:
        if not self.total:
            return 0.0
        return min(100.0, 100.0 * self.count / self.total)

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.count += n
        self.bar.update(n)
        if postfix:
            self.bar.set_postfix(postfix, refresh=False)
        if self._artifact_id is not None and time.monotonic() - self._last_push > _ARTIFACT_INTERVAL_S:
            self._push()

    def track(self, items: Iterable[T], size: Callable[[T], int] = lambda item: 1) -> Iterator[T]:
        """Yield `items`, counting each one's `size` once the consumer is done with it."""
        for item in items:
            yield item
            self.update(size(item))

    def _push(self) -> None:
        self._last_push = time.monotonic()
        try:
            self._ui.update_progress(self._artifact_id, self._percent())
        except Exception as error:
            log.warning("could not update progress artifact: %s", error)
            self._artifact_id = None

    def close(self) -> None:
        if self._artifact_id is not None:
            self._push()
        self.bar.close()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def publish_summary_table(stage: str, summary: dict[str, Any]) -> None:
    """A table with a stage's summary in the attached run UI (no-op without one)."""
    if _ui is None:
        return
    try:
        rows = summary_rows(summary)  # rounded, with units, N and protocol
        _ui.publish_table(f"{_slug(stage)}-summary", f"Summary of {stage}", rows)
    except Exception as error:
        log.warning("could not publish summary artifact: %s", error)
