"""What a report shows of each output, gathered in bounded memory.

Counts come from the stage's own marker (stats.json, manifest.json, results.json) where it has them. A table's
per-class confidence comes from one pass over only the columns needed (label, confidence, entropy; id with
ground truth), a row group at a time, into fixed-size arrays: a class x confidence-bin histogram (per-class
counts are its row sums, percentiles are read off it), an entropy histogram, accuracy per confidence bin, and
the few rows per class a sample grid may show. Nothing grows with the number of rows.

Nor does the reading grow with the table: a table of more than SAMPLE_ROWS rows or SAMPLE_FILES files is read
as a deterministic sample (at most SAMPLE_FILES files evenly spaced in name order, and of their row groups evenly
spaced ones up to SAMPLE_ROWS rows; see choose_sample), and the page says so. A smaller table is read whole, so
its figures are exact.
"""
from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ns_data import contract, fs
from ns_data.progress import Progress
from ns_data.reading import WorkUnit, inspect_inputs, iter_batches, open_parquet
from ns_data.report.find import Found
from ns_data.report.samples import ClassSamples, SampleTracker
from ns_data.stage import InputError

CONFIDENCE_BINS = 100  # per-class percentiles are exact to 1/CONFIDENCE_BINS
ENTROPY_BIN_WIDTH = 0.02  # nats; the histogram grows to the largest entropy seen
ACCURACY_BINS = 10
PERCENTILES = (10, 25, 50, 75, 90)
SAMPLE_ROWS = 2_000_000  # a table of more rows is read as a sample of evenly spaced row groups
SAMPLE_FILES = 256  # the most data files a table's sample is drawn from


def confidence_bin(confidence: np.ndarray, bins: int) -> np.ndarray:
    """The bin of each confidence in [0, 1] among `bins` equal bins (1.0 falls in the last)."""
    return np.minimum((confidence * bins).astype(np.int64), bins - 1)


# ------------------------------------------------------------------------------------------- ground truth


@dataclass(frozen=True)
class GroundTruth:
    """The true class of some ids (--ground-truth: Parquet with id and label)."""

    path: str
    ids: pa.Array
    labels: np.ndarray


def read_ground_truth(path: str) -> GroundTruth:
    if not fs.exists(path):
        raise InputError(f"--ground-truth: file not found: {path}")
    parquet = open_parquet(path)
    contract.check_columns(path, parquet.schema_arrow, ("id", "label"), "--ground-truth needs columns id and label")
    table = parquet.read(columns=["id", "label"])
    return GroundTruth(path, table.column("id").combine_chunks().cast(pa.string()),
                       table.column("label").combine_chunks().fill_null(-1).to_numpy().astype(np.int64))


@dataclass
class Accuracy:
    """Pseudo labels against ground truth, per confidence bin: rows whose id has a true class, and how many of
    them the teacher got right."""

    ground_truth_rows: int
    rows: np.ndarray = field(default_factory=lambda: np.zeros(ACCURACY_BINS, np.int64))
    correct: np.ndarray = field(default_factory=lambda: np.zeros(ACCURACY_BINS, np.int64))

    def add(self, truth: GroundTruth, ids: pa.Array, labels: np.ndarray, confidence: np.ndarray) -> None:
        index = pc.index_in(ids.cast(pa.string()), value_set=truth.ids).to_numpy(zero_copy_only=False)
        matched = ~np.isnan(index.astype(np.float64))
        bins = confidence_bin(confidence[matched], ACCURACY_BINS)
        right = truth.labels[index[matched].astype(np.int64)] == labels[matched]
        self.rows += np.bincount(bins, minlength=ACCURACY_BINS)
        self.correct += np.bincount(bins, weights=right, minlength=ACCURACY_BINS).astype(np.int64)

    @property
    def overall(self) -> float | None:
        total = int(self.rows.sum())
        return int(self.correct.sum()) / total if total else None


# ------------------------------------------------------------------------------------------- table pass


def _grow_rows(array: np.ndarray, rows: int) -> np.ndarray:
    """`array` with zero rows appended up to `rows` rows."""
    if rows <= len(array):
        return array
    return np.concatenate([array, np.zeros((rows - len(array),) + array.shape[1:], array.dtype)])


