"""Reading training shards (TFRecord files of tf.train.Example) from PyTorch, without TensorFlow.

`ShardDataset` splits the shards over distributed ranks and DataLoader workers (each shard is read by exactly
one worker, so every record is seen exactly once per epoch), shuffles the shard order per epoch with a seed,
and yields one dict per record: the encoded image bytes (or what `decode` makes of them), the label, and the
soft label, sparse (top-k classes and probabilities) and dense when the shard holds it.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ns_data import contract, fs, tfrecord
from ns_data.shard_files import list_shards, shard_manifest  # noqa: F401 - ns_data.readers' API too
from ns_data.stage import InputError

class CorruptShard(InputError):
    """A shard whose framing or checksums are damaged, named with the file and the index of the record."""


def example_to_record(features: dict[str, list]) -> dict[str, Any]:
    """A parsed tf.Example as a training record: image bytes, label (`label`, or ImageNet's `image/class/label`
    as it is), soft labels, id and copy where present."""
    label = features["label"] if "label" in features else features[contract.IMAGENET_LABEL]
    record: dict[str, Any] = {"image": features["image/encoded"][0], "label": int(label[0])}
    if "id" in features:
        record["id"] = features["id"][0].decode()
    if "copy" in features:
        record["copy"] = int(features["copy"][0])
    if "prob" in features:
        record["prob"] = float(features["prob"][0])
    if "topk_classes" in features:
        record["topk_classes"] = np.asarray(features["topk_classes"], dtype=np.int64)
        record["topk_probs"] = np.asarray(features["topk_probs"], dtype=np.float32)
    if "probabilities" in features:
        record["probabilities"] = np.asarray(features["probabilities"], dtype=np.float32)
    return record


class ShardDataset(IterableDataset):
    """Every record of the shards once per epoch, split over ranks and DataLoader workers by whole shards."""

    def __init__(self, shards: str | list[str], seed: int = 0, shuffle_shards: bool = True,
                 decode: Callable[[bytes], Any] | None = None, rank: int | None = None,
                 world_size: int | None = None, allow_incomplete: bool = False):
        self.shards = list_shards(shards, allow_incomplete)
        self.seed = seed
        self.shuffle_shards = shuffle_shards
        self.decode = decode
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Call before each epoch (as with DistributedSampler): the shard order changes with it."""
        self.epoch = epoch

    def _distributed(self) -> tuple[int, int]:
        if self.rank is not None and self.world_size is not None:
            return self.rank, self.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def worker_slot(self) -> tuple[int, int]:
        """(this DataLoader worker's place among the workers of all ranks, how many there are): how shards split."""
        rank, world = self._distributed()
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        return rank * workers + worker, world * workers

    def shards_for_this_worker(self) -> list[str]:
        order = list(self.shards)
        if self.shuffle_shards:
            order = [order[i] for i in np.random.default_rng((self.seed, self.epoch)).permutation(len(order))]
        slot, slots = self.worker_slot()
        return order[slot::slots]

    def serialized(self) -> Iterator[bytes]:
        """This worker's records of the epoch as serialized tf.Examples, in order: parsed by the caller when
        needed (a resumed trainer skips records without parsing them)."""
        for _, _, data in self.placed():
            yield data

    def placed(self, on_corrupt: Callable[[CorruptShard], None] | None = None) -> Iterator[tuple[str, int, bytes]]:
        """(shard file, the record's index in it, serialized tf.Example) of this worker's records of the epoch.
        A damaged shard (framing or checksum) is a CorruptShard naming the file and the record; with
        `on_corrupt`, that is called with it instead and reading goes on with the next shard (the framing gives
        no safe way past the damage)."""
        for path in self.shards_for_this_worker():
            index = 0
            try:
                with fs.open_read(path) as f:
                    for _, data in tfrecord.read_records(f):
                        yield path, index, data
                        index += 1
            except tfrecord.CorruptRecord as err:
                bad = CorruptShard(f"{path}: record {index}: corrupt_record ({err}); the rest of the file is "
                                   "unreadable")
                if on_corrupt is None:
                    raise bad from err
                on_corrupt(bad)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for data in self.serialized():
            record = example_to_record(tfrecord.parse_example(data))
            if self.decode is not None:
                record["image"] = self.decode(record["image"])
            yield record
