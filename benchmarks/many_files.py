"""How balance's time grows with the number of input files: the same number of rows (synthetic pseudo labels,
`ns-data synth pseudo-labels`, 1000 classes) written as few and as many files, each balanced by `ns-data
balance` in a child process (the local runner's default worker count for the input), wall time around the
child.

    .venv/bin/python benchmarks/many_files.py                         # 3M rows in 8 and in 10,000 files
    .venv/bin/python benchmarks/many_files.py --rows 300000 --files 8 1000

Data and outputs go to benchmarks/data/many-files/ (git-ignored); inputs are reused while their size matches.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "data" / "many-files"


def make_input(rows: int, files: int) -> Path:
    from ns_data.synth import SynthOptions, write_pseudo_labels

    path = DATA / f"labels-{rows}-{files}"
    write_pseudo_labels(SynthOptions(output=str(path), rows=rows, files=files, classes=1000,
                                     row_group_rows=262_144))
    return path


def run_balance(labels: Path, per_class: int, extra: list[str]) -> float:
    out = DATA / f"out-{labels.name}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ns_data.cli", "balance", str(labels), "--output", str(out),
                    "--per-class", str(per_class), "--overwrite", "--no-progress", *extra], check=True,
                   stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    stats = json.loads((out / "stats.json").read_text())
    files = len(list(out.glob("selection-*.parquet")))
    print(f"  {labels.name}: {seconds:.1f} s, {stats['selected_rows']:,} rows selected in {files} file(s)",
          flush=True)
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=3_000_000)
    p.add_argument("--files", type=int, nargs="+", default=[8, 10_000])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("beam_args", nargs="*", help="passed to ns-data balance (after --)")
    args = p.parse_args()
    os.makedirs(DATA, exist_ok=True)
    per_class = max(1, args.rows // 10_000 * 13)
    times = {}
    for files in args.files:
        labels = make_input(args.rows, files)
        times[files] = min(run_balance(labels, per_class, args.beam_args) for _ in range(args.repeats))
    base = times[args.files[0]]
    for files, seconds in times.items():
        print(f"{args.rows:,} rows in {files:,} files: {seconds:.1f} s ({seconds / base:.2f}x)")


if __name__ == "__main__":
    main()
