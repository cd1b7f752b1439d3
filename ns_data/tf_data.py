"""Reading training shards with tf.data, for TensorFlow/TPU trainers. Imports TensorFlow: keep it out of
processes that run PyTorch models (docs/design.md); PyTorch trainers use `ns_data.readers.ShardDataset`. Imports
no torch: a TensorFlow-only install (`pip install '.[tf]'`) can use it.

    import ns_data.tf_data as nst
    ds = nst.shard_dataset("gs://bucket/shards", num_classes=1000, seed=0, epochs=None)
    for batch in ds.batch(256): ...   # dicts: image/encoded, label, prob, probabilities, topk_*, id, copy

The feature names are the original Noisy Student code's (`image/encoded`, `label`, `prob`, `probabilities`),
so its `unl_dst_parser` reads these shards too; `feature_spec` is what both parse with.
"""
from __future__ import annotations

import tensorflow as tf

from ns_data.shard_files import list_shards


def feature_spec(num_classes: int | None, sparse: bool = True) -> dict:
    """tf.io.parse_example spec of a shard record; `probabilities` only when num_classes is given."""
    spec = {
        "image/encoded": tf.io.FixedLenFeature([], tf.string),
        "label": tf.io.FixedLenFeature([], tf.int64),
        "prob": tf.io.FixedLenFeature([], tf.float32),
        "id": tf.io.FixedLenFeature([], tf.string, default_value=""),
        "copy": tf.io.FixedLenFeature([], tf.int64, default_value=0),
    }
    if num_classes:
        spec["probabilities"] = tf.io.FixedLenFeature([num_classes], tf.float32)
    if sparse:
        spec["topk_classes"] = tf.io.RaggedFeature(tf.int64)
        spec["topk_probs"] = tf.io.RaggedFeature(tf.float32)
    return spec


def shard_dataset(shards, num_classes: int | None = None, seed: int | None = 0, epochs: int | None = 1,
                  shard_index: int = 0, num_input_shards: int = 1, cycle_length: int = 8,
                  sparse: bool = True, allow_incomplete: bool = False) -> tf.data.Dataset:
    """Parsed records of the shards: files split over hosts (`shard_index` of `num_input_shards`), their order
    shuffled per epoch with `seed` (None: kept in order), read `cycle_length` at a time (interleaved). The shards
    are found as `ns_data.shard_files.list_shards` finds them: an unfinished `ns-data shard` output is refused unless
    `allow_incomplete`."""
    paths = list_shards(shards, allow_incomplete)
    files = tf.data.Dataset.from_tensor_slices(paths).shard(num_input_shards, shard_index)
    if seed is not None:
        files = files.shuffle(len(paths), seed=seed, reshuffle_each_iteration=True)
    files = files.repeat(epochs)
    records = files.interleave(tf.data.TFRecordDataset, cycle_length=cycle_length,
                               num_parallel_calls=tf.data.AUTOTUNE, deterministic=seed is not None)
    spec = feature_spec(num_classes, sparse)
    return records.map(lambda r: tf.io.parse_single_example(r, spec), num_parallel_calls=tf.data.AUTOTUNE)
