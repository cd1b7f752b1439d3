"""Parquet files with an image-bytes column: id = the `id` column if present, else the container's path + '#' +
row; offset = the row index. One work unit per row group."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa

from ns_data import fs
from ns_data.reading import open_parquet
from ns_data.sources.base import CORRUPT_RECORD, UNREADABLE, ImageFormat, ImageRecord
from ns_data.sources.registry import register
from ns_data.stage import InputError


@register
class Parquet(ImageFormat):
    kind = "parquet"
    extensions = (".parquet",)

    def checked_settings(self, path, settings):
        """The image column: the one given, checked against this file's schema, or `image_column`'s guess."""
        return replace(settings, image_column=_column(open_parquet(path).schema_arrow, path, settings))

    def units(self, unit, settings):
        """One unit per row group (the footer read here); the one unit given, which reads as an error record,
        when the footer or the image column is not there."""
        path = unit.paths[0]
        try:
            pf = open_parquet(path)
            _column(pf.schema_arrow, path, settings)
            groups = pf.num_row_groups
        except Exception:  # noqa: BLE001 - read again by the unit, which makes the reason its error record
            return [unit]
        return [replace(unit, key=f"{unit.key}#{g}", row_group=g, nbytes=unit.nbytes if g == 0 else 0)
                for g in range(groups)]

    def count(self, unit, settings):
        if unit.row_group is None:
            return super().count(unit, settings)
        return open_parquet(unit.paths[0]).metadata.row_group(unit.row_group).num_rows

    def iterate(self, unit, settings, with_data=True):
        """A row group's images; a file whose footer, image column or row group cannot be read is one error
        record (`row_group` None: the planning found it unreadable)."""
        path = unit.paths[0]
        name = fs.relative_to(path, unit.id_root)
        try:
            pf = open_parquet(path)
            column = _column(pf.schema_arrow, path, settings)
            if unit.row_group is None:
                raise InputError(f"{path}: cannot read its row groups")
            ids = settings.id_column if settings.id_column in pf.schema_arrow.names else None
            first = sum(pf.metadata.row_group(g).num_rows for g in range(unit.row_group))
            table = pf.read_row_group(unit.row_group, columns=[column] + ([ids] if ids else []))
        except Exception as err:  # noqa: BLE001 - an unreadable container is an error record, not a crash
            where = "" if unit.row_group is None else f"row-group-{unit.row_group}"
            yield ImageRecord(f"{name}#{where}", path, None, error=UNREADABLE, detail=f"{type(err).__name__}: {err}")
            return
        values = table.column(column).to_pylist()
        keys = table.column(ids).to_pylist() if ids else [None] * len(values)
        for i, (data, key) in enumerate(zip(values, keys)):
            row = first + i
            rid = str(key) if key is not None else f"{name}#{row}"
            if data is None:
                yield ImageRecord(rid, path, row, error=CORRUPT_RECORD, detail=f"null {column}")
            else:
                yield ImageRecord(rid, path, row, data)

    def read_back(self, source, offsets, settings):
        pf = open_parquet(source)
        column = _column(pf.schema_arrow, source, settings)
        ends = np.cumsum([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)])
        groups = np.searchsorted(ends, np.asarray(offsets), side="right")
        values: dict[int, bytes | None] = {}
        for g in np.unique(groups):
            if g >= len(ends):
                continue
            first = int(ends[g - 1]) if g else 0
            wanted = [r for r, rg in zip(offsets, groups) if rg == g]
            taken = pf.read_row_group(int(g), columns=[column]).column(column).take([r - first for r in wanted])
            values.update(zip(wanted, taken.to_pylist()))
        for row in offsets:
            data = values.get(row)
            yield (data, None, "") if data is not None else (None, CORRUPT_RECORD, f"no {column} bytes at row {row}")


def _column(schema: pa.Schema, path: str, settings) -> str:
    """The image column of a file: the one the settings name (an InputError when the file lacks it), else
    `image_column`'s guess."""
    if settings.image_column is None:
        return image_column(schema, path)
    if settings.image_column not in schema.names:
        raise InputError(f"{path}: no column '{settings.image_column}' (has: {', '.join(schema.names)})")
    return settings.image_column


def image_column(schema: pa.Schema, path: str) -> str:
    """The image-bytes column: one named image/image_bytes/jpg/png/bytes, or the only binary one."""
    binary = [f.name for f in schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    for name in ("image", "image_bytes", "jpg", "png", "bytes"):
        if name in binary:
            return name
    if len(binary) == 1:
        return binary[0]
    raise InputError(f"{path}: cannot tell which column holds image bytes (binary columns: {binary}); "
                     "pass --image-column")
