"""Reconciling killed runs in lineage and, for deployment runs, in Prefect.

`tasks.leases` finds runs and stage runs whose process died and lineage records them `killed`.
A killed worker's flow run stays Running in Prefect forever (Prefect #16746), so its UI and its
Retry button would not tell the truth: when a Prefect API is configured (PREFECT_API_URL, as
deployments/local.sh and every worker set it), each killed run's flow run still in a non-final
state is set to Crashed. Prefect is imported only then: `tok1d status` stays light.
"""

from __future__ import annotations

import logging
import os
import uuid

from tasks import lineage
from tasks.leases import DeadLease
from tasks.store import Store

log = logging.getLogger("tok1d")


def mark_crashed(killed_runs: list[DeadLease]) -> int:
    """Set each killed run's Prefect flow run to Crashed if it is not final yet; how many were."""
    from prefect.client.orchestration import get_client
    from prefect.states import Crashed

    marked = 0
    try:
        with get_client(sync_client=True) as client:
            for lease in killed_runs:
                flow_run = client.read_flow_run(uuid.UUID(lease.fields["flow_run_id"]))
                if flow_run.state is None or flow_run.state.is_final():
                    continue
                client.set_flow_run_state(flow_run.id, Crashed(message=f"tok1d: {lease.reason}"), force=True)
                marked += 1
    except Exception as error:  # an unreachable server must not stop the run or `status`
        log.warning("could not mark killed flow runs Crashed in Prefect: %s", error)
    return marked


def reconcile(store: Store, found_by: str) -> list[DeadLease]:
    """Record dead runs and stage runs as killed; mark their deployment flow runs Crashed."""
    found = lineage.reconcile_store(store, found_by)
    deployed = [lease for lease in found if lease.kind == "run" and lease.fields.get("flow_run_id")]
    if deployed and os.environ.get("PREFECT_API_URL"):
        count = mark_crashed(deployed)
        if count:
            log.warning("%d killed flow run(s) set to Crashed in Prefect", count)
    return found
