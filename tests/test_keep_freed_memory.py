"""The stage chain tells glibc's malloc to keep what a batch frees (pipeline/chain.py,
``keep_freed_memory``): an image-sized array allocated, written and freed over and over is
served from the heap, not faulted in page by page from a fresh mmap each time (the CPU default's
system time, issue 27). Counted in page faults, in a fresh process (the setting is per process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys
import numpy as np
if sys.argv[1] == "tuned":
    from counterfactory.pipeline.chain import keep_freed_memory
    keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
before = faults()
rng = np.random.default_rng(0)
for _ in range(50):  # a batch's arrays: images, masks and float copies of many sizes, written whole
    arrays = [np.ones(int(n), np.uint8) for n in rng.integers(1 << 18, 24 << 20, 6)]
    del arrays
print(faults() - before)
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, timeout=120)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_image_arrays_are_reused_not_faulted_in_again():
    plain, tuned = _faults("plain"), _faults("tuned")
    # glibc's default: arrays over its (adaptive) mmap threshold are fresh mappings and a freed
    # heap top is trimmed, so the pages are faulted in again (~79k faults here; tuned ~5k)
    assert plain > 30_000
    assert tuned < plain / 5
