"""Keep freed activation memory in the process, so a forward pass does not fault in fresh pages.

glibc serves allocations above its mmap threshold (128 KiB at start, raised by frees up to 32 MiB) with
their own mmap, unmapped again on free, and returns the top of the heap to the kernel once 128 KiB of it
is free. torch's CPU tensors are plain malloc'ed memory, so every forward pass over many tokens got its
activations (a packed 16 x 128-token prefill of the tiny model: ~30 MiB) as new, zero-filled pages: ~8,500
page faults per prefill, measured as 40 % of its time. With the thresholds raised, freed blocks are
reused; the process keeps at most its peak working set.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import sys

logger = logging.getLogger(__name__)

# mallopt parameters (glibc's malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX); larger values are refused.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 1 << 30


def glibc() -> ctypes.CDLL | None:
    """This process's C library, where it is glibc with mallopt; None elsewhere (musl and others have their
    own policies and no mallopt)."""
    if sys.platform != "linux":
        return None
    libc = None
    with contextlib.suppress(OSError):
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    if libc is None or not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
        return None
    return libc


def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process. False where this is not glibc."""
    libc = glibc()
    if libc is None:
        return False
    kept = libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
    kept = libc.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1 and kept
    if not kept:
        logger.warning("mallopt refused the heap thresholds; large tensors come from fresh pages")
    return kept
