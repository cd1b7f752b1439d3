"""The planning: `label`'s work units from its INPUTs.

The launcher only turns each INPUT into a pattern and checks it cheaply (`plan_inputs`); listing the files,
reading Parquet footers and forming work units happen inside the pipeline (`PlanUnits`), so neither the launch
nor the job grows with the corpus.

The id root is the input's root (the directory given, the fixed part of a glob, a file's directory) when
there is one input or all share one root; with several roots, it is their longest common parent, so
`label a/ b/` names `a/x.jpg` and `b/x.jpg` apart.
"""
from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import replace
from typing import Iterator

import apache_beam as beam

from ns_data import fs
from ns_data.sources.base import ImageUnit, ReadSettings
from ns_data.sources.listing import (InputPattern, ListInputs, Listed, check_input_file, input_kind, input_pattern,
                                     input_root, mark_repeats, match_input)
from ns_data.sources.registry import FORMATS, format_for
from ns_data.stage import InputError

MIN_FILES_PER_UNIT = 128  # four teacher batches at the default --batch-size
MAX_FILES_PER_UNIT = 1024
LAUNCH_CHECK_FILES = 1000  # files the launcher lists per input to check it holds images


def plan_inputs(inputs, settings: ReadSettings = ReadSettings()
                ) -> tuple[tuple[InputPattern, ...], str, ReadSettings]:
    """The inputs' patterns, their id root, and the settings with the Parquet image column resolved, checked at
    a cost that does not grow with the inputs: each pattern lists at most LAUNCH_CHECK_FILES files, and the
    first file seen of each format checks the settings (`ImageFormat.checked_settings`: one Parquet footer gives
    or checks the image column).

    An input whose first LAUNCH_CHECK_FILES files hold no image or container is an error here; past that, the
    pipeline's listing decides (an input with only other files then adds no rows). Parquet files that lack the
    column are error rows of the run (`unreadable_file`)."""
    if settings.format not in ("auto",) + tuple(FORMATS):
        raise InputError(f"unknown input format {settings.format!r}; one of auto, {', '.join(FORMATS)}")
    if not inputs:
        raise InputError("give at least one INPUT")
    patterns, roots, first_of_kind = [], set(), {}
    for index, item in enumerate(inputs):
        check_input_file(item)
        pattern = input_pattern(item)
        found = list(itertools.islice(match_input(pattern), LAUNCH_CHECK_FILES))
        kinds = [(p, input_kind(p, reason, settings.format)) for p, _, reason, _ in found]
        kinds = [(p, k) for p, k in kinds if k]  # an unusable file is kind files: never taken for a footer
        if not kinds and len(found) < LAUNCH_CHECK_FILES:
            raise InputError(f"no images or image containers found in {item}" + (
                " (pass --input-format for files without a known extension)" if settings.format == "auto" else ""))
        for path, kind in kinds:
            if kind not in first_of_kind:
                first_of_kind[kind] = fs.absolute(path)
        patterns.append(InputPattern(index, pattern))
        roots.add(input_root(item))
    roots = sorted(roots)
    id_root = roots[0] if len(roots) == 1 else fs.common_root(roots)
    for kind, path in first_of_kind.items():
        settings = format_for(kind).checked_settings(path, settings)
    return tuple(patterns), id_root, settings


def files_per_unit(total_files: int) -> int:
    """Image files go MIN_FILES_PER_UNIT or more to a unit, about 64 units in all, at most MAX_FILES_PER_UNIT:
    enough units to spread and resume, few enough files out. Not a function of --batch-size."""
    return min(MAX_FILES_PER_UNIT, max(MIN_FILES_PER_UNIT, math.ceil(total_files / 64)))


def _digest(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest(), "big")


def file_bucket(entry: Listed, total_files: int) -> tuple[str, tuple[str, int, str, str]]:
    """(unit key, (path, size)) of a loose image file: its bucket is a hash of its path into as many buckets as the
    listing's count of loose files asks, so units do not depend on the order of the listing nor on workers."""
    buckets = max(1, math.ceil(total_files / files_per_unit(total_files)))
    repeated = "/repeated" if entry.repeated else ""
    return (f"files/{_digest(entry.path) % buckets:06d}-of-{buckets:06d}{repeated}",
            (entry.path, entry.size, entry.reason, entry.detail))


def files_unit(element, id_root: str) -> ImageUnit:
    key, files = element
    files = sorted(files)
    return ImageUnit(key, "files", tuple(f[0] for f in files), id_root, repeated=key.endswith("/repeated"),
                     nbytes=sum(f[1] for f in files), faults=tuple((p, r, d) for p, _, r, d in files if r))


