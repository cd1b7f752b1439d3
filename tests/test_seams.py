"""The stages chained as a user chains them: a small web corpus with broken images, label -> balance -> shard
-> the PyTorch reader -> ns-train, each from another working directory; a label run killed and started again;
and every stage on an object store that is not the local filesystem."""
from __future__ import annotations

import glob
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pyarrow.parquet as pq
from click.testing import CliRunner
from PIL import Image

from ns_data.cli import main
from ns_data.label import parse_marker
from ns_data.readers import ShardDataset
from ns_data.synth import write_images

TEACHER = ["--teacher", "test_efficientnet", "--random-weights", "--num-classes", "4"]
CLASSES = 4


def picture(rng: np.random.Generator, size=(64, 48)) -> bytes:
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(base).resize(size, Image.BILINEAR).save(buf, "JPEG")
    return buf.getvalue()


def web_corpus(root) -> dict:
    """Two tars in img2dataset's layout (KEY.jpg, KEY.json, KEY.txt; two broken images in each) and two camera
    folders that use the same file names (one broken image). Returns what each image id must hold."""
    rng = np.random.default_rng(3)
    expected, broken = {}, set()
    os.makedirs(root / "tars")
    for shard in range(2):
        with tarfile.open(root / "tars" / f"{shard:05d}.tar", "w") as tar:
            for i in range(12):
                key = f"{shard:05d}{i:04d}"
                data = picture(rng)
                if i in (3, 7):
                    data = data[:100] if i == 3 else b"<html>404 Not Found</html>"
                    broken.add(f"tars/{shard:05d}.tar/{key}.jpg")
                for name, payload in ((f"{key}.jpg", data), (f"{key}.json", b'{"url": "http://x"}'),
                                      (f"{key}.txt", b"a caption")):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
                expected[f"tars/{shard:05d}.tar/{key}.jpg"] = data
    for cam, count in (("cam1", 8), ("cam2", 6)):
        os.makedirs(root / cam)
        for i in range(1, count + 1):
            data = picture(rng, (80, 60)) if (cam, i) != ("cam2", 6) else b""
            (root / cam / f"IMG_{i:04d}.jpg").write_bytes(data)
            expected[f"{cam}/IMG_{i:04d}.jpg"] = data
            if not data:
                broken.add(f"{cam}/IMG_{i:04d}.jpg")
    return {"bytes": expected, "broken": broken}


def invoke(*args):
    result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result


def read_table(directory, pattern):
    files = sorted(glob.glob(os.path.join(str(directory), pattern)))
    return pq.read_table(files).to_pandas() if files else None


def test_web_corpus_from_label_to_student_run_from_other_directories(tmp_path, monkeypatch):
    corpus = web_corpus(tmp_path)
    images, broken = corpus["bytes"], corpus["broken"]
    for step in ("a", "b", "c", "d"):
        (tmp_path / "work" / step).mkdir(parents=True)

    monkeypatch.chdir(tmp_path / "work" / "a")
    invoke("label", "../../tars", "../../cam1", "../../cam2", *TEACHER, "--output", "../../labels", "--batch-size", 4)
    stats = json.loads((tmp_path / "labels" / "stats.json").read_text())
    labels, errors = read_table(tmp_path / "labels", "labels-*.parquet"), read_table(tmp_path / "labels", "errors-*")
    assert stats["images_read"] == len(images) == len(labels) + len(errors)  # inputs = outputs + errors
    assert labels["id"].is_unique and set(labels["id"]) | set(errors["id"]) == set(images)
    assert set(errors["id"]) == broken and "cam1/IMG_0001.jpg" in set(labels["id"])  # same names, two ids
    assert all(os.path.isabs(s) for s in labels["source"])

    monkeypatch.chdir(tmp_path / "work" / "b")
    invoke("balance", "../../labels", "--output", "../../selection", "--per-class", 6, "--min-confidence", 0,
           "--num-classes", CLASSES, "--no-progress")
    stats = json.loads((tmp_path / "selection" / "stats.json").read_text())
    selection = read_table(tmp_path / "selection", "selection-*.parquet")
    assert stats["input_rows"] == len(labels) and stats["rejected_rows"] == 0  # errors were not read as data
    assert stats["input_rows"] == stats["candidates"] + stats["below_min_confidence"] + stats["rejected_rows"]
    assert selection["id"].is_unique and set(selection["id"]) <= set(labels["id"])
    assert selection["copies"].sum() == stats["total_copies"] == 6 * selection["label"].nunique()

    monkeypatch.chdir(tmp_path / "work" / "c")
    invoke("shard", "../../selection", "--output", "../../shards", "--num-shards", 3, "--no-progress")
    manifest = json.loads((tmp_path / "shards" / "manifest.json").read_text())
    assert manifest["unique_images"] == len(selection) and manifest["errors"] == 0
    assert manifest["records"] == stats["total_copies"]

    monkeypatch.chdir(tmp_path / "work" / "d")
    records = list(ShardDataset(str(tmp_path / "shards"), shuffle_shards=False))
    keys = [f"{r['id']}#{r['copy']}" for r in records]
    assert len(keys) == len(set(keys)) == manifest["records"]
    for record in records:
        assert record["image"] == images[record["id"]]  # the source's bytes, unchanged
    copies = dict(zip(selection["id"], selection["copies"]))
    assert {i: sum(1 for r in records if r["id"] == i) for i in copies} == copies

    from ns_train.cli import main as train_main

    result = CliRunner().invoke(train_main, [
        "train", "--labeled", "../../shards", "--unlabeled", "../../shards", "--model", "test_resnet",
        "--num-classes", str(CLASSES), "--image-size", "32", "--batch-size", "4", "--unlabeled-ratio", "1",
        "--steps", "2", "--workers", "0", "--no-progress", "--output", "../../run"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "run" / "results.json").read_text())["step"] == 2


