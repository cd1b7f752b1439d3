"""Reading Parquet tables: their footers checked, then their rows in record batches.

A work unit is one row group of one file, or (as ReadUnits makes them) a run of consecutive row groups, across
files, of about UNIT_BYTES: the grain of parallelism and of output files, and (with the row index inside it) a
row's identity during a run. Many small input files then cost what few large ones do: the per-unit work (spill
files, output files, shuffle parts) follows the bytes, not the files. Files are opened through `ns_data.fs`, so
any Beam filesystem works.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq

from ns_data import contract, fs
from ns_data.outputs import check_listing
from ns_data.stage import InputError


UNIT_BYTES = 64 * 2**20  # a unit made by ReadUnits closes once its row groups hold this many (compressed) bytes
UNIT_ROWS = 4_000_000  # ... or this many rows (row indexes in a unit stay far below 2**32)


@dataclass(frozen=True)
class WorkUnit:
    """Row groups read in order as one table: (path, row_group) first, then `more` ((path, row group, rows)
    each); `num_rows` counts them all."""

    index: int
    path: str
    row_group: int
    num_rows: int
    more: tuple[tuple[str, int, int], ...] = ()

    @property
    def parts(self) -> tuple[tuple[str, int, int], ...]:
        """(path, row group, rows) of each row group, in reading order."""
        first = self.num_rows - sum(n for _, _, n in self.more)
        return ((self.path, self.row_group, first),) + self.more

    @property
    def paths(self) -> list[str]:
        return sorted({path for path, _, _ in self.parts})


def open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path if fs.is_local(path) else fs.open_read(path))
    except (OSError, pa.ArrowInvalid) as err:
        raise InputError(f"{path}: cannot read as Parquet: {err}") from err


def inspect_inputs(files: list[str], required: tuple[str, ...], reserved: tuple[str, ...] = (), hint: str = ""
                   ) -> tuple[pa.Schema, list[WorkUnit]]:
    """Read every footer: required columns and known types checked (contract.check_columns), one schema for all
    files; the row groups listed as work units."""
    schema: pa.Schema | None = None
    first = None
    units: list[WorkUnit] = []
    for path in files:
        file_schema, meta = check_footer(path, required, reserved, hint, schema, first)
        if schema is None:
            schema, first = file_schema, path
        for rg in range(meta.num_row_groups):
            units.append(WorkUnit(len(units), path, rg, meta.row_group(rg).num_rows))
    if schema is None:
        raise InputError("no input files")
    return schema, units


def iter_batches(unit: WorkUnit, columns: list[str] | None, batch_rows: int
                 ) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row index in the unit, batch) for the unit's rows, `batch_rows` at a time (a batch never spans
    two row groups)."""
    start = 0
    for path, groups in _runs_of_files(unit):
        for batch in open_parquet(path).iter_batches(batch_size=batch_rows, row_groups=groups, columns=columns):
            yield start, batch
            start += batch.num_rows


def read_unit(unit: WorkUnit, columns: list[str] | None) -> pa.Table:
    """A unit's rows as one table."""
    tables = [open_parquet(path).read_row_groups(groups, columns=columns) for path, groups in _runs_of_files(unit)]
    return pa.concat_tables(tables) if len(tables) > 1 else tables[0]


def _runs_of_files(unit: WorkUnit) -> list[tuple[str, list[int]]]:
    """The unit's row groups as (path, row groups) runs: each file opened once."""
    runs: list[tuple[str, list[int]]] = []
    for path, group, _ in unit.parts:
        if runs and runs[-1][0] == path:
            runs[-1][1].append(group)
        else:
            runs.append((path, [group]))
    return runs


# ------------------------------------------------------------------------------------------- inputs


LAUNCH_CHECK_FILES = 1000  # Parquet files the launcher lists of a plain Parquet input, at most


