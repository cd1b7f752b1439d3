"""balance's summary: the warning when a class would be duplicated far beyond what a corpus holds."""
from __future__ import annotations

from ns_data.stats import format_summary


def stats_of(per_class: int, selected: dict[int, int], upsample: bool = True) -> dict:
    classes = {str(c): {"candidates": n, "selected": n, "copies": per_class if upsample else n,
                        "min_confidence_selected": 0.5} for c, n in selected.items()}
    total = sum(selected.values())
    return {"options": {"per_class": per_class, "min_confidence": 0.3, "upsample": upsample, "num_classes": None},
            "classes": classes, "input_rows": total, "input_files": ["a.parquet"], "rejected_rows": 0,
            "rejected_by_reason": {}, "below_min_confidence": 0, "candidates": total, "not_kept": 0,
            "selected_rows": total, "total_copies": per_class * len(selected) if upsample else total}


def test_a_class_upsampled_more_than_100x_is_warned_about_with_the_fix():
    text = format_summary(stats_of(130_000, {0: 900, 1: 1_000, 2: 5_000}), "sel")
    warning = next(line for line in text.splitlines() if "warning" in line)
    assert "2 class(es) duplicated more than 100x" in warning
    assert "up to 144x" in warning and "--per-class" in warning and "--no-upsample" in warning
    assert "kept 1,000 rows" in warning  # the median class: a per-class value that fits the corpus


def test_no_warning_at_100x_or_less_or_without_upsampling():
    assert "warning" not in format_summary(stats_of(100, {0: 1, 1: 50}), "sel")
    assert "warning" not in format_summary(stats_of(130_000, {0: 10, 1: 20}, upsample=False), "sel")