def label_command(images, output) -> list[str]:
    return [sys.executable, "-m", "pipelines.label", str(images), *TEACHER[:-1], "10", "--output", str(output),
            "--batch-size", "4", "--topk", "3", "--no-progress"]


def labels_by_id(directory):
    return read_table(directory, "labels-*.parquet").sort_values("id").reset_index(drop=True)


def test_label_killed_half_way_relabels_only_what_was_not_finished(tmp_path):
    write_images(str(tmp_path / "images"), 400, width=160, height=120)
    out = tmp_path / "labels"
    proc = subprocess.Popen(label_command(tmp_path / "images", out), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(glob.glob(str(out / ".tmp-label" / "unit-*.json"))) < 1 and time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()}"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "stats.json").exists()
    done = [parse_marker(os.path.basename(p))[1] for p in glob.glob(str(out / ".tmp-label" / "unit-*.json"))]

    again = subprocess.run(label_command(tmp_path / "images", out), cwd=tmp_path, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert "finishing an interrupted run" in again.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["resumed_units"] == len(done) >= 1 and stats["units"] == 4  # 400 files, 128 or more a unit
    assert stats["images_read_this_run"] == 400 - sum(c["labeled"] for c in done)  # the kept units are not redone
    assert stats["images_read"] == stats["labeled"] == 400

    whole = subprocess.run(label_command(tmp_path / "images", tmp_path / "whole"), cwd=tmp_path,
                           capture_output=True, text=True)
    assert whole.returncode == 0, whole.stderr
    got, want = labels_by_id(out), labels_by_id(tmp_path / "whole")
    assert got["id"].tolist() == want["id"].tolist() and got["label"].tolist() == want["label"].tolist()
    np.testing.assert_array_equal(np.stack(got["topk_probs"]), np.stack(want["topk_probs"]))
    np.testing.assert_array_equal(np.stack(got["topk_classes"]), np.stack(want["topk_classes"]))


def test_every_stage_and_reader_on_an_object_store(object_store, tmp_path):
    corpus = web_corpus(tmp_path / "local")
    store = tmp_path / "store" / "bucket"
    for path in glob.glob(str(tmp_path / "local" / "**" / "*.*"), recursive=True):  # "upload" the corpus
        dest = store / os.path.relpath(path, tmp_path / "local")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_bytes(open(path, "rb").read())
    bucket = object_store
    invoke("label", f"{bucket}/tars", f"{bucket}/cam1", f"{bucket}/cam2", *TEACHER, "--output", f"{bucket}/labels",
           "--no-progress")
    invoke("balance", f"{bucket}/labels", "--output", f"{bucket}/selection", "--per-class", 5, "--min-confidence", 0,
           "--no-progress")
    invoke("shard", f"{bucket}/selection", "--output", f"{bucket}/shards", "--num-shards", 2, "--no-progress")
    assert not glob.glob(str(tmp_path / "local" / "labels*"))  # nothing went to a local path
    labels = read_table(store / "labels", "labels-*.parquet")
    assert set(labels["source"].str.slice(0, len(bucket))) == {bucket}
    manifest = json.loads((store / "shards" / "manifest.json").read_text())
    records = list(ShardDataset(f"{bucket}/shards"))
    assert len(records) == manifest["records"] > 0
    assert all(r["image"] == corpus["bytes"][r["id"]] for r in records)
