"""Benchmark `ns-train train` against a bare timm training loop: same model, same batch, data ready in memory.

  (a) bare     timm model (same dropout / stochastic depth), TF-style RMSProp, the Noisy Student loss
               (labeled cross entropy + ratio x soft cross entropy) on one batch of tensors already decoded,
               augmented and in memory: forward, backward, step, nothing else. Timed per step after 3
               warm-up steps.
  (b) ns-train the real command on TFRecord shards (labeled + pseudo-labeled, synthetic JPEGs): reading,
               decoding and RandAugment in --workers DataLoader processes, EMA, LR schedule, metrics,
               checkpoints. Its steady-state rate is the median of the logged windows after the first.

Overhead = 1 - rate(b) / rate(a). Both at the same torch thread count, each in its own child process, --repeats
times, interleaved. On this 2-core machine the DataLoader workers share the cores with the model, so the input
pipeline is not hidden behind the compute as it is on a GPU host; the script also runs (b) with --no-noise
(decode + resize only) to separate the cost of RandAugment from the rest.

    .venv/bin/python benchmarks/train.py     # about 6 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from balance import BIN, measure, save_results  # noqa: E402  (same folder: the child-process measuring helper)

DATA = HERE / "data" / "train"
RESULTS = HERE / "results" / "train.json"
CLASSES = 100


def shards(n_labeled: int, n_unlabeled: int) -> dict[str, Path]:
    """Labeled and pseudo-labeled shards of synthetic 256x192 JPEGs (written once)."""
    from PIL import Image

    from ns_data import tfrecord

    out = {"labeled": DATA / "labeled", "unlabeled": DATA / "unlabeled"}
    if (DATA / "done").exists():
        return out
    rng = np.random.default_rng(0)
    for name, n in (("labeled", n_labeled), ("unlabeled", n_unlabeled)):
        out[name].mkdir(parents=True, exist_ok=True)
        files = [open(out[name] / f"train-{s:05d}-of-00004.tfrecord", "wb") for s in range(4)]
        for i in range(n):
            base = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(base).resize((256, 192), Image.BICUBIC).save(buf, "JPEG", quality=90)
            label = int(rng.integers(CLASSES))
            features = {"image/encoded": buf.getvalue(), "label": label}
            if name == "unlabeled":
                classes = [label, (label + 1) % CLASSES, (label + 2) % CLASSES]
                features |= {"prob": 0.6, "id": f"u{i}", "copy": 0, "topk_classes": classes,
                             "topk_probs": [0.6, 0.2, 0.1]}
            files[i % 4].write(tfrecord.frame_record(tfrecord.make_example(features)))
        for f in files:
            f.close()
    (DATA / "done").write_text("")
    return out


def child_bare(model_name: str, batch: int, ratio: float, size: int, steps: int) -> None:
    import timm
    import torch
    import torch.nn.functional as F
    from timm.optim import RMSpropTF

    torch.manual_seed(0)
    model = timm.create_model(model_name, num_classes=CLASSES, drop_rate=0.5, drop_path_rate=0.2)
    model = model.to(memory_format=torch.channels_last).train()
    optimizer = RMSpropTF(model.parameters(), lr=0.01, alpha=0.9, eps=1e-3, momentum=0.9, weight_decay=1e-5)
    unlabeled = round(batch * ratio)
    images = torch.randn(batch + unlabeled, 3, size, size).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, CLASSES, (batch,))
    targets = torch.softmax(torch.randn(unlabeled, CLASSES), dim=1)
    times = []
    for step in range(steps + 3):
        start = time.perf_counter()
        logits = model(images)
        loss = F.cross_entropy(logits[:batch], labels, label_smoothing=0.1) + ratio * -(
            targets * F.log_softmax(logits[batch:], dim=1)).sum(1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step >= 3:
            times.append(time.perf_counter() - start)
    print(json.dumps({"steps_per_s": 1 / statistics.median(times)}))


def ns_train_rate(run_dir: Path, batch: int, ratio: float) -> float:
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [m["images_per_s"] for m in lines if "images_per_s" in m][1:]  # the first window holds start-up
    return statistics.median(rates) / (batch + round(batch * ratio))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--unlabeled-ratio", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    data = shards(2000, 6000)
    out = HERE / "data" / "train-out"
    rates: dict[str, list[float]] = {"bare": [], "ns-train": [], "ns-train --no-noise": []}
    runs: dict[str, list] = {k: [] for k in rates}
    common = [str(BIN / "ns-train"), "train", "--labeled", str(data["labeled"]), "--unlabeled", str(data["unlabeled"]),
              "--model", args.model, "--num-classes", str(CLASSES), "--image-size", str(args.image_size),
              "--batch-size", str(args.batch_size), "--unlabeled-ratio", str(args.unlabeled_ratio), "--steps",
              str(args.steps), "--workers", str(args.workers), "--log-every", "5", "--checkpoint-every", "20",
              "--no-progress", "--lr", "0.01"]
    for r in range(args.repeats):
        log = out / f"bare-{r}.log"
        runs["bare"].append(measure("bare", args.steps, [sys.executable, __file__, "child", args.model,
                                                         str(args.batch_size), str(args.unlabeled_ratio),
                                                         str(args.image_size), str(args.steps)], log, 8000, 1800))
        rates["bare"].append(json.loads(log.read_text().strip().splitlines()[-1])["steps_per_s"])
        for name, extra in (("ns-train", []), ("ns-train --no-noise", ["--no-noise"])):
            run_dir = out / f"{name.replace(' ', '').replace('--', '-')}-{r}"
            subprocess.run(["rm", "-rf", str(run_dir)], check=True)
            runs[name].append(measure(name, args.steps, common + ["--output", str(run_dir)] + extra,
                                      out / f"{run_dir.name}.log", 8000, 1800))
            rates[name].append(ns_train_rate(run_dir, args.batch_size, args.unlabeled_ratio))
    median = {k: statistics.median(v) for k, v in rates.items()}
    results = {"args": vars(args), "steps_per_s": rates, "median_steps_per_s": median,
               "overhead": {k: 1 - median[k] / median["bare"] for k in median if k != "bare"},
               "peak_rss_mb": {k: [round(x.peak_rss_mb) for x in v] for k, v in runs.items()}}
    for k, v in median.items():
        print(f"  {k:<22} {v:.3f} steps/s" + ("" if k == "bare" else f"  overhead {results['overhead'][k]:.1%}"))
    save_results(RESULTS, results)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child_bare(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6]))
    else:
        sys.exit(main())
