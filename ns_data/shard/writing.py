"""Writing one shard: its records in order under a temporary name, a note of its counts, then the rename.

A record's bytes reach its writer either through Beam's shuffle, or (local runs) through spill files: the fetch
step appends records to a spill file of its own in the temp dir and sends only (file, offset, length) through
the shuffle; the writer concatenates those byte ranges in the kernel. Spill files need a local output (they are
read back at random), so they are the one place that uses `os` on output paths.
"""
from __future__ import annotations

import os
import uuid
from typing import BinaryIO

import numpy as np

from ns_data import fs
from ns_data.shard.plan import ShardContext


def open_spill_file(ctx: ShardContext) -> BinaryIO:
    """A spill file of its own for one fetch task: records are appended, references emitted."""
    return fs.create(os.path.join(ctx.spill_dir, f"{uuid.uuid4().hex}.bin"))


def copy_spilled(path: str, pieces: list[tuple[str, int, int]]) -> int:
    """Concatenates byte ranges (file, offset, length) of spill files into a new local file, in the kernel where
    it can (copy_file_range: the bytes never pass through Python); returns its size."""
    kernel_copy = hasattr(os, "copy_file_range")  # Linux; elsewhere through a buffer
    sources: dict[str, int] = {}
    out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    size = 0
    try:
        for source, offset, length in pieces:
            if source not in sources:
                sources[source] = os.open(source, os.O_RDONLY)
            done = 0
            while done < length:
                if kernel_copy:
                    n = os.copy_file_range(sources[source], out, length - done, offset + done)
                else:
                    n = os.write(out, os.pread(sources[source], length - done, offset + done))
                if n <= 0:
                    raise OSError(f"{source}: spill file ends before byte {offset + length}")
                done += n
            size += length
    except OSError as err:
        raise fs.no_space(err, path) from err
    finally:
        os.close(out)
        for fd in sources.values():
            os.close(fd)
    return size


def write_shard(ctx: ShardContext, shard: int, records: list[tuple]) -> tuple:
    """Writes one shard in order-key order under a temporary name, notes its counts, renames it into place;
    returns its info (shard_info).

    A record is (order key, global index, label, framed bytes or (spill file, offset, length))."""
    records.sort(key=lambda r: (r[0], r[1]))
    name = ctx.shard_name(shard)
    tmp_path = ctx.output.tmp(name)
    labels, counts = np.unique(np.array([r[2] for r in records], np.int64), return_counts=True)
    if ctx.spill:
        size = copy_spilled(tmp_path, [r[3] for r in records])
    else:
        size = 0
        with fs.create(tmp_path) as f:
            for *_, framed in records:
                f.write(framed)
                size += len(framed)
    note = {"name": name, "records": len(records), "bytes": size,
            "classes": {str(label): int(n) for label, n in zip(labels.tolist(), counts.tolist())}}
    fs.write_json(ctx.sidecar(shard), note)
    fs.rename([tmp_path], [ctx.output.final(name)])
    return shard_info(shard, note)


def shard_info(shard: int, note: dict) -> tuple:
    """What the manifest needs of a shard, from its note: (shard, records, bytes, class labels, their counts),
    the labels and counts as int64 arrays."""
    labels = np.array([int(label) for label in note["classes"]], np.int64)
    counts = np.array(list(note["classes"].values()), np.int64)
    return shard, note["records"], note["bytes"], labels, counts


def read_shard_info(ctx: ShardContext, shard: int) -> tuple:
    """The info of a shard an interrupted run finished, from the note it left."""
    return shard_info(shard, fs.read_json(ctx.sidecar(shard)))
