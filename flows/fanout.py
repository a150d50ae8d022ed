"""The Prefect side of sharded fan-out (tasks/shards.py): every shard of a stage is one Prefect
task run, in the stage task's process (`runtime.task_runner: in-process`, the default) or on a
Ray cluster through prefect-ray's RayTaskRunner (`runtime.task_runner: ray`).

Ray is either the cluster at `runtime.ray_address`, one this process already joined, or a local
one started on 127.0.0.1 for the fan-out (`runtime.ray_workers` CPUs, no dashboard) and stopped
after it. Shards only ever write their own files, so the artifact is the same wherever they ran.
"""

from __future__ import annotations

import logging
from collections import deque
from contextlib import ExitStack
from typing import Any, Callable, Iterator, Sequence, TypeVar

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.config import RuntimeConfig

log = logging.getLogger("tok1d")
R = TypeVar("R")
T = TypeVar("T")  # a shard of tasks/shards.py: picklable, with a stable `name`


def _run_shard(fn: Callable[[T], R], shard: T, stage: str) -> R:
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


def _ray_runner(runtime: RuntimeConfig):
    try:
        from prefect_ray import RayTaskRunner
    except ImportError as error:
        raise RuntimeError(f"runtime.task_runner=ray needs prefect-ray and ray ({error}): "
                           "pip install -c constraints.txt -e '.[ray]'") from None

    if runtime.ray_address is not None:
        return RayTaskRunner(address=runtime.ray_address)
    # Used only when this process has not joined a Ray cluster yet (else RayTaskRunner reuses it).
    init = {"include_dashboard": False, "_node_ip_address": "127.0.0.1", "num_cpus": runtime.ray_workers}
    return RayTaskRunner(init_kwargs=init)


class PrefectFanOut:
    """`tasks.shards.FanOut` as Prefect task runs: inline, or submitted to Ray in shard order
    with at most `runtime.ray_workers` shards in flight (all, when unset)."""

    def map(self, stage: str, fn: Callable[[T], R], shards: Sequence[T], runtime: Any) -> Iterator[R]:
        if runtime.task_runner == "ray" and shards:
            yield from self._on_ray(stage, fn, shards, runtime)
            return
        for shard in shards:
            yield shard_task(fn, shard, stage)

    def _on_ray(self, stage: str, fn: Callable[[T], R], shards: Sequence[T], runtime: RuntimeConfig) -> Iterator[R]:
        runner = _ray_runner(runtime)
        import ray
        from prefect_ray.context import remote_options

        window = runtime.ray_workers or len(shards)
        with ExitStack() as stack:
            stack.enter_context(runner)
            _api_for_workers(stack)
            # A CUDA run asks Ray for one GPU per shard task, so Ray places one shard per GPU (and
            # makes it visible: a task without num_gpus sees none). `auto` does where Ray has GPUs.
            gpus = runtime.device == "cuda" or (runtime.device == "auto" and ray.cluster_resources().get("GPU", 0) >= 1)
            stack.enter_context(remote_options(num_cpus=1, **({"num_gpus": 1} if gpus else {})))
            log.info("%s: %d shards on Ray (%s), at most %d at a time", stage, len(shards),
                     runtime.ray_address or "local", window)
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
