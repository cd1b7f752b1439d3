"""The loop's results: test top-1 of every model of every run, pseudo-label accuracy against a ground truth,
as one table (printed, results.txt), results.json and a picture (results.png).

Everything is read from the runs' results.json and the labels' stats.json; the labels files are listed once per
labels directory and joined with the ground truth within the report's sample budget (a large output is scored
on a sample, and the table says so), so reading the results does not grow with the corpus."""
from __future__ import annotations

import json
import os
import statistics

import numpy as np

from ns_data import fs
from ns_data.contract import TRAIN_RUN

RESULTS_JSON, RESULTS_TXT, RESULTS_PNG = "results.json", "results.txt", "results.png"


def test_top1(run_dir: str) -> float | None:
    """The run's final top-1 on its --val shards (of its EMA weights when it kept them); None without --val."""
    with open(os.path.join(run_dir, TRAIN_RUN.marker)) as f:
        results = json.load(f)
    evaluation = results.get("eval_ema", results.get("eval"))
    return evaluation["top1"] if evaluation else None


def pseudo_label_accuracy(labels_dir: str, ground_truth: str, max_rows: int | None = None,
                          max_files: int | None = None) -> dict:
    """The labels against the ground truth, per teacher-confidence bin (the report's bins). The labels are read
    as the report reads them: the marker once, the directory listed once, and a table beyond the report's sample
    budget (collect.SAMPLE_ROWS rows, collect.SAMPLE_FILES files) joined as a sample of evenly spaced row groups,
    which `sampled` and `rows_read` say."""
    from ns_data import contract
    from ns_data.report.collect import SAMPLE_FILES, SAMPLE_ROWS, read_ground_truth, scan_table

    marker = contract.LABELS.check_complete(labels_dir)
    files = fs.list_dir(labels_dir, contract.LABELS.data_pattern)
    scan = scan_table(files, truth=read_ground_truth(ground_truth), samples_per_class=0, batch_rows=65_536,
                      progress=False, echo=print, max_rows=max_rows or SAMPLE_ROWS, max_files=max_files or SAMPLE_FILES,
                      total_rows=marker.get("labeled"))
    return {"accuracy": scan.accuracy.overall, "rows": scan.accuracy.rows.tolist(),
            "correct": scan.accuracy.correct.tolist(), "sampled": scan.sampled, "rows_read": scan.rows,
            "labels_rows": scan.table_rows}


def collect(plan, seed: int | None) -> dict:
    """One run's numbers, read back from its outputs."""
    truth = plan.ground_truth[seed]
    return {"top1": {name: test_top1(run_dir) for name, run_dir in plan.models[seed].items()},
            "pseudo_labels": {it: pseudo_label_accuracy(d, truth) for it, d in plan.labels[seed].items()}
            if truth else {}}


