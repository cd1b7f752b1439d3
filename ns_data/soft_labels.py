"""Soft labels from the sparse top-k the teacher recorded: the dense vector, its temperature, and the checks
that a column of them holds probabilities.

numpy and pyarrow only: `balance` and `shard` (no torch) and the trainer (no Beam) use it.
"""
from __future__ import annotations

import numpy as np

# Why a row's probabilities (`topk_probs`, `probs`) are refused, in the order checked: an error row's reason in
# balance and shard.
PROBS_NOT_FINITE = "probs_not_finite"  # a NaN, an infinity or a null among them
PROBS_NEGATIVE = "probs_negative"
PROBS_SUM_OVER_ONE = "probs_sum_over_one"  # summing above MAX_PROBABILITY_SUM
PROBABILITY_REASONS = (PROBS_NOT_FINITE, PROBS_NEGATIVE, PROBS_SUM_OVER_ONE)
MAX_PROBABILITY_SUM = 1.0 + 1e-3  # a softmax's top-k (or all of it) sums to 1, up to float32 rounding


def probability_checks(lists) -> dict[str, np.ndarray]:
    """For each PROBABILITY_REASONS reason, the rows of a list<float> column (a pyarrow array) that fail it:
    holding a NaN, an infinity or a null; a negative value; finite values summing above MAX_PROBABILITY_SUM.
    A null list fails none (the column is optional)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    n = len(lists)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    values = pc.fill_null(pc.list_flatten(lists).cast(pa.float64()), float("nan")).to_numpy(zero_copy_only=False)
    finite = np.isfinite(values)
    sums = np.bincount(parents[finite], weights=values[finite], minlength=n)
    return {PROBS_NOT_FINITE: np.bincount(parents[~finite], minlength=n) > 0,
            PROBS_NEGATIVE: np.bincount(parents[values < 0], minlength=n) > 0,
            PROBS_SUM_OVER_ONE: sums > MAX_PROBABILITY_SUM}


def classes_outside(lists, num_classes: int | None, max_class: int = 2**31 - 1) -> np.ndarray:
    """Rows of a list<int> column (`topk_classes`) holding a class below 0, at or above `num_classes` (when
    known, else above `max_class`), or a null."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(lists, pa.ChunkedArray):
        lists = lists.combine_chunks()
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    classes = pc.fill_null(pc.list_flatten(lists).cast(pa.int64()), -1).to_numpy(zero_copy_only=False)
    upper = max_class if num_classes is None else num_classes - 1
    return np.bincount(parents[(classes < 0) | (classes > upper)], minlength=len(lists)) > 0


def dense_probabilities(classes, probs, num_classes: int) -> np.ndarray:
    """The full vector from the top-k: the k probabilities where they belong, the rest of the mass (1 - their
    sum) spread evenly over the other classes, so the vector sums to 1 as the teacher's did."""
    probs = np.asarray(probs, dtype=np.float32)
    rest = num_classes - len(probs)
    fill = max(0.0, 1.0 - float(probs.sum())) / rest if rest > 0 else 0.0
    vector = np.full(num_classes, fill, dtype=np.float32)
    vector[np.asarray(classes, dtype=np.int64)] = probs
    return vector


def with_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """p^(1/T), renormalized: softmax(logits / T) recovered from softmax(logits). T < 1 sharpens, T > 1 flattens."""
    if temperature == 1.0:
        return probs / probs.sum(axis=-1, keepdims=True)
    logp = np.log(np.clip(probs, 1e-30, None)) / temperature
    logp -= logp.max(axis=-1, keepdims=True)
    out = np.exp(logp)
    return (out / out.sum(axis=-1, keepdims=True)).astype(np.float32)
