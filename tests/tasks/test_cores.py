"""The thread count a process picks: available cores, other processes' load, the user's fixed count."""

import logging
import os
import subprocess
import sys
import time

import pytest
import torch

from tasks import cores
from tasks.cores import LoadMeter, ThreadGovernor, available_cores, fixed_threads, threads_for

SPIN = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"


def test_one_thread_per_free_core():
    assert threads_for(2, 0.0) == 2
    assert threads_for(2, 0.4) == 2  # a little background work keeps both
    assert threads_for(2, 0.7) == 1  # over half a core taken: that core is not free
    assert threads_for(2, 1.9) == 1  # never fewer than one
    assert threads_for(4, 1.0) == 3
    assert threads_for(3, None) == 3  # load unknown: every core


def test_a_fixed_count_wins(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert fixed_threads(None) is None
    assert fixed_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert fixed_threads(None) == 1 and fixed_threads(4) == 4
    monkeypatch.setenv("OMP_NUM_THREADS", "lots")
    assert fixed_threads(None) is None


def test_available_cores_follow_affinity_and_cgroup_quota(tmp_path, monkeypatch):
    one_core = subprocess.run(
        [sys.executable, "-c", "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
         "from tasks.cores import available_cores; print(available_cores())"],
        capture_output=True, text=True, check=True,
    )
    assert one_core.stdout.strip() == "1"
    cpu_max = tmp_path / "cpu.max"
    monkeypatch.setattr(cores, "_CGROUP_CPU_MAX", cpu_max)
    cpu_max.write_text("max 100000\n")
    assert available_cores() == len(os.sched_getaffinity(0))
    cpu_max.write_text("50000 100000\n")  # docker --cpus=0.5
    assert available_cores() == 1


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="load is read from /proc/stat")
def test_a_busy_process_is_seen_and_the_governor_leaves_it_a_core(monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spinner = subprocess.Popen([sys.executable, "-c", SPIN])
    try:
        time.sleep(0.3)  # the interpreter has started and spins
        meter = LoadMeter()
        time.sleep(1.0)
        assert meter.others() >= 0.5  # the spinner (and whatever else runs) on our cores
        if available_cores() == 2:
            caplog.set_level(logging.INFO, logger="tok1d")
            governor = ThreadGovernor("probe-stage", probe_s=1.0)
            assert governor.start() == 1 and torch.get_num_threads() == 1
            assert "probe-stage: 1 torch thread(s) (auto: 2 core(s) available, others use" in caplog.text
    finally:
        spinner.kill()
        spinner.wait()
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


class _Loads:
    """Other processes' load as a test dictates it (the real meter is tested above)."""

    def __init__(self, values):
        self.values = list(values)

    def others(self):
        return self.values.pop(0)


def test_the_count_changes_only_when_two_checks_agree(monkeypatch, caplog):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cores, "available_cores", lambda: 2)
    caplog.set_level(logging.INFO, logger="tok1d")
    governor = ThreadGovernor("flap", every_s=0.0, probe_s=0.0)
    governor.start()
    try:
        governor.threads = 1
        torch.set_num_threads(1)
        governor._meter = _Loads([0.1, 1.0, 0.1, 0.1, 1.2])
        governor.tick()  # one check says 2: not yet
        assert governor.threads == 1
        governor.tick()  # the load is back: nothing pending
        governor.tick()
        governor.tick()  # two in a row say 2
        assert governor.threads == 2 and torch.get_num_threads() == 2
        assert "flap: torch threads 1 -> 2" in caplog.text
        governor.tick()  # one check says 1 again: kept at 2
        assert governor.threads == 2
    finally:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


def test_fixed_threads_are_set_once_and_kept(monkeypatch, caplog):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    caplog.set_level(logging.INFO, logger="tok1d")
    governor = ThreadGovernor("fixed-stage", every_s=0.0)
    assert governor.start() == 1 and not governor.adaptive
    governor.tick()  # no meter: nothing measured, nothing changed
    assert torch.get_num_threads() == 1
    assert "fixed-stage: 1 torch thread(s) (fixed by OMP_NUM_THREADS" in caplog.text
    monkeypatch.delenv("OMP_NUM_THREADS")
    shared = ThreadGovernor("ddp-stage", share=2)
    assert shared.fixed is None and not shared.adaptive
    assert shared.cores == max(1, available_cores() // 2)
