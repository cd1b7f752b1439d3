"""The report page: one self-contained HTML file (inline CSS, images as data: URIs, no script, nothing fetched).

Every number shown sits in a table cell with `data-col` (the column) and `data-value` (the exact value,
unformatted), tables and sections have stable ids, and sample images carry their class, id and confidence in
data- attributes, so a test (or a script) reads back what the page shows with html.parser.
"""
from __future__ import annotations

import base64
from dataclasses import dataclass
from html import escape

import numpy as np

from ns_data.class_names import display
from ns_data.report import plots
from ns_data.report.collect import (ACCURACY_BINS, ENTROPY_BIN_WIDTH, PERCENTILES, Accuracy, LabelsReport,
                                    RunReport, SelectionReport, ShardsReport, TableScan)
from ns_data.report.find import Found
from ns_data.report.samples import ClassSamples

RUNS = "runs"  # the id of the training runs' section

STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px auto; max-width: 1240px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; border-bottom: 1px solid #ddd; padding-bottom: 4px; margin-top: 40px; }
h3 { font-size: 15px; margin-top: 22px; }
table { border-collapse: collapse; margin: 8px 0; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ddd; padding: 2px 8px; text-align: right; }
th { background: #f4f4f4; } td.text, th.text { text-align: left; }
img.plot { max-width: 100%; display: block; margin: 8px 0; }
.muted { color: #777; }
details > summary { cursor: pointer; color: #1f5fa8; margin: 6px 0; }
.class-row { display: flex; flex-wrap: wrap; gap: 6px; align-items: flex-start; margin: 8px 0; }
.class-name { width: 150px; font-weight: 600; font-size: 13px; }
figure.sample { margin: 0; width: SIZEpx; font-size: 11px; text-align: center; }
figure.sample img, .placeholder { width: SIZEpx; height: SIZEpx; object-fit: contain; background: #f4f4f4; }
.placeholder { display: flex; flex-direction: column; justify-content: center; font-size: 10px; color: #a00;
  overflow: hidden; word-break: break-all; }
figure.least figcaption { color: #a05000; }
pre { background: #f7f7f7; padding: 8px; overflow-x: auto; font-size: 12px; }
"""


@dataclass(frozen=True)
class Column:
    key: str
    heading: str
    text: bool = False  # left-aligned text, not a number
    anchor: bool = False  # the value is the id of a section of the page: shown as a link to it
    shown: str | None = None  # the row key whose value is shown instead (data-value keeps this column's)


def _value(value) -> tuple[str, str]:
    """(data-value, shown text) of a cell."""
    if value is None or (isinstance(value, (float, np.floating)) and not np.isfinite(value)):
        return "", "–"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value)).lower(), "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return str(int(value)), f"{int(value):,}"
    if isinstance(value, (float, np.floating)):
        return repr(float(value)), f"{float(value):,.4f}"
    return str(value), str(value)


def table(table_id: str, columns: list[Column], rows: list[dict], caption: str = "") -> str:
    head = "".join(f'<th class="{"text" if c.text else ""}">{escape(c.heading)}</th>' for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            raw, shown = _value(row.get(c.key))
            if c.shown:
                shown = _value(row.get(c.shown))[1]
            shown = f'<a href="#{escape(raw)}">{escape(shown)}</a>' if c.anchor and raw else escape(shown)
            cells.append(f'<td class="{"text" if c.text else ""}" data-col="{escape(c.key)}" '
                         f'data-value="{escape(raw)}">{shown}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    cap = f"<caption>{escape(caption)}</caption>" if caption else ""
    return f'<table id="{escape(table_id)}">{cap}<thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def key_values(table_id: str, items: list[tuple[str, object]]) -> str:
    """A two-column table of named numbers (`data-col` key and value)."""
    return table(table_id, [Column("key", "", text=True), Column("value", "")],
                 [{"key": k, "value": v} for k, v in items])


def _img(uri: str, alt: str) -> str:
    return f'<img class="plot" src="{uri}" alt="{escape(alt)}">'


def _details(summary: str, body: str) -> str:
    return f"<details><summary>{escape(summary)}</summary>{body}</details>"


def _names(labels, names: list[str] | None) -> list[str]:
    return [display(int(label), names) for label in labels]


def _reasons(section: str, counts: dict[str, int], what: str) -> str:
    """Rows by reason: a table and bars, or a line saying there were none."""
    if not counts:
        return f'<p class="muted" id="{section}-no-errors">No {escape(what)}.</p>'
    rows = [{"reason": r, "rows": n} for r, n in sorted(counts.items())]
    return (table(f"{section}-errors", [Column("reason", "reason", text=True), Column("rows", "rows")], rows)
            + _img(plots.reasons(counts, what), what))


def _accuracy(section: str, accuracy: Accuracy | None) -> str:
    if accuracy is None:
        return ""
    edges = np.linspace(0, 1, ACCURACY_BINS + 1)
    rows = [{"low": float(edges[i]), "high": float(edges[i + 1]), "rows": int(accuracy.rows[i]),
             "correct": int(accuracy.correct[i]),
             "accuracy": accuracy.correct[i] / accuracy.rows[i] if accuracy.rows[i] else None}
            for i in range(ACCURACY_BINS)]
    summary = key_values(f"{section}-accuracy-summary", [
        ("ground truth rows", accuracy.ground_truth_rows), ("rows with ground truth", int(accuracy.rows.sum())),
        ("correct", int(accuracy.correct.sum())), ("accuracy", accuracy.overall)])
    columns = [Column("low", "confidence from"), Column("high", "to"), Column("rows", "rows"),
               Column("correct", "correct"), Column("accuracy", "accuracy")]
    return ("<h3>Pseudo-label accuracy against ground truth</h3>" + summary
            + _img(plots.accuracy(edges, accuracy.rows, accuracy.correct), "accuracy per confidence bin")
            + table(f"{section}-accuracy", columns, rows))


def _samples(section: str, groups: list[ClassSamples], names: list[str] | None, size_name: str) -> str:
    if not groups:
        return ""
    rows = []
    for group in groups:
        figures = []
        for s in group.samples:
            attrs = (f'data-class="{s.label}" data-end="{s.end}" data-id="{escape(s.id)}" '
                     f'data-confidence="{s.confidence!r}" data-reason="{escape(s.reason)}"')
            if s.thumbnail is not None:
                uri = "data:image/jpeg;base64," + base64.b64encode(s.thumbnail).decode("ascii")
                picture = f'<img src="{uri}" alt="{escape(s.id)}" title="{escape(s.id)}">'
            else:
                picture = (f'<div class="placeholder" title="{escape(s.detail)}">{escape(s.reason)}<br>'
                           f'{escape(s.detail[:120])}</div>')
            figures.append(f'<figure class="sample {s.end}" {attrs}>{picture}'
                           f'<figcaption>{escape(s.end)} {s.confidence:.3f}</figcaption></figure>')
        rows.append(f'<div class="class-row" data-class="{group.label}"><div class="class-name">'
                    f'{escape(display(group.label, names))}<br><span class="muted">{group.size:,} {size_name}</span>'
                    f'</div>{"".join(figures)}</div>')
    return (f"<h3>Samples: the most and the least confident rows of {len(groups)} classes</h3>"
            f'<p class="muted">Classes spread over the ranking by {escape(size_name)}, largest first. '
            "Confidence ties: the earlier row.</p>"
            f'<div class="samples" id="{section}-samples">{"".join(rows)}</div>')


def _sample_note(section: str, scan: TableScan | None, shown: str, more: str = "") -> str:
    """A line saying that `shown` comes from a sample of the table, and of how many rows; none when the whole
    table was read."""
    if scan is None or not scan.sampled:
        return ""
    rows = f"{scan.table_rows:,}" if scan.table_rows is not None else "unknown"
    return (f'<p class="muted" id="{section}-sample" data-rows="{scan.rows}" data-files="{scan.files_read}">'
            f"{escape(shown)} come from a sample of the table: {scan.rows:,} rows of {rows} in {len(scan.units):,} "
            f"evenly spaced row groups of {scan.files_read:,} of its {scan.files:,} files.{escape(more)}</p>")


def labels_section(section: str, report: LabelsReport) -> str:
    stats, scan = report.stats, report.scan
    counts = scan.per_class
    classes = np.flatnonzero(counts)
    teacher = stats.get("teacher") or {}
    summary = key_values(f"{section}-summary", [
        ("images read", stats.get("images_read")), ("labeled", stats.get("labeled")),
        ("errors", stats.get("errors")), ("rows in the labels files", scan.table_rows),
        ("rows read", scan.rows), ("sampled", scan.sampled),
        ("invalid rows (label or confidence)", scan.invalid_rows), ("teacher", teacher.get("model")),
        ("classes of the teacher", scan.num_classes), ("classes with rows", len(classes))])
    parts = [summary, _sample_note(section, scan, "The figures, the per-class table, the accuracy and the samples",
                                      " Images per class are counts in the sample.")]
    if len(classes):
        by_size = classes[np.lexsort((classes, -counts[classes]))]
        parts.append(_img(plots.class_sizes(counts[by_size], _names(by_size, report.names),
                                            "images per class", "images"), "images per class"))
        pct = scan.percentiles()
        by_median = classes[np.lexsort((classes, pct[classes, 2]))]
        parts.append(_img(plots.confidence_bands(pct[by_median], _names(by_median, report.names)),
                          "confidence per class"))
        parts.append(_img(plots.histograms(scan.confidence_counts, scan.entropy, ENTROPY_BIN_WIDTH),
                          "confidence and entropy histograms"))
        columns = [Column("class", "class"), Column("name", "name", text=True), Column("images", "images")] + [
            Column(f"p{p}", f"p{p}") for p in PERCENTILES]
        rows = [{"class": int(c), "name": display(int(c), report.names), "images": int(counts[c]),
                 **{f"p{p}": float(pct[c, j]) for j, p in enumerate(PERCENTILES)}} for c in classes]
        parts.append(_details(f"per class: {len(classes):,} classes", table(f"{section}-classes", columns, rows)))
    parts.append("<h3>Errors by reason</h3>" + _reasons(section, stats.get("errors_by_reason") or {},
                                                         "images that could not be labeled"))
    parts.append(_accuracy(section, scan.accuracy))
    parts.append(_samples(section, report.samples, report.names, "images"))
    return "".join(parts)


def selection_section(section: str, report: SelectionReport) -> str:
    stats = report.stats
    options = stats.get("options") or {}
    summary = key_values(f"{section}-summary", [
        ("input rows", stats.get("input_rows")), ("rejected", stats.get("rejected_rows")),
        ("below --min-confidence", stats.get("below_min_confidence")), ("candidates", stats.get("candidates")),
        ("not kept", stats.get("not_kept")), ("kept (unique rows)", stats.get("selected_rows")),
        ("rows with copies", stats.get("total_copies")), ("--per-class", options.get("per_class")),
        ("--min-confidence", options.get("min_confidence")), ("--upsample", options.get("upsample"))])
    parts = [summary, _sample_note(section, report.scan, "The accuracy and the samples")]
    if len(report.classes):
        order = np.lexsort((report.classes, -report.candidates))
        with np.errstate(invalid="ignore", divide="ignore"):
            duplication = np.where(report.selected > 0, report.copies / np.maximum(report.selected, 1), np.nan)
        parts.append(_img(plots.selection(report.candidates[order], report.selected[order],
                                          report.min_confidence_selected[order], duplication[order],
                                          _names(report.classes[order], report.names),
                                          float(options.get("min_confidence", 0.0))), "selection per class"))
        columns = [Column("class", "class"), Column("name", "name", text=True), Column("candidates", "candidates"),
                   Column("selected", "kept"), Column("copies", "copies"), Column("copies_per_row", "copies / kept"),
                   Column("min_confidence_selected", "cut (least confidence kept)")]
        rows = [{"class": int(c), "name": display(int(c), report.names), "candidates": int(report.candidates[i]),
                 "selected": int(report.selected[i]), "copies": int(report.copies[i]),
                 "copies_per_row": float(duplication[i]),
                 "min_confidence_selected": float(report.min_confidence_selected[i])}
                for i, c in enumerate(report.classes)]
        parts.append(_details(f"per class: {len(rows):,} classes", table(f"{section}-classes", columns, rows)))
    parts.append("<h3>Rejected rows by reason</h3>" + _reasons(section, stats.get("rejected_by_reason") or {},
                                                                "rejected rows"))
    parts.append(_accuracy(section, report.scan.accuracy if report.scan else None))
    parts.append(_samples(section, report.samples, report.names, "candidates"))
    return "".join(parts)


def shards_section(section: str, report: ShardsReport) -> str:
    manifest = report.manifest
    summary = key_values(f"{section}-summary", [
        ("records", manifest.get("records")), ("unique images", manifest.get("unique_images")),
        ("records per image", manifest["records"] / manifest["unique_images"] if manifest.get("unique_images")
         else None), ("shards", len(manifest.get("shards", []))), ("bytes", manifest.get("bytes")),
        ("errors", manifest.get("errors")), ("records lost to errors", manifest.get("records_lost_to_errors"))])
    shard_list = manifest.get("shards", [])
    parts = [summary, _img(plots.shards(np.array([s["records"] for s in shard_list])), "records per shard"),
             _details(f"per shard: {len(shard_list):,} shards", table(
                 f"{section}-shards", [Column("name", "shard", text=True), Column("records", "records"),
                                       Column("bytes", "bytes")], shard_list))]
    per_class = sorted((int(label), n) for label, n in (manifest.get("classes") or {}).items())
    if per_class:
        labels = np.array([label for label, _ in per_class])
        records = np.array([n for _, n in per_class])
        order = np.lexsort((labels, -records))
        parts.append(_img(plots.class_sizes(records[order], _names(labels[order], report.names),
                                            "records per class", "records"), "records per class"))
        rows = [{"class": label, "name": display(label, report.names), "records": n} for label, n in per_class]
        parts.append(_details(f"per class: {len(rows):,} classes", table(
            f"{section}-classes", [Column("class", "class"), Column("name", "name", text=True),
                                   Column("records", "records")], rows)))
    parts.append("<h3>Errors by reason</h3>" + _reasons(section, manifest.get("errors_by_reason") or {},
                                                         "rows not written"))
    return "".join(parts)


def _metric(evaluation: dict | None, key: str):
    return (evaluation or {}).get(key)


def run_names(reports: list[RunReport]) -> list[str]:
    """Each run's directory name, with as many parent directories as it takes to tell the runs apart
    (`seed-0/runs/teacher` and `seed-1/runs/teacher`)."""
    parts = [run.found.path.rstrip("/").split("/") for run in reports]
    for depth in range(1, max(map(len, parts), default=1) + 1):
        names = ["/".join(p[-depth:]) for p in parts]
        if len(set(names)) == len(names):
            return names
    return names


def _curves(reports: list[RunReport], names: list[str]) -> dict[str, dict]:
    """{panel: {line: (steps, values)}}: the logged loss parts and learning rate, and the evaluations (EMA
    dashed) when some run was evaluated during training, not only at its end (a single point is no curve)."""
    logged = {"loss_total": "loss_total", "loss_labeled": "loss_labeled", "loss_unlabeled": "loss_unlabeled",
              "lr": "learning rate"}
    during = any(len(run.evaluations) > 1 for run in reports)
    evaluated = {"top1": "eval top1", "loss": "eval loss"} if during else {}
    curves: dict[str, dict] = {title: {} for title in (*logged.values(), *evaluated.values())}
    for run, name in zip(reports, names):
        for key, title in logged.items():
            points = [(r["step"], r[key]) for r in run.steps if r.get(key) is not None]
            if points:
                curves[title][name] = tuple(np.array(v) for v in zip(*points))
        for which, suffix in (("eval", ""), ("eval_ema", " (ema)")):
            for metric, title in evaluated.items():
                points = [(r["step"], r[which][metric]) for r in run.evaluations
                          if _metric(r.get(which), metric) is not None]
                if points:
                    curves[title][name + suffix] = tuple(np.array(v) for v in zip(*points))
    return curves


def runs_section(reports: list[RunReport]) -> str:
    """All runs in one section: their results side by side, their curves overlaid, each one's evaluations."""
    names = run_names(reports)
    evaluations = [(which, metric) for which in ("eval", "eval_ema") for metric in ("top1", "top5", "loss", "images")]
    rows = [{"run": name, "path": run.found.path, "name": run.found.name, "steps": run.results.get("step"),
             **{f"{w}_{m}": _metric(run.results.get(w), m) for w, m in evaluations}}
            for run, name in zip(reports, names)]
    columns = [Column("run", "run", text=True), Column("steps", "steps")] + [
        Column(f"{w}_{m}", f"{w} {m}") for w, m in evaluations if m != "images"] + [
        Column("path", "path", text=True, shown="name")]
    parts = [table(f"{RUNS}-results", columns, rows),
             _img(plots.final_top1(names, [r["eval_top1"] for r in rows], [r["eval_ema_top1"] for r in rows]),
                  "final top-1 of each run"),
             _img(plots.runs(_curves(reports, names)), "training curves")]
    for i, (run, name) in enumerate(zip(reports, names)):
        rows = [{"step": r["step"], **{f"{w}_{m}": _metric(r.get(w), m) for w, m in evaluations}}
                for r in run.evaluations]
        parts.append(_details(f"{name}: evaluations and config.yaml", table(
            f"{RUNS}-{i + 1}-evaluations", [Column("step", "step")] + [
                Column(f"{w}_{m}", f"{w} {m}") for w, m in evaluations], rows)
            + f"<pre>{escape(run.config_text)}</pre>"))
    return f'<section id="{RUNS}"><h2>Training runs</h2>{"".join(parts)}</section>'


def outputs_table(found: list[Found], sections: dict[str, str], lines: dict[str, str]) -> str:
    rows = [{"kind": f.kind.stage, "path": f.path, "name": f.name, "state": "complete" if f.complete else "unfinished",
             "section": sections.get(f.path, ""), "summary": lines[f.path]} for f in found]
    return table("outputs", [Column("kind", "stage", text=True), Column("path", "output", text=True, shown="name"),
                             Column("state", "state", text=True), Column("summary", "summary", text=True),
                             Column("section", "section", text=True, anchor=True)], rows)


def section(section_id: str, found: Found, title: str, body: str) -> str:
    return (f'<section id="{section_id}" data-kind="{escape(found.kind.stage)}" data-path="{escape(found.path)}">'
            f"<h2>{escape(title)}: {escape(found.name)}</h2>{body}</section>")


def page(directories: tuple[str, ...], overview: str, sections: list[str], thumbnail_size: int) -> str:
    style = STYLE.replace("SIZEpx", f"{thumbnail_size}px")
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>ns-data report</title><style>{style}</style></head><body>"
            f"<h1>ns-data report</h1><p>{escape(' '.join(directories))}</p>"
            f"<h2>Outputs</h2>{overview}{''.join(sections)}</body></html>\n")
