"""`shard` on the in-process runner: records and bytes against the selection, placement, re-runs, failures."""
from __future__ import annotations

import glob
import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ns_data import shard as shard_mod
from ns_data import tfrecord
from ns_data.cli import main
from ns_data.outputs import OutputExists
from ns_data.readers import ShardDataset
from ns_data.reading import InputError
from ns_data.shard import ShardOptions, ShardOptionsError, parse_size, run_shard
from ns_data.soft_labels import dense_probabilities, with_temperature
from ns_data.sources import plan_units, read_unit
from ns_data.synth import write_images

CLASSES = 10
PER_KIND = 40


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """160 images in the four source kinds, and a selection of all of them with 1-5 copies each."""
    root = tmp_path_factory.mktemp("corpus")
    paths = write_images(str(root / "files"), PER_KIND * 4, width=48, height=40)
    images = [open(p, "rb").read() for p in paths]
    for p in paths[PER_KIND:]:
        os.remove(p)
    with open(root / "c.tfrecord", "wb") as f:
        for data in images[PER_KIND: 2 * PER_KIND]:
            f.write(tfrecord.frame_record(tfrecord.make_example({"image/encoded": data})))
    with tarfile.open(root / "c.tar", "w") as tar:
        for i, data in enumerate(images[2 * PER_KIND: 3 * PER_KIND]):
            info = tarfile.TarInfo(f"x/{i:03d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    pq.write_table(pa.table({"image": images[3 * PER_KIND:]}), root / "c.parquet", row_group_size=15)
    records = [r for u in plan_units([str(root)]) for r in read_unit(u, None, None)]
    assert len(records) == 4 * PER_KIND and not any(r.error for r in records)
    rng = np.random.default_rng(7)
    n = len(records)
    labels = rng.integers(0, CLASSES, n)
    conf = rng.uniform(0.3, 0.9, n).astype(np.float32)
    topk = [[int(l), (int(l) + 1) % CLASSES, (int(l) + 2) % CLASSES] for l in labels]
    topp = [[float(c), float(1 - c) / 2, float(1 - c) / 4] for c in conf]
    table = pa.table({
        "id": [r.id for r in records], "source": [r.source for r in records],
        "offset": pa.array([r.offset for r in records], pa.int64()),
        "label": pa.array(labels, pa.int32()), "confidence": pa.array(conf),
        "topk_classes": pa.array(topk, pa.list_(pa.int32())), "topk_probs": pa.array(topp, pa.list_(pa.float32())),
        "rank": pa.array(np.zeros(n), pa.int32()), "copies": pa.array(rng.integers(1, 6, n), pa.int32()),
    })
    selection = root / "selection"
    selection.mkdir()
    pq.write_table(table, selection / "selection-00000.parquet", row_group_size=50)
    return {"root": root, "selection": str(selection), "table": table,
            "bytes": {r.id: r.data for r in records}}


def run(selection, output, **options):
    options.setdefault("num_classes", CLASSES)
    inputs = tuple(selection) if isinstance(selection, list) else (str(selection),)
    return run_shard(ShardOptions(inputs=inputs, output=str(output), **options), [], print_fn=lambda m: None)


def read_shards(output) -> dict[str, list[dict]]:
    shards = {}
    for path in sorted(glob.glob(os.path.join(str(output), "train-*.tfrecord"))):
        with open(path, "rb") as f:
            shards[os.path.basename(path)] = [tfrecord.parse_example(d) for _, d in tfrecord.read_records(f)]
    return shards


def shard_bytes(output) -> dict[str, bytes]:
    return {os.path.basename(p): open(p, "rb").read()
            for p in sorted(glob.glob(os.path.join(str(output), "train-*.tfrecord")))}


@pytest.fixture(scope="module")
def sharded(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "shards"
    manifest, wrote = run(corpus["selection"], out, num_shards=7)
    assert wrote
    return out, manifest


def test_every_copy_once_with_the_source_bytes_and_labels(corpus, sharded):
    out, manifest = sharded
    rows = {r["id"]: r for r in corpus["table"].to_pylist()}
    seen = Counter()
    for records in read_shards(out).values():
        for f in records:
            rid = f["id"][0].decode()
            row = rows[rid]
            seen[(rid, f["copy"][0])] += 1
            assert f["image/encoded"][0] == corpus["bytes"][rid]
            assert f["label"] == [row["label"]]
            assert f["prob"][0] == pytest.approx(row["confidence"])
            assert f["topk_classes"] == row["topk_classes"]
            assert f["topk_probs"] == pytest.approx(row["topk_probs"])
            dense = np.array(f["probabilities"])
            assert len(dense) == CLASSES and dense.sum() == pytest.approx(1.0, abs=1e-5)
            assert dense[row["topk_classes"]] == pytest.approx(row["topk_probs"])
    assert seen == Counter({(r["id"], c): 1 for r in rows.values() for c in range(r["copies"])})
    per_class = Counter()
    for r in rows.values():
        per_class[str(r["label"])] += r["copies"]
    assert manifest["classes"] == dict(per_class)
    assert manifest["records"] == sum(per_class.values())
    assert manifest["unique_images"] == len(rows) and manifest["errors"] == 0
    assert json.load(open(out / "manifest.json")) == manifest
    assert not os.path.exists(out / ".tmp-shard")


def test_shards_are_equal_in_size_and_each_a_sample_of_all_classes(corpus, sharded):
    out, manifest = sharded
    shards = read_shards(out)
    sizes = [len(r) for r in shards.values()]
    assert len(sizes) == 7 and max(sizes) - min(sizes) <= 1
    assert [s["records"] for s in manifest["shards"]] == sizes
    # Homogeneity of the class mix across shards: Pearson chi-square against the pooled mix.
    table = np.array([[sum(1 for f in recs if f["label"][0] == c) for c in range(CLASSES)]
                      for recs in shards.values()], dtype=float)
    expected = table.sum(1, keepdims=True) * table.sum(0, keepdims=True) / table.sum()
    keep = expected.sum(0) > 0
    chi2 = ((table - expected)[:, keep] ** 2 / expected[:, keep]).sum()
    dof = (table.shape[0] - 1) * (keep.sum() - 1)
    assert chi2 < dof + 4 * np.sqrt(2 * dof), (chi2, dof)  # about the 99.9% point; a class-sorted split is ~20x
    # Copies of one image spread over shards like independent draws, and never sit next to each other.
    where = {}
    for name, recs in shards.items():
        for pos, f in enumerate(recs):
            where.setdefault(f["id"][0], []).append((name, pos))
    multi = [w for w in where.values() if len(w) > 1]
    distinct = np.mean([len({n for n, _ in w}) for w in multi])
    expected_distinct = np.mean([7 * (1 - (6 / 7) ** len(w)) for w in multi])
    assert distinct > 0.9 * expected_distinct
    for w in multi:
        for (n1, p1), (n2, p2) in zip(sorted(w), sorted(w)[1:]):
            assert n1 != n2 or p2 - p1 > 1


def test_same_bytes_from_a_rerun_and_from_a_shuffled_split_selection(corpus, sharded, tmp_path):
    out, _ = sharded
    table = corpus["table"]
    order = np.random.default_rng(3).permutation(table.num_rows)
    split = tmp_path / "split"
    split.mkdir()
    for i, part in enumerate(np.array_split(order, 3)):
        pq.write_table(table.take(pa.array(part)), split / f"selection-{i:05d}.parquet", row_group_size=17)
    manifest, _ = run(str(split), tmp_path / "again", num_shards=7, shuffle="beam")
    assert shard_bytes(tmp_path / "again") == shard_bytes(out)  # `out` went through spill files
    other, _ = run(corpus["selection"], tmp_path / "seed1", num_shards=7, seed=1)
    assert shard_bytes(tmp_path / "seed1") != shard_bytes(out)
    assert other["classes"] == manifest["classes"]
    members = [{f["id"][0] for f in recs} for recs in (next(iter(read_shards(d).values())) for d in (out, tmp_path / "seed1"))]
    assert members[0] != members[1]  # the seed moves records between shards, not only within them


def test_rerun_over_complete_output_does_nothing_and_says_so(corpus, tmp_path):
    out = tmp_path / "shards"
    runner = CliRunner()
    args = ["shard", corpus["selection"], "--output", str(out), "--num-shards", "3", "--num-classes", "10"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    mtimes = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "*"))}
    second = runner.invoke(main, args)
    assert second.exit_code == 0 and "already complete" in second.output
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "*"))} == mtimes
    changed = runner.invoke(main, args[:-4] + ["--num-shards", "4", "--num-classes", "10"])
    assert changed.exit_code == 2 and "--overwrite" in changed.output
    replaced = runner.invoke(main, args[:-4] + ["--num-shards", "4", "--num-classes", "10", "--overwrite"])
    assert replaced.exit_code == 0 and len(glob.glob(str(out / "train-*"))) == 4
    shown = runner.invoke(main, ["inspect", str(out), "--records", "2"])
    assert shown.exit_code == 0 and "in 4 shards" in shown.output and "first 2 records" in shown.output
    assert "image JPEG 48x40" in shown.output