@dataclass(frozen=True)
class TableInputs:
    """The Parquet inputs of a stage as the launcher resolves them, without listing them; what the job carries
    of them (no file list).

    `items`: (input as an absolute path or glob, whether it is a complete output of the previous stage: its
    data files are read). `marker_rows`: the rows the markers of those outputs count (None when an input is
    plain Parquet); `estimated_rows`: those plus, for plain Parquet inputs, the bytes of the files the launcher
    listed (at most LAUNCH_CHECK_FILES an input: a lower bound for larger inputs) times the rows per byte of a
    checked file. `schema`: the schema of `first`, whose footer the launcher read, with the teacher in brief
    (contract.with_footer_teacher; resolve_inputs returns the whole identity apart, so that the steps that carry
    the inputs do not carry class names); the launcher reads one footer per input, every other file is listed
    and checked in the pipeline (ReadUnits)."""

    items: tuple[tuple[str, bool], ...]
    schema: pa.Schema
    first: str
    marker_rows: int | None
    estimated_rows: int


def resolve_inputs(inputs, kind: contract.OutputKind, rows_key: str, required: tuple[str, ...],
                   reserved: tuple[str, ...] = (), hint: str = ""
                   ) -> tuple[TableInputs, list[dict], list[tuple], dict | None]:
    """Each input checked on the launcher at a cost that does not grow with it: a complete `kind` output by its
    marker (its `rows_key` counts its rows) and the footer of its first data file; any other input (a glob, a
    file, Parquet files below a directory) by a listing that stops after LAUNCH_CHECK_FILES Parquet files and
    the footer of the first of them. Fails with one line before any output is touched. Returns the inputs, the
    markers read, what identifies the inputs for a fingerprint: (output, its marker's fingerprint) for a stage
    output, (input, "parquet") for plain Parquet: the pattern, not the files it matches (ReadUnits records the
    run's listing and stops a resumed run whose listing differs), and the teacher's identity of the input that
    holds `first` (contract.teacher_of: its marker's, else its footer's; None when neither records one)."""
    if not inputs:
        raise InputError("no input given")
    items, markers, parts, first_files = [], [], [], []
    marker_of: dict[str, dict] = {}  # the marker of the output each first file belongs to
    marker_rows, plain_bytes, plain = 0, 0, None
    for item in inputs:
        marker = contract.stage_output(item, kind)
        if marker is not None:
            first = fs.join(item, kind.data_name(0))
            if not fs.exists(first):
                listed = contract.some_input_files(item, True, kind, 1)
                if not listed:
                    raise InputError(f"input not found or empty: {item}")
                first = listed[0][0]
            items.append((fs.absolute(item), True))
            markers.append(marker)
            marker_rows += int(marker.get(rows_key, 0))
            parts.append((fs.absolute(item), marker.get("fingerprint", "")))
            first_files.append(first)
            marker_of[first] = marker
            continue
        files = sorted(contract.some_input_files(item, False, kind, LAUNCH_CHECK_FILES))
        if not files:
            raise InputError(f"input not found or empty: {item}")
        items.append((fs.absolute(item), False))
        parts.append((fs.absolute(item), "parquet"))
        plain_bytes += sum(n for _, n in files)
        plain = files[0]
        first_files.append(files[0][0])
    schema, first = None, None
    for path in sorted(first_files):  # the schema of the first file in path order, as when all are listed
        file_schema, _ = check_footer(path, required, reserved, hint, schema, first)
        if schema is None:
            schema, first = file_schema, path
    estimated = marker_rows
    if plain is not None:
        estimated += int(plain_bytes * open_parquet(plain[0]).metadata.num_rows / max(1, plain[1]))
    teacher = contract.teacher_of(marker_of.get(first), schema)
    return (TableInputs(items=tuple(items), schema=contract.with_footer_teacher(schema), first=first,
                        marker_rows=None if plain is not None else marker_rows, estimated_rows=estimated),
            markers, parts, teacher)


def check_footer(path: str, required: tuple[str, ...], reserved: tuple[str, ...], hint: str,
                 schema: pa.Schema | None, first: str | None) -> tuple[pa.Schema, pq.FileMetaData]:
    """One file's footer: required columns and known types (contract.check_columns), no reserved column, and
    the same schema as `first`'s (when given)."""
    meta_file = open_parquet(path)
    file_schema = meta_file.schema_arrow
    contract.check_columns(path, file_schema, required, hint)
    for name in reserved:
        if name in file_schema.names:
            raise InputError(f"{path}: has a column named '{name}', which this stage writes")
    if schema is not None and not file_schema.remove_metadata().equals(schema.remove_metadata()):
        raise InputError(f"{path}: schema differs from {first}:\n{file_schema}\nvs\n{schema}")
    return file_schema, meta_file.metadata


