"""tok1d's own log lines (logger "tok1d": stage timings, cache hits, metrics, warnings) in the
flow run's logs in the Prefect UI, for `tok1d run` and for deployment runs alike.

Prefect sends only its own loggers to the API. PREFECT_LOGGING_EXTRA_LOGGERS=tok1d would add
ours, but only where that variable reaches the flow's process before Prefect configures logging
(a worker's environment, every job template), it leaves the logger's level at the root's
WARNING in a worker's flow process (no INFO line would pass), and a line logged outside a run
context (another thread) is dropped with a warning. Instead the flow attaches Prefect's API
handler to "tok1d" itself for as long as it runs, with the flow run's id at hand: a line from
any thread of the process lands in that flow run (under the task run, when a task's context is
current). A shard task on a Ray worker, a process of its own, attaches the handler for the
shard (`tok1d_logs_in_task_run`). The main torchrun worker's lines come through the stage's
process (tasks/training/worker_logs.py), so this handler sends them too.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from typing import Iterator
from uuid import UUID

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

LOGGER = "tok1d"


class FlowRunLogHandler(APILogHandler):
    """Prefect's API handler with a fallback run: records from threads without a Prefect
    context go to `flow_run_id` instead of being dropped."""

    def __init__(self, flow_run_id: UUID):
        super().__init__(level=logging.INFO)
        self.flow_run_id = flow_run_id
        self.setFormatter(logging.Formatter("%(message)s"))

    def prepare(self, record: logging.LogRecord) -> dict:
        if getattr(record, "flow_run_id", None) is None:
            task = TaskRunContext.get()
            flow = FlowRunContext.get()
            extra = {"flow_run_id": self.flow_run_id, "task_run_id": None}
            if task is not None and task.task_run.flow_run_id == self.flow_run_id:
                extra["task_run_id"] = task.task_run.id
            elif flow is not None and flow.flow_run is not None:
                extra["flow_run_id"] = flow.flow_run.id  # a nested flow's own lines
            # A copy: the record also goes to the terminal's handlers, unchanged.
            record = logging.makeLogRecord({**record.__dict__, **extra})
        return super().prepare(record)


@contextmanager
def tok1d_logs_in_flow_run() -> Iterator[None]:
    """Inside the current flow run, send the "tok1d" logger's INFO and above to its logs."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        yield
        return
    # Lines still queued are sent in the background and, at the latest, when the process exits
    # (Prefect drains its log worker then).
    with _sent_to(context.flow_run.id, flush=False):
        yield


@contextmanager
def tok1d_logs_in_task_run() -> Iterator[None]:
    """Inside a task run in a process no flow's handler reaches (a Ray worker's), send the "tok1d"
    logger's INFO and above to the task run's logs, all sent before the block ends (the worker
    may be stopped right after its last task)."""
    context = TaskRunContext.get()
    if context is None:
        yield
        return
    with _sent_to(context.task_run.flow_run_id, flush=True):
        yield


@contextmanager
def _sent_to(flow_run_id: UUID, flush: bool) -> Iterator[None]:
    """The "tok1d" logger at INFO, and a FlowRunLogHandler of `flow_run_id` on it for the block
    unless an API handler already sends its lines (PREFECT_LOGGING_EXTRA_LOGGERS=tok1d, or an
    enclosing run's handler): once is enough."""
    logger = logging.getLogger(LOGGER)
    level = logger.level
    if logger.getEffectiveLevel() > logging.INFO:
        logger.setLevel(logging.INFO)
    handler = None
    if not any(isinstance(existing, APILogHandler) for existing in logger.handlers):
        handler = FlowRunLogHandler(flow_run_id)
        logger.addHandler(handler)
    try:
        yield
    finally:
        logger.setLevel(level)
        if handler is not None:
            logger.removeHandler(handler)
            if flush:
                handler.flush()
