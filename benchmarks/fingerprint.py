"""What label's content fingerprint (contract.content_fingerprint: length and CRC32C of each image's bytes) costs.

    python -m benchmarks.fingerprint [--images 400] [--size 320x240] [--repeats 5]

Synthetic JPEGs (`ns_data.synth.write_images`) in a temp dir. Printed: the fingerprint's time per image over
their bytes, and the whole `label` command (in process, tiny random teacher `test_efficientnet`, 10 classes,
--batch-size 32) on them, alternately with the fingerprint and with it replaced by a constant, `--repeats`
times each; the first run of each is a warm-up and left out of the medians.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

from ns_data import contract
from ns_data.label import LabelOptions, run_label
from ns_data.synth import write_images


def label_seconds(images: str, output: str) -> float:
    opts = LabelOptions(inputs=(images,), output=output, teacher="test_efficientnet", random_weights=True,
                        num_classes=10, batch_size=32)
    start = time.perf_counter()
    run_label(opts, [], echo=lambda message: None)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", default="320x240")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    root = tempfile.mkdtemp(prefix="fingerprint-bench-")
    images = os.path.join(root, "images")
    data = [open(p, "rb").read() for p in write_images(images, args.images, width=width, height=height)]
    total = sum(map(len, data))
    start = time.perf_counter()
    for _ in range(20):
        for d in data:
            contract.content_fingerprint(d)
    seconds = (time.perf_counter() - start) / 20
    print(f"{args.images} JPEGs of {width}x{height}, {total / args.images / 1024:.1f} KiB mean: fingerprint "
          f"{seconds / args.images * 1e6:.1f} us per image, {total / seconds / 1e9:.2f} GB/s")
    fingerprint = contract.content_fingerprint
    times: dict[str, list[float]] = {"with": [], "without": []}
    try:
        for i in range(args.repeats):
            for tag in ("with", "without"):
                contract.content_fingerprint = fingerprint if tag == "with" else (lambda d: (0, 0))
                times[tag].append(label_seconds(images, os.path.join(root, f"out-{tag}-{i}")))
    finally:
        contract.content_fingerprint = fingerprint
    for tag, runs in times.items():
        if len(runs) > 1:
            median = statistics.median(runs[1:])
            print(f"label {tag} the fingerprint: {', '.join(f'{t:.2f}' for t in runs)} s; median after the "
                  f"warm-up {median:.2f} s = {args.images / median:.1f} images/s")


if __name__ == "__main__":
    main()
