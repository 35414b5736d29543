"""Allocator settings for the processes that run training steps or inference blocks.

A step allocates and frees tens of buffers of megabytes each. glibc returns every buffer over its
mmap threshold (128 KiB at start) to the kernel on free, so the next step faults the same pages
in again: ~10,000 page faults per atlas step, ~15 % of its time on 2 cores (more in a VM). Raising
the threshold and the trim threshold keeps freed buffers in the heap for reuse. Peak memory is
unchanged (the buffers are the same); freed memory above the peak is not returned until the heap's
free top exceeds ``TRIM_BYTES``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
MMAP_BYTES = 32 << 20  # glibc's largest mmap threshold: buffers above it are still mapped on demand
TRIM_BYTES = 256 << 20
TOP_PAD_BYTES = 64 << 20


@functools.cache
def keep_freed_buffers() -> bool:
    """Apply the settings once per process; False where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    return all(mallopt(p, v) == 1 for p, v in ((M_MMAP_THRESHOLD, MMAP_BYTES), (M_TRIM_THRESHOLD, TRIM_BYTES),
                                                (M_TOP_PAD, TOP_PAD_BYTES)))
