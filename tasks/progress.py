"""Progress of long loops: a bar in the terminal and, inside a Prefect run, a progress artifact."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

from tqdm.auto import tqdm

log = logging.getLogger("tok1d")

_ARTIFACT_INTERVAL_S = 2.0
# Redraws of a bar written to a file or a worker's log: every 0.1 s there would be megabytes.
_LOG_INTERVAL_S = 30.0


def _in_prefect_run() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return TaskRunContext.get() is not None or FlowRunContext.get() is not None


class Progress:
    """A tqdm bar mirrored to a Prefect progress artifact (rate-limited) when in a run."""

    def __init__(self, stage: str, total: int | None, desc: str, unit: str = "it", initial: int = 0):
        self.stage = stage
        self.total = total
        self.count = initial
        interactive = sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=f"{stage}: {desc}", unit=unit, initial=initial, dynamic_ncols=True,
                        mininterval=0.1 if interactive else _LOG_INTERVAL_S)
        self.desc = desc
        self._artifact_id = None
        self._last_push = 0.0
        if _in_prefect_run():
            try:
                from prefect.artifacts import create_progress_artifact

                self._artifact_id = create_progress_artifact(
                    progress=self._percent(), key=f"{_slug(stage)}-progress", description=f"{stage}: {desc}"
                )
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

    def _push(self) -> None:
        self._last_push = time.monotonic()
        try:
            from prefect.artifacts import update_progress_artifact

            update_progress_artifact(self._artifact_id, progress=self._percent())
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
    """A table artifact with a stage's summary, shown in the Prefect UI (no-op outside a run)."""
    if not _in_prefect_run():
        return
    try:
        from prefect.artifacts import create_table_artifact

        rows = [{"metric": key, "value": str(value)} for key, value in summary.items()]
        create_table_artifact(table=rows, key=f"{_slug(stage)}-summary", description=f"Summary of {stage}")
    except Exception as error:
        log.warning("could not publish summary artifact: %s", error)
