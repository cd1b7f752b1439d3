"""The shard readers: every record exactly once per epoch, whatever the workers; no TensorFlow in the PyTorch
one; an unfinished `ns-data shard` output refused by both."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from ns_data import contract, tfrecord
from ns_data.readers import ShardDataset, list_shards
from ns_data.stage import InputError


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


def write_records(path, count: int) -> None:
    with open(path, "wb") as f:
        for i in range(count):
            f.write(tfrecord.frame_record(tfrecord.make_example({"image/encoded": b"jpeg", "label": i, "prob": 0.5})))


@pytest.fixture
def unfinished(tmp_path):
    """An `ns-data shard` output killed after writing 2 of its 3 shards: shards in place, plan, no manifest."""
    out = tmp_path / "shards"
    (out / contract.SHARDS.tmp_name).mkdir(parents=True)
    (out / contract.SHARDS.tmp_name / "plan.json").write_text("{}")
    for s in range(2):
        write_records(out / contract.SHARDS.data_name(s, 3), 4)
    return out


def test_an_unfinished_shard_output_is_refused_unless_asked_for(unfinished):
    with pytest.raises(InputError, match="unfinished shard run"):
        ShardDataset(str(unfinished))
    with pytest.raises(InputError, match="unfinished shard run"):
        list_shards(str(unfinished))
    assert len(list(ShardDataset(str(unfinished), allow_incomplete=True))) == 8
    assert [p.rsplit("/", 1)[1] for p in list_shards(str(unfinished), allow_incomplete=True)] == [
        "train-00000-of-00003.tfrecord", "train-00001-of-00003.tfrecord"]


def test_a_complete_shard_output_gives_its_shards_only(unfinished):
    write_records(unfinished / contract.SHARDS.data_name(2, 3), 1)
    (unfinished / contract.SHARDS.marker).write_text(json.dumps({"stage": contract.SHARDS.stage, "records": 9}))
    write_records(unfinished / "not-a-shard.tfrecord", 5)  # beside the output, not in it
    assert len(list(ShardDataset(str(unfinished)))) == 9


def test_other_directories_globs_and_lists(tmp_path, shards):
    assert list_shards(str(tmp_path)) == shards  # a directory ns-data did not write: its *.tfrecord files
    (tmp_path / "manifest.json").write_text("{}")  # another tool's
    assert list_shards(str(tmp_path)) == shards
    assert list_shards(str(tmp_path / "shard-0000[12].tfrecord")) == shards[1:3]
    assert list_shards(shards[3:0:-1]) == shards[1:4]
    with pytest.raises(InputError, match="no shards at"):
        list_shards(str(tmp_path / "missing"))


def test_every_contract_feature_reaches_the_record(tmp_path):
    values = {"image/encoded": b"jpeg", "label": 1, "prob": 0.5, "id": "a.jpg", "copy": 2, "topk_classes": [1, 0],
              "topk_probs": [0.5, 0.25], "probabilities": [0.25, 0.5, 0.25]}
    assert set(values) == set(contract.RECORD_FEATURES)
    (tmp_path / "x.tfrecord").write_bytes(tfrecord.frame_record(tfrecord.make_example(values)))
    (record,) = list(ShardDataset(str(tmp_path)))
    assert set(record) == {"image" if name == "image/encoded" else name for name in contract.RECORD_FEATURES}


TF_SCRIPT = """
import json, sys
from ns_data import contract
from ns_data.stage import InputError
from ns_data.tf_data import feature_spec, shard_dataset
try:
    shard_dataset(sys.argv[1])
    refused = ""
except InputError as err:
    refused = str(err)
read = sum(1 for _ in shard_dataset(sys.argv[1], seed=None, sparse=False, allow_incomplete=True))
print(json.dumps({"refused": refused, "read": read, "spec": sorted(feature_spec(3)) == sorted(contract.RECORD_FEATURES)}))
"""


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs TensorFlow")
def test_tf_data_refuses_an_unfinished_output_too(unfinished):
    """In a process of its own: TensorFlow stays out of processes that run PyTorch models."""
    done = subprocess.run([sys.executable, "-c", TF_SCRIPT, str(unfinished)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert "unfinished shard run" in result["refused"] and result["read"] == 8 and result["spec"]


TF_WITHOUT_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ImportError("torch is not installed here")

sys.meta_path.insert(0, NoTorch())
from ns_data import tfrecord
import ns_data.tf_data as nst

with open(sys.argv[1] + "/train-00000-of-00001.tfrecord", "wb") as f:
    f.write(tfrecord.frame_record(tfrecord.make_example({"image/encoded": b"x", "label": 3, "prob": 0.5})))
(record,) = nst.shard_dataset(sys.argv[1], seed=None, sparse=False)
assert int(record["label"]) == 3 and bytes(record["image/encoded"].numpy()) == b"x"
assert not [m for m in sys.modules if m.split(".")[0] == "torch"]
print("read without torch")
"""


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="needs tensorflow ('.[tf]')")
def test_the_tf_data_reader_works_where_torch_cannot_be_imported(tmp_path):
    """A TensorFlow-only install: ns_data.tf_data finds and reads shards in a process where importing torch
    fails."""
    done = subprocess.run([sys.executable, "-c", TF_WITHOUT_TORCH, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0 and "read without torch" in done.stdout, done.stderr[-3000:]
