"""Reading images: a work unit's (`read_unit`, for `label`) and, by source and offset, the images `label` read
(`read_back`, for `shard` and the report). A container that cannot be read, or a damaged record, becomes an error
record, never a stopped run."""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator

from ns_data import fs
from ns_data.sources.base import (DUPLICATE_INPUT, MISSING_SOURCE, UNREADABLE, ImageRecord, ImageUnit, ReadBack,
                                  ReadSettings, failed)
from ns_data.sources.registry import FORMATS, format_for, kind_of


def read_unit(unit: ImageUnit, settings: ReadSettings) -> Iterator[ImageRecord]:
    """The unit's images (or error records), at most `unit.limit` of them."""
    fmt = format_for(unit.kind)
    records = fmt.iterate(unit, settings, with_data=not unit.repeated)
    for n, record in enumerate(records):
        if unit.limit is not None and n >= unit.limit:
            return
        if unit.repeated and not record.error:
            record = replace(record, error=DUPLICATE_INPUT, detail="named by an earlier input too; labeled once")
        yield record


def read_back(source: str, offsets: list[int | None], image_column: str | None = None,
              input_format: str = "auto") -> ReadBack:
    """(bytes, None, "") or (None, reason, detail) for each image of `source` at `offsets` (as `label` wrote
    them; ascending), opening the source once and reading forward through it."""
    settings = ReadSettings(format=input_format, image_column=image_column)
    kind = "files" if offsets and offsets[0] is None else kind_of(source, input_format)
    if kind not in FORMATS:
        return failed(offsets, UNREADABLE, f"{source}: not a file of a known input format")
    return _guarded(source, offsets, format_for(kind).read_back, settings)


def _guarded(source: str, offsets: list, read, settings: ReadSettings) -> ReadBack:
    done = 0
    try:
        if not fs.exists(source):
            yield from failed(offsets, MISSING_SOURCE, f"{source} does not exist")
            return
        for result in read(source, offsets, settings):
            done += 1
            yield result
    except Exception as err:  # noqa: BLE001 - an unreadable source is data: its images become error rows
        yield from failed(offsets[done:], UNREADABLE, f"{type(err).__name__}: {err}")
