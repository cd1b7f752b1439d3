"""The end of a run: the shards' infos combined in the pipeline, and manifest.json written last."""
from __future__ import annotations

import dataclasses
import time
from array import array

import apache_beam as beam
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ns_data import contract, fs
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
