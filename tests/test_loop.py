"""`ns-train loop`: a whole Noisy Student run from one YAML file, resumed after a kill, and its config errors."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import yaml
from click.testing import CliRunner

from ns_train.cli import main as ns_train
from ns_train.digits import write_split
from ns_train.loop import plan, read_config
from ns_train.results import format_table
from tests.test_train_resume import kill_tree

ENV = os.environ | {"OMP_NUM_THREADS": "1"}
TRAIN = {"image_size": 16, "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.5, 0.5, 0.5],
         "std": [0.5, 0.5, 0.5], "hflip": 0, "workers": 0, "batch_size": 8, "optimizer": "adamw", "lr": 0.003,
         "progress": False, "checkpoint_every": 1, "model": "resnet10t", "shuffle_buffer": 64}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    directory = tmp_path_factory.mktemp("digits")
    for seed in (0, 1):
        write_split(str(directory / f"seed-{seed}"), seed, labeled_per_class=2, test_size=60, size=16)
    return directory


def config(digits, **changes) -> dict:
    """A small loop: a teacher trained first, two iterations, an ablation in the first."""
    return {"output": "out", "seeds": [0], "num_classes": 10,
            "data": {"labeled": f"{digits}/seed-{{seed}}/labeled", "unlabeled": [f"{digits}/seed-{{seed}}/unlabeled"],
                     "val": f"{digits}/seed-{{seed}}/test",
                     "ground_truth": f"{digits}/seed-{{seed}}/unlabeled-labels.parquet"},
            "teacher": {"train": {"steps": 4}}, "train": TRAIN,
            "label": {"batch_size": 128, "progress": False}, "balance": {"per_class": 40, "min_confidence": 0.0,
                                                                        "progress": False},
            "shard": {"num_shards": 2, "progress": False},
            "iterations": [{"train": {"steps": 6, "unlabeled_ratio": 1}, "ablations": {"no-noise": {"noise": False}}},
                           {"train": {"steps": 3, "unlabeled_ratio": 1}}]} | changes


def write_config(path, values) -> str:
    path.write_text(yaml.safe_dump(values))
    return str(path)


def loop_command(config_path: str, output) -> list[str]:
    return [sys.executable, "-m", "ns_train.cli", "loop", config_path, "--output", str(output)]


def test_a_loop_killed_in_a_training_step_continues_to_the_same_results(digits, tmp_path):
    """SIGKILL the loop (and its children) while the first student trains, run the same command again: the
    teacher and the data stages are not redone, the student resumes, and every number, label file and exported
    teacher equals that of a loop that was never killed."""
    cfg = write_config(tmp_path / "loop.yaml", config(digits))
    whole = subprocess.run(loop_command(cfg, tmp_path / "whole"), capture_output=True, text=True, timeout=900,
                           env=ENV)
    assert whole.returncode == 0, whole.stderr[-3000:]

    out = tmp_path / "killed"
    student = out / "seed-0" / "iter-1" / "student"
    proc = subprocess.Popen(loop_command(cfg, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 600
    while not (student / "checkpoint.pt").exists():
        assert proc.poll() is None, f"the loop ended before it could be killed: {proc.stderr.read()[-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    kill_tree(proc)
    assert not (student / "results.json").exists()
    labels = sorted((out / "seed-0" / "iter-1" / "labels").glob("labels-*.parquet"))
    mtimes = [p.stat().st_mtime_ns for p in labels]

    again = subprocess.run(loop_command(cfg, out), capture_output=True, text=True, timeout=900, env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    for done in ("teacher", "iter-1/labels", "iter-1/selection", "iter-1/shards"):
        assert f"{out / 'seed-0' / done} is already complete" in again.stderr
    assert f"resuming {student} at step" in again.stderr
    assert [p.stat().st_mtime_ns for p in labels] == mtimes

    got, want = (json.loads((d / "results.json").read_text())["runs"] for d in (out, tmp_path / "whole"))
    assert got == want
    assert set(got["0"]["top1"]) == {"teacher", "iter-1/student", "iter-1/no-noise", "iter-2/student"}
    assert all(0 <= v <= 1 for v in got["0"]["top1"].values())
    for name in ("teacher", "iter-1/student", "iter-2/student"):
        a, b = (d / "seed-0" / f"{name}.safetensors" for d in (out, tmp_path / "whole"))
        assert a.read_bytes() == b.read_bytes(), name
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "results.txt").read_text() == (tmp_path / "whole" / "results.txt").read_text()
    assert "iter-1/student vs teacher" in again.stdout


def test_pseudo_label_accuracy_is_the_labels_against_the_ground_truth(digits, tmp_path):
    """The table's pseudo-label accuracy equals a direct join of the label files with the answer key."""
    import pyarrow.parquet as pq

    from ns_train.results import pseudo_label_accuracy

    cfg = write_config(tmp_path / "loop.yaml", config(digits, iterations=[{"train": {"steps": 1}}],
                                                      teacher={"train": {"steps": 2}}))
    result = CliRunner().invoke(ns_train, ["loop", cfg])
    assert result.exit_code == 0, result.output
    labels = tmp_path / "out" / "seed-0" / "iter-1" / "labels"
    predicted = pq.read_table(sorted(labels.glob("labels-*.parquet"))).to_pandas()
    truth = pq.read_table(digits / "seed-0" / "unlabeled-labels.parquet").to_pandas()
    joined = predicted.merge(truth, on="id", suffixes=("", "_true"))
    assert len(joined) == len(truth)
    accuracy = pseudo_label_accuracy(str(labels), str(digits / "seed-0" / "unlabeled-labels.parquet"))
    assert accuracy["accuracy"] == pytest.approx((joined.label == joined.label_true).mean())
    assert sum(accuracy["rows"]) == len(truth)
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert runs["0"]["pseudo_labels"]["iter-1"]["accuracy"] == accuracy["accuracy"]


