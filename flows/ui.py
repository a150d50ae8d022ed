"""Prefect's artifacts as the run UI of tasks/progress.py: progress bars and summary tables."""

from __future__ import annotations

from typing import Any

from prefect.artifacts import create_progress_artifact, create_table_artifact, update_progress_artifact


class PrefectArtifacts:
    """Progress and table artifacts of the current Prefect task or flow run."""

    def create_progress(self, key: str, description: str, percent: float) -> Any:
        return create_progress_artifact(progress=percent, key=key, description=description)

    def update_progress(self, handle: Any, percent: float) -> None:
        update_progress_artifact(handle, progress=percent)

    def publish_table(self, key: str, description: str, rows: list[dict[str, str]]) -> None:
        create_table_artifact(table=rows, key=key, description=description)
