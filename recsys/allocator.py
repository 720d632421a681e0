"""The C allocator's settings for training on the CPU (glibc's malloc on Linux)."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3


def glibc() -> ctypes.CDLL | None:
    """This process's C library when it is glibc (which has ``mallopt``), else None."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def set_malloc_thresholds(
    mmap_threshold: int | None = None, trim_threshold: int | None = None
) -> bool:
    """Sets glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` for this process (``mallopt``).

    A training step allocates its activations and gradients afresh and frees them at its
    end. glibc returns the freed memory at the top of its heap to the system once more than
    ``trim_threshold`` bytes are free there, and serves requests of ``mmap_threshold`` bytes
    or more with their own mappings, unmapped on free; both start small (128 KiB) and grow
    with what the process frees. Memory given back is faulted in again, page by page, by the
    next step, which costs a large step system time; thresholds above a step's allocations
    keep it with the process (`docs/method-notes.md`). The cost: up to ``trim_threshold``
    bytes of freed memory stay with the process.

    Args:
        mmap_threshold: requests of this many bytes or more get their own mapping (large
            arrays: loaded data, tables), returned to the system when freed.
        trim_threshold: free bytes at the heap's top kept for reuse rather than returned.
        Both None (``malloc=null`` too): glibc's defaults, nothing set. Setting either
        turns glibc's own adjustment of both off, so both are needed.

    Returns:
        Whether they were set: False where the C library is not glibc (macOS, musl).

    Raises:
        ValueError: one of them is None, a value is not a number of bytes from 1 to
            2**31 - 1, or glibc refuses the mmap threshold.
    """
    if mmap_threshold is None and trim_threshold is None:
        return False
    for name, value in (("mmap_threshold", mmap_threshold), ("trim_threshold", trim_threshold)):
        if not isinstance(value, int) or not 0 < value < 2**31:
            raise ValueError(
                f"malloc.{name}={value!r}: give both malloc.mmap_threshold and "
                "malloc.trim_threshold as numbers of bytes from 1 to 2**31 - 1, or both "
                "null (glibc's defaults)"
            )
    libc = glibc()
    if libc is None:
        log.info("malloc: the C library is not glibc; its settings are left as they are")
        return False
    # the mmap threshold first: glibc may refuse one above its limit (mallopt(3) gives 32 MiB on
    # 64-bit systems; glibc 2.36 takes more), and then changes nothing
    if not libc.mallopt(M_MMAP_THRESHOLD, mmap_threshold):
        raise ValueError(
            f"malloc.mmap_threshold={mmap_threshold}: this glibc refuses it; give at most "
            "33554432 (32 MiB, the limit mallopt(3) documents for 64-bit systems)"
        )
    libc.mallopt(M_TRIM_THRESHOLD, trim_threshold)
    return True
