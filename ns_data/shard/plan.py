"""Everything decided before any image is written: the selection read through the contract, its rows checked,
the number of classes and of shards, the fingerprint, and the output's state (new, resumed or complete).

The launcher reads a bounded part of the selection. When every input is a balance output whose marker counts its
rows and copies, the totals (and so the number of shards) are the markers'; otherwise (plain Parquet files, a
marker without them) the pipeline counts them (`count_unit`, `make_plan`) before any row is read for writing,
and every step takes the run's plan as a side input (`ShardContext.planned`)."""
from __future__ import annotations

import dataclasses
import math
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ns_data import contract, fs
from ns_data.outputs import COMPLETE, RESUME, StageOutput, resuming
from ns_data.progress import Progress
from ns_data.reading import ReadUnits, TableInputs, WorkUnit, open_parquet, read_unit, resolve_inputs
from ns_data.soft_labels import PROBABILITY_REASONS, probability_checks
from ns_data.sources import read_back
from ns_data.spill import use_files
from ns_data.stage import InputError, OptionsError

if TYPE_CHECKING:
    from ns_data.shard import ShardOptions

FILES_PER_GROUP = 1024  # standalone image files read by one task
SAMPLE_ROWS = 64
SAMPLE_UNITS = 16  # row groups the launcher reads of a balance output that records its totals
DEFAULT_MAX_SHARD_BYTES = 256 * 2**20
SPILL = "spill"  # the spill files' folder in the temp dir
HINT = "is this a selection from `ns-data balance`?"

# Why a selection row cannot be written (its error row's reason); the first failed check wins.
NULL_ID, NULL_SOURCE, NULL_CONFIDENCE = "null_id", "null_source", "null_confidence"
INVALID_COPIES = "invalid_copies"  # null, zero or negative
LABEL_OUT_OF_RANGE = "label_out_of_range"  # null, negative, or >= the number of classes
INVALID_TOPK = "invalid_topk"  # topk_classes and topk_probs of different lengths, or with nulls
TOPK_OUT_OF_RANGE = "topk_out_of_range"  # a top-k class negative or >= the number of classes
# then soft_labels.PROBABILITY_REASONS: topk_probs or probs with a NaN or infinity, a negative, a sum above 1 + 1e-3
CHECKED_COLUMNS = {NULL_ID: ("id",), NULL_SOURCE: ("source",), NULL_CONFIDENCE: ("confidence",),
                   INVALID_COPIES: ("copies",), LABEL_OUT_OF_RANGE: ("label",),
                   INVALID_TOPK: ("topk_classes", "topk_probs"), TOPK_OUT_OF_RANGE: ("topk_classes",),
                   **{reason: ("topk_probs", "probs") for reason in PROBABILITY_REASONS}}


@dataclass(frozen=True)
class ShardContext:
    """What the pipeline's steps share. No list of work units or files: the pipeline makes those
    (reading.ReadUnits); `files` is filled in for the manifest, from the pipeline, when the run finishes. The
    fields of PLAN_FIELDS are None when the pipeline counts the selection: a step then takes the run's plan as a
    side input and works on `planned(plan)`."""

    options: ShardOptions
    output: StageOutput
    inputs: TableInputs
    columns: tuple[str, ...]  # selection columns read
    read_settings: dict  # how `label` read the images: sources.read_back's image_column and input_format
    num_shards: int | None
    num_classes: int | None
    file_groups: int | None
    total_rows: int | None  # rows of the selection
    valid_rows: int | None  # rows that pass the row checks: images to read
    total_records: int | None  # their copies: records to write
    files: tuple[str, ...]  # empty until the run's finalize step
    done: frozenset[int] | None  # shards already in place from an interrupted run with the same fingerprint
    record_bytes: float  # a record's estimated size (sampled images): the number of shards by bytes
    spill: bool  # records go through spill files in the temp dir; only references cross the Beam shuffle
    # The teacher's identity (class names) as the selection records it (reading.resolve_inputs), for the
    # manifest; only the last step's copy of the context holds it (Shard.expand).
    teacher: dict | None
    run_id: str
    started: float

    def plan(self) -> dict | None:
        """The launcher's plan (PLAN_FIELDS), or None when the pipeline makes it (make_plan)."""
        return None if self.num_shards is None else {name: getattr(self, name) for name in PLAN_FIELDS}

    def planned(self, plan: dict) -> "ShardContext":
        return dataclasses.replace(self, **plan)

    def shard_name(self, shard: int) -> str:
        return contract.SHARDS.data_name(shard, self.num_shards)

    def sidecar(self, shard: int) -> str:
        return sidecar(self.output, self.shard_name(shard))

    @property
    def spill_dir(self) -> str:
        return self.output.tmp(SPILL)

    def spill_path(self, task: str) -> str | None:
        """A task's own spill file for what it sends (ns_data.spill), or None: through Beam's shuffle."""
        return self.output.tmp(f"{SPILL}/{task}.arrow") if self.spill else None

    def read_units(self) -> ReadUnits:
        """The transform that makes the work units in the pipeline."""
        return ReadUnits(self.inputs, contract.SELECTION, contract.READ_BACK_COLUMNS, hint=HINT,
                         listing_dir=self.output.tmp_dir)

    def progress(self) -> Progress:
        return Progress(self.run_id, "shard", self.valid_rows, self.options.progress, unit="images",
                        shared_dir=self.output.tmp_dir)


