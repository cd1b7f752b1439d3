"""The end of a run and what reads its output: manifest.json written last, the summary, a few records shown."""
from __future__ import annotations

import dataclasses
import io
import time
from array import array
from typing import Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ns_data import class_names, contract, fs, tfrecord
from ns_data.shard.plan import ShardContext
from ns_data.shard.writing import write_shard

FORMAT = "ns-data shards v1"


class ShardInfos(beam.CombineFn):
    """Shard infos (shard, records, bytes, class labels, their counts; writing.shard_info) combined into what the
    manifest needs: the shards' numbers, records and bytes as columns (24 bytes a shard) and the records of each
    class summed in one array. Nothing in it grows with shards x classes."""

    def create_accumulator(self):
        return {"shard": array("q"), "records": array("q"), "bytes": array("q"), "classes": np.zeros(0, np.int64)}

    def add_input(self, acc, info):
        shard, records, nbytes, labels, counts = info
        acc["shard"].append(shard)
        acc["records"].append(records)
        acc["bytes"].append(nbytes)
        acc["classes"] = _add_classes(acc["classes"], labels, counts)
        return acc

    def merge_accumulators(self, accs):
        accs = iter(accs)
        out = next(accs)
        for acc in accs:
            for column in ("shard", "records", "bytes"):
                out[column].extend(acc[column])
            out["classes"] = _add_classes(out["classes"], np.arange(len(acc["classes"])), acc["classes"])
        return out

    def extract_output(self, acc):
        """Columns as int64 arrays in shard order, and the per-class totals."""
        shards = np.frombuffer(acc["shard"], np.int64) if len(acc["shard"]) else np.zeros(0, np.int64)
        order = np.argsort(shards, kind="stable")
        columns = {c: (np.frombuffer(acc[c], np.int64) if len(acc[c]) else np.zeros(0, np.int64))[order]
                   for c in ("shard", "records", "bytes")}
        return columns | {"classes": acc["classes"]}


def _add_classes(total: np.ndarray, labels: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """`total` (records per class, indexed by label) plus `counts` of `labels` (distinct), grown as needed."""
    if len(labels) and labels.max() >= len(total):
        total = np.concatenate([total, np.zeros(int(labels.max()) + 1 - len(total), np.int64)])
    total[labels] += counts
    return total


def summarize_shards(infos: dict, shard_name) -> tuple[list[dict], dict[str, int]]:
    """The manifest's shard list (name, records, bytes, in shard order) and records per class (the classes that
    have any) from ShardInfos' output."""
    shards = [{"name": shard_name(s), "records": r, "bytes": b}
              for s, r, b in zip(infos["shard"].tolist(), infos["records"].tolist(), infos["bytes"].tolist())]
    classes = {str(label): int(infos["classes"][label]) for label in np.flatnonzero(infos["classes"]).tolist()}
    return shards, classes


def finalize(ctx: ShardContext, infos: dict, counts: dict, errors: list[dict]) -> str:
    """Writes empty shards for any shard no record reached, the errors table, then manifest.json.

    `infos` is ShardInfos' output over the shards this run wrote and those an interrupted run finished."""
    opts = ctx.options
    missing = np.setdiff1d(np.arange(ctx.num_shards), infos["shard"])
    if len(missing):
        combiner = ShardInfos()
        acc = combiner.create_accumulator()
        for column in ("shard", "records", "bytes"):
            acc[column].extend(infos[column].tolist())
        acc["classes"] = infos["classes"].copy()
        for shard in missing.tolist():
            combiner.add_input(acc, write_shard(ctx, shard, []))
        infos = combiner.extract_output(acc)
    if not np.array_equal(infos["shard"], np.arange(ctx.num_shards)):
        raise RuntimeError(f"internal check failed: {len(infos['shard'])} shard infos for {ctx.num_shards} shards")
    moves = []
    if errors:
        errors = sorted(errors, key=lambda e: (e["id"] or "", e["source"] or "", -1 if e["offset"] is None
                                               else e["offset"], e["reason"]))
        name = contract.SHARDS.errors_name(0)
        with fs.create(ctx.output.tmp(name)) as f:
            pq.write_table(pa.Table.from_pylist(errors, schema=contract.IMAGE_ERROR_SCHEMA), f)
        moves.append((ctx.output.tmp(name), name))
    shards, classes = summarize_shards(infos, ctx.shard_name)
    by_reason = dict(sorted(counts.get("errors", {}).items()))
    seconds = time.time() - ctx.started
    total_bytes = int(infos["bytes"].sum())
    manifest = {
        "format": FORMAT,
        "shards": shards,
        "num_shards": ctx.num_shards,
        "records": int(infos["records"].sum()),
        "bytes": total_bytes,
        "unique_images": counts.get("images", 0),
        "classes": classes,
        "errors": sum(by_reason.values()),
        "errors_by_reason": by_reason,
        "records_lost_to_errors": counts.get("records_lost", 0),
        "features": feature_description(ctx.num_classes, opts.probabilities),
        "num_classes": ctx.num_classes,
        "teacher": ctx.teacher,
        "placement": opts.placement(ctx.num_shards, ctx.num_classes),
        "options": dataclasses.asdict(opts) | {"inputs": list(opts.inputs)},
        "input": {"files": list(ctx.files), "rows": ctx.total_rows, "records": ctx.total_records},
        "resumed_shards": len(ctx.done),
        "wall_seconds": round(seconds, 3),
        "megabytes_per_second": round(total_bytes / 1e6 / max(seconds, 1e-9), 2),
    }
    return ctx.output.publish(moves, manifest)


def feature_description(num_classes: int | None, probabilities: bool) -> dict[str, str]:
    """The records' features (contract.RECORD_FEATURES) as the manifest lists them."""
    return {name: f"{kind.replace('[num_classes]', f'[{num_classes}]')}: {meaning}"
            for name, (kind, meaning) in contract.RECORD_FEATURES.items() if name != "probabilities" or probabilities}


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
    from PIL import Image

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
                with Image.open(io.BytesIO(image)) as img:
                    picture = f"{img.format} {img.width}x{img.height}"
            except Exception as err:  # noqa: BLE001 - shown, not fatal
                picture = f"undecodable ({type(err).__name__})"
            topk = ", ".join(f"{class_names.display(c, names)}:{p:.3f}"
                             for c, p in zip(features.get("topk_classes", [])[:3], features.get("topk_probs", [])[:3]))
            yield (f"  {features['id'][0].decode()}#{features['copy'][0]}  "
                   f"label {class_names.display(features['label'][0], names)}  "
                   f"prob {features['prob'][0]:.3f}  top {topk or '-'}  image {picture}, {len(image):,} bytes")
