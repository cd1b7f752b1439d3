"""Shuffles through files: how a stage's large intermediate data reaches the step that groups it.

Beam's in-process runner holds everything that crosses a GroupByKey in the memory of one process, and with
worker processes it also copies it through that process. So on the local runner a task writes the record
batches it sends into one Arrow IPC file of its own in the run's temp dir, and only small references (file,
batch number) cross the shuffle; the receiving task reads its batches back (memory-mapped when local). On
Dataflow the shuffle service does this job, so there the batches themselves go through Beam. Either way the
receiver gets the same batches, so the output does not depend on the choice.

The choice (`--shuffle` of balance and shard): `files`, `beam`, or `auto` = files on the local runner with a
local output, beam elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa

from ns_data import fs

SHUFFLES = ("auto", "beam", "files")


def use_files(shuffle: str, local_runner: bool, output: str) -> bool:
    return shuffle == "files" or (shuffle == "auto" and local_runner and fs.is_local(output))


@dataclass(frozen=True)
class SpillRef:
    """Record batch number `batch` of the spill file `path`."""

    path: str
    batch: int


class Sender:
    """Sends record batches to destinations (the keys of a later GroupByKey) from one task.

    With a spill file, `send` writes each batch as it comes and `finish` (after the file is complete) yields
    (destination, SpillRef) pairs; without one, `finish` yields the batches themselves.
    """

    def __init__(self, path: str | None):
        self.path = path
        self.sent: list[tuple[int, pa.RecordBatch | SpillRef]] = []
        self._sink = None
        self._writer = None

    def send(self, destination: int, batch: pa.RecordBatch) -> None:
        if self.path is None:
            self.sent.append((destination, batch))
            return
        if self._writer is None:
            if fs.is_local(self.path):
                fs.mkdirs(fs.split(self.path)[0])
                self._sink = pa.OSFile(self.path, "wb")
            else:
                self._sink = fs.create(self.path)
            self._writer = pa.ipc.new_file(self._sink, batch.schema)
        self._writer.write_batch(batch)
        self.sent.append((destination, SpillRef(self.path, len(self.sent))))

    def close(self) -> list[tuple[int, pa.RecordBatch | SpillRef]]:
        """Completes the spill file; returns what was sent: (destination, batch or reference) pairs."""
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None
        sent, self.sent = self.sent, []
        return sent

    def finish(self) -> Iterator[tuple[int, pa.RecordBatch | SpillRef]]:
        yield from self.close()


def open_file(path: str) -> pa.ipc.RecordBatchFileReader:
    """A spill file's batches (memory-mapped when local)."""
    return pa.ipc.open_file(pa.memory_map(path) if fs.is_local(path) else fs.open_read(path))


def receive(items: Iterable[pa.RecordBatch | SpillRef]) -> list[pa.RecordBatch]:
    """The batches sent, in the order given; spill files are opened once each."""
    readers: dict[str, pa.ipc.RecordBatchFileReader] = {}
    batches = []
    for item in items:
        if isinstance(item, SpillRef):
            if item.path not in readers:
                readers[item.path] = open_file(item.path)
            item = readers[item.path].get_batch(item.batch)
        batches.append(item)
    return batches


def column(batches: list[pa.RecordBatch], name: str, dtype) -> np.ndarray:
    """One column of the batches received, concatenated into a numpy array."""
    parts = [b.column(name).to_numpy() for b in batches]
    return np.concatenate(parts) if parts else np.zeros(0, dtype)
