"""A stage summary as table rows a person reads: rounded values with their units, and for each
measured metric its N, spread and protocol (tasks/measurement.py) beside the number.

The run UI shows these rows (tasks/progress.py publishes them); a summary's raw JSON keeps full
precision in the manifest and in `metrics`.
"""

from __future__ import annotations

import json
import math
from typing import Any

from tasks.measurement import MEASUREMENTS_KEY, Measurement, read_measurements

COLUMNS = ("metric", "value", "N", "protocol")
# Units of the summary keys that have one; everything else is a count or a plain number.
UNITS = {
    "psnr": "dB",
    "images_per_s": "images/s",
    "captions_per_s": "captions/s",
    "seconds": "s",
    "codebook_usage": "%",
    "final_codebook_usage": "%",
    "is_probe_accuracy": "%",
    "decode_check_token_mismatch": "%",
}
# Shown as percentages: the stored value is a fraction.
PERCENT = frozenset(name for name, unit in UNITS.items() if unit == "%")
_TEXT_LIMIT = 120


def format_number(value: float | int, unit: str | None = None) -> str:
    """4 significant digits (integers whole, with thousands separators), then the unit."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if unit == "%":
        return f"{100 * value:.3g} %"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) < 1e15):
        text = f"{int(value):,}"
    elif isinstance(value, float) and not math.isfinite(value):
        text = str(value)
    else:
        text = f"{value:.4g}"
    return f"{text} {unit}" if unit else text


def _plain(value: Any, unit: str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float)):
        return format_number(value, unit)
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"), default=str)
    return text if len(text) <= _TEXT_LIMIT else text[: _TEXT_LIMIT - 1] + "…"


def format_spread(std: float | None, low: float | None, high: float | None, unit: str | None = None) -> str:
    """`± std unit (std)`, else `[low, high] (95%)` on the value's scale (its unit stands after the
    value), else '' when a value comes with neither."""
    if std is not None:
        return f"± {format_number(std, unit)} (std)"
    if low is not None and high is not None:
        low_text, high_text = (f"{100 * bound:.3g}" if unit == "%" else format_number(bound) for bound in (low, high))
        return f"[{low_text}, {high_text}] (95%)"
    return ""


def _measured(name: str, measured: Measurement) -> dict[str, str]:
    unit = UNITS.get(name)
    if measured.value is None:
        value = "-"
    else:
        spread = format_spread(measured.std, measured.low, measured.high, unit)
        value = format_number(measured.value, unit) + (f" {spread}" if spread else "")
    protocol = "; ".join(part for part in (
        measured.implementation,
        f"vs {measured.reference}" if measured.reference else None,
        f"seed {measured.seed}" if measured.seed is not None else None,
    ) if part)
    return {"metric": name, "value": value, "N": format_number(measured.n) if measured.n is not None else "?",
            "protocol": protocol}


def summary_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    """Rows (COLUMNS) of a summary: measured metrics first, with their protocol; then the other
    keys, without the bare `<name>_std` / `_low` / `_high` a measurement already shows."""
    measured = read_measurements(summary)
    shown_elsewhere = {f"{name}{suffix}" for name in measured for suffix in ("", "_std", "_low", "_high")}
    rows = [_measured(name, measurement) for name, measurement in measured.items()]
    for name, value in summary.items():
        if name == MEASUREMENTS_KEY or name in shown_elsewhere:
            continue
        rows.append({"metric": name, "value": _plain(value, UNITS.get(name)), "N": "", "protocol": ""})
    return rows


def headline(summary: dict[str, Any]) -> str:
    """The measured metrics in one line (`psnr 21.2 dB [21.0, 21.4] (95%) N=587, ...`); '' if none."""
    return ", ".join(f"{row['metric']} {row['value']} N={row['N']}"
                     for row in summary_rows({MEASUREMENTS_KEY: summary.get(MEASUREMENTS_KEY)}))
