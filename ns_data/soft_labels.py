"""Soft labels from the sparse top-k the teacher recorded: the dense vector, and its temperature.

numpy only: `shard` (no torch) and the trainer (no Beam) both use it.
"""
from __future__ import annotations

import numpy as np


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
