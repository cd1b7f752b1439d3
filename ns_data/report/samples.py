"""The sample grid: for a few classes spread over the class-size ranking, the most and the least confident rows,
their images read back from `source` and `offset` as `shard` reads them, as small JPEG thumbnails.

While a table streams by, the `n` most and `n` least confident rows of every class are kept (a fixed
[classes, n] array each; equal confidences: the earlier row), so the classes can be chosen after the pass.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ns_data import contract
from ns_data.images import DecodeError, decode_image
from ns_data.reading import WorkUnit, open_parquet
from ns_data.sources import ReadSettings, read_back

MOST, LEAST = "most", "least"
THUMBNAIL_QUALITY = 85


class _Kept:
    """The `n` rows of each class with the smallest keys so far, sorted; rows arrive in position order, so a key
    equal to a kept one never displaces it (the earlier row wins ties)."""

    def __init__(self, n: int):
        self.n = n
        self.key = np.full((0, n), np.inf)
        self.position = np.full((0, n), -1, np.int64)

    def add(self, labels: np.ndarray, keys: np.ndarray, positions: np.ndarray) -> None:
        classes = int(labels.max()) + 1
        if classes > len(self.key):
            grow = classes - len(self.key)
            self.key = np.concatenate([self.key, np.full((grow, self.n), np.inf)])
            self.position = np.concatenate([self.position, np.full((grow, self.n), -1, np.int64)])
        better = keys < self.key[labels, -1]
        if not better.any():
            return
        labels, keys, positions = labels[better], keys[better], positions[better]
        touched = np.unique(labels)
        all_labels = np.concatenate([np.repeat(touched, self.n), labels])
        all_keys = np.concatenate([self.key[touched].ravel(), keys])
        all_positions = np.concatenate([self.position[touched].ravel(), positions])
        order = np.lexsort((all_positions, all_keys, all_labels))
        starts = np.searchsorted(all_labels[order], touched)
        rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.append(starts, len(order))))
        keep = order[rank < self.n]
        self.key[touched] = all_keys[keep].reshape(len(touched), self.n)
        self.position[touched] = all_positions[keep].reshape(len(touched), self.n)

    def rows(self, label: int) -> list[tuple[int, float]]:
        """(position, key) of the class's kept rows, smallest key first."""
        if label >= len(self.key):
            return []
        return [(int(p), float(k)) for p, k in zip(self.position[label], self.key[label]) if np.isfinite(k)]


class SampleTracker:
    """The `n` most and `n` least confident rows of every class of a streamed table."""

    def __init__(self, n: int):
        self.n = n
        self._most, self._least = _Kept(n), _Kept(n)

    def add(self, labels: np.ndarray, confidence: np.ndarray, positions: np.ndarray) -> None:
        self._most.add(labels, -confidence, positions)
        self._least.add(labels, confidence, positions)

    def rows(self, label: int) -> list[tuple[str, int, float]]:
        """(MOST or LEAST, position, confidence) of a class: its most confident rows (descending), then its least
        confident ones not among them (descending too, so the grid reads from high to low)."""
        most = [(MOST, p, -k) for p, k in self._most.rows(label)]
        shown = {p for _, p, _ in most}
        least = [(LEAST, p, k) for p, k in reversed(self._least.rows(label)) if p not in shown]
        return most + least


def choose_classes(sizes: np.ndarray, count: int) -> list[int]:
    """`count` classes spread evenly over the ranking of non-empty classes by size (largest first, then class
    id): the largest, the smallest and classes between."""
    nonempty = np.flatnonzero(sizes > 0)
    if not len(nonempty) or count <= 0:
        return []
    ranked = nonempty[np.lexsort((nonempty, -sizes[nonempty]))]
    picks = np.unique(np.round(np.linspace(0, len(ranked) - 1, min(count, len(ranked)))).astype(int))
    return [int(c) for c in ranked[picks]]


@dataclass(frozen=True)
class Sample:
    """One shown row: a JPEG thumbnail, or why its image could not be shown."""

    label: int
    end: str  # MOST or LEAST
    id: str
    confidence: float
    thumbnail: bytes | None
    reason: str = ""
    detail: str = ""


@dataclass(frozen=True)
class ClassSamples:
    label: int
    size: int  # the class's size in the ranking the class was chosen from
    samples: list[Sample]


def _rows_at(units: list[WorkUnit], positions: list[int]) -> dict[int, dict]:
    """id, source and offset of the rows at `positions` (numbered across the units in order), reading only
    the row groups that hold them."""
    starts = np.cumsum([0] + [u.num_rows for u in units])
    found: dict[int, dict] = {}
    by_unit: dict[int, list[int]] = {}
    for position in sorted(positions):
        by_unit.setdefault(int(np.searchsorted(starts, position, side="right")) - 1, []).append(position)
    for index, wanted in by_unit.items():
        unit = units[index]
        table = open_parquet(unit.path).read_row_group(unit.row_group, columns=["id", "source", "offset"])
        taken = table.take(pa.array([p - int(starts[index]) for p in wanted])).to_pylist()
        found.update(zip(wanted, taken))
    return found


def thumbnail(data: bytes, size: int) -> bytes:
    """A JPEG of the image (upright, RGB, as the teacher saw it) fitting in size x size. Raises DecodeError."""
    image = decode_image(data)
    image.thumbnail((size, size))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=THUMBNAIL_QUALITY)
    return buffer.getvalue()


def read_samples(tracker: SampleTracker, units: list[WorkUnit], schema: pa.Schema, classes: list[int],
                 sizes: np.ndarray, thumbnail_size: int) -> list[ClassSamples]:
    """The chosen classes' rows with their thumbnails; each source is opened once and read forward."""
    chosen = {label: tracker.rows(label) for label in classes}
    rows = _rows_at(units, [p for picked in chosen.values() for _, p, _ in picked])
    settings = ReadSettings.from_metadata(contract.read_metadata(schema, contract.INPUT))
    by_source: dict[str, list[int]] = {}
    for position, row in sorted(rows.items(), key=lambda item: (item[1]["source"], item[1]["offset"] or 0)):
        by_source.setdefault(row["source"], []).append(position)
    images: dict[int, tuple[bytes | None, str, str]] = {}
    for source, positions in by_source.items():
        results = read_back(source, [rows[p]["offset"] for p in positions], image_column=settings.image_column,
                            input_format=settings.format)
        for position, (data, reason, detail) in zip(positions, results):
            if data is None:
                images[position] = (None, reason, detail)
                continue
            try:
                images[position] = (thumbnail(data, thumbnail_size), "", "")
            except DecodeError as err:
                images[position] = (None, err.reason, str(err))
    return [ClassSamples(label, int(sizes[label]), [
        Sample(label, end, rows[p]["id"], confidence, *images[p]) for end, p, confidence in chosen[label]])
        for label in classes]