def _mean(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def _cell(value: float | None) -> str:
    return f"{value:8.4f}" if value is not None else f"{'-':>8}"


def format_table(done: dict, comparisons: list[tuple[str, str]]) -> str:
    """Rows: models, pseudo labels, comparisons; columns: the runs (seeds) done so far and their mean."""
    seeds = list(done)
    heads = [f"seed {s}" if s is not None else "run" for s in seeds]
    header = f"  {'':<28}" + "".join(f"{h:>9}" for h in heads) + f"{'mean':>9}"
    lines = ["test top-1 (EMA weights when kept)", header]
    models = list(next(iter(done.values()))["top1"])
    for name in models:
        values = [done[s]["top1"].get(name) for s in seeds]
        lines.append(f"  {name:<28}" + "".join(" " + _cell(v) for v in values) + " " + _cell(_mean(values)))
    iterations = list(next(iter(done.values()))["pseudo_labels"])
    if iterations:
        lines.append("pseudo-label accuracy on the unlabeled images (against data.ground_truth)")
        for it in iterations:
            values = [done[s]["pseudo_labels"][it]["accuracy"] for s in seeds]
            lines.append(f"  {it + '/labels':<28}" + "".join(" " + _cell(v) for v in values) + " "
                         + _cell(_mean(values)))
        for it in iterations:
            for s in seeds:
                scored = done[s]["pseudo_labels"][it]
                if scored["sampled"]:
                    of = f" of {scored['labels_rows']:,}" if scored["labels_rows"] is not None else ""
                    lines.append(f"  ({it}/labels of {heads[seeds.index(s)]}: scored on a sample of "
                                 f"{scored['rows_read']:,}{of} rows)")
    rows = []
    for model, baseline in comparisons:
        pairs = [(done[s]["top1"].get(model), done[s]["top1"].get(baseline)) for s in seeds]
        pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
        if pairs:
            gain = statistics.mean(a - b for a, b in pairs) * 100
            rows.append(f"  {model} vs {baseline}: {gain:+.2f} points on average, better in "
                        f"{sum(a > b for a, b in pairs)} of {len(pairs)}")
    if rows:
        lines += ["comparisons (test top-1)", *rows]
    return "\n".join(lines)


def plot(done: dict, path: str) -> bool:
    """results.png: each model's test top-1 per run with the mean, and (with a ground truth) pseudo-label
    accuracy against teacher confidence, pooled over runs. False when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seeds = list(done)
    models = [m for m in next(iter(done.values()))["top1"] if any(done[s]["top1"][m] is not None for s in seeds)]
    iterations = list(next(iter(done.values()))["pseudo_labels"])
    fig, axes = plt.subplots(1, 2 if iterations else 1, figsize=(12 if iterations else 6.5, 4.2), squeeze=False)
    ax = axes[0][0]
    offsets = np.linspace(-0.15, 0.15, len(seeds)) if len(seeds) > 1 else np.zeros(1)
    for offset, seed in zip(offsets, seeds):  # a run's models joined: who beats whom within a seed
        points = [(x + offset, done[seed]["top1"][m]) for x, m in enumerate(models) if done[seed]["top1"][m] is not None]
        ax.plot(*zip(*points), color="tab:blue", alpha=0.25, linewidth=0.8, marker="o", markersize=4)
    for x, model in enumerate(models):
        mean = statistics.mean(done[s]["top1"][model] for s in seeds if done[s]["top1"][model] is not None)
        ax.hlines(mean, x - 0.3, x + 0.3, color="black", zorder=3)
        ax.annotate(f"{mean:.3f}", (x + 0.32, mean), va="center", fontsize=8)
    ax.set_xticks(range(len(models)), models, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("test top-1")
    ax.set_title(f"test top-1: {len(seeds)} run(s) (a line per run), mean (black)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    if iterations:
        ax = axes[0][1]
        counts = ax.twinx()
        width = 0.8 / len(iterations) / 10
        for i, it in enumerate(iterations):
            rows = np.sum([done[s]["pseudo_labels"][it]["rows"] for s in seeds], axis=0)
            correct = np.sum([done[s]["pseudo_labels"][it]["correct"] for s in seeds], axis=0)
            centers = (np.arange(len(rows)) + 0.5) / len(rows)
            seen = rows > 0
            line, = ax.plot(centers[seen], correct[seen] / rows[seen], marker="o", label=f"{it} pseudo labels",
                            zorder=3)
            counts.bar(centers + (i - (len(iterations) - 1) / 2) * width, rows, width=width, color=line.get_color(),
                       alpha=0.2)
        ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1, label="calibrated")
        ax.set_xlim(0, 1)
        ax.set_zorder(counts.get_zorder() + 1)
        ax.patch.set_visible(False)
        counts.set_ylabel("rows per bin (bars)", fontsize=8)
        ax.set_xlabel("teacher confidence")
        ax.set_ylabel("pseudo-label accuracy")
        ax.set_title("pseudo-label accuracy against confidence, all runs pooled", fontsize=9)
        ax.legend(fontsize=8, loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    os.replace(tmp, path)
    return True


def write(plan, done: dict, output: str) -> dict:
    """results.json, results.txt and results.png in `output`, for the runs done so far."""
    table = format_table(done, plan.comparisons)
    fs.write_json(os.path.join(output, RESULTS_JSON),
                  {"config": os.path.abspath(plan.config.path), "runs": {str(s): r for s, r in done.items()},
                   "models": list(next(iter(done.values()))["top1"]), "comparisons": plan.comparisons})
    fs.write_atomic(os.path.join(output, RESULTS_TXT), (table + "\n").encode())
    files = [os.path.join(output, RESULTS_JSON), os.path.join(output, RESULTS_TXT)]
    if plot(done, os.path.join(output, RESULTS_PNG)):
        files.append(os.path.join(output, RESULTS_PNG))
    return {"table": table, "files": files, "runs": done}