@dataclass
class TableScan:
    """One pass over a table's rows, numbered across its row groups (`units`) in order so that a sample's row
    can be read back. Rows with a label outside [0, num_classes) or a confidence outside [0, 1] are counted as
    invalid and left out."""

    units: list[WorkUnit]
    schema: pa.Schema
    num_classes: int | None
    rows: int = 0
    invalid_rows: int = 0
    by_class_bin: np.ndarray = field(default_factory=lambda: np.zeros((0, CONFIDENCE_BINS), np.int64))
    entropy: np.ndarray | None = None  # counts per ENTROPY_BIN_WIDTH bin, when the table has entropy
    accuracy: Accuracy | None = None
    samples: SampleTracker | None = None
    files: int = 0  # the table's data files
    files_read: int = 0  # of them, the files the sampled row groups were chosen from
    table_rows: int | None = None  # rows of the whole table (None: not known, some footers not read)

    @property
    def sampled(self) -> bool:
        """Whether the scan read fewer rows than the table holds (the figures are of a sample)."""
        return self.files_read < self.files or sum(u.num_rows for u in self.units) != self.table_rows

    def add(self, batch: pa.RecordBatch, first_position: int, truth: GroundTruth | None) -> None:
        labels = batch.column("label").fill_null(-1).to_numpy().astype(np.int64)  # nulls: invalid
        confidence = batch.column("confidence").fill_null(np.nan).to_numpy().astype(np.float64)
        valid = (labels >= 0) & (confidence >= 0) & (confidence <= 1)  # NaN compares false
        if self.num_classes is not None:
            valid &= labels < self.num_classes
        self.rows += len(labels)
        self.invalid_rows += int((~valid).sum())
        positions = np.flatnonzero(valid) + first_position
        labels, confidence = labels[valid], confidence[valid]
        if not len(labels):
            return
        classes = self.num_classes or max(len(self.by_class_bin), int(labels.max()) + 1)
        self.by_class_bin = _grow_rows(self.by_class_bin, classes)
        flat = labels * CONFIDENCE_BINS + confidence_bin(confidence, CONFIDENCE_BINS)
        self.by_class_bin += np.bincount(flat, minlength=classes * CONFIDENCE_BINS).reshape(classes, -1)
        if self.entropy is not None:
            entropy = batch.column("entropy").to_numpy(zero_copy_only=False).astype(np.float64)[valid]
            entropy = entropy[np.isfinite(entropy) & (entropy >= 0)]
            counts = np.bincount((entropy / ENTROPY_BIN_WIDTH).astype(np.int64))
            self.entropy = _grow_rows(self.entropy, len(counts))
            self.entropy[: len(counts)] += counts
        if self.accuracy is not None:
            self.accuracy.add(truth, batch.column("id").filter(pa.array(valid)), labels, confidence)
        if self.samples is not None:
            self.samples.add(labels, confidence, positions)

    @property
    def per_class(self) -> np.ndarray:
        """Valid rows per class (0 .. the largest class seen, or num_classes)."""
        return self.by_class_bin.sum(axis=1)

    @property
    def confidence_counts(self) -> np.ndarray:
        return self.by_class_bin.sum(axis=0)

    def percentiles(self) -> np.ndarray:
        """[classes, PERCENTILES] per-class confidence percentiles, linear within a bin; NaN for empty classes."""
        return histogram_percentiles(self.by_class_bin, np.array(PERCENTILES) / 100.0)