PLAN_FIELDS = ("num_shards", "file_groups", "total_rows", "valid_rows", "total_records", "done")


# ------------------------------------------------------------------------------------------- rows


def read_rows(unit: WorkUnit, columns: tuple[str, ...]) -> pa.Table:
    """A unit's rows without the schema's metadata (the teacher, how label read: the context has what is needed),
    so that what crosses a shuffle holds the data only."""
    return read_unit(unit, list(columns)).replace_schema_metadata(None)


def row_reasons(table: pa.Table, num_classes: int | None) -> np.ndarray:
    """Why each row cannot be written ("" when it can): the first failed check, vectorized over the table."""
    copies = pc.fill_null(table.column("copies"), 0).to_numpy()
    checks = [
        (NULL_ID, _null(table, "id")),
        (NULL_SOURCE, _null(table, "source")),
        (NULL_CONFIDENCE, _null(table, "confidence")),
        (INVALID_COPIES, copies <= 0),
        (LABEL_OUT_OF_RANGE, _outside(pc.fill_null(table.column("label"), -1).to_numpy(), num_classes)),
    ]
    if "topk_classes" in table.column_names:
        classes = table.column("topk_classes").combine_chunks()
        probs = table.column("topk_probs").combine_chunks()
        lengths_differ = _lengths(classes) != _lengths(probs)
        flat = pc.list_flatten(classes)
        null_entries = _any_in_row(classes, flat.is_null().to_numpy(zero_copy_only=False)) | _any_in_row(
            probs, pc.list_flatten(probs).is_null().to_numpy(zero_copy_only=False))
        checks.append((INVALID_TOPK, lengths_differ | null_entries))
        checks.append((TOPK_OUT_OF_RANGE, _any_in_row(classes, _outside(pc.fill_null(flat, 0).to_numpy(),
                                                                       num_classes))))
    probability = [probability_checks(table.column(c)) for c in ("topk_probs", "probs") if c in table.column_names]
    for reason in PROBABILITY_REASONS if probability else ():
        checks.append((reason, np.logical_or.reduce([p[reason] for p in probability])))
    reasons = np.full(table.num_rows, "", dtype=object)
    for reason, failed in reversed(checks):
        reasons[failed] = reason
    return reasons


def row_error_detail(row: dict, reason: str, num_classes: int | None) -> str:
    """The values that failed the check, for the error row's `detail`."""
    values = ", ".join(f"{column} {row[column]}" for column in CHECKED_COLUMNS[reason] if column in row)
    if reason in (LABEL_OUT_OF_RANGE, TOPK_OUT_OF_RANGE) and num_classes is not None:
        values += f" (classes are 0..{num_classes - 1})"
    return values


def _null(table: pa.Table, column: str) -> np.ndarray:
    return table.column(column).is_null().to_numpy()


def _outside(classes: np.ndarray, num_classes: int | None) -> np.ndarray:
    return (classes < 0) | (classes >= num_classes) if num_classes is not None else classes < 0


def _lengths(lists: pa.Array) -> np.ndarray:
    return pc.fill_null(pc.list_value_length(lists), -1).to_numpy(zero_copy_only=False)


def _any_in_row(lists: pa.Array, flagged: np.ndarray) -> np.ndarray:
    """Rows of `lists` holding a flagged value (`flagged` runs over pc.list_flatten(lists))."""
    rows = np.zeros(len(lists), dtype=bool)
    rows[pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)[flagged]] = True
    return rows


