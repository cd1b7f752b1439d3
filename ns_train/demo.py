"""Noisy Student end to end on real images: scikit-learn's handwritten digits (1,797 8x8 scans, shipped inside
the package), on CPU, through the same commands a user runs.

    python -m ns_train.demo --output demo-output [--seeds 0 1 2]

Per seed, the digits are split into a labeled set, an unlabeled set (its labels are set aside, used only to
report pseudo-label accuracy, and written to `data/unlabeled-labels.parquet` for `ns-data report
--ground-truth`) and a held-out test set, written as a user's corpus would be: labeled and test images as
TFRecord shards (image/encoded + label), unlabeled images as PNG files. Then:

    ns-train train (teacher, labeled only) -> ns-train export -> ns-data label -> balance -> shard
    -> ns-train train (noised student, labeled + pseudo labels) -> export -> label -> balance -> shard
    -> ns-train train (student 2, the student as teacher)
    and, for the ablation, student 1 again with --no-noise

and prints the test accuracy of each model.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

BIN = os.path.dirname(sys.executable)
SIZE = 32  # the 8x8 scans, upscaled


def write_split(output: str, seed: int, labeled_per_class: int, test_size: int) -> dict:
    """The seed's split, written as files; returns the paths and the unlabeled answer key."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from sklearn.datasets import load_digits

    from ns_data import tfrecord

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).astype(np.uint8)
    labels = digits.target.astype(int)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    test, rest = order[:test_size], order[test_size:]
    labeled = np.concatenate([rest[labels[rest] == c][:labeled_per_class] for c in range(10)])
    unlabeled = np.setdiff1d(rest, labeled)

    def png(i: int) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(images[i]).resize((SIZE, SIZE), Image.BICUBIC).save(buf, "PNG")
        return buf.getvalue()

    def shards(name: str, idx: np.ndarray, count: int) -> str:
        directory = os.path.join(output, name)
        os.makedirs(directory, exist_ok=True)
        for s, part in enumerate(np.array_split(rng.permutation(idx), count)):
            with open(os.path.join(directory, f"train-{s:05d}-of-{count:05d}.tfrecord"), "wb") as f:
                for i in part:
                    f.write(tfrecord.frame_record(tfrecord.make_example({"image/encoded": png(i),
                                                                         "label": int(labels[i])})))
        return directory

    files = os.path.join(output, "unlabeled")
    os.makedirs(files, exist_ok=True)
    answers = {}
    for i in unlabeled:
        name = f"digit-{i:04d}.png"
        with open(os.path.join(files, name), "wb") as f:
            f.write(png(i))
        answers[name] = int(labels[i])
    answer_key = os.path.join(output, "unlabeled-labels.parquet")  # for `ns-data report --ground-truth`
    pq.write_table(pa.table({"id": list(answers), "label": pa.array(list(answers.values()), pa.int32())}), answer_key)
    return {"labeled": shards("labeled", labeled, 2), "test": shards("test", test, 2), "unlabeled": files,
            "answers": answers, "sizes": {"labeled": len(labeled), "unlabeled": len(unlabeled), "test": len(test)}}


