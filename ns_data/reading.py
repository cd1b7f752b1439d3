"""Reading Parquet tables: their footers checked before any work starts, then their rows in record batches.

A work unit is one row group of one file: the grain of parallelism, and (with the row index inside it) a
row's identity during a run. Files are opened through `ns_data.fs`, so any Beam filesystem works.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from ns_data import contract, fs
from ns_data.stage import InputError


@dataclass(frozen=True)
class WorkUnit:
    index: int
    path: str
    row_group: int
    num_rows: int


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
        meta_file = open_parquet(path)
        file_schema = meta_file.schema_arrow
        contract.check_columns(path, file_schema, required, hint)
        for name in reserved:
            if name in file_schema.names:
                raise InputError(f"{path}: has a column named '{name}', which this stage writes")
        if schema is None:
            schema, first = file_schema, path
        elif not file_schema.remove_metadata().equals(schema.remove_metadata()):
            raise InputError(f"{path}: schema differs from {first}:\n{file_schema}\nvs\n{schema}")
        for rg in range(meta_file.num_row_groups):
            units.append(WorkUnit(len(units), path, rg, meta_file.metadata.row_group(rg).num_rows))
    if schema is None:
        raise InputError("no input files")
    return schema, units


def iter_batches(unit: WorkUnit, columns: list[str] | None, batch_rows: int
                 ) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row index in the unit, batch) for the unit's rows, `batch_rows` at a time."""
    start = 0
    for batch in open_parquet(unit.path).iter_batches(batch_size=batch_rows, row_groups=[unit.row_group],
                                                       columns=columns):
        yield start, batch
        start += batch.num_rows
