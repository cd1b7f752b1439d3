"""`shard` on the in-process runner: records and bytes against the selection, placement, bad rows, re-runs,
a killed run finished by the next one, failures before the run."""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections import Counter

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ns_data import contract, tfrecord
from ns_data.cli import main
from ns_data.readers import ShardDataset
from ns_data.shard import ShardOptions, parse_size, run_shard
from ns_data.soft_labels import dense_probabilities, with_temperature
from ns_data.stage import InputError, OptionsError, OutputExists
from ns_data.synth import write_images

CLASSES = 10
PER_KIND = 40


def write_selection(directory, table: pa.Table, row_group_size: int = 50, complete: bool = True) -> str:
    """A balance output as `shard` expects it: selection-00000.parquet, and stats.json when complete."""
    os.makedirs(directory, exist_ok=True)
    pq.write_table(table, os.path.join(str(directory), contract.SELECTION.data_name(0)), row_group_size=row_group_size)
    if complete:
        with open(os.path.join(str(directory), contract.SELECTION.marker), "w") as f:
            json.dump({"stage": "balance", "selected_rows": table.num_rows}, f)
    return str(directory)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """160 images in the four source kinds, and a selection of all of them with 1-5 copies each. The offsets
    are worked out here, apart from `label`'s code: byte offsets of TFRecord records and of tar members' data,
    rows of the Parquet file, whose image column `label` recorded in the selection's metadata."""
    root = tmp_path_factory.mktemp("corpus")
    paths = write_images(str(root / "files"), PER_KIND * 4, width=48, height=40)
    images = [open(p, "rb").read() for p in paths]
    for p in paths[PER_KIND:]:
        os.remove(p)
    entries = [(f"files/{os.path.basename(p)}", p, None) for p in paths[:PER_KIND]]
    offset = 0
    with open(root / "c.tfrecord", "wb") as f:
        for i, data in enumerate(images[PER_KIND: 2 * PER_KIND]):
            framed = tfrecord.frame_record(tfrecord.make_example({"image/encoded": data}))
            entries.append((f"c.tfrecord#{i}", str(root / "c.tfrecord"), offset))
            f.write(framed)
            offset += len(framed)
    with tarfile.open(root / "c.tar", "w") as tar:
        for i, data in enumerate(images[2 * PER_KIND: 3 * PER_KIND]):
            info = tarfile.TarInfo(f"x/{i:03d}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with tarfile.open(root / "c.tar") as tar:
        entries += [(f"c.tar/{m.name}", str(root / "c.tar"), m.offset_data) for m in tar.getmembers()]
    # Two binary columns: only the image column recorded by `label` tells which one holds the images.
    parquet_images = images[3 * PER_KIND:]
    pq.write_table(pa.table({"thumb": [b"t"] * PER_KIND, "pixels": parquet_images}), root / "c.parquet",
                   row_group_size=15)
    entries += [(f"c.parquet#{i}", str(root / "c.parquet"), i) for i in range(PER_KIND)]
    rng = np.random.default_rng(7)
    n = len(entries)
    labels = rng.integers(0, CLASSES, n)
    conf = rng.uniform(0.3, 0.9, n).astype(np.float32)
    topk = [[int(l), (int(l) + 1) % CLASSES, (int(l) + 2) % CLASSES] for l in labels]
    topp = [[float(c), float(1 - c) / 2, float(1 - c) / 4] for c in conf]
    table = pa.table({
        "id": [e[0] for e in entries], "source": [e[1] for e in entries],
        "offset": pa.array([e[2] for e in entries], pa.int64()),
        "label": pa.array(labels, pa.int32()), "confidence": pa.array(conf),
        "topk_classes": pa.array(topk, pa.list_(pa.int32())), "topk_probs": pa.array(topp, pa.list_(pa.float32())),
        "rank": pa.array(np.zeros(n), pa.int32()), "copies": pa.array(rng.integers(1, 6, n), pa.int32()),
    }).replace_schema_metadata(contract.encode_metadata({contract.INPUT: {"format": "auto",
                                                                          "image_column": "pixels"}}))
    selection = write_selection(root / "selection", table)
    return {"root": root, "selection": selection, "table": table,
            "bytes": {e[0]: data for e, data in zip(entries, images)}}


def with_column(table: pa.Table, name: str, values: list, type_=None) -> pa.Table:
    column = pa.array(values, type_ or table.schema.field(name).type)
    return table.set_column(table.schema.get_field_index(name), name, column)


def run(selection, output, **options):
    options.setdefault("num_classes", CLASSES)
    inputs = tuple(selection) if isinstance(selection, list) else (str(selection),)
    return run_shard(ShardOptions(inputs=inputs, output=str(output), **options), [], echo=lambda m: None)


def read_shards(output) -> dict[str, list[dict]]:
    shards = {}
    for path in sorted(glob.glob(os.path.join(str(output), "train-*.tfrecord"))):
        with open(path, "rb") as f:
            shards[os.path.basename(path)] = [tfrecord.parse_example(d) for _, d in tfrecord.read_records(f)]
    return shards


def shard_bytes(output) -> dict[str, bytes]:
    return {os.path.basename(p): open(p, "rb").read()
            for p in sorted(glob.glob(os.path.join(str(output), "train-*.tfrecord")))}


def read_errors(output) -> list[dict]:
    return pq.read_table(os.path.join(str(output), "errors-00000.parquet")).to_pylist()


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
    assert manifest["records"] == sum(per_class.values()) == manifest["input"]["records"]
    assert manifest["unique_images"] == len(rows) == manifest["input"]["rows"] and manifest["errors"] == 0
    on_disk = {os.path.basename(p): os.path.getsize(p) for p in glob.glob(str(out / "*.tfrecord"))}
    assert {s["name"]: s["bytes"] for s in manifest["shards"]} == on_disk
    assert manifest["bytes"] == sum(on_disk.values())
    assert set(os.listdir(out)) == set(on_disk) | {"manifest.json"}  # no temp dir, no errors file


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
    # Copies of one image spread over shards like independent draws, and within a shard sit next to each other
    # no more often than in a random order (a shard in id order would hold every such pair side by side).
    where = {}
    for name, recs in shards.items():
        for pos, f in enumerate(recs):
            where.setdefault(f["id"][0], []).append((name, pos))
    multi = [w for w in where.values() if len(w) > 1]
    distinct = np.mean([len({n for n, _ in w}) for w in multi])
    expected_distinct = np.mean([7 * (1 - (6 / 7) ** len(w)) for w in multi])
    assert distinct > 0.9 * expected_distinct
    same_shard = [Counter(f["id"][0] for f in recs) for recs in shards.values()]
    pairs = sum(k * (k - 1) / 2 for ids in same_shard for k in ids.values())
    random_adjacent = sum(k * (k - 1) / len(recs) for ids, recs in zip(same_shard, shards.values())
                          for k in ids.values())
    adjacent = sum(a["id"] == b["id"] for recs in shards.values() for a, b in zip(recs, recs[1:]))
    assert pairs > 20 and adjacent <= random_adjacent + 3 * np.sqrt(random_adjacent) + 1, (adjacent, pairs)


def test_same_bytes_with_two_worker_processes_either_shuffle(corpus, sharded, tmp_path):
    out, _ = sharded
    for shuffle in ("files", "beam"):
        opts = ShardOptions(inputs=(corpus["selection"],), output=str(tmp_path / shuffle), num_shards=7,
                            num_classes=CLASSES, shuffle=shuffle)
        run_shard(opts, ["--direct_num_workers", "2"], echo=lambda m: None)
        assert shard_bytes(tmp_path / shuffle) == shard_bytes(out)  # `out`: one process, spill files


def test_same_bytes_from_a_shuffled_split_selection_through_beams_shuffle(corpus, sharded, tmp_path):
    out, _ = sharded
    table = corpus["table"]
    order = np.random.default_rng(3).permutation(table.num_rows)
    split = tmp_path / "split"
    split.mkdir()
    for i, part in enumerate(np.array_split(order, 3)):
        pq.write_table(table.take(pa.array(part)), split / f"selection-{i:05d}.parquet", row_group_size=17)
    (split / "stats.json").write_text('{"stage": "balance"}')
    manifest, _ = run(str(split), tmp_path / "again", num_shards=7, shuffle="beam")
    assert shard_bytes(tmp_path / "again") == shard_bytes(out)  # `out` went through spill files
    other, _ = run(corpus["selection"], tmp_path / "seed1", num_shards=7, seed=1)
    assert shard_bytes(tmp_path / "seed1") != shard_bytes(out)
    assert other["classes"] == manifest["classes"]
    first_shards = (next(iter(read_shards(d).values())) for d in (out, tmp_path / "seed1"))
    members = [{f["id"][0] for f in recs} for recs in first_shards]
    assert members[0] != members[1]  # the seed moves records between shards, not only within them


def test_rerun_over_complete_output_does_nothing_and_says_so(corpus, tmp_path):
    out = tmp_path / "shards"
    runner = CliRunner()
    args = ["shard", corpus["selection"], "--output", str(out), "--num-shards", "3", "--num-classes", "10"]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    mtimes = {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "*"))}
    second = runner.invoke(main, args)
    assert second.exit_code == 0 and "already complete" in second.stderr
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "*"))} == mtimes
    changed = runner.invoke(main, args[:-4] + ["--num-shards", "4", "--num-classes", "10"])
    assert changed.exit_code == 1 and "--overwrite" in changed.output
    assert {p: os.stat(p).st_mtime_ns for p in glob.glob(str(out / "*"))} == mtimes
    replaced = runner.invoke(main, args[:-4] + ["--num-shards", "4", "--num-classes", "10", "--overwrite"])
    assert replaced.exit_code == 0 and len(glob.glob(str(out / "train-*"))) == 4
    shown = runner.invoke(main, ["inspect", str(out), "--records", "2"])
    assert shown.exit_code == 0 and "in 4 shards" in shown.output and "first 2 records" in shown.output
    assert "image 48x40" in shown.output  # decoded as the trainer decodes it


