"""How freed heap memory is handled: given back to the OS between bundles, or kept for the next forward pass;
and a compact heap for the data stages' local runs.

glibc raises its mmap threshold after large frees, so numpy/Arrow temporaries of a few MB end up on the heap and
stay resident after they are freed; on the in-process runner that adds up across passes (about 200 MB at 10M
rows, see docs/benchmarks.md). malloc_trim returns those pages (`release_freed_memory`, balance and shard).

A teacher's forward passes want the opposite (`keep_freed_memory`, label). Both are no-ops where glibc is not the
allocator.

On the local runner balance and shard run in a `compact_heap`: glibc keeps a heap (arena) per thread that
allocates, up to 8 per core, each holding its own freed memory, and Arrow's default allocator (mimalloc) keeps
pages of its own; at 10M rows on two worker processes the two held about 0.35 GB of the run's 1.5 GB peak, at no
measured gain in speed (docs/benchmarks.md).
"""
from __future__ import annotations

import contextlib
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
# What compact_heap sets, as environment variables for the worker processes a local runner starts.
COMPACT_HEAP = {"MALLOC_ARENA_MAX": "2", "ARROW_DEFAULT_MEMORY_POOL": "system"}
_KEEPING = False


def release_freed_memory() -> None:
    pa.default_memory_pool().release_unused()  # Arrow's own allocator (mimalloc or jemalloc) keeps freed pages too
    if _malloc_trim is not None:
        _malloc_trim(0)


@contextlib.contextmanager
def compact_heap():
    """While the block runs: Arrow's system allocator in this process, and in the worker processes started
    meanwhile (they inherit the environment) that allocator and at most two glibc arenas (a limit glibc reads
    when a process starts). Put back after it; what the user's environment already sets is left as it is."""
    changed = [name for name in COMPACT_HEAP if name not in os.environ]
    pool = pa.default_memory_pool()
    os.environ.update({name: COMPACT_HEAP[name] for name in changed})
    if "ARROW_DEFAULT_MEMORY_POOL" in changed:
        pa.set_memory_pool(pa.system_memory_pool())
    try:
        yield
    finally:
        for name in changed:
            del os.environ[name]
        pa.set_memory_pool(pool)


def keep_freed_memory() -> bool:
    """Lets glibc's malloc keep the memory a forward pass frees, for the next one: no mmap for large blocks,
    no trimming of the heap's top (mallopt M_MMAP_MAX=0, M_TRIM_THRESHOLD=2 GiB). By default every activation
    above 32 MB (batch 32 of a 224 px EfficientNet has many) is a fresh mmap that the kernel zero-fills page by
    page and unmaps after the layer: on 2 cores that costs a quarter of label's CPU time, in the kernel. The
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
