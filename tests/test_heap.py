"""keep_freed_memory: a forward pass's activations, freed and allocated again by the next pass, reuse their
pages instead of faulting in new ones. Each case runs in a fresh interpreter: the setting is per process."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("torch")

# A pass that holds eight 4 MiB activations at once and frees them all (as a packed prefill does), run
# 10 times to settle and 20 times measured; prints the page faults the measured passes took.
SCRIPT = """
import resource, sys, torch
from llmstack.workers.backends.heap import M_MMAP_THRESHOLD, glibc, keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
else:  # what glibc does to a block above its mmap threshold: unmapped on free, fresh pages next time
    assert glibc().mallopt(M_MMAP_THRESHOLD, 128 << 10) == 1  # fixed at its starting value
def forward():
    live = [torch.ones(1 << 20) for _ in range(8)]
    del live
for _ in range(10):
    forward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    forward()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True, timeout=120
    )
    return int(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_activations_reuse_their_pages() -> None:
    # The control shows the count sees fresh pages: with the mmap threshold held at glibc's starting 128 KiB,
    # every pass maps its 32 MiB anew (8,192 pages). glibc's own defaults do that in only some interpreters
    # (its dynamic threshold and heap trimming depend on what else sits on the heap), so they cannot be
    # the control.
    assert page_faults("fresh") > 20 * 4096
    assert page_faults("keep") < 20 * 64
