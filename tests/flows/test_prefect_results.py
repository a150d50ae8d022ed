"""A Prefect result file planted in the store (or Prefect's home) is never deserialized.

Prefect result records name their own serializer, so a record rewritten to use pickle runs its
payload when Prefect loads it. tok1d persists no Prefect results and reads none: its own verified
cache decides hits. This plants a pickle record, one that does run code when Prefect loads it
(checked first), wherever Prefect would have looked for the stage task's cached result.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOK1D = [sys.executable, "-m", "flows.cli"]


class _Payload:
    """Unpickling it opens `marker` for writing, i.e. creates the file: code ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _pickle_record(marker: Path, key: str) -> bytes:
    from prefect._internal.result_records import ResultRecord, ResultRecordMetadata
    from prefect.serializers import PickleSerializer

    metadata = ResultRecordMetadata(storage_key=key, serializer=PickleSerializer())
    return ResultRecord(metadata=metadata, result=_Payload(marker)).serialize()


def _tok1d(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*TOK1D, *args], cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert not check or result.returncode == 0, f"tok1d {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


def test_a_planted_pickle_result_is_never_loaded(tmp_path):
    store = tmp_path / "store"
    run = ("stage", "ingest", "--preset", "smoke", "--store", str(store), "--flow")
    first = _tok1d(*run)
    assert "computed" in first.stdout
    marker = tmp_path / "payload-ran"
    [record] = (store / "cache" / "ingest").glob("*.json")
    slot_key = record.name.removesuffix(".json")
    # The keys the stage task's Prefect cache used (tok1d-<stage>-<slot key>), in the store's result
    # folder and in Prefect's default local storage.
    places = [store / "prefect-results", Path(os.environ["PREFECT_HOME"]) / "storage"]
    for place in places:
        place.mkdir(parents=True, exist_ok=True)
        for name in (f"tok1d-ingest-{slot_key}", slot_key):
            (place / name).write_bytes(_pickle_record(marker, name))

    # The planted record is live: Prefect's own loader runs its payload.
    probe = f"from prefect._internal.result_records import ResultRecord; ResultRecord.deserialize(open({str(places[0] / ('tok1d-ingest-' + slot_key))!r}, 'rb').read())"
    subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=False, capture_output=True)
    assert marker.exists(), "the planted record should run code when Prefect loads it"
    marker.unlink()

    second = _tok1d(*run, check=False)
    assert not marker.exists(), "a Prefect result file from the store was deserialized"
    assert second.returncode == 0, second.stderr
    assert "cached" in second.stdout
