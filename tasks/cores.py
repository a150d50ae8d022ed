"""How many torch threads a process should use: the cores it may run on, less what others use.

On a small machine two torch threads of one process run up to 10x slower as soon as anything
else runs (measured on 2 cores): each parallel region waits for its slowest thread, and a thread
that shares its core with another process is descheduled for whole time slices. One thread per
core left free degrades gracefully instead. So, unless the user fixes the count
(`runtime.threads`, or OMP_NUM_THREADS in the environment), a training process starts with one
thread per free core and `ThreadGovernor.tick` follows the load as it comes and goes.

Free cores are measured from /proc/stat (Linux) for the cores in the process's affinity mask:
their busy time, less this process's own CPU time, is what others use. Niced work is not counted
when this process is not niced itself: the scheduler gives way to us there. Elsewhere (no
/proc/stat) every available core counts as free.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("tok1d")

_CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "<quota> <period>" or "max <period>"
_CGROUP_V1_QUOTA = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us")
_CGROUP_V1_PERIOD = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us")


def _cgroup_cores() -> float | None:
    """The CPU quota of this process's cgroup in cores (a container's `--cpus`), if one is set."""
    try:
        if _CGROUP_CPU_MAX.exists():
            quota, period = _CGROUP_CPU_MAX.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        if _CGROUP_V1_QUOTA.exists():
            quota = int(_CGROUP_V1_QUOTA.read_text())
            return None if quota <= 0 else quota / int(_CGROUP_V1_PERIOD.read_text())
    except (OSError, ValueError):
        pass
    return None


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return set(range(os.cpu_count() or 1))


def available_cores() -> int:
    """Cores this process may use: its affinity mask, capped by its cgroup's CPU quota."""
    cores = len(_affinity())
    quota = _cgroup_cores()
    if quota is not None:
        cores = min(cores, max(1, math.ceil(quota - 1e-9)))
    return max(1, cores)


def _busy_seconds(cpus: set[int], count_nice: bool) -> float | None:
    """CPU seconds spent busy so far on `cpus`, from /proc/stat; None where it cannot be read."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    ticks = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
        ticks += user + system + irq + softirq + steal + (nice if count_nice else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass
class _Sample:
    wall: float
    busy: float
    own: float


class LoadMeter:
    """CPU seconds per second that other processes spend on this process's cores, between two reads."""

    def __init__(self):
        self.cpus = _affinity()
        self.count_nice = os.nice(0) > 0 if hasattr(os, "nice") else False
        self._last = self._sample()

    def _sample(self) -> _Sample | None:
        busy = _busy_seconds(self.cpus, self.count_nice)
        return None if busy is None else _Sample(time.monotonic(), busy, time.process_time())

    def others(self) -> float | None:
        """Cores used by others since the previous call (or construction); None without /proc/stat."""
        now, last = self._sample(), self._last
        self._last = now
        if now is None or last is None or now.wall - last.wall <= 0:
            return None
        used = (now.busy - last.busy) - (now.own - last.own)
        return max(0.0, used / (now.wall - last.wall))


def threads_for(cores: int, others: float | None) -> int:
    """One thread per free core, at least one; a core counts as taken once others use over half of it."""
    if others is None:
        return cores
    return max(1, min(cores, math.floor(cores - others + 0.5)))


def fixed_threads(requested: int | None) -> int | None:
    """The thread count the user fixed: `runtime.threads`, else OMP_NUM_THREADS; None for automatic."""
    if requested:
        return requested
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value > 0 else None


_announced: dict[str, int] = {}  # stage -> the pid that logged its thread count


class ThreadGovernor:
    """Sets torch's intra-op thread count for one stage and, when automatic, follows the load.

    `start` picks the count from a short probe of the other processes' load and logs it; `tick`
    (called once per training step; it costs a clock read until `every_s` has passed) re-measures
    and changes the count only when two checks in a row agree, so a short burst of other work
    does not make it flap. A fixed count (`runtime.threads`, OMP_NUM_THREADS) is set once and kept.
    `share` divides the cores between the processes of one multi-process run.
    """

    def __init__(self, stage: str, requested: int | None = None, share: int = 1, every_s: float = 5.0,
                 probe_s: float = 0.25):
        self.stage = stage
        self.fixed = fixed_threads(requested)
        self.fixed_by = "runtime.threads" if requested else "OMP_NUM_THREADS"
        self.cores = max(1, available_cores() // max(1, share))
        self.adaptive = self.fixed is None and share == 1
        self.every_s, self.probe_s = every_s, probe_s
        self.threads = self.fixed or self.cores
        self._meter: LoadMeter | None = None
        self._next_check = 0.0
        self._pending: int | None = None

    def start(self) -> int:
        import torch

        # The runner starts one for every stage and a training stage's `fit` its own: say it once.
        say = log.info if _announced.get(self.stage) != os.getpid() else log.debug
        _announced[self.stage] = os.getpid()
        if self.fixed is not None:
            say("%s: %d torch thread(s) (fixed by %s; %d core(s) available)", self.stage, self.fixed,
                     self.fixed_by, self.cores)
        elif not self.adaptive:
            say("%s: %d torch thread(s) (auto: the process's share of %d core(s))", self.stage,
                     self.cores, available_cores())
        else:
            self._meter = LoadMeter()
            time.sleep(self.probe_s)
            others = self._meter.others()
            self.threads = threads_for(self.cores, others)
            load = "load unknown" if others is None else f"others use {others:.1f}"
            say("%s: %d torch thread(s) (auto: %d core(s) available, %s; followed every %.0f s)",
                     self.stage, self.threads, self.cores, load, self.every_s)
            self._next_check = time.monotonic() + self.every_s
        torch.set_num_threads(self.threads)
        return self.threads

    def tick(self) -> None:
        if self._meter is None or time.monotonic() < self._next_check:
            return
        self._next_check = time.monotonic() + self.every_s
        wanted = threads_for(self.cores, self._meter.others())
        if wanted == self.threads:
            self._pending = None
        elif self._pending == wanted:
            import torch

            log.info("%s: torch threads %d -> %d (other processes' load changed)", self.stage, self.threads, wanted)
            self.threads, self._pending = wanted, None
            torch.set_num_threads(wanted)
        else:
            self._pending = wanted
