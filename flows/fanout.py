"""The Prefect side of sharded fan-out (tasks/shards.py): every shard of a stage is one Prefect
task run, in the stage task's process (`runtime.task_runner: in-process`, the default) or on a
Ray cluster through prefect-ray's RayTaskRunner (`runtime.task_runner: ray`).

Ray is either the cluster at `runtime.ray_address`, one this process already joined, or a local
one started on 127.0.0.1 (`runtime.ray_workers` CPUs, no dashboard). Inside a pipeline run
(`local_ray_per_run`) the first fan-out starts that local Ray and the run's later ones reuse it
and its warm workers; it stops when the run ends. Outside one it lives for one fan-out. Shards
only ever write their own files, so the artifact is the same wherever they ran.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator, Sequence, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE

from flows.run_logs import tok1d_logs_in_task_run
from tasks.config import RuntimeConfig
from tasks.shards import ShardNeeds

log = logging.getLogger("tok1d")
R = TypeVar("R")
T = TypeVar("T")  # a shard of tasks/shards.py: picklable, with a stable `name`


def _run_shard(fn: Callable[[T], R], shard: T, stage: str) -> R:
    with tok1d_logs_in_task_run():  # on a Ray worker; in the flow's process its handler has them
        return fn(shard)


# tok1d's shard files are the results and the resume state: Prefect caches and persists nothing.
shard_task = task(_run_shard, name="shard", task_run_name="{stage}/{shard.name}", cache_policy=NO_CACHE,
                  persist_result=False)


def _api_for_workers(stack: ExitStack) -> None:
    """Point Ray's workers at this process's Prefect API: with an ephemeral server (no
    PREFECT_API_URL) each worker would otherwise start a server of its own (~20 s each)."""
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url:
        return
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()  # the ephemeral server this process's client started
    if server.server_process is None:
        server.start()
    # The settings context travels with each submitted task (prefect.context.serialize_context).
    stack.enter_context(temporary_settings(updates={PREFECT_API_URL: server.api_url}))


# The pipeline run's stack of the local Ray it started (None outside a run); a module global, not a
# context variable, because Prefect may run a stage task in a thread or context of its own.
_run_scope: ExitStack | None = None
_run_scope_lock = threading.Lock()


@contextmanager
def local_ray_per_run() -> Iterator[None]:
    """Lets every fan-out of a pipeline run share the local Ray the first one starts, stopped on
    exit: a start costs 4-5 s on 2 cores, and its workers are warm (torch imported) for the next stage."""
    global _run_scope
    with ExitStack() as stack:
        with _run_scope_lock:
            outer, _run_scope = _run_scope, stack
        try:
            yield
        finally:
            with _run_scope_lock:
                _run_scope = outer


def _local_ray_init(runtime: RuntimeConfig) -> dict[str, Any]:
    return {"include_dashboard": False, "_node_ip_address": "127.0.0.1", "num_cpus": runtime.ray_workers}


def _ray_runner(runtime: RuntimeConfig):
    try:
        import ray
        from prefect_ray import RayTaskRunner
    except ImportError as error:
        raise RuntimeError(f"runtime.task_runner=ray needs prefect-ray and ray ({error}): "
                           "pip install -c constraints.txt -e '.[ray]'") from None

    if runtime.ray_address is not None:
        return RayTaskRunner(address=runtime.ray_address)
    with _run_scope_lock:
        if _run_scope is not None and not ray.is_initialized():
            ray.init(**_local_ray_init(runtime))
            _run_scope.callback(ray.shutdown)
            log.info("started a local Ray on 127.0.0.1 for this run's fan-outs (%s CPUs)",
                     runtime.ray_workers or "all")
    # A runner that finds Ray initialized (the run's, or one this process joined) reuses it and
    # leaves it running; else it starts a local Ray for this fan-out and stops it after.
    return RayTaskRunner(init_kwargs=_local_ray_init(runtime))


def wants_gpu(runtime: RuntimeConfig, needs: ShardNeeds, cluster_gpus: float) -> bool:
    """Whether a shard task asks Ray for GPUs: one that computes on the device, with
    `runtime.device: cuda`, or `auto` on a cluster that has GPUs (a task without num_gpus sees none)."""
    if not needs.device:
        return False
    return runtime.device == "cuda" or (runtime.device == "auto" and cluster_gpus >= 1)


def ray_options(runtime: RuntimeConfig, needs: ShardNeeds, cluster: dict[str, float]) -> dict[str, float]:
    """The options every shard task of a stage is submitted with (`remote_options`): its CPUs, and
    `runtime.ray_gpus_per_shard` GPUs where it computes on one, so Ray places N shards on N GPUs
    (and makes each one's GPU visible to it). `cluster` is `ray.cluster_resources()`."""
    options: dict[str, float] = {"num_cpus": needs.cpus}
    if wants_gpu(runtime, needs, cluster.get("GPU", 0.0)):
        options["num_gpus"] = runtime.ray_gpus_per_shard
    return options


def check_fits(stage: str, options: dict[str, float], cluster: dict[str, float], runtime: RuntimeConfig) -> None:
    """A clear error instead of tasks Ray can never schedule (they would wait forever) on a local
    Ray; an existing cluster may add nodes, so there it is a warning."""
    short = [f"{options[key]:g} {name} per shard, the cluster has {cluster.get(name, 0.0):g}"
             for key, name in (("num_cpus", "CPU"), ("num_gpus", "GPU")) if options.get(key, 0) > cluster.get(name, 0.0)]
    if not short:
        return
    advice = ("lower runtime.data_workers / runtime.threads (ingest's processes per shard), raise "
              "runtime.ray_workers, or use runtime.device=cpu")
    message = f"{stage}: its shard tasks ask Ray for {'; '.join(short)}: {advice}"
    if runtime.ray_address is None:
        raise RuntimeError(message)
    log.warning("%s (waiting for the cluster at %s to grow)", message, runtime.ray_address)


class PrefectFanOut:
    """`tasks.shards.FanOut` as Prefect task runs: inline, or submitted to Ray in shard order
    with at most `runtime.ray_workers` shards in flight (all, when unset)."""

    def map(self, stage: str, fn: Callable[[T], R], shards: Sequence[T], runtime: Any,
            needs: ShardNeeds) -> Iterator[R]:
        if runtime.task_runner == "ray" and shards:
            yield from self._on_ray(stage, fn, shards, runtime, needs)
            return
        for shard in shards:
            yield shard_task(fn, shard, stage)

    def _on_ray(self, stage: str, fn: Callable[[T], R], shards: Sequence[T], runtime: RuntimeConfig,
                needs: ShardNeeds) -> Iterator[R]:
        runner = _ray_runner(runtime)
        import ray
        from prefect_ray.context import remote_options

        window = runtime.ray_workers or len(shards)
        with ExitStack() as stack:
            stack.enter_context(runner)
            _api_for_workers(stack)
            cluster = ray.cluster_resources()
            options = ray_options(runtime, needs, cluster)
            check_fits(stage, options, cluster, runtime)
            stack.enter_context(remote_options(**options))
            log.info("%s: %d shards on Ray (%s), at most %d at a time, each with %s", stage, len(shards),
                     runtime.ray_address or "local", window, ", ".join(f"{k}={v:g}" for k, v in options.items()))
            todo, running = deque(shards), deque()
            try:
                while todo or running:
                    while todo and len(running) < window:
                        shard = todo.popleft()
                        running.append(runner.submit(shard_task, {"fn": fn, "shard": shard, "stage": stage}))
                    yield running.popleft().result()  # raises the shard's error: the stage fails
            finally:
                for future in running:  # a failed or abandoned fan-out leaves nothing running
                    ray.cancel(future.wrapped_future)
