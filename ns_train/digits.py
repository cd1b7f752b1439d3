"""The demo's data: scikit-learn's handwritten digits (1,797 real 8x8 scans shipped inside the package, so
nothing is downloaded), split per seed and written as a user's corpus would be.

    python -m ns_train.digits --output demo-output/data --seeds 0 1 2 3 4 --labeled-per-class 3

For each seed, OUTPUT/seed-N/ holds a labeled set of a few images per class and a held-out test set as TFRecord
shards of tf.Example (image/encoded + label), the rest as unlabeled PNG files, and their labels, set aside, as
`unlabeled-labels.parquet` (id, label): the ground truth that `ns-train loop` and `ns-data report
--ground-truth` score pseudo labels against. configs/digits.yaml runs Noisy Student on them.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np

COMPLETE = "split.json"  # written last: a seed's split is complete


def write_split(output: str, seed: int, labeled_per_class: int, test_size: int, size: int) -> dict:
    """The seed's split, written as files; returns the sizes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image
    from sklearn.datasets import load_digits

    from ns_data import fs, tfrecord

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
        Image.fromarray(images[i]).resize((size, size), Image.BICUBIC).save(buf, "PNG")
        return buf.getvalue()

    def shards(name: str, idx: np.ndarray, count: int) -> None:
        directory = os.path.join(output, name)
        os.makedirs(directory, exist_ok=True)
        for s, part in enumerate(np.array_split(rng.permutation(idx), count)):
            with open(os.path.join(directory, f"train-{s:05d}-of-{count:05d}.tfrecord"), "wb") as f:
                for i in part:
                    f.write(tfrecord.frame_record(tfrecord.make_example({"image/encoded": png(i),
                                                                         "label": int(labels[i])})))

    shards("labeled", labeled, 2)
    shards("test", test, 2)
    os.makedirs(os.path.join(output, "unlabeled"), exist_ok=True)
    names = [f"digit-{i:04d}.png" for i in unlabeled]
    for i, name in zip(unlabeled, names):
        with open(os.path.join(output, "unlabeled", name), "wb") as f:
            f.write(png(i))
    pq.write_table(pa.table({"id": names, "label": pa.array(labels[unlabeled], pa.int32())}),
                   os.path.join(output, "unlabeled-labels.parquet"))
    sizes = {"labeled": len(labeled), "unlabeled": len(unlabeled), "test": len(test)}
    fs.write_json(os.path.join(output, COMPLETE), {"seed": seed, "labeled_per_class": labeled_per_class,
                                                   "test_size": test_size, "size": size, "sizes": sizes})
    return sizes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Write scikit-learn's digits as labeled / unlabeled / test sets.")
    parser.add_argument("--output", required=True, help="Writes OUTPUT/seed-N/ per seed.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--labeled-per-class", type=int, default=3)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--size", type=int, default=32, help="Image side in pixels (the 8x8 scans, upscaled).")
    args = parser.parse_args(argv)
    for seed in args.seeds:
        directory = os.path.join(args.output, f"seed-{seed}")
        marker = os.path.join(directory, COMPLETE)
        if os.path.exists(marker):
            with open(marker) as f:
                written = json.load(f)
            wanted = {"seed": seed, "labeled_per_class": args.labeled_per_class, "test_size": args.test_size,
                      "size": args.size}
            if {k: written.get(k) for k in wanted} != wanted:
                raise SystemExit(f"error: {directory} holds a split of other settings; remove it or choose another "
                                 "--output")
            print(f"{directory}: already written")
            continue
        sizes = write_split(directory, seed, args.labeled_per_class, args.test_size, args.size)
        print(f"{directory}: {sizes['labeled']} labeled, {sizes['unlabeled']} unlabeled, {sizes['test']} test images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
