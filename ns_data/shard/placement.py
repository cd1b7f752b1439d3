"""Where each record goes: read groups of rows, the global index of a group's first record, and every copy's
shard and within-shard order (see the package docstring)."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ns_data.hashing import hash_ids

ORDER_SALT = 0x5EED_0DE5  # seeds the within-shard order apart from the placement hash


def group_keys(table: pa.Table, file_groups: int) -> pa.Array:
    """Which read task a selected row belongs to: its container, or a hash bucket of standalone files."""
    source = table.column("source").combine_chunks()
    buckets = hash_ids(source, seed=0) % np.uint64(file_groups)
    files = pc.binary_join_element_wise("files/", pa.array(buckets.astype(np.int64)).cast(pa.string()), "")
    return pc.if_else(table.column("offset").combine_chunks().is_null(), files,
                      pc.binary_join_element_wise("container/", source, ""))


def group_starts(counts: list[tuple[str, int]]) -> dict[str, int]:
    """Global index of each group's first record: groups in key order, records counted before them."""
    starts, total = {}, 0
    for key, n in sorted(counts):
        starts[key] = total
        total += n
    return starts


def place_records(table: pa.Table, start: int, num_shards: int, seed: int) -> dict[str, np.ndarray]:
    """Every copy of every row of one group: its row, copy number, shard and within-shard order key.

    Rows must be sorted by id (the order the placement is defined in, whatever order the input had)."""
    copies = table.column("copies").to_numpy().astype(np.int64)
    rows = np.repeat(np.arange(len(copies)), copies)
    copy = np.arange(len(rows)) - np.repeat(np.cumsum(copies) - copies, copies)
    keys = pc.binary_join_element_wise(table.column("id").combine_chunks().take(pa.array(rows)),
                                       pa.array(copy).cast(pa.string()), "#")
    position = np.empty(len(rows), dtype=np.int64)
    position[np.argsort(hash_ids(keys, seed), kind="stable")] = np.arange(len(rows))
    index = start + position
    return {"row": rows, "copy": copy, "index": index, "shard": index % num_shards,
            "order": hash_ids(keys, seed ^ ORDER_SALT)}
