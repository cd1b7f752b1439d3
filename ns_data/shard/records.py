"""A selection row as tf.train.Example features (contract.RECORD_FEATURES): the part shared by its copies, and
the copy number added per record."""
from __future__ import annotations

import functools
from typing import Any

from ns_data import tfrecord
from ns_data.soft_labels import dense_probabilities


def example_features(row: dict[str, Any], num_classes: int | None, probabilities: bool) -> dict[str, Any]:
    """A row's features but the image and the copy number, which are added per record: the original Noisy
    Student names plus id and the sparse label."""
    features: dict[str, Any] = {"label": int(row["label"]), "prob": float(row["confidence"]), "id": row["id"]}
    if row.get("topk_classes") is not None:
        features["topk_classes"] = [int(c) for c in row["topk_classes"]]
        features["topk_probs"] = [float(p) for p in row["topk_probs"]]
    if probabilities:
        if row.get("probs") is not None:
            features["probabilities"] = [float(p) for p in row["probs"]]
        else:
            classes = features.get("topk_classes", [features["label"]])
            probs = features.get("topk_probs", [features["prob"]])
            features["probabilities"] = dense_probabilities(classes, probs, num_classes).tolist()
    return features


def shared_features(row: dict[str, Any], num_classes: int | None, probabilities: bool) -> bytes:
    """example_features serialized (deterministically: the same bytes in every process)."""
    return tfrecord.serialized_features(example_features(row, num_classes, probabilities))


@functools.lru_cache(maxsize=1024)
def copy_feature(copy: int) -> bytes:
    """The serialized `copy` feature, appended to a row's shared features (protobuf merges the two)."""
    return tfrecord.serialized_features({"copy": copy})
