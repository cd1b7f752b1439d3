"""`ns-data report`: the numbers on the page equal the stages' own stats, manifests, results and files; the
sample grid shows the right rows deterministically; the page references nothing outside itself; outputs are
found in directories, unfinished ones listed; user errors are one line."""
from __future__ import annotations

import base64
import glob
import io
import json
import os
import shutil
import sys
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from ns_data import contract, outputs
from ns_data.cli import main
from ns_data.report import ReportOptions, write_report
from ns_data.report import collect
from ns_data.report.collect import CONFIDENCE_BINS, RunReport, histogram_percentiles
from ns_data.report.find import Found
from ns_data.report.html import run_names
from ns_data.report.samples import SampleTracker
from ns_data.stage import OptionsError
from ns_data.synth import write_images
from tests.test_seams import invoke, read_table

CLASSES = 10
TEACHER = ["--teacher", "test_efficientnet", "--random-weights", "--num-classes", str(CLASSES)]
TRAIN = ["--model", "test_resnet", "--num-classes", str(CLASSES), "--image-size", "32", "--batch-size", "4",
         "--unlabeled-ratio", "1", "--workers", "0", "--no-progress"]


# ------------------------------------------------------------------------------------------- reading the page


class Page(HTMLParser):
    """What a report shows, read back: tables by id (rows of {data-col: data-value}), sections, sample figures,
    and every src/href/link the page holds."""

    def __init__(self, text: str):
        super().__init__()
        self.tables: dict[str, list[dict]] = {}
        self.sections: dict[str, dict] = {}  # path -> attributes
        self.samples: dict[str, list[dict]] = {}  # section id -> figure attributes, in page order
        self.sources: list[str] = []
        self.tags: set[str] = set()
        self._table = self._row = self._section = self._figure = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        if "src" in a:
            self.sources.append(a["src"])
        if tag == "section":
            self._section = a["id"]
            if "data-path" in a:
                self.sections[a["data-path"]] = a
        elif tag == "table":
            self._table = self.tables.setdefault(a["id"], [])
        elif tag == "tr" and self._table is not None:
            self._row = {}
        elif tag == "td" and self._row is not None:
            self._row[a["data-col"]] = a["data-value"]
        elif tag == "figure" and "sample" in a.get("class", ""):
            self._figure = a
            self.samples.setdefault(self._section, []).append(a)
        elif tag == "img" and self._figure is not None:
            self._figure["src"] = a["src"]

    def handle_endtag(self, tag):
        if tag == "tr" and self._row:
            self._table.append(self._row)
        if tag == "tr":
            self._row = None
        elif tag == "table":
            self._table = None
        elif tag == "figure":
            self._figure = None

    def section_id(self, path) -> str:
        return self.sections[os.path.abspath(str(path))]["id"]

    def values(self, table_id: str) -> dict[str, str]:
        return {r["key"]: r["value"] for r in self.tables[table_id]}

    def by_class(self, table_id: str) -> dict[int, dict]:
        return {int(r["class"]): r for r in self.tables[table_id]}


def report(tmp_path, *dirs, name="report.html", **options) -> tuple[Page, str]:
    out = tmp_path / name
    summary = write_report(ReportOptions(dirs=tuple(str(d) for d in dirs), output=str(out), progress=False,
                                         **options), echo=lambda m: None)
    assert summary.path == str(out)
    text = out.read_text()
    return Page(text), text


