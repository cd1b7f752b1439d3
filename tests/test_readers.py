"""The PyTorch shard reader: every record exactly once per epoch, whatever the workers; no TensorFlow."""
import subprocess
import sys

import pytest
import torch

from ns_data import tfrecord
from ns_data.readers import ShardDataset


@pytest.fixture
def shards(tmp_path):
    paths = []
    for s in range(5):
        path = tmp_path / f"shard-{s:05d}.tfrecord"
        with open(path, "wb") as f:
            for i in range(7 + s):
                rid = f"img{s}-{i}.jpg#0"
                f.write(tfrecord.frame_record(tfrecord.make_example({
                    "image/encoded": f"bytes of {rid}".encode(), "label": i % 3, "prob": 0.5, "id": rid,
                    "topk_classes": [i % 3, (i + 1) % 3], "topk_probs": [0.5, 0.25],
                    "probabilities": [0.5, 0.25, 0.25]})))
        paths.append(str(path))
    return paths


def ids(loader) -> list[str]:
    return [rid for batch in loader for rid in batch["id"]]


@pytest.mark.parametrize("workers", [0, 1, 2, 3])
def test_every_record_once_per_epoch_across_workers(tmp_path, shards, workers):
    dataset = ShardDataset(str(tmp_path), seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers)
    seen = ids(loader)
    assert len(seen) == len(set(seen)) == sum(7 + s for s in range(5))


def test_ranks_split_the_shards_and_epochs_reorder_them(shards):
    parts = [list(ShardDataset(shards, rank=r, world_size=2)) for r in range(2)]
    all_ids = [rec["id"] for part in parts for rec in part]
    assert len(all_ids) == len(set(all_ids)) == sum(7 + s for s in range(5))
    dataset = ShardDataset(shards, seed=1)
    orders = []
    for epoch in range(4):
        dataset.set_epoch(epoch)
        orders.append(tuple(dataset.shards_for_this_worker()))
    assert len(set(orders)) > 1 and all(sorted(o) == sorted(shards) for o in orders)


def test_records_carry_label_and_soft_labels(shards):
    record = next(iter(ShardDataset(shards[:1], shuffle_shards=False, decode=len)))
    assert record["id"] == "img0-0.jpg#0" and record["label"] == 0 and record["image"] == len(b"bytes of img0-0.jpg#0")
    assert record["topk_classes"].tolist() == [0, 1] and record["topk_probs"].tolist() == [0.5, 0.25]
    assert record["probabilities"].tolist() == [0.5, 0.25, 0.25] and record["prob"] == 0.5


def test_reader_does_not_import_tensorflow():
    code = "import ns_data.readers, sys; print('tensorflow' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


def test_imagenet_layout_label_is_read_as_it_is(tmp_path):
    path = tmp_path / "train-00000-of-00001.tfrecord"
    path.write_bytes(tfrecord.frame_record(tfrecord.make_example({"image/encoded": b"jpeg",
                                                                  "image/class/label": 7})))
    (record,) = list(ShardDataset(str(tmp_path)))
    assert record["label"] == 7 and record["image"] == b"jpeg"