def list_item(item: tuple[str, bool], kind: contract.OutputKind) -> list[tuple[str, int]]:
    """(absolute path, size) of the Parquet files of one resolved input."""
    path, is_output = item
    return [(fs.absolute(p), n) for p, n in contract.input_files(path, is_output, kind)]


class ReadUnits(beam.PTransform):
    """A pipeline's root in, its work units out: the inputs listed, every footer read and checked against the
    launcher's schema, the row groups taken in file order (the order of `inspect_inputs`) and cut into units of
    about `unit_bytes` (default UNIT_BYTES). The job carries only the inputs as given; the listing and the
    footers are pipeline data. With `listing_dir` (the run's temp dir), the listing's files and bytes are
    checked there first (outputs.check_listing): a resumed run whose inputs changed stops before any unit."""

    def __init__(self, inputs: TableInputs, kind: contract.OutputKind, required: tuple[str, ...],
                 reserved: tuple[str, ...] = (), hint: str = "", unit_bytes: int | None = None,
                 listing_dir: str | None = None):
        super().__init__()
        self.inputs, self.kind, self.unit_bytes, self.listing_dir = inputs, kind, unit_bytes, listing_dir
        self.check = (required, reserved, hint)

    def expand(self, root):
        inputs, kind, check = self.inputs, self.kind, self.check
        files = (root
                 | "Inputs" >> beam.Create(list(inputs.items))
                 | "ListInputs" >> beam.FlatMap(list_item, kind)
                 | "CollectFiles" >> beam.combiners.ToList()
                 | "SortFiles" >> beam.Map(_checked_listing, self.listing_dir))
        footers = (files
                   | "NumberFiles" >> beam.FlatMap(lambda paths: list(enumerate(paths)))
                   | "SpreadFiles" >> beam.Reshuffle()
                   | "ReadFooters" >> beam.Map(_row_groups, check, inputs.schema, inputs.first))
        return (footers
                | "CollectFooters" >> beam.combiners.ToList()
                | "NumberUnits" >> beam.FlatMap(_number_units, self.unit_bytes or UNIT_BYTES))


def _checked_listing(found: list[tuple[str, int]], listing_dir: str | None) -> list[str]:
    """The listed files' paths, sorted, once (with `listing_dir`) their number and bytes are those the run's
    first pass recorded."""
    found = sorted(set(found))
    if listing_dir is not None:
        check_listing((len(found), sum(n for _, n in found)), listing_dir, "files")
    return [path for path, _ in found]


def _row_groups(indexed: tuple[int, str], check: tuple, schema: pa.Schema, first: str
                ) -> tuple[int, str, list[tuple[int, int]]]:
    """(file index, path, (rows, compressed bytes) of each row group)."""
    index, path = indexed
    _, meta = check_footer(path, *check, schema, first)
    groups = [meta.row_group(rg) for rg in range(meta.num_row_groups)]
    return index, path, [(g.num_rows, sum(g.column(c).total_compressed_size for c in range(g.num_columns)))
                         for g in groups]


def _number_units(footers: list[tuple[int, str, list[tuple[int, int]]]], unit_bytes: int = UNIT_BYTES,
                  unit_rows: int = UNIT_ROWS) -> list[WorkUnit]:
    """The row groups in file order, cut into units of about `unit_bytes` (or `unit_rows`): the same listing
    gives the same units."""
    units: list[WorkUnit] = []
    parts: list[tuple[str, int, int]] = []
    rows = nbytes = 0

    def close():
        (path, group, _), *more = parts
        units.append(WorkUnit(len(units), path, group, rows, tuple(more)))

    for _, path, groups in sorted(footers):
        for group, (n, size) in enumerate(groups):
            parts.append((path, group, n))
            rows, nbytes = rows + n, nbytes + size
            if nbytes >= unit_bytes or rows >= unit_rows:
                close()
                parts, rows, nbytes = [], 0, 0
    if parts:
        close()
    return units