# ------------------------------------------------------------------------------------------- the outputs


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """label (with broken images) -> balance -> shard -> two ns-train runs, as a user runs them, in one root."""
    root = tmp_path_factory.mktemp("report")
    images = root / "images"
    write_images(str(images), 150, width=64, height=48)
    (images / "zz-empty.jpg").write_bytes(b"")
    (images / "zz-html.jpg").write_bytes(b"<html>404 Not Found</html>")
    invoke("label", images, *TEACHER, "--output", root / "labels", "--batch-size", 16, "--topk", 3, "--no-progress")
    labels = read_table(root / "labels", "labels-*.parquet")
    cut = float(np.quantile(labels["confidence"], 0.1))  # some rows fall below --min-confidence
    invoke("balance", root / "labels", "--output", root / "selection", "--per-class", 15, "--min-confidence", cut,
           "--num-classes", CLASSES, "--no-progress")
    invoke("shard", root / "selection", "--output", root / "shards", "--num-shards", 3, "--no-progress")
    from ns_train.cli import main as train_main

    for run, steps in (("student_a", 2), ("student_b", 3)):
        result = CliRunner().invoke(train_main, [
            "train", "--labeled", str(root / "shards"), "--unlabeled", str(root / "shards"), "--val",
            str(root / "shards"), "--steps", str(steps), "--log-every", "1", *TRAIN, "--output",
            str(root / "runs" / run)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return root


def marker(path, name="stats.json") -> dict:
    return json.loads((path / name).read_text())


@pytest.fixture(scope="module")
def page(made, tmp_path_factory):
    """The report of the whole root (found two levels down)."""
    return report(tmp_path_factory.mktemp("page"), made)


def test_label_counts_confidence_and_errors_equal_the_output(made, page):
    page, _ = page
    section = page.section_id(made / "labels")
    stats, labels = marker(made / "labels"), read_table(made / "labels", "labels-*.parquet")
    counts = labels["label"].value_counts()
    shown = page.by_class(f"{section}-classes")
    assert {c: int(r["images"]) for c, r in shown.items()} == counts.to_dict()
    for label, rows in labels.groupby("label"):
        for p in (10, 25, 50, 75, 90):
            assert abs(float(shown[label][f"p{p}"]) - np.percentile(rows["confidence"], p)) <= 1.01 / CONFIDENCE_BINS
    summary = page.values(f"{section}-summary")
    assert int(summary["images read"]) == stats["images_read"] == len(labels) + 2
    assert int(summary["labeled"]) == stats["labeled"] and int(summary["errors"]) == stats["errors"] == 2
    errors = {r["reason"]: int(r["rows"]) for r in page.tables[f"{section}-errors"]}
    assert errors == stats["errors_by_reason"] == {"empty_file": 1, "not_an_image": 1}


def test_selection_candidates_kept_cut_and_copies_equal_stats(made, page):
    page, _ = page
    section = page.section_id(made / "selection")
    stats = marker(made / "selection")
    shown = page.by_class(f"{section}-classes")
    assert set(shown) == {int(c) for c in stats["classes"]} and shown
    for label, c in stats["classes"].items():
        row = shown[int(label)]
        assert (int(row["candidates"]), int(row["selected"]), int(row["copies"])) == (
            c["candidates"], c["selected"], c["copies"])
        assert float(row["min_confidence_selected"]) == pytest.approx(c["min_confidence_selected"])
        assert float(row["copies_per_row"]) == pytest.approx(c["copies"] / c["selected"])
    selection = read_table(made / "selection", "selection-*.parquet")
    kept = selection.groupby("label").agg(n=("id", "size"), copies=("copies", "sum"), cut=("confidence", "min"))
    assert {c: int(r["selected"]) for c, r in shown.items()} == kept["n"].to_dict()
    assert {c: int(r["copies"]) for c, r in shown.items()} == kept["copies"].to_dict()
    summary = page.values(f"{section}-summary")
    assert int(summary["below --min-confidence"]) == stats["below_min_confidence"] > 0
    assert int(summary["rows with copies"]) == stats["total_copies"] == selection["copies"].sum()


def test_shard_records_per_shard_and_class_equal_the_manifest(made, page):
    page, _ = page
    section = page.section_id(made / "shards")
    manifest = marker(made / "shards", "manifest.json")
    shards = [{"name": r["name"], "records": int(r["records"]), "bytes": int(r["bytes"])}
              for r in page.tables[f"{section}-shards"]]
    assert shards == manifest["shards"] and len(shards) == 3
    assert {c: int(r["records"]) for c, r in page.by_class(f"{section}-classes").items()} == {
        int(c): n for c, n in manifest["classes"].items()}
    summary = page.values(f"{section}-summary")
    assert int(summary["records"]) == manifest["records"] == sum(s["records"] for s in shards)
    assert int(summary["unique images"]) == manifest["unique_images"]
    assert int(summary["records"]) > int(summary["unique images"])  # upsampled: copies on the shards


def test_training_runs_side_by_side_equal_their_results(made, page):
    page, _ = page
    rows = {r["run"]: r for r in page.tables["runs-results"]}
    assert set(rows) == {"student_a", "student_b"}
    for name, row in rows.items():
        results = marker(made / "runs" / name, "results.json")
        assert int(row["steps"]) == results["step"]
        for which in ("eval", "eval_ema"):
            for metric in ("top1", "top5"):
                assert float(row[f"{which}_{metric}"]) == results[which][metric]
    assert [int(rows[n]["steps"]) for n in ("student_a", "student_b")] == [2, 3]
    evaluations = page.tables["runs-2-evaluations"]  # student_b: its metrics.jsonl evaluations
    lines = [json.loads(line) for line in (made / "runs" / "student_b" / "metrics.jsonl").read_text().splitlines()]
    assert [int(r["step"]) for r in evaluations] == [line["step"] for line in lines if "eval" in line]


def test_every_output_in_the_root_is_found_and_the_page_is_self_contained(made, page):
    page, text = page
    found = {r["path"]: r for r in page.tables["outputs"]}
    expected = {"labels": "label", "selection": "balance", "shards": "shard", "runs/student_a": "train",
                "runs/student_b": "train"}
    assert {p: r["kind"] for p, r in found.items()} == {str(made / k): v for k, v in expected.items()}
    assert all(r["state"] == "complete" for r in found.values())
    assert [r["kind"] for r in page.tables["outputs"]] == ["label", "balance", "shard", "train", "train"]
    assert [page.sections[str(made / k)]["data-kind"] for k in ("labels", "selection", "shards")] == [
        "label", "balance", "shard"]
    assert "<h2>Selection: selection</h2>" in text and ">runs/student_a</td>" in text  # named below the root
    assert page.sources and all(src.startswith("data:image/") for src in page.sources)
    assert "http:" not in text and "https:" not in text and "url(" not in text and "@import" not in text
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}


def test_the_page_renders_in_a_real_browser_without_errors(page, tmp_path):
    """Headless chromium opens the page offline: no console or page error, no request, every image decodes.
    The screenshot is kept in the test artifacts."""
    from tests import browser

    browser.require_chromium()
    html = tmp_path / "report.html"
    html.write_text(page[1])
    screenshot = browser.artifact_dir() / "report.png"
    assert browser.render(html, screenshot) == []
    with Image.open(screenshot) as shot:
        assert shot.width >= 800 and shot.height > shot.width  # the whole page, sections stacked


def expected_samples(table: pd.DataFrame, classes: list[int], n: int) -> dict[int, list[tuple[str, str]]]:
    """(end, id) of the rows a grid must show per class: the n most confident (descending), then the n least
    confident not among them (descending); equal confidences: the earlier row in file order."""
    table = table.assign(position=np.arange(len(table)))
    shown = {}
    for label in classes:
        rows = table[table["label"] == label]
        most = rows.sort_values(["confidence", "position"], ascending=[False, True]).head(n)
        least = rows.sort_values(["confidence", "position"], ascending=[True, True]).head(n)
        least = least[~least["id"].isin(most["id"])].iloc[::-1]
        shown[label] = [("most", i) for i in most["id"]] + [("least", i) for i in least["id"]]
    return shown


def spread(sizes: dict[int, int], count: int) -> list[int]:
    ranked = sorted(sizes, key=lambda c: (-sizes[c], c))
    return [ranked[i] for i in sorted({round(x) for x in np.linspace(0, len(ranked) - 1, min(count, len(ranked)))})]


def grid(page: Page, section: str) -> dict[int, list[tuple[str, str]]]:
    shown: dict[int, list] = {}
    for figure in page.samples[section]:
        shown.setdefault(int(figure["data-class"]), []).append((figure["data-end"], figure["data-id"]))
    return shown


def test_the_grid_shows_the_most_and_least_confident_kept_rows_of_classes_spread_by_size(made, page, tmp_path):
    page, text = page
    section = page.section_id(made / "selection")
    stats = marker(made / "selection")
    sizes = {int(c): v["candidates"] for c, v in stats["classes"].items() if v["selected"]}
    classes = spread(sizes, 6)
    selection = pq.read_table(sorted(glob.glob(str(made / "selection" / "selection-*.parquet")))).to_pandas()
    shown = grid(page, section)
    assert list(shown) == classes and len(classes) == min(6, len(sizes))
    assert shown == expected_samples(selection, classes, 3)
    assert page.section_id(made / "labels") not in page.samples  # the selection's grid, not the labels'
    by_id = selection.set_index("id")
    for figure in page.samples[section]:
        assert float(figure["data-confidence"]) == pytest.approx(by_id.loc[figure["data-id"], "confidence"])
    first = page.samples[section][0]
    thumbnail = Image.open(io.BytesIO(base64.b64decode(first["src"].split(",", 1)[1]))).convert("RGB")
    assert first["src"].startswith("data:image/jpeg;base64,")
    source = Image.open(by_id.loc[first["data-id"], "source"]).convert("RGB")
    assert thumbnail.size == (64, 48)  # smaller than --thumbnail-size: not enlarged
    difference = np.abs(np.asarray(source.resize(thumbnail.size), np.float64) - np.asarray(thumbnail, np.float64))
    assert difference.mean() < 12  # the row's own image, not another one
    again = tmp_path / "again.html"
    write_report(ReportOptions(dirs=(str(made),), output=str(again), progress=False), echo=lambda m: None)
    assert again.read_text() == text  # same outputs, same bytes


def test_labels_alone_give_the_grid_of_labels_and_class_names_show(made, tmp_path):
    names = [f"kind-{i}" for i in range(CLASSES)]
    (tmp_path / "names.txt").write_text("\n".join(names) + "\n")
    page, text = report(tmp_path, made / "labels", sample_classes=3, samples_per_class=2, thumbnail_size=32,
                        class_names=str(tmp_path / "names.txt"))
    section = page.section_id(made / "labels")
    labels = pq.read_table(sorted(glob.glob(str(made / "labels" / "labels-*.parquet")))).to_pandas()
    counts = labels["label"].value_counts().to_dict()
    classes = spread(counts, 3)
    assert grid(page, section) == expected_samples(labels, classes, 2)
    sizes = {Image.open(io.BytesIO(base64.b64decode(f["src"].split(",", 1)[1]))).size for f in page.samples[section]}
    assert sizes == {(32, 24)}
    assert {r["name"] for r in page.tables[f"{section}-classes"]} == {f"{c} kind-{c}" for c in counts}
    assert all(f"{c} kind-{c}" in text for c in classes)  # the grid's class headings

    (tmp_path / "short.txt").write_text("one\ntwo\n")
    result = CliRunner().invoke(main, ["report", str(made / "labels"), "--output", str(tmp_path / "x.html"),
                                       "--class-names", str(tmp_path / "short.txt")])
    assert result.exit_code == 1 and "2 names for a teacher of 10 classes" in result.output


def test_the_names_the_teacher_recorded_in_stats_json_show_for_labels_and_selection(made, tmp_path):
    """The teacher's class names are in an output's stats.json, not in its files' footers: the report shows
    them from there."""
    names = [f"recorded-{i}" for i in range(CLASSES)]
    for kind in ("labels", "selection"):
        shutil.copytree(made / kind, tmp_path / kind)
        stats = marker(tmp_path / kind)
        stats["teacher"]["class_names"] = names
        (tmp_path / kind / "stats.json").write_text(json.dumps(stats))
        assert b"recorded-" not in b"".join(p.read_bytes() for p in (tmp_path / kind).glob("*.parquet"))
    page, _ = report(tmp_path, tmp_path / "labels", tmp_path / "selection", sample_classes=0)
    for kind in ("labels", "selection"):
        shown = page.by_class(f"{page.section_id(tmp_path / kind)}-classes")
        assert shown and all(r["name"] == f"{c} recorded-{c}" for c, r in shown.items())


def test_ground_truth_accuracy_equals_a_direct_join(made, tmp_path):
    labels = read_table(made / "labels", "labels-*.parquet")
    rng = np.random.default_rng(5)
    truth = labels.sample(frac=0.7, random_state=1)[["id", "label"]].copy()
    flip = rng.random(len(truth)) < 0.4
    truth.loc[flip, "label"] = (truth.loc[flip, "label"] + 1) % CLASSES
    truth = pd.concat([truth, pd.DataFrame({"id": ["not/an/image.jpg"], "label": [3]})])
    pq.write_table(pa.Table.from_pandas(truth, preserve_index=False), tmp_path / "truth.parquet")
    page, _ = report(tmp_path, made / "labels", ground_truth=str(tmp_path / "truth.parquet"), sample_classes=0)
    section = page.section_id(made / "labels")
    joined = labels.merge(truth, on="id", suffixes=("", "_true"))
    joined["right"] = joined["label"] == joined["label_true"]
    summary = page.values(f"{section}-accuracy-summary")
    assert int(summary["rows with ground truth"]) == len(joined) == len(truth) - 1
    assert int(summary["ground truth rows"]) == len(truth)
    assert float(summary["accuracy"]) == pytest.approx(joined["right"].mean()) and 0 < joined["right"].mean() < 1
    bins = np.minimum((joined["confidence"].to_numpy() * 10).astype(int), 9)
    for i, row in enumerate(page.tables[f"{section}-accuracy"]):
        assert int(row["rows"]) == (bins == i).sum()
        assert int(row["correct"]) == joined["right"][bins == i].sum()


def test_synthetic_outputs_rejects_and_unreadable_images(tmp_path):
    """A synthetic label output (sources that do not exist, spoiled rows) and its selection: rejects by reason
    from stats.json, invalid rows counted, images shown as placeholders with the reason."""
    invoke("synth", "pseudo-labels", "--output", tmp_path / "pl", "--rows", 3000, "--classes", 30, "--files", 2,
           "--invalid-fraction", 0.05)
    invoke("balance", tmp_path / "pl", "--output", tmp_path / "sel", "--per-class", 50, "--no-progress")
    page, _ = report(tmp_path, tmp_path / "pl", tmp_path / "sel", sample_classes=2, samples_per_class=1)
    stats = marker(tmp_path / "sel")
    section = page.section_id(tmp_path / "sel")
    rejected = {r["reason"]: int(r["rows"]) for r in page.tables[f"{section}-errors"]}
    assert rejected == stats["rejected_by_reason"] and set(rejected) >= {"label_out_of_range", "duplicate_id"}
    labels = read_table(tmp_path / "pl", "labels-*.parquet")
    invalid = (labels["label"] < 0) | ~labels["confidence"].between(0, 1)
    summary = page.values(f"{page.section_id(tmp_path / 'pl')}-summary")
    assert int(summary["invalid rows (label or confidence)"]) == invalid.sum() > 0
    figures = page.samples[section]
    assert len(figures) == 4 and {f["data-reason"] for f in figures} == {"missing_source"}


def test_unfinished_outputs_are_listed_not_read_and_shards_without_manifest_are_no_output(made, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(made / "selection", root / "a" / "selection")
    unfinished = root / "b" / "labels"
    (unfinished / contract.LABELS.tmp_name).mkdir(parents=True)
    (unfinished / contract.LABELS.tmp_name / outputs.PLAN).write_text("{}")
    (root / "labeled").mkdir()
    for path in glob.glob(str(made / "shards" / "train-*")):  # labeled shards a user made: no manifest
        shutil.copy(path, root / "labeled")
    (root / "deep" / "x" / "y").mkdir(parents=True)  # three levels down: not searched
    shutil.copytree(made / "shards", root / "deep" / "x" / "y" / "shards")
    page, _ = report(tmp_path, root)
    rows = {r["path"]: r for r in page.tables["outputs"]}
    assert {p: (r["kind"], r["state"]) for p, r in rows.items()} == {
        str(root / "a" / "selection"): ("balance", "complete"), str(unfinished): ("label", "unfinished")}
    assert str(unfinished) not in page.sections and rows[str(unfinished)]["section"] == ""


def test_a_directory_without_output_is_one_error_line(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    for target in (tmp_path / "empty", tmp_path / "missing"):
        result = CliRunner().invoke(main, ["report", str(target), "--output", str(tmp_path / "r.html")])
        assert result.exit_code == 1
        assert result.output.startswith("Error: ") and result.output.count("\n") == 1, result.output
        assert "no ns-data output" in result.output
    assert not (tmp_path / "r.html").exists()


def test_the_command_prints_a_line_per_output_and_without_matplotlib_says_what_to_install(made, tmp_path,
                                                                                          monkeypatch):
    result = CliRunner().invoke(main, ["report", str(made / "shards"), str(made / "runs"), "--output",
                                       str(tmp_path / "r.html"), "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = marker(made / "shards", "manifest.json")
    assert result.output.splitlines() == [
        f"shard    {made / 'shards'}: {manifest['records']:,} records of {manifest['unique_images']:,} images in "
        "3 shards",
        *(f"train    {made / 'runs' / run}: {steps} steps, eval top1 {results['eval']['top1']:.4f}, eval_ema top1 "
          f"{results['eval_ema']['top1']:.4f}"
          for run, steps in (("student_a", 2), ("student_b", 3))
          for results in [marker(made / "runs" / run, "results.json")]),
        f"report: {tmp_path / 'r.html'}"]
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = CliRunner().invoke(main, ["report", str(made / "shards"), "--output", str(tmp_path / "s.html")])
    assert result.exit_code == 1 and result.output == (
        "Error: `ns-data report` draws with matplotlib: pip install 'ns-data[report]'\n")


def test_options_are_checked_once():
    with pytest.raises(OptionsError, match="--samples-per-class"):
        ReportOptions(dirs=("x",), output="r.html", samples_per_class=-1)
    with pytest.raises(OptionsError, match="DIR"):
        ReportOptions(dirs=(), output="r.html")
    with pytest.raises(OptionsError, match="--sample-rows and --sample-files"):
        ReportOptions(dirs=("x",), output="r.html", sample_files=0)


def test_runs_of_the_same_name_are_told_apart_by_their_parents():
    runs = [RunReport(Found(contract.TRAIN_RUN, path, {}), [], [], "") for path in (
        "/d/seed-0/runs/teacher", "/d/seed-1/runs/teacher", "/d/seed-1/runs/student")]
    assert run_names(runs) == ["seed-0/runs/teacher", "seed-1/runs/teacher", "seed-1/runs/student"]
    assert run_names(runs[1:]) == ["teacher", "student"]


# ------------------------------------------------------------------------------------------- the streaming parts


def test_a_table_is_read_in_batches_of_only_the_columns_shown(made, tmp_path, monkeypatch):
    reads = []

    def recording(unit, columns, batch_rows):
        for start, batch in iter_batches(unit, columns, batch_rows):
            reads.append((tuple(columns), batch.num_rows))
            yield start, batch

    iter_batches = collect.iter_batches
    monkeypatch.setattr(collect, "iter_batches", recording)
    report(tmp_path, made / "labels", batch_rows=40)
    assert {columns for columns, _ in reads} == {("label", "confidence", "entropy")}
    assert max(rows for _, rows in reads) <= 40 and sum(rows for _, rows in reads) == marker(made / "labels")["labeled"]


def test_tracked_rows_are_the_extremes_of_each_class_whatever_the_batches():
    rng = np.random.default_rng(0)
    n = 5000
    labels = rng.integers(0, 40, n)
    confidence = rng.choice(np.linspace(0, 1, 21), n)  # many ties
    tracker = SampleTracker(3)
    for start in range(0, n, 317):
        end = min(start + 317, n)
        tracker.add(labels[start:end], confidence[start:end], np.arange(start, end))
    table = pd.DataFrame({"label": labels, "confidence": confidence, "id": np.arange(n)})
    expected = expected_samples(table, list(range(40)), 3)
    for label in range(40):
        assert [(end, p) for end, p, _ in tracker.rows(label)] == expected[label]


def test_percentiles_from_the_histogram_are_within_a_bin():
    rng = np.random.default_rng(1)
    values = [rng.beta(a, 2, size) for a, size in ((5, 1000), (1, 50), (3, 1))]
    hist = np.stack([np.bincount(np.minimum((v * CONFIDENCE_BINS).astype(int), CONFIDENCE_BINS - 1),
                                 minlength=CONFIDENCE_BINS) for v in values] + [np.zeros(CONFIDENCE_BINS, int)])
    got = histogram_percentiles(hist, np.array([0.1, 0.5, 0.9]))
    for row, v in zip(got, values):
        assert np.all(np.abs(row - np.percentile(v, [10, 50, 90])) <= 1.0 / CONFIDENCE_BINS)
    assert np.isnan(got[-1]).all()


def test_a_report_reads_a_bounded_sample_and_lists_each_directory_once(tmp_path, monkeypatch):
    """The same rows in 20 and in 200 files: the files opened stay within --sample-files and the listings are
    the same few whatever the files; the page says it shows a sample, and of how many rows."""
    from ns_data import fs

    for files in (20, 200):
        invoke("synth", "pseudo-labels", "--output", tmp_path / f"pl-{files}", "--rows", 4000, "--classes", 10,
               "--files", files)
    opened, listed = [], []
    parquet_file, match = pq.ParquetFile, fs.match

    def counting_parquet(source, *args, **kwargs):
        opened.append(str(source))
        return parquet_file(source, *args, **kwargs)

    def counting_match(pattern):
        listed.append(pattern)
        return match(pattern)

    monkeypatch.setattr(pq, "ParquetFile", counting_parquet)
    monkeypatch.setattr(fs, "match", counting_match)
    seen = {}
    for files in (20, 200):
        opened.clear()
        listed.clear()
        page, text = report(tmp_path, tmp_path / f"pl-{files}", name=f"r-{files}.html", sample_rows=1000,
                            sample_files=8, sample_classes=0)
        section = page.section_id(tmp_path / f"pl-{files}")
        summary = page.values(f"{section}-summary")
        assert len(set(opened)) <= 8 and summary["sampled"] == "true"
        assert int(summary["rows in the labels files"]) == 4000 and 0 < int(summary["rows read"]) <= 1000
        images = sum(int(r["images"]) for r in page.tables[f"{section}-classes"])
        assert images == int(summary["rows read"]) - int(summary["invalid rows (label or confidence)"])
        assert f'id="{section}-sample"' in text and "come from a sample of the table" in text
        seen[files] = (len(set(opened)), len(listed))
    assert seen[20][1] == seen[200][1] == 1, seen  # one listing of the directory given
    assert seen[200][0] == 8 and seen[20][0] == 5, seen  # 1000 rows at 200 rows a file: 5 files

    again, _ = report(tmp_path, tmp_path / "pl-200", name="again.html", sample_rows=1000, sample_files=8,
                      sample_classes=0)
    assert again.tables == page.tables  # the same sample every time
    listed.clear()
    report(tmp_path, tmp_path, name="both.html", sample_rows=1000, sample_files=8, sample_classes=0)
    assert len(listed) == 1, listed  # outputs found below a root: still one listing of it


def test_a_table_within_the_sample_budget_is_read_whole(tmp_path):
    invoke("synth", "pseudo-labels", "--output", tmp_path / "pl", "--rows", 500, "--classes", 5, "--files", 4)
    page, text = report(tmp_path, tmp_path / "pl", sample_rows=500, sample_files=4, sample_classes=0)
    section = page.section_id(tmp_path / "pl")
    summary = page.values(f"{section}-summary")
    labels = read_table(tmp_path / "pl", "labels-*.parquet")
    assert summary["sampled"] == "false" and int(summary["rows read"]) == len(labels) == 500
    assert f'id="{section}-sample"' not in text
    valid = labels[(labels["label"] >= 0) & labels["confidence"].between(0, 1)]
    assert {c: int(r["images"]) for c, r in page.by_class(f"{section}-classes").items()} == \
        valid["label"].value_counts().to_dict()
