"""`ns-data report`: one self-contained HTML page that shows what a mix of outputs holds.

    find.py     which outputs the directories hold (complete or unfinished)
    collect.py  bounded statistics of each (markers, one column pass per table)
    samples.py  the sample grid: classes chosen by size, rows by confidence, images read back as `shard` does
    plots.py    matplotlib figures as data URIs
    html.py     the page, every number in a parseable table

Statistics come from each stage's marker where it has them; a labels (or selection) table is read once, a row
group at a time and only the columns needed, into fixed-size arrays, so memory does not grow with its rows; a
large table is read as a bounded, deterministic sample (collect.choose_sample), and the page says so. Each
directory given is listed once (find.py), and the outputs' data files are taken from that listing. Images are
read only for the samples shown: from the selection when the report has one, else from the labels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa

from ns_data import class_names, contract, fs
from ns_data.reading import open_parquet
from ns_data.report import html
from ns_data.report.collect import (SAMPLE_FILES, SAMPLE_ROWS, LabelsReport, SelectionReport, ShardsReport,
                                    read_ground_truth, read_run, scan_table, selection_classes)
from ns_data.report.find import Found, find_outputs
from ns_data.report.plots import require_matplotlib
from ns_data.report.samples import choose_classes, read_samples
from ns_data.stage import OptionsError


@dataclass(frozen=True)
class ReportOptions:
    dirs: tuple[str, ...]
    output: str
    class_names: str | None = None  # a names file that overrides the names recorded by the teacher
    ground_truth: str | None = None  # Parquet with id, label: pseudo-label accuracy against confidence
    sample_classes: int = 6
    samples_per_class: int = 3  # the most confident and as many least confident rows per class
    thumbnail_size: int = 96
    batch_rows: int = 131_072
    sample_rows: int = SAMPLE_ROWS  # a table of more rows (or files) is read as a sample of this many rows
    sample_files: int = SAMPLE_FILES  # ... drawn from at most this many of its files
    progress: bool = True

    def __post_init__(self):
        if not self.dirs:
            raise OptionsError("give at least one DIR")
        if not self.output:
            raise OptionsError("--output is required")
        if self.sample_classes < 0 or self.samples_per_class < 0:
            raise OptionsError("--sample-classes and --samples-per-class must be >= 0")
        if not 16 <= self.thumbnail_size <= 512:
            raise OptionsError(f"--thumbnail-size must be in [16, 512], got {self.thumbnail_size}")
        if self.batch_rows < 1:
            raise OptionsError("--batch-rows must be >= 1")
        if self.sample_rows < 1 or self.sample_files < 1:
            raise OptionsError("--sample-rows and --sample-files must be >= 1")

    @property
    def samples_wanted(self) -> bool:
        return self.sample_classes > 0 and self.samples_per_class > 0


@dataclass
class ReportSummary:
    """What was written: the page's path and a line per output found."""

    path: str
    lines: list[str] = field(default_factory=list)