def histogram_percentiles(hist: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """Quantiles of each row of a histogram of [0, 1] in equal bins, interpolated linearly within the bin."""
    bins = hist.shape[1]
    totals = hist.sum(axis=1, keepdims=True).astype(np.float64)
    cdf = np.cumsum(hist, axis=1)
    out = np.full((len(hist), len(quantiles)), np.nan)
    for j, q in enumerate(quantiles):
        target = q * totals  # [classes, 1]
        index = np.minimum((cdf < target).sum(axis=1), bins - 1)
        rows = np.arange(len(hist))
        before = np.where(index > 0, cdf[rows, np.maximum(index - 1, 0)], 0)
        inside = np.maximum(hist[rows, index], 1)
        value = (index + np.clip((target[:, 0] - before) / inside, 0, 1)) / bins
        out[:, j] = np.where(totals[:, 0] > 0, value, np.nan)
    return out


def evenly_spaced(count: int, total: int) -> list[int]:
    """`count` indexes of range(total) spread evenly, the first and the last included (all when count >= total)."""
    if count >= total:
        return list(range(total))
    if count <= 0:
        return []
    if count == 1:
        return [0]
    return [int(i) for i in np.unique(np.round(np.linspace(0, total - 1, count)).astype(np.int64))]


@dataclass(frozen=True)
class TableSample:
    """The row groups a scan reads: all of them when the table fits the budget, else evenly spaced ones."""

    schema: pa.Schema
    units: list[WorkUnit]
    files: int  # data files of the table
    files_read: int  # of them, the files whose footers were read
    table_rows: int | None  # rows of the whole table: summed from the footers when all were read, else as given


def choose_sample(files: list[str], required: tuple[str, ...], *, max_rows: int, max_files: int,
                  total_rows: int | None = None) -> TableSample:
    """At most `max_files` files (evenly spaced in name order; no more than the row budget needs at the
    table's average rows per file when `total_rows` is given) are opened, and of their row groups, evenly spaced
    ones up to `max_rows` rows (at least one) are read. A table within both budgets is read whole."""
    if not files:
        return TableSample(pa.schema([]), [], 0, 0, 0)
    count = min(len(files), max_files)
    if total_rows is not None:
        per_file = max(total_rows / len(files), 1.0)
        count = min(count, max(1, math.ceil(max_rows / per_file)))
    opened = [files[i] for i in evenly_spaced(count, len(files))]
    schema, units = inspect_inputs(opened, required, hint="the report reads label and confidence")
    in_files = sum(u.num_rows for u in units)
    if len(opened) == len(files):
        total_rows = in_files
    if in_files > max_rows:
        picked = [units[i] for i in evenly_spaced(max(1, len(units) * max_rows // in_files), len(units))]
        rows = np.cumsum([u.num_rows for u in picked])
        units = picked[: max(1, int((rows <= max_rows).sum()))]
    units = [replace(u, index=i) for i, u in enumerate(units)]
    return TableSample(schema, units, len(files), len(opened), total_rows)


def scan_table(files: list[str], *, truth: GroundTruth | None, samples_per_class: int, batch_rows: int,
               progress: bool, echo: Callable[[str], None], max_rows: int = SAMPLE_ROWS,
               max_files: int = SAMPLE_FILES, total_rows: int | None = None) -> TableScan:
    """One pass over (a bounded sample of, see choose_sample) the Parquet files of an output, only the columns
    the report needs; the class count is the one recorded in their metadata, when it is. `total_rows` is the
    table's row count from its marker, when known. No files (every image failed): an empty scan."""
    sample = choose_sample(files, ("label", "confidence") + (("id",) if truth else ()), max_rows=max_rows,
                           max_files=max_files, total_rows=total_rows)
    schema, units = sample.schema, sample.units
    scan = TableScan(units, schema, contract.num_classes(schema), files=sample.files, files_read=sample.files_read,
                     table_rows=sample.table_rows,
                     entropy=np.zeros(0, np.int64) if "entropy" in schema.names else None,
                     accuracy=Accuracy(len(truth.labels)) if truth else None,
                     samples=SampleTracker(samples_per_class) if samples_per_class else None)
    columns = [c for c in ("id", "label", "confidence", "entropy") if c in schema.names and (c != "id" or truth)]
    total = sum(u.num_rows for u in units)
    if progress and files:
        rows = f"{scan.table_rows:,} rows" if scan.table_rows is not None else "rows"
        of = f" (a sample: the table has {rows} in {len(files):,} files)" if scan.sampled else ""
        echo(f"report: reading {fs.split(files[0])[0]}: {total:,} rows in {sample.files_read:,} file(s){of}")
    meter = Progress(uuid.uuid4().hex[:12], "report", total, progress)
    position = 0
    for unit in units:
        for start, batch in iter_batches(unit, columns, batch_rows):
            scan.add(batch, position + start, truth)
            meter.add(batch.num_rows)
        position += unit.num_rows
    return scan


# ------------------------------------------------------------------------------------------- per output


@dataclass
class LabelsReport:
    """A `label` output: its stats.json and one pass over its labels files."""

    found: Found
    names: list[str] | None
    scan: TableScan
    samples: list[ClassSamples] = field(default_factory=list)

    @property
    def stats(self) -> dict:
        return self.found.marker


@dataclass
class SelectionReport:
    """A `balance` output: per class (classes with candidates, by class id) from its stats.json; a pass over
    its selection files only for samples or ground truth."""

    found: Found
    names: list[str] | None
    classes: np.ndarray
    candidates: np.ndarray
    selected: np.ndarray
    copies: np.ndarray
    min_confidence_selected: np.ndarray  # NaN where nothing was selected
    scan: TableScan | None
    samples: list[ClassSamples] = field(default_factory=list)

    @property
    def stats(self) -> dict:
        return self.found.marker


@dataclass
class ShardsReport:
    """A `shard` output: all from its manifest.json."""

    found: Found
    names: list[str] | None

    @property
    def manifest(self) -> dict:
        return self.found.marker


@dataclass
class RunReport:
    """An `ns-train` run: results.json, the lines of metrics.jsonl (train steps and evaluations), config.yaml."""

    found: Found
    steps: list[dict]
    evaluations: list[dict]
    config_text: str

    @property
    def results(self) -> dict:
        return self.found.marker

    @property
    def name(self) -> str:
        return fs.name(self.found.path)


def selection_classes(stats: dict) -> dict[str, np.ndarray]:
    """The per-class part of a selection's stats.json as arrays, by class id."""
    items = sorted((int(label), c) for label, c in stats["classes"].items())

    def column(key: str, dtype) -> np.ndarray:
        return np.array([c[key] if c[key] is not None else np.nan for _, c in items], dtype)

    return {"classes": np.array([label for label, _ in items], np.int64),
            "candidates": column("candidates", np.int64), "selected": column("selected", np.int64),
            "copies": column("copies", np.int64),
            "min_confidence_selected": column("min_confidence_selected", np.float64)}


def read_run(found: Found) -> RunReport:
    steps, evaluations = [], []
    metrics_path = fs.join(found.path, contract.TRAIN_RUN.metrics)
    if fs.exists(metrics_path):
        for line in fs.read_bytes(metrics_path).decode("utf-8").splitlines():
            if line.strip():
                record = json.loads(line)
                (evaluations if "eval" in record else steps).append(record)
    config_path = fs.join(found.path, contract.TRAIN_RUN.config)
    config = fs.read_bytes(config_path).decode("utf-8") if fs.exists(config_path) else ""
    return RunReport(found, steps, evaluations, config)
