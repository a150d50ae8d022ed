"""The main torchrun worker's tok1d log lines, carried to the stage's process.

A torchrun worker is a process of its own: its "tok1d" logger had no handler, so its INFO lines
(the training-loss lines) were lost, and the stage's handlers (the terminal, the Prefect run's
logs) live in the stage's process anyway. So the main worker appends each line as one JSON
object to `worker-log.jsonl` in the run's work folder (shared by every node), and the stage's
process follows that file while its workers run, handing each line to its own "tok1d" logger in
the context the stage runs in (so a Prefect task run gets them under its name). JSON, not
pickled records: nothing read back can run code.
"""

from __future__ import annotations

import contextvars
import json
import logging
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

LOG_FILE = "worker-log.jsonl"
LOGGER = "tok1d"
POLL_S = 0.2


class JsonLinesHandler(logging.Handler):
    """Appends each record (level, message, time) as one JSON line to `path`."""

    def __init__(self, path: Path):
        super().__init__(logging.INFO)
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = json.dumps({"level": record.levelno, "message": record.getMessage(), "created": record.created})
            with open(self.path, "a") as handle:
                handle.write(line + "\n")
        except Exception:
            self.handleError(record)


def send_lines_to(path: Path) -> None:
    """In the main worker: every "tok1d" line of INFO and above goes to `path` (and nowhere else:
    the stage's process prints them)."""
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    logger.addHandler(JsonLinesHandler(path))
    logger.propagate = False


def _replay(line: str, logger: logging.Logger) -> None:
    try:
        entry = json.loads(line)
        level, message, created = int(entry["level"]), str(entry["message"]), float(entry["created"])
    except (ValueError, KeyError, TypeError):
        return  # a line cut short by a kill
    if not logger.isEnabledFor(level):
        return
    record = logging.makeLogRecord({"name": logger.name, "levelno": level, "levelname": logging.getLevelName(level),
                                    "msg": message, "created": created, "msecs": (created % 1) * 1000})
    logger.handle(record)


@contextmanager
def following(path: Path) -> Iterator[None]:
    """In the stage's process, while the workers run: hand every line the main worker writes to
    `path` to this process's "tok1d" logger, the last ones before the block ends."""
    path.unlink(missing_ok=True)  # a killed attempt's lines were shown when it ran
    logger = logging.getLogger(LOGGER)
    done = threading.Event()

    def follow() -> None:
        offset, pending = 0, ""
        while True:
            finished = done.is_set()  # read once more after the workers ended
            if path.exists():
                with open(path) as handle:
                    handle.seek(offset)
                    chunk = handle.read()
                    offset = handle.tell()
                *lines, pending = (pending + chunk).split("\n")
                for line in lines:
                    _replay(line, logger)
            if finished:
                return
            done.wait(POLL_S)

    # The stage's context (a Prefect task run's), so its handlers file the lines under it.
    thread = threading.Thread(target=contextvars.copy_context().run, args=(follow,), name="worker-logs", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
