"""Give freed heap memory back to the OS between bundles.

glibc raises its mmap threshold after large frees, so numpy/Arrow temporaries of a few MB end up on the heap and
stay resident after they are freed; on the in-process runner that adds up across passes (about 200 MB at 10M
rows, see docs/benchmarks.md). malloc_trim returns those pages. A no-op where glibc is not the allocator.
"""
from __future__ import annotations

import ctypes
import ctypes.util

import pyarrow as pa

try:
    _malloc_trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
except (OSError, AttributeError):
    _malloc_trim = None


def release_freed_memory() -> None:
    pa.default_memory_pool().release_unused()  # Arrow's own allocator (mimalloc or jemalloc) keeps freed pages too
    if _malloc_trim is not None:
        _malloc_trim(0)