class _Report:
    """The state of one report while outputs are read: options, names, ground truth."""

    def __init__(self, opts: ReportOptions, echo: Callable[[str], None]):
        self.opts = opts
        self.echo = echo
        self.user_names = class_names.read_file(opts.class_names) if opts.class_names else None
        self.truth = read_ground_truth(opts.ground_truth) if opts.ground_truth else None

    def names(self, teacher: dict | None, num_classes: int | None) -> list[str] | None:
        """The user's names (checked against the output's class count) or else the teacher's."""
        if self.user_names is None:
            return class_names.of_teacher(teacher)
        return class_names.read_file(self.opts.class_names, num_classes) if num_classes else self.user_names

    def scan(self, files: list[str], samples: bool, total_rows: int | None):
        return scan_table(files, truth=self.truth, samples_per_class=self.opts.samples_per_class if samples else 0,
                          batch_rows=self.opts.batch_rows, progress=self.opts.progress, echo=self.echo,
                          max_rows=self.opts.sample_rows, max_files=self.opts.sample_files, total_rows=total_rows)

    def samples(self, scan, sizes: np.ndarray):
        if scan is None or scan.samples is None or not {"id", "source", "offset"} <= set(scan.schema.names):
            return []
        classes = choose_classes(sizes, self.opts.sample_classes)
        return read_samples(scan.samples, scan.units, scan.schema, classes, sizes, self.opts.thumbnail_size)

    def labels(self, found: Found, samples: bool) -> LabelsReport:
        scan = self.scan(list(found.files), samples, found.marker.get("labeled"))
        report = LabelsReport(found, self.names(contract.teacher_of(found.marker, scan.schema), scan.num_classes),
                              scan)
        report.samples = self.samples(scan, scan.per_class)
        return report

    def selection(self, found: Found) -> SelectionReport:
        stats = found.marker
        per_class = selection_classes(stats)
        files = list(found.files)
        wanted = self.opts.samples_wanted or self.truth is not None
        scan = self.scan(files, self.opts.samples_wanted, stats.get("selected_rows")) if wanted else None
        schema = scan.schema if scan else open_parquet(files[0]).schema_arrow if files else pa.schema([])
        num_classes = contract.num_classes(schema) or (stats.get("options") or {}).get("num_classes")
        teacher = contract.teacher_of(stats, schema)
        report = SelectionReport(found, self.names(teacher, num_classes), scan=scan, **per_class)
        sizes = np.zeros(int(per_class["classes"].max(initial=-1)) + 1, np.int64)
        sizes[per_class["classes"]] = np.where(per_class["selected"] > 0, per_class["candidates"], 0)
        report.samples = self.samples(scan, sizes)
        return report

    def shards(self, found: Found) -> ShardsReport:
        manifest = found.marker
        return ShardsReport(found, self.names(manifest.get("teacher"), manifest.get("num_classes")))


def holds(found: Found) -> str:
    """What an output holds, in the stage's own numbers."""
    marker = found.marker
    if marker is None:
        return f"unfinished (no {found.kind.marker}), not read"
    if found.kind is contract.LABELS:
        return f"{marker.get('labeled', 0):,} images labeled, {marker.get('errors', 0):,} errors"
    if found.kind is contract.SELECTION:
        return (f"{marker['selected_rows']:,} rows kept of {marker['candidates']:,} candidates in "
                f"{len(marker['classes']):,} classes, {marker['total_copies']:,} with copies")
    if found.kind is contract.SHARDS:
        return (f"{marker['records']:,} records of {marker['unique_images']:,} images in "
                f"{len(marker['shards']):,} shards")
    evals = [(which, (marker.get(which) or {}).get("top1")) for which in ("eval", "eval_ema")]
    return f"{marker.get('step', 0):,} steps" + "".join(f", {w} top1 {v:.4f}" for w, v in evals if v is not None)


def summary_line(found: Found) -> str:
    """One line per output for the terminal: stage, path, what it holds."""
    return f"{found.kind.stage:<8} {found.path}: {holds(found)}"


def write_report(opts: ReportOptions, echo: Callable[[str], None] = print) -> ReportSummary:
    """Finds the outputs in opts.dirs, reads each within bounded memory, writes the page atomically."""
    require_matplotlib()
    state = _Report(opts, echo)
    found = find_outputs(opts.dirs)
    samples_from_labels = not any(f.kind is contract.SELECTION and f.complete for f in found)
    summary = ReportSummary(opts.output)
    sections, section_ids, runs = [], {}, []
    titles = {contract.LABELS: "Pseudo labels", contract.SELECTION: "Selection", contract.SHARDS: "Shards"}
    for f in found:
        summary.lines.append(summary_line(f))
        if not f.complete:
            continue
        if f.kind is contract.TRAIN_RUN:
            runs.append(read_run(f))
            continue
        section_id = section_ids[f.path] = f"out-{len(section_ids) + 1}"
        if f.kind is contract.LABELS:
            body = html.labels_section(section_id, state.labels(f, samples_from_labels and opts.samples_wanted))
        elif f.kind is contract.SELECTION:
            body = html.selection_section(section_id, state.selection(f))
        else:
            body = html.shards_section(section_id, state.shards(f))
        sections.append(html.section(section_id, f, titles[f.kind], body))
    if runs:
        section_ids.update({run.found.path: html.RUNS for run in runs})
        sections.append(html.runs_section(runs))
    overview = html.outputs_table(found, section_ids, {f.path: holds(f) for f in found})
    page = html.page(opts.dirs, overview, sections, opts.thumbnail_size)
    fs.write_atomic(opts.output, page.encode("utf-8"))
    return summary

