"""How freed heap memory is handled: given back to the OS between bundles, or kept for the next forward pass.

glibc raises its mmap threshold after large frees, so numpy/Arrow temporaries of a few MB end up on the heap and
stay resident after they are freed; on the in-process runner that adds up across passes (about 200 MB at 10M
rows, see docs/benchmarks.md). malloc_trim returns those pages (`release_freed_memory`, balance and shard).

A teacher's forward passes want the opposite (`keep_freed_memory`, label). Both are no-ops where glibc is not the
allocator.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os

import pyarrow as pa

try:
    _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
except OSError:
    _libc = None
_malloc_trim = getattr(_libc, "malloc_trim", None)
_mallopt = getattr(_libc, "mallopt", None)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_KEEPING = False


def release_freed_memory() -> None:
    pa.default_memory_pool().release_unused()  # Arrow's own allocator (mimalloc or jemalloc) keeps freed pages too
    if _malloc_trim is not None:
        _malloc_trim(0)


def keep_freed_memory() -> bool:
    """Lets glibc's malloc keep the memory a forward pass frees, for the next one: no mmap for large blocks,
    no trimming of the heap's top (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB). By default every activation
    above 32 MB (batch 32 of a 224 px EfficientNet has many) is a fresh mmap that the kernel zero-fills page by
    page and unmaps after the layer: on 2 cores that was a quarter of label's CPU time, in the kernel. The
    process keeps its peak heap instead (about 0.3 GB more peak RSS for b0 at batch 32). Changes no number;
    once per process; False where malloc is not glibc's (nothing to do)."""
    global _KEEPING
    if _KEEPING:
        return True
    try:
        if _mallopt is None or not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
    except (ValueError, OSError, AttributeError):  # not glibc (musl, macOS, Windows)
        return False
    _KEEPING = bool(_mallopt(M_MMAP_MAX, 0)) & bool(_mallopt(M_TRIM_THRESHOLD, 2**31 - 1))
    return _KEEPING