def run(*args: str) -> None:
    """Runs one command as a user would, echoing it; stops the demo if it fails."""
    print("$ " + " ".join(args[:1] + tuple(a if " " not in a else repr(a) for a in args[1:])), flush=True)
    done = subprocess.run([os.path.join(BIN, args[0]), *args[1:]], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
    lines = done.stdout.strip().splitlines()
    print("\n".join("    " + line for line in lines[-4:]), flush=True)
    if done.returncode:
        print(done.stdout)
        raise SystemExit(f"demo: `{args[0]} {args[1]}` failed (exit {done.returncode})")


def test_top1(run_dir: str) -> float:
    with open(os.path.join(run_dir, "results.json")) as f:
        results = json.load(f)
    return results.get("eval_ema", results["eval"])["top1"]


def pseudo_label_accuracy(labels_dir: str, answers: dict) -> float:
    import pyarrow.parquet as pq

    from ns_data import contract

    table = pq.read_table(contract.LABELS.data_files(labels_dir), columns=["id", "label"])
    ids, predicted = table.column("id").to_pylist(), table.column("label").to_pylist()
    return float(np.mean([answers[i] == p for i, p in zip(ids, predicted)]))


def loop(output: str, seed: int, args) -> dict:
    data = write_split(os.path.join(output, "data"), seed, args.labeled_per_class, args.test_size)
    common = ["--labeled", data["labeled"], "--val", data["test"], "--num-classes", "10", "--image-size", str(SIZE),
              "--crop-pct", "1.0", "--interpolation", "bilinear", "--mean", "0.5", "0.5", "0.5", "--std", "0.5", "0.5",
              "0.5", "--hflip", "0", "--crop-scale", "0.6", "1.0", "--seed", str(seed), "--workers", "0",
              "--batch-size", "32", "--optimizer", "adamw", "--lr", "0.003", "--weight-decay", "0.05",
              "--schedule", "cosine", "--warmup-epochs", "1", "--ema-decay", "0.99", "--no-progress",
              "--randaugment-magnitude", str(args.magnitude), "--dropout", "0.3", "--drop-path", "0.1"]
    runs = os.path.join(output, "runs")
    result = {"seed": seed, "sizes": data["sizes"]}

    def train(name: str, model: str, steps: int, *extra: str) -> float:
        out = os.path.join(runs, name)
        run("ns-train", "train", "--output", out, "--model", model, "--steps", str(steps), *common, *extra)
        result[name] = test_top1(out)
        return result[name]

    def pseudo_label(teacher_run: str, name: str) -> str:
        teacher = os.path.join(runs, f"{teacher_run}.safetensors")
        run("ns-train", "export", os.path.join(runs, teacher_run), "--output", teacher)
        labels, selection, shards = (os.path.join(output, f"{kind}-{name}") for kind in ("labels", "selection", "shards"))
        run("ns-data", "label", data["unlabeled"], "--teacher", teacher, "--output", labels, "--batch-size", "64",
            "--no-progress")
        result[f"pseudo_label_accuracy_{name}"] = pseudo_label_accuracy(labels, data["answers"])
        run("ns-data", "balance", labels, "--output", selection, "--per-class", str(args.per_class),
            "--min-confidence", "0.3", "--num-classes", "10", "--no-progress")
        run("ns-data", "shard", selection, "--output", shards, "--num-shards", "4", "--no-progress")
        return shards

    train("teacher", args.teacher_model, args.teacher_steps)
    shards1 = pseudo_label("teacher", "1")
    student = ["--unlabeled", shards1, "--unlabeled-ratio", "2"]
    train("student_1", args.student_model, args.student_steps, *student)
    train("student_1_no_noise", args.student_model, args.student_steps, *student, "--no-noise")
    shards2 = pseudo_label("student_1", "2")
    train("student_2", args.student_model, args.student_steps, "--unlabeled", shards2, "--unlabeled-ratio", "2")
    return result


MODELS = ("teacher", "student_1", "student_2", "student_1_no_noise")


def table(results: list[dict]) -> str:
    lines = ["", "test top-1 (EMA weights) on held-out digits" + f" ({results[0]['sizes']['test']} images; "
             f"{results[0]['sizes']['labeled']} labeled, {results[0]['sizes']['unlabeled']} unlabeled):",
             f"  {'model':<22}" + "".join(f"  seed {r['seed']:<3}" for r in results) + "     mean"]
    for name in MODELS:
        values = [r[name] for r in results]
        lines.append(f"  {name:<22}" + "".join(f"  {v:8.4f}" for v in values) + f"  {statistics.mean(values):7.4f}")
    for name in ("1", "2"):
        values = [r[f"pseudo_label_accuracy_{name}"] for r in results]
        lines.append(f"  {'pseudo labels, iter ' + name:<22}" + "".join(f"  {v:8.4f}" for v in values)
                     + f"  {statistics.mean(values):7.4f}  (accuracy on the unlabeled set)")
    wins = sum(r["student_1"] > r["teacher"] for r in results)
    lines.append(f"  the noised student beat its teacher in {wins} of {len(results)} seeds; "
                 f"noise helped student 1 in {sum(r['student_1'] > r['student_1_no_noise'] for r in results)} "
                 f"of {len(results)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Noisy Student end to end on scikit-learn's digits, on CPU.")
    parser.add_argument("--output", default="demo-output")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--labeled-per-class", type=int, default=15)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--teacher-model", default="resnet10t")
    parser.add_argument("--student-model", default="resnet10t")
    parser.add_argument("--teacher-steps", type=int, default=120)
    parser.add_argument("--student-steps", type=int, default=120)
    parser.add_argument("--magnitude", type=int, default=6)
    args = parser.parse_args(argv)
    from ns_data.cli import quiet_logging

    quiet_logging()  # the labels are read through ns_data.contract, whose Beam import logs noise
    started = time.time()
    shutil.rmtree(args.output, ignore_errors=True)
    results = []
    for seed in args.seeds:
        print(f"== seed {seed}", flush=True)
        results.append(loop(os.path.join(args.output, f"seed-{seed}"), seed, args))
        with open(os.path.join(args.output, "results.json"), "w") as f:
            json.dump(results, f, indent=1)
    print(table(results))
    print(f"\n{time.time() - started:,.0f} s; per-seed outputs and results.json in {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