def test_the_table_means_and_comparisons():
    done = {0: {"top1": {"teacher": 0.80, "iter-1/student": 0.86, "iter-1/no-noise": 0.84}, "pseudo_labels": {}},
            1: {"top1": {"teacher": 0.90, "iter-1/student": 0.89, "iter-1/no-noise": 0.85}, "pseudo_labels": {}}}
    table = format_table(done, [("iter-1/student", "teacher"), ("iter-1/student", "iter-1/no-noise")])
    assert "  teacher" in table and "0.8500" in table and "0.8750" in table
    assert "iter-1/student vs teacher: +2.50 points on average, better in 1 of 2" in table
    assert "iter-1/student vs iter-1/no-noise: +3.00 points on average, better in 2 of 2" in table


def test_the_steps_are_the_commands_a_user_would_type(digits, tmp_path):
    """Beam options reach the data stages after their inputs; several training processes run under torchrun;
    each run's training seed is its seed; relative paths are the config file's."""
    values = config(digits, seeds=[0, 1], launcher={"processes": 2},
                    label={"batch_size": 16, "beam_args": ["--direct_num_workers=1"]})
    values["data"]["labeled"] = os.path.relpath(f"{digits}/seed-{{seed}}/labeled", tmp_path / "configs")
    values["data"]["ground_truth"] = None  # as absent
    (tmp_path / "configs").mkdir()
    cfg = read_config(write_config(tmp_path / "configs" / "loop.yaml", values))
    the_plan = plan(cfg)
    steps = the_plan.steps
    assert the_plan.ground_truth == {0: None, 1: None}
    assert cfg.output == str(tmp_path / "configs" / "out")
    label = next(s for s in steps[1] if s.program == "ns-data label")
    assert label.argv[0] == f"{digits}/seed-1/unlabeled" and label.argv[-1] == "--direct_num_workers=1"
    assert f"--teacher {cfg.output}/seed-1/teacher.safetensors" in label.display()
    train = next(s for s in steps[1] if s.program == "ns-train train")
    assert train.display().startswith("torchrun --standalone --nproc_per_node 2 -m ns_train.cli train")
    assert "--seed 1" in train.display() and f"--labeled {digits}/seed-1/labeled " in train.display()
    assert [s.title for s in steps[0]][:4] == ["seed 0 teacher: train", "seed 0 teacher: export",
                                               "seed 0 iteration 1: label", "seed 0 iteration 1: balance"]