SLOW_CHILD = """
import sys, time
from ns_data.shard import pipeline
from pipelines.shard import run

write_shard = pipeline.write_shard
def slow_write_shard(*args):
    info = write_shard(*args)
    time.sleep(0.4)  # room for the test to kill this process between two shards
    return info

pipeline.write_shard = slow_write_shard
run(sys.argv[1:])
"""


def test_killed_run_is_finished_by_the_next_one(corpus, sharded, tmp_path):
    """SIGKILL a real `python -m pipelines.shard` once some shards are in place; the same command again keeps
    them, writes the rest, and the shards are byte for byte those of an uninterrupted run."""
    out = tmp_path / "shards"
    args = [corpus["selection"], "--output", str(out), "--num-shards", "7", "--num-classes", str(CLASSES),
            "--no-progress"]
    # In-process (one worker): the slowed-down write is patched in this process only.
    child = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, *args, "--direct_num_workers", "1"],
                             stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(glob.glob(str(out / "train-*.tfrecord"))) < 2 and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert child.poll() is None, child.communicate()[1].decode()[-2000:]
    child.send_signal(signal.SIGKILL)
    child.communicate()
    kept = shard_bytes(out)
    assert 2 <= len(kept) < 7 and not os.path.exists(out / "manifest.json")
    shown = CliRunner().invoke(main, ["inspect", str(out)])
    assert shown.exit_code == 1 and "unfinished shard run" in shown.output

    again = subprocess.run([sys.executable, "-m", "pipelines.shard", *args], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"shard: finishing an interrupted run in {out}" in again.stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["resumed_shards"] == len(kept)
    assert shard_bytes(out) == shard_bytes(sharded[0])
    assert manifest["records"] == sharded[1]["records"] and manifest["classes"] == sharded[1]["classes"]
    assert set(os.listdir(out)) == set(shard_bytes(out)) | {"manifest.json"}


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
    table = with_column(table, "source", [str(root / "gone.tar") if s == tar else damaged if s == tfr else s
                                          for s in sources])
    manifest, _ = run(write_selection(tmp_path / "sel", table), tmp_path / "out", num_shards=3)
    errors = read_errors(tmp_path / "out")
    by_reason = Counter(e["reason"] for e in errors)
    assert by_reason["missing_source"] == PER_KIND
    assert 0 < by_reason["corrupt_record"] < PER_KIND  # the records before the cut are still read
    assert manifest["errors_by_reason"] == dict(by_reason)
    lost = {e["id"] for e in errors}
    rows = table.to_pylist()
    assert manifest["records_lost_to_errors"] == sum(r["copies"] for r in rows if r["id"] in lost)
    assert manifest["records"] == sum(r["copies"] for r in rows if r["id"] not in lost)
    assert manifest["unique_images"] + manifest["errors"] == manifest["input"]["rows"] == len(rows)
    written = {f["id"][0].decode() for recs in read_shards(tmp_path / "out").values() for f in recs}
    assert written == {r["id"] for r in rows} - lost


def with_fingerprints(table: pa.Table, images: dict[str, bytes]) -> pa.Table:
    """The selection with `label`'s content fingerprint of each row's image, computed here from the bytes."""
    ids = table.column("id").to_pylist()
    table = table.append_column("content_bytes", pa.array([len(images[i]) for i in ids], pa.int64()))
    return table.append_column("content_crc32c", pa.array([google_crc32c.value(images[i]) for i in ids], pa.int64()))


def test_a_source_changed_after_labeling_is_an_error_row_and_never_written(corpus, tmp_path):
    """Images replaced by an HTML page, emptied, or changed to other bytes of the same length after `label` are
    `source_changed` error rows; the unchanged images of the same sources are written as they were labeled."""
    table = with_fingerprints(corpus["table"], corpus["bytes"])
    rows = table.to_pylist()
    files = [r for r in rows if r["offset"] is None][:4]
    copies = {}
    for r in files:
        copies[r["source"]] = str(tmp_path / os.path.basename(r["source"]))
        open(copies[r["source"]], "wb").write(corpus["bytes"][r["id"]])
    tar = next(r["source"] for r in rows if r["source"].endswith(".tar"))
    copies[tar] = str(tmp_path / "c.tar")
    open(copies[tar], "wb").write(open(tar, "rb").read())
    table = with_column(table, "source", [copies.get(r["source"], r["source"]) for r in rows])
    rows = table.to_pylist()
    html = b"<html><body>Not Found</body></html>"
    open(rows[0]["source"], "wb").write(html)
    open(rows[1]["source"], "wb").close()
    flipped = bytearray(corpus["bytes"][rows[2]["id"]])
    flipped[len(flipped) // 2] ^= 0xFF
    open(rows[2]["source"], "wb").write(flipped)
    member = next(r for r in rows if r["source"] == copies[tar])  # a tar member changed in place, same length
    with open(copies[tar], "r+b") as f:
        f.seek(member["offset"] + 100)
        byte = f.read(1)
        f.seek(member["offset"] + 100)
        f.write(bytes([byte[0] ^ 0xFF]))
    changed = {rows[0]["id"], rows[1]["id"], rows[2]["id"], member["id"]}

    notes = []
    manifest, _ = run_shard(ShardOptions(inputs=(write_selection(tmp_path / "sel", table),),
                                         output=str(tmp_path / "out"), num_shards=3, num_classes=CLASSES),
                            [], echo=notes.append)
    assert not any(contract.NO_FINGERPRINT in n for n in notes)
    errors = {e["id"]: e for e in read_errors(tmp_path / "out")}
    assert set(errors) == changed and {e["reason"] for e in errors.values()} == {"source_changed"}
    original = corpus["bytes"][rows[0]["id"]]
    assert errors[rows[0]["id"]]["detail"] == (
        f"labeled {len(original)} bytes with CRC32C {google_crc32c.value(original):08x}; "
        f"now {len(html)} bytes with CRC32C {google_crc32c.value(html):08x}")
    assert f"now 0 bytes with CRC32C {google_crc32c.value(b''):08x}" in errors[rows[1]["id"]]["detail"]
    assert f"now {len(flipped)} bytes" in errors[rows[2]["id"]]["detail"]
    assert manifest["errors_by_reason"] == {"source_changed": len(changed)}
    assert manifest["unique_images"] + manifest["errors"] == manifest["input"]["rows"] == len(rows)
    assert manifest["records_lost_to_errors"] == sum(r["copies"] for r in rows if r["id"] in changed)
    written = {f["id"][0].decode(): f["image/encoded"][0] for recs in read_shards(tmp_path / "out").values()
               for f in recs}
    assert written == {r["id"]: corpus["bytes"][r["id"]] for r in rows if r["id"] not in changed}


def test_a_selection_without_fingerprints_warns_once_and_is_sharded(corpus, sharded, tmp_path):
    notes = []
    manifest, _ = run_shard(ShardOptions(inputs=(corpus["selection"],), output=str(tmp_path / "out"), num_shards=7,
                                         num_classes=CLASSES), [], echo=notes.append)
    assert [n for n in notes if "fingerprint" in n] == [f"warning: {contract.NO_FINGERPRINT}"]
    assert manifest["errors"] == 0 and manifest["unique_images"] == corpus["table"].num_rows
    assert shard_bytes(tmp_path / "out") == shard_bytes(sharded[0])


def test_bad_rows_become_error_rows_and_the_rest_is_written(corpus, tmp_path):
    table = corpus["table"]
    rows = table.to_pylist()
    spoiled = {  # row -> (column, value, reason)
        0: ("copies", None, "invalid_copies"), 1: ("copies", 0, "invalid_copies"), 2: ("copies", -3, "invalid_copies"),
        45: ("label", None, "label_out_of_range"), 46: ("label", CLASSES, "label_out_of_range"),
        47: ("label", -1, "label_out_of_range"),
        90: ("topk_classes", [1, CLASSES + 5, 2], "topk_out_of_range"),
        91: ("topk_classes", [-2, 1, 2], "topk_out_of_range"),
        92: ("topk_probs", [0.5, 0.2], "invalid_topk"), 93: ("topk_classes", None, "invalid_topk"),
        94: ("topk_probs", [0.5, float("nan"), 0.1], "probs_not_finite"),
        95: ("topk_probs", [0.5, float("inf"), 0.1], "probs_not_finite"),
        96: ("topk_probs", [0.5, -10.0, 0.1], "probs_negative"),
        97: ("topk_probs", [0.9, 0.5, 0.1], "probs_sum_over_one"),
        130: ("id", None, "null_id"), 131: ("source", None, "null_source"),
    }
    for i, (column, value, _) in spoiled.items():
        rows[i][column] = value
    bad_table = pa.Table.from_pylist(rows, schema=table.schema)
    manifest, _ = run(write_selection(tmp_path / "sel", bad_table), tmp_path / "out", records_per_shard=40)
    errors = read_errors(tmp_path / "out")
    assert Counter((e["id"], e["reason"]) for e in errors) == Counter(
        (rows[i]["id"], reason) for i, (_, _, reason) in spoiled.items())
    assert all(e["detail"] for e in errors)
    assert manifest["errors_by_reason"] == dict(Counter(reason for _, _, reason in spoiled.values()))
    good = [r for i, r in enumerate(rows) if i not in spoiled]
    records = sum(r["copies"] for r in good)
    assert manifest["unique_images"] == len(good) and manifest["unique_images"] + manifest["errors"] == len(rows)
    assert manifest["records"] == manifest["input"]["records"] == records
    assert manifest["records_lost_to_errors"] == sum(max(r["copies"] or 0, 0) for i, r in enumerate(rows)
                                                     if i in spoiled)
    assert manifest["num_shards"] == -(-records // 40)  # from the records to write, bad rows left out
    shards = read_shards(tmp_path / "out")
    sizes = [len(recs) for recs in shards.values()]
    assert len(sizes) == manifest["num_shards"] and max(sizes) - min(sizes) <= 1
    written = Counter(f["id"][0].decode() for recs in shards.values() for f in recs)
    assert written == Counter({r["id"]: r["copies"] for r in good})


def test_images_are_read_back_as_label_read_them(corpus, tmp_path):
    """The container format and Parquet image column that `label` recorded in the selection are used: without
    them the Parquet images (two binary columns) cannot be read, nor TFRecords named *.bin."""
    table = corpus["table"]
    unrecorded = table.replace_schema_metadata(None)
    manifest, _ = run(write_selection(tmp_path / "sel", unrecorded), tmp_path / "out", num_shards=2)
    parquet_ids = {r["id"] for r in table.to_pylist() if r["source"].endswith(".parquet")}
    errors = read_errors(tmp_path / "out")
    assert {e["id"] for e in errors} == parquet_ids and {e["reason"] for e in errors} == {"unreadable_file"}
    tfr = table.filter(pc.match_substring(table.column("source"), ".tfrecord"))
    renamed = str(tmp_path / "images.bin")
    os.link(tfr.column("source")[0].as_py(), renamed)
    tfr = with_column(tfr, "source", [renamed] * tfr.num_rows).replace_schema_metadata(
        contract.encode_metadata({contract.INPUT: {"format": "tfrecord", "image_column": None}}))
    manifest, _ = run(write_selection(tmp_path / "sel-tfr", tfr), tmp_path / "out-tfr", num_shards=2)
    assert manifest["errors"] == 0 and manifest["unique_images"] == PER_KIND
    written = {f["id"][0].decode(): f["image/encoded"][0] for recs in read_shards(tmp_path / "out-tfr").values()
               for f in recs}
    assert written == {rid: corpus["bytes"][rid] for rid in tfr.column("id").to_pylist()}


def test_selection_is_read_through_the_contract(corpus, tmp_path):
    table = corpus["table"]
    unfinished = write_selection(tmp_path / "unfinished", table, complete=False)
    with pytest.raises(InputError, match="unfinished balance run"):
        run(unfinished, tmp_path / "o1", num_shards=2)
    with pytest.raises(InputError, match="missing required column 'copies'.*ns-data balance"):
        run(write_selection(tmp_path / "nocopies", table.drop_columns(["copies"])), tmp_path / "o2", num_shards=2)
    mistyped = with_column(table, "copies", [str(c) for c in table.column("copies").to_pylist()], pa.string())
    with pytest.raises(InputError, match="column 'copies' has type string"):
        run(write_selection(tmp_path / "mistyped", mistyped), tmp_path / "o3", num_shards=2)
    # Errors tables beside the data are never read as data.
    beside = write_selection(tmp_path / "beside", table)
    pq.write_table(pa.table({"id": ["x"], "reason": ["duplicate_id"]}), os.path.join(beside, "errors-00000.parquet"))
    manifest, _ = run(beside, tmp_path / "o4", num_shards=2)
    assert manifest["input"]["files"] == [os.path.join(beside, "selection-00000.parquet")]
    assert manifest["input"]["rows"] == table.num_rows and manifest["errors"] == 0
    assert not os.path.exists(tmp_path / "o1") and not os.path.exists(tmp_path / "o3")


def test_nothing_readable_and_bad_options_fail_before_the_run(corpus, tmp_path):
    table = corpus["table"]
    gone = with_column(table, "source", [str(tmp_path / "nowhere.jpg")] * table.num_rows)
    with pytest.raises(InputError, match="none of .* sampled"):
        run(write_selection(tmp_path / "sel", gone), tmp_path / "out", num_shards=2)
    with pytest.raises(OptionsError, match="only one of"):
        run(corpus["selection"], tmp_path / "o", num_shards=2, records_per_shard=10)
    with pytest.raises(OptionsError, match="more than the"):  # totals in the marker: said by the launcher
        run(with_totals(corpus, tmp_path / "totals"), tmp_path / "o", num_shards=10_000)
    with pytest.raises(OptionsError, match="--num-classes"):
        run(corpus["selection"], tmp_path / "o", num_classes=None)
    with pytest.raises(OptionsError, match="as a size"):
        parse_size("lots")
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "o")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "train-00000-of-00001.tfrecord").write_bytes(b"x")
    with pytest.raises(OutputExists):
        run(corpus["selection"], tmp_path / "taken", num_shards=2)
    assert (tmp_path / "taken" / "train-00000-of-00001.tfrecord").read_bytes() == b"x"


def test_number_of_classes_comes_from_the_teacher_recorded_by_label(corpus, tmp_path):
    table = corpus["table"]
    table = table.replace_schema_metadata(contract.encode_metadata(
        {contract.TEACHER: {"num_classes": 12}, contract.INPUT: {"format": "auto", "image_column": "pixels"}}))
    manifest, _ = run(write_selection(tmp_path / "sel", table), tmp_path / "out", num_shards=2, num_classes=None)
    assert manifest["num_classes"] == 12 and manifest["teacher"] == {"num_classes": 12}
    assert all(len(f["probabilities"]) == 12 for recs in read_shards(tmp_path / "out").values() for f in recs)


def test_the_teacher_comes_from_the_selection_stats_json_and_the_class_count_from_its_footer(corpus, tmp_path):
    """A balance output records the teacher (class names) in stats.json, once; its footers hold it in brief. The
    manifest takes the whole identity from the marker, the class count from a footer."""
    teacher = {"model": "m", "num_classes": 12, "class_names": [f"class {i}" for i in range(12)]}
    table = corpus["table"].replace_schema_metadata(contract.encode_metadata(
        {contract.TEACHER: contract.footer_teacher(teacher),
         contract.INPUT: {"format": "auto", "image_column": "pixels"}}))
    selection = write_selection(tmp_path / "sel", table)
    marker = json.loads((tmp_path / "sel" / "stats.json").read_text()) | {"teacher": teacher}
    (tmp_path / "sel" / "stats.json").write_text(json.dumps(marker))
    manifest, _ = run(selection, tmp_path / "out", num_shards=2, num_classes=None)
    assert manifest["num_classes"] == 12 and manifest["teacher"] == teacher


def test_the_job_holds_the_teacher_once(corpus, tmp_path):
    """The teacher's identity (1,000 class names here) is the last step's alone: the pipeline's steps carry
    the context without it, so the job grows by about one copy of the names, not one per step."""
    import apache_beam as beam

    from ns_data.shard.pipeline import Shard
    from ns_data.shard.plan import prepare

    sizes = {}
    for classes in (10, 1000):
        # names that do not compress (Beam compresses what it pickles)
        teacher = {"num_classes": 1000, "class_names": [hashlib.sha256(b"%d" % i).hexdigest()[:16]
                                                        for i in range(classes)]}
        table = corpus["table"].replace_schema_metadata(contract.encode_metadata(
            {contract.TEACHER: teacher, contract.INPUT: {"format": "auto", "image_column": "pixels"}}))
        selection = write_selection(tmp_path / f"sel-{classes}", table)
        ctx = prepare(ShardOptions(inputs=(selection,), output=str(tmp_path / f"out-{classes}"), num_shards=2),
                      echo=lambda m: None)
        assert ctx.teacher == teacher
        pipeline = beam.Pipeline()
        _ = pipeline | ctx.read_units() | Shard(ctx)
        sizes[classes] = len(pipeline.to_runner_api().SerializeToString())
    names = len(json.dumps(teacher["class_names"]))
    assert sizes[1000] - sizes[10] < 1.5 * names, (sizes, names)


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


def test_pytorch_reader_reads_every_record_once(corpus, sharded):
    out, _ = sharded
    seen = Counter((r["id"], r["copy"], r["label"]) for r in ShardDataset(str(out), seed=1))
    assert seen == Counter({(r["id"], c, r["label"]): 1 for r in corpus["table"].to_pylist()
                            for c in range(r["copies"])})


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
    """TensorFlow runs in a child process: it may not share one with torch (docs/design.md)."""
    import hashlib

    if importlib.util.find_spec("tensorflow") is None:  # never imported here
        pytest.skip("the `tf` extra is not installed")
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


def test_inspect_names_a_damaged_record_in_one_line(sharded, tmp_path):
    import shutil

    from click.testing import CliRunner

    from ns_data.cli import main

    out, manifest = sharded
    copy = tmp_path / "shards"
    shutil.copytree(out, copy)
    first = next(s["name"] for s in manifest["shards"] if s["records"])
    path = copy / first
    data = bytearray(path.read_bytes())
    (offset, record), = [(o, d) for n, (o, d) in enumerate(tfrecord.read_records(open(path, "rb"))) if n == 1]
    data[offset + 12 + len(record) - 1] ^= 0xFF  # the last byte of record 1's data: its data checksum fails
    path.write_bytes(bytes(data))
    result = CliRunner().invoke(main, ["inspect", str(copy), "--records", "3"])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.rstrip().splitlines()[-1] == (
        f"Error: {path}: record 1: corrupt_record (CorruptRecord: bad data checksum at byte {offset})"), result.output


def test_rows_of_loose_files_cross_the_shuffle_without_schema_metadata(tmp_path):
    """ReadSelectionFn's elements (what GroupBySource shuffles, with --shuffle beam) hold the rows only: the
    selection's metadata (the teacher with 1,000 class names) stays out of them."""
    import pickle

    from ns_data.reading import inspect_inputs
    from ns_data.shard.pipeline import ReadSelectionFn
    from ns_data.shard.plan import make_plan, prepare

    images = write_images(str(tmp_path / "images"), 6, width=32, height=24)
    n = len(images)
    teacher = {"num_classes": 1000, "class_names": [f"class number {i}" for i in range(1000)]}
    table = pa.table({
        "id": [os.path.basename(p) for p in images], "source": images, "offset": pa.array([None] * n, pa.int64()),
        "label": pa.array(np.arange(n), pa.int32()), "confidence": pa.array(np.full(n, 0.5), pa.float32()),
        "rank": pa.array(np.zeros(n), pa.int32()), "copies": pa.array(np.ones(n), pa.int32()),
    }).replace_schema_metadata(contract.encode_metadata({contract.TEACHER: teacher}))
    selection = write_selection(tmp_path / "sel", table)
    ctx = prepare(ShardOptions(inputs=(selection,), output=str(tmp_path / "out"), num_shards=2, shuffle="beam"),
                  local_runner=False)
    assert not ctx.spill and len(json.dumps(ctx.teacher)) > 15_000
    _, units = inspect_inputs(glob.glob(os.path.join(selection, "*.parquet")), contract.READ_BACK_COLUMNS)
    plan = ctx.plan() or make_plan((n, n, n), ctx.options, ctx.record_bytes)  # what the pipeline counts
    rows = [e for e in ReadSelectionFn(ctx).process(units[0], plan) if not isinstance(e, beam_tagged())]
    assert rows and all(batch.schema.metadata is None for _, batch in rows)
    assert all(len(pickle.dumps(e)) < 2_000 for e in rows)


def beam_tagged():
    from apache_beam.pvalue import TaggedOutput

    return TaggedOutput


def test_the_launcher_reads_a_bounded_sample_of_a_balance_output_with_totals(tmp_path, monkeypatch):
    """A balance output whose stats.json counts rows and copies: prepare takes the totals from it and reads at
    most SAMPLE_UNITS row groups (for the image sample), however many the selection has; without the totals it
    reads as much and leaves the counting to the pipeline."""
    from ns_data.shard import plan

    images = write_images(str(tmp_path / "images"), 4, width=32, height=24)
    n = 400
    table = pa.table({
        "id": [f"{i:04d}" for i in range(n)], "source": [images[i % 4] for i in range(n)],
        "offset": pa.array([None] * n, pa.int64()), "label": pa.array(np.arange(n) % 10, pa.int32()),
        "confidence": pa.array(np.full(n, 0.5), pa.float32()), "rank": pa.array(np.zeros(n), pa.int32()),
        "copies": pa.array(1 + np.arange(n) % 3, pa.int32())})
    selection = write_selection(tmp_path / "sel", table, row_group_size=5)  # 80 row groups
    copies = int(pc.sum(table.column("copies")).as_py())
    (tmp_path / "sel" / "stats.json").write_text(json.dumps(
        {"stage": "balance", "selected_rows": n, "total_copies": copies}))
    read = []
    real = plan.read_rows
    monkeypatch.setattr(plan, "read_rows", lambda unit, columns: read.append(unit) or real(unit, columns))
    ctx = plan.prepare(ShardOptions(inputs=(selection,), output=str(tmp_path / "out"), num_classes=10))
    assert len(read) == plan.SAMPLE_UNITS
    assert (ctx.total_rows, ctx.valid_rows, ctx.total_records) == (n, n, copies)
    read.clear()  # a marker without the copies: the same sample, and the pipeline counts the rows
    (tmp_path / "sel" / "stats.json").write_text(json.dumps({"stage": "balance", "selected_rows": n}))
    ctx = plan.prepare(ShardOptions(inputs=(selection,), output=str(tmp_path / "out2"), num_classes=10))
    assert len(read) == plan.SAMPLE_UNITS and ctx.total_records is None and ctx.plan() is None


def with_totals(corpus, directory) -> str:
    """The corpus's selection as a balance output whose stats.json counts its rows and copies, as balance writes
    it: the launcher takes the totals from the marker."""
    table = corpus["table"]
    selection = write_selection(directory, table)
    copies = int(pc.sum(table.column("copies")).as_py())
    with open(os.path.join(selection, contract.SELECTION.marker), "w") as f:
        json.dump({"stage": "balance", "selected_rows": table.num_rows, "total_copies": copies}, f)
    return selection


def plain_parts(table: pa.Table, directory, files: int = 3) -> str:
    """`table` as `files` plain Parquet files (no marker) in `directory`."""
    os.makedirs(directory, exist_ok=True)
    for i, part in enumerate(np.array_split(np.arange(table.num_rows), files)):
        pq.write_table(table.take(pa.array(part)), os.path.join(str(directory), f"part-{i}.parquet"),
                       row_group_size=20)
    return str(directory)


def test_plain_parquet_is_counted_in_the_pipeline_with_the_same_shards(corpus, sharded, tmp_path, monkeypatch):
    """Plain Parquet files: the launcher lists at most LAUNCH_CHECK_FILES of them and reads a sample of one; the
    pipeline counts the rows and records and decides the shards. The shards are byte for byte those of the
    selection whose marker gives the totals to the launcher; a bad --num-shards is found by the count."""
    from ns_data import reading
    from ns_data.shard import plan

    plain = plain_parts(corpus["table"], tmp_path / "plain")
    monkeypatch.setattr(reading, "LAUNCH_CHECK_FILES", 2)  # fewer than the files: the launcher's listing stops
    ctx = plan.prepare(ShardOptions(inputs=(plain,), output=str(tmp_path / "ctx"), num_shards=7,
                                    num_classes=CLASSES), echo=lambda m: None)
    assert ctx.plan() is None and ctx.num_shards is None and ctx.total_records is None
    manifest, _ = run(plain, tmp_path / "out", num_shards=7)
    launched, _ = run(with_totals(corpus, tmp_path / "totals"), tmp_path / "launched", num_shards=7)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "launched") == shard_bytes(sharded[0])
    assert (manifest["input"]["rows"], manifest["input"]["records"], manifest["num_shards"]) == (
        launched["input"]["rows"], launched["input"]["records"], 7)
    with pytest.raises(Exception, match="more than the"):
        run(plain, tmp_path / "toomany", num_shards=10_000)
    assert not glob.glob(str(tmp_path / "toomany" / "train-*"))


