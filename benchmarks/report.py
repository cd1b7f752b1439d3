"""Benchmark `ns-data report` on a large pseudo-label output: wall time and peak memory of the command.

The input is a synthetic label output (`ns-data synth pseudo-labels`, 1000 Zipf-skewed classes, 8 files; made
once and reused from benchmarks/data/, like balance.py's). The report reads its stats.json, passes once over its
label and confidence columns (row group by row group, into fixed-size arrays), draws the figures, and tries the
sample grid's images (the synthetic sources do not exist: each is a placeholder, so image reading costs nothing
here). Each run is `ns-data report DIR --output FILE` in its own child process, measured by balance.py's
`measure` (wall time around the child, peak RSS of its process tree), --repeats times per size; the median wall
time and the highest peak are reported.

    .venv/bin/python benchmarks/report.py                          # 1M and 10M rows
    .venv/bin/python benchmarks/report.py --huge                   # and 100M rows (generating them takes a while)
    .venv/bin/python benchmarks/report.py --rows 300000 --small-rows 100000 --repeats 1   # quick check
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from balance import BIN, DATA_DIR, dataset, measure, save_results, summarize  # noqa: E402  (same folder)

RESULTS = HERE / "results" / "report.json"
HUGE_ROWS = 100_000_000


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, default=10_000_000, help="large input size")
    p.add_argument("--small-rows", type=int, default=1_000_000, help="small input size")
    p.add_argument("--huge", action="store_true", help=f"also {HUGE_ROWS:,} rows")
    p.add_argument("--classes", type=int, default=1000, help="classes in the synthetic data")
    p.add_argument("--files", type=int, default=8, help="Parquet files per synthetic table")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--invalid-fraction", type=float, default=0.0, help="share of synthetic rows spoiled")
    p.add_argument("--repeats", type=int, default=3, help="runs per size")
    p.add_argument("--memory-limit-gb", type=float, default=8, help="a run past this RSS is killed")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before a run is killed")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    sizes = sorted({args.small_rows, args.rows} | ({HUGE_ROWS} if args.huge else set()))
    out = DATA_DIR / "report-out"
    logs = HERE / "results" / "logs"
    summaries = []
    for rows in sizes:
        labels = dataset(rows, args)
        print(f"\n{rows:,} rows:", flush=True)
        runs = [measure("report", rows, [str(BIN / "ns-data"), "report", str(labels), "--output",
                                         str(out / f"report-{rows}.html")], logs / f"report-{rows}-{i}.log",
                        args.memory_limit_gb * 1024, args.timeout)
                for i in range(args.repeats)]
        summary = summarize(runs)
        summaries.append(summary)
        print(f"  median {summary.wall_s or float('nan'):.1f} s, {summary.rows_per_s or 0:,.0f} rows/s, "
              f"peak {summary.peak_rss_mb:,.0f} MB, {summary.status}", flush=True)
    save_results(RESULTS, {"args": vars(args), "summaries": [vars(s) for s in summaries]})
    return 0 if all(s.status == "ok" for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