def scan_selection(units: list[WorkUnit], columns: tuple[str, ...], num_classes: int | None,
                   sample_rows: int = SAMPLE_ROWS, picked: set[int] | None = None) -> tuple[int, int, list[dict]]:
    """A pass over the selection's small columns, a row group at a time: the rows that pass the checks, their
    records, and about `sample_rows` of them spread evenly over the row groups (for check_sample). `units`
    are the row groups read (all of them, or a bounded sample of them: sample_units)."""
    if picked is None:
        picked = set(np.linspace(0, len(units) - 1, min(len(units), SAMPLE_UNITS)).astype(int)) if units else set()
    per_unit = max(1, sample_rows // max(1, len(picked)))
    valid_rows, records, sample = 0, 0, []
    for i, unit in enumerate(units):
        table = read_rows(unit, columns)
        valid = np.flatnonzero(row_reasons(table, num_classes) == "")
        valid_rows += len(valid)
        records += int(pc.fill_null(table.column("copies"), 0).to_numpy()[valid].sum())
        if i in picked and len(valid):
            idx = np.unique(np.linspace(0, len(valid) - 1, min(per_unit, len(valid))).astype(int))
            sample += table.take(pa.array(valid[idx])).to_pylist()
    return valid_rows, records, sample


# ------------------------------------------------------------------------------------------- sizes


def check_sample(rows: list[dict], settings: dict) -> float:
    """Reads the sampled images; their mean size in bytes. Fails early when none of them can be read (wrong
    paths, a selection made on another machine), rather than writing shards of nothing but errors."""
    sizes, failures = [], []
    for row in rows:
        data, reason, detail = next(read_back(row["source"], [row["offset"]], **settings))
        (sizes.append(len(data)) if data is not None else failures.append(f"{row['source']}: {reason} ({detail})"))
    if rows and not sizes:
        raise InputError(f"none of {len(rows)} sampled selected images could be read; first: {failures[0]}")
    return float(np.mean(sizes)) if sizes else 0.0


def resolve_num_shards(opts: ShardOptions, total_records: int, record_bytes: float) -> int:
    if opts.num_shards is not None:
        n = opts.num_shards
    elif opts.records_per_shard is not None:
        n = math.ceil(total_records / opts.records_per_shard)
    else:
        limit = opts.max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
        n = math.ceil(total_records * record_bytes * 1.1 / limit)  # 10% room: image sizes vary
    if opts.num_shards is not None and n > total_records:
        raise OptionsError(f"--num-shards {n} is more than the {total_records:,} records to write")
    return max(1, min(n, total_records))


# ------------------------------------------------------------------------------------------- the plan


def prepare(opts: ShardOptions, echo=print, local_runner: bool = True) -> ShardContext | None:
    """Everything checked before any image is written; None when the output is already complete."""
    opts.validate()
    inputs, markers, identity, teacher = resolve_inputs(opts.inputs, contract.SELECTION, "selected_rows",
                                                        contract.READ_BACK_COLUMNS, hint=HINT)
    schema = inputs.schema
    soft = [c for c in contract.SOFT_LABEL_COLUMNS if c in schema.names and (c != "probs" or opts.probabilities)]
    if ("topk_classes" in soft) != ("topk_probs" in soft):
        raise InputError(f"{inputs.first}: has one of topk_classes and topk_probs without the other; {HINT}")
    settings = contract.read_metadata(schema, contract.INPUT) or {}
    read_settings = {"image_column": settings.get("image_column"), "input_format": settings.get("format", "auto")}
    num_classes = opts.num_classes or contract.num_classes(schema)
    if opts.probabilities and num_classes is None and "probs" not in schema.names:
        raise OptionsError("the number of classes is not recorded in the selection: pass --num-classes "
                           "(or --no-probabilities)")
    content = tuple(c for c in contract.CONTENT_COLUMNS if c in schema.names)
    if len(content) < len(contract.CONTENT_COLUMNS):
        content = ()
    columns = contract.READ_BACK_COLUMNS + tuple(soft) + content
    small_columns = tuple(c for c in columns if c not in ("probs",) + content)  # all the row checks need
    totals, sample = selection_totals(inputs, markers, small_columns, num_classes)
    record_bytes = check_sample(sample, read_settings) + 4 * (num_classes or 0) * opts.probabilities + 200
    plan = dict.fromkeys(PLAN_FIELDS)
    if totals is not None:
        plan = make_plan(totals, opts, record_bytes)
    spill = use_files(opts.shuffle, local_runner, opts.output)
    if spill and not fs.is_local(opts.output):
        raise OptionsError("--shuffle files needs a local --output (spill files are read back at random)")
    # Counted in the pipeline, the number of shards follows from the inputs (their listing is checked on resume),
    # the size options and the sampled record size.
    sizing = () if totals is not None else ({"num_shards": opts.num_shards, "records_per_shard": opts.records_per_shard,
                                             "max_shard_bytes": opts.max_shard_bytes, "record_bytes": record_bytes},)
    fingerprint = fs.fingerprint(identity, opts.placement(plan["num_shards"], num_classes), *sizing)
    output = StageOutput(opts.output, contract.SHARDS.stage, contract.SHARDS.marker,
                         (contract.SHARDS.data_pattern, contract.SHARDS.errors_pattern), fingerprint)
    state = output.begin(opts.overwrite)
    if state == COMPLETE:
        return None
    if not content:  # said once the run goes ahead (not by a run that refuses or finds its output complete)
        echo(f"warning: {contract.NO_FINGERPRINT}")
    if state == RESUME:
        fs.delete_dir(output.tmp(SPILL))  # an interrupted run's spill files: never read again
        if totals is not None:
            plan["done"] = finished_shards(output, plan["num_shards"])
            echo(resuming(opts.output, "shard") + f": {len(plan['done'])} of {plan['num_shards']} shards already "
                 "written")
        else:
            echo(resuming(opts.output, "shard") + ": the shards already written are kept")
    return ShardContext(options=opts, output=output, inputs=inputs, columns=columns, read_settings=read_settings,
                        num_classes=num_classes, files=(), spill=spill, record_bytes=record_bytes,
                        teacher=teacher,
                        run_id=uuid.uuid4().hex[:12], started=time.time(), **plan)


def make_plan(totals: tuple[int, int, int], opts: ShardOptions, record_bytes: float,
              output: StageOutput | None = None) -> dict:
    """The run's plan (PLAN_FIELDS) from the selection's (rows, valid rows, records); with `output` (in the
    pipeline), the shards an interrupted run finished are looked up (two listings)."""
    total_rows, valid_rows, total_records = totals
    if total_records == 0:
        raise InputError(f"the selection has no rows to write ({total_rows:,} rows, none valid)")
    num_shards = resolve_num_shards(opts, total_records, record_bytes)
    return {"num_shards": num_shards, "file_groups": max(1, total_rows // FILES_PER_GROUP),
            "total_rows": total_rows, "valid_rows": valid_rows, "total_records": total_records,
            "done": finished_shards(output, num_shards) if output is not None else frozenset()}


def count_unit(unit: WorkUnit, columns: tuple[str, ...], num_classes: int | None) -> tuple[int, int, int]:
    """(rows, rows that pass the checks, their records) of one work unit: what make_plan is given, summed."""
    valid_rows, records, _ = scan_selection([unit], columns, num_classes, picked=set())
    return unit.num_rows, valid_rows, records


def add_totals(totals) -> tuple[int, int, int]:
    rows = valid = records = 0
    for r, v, n in totals:
        rows, valid, records = rows + r, valid + v, records + n
    return rows, valid, records


def selection_totals(inputs: TableInputs, markers: list[dict], columns: tuple[str, ...], num_classes: int | None
                     ) -> tuple[tuple[int, int, int] | None, list[dict]]:
    """((rows, rows that pass the checks, their records) or None, a sample of valid rows for check_sample), from
    at most SAMPLE_UNITS row groups: those spread over the first data file of each input when every input is a
    balance output whose stats.json counts its rows and copies (the totals are then the markers', if the sampled
    rows all pass the checks: balance writes no other), else those spread over `inputs.first`, and the totals
    are None: the pipeline counts them (count_unit, make_plan)."""
    first_files = [fs.join(path, contract.SELECTION.data_name(0)) for path, is_output in inputs.items if is_output]
    known = bool(markers) and inputs.marker_rows is not None and all("total_copies" in m for m in markers) \
        and all(fs.exists(f) for f in first_files)
    units = [WorkUnit(0, path, rg, meta.row_group(rg).num_rows) for path in (first_files if known else [inputs.first])
             for meta in [open_parquet(path).metadata] for rg in range(meta.num_row_groups)]
    picked = sorted(set(np.linspace(0, len(units) - 1, min(len(units), SAMPLE_UNITS)).astype(int))) if units else []
    sampled = [units[i] for i in picked]
    valid, _, sample = scan_selection(sampled, columns, num_classes, picked=set(range(len(sampled))))
    if known and valid == sum(u.num_rows for u in sampled):
        rows = inputs.marker_rows
        return (rows, rows, sum(int(m["total_copies"]) for m in markers)), sample
    return None, sample


def sidecar(output: StageOutput, name: str) -> str:
    """The note (records, bytes, classes) a writer leaves in the temp dir for shard `name` before renaming it."""
    return output.tmp(f"{name}.json")


def finished_shards(output: StageOutput, num_shards: int) -> frozenset[int]:
    """The shards an interrupted run finished (their sidecar written, the shard renamed into place), from one
    listing of the temp dir's sidecars and one of the output's shards: no request per shard."""
    noted = {fs.name(p)[:-len(".json")] for p in fs.list_dir(output.tmp_dir, contract.SHARDS.data_pattern + ".json")}
    placed = {fs.name(p) for p in fs.list_dir(output.path, contract.SHARDS.data_pattern)}
    return frozenset(s for s in range(num_shards) if contract.SHARDS.data_name(s, num_shards) in noted & placed)