def test_a_resumed_plain_parquet_run_whose_files_changed_stops(corpus, tmp_path, monkeypatch):
    """The fingerprint holds the input pattern; the first run records its listing (files, bytes) in the temp
    dir, and a resumed run whose listing differs stops before any shard is written."""
    from ns_data.shard import pipeline

    plain = plain_parts(corpus["table"], tmp_path / "plain")
    finalize = pipeline.finalize
    monkeypatch.setattr(pipeline, "finalize", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("killed")))
    with pytest.raises(Exception, match="killed"):
        run(plain, tmp_path / "out", num_shards=3)
    monkeypatch.setattr(pipeline, "finalize", finalize)
    listing = json.loads((tmp_path / "out" / ".tmp-shard" / "listing.json").read_text())
    assert listing["files"] == 3
    written = shard_bytes(tmp_path / "out")
    pq.write_table(corpus["table"].slice(0, 5), tmp_path / "plain" / "part-9.parquet")
    with pytest.raises(Exception, match="the inputs changed since the interrupted run"):
        run(plain, tmp_path / "out", num_shards=3)
    assert shard_bytes(tmp_path / "out") == written
    os.remove(tmp_path / "plain" / "part-9.parquet")  # the same files again: the run is finished
    manifest, wrote = run(plain, tmp_path / "out", num_shards=3)
    assert wrote and manifest["resumed_shards"] == 3 and manifest["input"]["rows"] == corpus["table"].num_rows
