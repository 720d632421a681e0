"""`recsys.allocator`: glibc's malloc thresholds, set by `recsys.train.build` from ``malloc``."""

from __future__ import annotations

import subprocess
import sys

import pytest

import recsys.train
from recsys.allocator import glibc, set_malloc_thresholds

GLIBC = glibc() is not None

# a step's pattern: ten 4 MiB tensors made and freed together, 30 times; prints the page
# faults of the last 20 rounds (the first ones fault the heap in once)
STEPS = """
import resource, sys, torch
from recsys.allocator import set_malloc_thresholds
if sys.argv[1] == "set":
    set_malloc_thresholds(32 << 20, 512 << 20)
else:  # glibc's starting values (128 KiB), without its adjustment: a deterministic control
    set_malloc_thresholds(128 << 10, 128 << 10)
for i in range(30):
    if i == 10:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    xs = [torch.ones(1 << 20) for _ in range(10)]
    del xs
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def page_faults(mode: str) -> int:
    done = subprocess.run(
        [sys.executable, "-c", STEPS, mode], capture_output=True, text=True, check=True
    )
    return int(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the C library is not glibc")
def test_freed_memory_is_reused_without_page_faults():
    small, tuned = page_faults("small"), page_faults("set")
    # with glibc's starting thresholds the 40 MiB go back to the system after every round and
    # are faulted in again (10,240 pages a round; glibc's adjustment of its thresholds avoids
    # that in some processes and not in others); with the configured ones they stay
    assert tuned < 100 and small > 100_000, (small, tuned)


def test_thresholds_are_checked():
    assert set_malloc_thresholds(None, None) is False  # glibc's defaults: nothing set
    with pytest.raises(ValueError, match="both malloc.mmap_threshold and malloc.trim"):
        set_malloc_thresholds(32 << 20, None)
    with pytest.raises(ValueError, match=r"malloc.trim_threshold=-1"):
        set_malloc_thresholds(32 << 20, -1)
    with pytest.raises(ValueError, match=r"malloc.mmap_threshold=4294967296"):
        set_malloc_thresholds(4 << 30, 512 << 20)


def test_build_sets_the_configured_thresholds(make_cfg, monkeypatch):
    calls = []
    monkeypatch.setattr(recsys.train, "set_malloc_thresholds", lambda **kw: calls.append(kw))
    recsys.train.build(make_cfg("debug=fdr"))
    recsys.train.build(
        make_cfg("debug=fdr", "malloc.mmap_threshold=null", "malloc.trim_threshold=null")
    )
    recsys.train.build(make_cfg("debug=fdr", "malloc=null"))
    assert calls == [
        {"mmap_threshold": 32 << 20, "trim_threshold": 512 << 20},
        {"mmap_threshold": None, "trim_threshold": None},
        {},
    ]
    assert set_malloc_thresholds(**{}) is False  # what malloc=null gives: glibc's defaults