def test_interrupted_run_is_finished_by_the_next_one(corpus, sharded, tmp_path, monkeypatch):
    out = tmp_path / "shards"
    real = shard_mod.write_shard
    calls = []

    def failing(ctx, shard, records):
        calls.append(shard)
        if len(calls) == 4:
            raise OSError("disk gone")
        return real(ctx, shard, records)

    monkeypatch.setattr(shard_mod, "write_shard", failing)
    with pytest.raises(Exception, match="disk gone"):
        run(corpus["selection"], out, num_shards=7)
    monkeypatch.setattr(shard_mod, "write_shard", real)
    assert not os.path.exists(out / "manifest.json") and len(glob.glob(str(out / "train-*"))) == 3
    result = CliRunner().invoke(main, ["inspect", str(out)])
    assert result.exit_code == 2 and "interrupted run" in result.output
    manifest, wrote = run(corpus["selection"], out, num_shards=7)
    assert wrote and manifest["resumed_shards"] == 3
    assert shard_bytes(out) == shard_bytes(sharded[0])
    assert manifest["records"] == sharded[1]["records"]


def test_missing_and_damaged_sources_become_errors(corpus, tmp_path):
    root = tmp_path / "c"
    root.mkdir()
    table = corpus["table"]
    sources = table.column("source").to_pylist()
    tar = next(s for s in sources if s.endswith(".tar"))
    tfr = next(s for s in sources if s.endswith(".tfrecord"))
    damaged = str(root / "damaged.tfrecord")
    data = open(tfr, "rb").read()
    open(damaged, "wb").write(data[: len(data) // 2])
    moved = pa.array([str(root / "gone.tar") if s == tar else damaged if s == tfr else s for s in sources])
    table = table.set_column(table.schema.get_field_index("source"), "source", moved)
    sel = tmp_path / "sel"
    sel.mkdir()
    pq.write_table(table, sel / "selection-00000.parquet")
    manifest, _ = run(str(sel), tmp_path / "out", num_shards=3)
    errors = pq.read_table(tmp_path / "out" / "errors-00000.parquet").to_pylist()
    by_reason = Counter(e["reason"] for e in errors)
    assert by_reason["missing_source"] == PER_KIND
    assert 0 < by_reason["corrupt_record"] < PER_KIND  # the records before the cut are still read
    assert manifest["errors_by_reason"] == dict(by_reason)
    lost = {e["id"] for e in errors}
    rows = table.to_pylist()
    assert manifest["records_lost_to_errors"] == sum(r["copies"] for r in rows if r["id"] in lost)
    assert manifest["records"] == sum(r["copies"] for r in rows if r["id"] not in lost)
    written = {f["id"][0].decode() for recs in read_shards(tmp_path / "out").values() for f in recs}
    assert written == {r["id"] for r in rows} - lost


def test_nothing_readable_and_bad_options_fail_before_the_run(corpus, tmp_path):
    table = corpus["table"]
    gone = table.set_column(table.schema.get_field_index("source"), "source",
                            pa.array([str(tmp_path / "nowhere.jpg")] * table.num_rows))
    sel = tmp_path / "sel"
    sel.mkdir()
    pq.write_table(gone, sel / "selection-00000.parquet")
    with pytest.raises(InputError, match="none of .* sampled"):
        run(str(sel), tmp_path / "out", num_shards=2)
    with pytest.raises(ShardOptionsError, match="only one of"):
        run(corpus["selection"], tmp_path / "o", num_shards=2, records_per_shard=10)
    with pytest.raises(ShardOptionsError, match="more than the"):
        run(corpus["selection"], tmp_path / "o", num_shards=10_000)
    with pytest.raises(ShardOptionsError, match="--num-classes"):
        run(corpus["selection"], tmp_path / "o", num_classes=None)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "train-00000-of-00001.tfrecord").write_bytes(b"x")
    with pytest.raises(OutputExists):
        run(corpus["selection"], tmp_path / "taken", num_shards=2)


def test_number_of_classes_comes_from_the_teacher_recorded_by_label(corpus, tmp_path):
    table = corpus["table"]
    table = table.replace_schema_metadata({b"ns_data.teacher": json.dumps({"num_classes": 12}).encode()})
    (tmp_path / "sel").mkdir()
    pq.write_table(table, tmp_path / "sel" / "selection-00000.parquet")
    manifest, _ = run(str(tmp_path / "sel"), tmp_path / "out", num_shards=2, num_classes=None)
    assert manifest["num_classes"] == 12
    assert all(len(f["probabilities"]) == 12 for recs in read_shards(tmp_path / "out").values() for f in recs)


def test_shard_sizes_from_records_or_bytes(corpus, tmp_path):
    total = sum(corpus["table"].column("copies").to_pylist())
    manifest, _ = run(corpus["selection"], tmp_path / "r", records_per_shard=100)
    assert manifest["num_shards"] == -(-total // 100)
    manifest, _ = run(corpus["selection"], tmp_path / "b", max_shard_bytes=200_000)
    assert max(s["bytes"] for s in manifest["shards"]) <= 200_000
    assert manifest["num_shards"] <= 2 * -(-manifest["bytes"] // 200_000)
    assert parse_size("256MB") == 256_000_000 and parse_size("1GiB") == 2**30 and parse_size("500k") == 500_000


def test_dense_probabilities_spread_the_rest_of_the_mass():
    vector = dense_probabilities([3, 1], [0.5, 0.3], 6)
    assert vector == pytest.approx([0.05, 0.3, 0.05, 0.5, 0.05, 0.05])
    sharp = with_temperature(np.array([0.5, 0.3, 0.2]), 0.5)  # p^2 renormalized
    assert sharp == pytest.approx(np.array([0.25, 0.09, 0.04]) / 0.38)
    flat = with_temperature(np.array([0.5, 0.3, 0.2]), 2.0)  # sqrt(p) renormalized
    assert flat == pytest.approx(np.sqrt([0.5, 0.3, 0.2]) / np.sqrt([0.5, 0.3, 0.2]).sum())


def test_pytorch_reader_reads_every_record_once(sharded):
    out, manifest = sharded
    ids = Counter((r["id"], r["label"]) for r in ShardDataset(str(out), seed=1))
    assert sum(ids.values()) == manifest["records"]


TF_SCRIPT = """
import json, sys, hashlib
from ns_data.tf_data import shard_dataset
rows = []
for r in shard_dataset(sys.argv[1], num_classes=int(sys.argv[2]), seed=None):
    rows.append([r["id"].numpy().decode(), int(r["copy"]), int(r["label"]), float(r["prob"]),
                 hashlib.sha1(r["image/encoded"].numpy()).hexdigest(), r["probabilities"].numpy().tolist(),
                 r["topk_classes"].numpy().tolist()])
print(json.dumps(rows))
"""


def test_tf_data_reader_parses_the_same_records(sharded):
    """TensorFlow runs in a child process: it may not share one with torch (DEVELOPERS.md)."""
    import hashlib

    pytest.importorskip("tensorflow", reason="the `tf` extra is not installed")  # never imported here
    out, _ = sharded
    done = subprocess.run([sys.executable, "-c", TF_SCRIPT, str(out), str(CLASSES)], capture_output=True,
                          text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout)
    want = [[f["id"][0].decode(), f["copy"][0], f["label"][0], f["prob"][0],
             hashlib.sha1(f["image/encoded"][0]).hexdigest(), f["probabilities"], f["topk_classes"]]
            for recs in read_shards(out).values() for f in recs]
    assert len(got) == len(want)
    for g, w in zip(sorted(got), sorted(want)):
        assert g[:3] == w[:3] and g[4] == w[4] and g[6] == w[6]
        assert g[3] == pytest.approx(w[3]) and g[5] == pytest.approx(w[5])


def test_a_label_outside_the_classes_is_an_error_row(corpus, tmp_path):
    table = corpus["table"]
    labels = table.column("label").to_pylist()
    labels[0] = CLASSES + 2
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
    (tmp_path / "sel").mkdir()
    pq.write_table(table, tmp_path / "sel" / "selection-00000.parquet")
    manifest, _ = run(str(tmp_path / "sel"), tmp_path / "out", num_shards=2)
    (error,) = pq.read_table(tmp_path / "out" / "errors-00000.parquet").to_pylist()
    assert error["id"] == table.column("id")[0].as_py() and error["reason"] == "label_out_of_range"
    assert manifest["errors_by_reason"] == {"label_out_of_range": 1}
    assert str(CLASSES + 2) not in manifest["classes"]