@pytest.mark.parametrize("change,message", [
    ({"epochs": 3}, "unknown keys ['epochs']"),
    ({"balance": {"per_clas": 10}}, "balance: unknown option 'per_clas'; known:"),
    ({"balance": {"per_class": "many"}}, "iteration 1: balance: Invalid value for '--per-class'"),
    ({"label": {"output": "x"}}, "iteration 1: label: 'output' is set by the loop"),
    ({"train": {"lr": -1}}, "teacher: train: out of range: lr=-1.0"),
    ({"teacher": {"model": "x.safetensors", "train": {}}}, "teacher needs either 'train'"),
    ({"seeds": None}, "cannot expand"),
    ({"seeds": [0, 0]}, "seeds must be a list of distinct"),
    ({"iterations": []}, "iterations must be a list of at least one"),
    ({"shard": {"beam_args": "--runner=DirectRunner"}}, "beam_args must be a list"),
    ({"balance": {"beam_args": ["--per_class=5"]}}, "no such option --per_class (neither its own nor Beam's): "
                                                    "did you mean --per-class?"),
    ({"data": {"labeled": "nowhere", "unlabeled": "nowhere"}}, "data.labeled: not found"),
])
def test_a_config_error_is_one_line_before_any_work(digits, tmp_path, change, message):
    cfg = write_config(tmp_path / "loop.yaml", config(digits, **change))
    result = CliRunner().invoke(ns_train, ["loop", cfg])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"Error: {cfg}: ") and message in lines[0], result.output
    assert not (tmp_path / "out").exists()


def test_not_yaml_and_missing_config_are_one_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("output: [unclosed\n")
    for path, message in ((tmp_path / "bad.yaml", "not valid YAML"), (tmp_path / "none.yaml", "not found")):
        result = CliRunner().invoke(ns_train, ["loop", str(path)])
        assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1 and message in result.output


