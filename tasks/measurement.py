"""A metric with its protocol: how it was measured travels with the number into `metrics`.

A stage puts `measurements(...)` into its summary under MEASUREMENTS_KEY; lineage writes one
`metrics` row per measurement with the protocol as columns (N, implementation, reference, seed,
std or interval), so `select * from metrics` says for every FID/KID what it was computed on.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

MEASUREMENTS_KEY = "measurements"


@dataclass(frozen=True)
class Measurement:
    """One metric value and how it was measured.

    implementation  feature network (with its file hash) and metric code, e.g.
                    "inception-2015-12-05 sha256:6726825d... / clean-fid frechet_distance"
    n               images or samples the value was computed on
    reference       what it was compared with (dataset artifact, split, count, resolution, crop)
    seed            the seed of what was random in it (sampling, subsets, bootstrap)
    std             spread of the estimate (KID: std over subsets; IS: std over splits)
    low, high       a 95% interval (bootstrap for PSNR/SSIM)
    """

    value: float | None
    n: int | None = None
    implementation: str | None = None
    reference: str | None = None
    seed: int | None = None
    std: float | None = None
    low: float | None = None
    high: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measurements(**by_name: Measurement) -> dict[str, dict[str, Any]]:
    """The summary entry holding measurements by metric name (JSON-ready)."""
    return {name: measurement.to_json() for name, measurement in by_name.items()}


def read_measurements(summary: dict[str, Any]) -> dict[str, Measurement]:
    """The measurements of a stage summary (empty for summaries written before they existed)."""
    return {name: Measurement(**fields) for name, fields in (summary.get(MEASUREMENTS_KEY) or {}).items()}
