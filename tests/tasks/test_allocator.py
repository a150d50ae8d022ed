"""tasks/allocator.py: freed tensors are reused instead of faulted in again (glibc only)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tasks.allocator import is_glibc

pytestmark = pytest.mark.skipif(not is_glibc(), reason="mallopt tuning exists only on glibc")

# Twelve "batches" that each allocate, touch and free a 64 MiB and a 12 MiB tensor; prints the minor
# page faults of the last six. The first ones grow the heap until freed blocks fit (torch's aligned
# allocations are a little larger than a freed block of the same tensor size), and a later batch
# may still grow it once, depending on the heap's layout.
SCRIPT = """
import resource, sys
import torch
from tasks.allocator import reuse_freed_memory
if sys.argv[1] == "reuse":
    assert reuse_freed_memory() and reuse_freed_memory()  # idempotent
def batch():
    x = torch.empty(16 * 1024 * 1024).fill_(1.0)  # 64 MiB: above glibc's largest mmap threshold
    y = torch.empty(3 * 1024 * 1024).fill_(2.0)
    del x, y
for _ in range(6):
    batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(6):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def late_batch_faults(mode: str) -> int:
    result = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def test_a_freed_large_tensor_is_reused_without_page_faults():
    # glibc's default maps and unmaps the 64 MiB one: its 16k pages fault in again every batch.
    default = late_batch_faults("default")
    assert default > 6 * 16_000
    # Kept: at most the odd batch that still grows the heap.
    assert late_batch_faults("reuse") < default / 3
