"""A readable summary of a selection's stats.json: totals, rejects, and per-class balance at a glance."""
from __future__ import annotations

import numpy as np

from ns_data import class_names


def _pct(values: np.ndarray) -> str:
    if not len(values):
        return "-"
    q = np.percentile(values, [0, 10, 50, 90, 100], method="lower")
    return "  ".join(f"{name} {v:,.0f}" for name, v in zip(("min", "p10", "median", "p90", "max"), q))


# A class duplicated more than this many times over is almost always --per-class left at the paper's 130,000 on a
# corpus far smaller than the paper's.
MAX_UPSAMPLING = 100


def upsampling_warning(per_class: int, selected: np.ndarray, factor: np.ndarray) -> str:
    over = int((factor > MAX_UPSAMPLING).sum())
    suggestion = int(np.median(selected))
    return (f"  warning: {over:,} class(es) duplicated more than {MAX_UPSAMPLING}x (up to {factor.max():,.0f}x) to "
            f"reach --per-class {per_class:,}; for a corpus of this size pass a smaller --per-class (the median "
            f"class kept {suggestion:,} rows) or --no-upsample")


def format_summary(stats: dict, output: str, names: list[str] | None = None) -> str:
    """Classes are named by `names`, else by the names of the teacher recorded in stats.json."""
    names = names if names is not None else class_names.of_teacher(stats.get("teacher"))
    opts = stats["options"]
    per_class = opts["per_class"]
    classes = stats["classes"]
    labels = np.array([int(k) for k in classes], dtype=np.int64)
    selected = np.array([c["selected"] for c in classes.values()], dtype=np.int64)
    candidates = np.array([c["candidates"] for c in classes.values()], dtype=np.int64)
    lines = [
        f"balance: {stats['input_rows']:,} rows read from {len(stats['input_files'])} file(s)",
        f"  rejected         {stats['rejected_rows']:>13,}"
        + ("  (" + ", ".join(f"{r} {n:,}" for r, n in sorted(stats["rejected_by_reason"].items())) + ")"
           if stats["rejected_rows"] else ""),
        f"  below {opts['min_confidence']:<10} {stats['below_min_confidence']:>13,}",
        f"  candidates       {stats['candidates']:>13,}  in {len(classes):,} classes",
        f"  not kept         {stats['not_kept']:>13,}  (beyond {per_class:,} per class)",
        f"  selected         {stats['selected_rows']:>13,}  unique rows",
        f"  corpus           {stats['total_copies']:>13,}  rows with copies"
        f" (upsampling {'on' if opts['upsample'] else 'off'})",
    ]
    if len(classes):
        full = int((candidates >= per_class).sum())
        lines += [
            "per-class balance:",
            f"  classes at {per_class:,} (capped): {full:,} of {len(classes):,}",
            f"  kept rows per class:  {_pct(selected)}",
        ]
        if opts["upsample"] and full < len(classes):
            factor = per_class / selected[selected < per_class]
            lines.append(f"  copies per row in upsampled classes:  min {factor.min():.2f}  "
                         f"median {np.median(factor):.2f}  max {factor.max():.2f}")
            if factor.max() > MAX_UPSAMPLING:
                lines.append(upsampling_warning(per_class, selected, factor))
        smallest = np.argsort(selected, kind="stable")[:5]
        lines.append("  smallest classes: " + ", ".join(
            f"{class_names.display(labels[i], names)} ({selected[i]:,} rows)" for i in smallest))
    num_classes = opts.get("num_classes")
    if num_classes:
        empty = num_classes - len(classes)
        if empty:
            lines.append(f"  classes with no candidate: {empty:,} of {num_classes:,}")
    lines.append(f"output: {output} (stats.json, selection-*.parquet"
                 + (", errors-*.parquet" if stats["rejected_rows"] else "") + ")")
    return "\n".join(lines)