def test_training_under_torchrun(digits, tmp_path):
    """`launcher.processes: 2`: every training runs as two DDP processes under torchrun, and the loop goes on."""
    cfg = write_config(tmp_path / "loop.yaml", config(digits, launcher={"processes": 2},
                                                      teacher={"train": {"steps": 2}},
                                                      iterations=[{"train": {"steps": 2, "unlabeled_ratio": 1}}]))
    done = subprocess.run(loop_command(cfg, tmp_path / "out"), capture_output=True, text=True, timeout=900, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("$ torchrun --standalone --nproc_per_node 2 -m ns_train.cli train") == 2
    teacher = json.loads((tmp_path / "out" / "seed-0" / "teacher" / "results.json").read_text())
    assert teacher["finished"] and teacher["steps_per_epoch"] == 20 / (8 * 2)  # 20 labeled, batch 8, 2 processes
    assert (tmp_path / "out" / "seed-0" / "iter-1" / "student.safetensors").exists()


def test_a_teacher_given_as_an_exported_file(digits, tmp_path):
    """`teacher: {model: FILE}` labels with that file: a loop started from the first loop's iteration-1 student
    writes the same pseudo labels as that loop's iteration 2, and its table has no teacher row to compare."""
    import pyarrow.parquet as pq

    first = write_config(tmp_path / "first.yaml", config(digits, teacher={"train": {"steps": 2}}, iterations=[
        {"train": {"steps": 1}}, {"train": {"steps": 1}}]))
    assert CliRunner().invoke(ns_train, ["loop", first, "--output", str(tmp_path / "first")]).exit_code == 0
    student = tmp_path / "first" / "seed-0" / "iter-1" / "student.safetensors"
    second = write_config(tmp_path / "second.yaml", config(digits, teacher={"model": str(student)},
                                                           iterations=[{"train": {"steps": 1}}]))
    result = CliRunner().invoke(ns_train, ["loop", second, "--output", str(tmp_path / "second")])
    assert result.exit_code == 0, result.output

    want = pq.read_table(sorted((tmp_path / "first/seed-0/iter-2/labels").glob("labels-*.parquet"))).to_pandas()
    got = pq.read_table(sorted((tmp_path / "second/seed-0/iter-1/labels").glob("labels-*.parquet"))).to_pandas()
    columns = ["id", "label", "confidence"]
    assert got[columns].sort_values("id").reset_index(drop=True).equals(
        want[columns].sort_values("id").reset_index(drop=True))
    assert not (tmp_path / "second" / "seed-0" / "teacher").exists()
    runs = json.loads((tmp_path / "second" / "results.json").read_text())
    assert list(runs["runs"]["0"]["top1"]) == ["iter-1/student"] and runs["comparisons"] == []


def test_a_corpus_with_broken_files_from_another_directory(digits, tmp_path):
    """Run from another working directory with a relative config path, over unlabeled images two of which are
    broken: label records them as errors, the loop goes on, and the pseudo labels of the rest are scored."""
    import shutil

    corpus = tmp_path / "corpus"
    shutil.copytree(digits / "seed-0" / "unlabeled", corpus)
    good = sorted(corpus.iterdir())
    (corpus / "truncated.png").write_bytes(good[0].read_bytes()[:40])
    (corpus / "empty.png").write_bytes(b"")
    values = config(digits, teacher={"train": {"steps": 2}}, iterations=[{"train": {"steps": 1}}])
    values["data"]["unlabeled"] = ["corpus"]  # relative to the config file
    write_config(tmp_path / "loop.yaml", values)
    (tmp_path / "elsewhere").mkdir()
    done = subprocess.run([sys.executable, "-m", "ns_train.cli", "loop", "../loop.yaml"], cwd=tmp_path / "elsewhere",
                          capture_output=True, text=True, timeout=900, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads((tmp_path / "out" / "seed-0" / "iter-1" / "labels" / "stats.json").read_text())
    assert stats["errors"] == 2 and stats["labeled"] == len(good)
    runs = json.loads((tmp_path / "out" / "results.json").read_text())["runs"]
    assert sum(runs["0"]["pseudo_labels"]["iter-1"]["rows"]) == len(good)
    assert (tmp_path / "out" / "seed-0" / "iter-1" / "student.safetensors").exists()


def test_pseudo_label_accuracy_reads_a_bounded_sample_and_lists_once(tmp_path, monkeypatch):
    """The same labels in 20 and in 200 files: scoring them opens at most max_files labels files and lists the
    directory once; beyond the budget the result and the table say it is a sample; within it, it is exact."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ns_data import fs
    from ns_train.results import pseudo_label_accuracy
    from tests.test_seams import invoke, read_table

    for files in (20, 200):
        invoke("synth", "pseudo-labels", "--output", tmp_path / f"pl-{files}", "--rows", 4000, "--classes", 10,
               "--files", files)
    labels = read_table(tmp_path / "pl-20", "labels-*.parquet")
    truth = labels[["id", "label"]].copy()
    flip = np.random.default_rng(0).random(len(truth)) < 0.3
    truth.loc[flip, "label"] = (truth.loc[flip, "label"] + 1) % 10
    truth_path = str(tmp_path / "truth.parquet")
    pq.write_table(pa.Table.from_pandas(truth, preserve_index=False), truth_path)
    whole = pseudo_label_accuracy(str(tmp_path / "pl-20"), truth_path)
    joined = labels.merge(truth, on="id", suffixes=("", "_true"))
    assert not whole["sampled"] and whole["accuracy"] == pytest.approx((joined.label == joined.label_true).mean())
    assert whole["rows_read"] == whole["labels_rows"] == sum(whole["rows"]) == 4000

    opened, listed = [], []
    parquet_file, match = pq.ParquetFile, fs.match
    monkeypatch.setattr(pq, "ParquetFile", lambda source, *a, **k: opened.append(str(source)) or parquet_file(
        source, *a, **k))
    monkeypatch.setattr(fs, "match", lambda pattern: listed.append(pattern) or match(pattern))
    for files in (20, 200):
        opened.clear()
        listed.clear()
        scored = pseudo_label_accuracy(str(tmp_path / f"pl-{files}"), truth_path, max_rows=1000, max_files=8)
        assert len({p for p in opened if p != truth_path}) <= 8 and len(listed) == 1, (opened, listed)
        assert scored["sampled"] and scored["labels_rows"] == 4000 and 0 < sum(scored["rows"]) == scored[
            "rows_read"] <= 1000
    table = format_table({0: {"top1": {"student": 0.5}, "pseudo_labels": {"iter-1": scored}}}, [])
    assert f"(iter-1/labels of seed 0: scored on a sample of {scored['rows_read']:,} of 4,000 rows)" in table