def container_units(entry: Listed, id_root: str, settings: ReadSettings) -> list[ImageUnit]:
    """A container's work units, as its format splits it (a TFRecord or tar: one; a Parquet file: one per row
    group)."""
    key = f"{entry.kind}/{entry.path}" + ("/repeated" if entry.repeated else "")
    unit = ImageUnit(key, entry.kind, (entry.path,), id_root, repeated=entry.repeated, nbytes=entry.size)
    return format_for(entry.kind).units(unit, settings)


def order_key(entry: Listed) -> tuple:
    """The inputs' order for --max-images: input by input, its own files before its repeats, by format, by path."""
    return entry.input_index, entry.repeated, tuple(FORMATS).index(entry.kind), entry.path


def limited_units(entries: list[Listed], max_images: int, id_root: str, settings: ReadSettings
                  ) -> Iterator[ImageUnit]:
    """--max-images: units holding the first `max_images` images of the inputs in `order_key` order (files are
    one image each; containers are counted through). Among the first `max_images` files listed (the most that
    can be needed unless containers are empty)."""
    entries = sorted(entries, key=order_key)
    group = max(MIN_FILES_PER_UNIT, min(MAX_FILES_PER_UNIT, max_images // 64))
    units: list[ImageUnit] = []
    i = 0
    while i < len(entries):
        entry = entries[i]
        if entry.kind == "files":
            run = [entry]
            while (len(run) < group and i + len(run) < len(entries) and entries[i + len(run)].kind == "files"
                   and entries[i + len(run)].repeated == entry.repeated):
                run.append(entries[i + len(run)])
            units.append(ImageUnit("", "files", tuple(e.path for e in run), id_root, repeated=entry.repeated,
                                   nbytes=sum(e.size for e in run),
                                   faults=tuple((e.path, e.reason, e.detail) for e in run if e.reason)))
            i += len(run)
        else:
            units += container_units(entry, id_root, settings)
            i += 1
    left = max_images
    for n, unit in enumerate(units):
        if left <= 0:
            return
        count = format_for(unit.kind).count(unit, settings)
        yield replace(unit, key=f"limited/{n:06d}", limit=min(count, left))
        left -= count


class PlanUnits(beam.PTransform):
    """The run's work units from its input patterns, inside the pipeline: the patterns are listed (a file named
    by two inputs is labeled once and reported once more as `duplicate_input`), loose image files grouped by a
    hash of their path into buckets sized by the listing's count, containers one unit each (a Parquet file one
    per row group). Units are a function of the listing only: the same for a killed run and its rerun."""

    def __init__(self, patterns: tuple[InputPattern, ...], id_root: str, settings: ReadSettings,
                 max_images: int | None = None):
        super().__init__()
        self.patterns, self.id_root, self.settings, self.max_images = patterns, id_root, settings, max_images

    def expand(self, pbegin):
        listed = (pbegin
                  | "List" >> ListInputs(self.patterns, self.settings.format)
                  | "ByPath" >> beam.GroupByKey()
                  | "MarkRepeats" >> beam.FlatMap(mark_repeats))
        return listed | "FormUnits" >> FormUnits(self.id_root, self.settings, self.max_images)


class FormUnits(beam.PTransform):
    """The work units of the listed files (`Listed`), whatever the order they come in."""

    def __init__(self, id_root: str, settings: ReadSettings, max_images: int | None = None):
        super().__init__()
        self.id_root, self.settings, self.max_images = id_root, settings, max_images

    def expand(self, listed):
        if self.max_images is not None:
            return (listed
                    | "FirstListed" >> beam.combiners.Top.Smallest(self.max_images, key=order_key)
                    | "LimitedUnits" >> beam.FlatMap(limited_units, self.max_images, self.id_root, self.settings))
        loose = listed | "LooseFiles" >> beam.Filter(lambda e: e.kind == "files")
        count = loose | "CountFiles" >> beam.combiners.Count.Globally()
        file_units = (loose
                      | "Bucket" >> beam.Map(file_bucket, beam.pvalue.AsSingleton(count))
                      | "GroupBuckets" >> beam.GroupByKey()
                      | "FileUnits" >> beam.Map(files_unit, self.id_root))
        container = (listed
                     | "Containers" >> beam.Filter(lambda e: e.kind != "files")
                     | "ContainerUnits" >> beam.FlatMap(container_units, self.id_root, self.settings))
        return (file_units, container) | "Units" >> beam.Flatten()
