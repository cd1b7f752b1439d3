"""Finding Parquet inputs, checking their schema before any work starts, and reading them in record batches.

A work unit is one row group of one file: the grain of parallelism, and (with the row index inside it) a
row's identity during a run. Paths go through Beam's FileSystems, so gs:// and other Beam filesystems work.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems

GLOB_CHARS = set("*?[")


class InputError(ValueError):
    """A missing file or a table that does not fit the expected schema: reported before the run."""


@dataclass(frozen=True)
class WorkUnit:
    index: int
    path: str
    row_group: int
    num_rows: int


def _is_local(path: str) -> bool:
    return "://" not in path


def expand_inputs(inputs: list[str] | tuple[str, ...]) -> list[str]:
    """Files named by paths, globs or directories (all *.parquet below a directory), sorted, each once."""
    if not inputs:
        raise InputError("no input given")
    found: set[str] = set()
    for item in inputs:
        if _is_local(item) and os.path.isdir(item):
            pattern = os.path.join(item, "**", "*.parquet")
            matches = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
        else:
            is_glob = bool(GLOB_CHARS & set(item))
            pattern = item if is_glob or item.endswith(".parquet") else item.rstrip("/") + "/*.parquet"
            matches = [m.path for m in FileSystems.match([pattern])[0].metadata_list]
            if not matches and not is_glob and not item.endswith(".parquet"):
                matches = [m.path for m in FileSystems.match([item])[0].metadata_list]
        if not matches:
            raise InputError(f"input not found or empty: {item}")
        found.update(matches)
    return sorted(found)


def open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path if _is_local(path) else FileSystems.open(path))
    except (OSError, pa.ArrowInvalid) as err:
        raise InputError(f"{path}: cannot read as Parquet: {err}") from err


def _check_type(path: str, name: str, typ: pa.DataType) -> None:
    ok = {
        "id": pa.types.is_string(typ) or pa.types.is_large_string(typ),
        "label": pa.types.is_integer(typ),
        "confidence": pa.types.is_floating(typ),
    }[name]
    if not ok:
        expected = {"id": "string", "label": "an integer type (int32)", "confidence": "a float type (float32)"}
        raise InputError(f"{path}: column '{name}' has type {typ}; expected {expected[name]}")


def inspect_inputs(files: list[str], required: tuple[str, ...], reserved: tuple[str, ...] = ()
                   ) -> tuple[pa.Schema, list[WorkUnit]]:
    """Read every footer: check required columns and types, one schema for all files; list the row groups."""
    schema: pa.Schema | None = None
    first = None
    units: list[WorkUnit] = []
    for path in files:
        meta_file = open_parquet(path)
        file_schema = meta_file.schema_arrow
        for name in required:
            if name not in file_schema.names:
                raise InputError(f"{path}: missing required column '{name}' (has: {', '.join(file_schema.names)})")
            _check_type(path, name, file_schema.field(name).type)
        for name in reserved:
            if name in file_schema.names:
                raise InputError(f"{path}: has a column named '{name}', which this stage writes")
        if schema is None:
            schema, first = file_schema, path
        elif not file_schema.remove_metadata().equals(schema.remove_metadata()):
            raise InputError(f"{path}: schema differs from {first}:\n{file_schema}\nvs\n{schema}")
        for rg in range(meta_file.num_row_groups):
            units.append(WorkUnit(len(units), path, rg, meta_file.metadata.row_group(rg).num_rows))
    assert schema is not None
    return schema, units


def iter_batches(unit: WorkUnit, columns: list[str] | None, batch_rows: int
                 ) -> Iterator[tuple[int, pa.RecordBatch]]:
    """(first row index in the unit, batch) for the unit's rows, `batch_rows` at a time."""
    start = 0
    for batch in open_parquet(unit.path).iter_batches(batch_size=batch_rows, row_groups=[unit.row_group],
                                                       columns=columns):
        yield start, batch
        start += batch.num_rows
