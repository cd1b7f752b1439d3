"""What `ns-data shard` and `ns-data inspect` show of a shard output: the manifest in short, a few records decoded
as a trainer decodes them."""
from __future__ import annotations

from typing import Iterator

import numpy as np

from ns_data import class_names, contract, fs, tfrecord
from ns_data.images import DecodeError, decode_image


def format_summary(manifest: dict, output: str, names: list[str] | None = None) -> str:
    """The manifest in short; classes are named by `names`, else by the names the teacher recorded."""
    names = names if names is not None else class_names.of_teacher(manifest.get("teacher"))
    records = np.array([s["records"] for s in manifest["shards"]])
    labels = [int(k) for k in manifest["classes"]]
    counts = np.array(list(manifest["classes"].values()) or [0])
    smallest, largest = (int(np.argmin(counts)), int(np.argmax(counts))) if labels else (None, None)

    def count_of(i: int | None) -> str:
        return f"{counts[i]:,}" + (f" (class {class_names.display(labels[i], names)})" if i is not None else "")

    lines = [
        f"shard: {manifest['records']:,} records of {manifest['unique_images']:,} images in "
        f"{manifest['num_shards']:,} shards, {manifest['bytes'] / 1e6:,.1f} MB"
        + (f", {manifest['megabytes_per_second']:,.1f} MB/s ({manifest['wall_seconds']:,.1f} s)"
           if manifest.get("wall_seconds") else ""),
        f"  records per shard: min {records.min():,}  max {records.max():,}",
        f"  classes: {len(manifest['classes']):,}, records per class: min {count_of(smallest)}  "
        f"max {count_of(largest)}",
    ]
    if manifest["errors"]:
        lines.append(f"  errors: {manifest['errors']:,} rows ({manifest['records_lost_to_errors']:,} records) not "
                     "written: " + ", ".join(f"{r} {n:,}" for r, n in manifest["errors_by_reason"].items()))
    if manifest.get("resumed_shards"):
        lines.append(f"  {manifest['resumed_shards']:,} shards were kept from an interrupted run")
    names = [contract.SHARDS.marker, contract.SHARDS.data_pattern] + (
        [contract.SHARDS.errors_name(0)] if manifest["errors"] else [])
    lines.append(f"output: {output} ({', '.join(names)})")
    return "\n".join(lines)


def inspect_records(directory: str, manifest: dict, count: int, names: list[str] | None = None) -> Iterator[str]:
    """A few records of the first non-empty shard, decoded: what a trainer will see. Classes are named by
    `names`, else by the names the teacher recorded."""
    names = names if names is not None else class_names.of_teacher(manifest.get("teacher"))

    shard = next((s["name"] for s in manifest["shards"] if s["records"]), None)
    if shard is None or count == 0:
        return
    yield f"first {count} records of {shard}:"
    with fs.open_read(fs.join(directory, shard)) as f:
        for n, (_, data) in enumerate(tfrecord.read_records(f)):
            if n >= count:
                break
            features = tfrecord.parse_example(data)
            image = features["image/encoded"][0]
            try:
                img = decode_image(image)
                picture = f"{img.width}x{img.height}"
            except DecodeError as err:  # shown, not fatal
                picture = f"undecodable ({err.reason})"
            topk = ", ".join(f"{class_names.display(c, names)}:{p:.3f}"
                             for c, p in zip(features.get("topk_classes", [])[:3], features.get("topk_probs", [])[:3]))
            yield (f"  {features['id'][0].decode()}#{features['copy'][0]}  "
                   f"label {class_names.display(features['label'][0], names)}  "
                   f"prob {features['prob'][0]:.3f}  top {topk or '-'}  image {picture}, {len(image):,} bytes")
