"""Benchmark `ns-data balance` against DuckDB (and, opt-in, against an element-wise Beam pipeline).

What it measures. Implementations of the selection rule (docs/design.md) run on the same synthetic pseudo-label tables
(`ns-data synth pseudo-labels`, 1000 skewed classes, 8 files) at each size of --rows, with --per-class = rows /
10,000 x 13 unless given (13,000 at 10M rows, 130,000 at 100M rows), each on the table with its
pass-through top-k columns and on a copy without them (columns id, source, offset, label, confidence):

  (a) ns-data Nw   `ns-data balance INPUT --output OUT --per-class K --overwrite --no-progress
                   --direct_num_workers N` for each N of --workers (default: 1 and every core), on Beam's local
                   FnApiRunner (N > 1: worker processes);
  (b) duckdb       one SQL statement doing the same work: reject invalid rows, keep one row per id (most
                   confident, then lowest label), rank candidates per class with ROW_NUMBER() OVER (PARTITION
                   BY label ORDER BY confidence DESC, hash(id), id), keep rank < K, add copies, write all
                   columns with COPY ... TO Parquet; on every core (its default);
  (c) elementwise  only with --elementwise-rows: the textbook Beam way on the FnApiRunner (ReadFromParquet, one
                   Python dict per row, Filter, CombinePerKey by id, Top.PerKey by class, copies,
                   WriteToParquet); killed past --memory-limit-gb or --elementwise-timeout.

Each run is its own child process, started from here, runs of one case alternate between implementations:
wall time is measured around the child; CPU time is that of the child and its reaped children (os.wait4); peak
memory is the highest sum of RSS over the child's whole process tree, polled every 0.1 s with psutil (and at
least the child's own ru_maxrss). Wall time includes interpreter start and imports (~2-3 s for Beam), and for
N > 1 the start of the worker processes. Inputs are read from the page cache after the first run.

(b) and (c) break confidence ties with their own hashes (DuckDB's hash(), blake2b), not ns-data's seeded
hash, so which tied rows are kept at a class's cut can differ; the number of rows kept per class cannot. It is
checked (as is that every class totals --per-class copies), and the script warns and exits 1 if it differs.
ns-data also writes an errors table and stats.json; (b) and (c) do not.

Run it (data and outputs go to benchmarks/data/, results and child logs to benchmarks/results/; both are
git-ignored):

    .venv/bin/python benchmarks/balance.py                          # 1M and 10M rows, 3 repeats
    .venv/bin/python benchmarks/balance.py --rows 100000000 --repeats 1   # 100M rows (~4 GB of input)
    .venv/bin/python benchmarks/balance.py --rows 300000 --repeats 1      # quick check
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA_DIR = HERE / "data"
RESULTS_FILE = HERE / "results" / "balance.json"
BIN = Path(sys.executable).parent

IMPLEMENTATIONS = ("ns-data", "duckdb", "elementwise")


# ------------------------------------------------------------------------------------------------ data


def dataset(rows: int, args) -> Path:
    """A synthetic pseudo-label table of `rows` rows; generated once, reused while its parameters match."""
    params = {"rows": rows, "classes": args.classes, "files": args.files, "seed": args.seed,
              "invalid_fraction": args.invalid_fraction}
    name = f"pseudo-labels-{rows}r-{args.classes}c-{args.files}f-s{args.seed}"
    if args.invalid_fraction:
        name += f"-inv{args.invalid_fraction:g}"
    path = DATA_DIR / name
    marker = path / "params.json"
    if marker.exists() and json.loads(marker.read_text()) == params:
        print(f"reusing {path.relative_to(ROOT)}", flush=True)
        return path
    marker.unlink(missing_ok=True)
    print(f"generating {rows:,} rows into {path.relative_to(ROOT)} ...", flush=True)
    subprocess.run([str(BIN / "ns-data"), "synth", "pseudo-labels", "--output", str(path), "--rows", str(rows),
                    "--classes", str(args.classes), "--files", str(args.files), "--seed", str(args.seed),
                    "--invalid-fraction", str(args.invalid_fraction), "--overwrite"], check=True, cwd=ROOT)
    marker.write_text(json.dumps(params))
    return path


KEY_COLUMNS = ["id", "source", "offset", "label", "confidence"]


def without_topk(path: Path) -> Path:
    """The same table without its pass-through top-k columns (same files and row groups); made once."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = path.with_name(path.name + "-no-topk")
    marker = out / "params.json"
    if (marker.exists() and marker.read_text() == (path / "params.json").read_text()
            and (out / "stats.json").exists()):
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in sorted(path.glob("*.parquet")):
        source = pq.ParquetFile(f)
        schema = source.schema_arrow
        keys = pa.schema([schema.field(c) for c in KEY_COLUMNS], metadata=schema.metadata)
        with pq.ParquetWriter(out / f.name, keys) as writer:
            for rg in range(source.num_row_groups):
                writer.write_table(source.read_row_group(rg, columns=KEY_COLUMNS))
    shutil.copy(path / "stats.json", out / "stats.json")  # the label output's marker: the table is complete
    marker.write_text((path / "params.json").read_text())
    return out


# ------------------------------------------------------------------------------------- measuring a child


@dataclass
class Run:
    implementation: str
    rows: int
    wall_s: float
    cpu_s: float  # user + system of the child and its reaped children
    peak_rss_mb: float  # the child's ru_maxrss
    polled_tree_rss_mb: float  # highest sum of RSS over the child's process tree seen by polling (every 0.1 s)
    status: str  # "ok", "failed (exit N)", or why it was killed
    log: str

    @property
    def tree_peak_mb(self) -> float:
        """Peak memory of the whole process tree: the polled sum, or the child's own peak if polling missed it."""
        return max(self.peak_rss_mb, self.polled_tree_rss_mb)


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def save_results(path: Path, results: dict) -> None:
    """Writes a benchmark's results as JSON and says where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1, default=str))
    print(f"\nresults: {path.relative_to(ROOT)}")


def measure(impl: str, rows: int, cmd: list[str], log: Path, limit_mb: float, timeout_s: float | None) -> Run:
    """Runs `cmd` in its own session; returns its wall time, CPU time and peak RSS (killed past the limits)."""
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    killed = None
    polled = 0
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True)
        ps = psutil.Process(proc.pid)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            polled = max(polled, _tree_rss(ps))
            if killed is None and polled > limit_mb * 2**20:
                killed = f"killed: RSS over {limit_mb:,.0f} MB"
            if killed is None and timeout_s and time.perf_counter() - start > timeout_s:
                killed = f"killed: over {timeout_s:,.0f} s"
            if killed:
                os.killpg(proc.pid, signal.SIGKILL)  # the session started above: the child and its children
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.1)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, so Popen must not wait again
    state = killed or ("ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})")
    run = Run(impl, rows, wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024, polled / 2**20,
              state, str(log.relative_to(ROOT)))
    print(f"  {impl:<12} {rows:>12,} rows  {wall:8.1f} s  cpu {run.cpu_s:8.1f} s  "
          f"tree peak {run.tree_peak_mb:8,.0f} MB  {state}", flush=True)
    if state != "ok":
        print("    " + "\n    ".join(log.read_text().splitlines()[-15:]), flush=True)
    return run


# ------------------------------------------------------------------------------------- implementations


def nsdata_command(inp: Path, out: Path, per_class: int, args, workers: int) -> list[str]:
    return [str(BIN / "ns-data"), "balance", str(inp), "--output", str(out), "--per-class", str(per_class),
            "--min-confidence", str(args.min_confidence), "--overwrite", "--no-progress",
            "--direct_num_workers", str(workers)]


def child_command(kind: str, inp: Path, out: Path, per_class: int, args) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "child", kind, str(inp), str(out),
            str(per_class), str(args.min_confidence)]


def run_duckdb(inp: str, out: str, per_class: int, min_confidence: float) -> None:
    """(b): the rule as one DuckDB statement, result with all input columns + rank + copies in one Parquet file."""
    import duckdb

    con = duckdb.connect()
    threads = con.execute("SELECT current_setting('threads')").fetchone()[0]
    source = os.path.join(inp, "*.parquet").replace("'", "''")
    target = os.path.join(out, "selection.parquet").replace("'", "''")
    os.makedirs(out, exist_ok=True)
    n = f"least(candidates, {int(per_class)})"
    con.execute(f"""
        COPY (
          WITH valid AS (
            SELECT * FROM read_parquet('{source}')
            WHERE id IS NOT NULL AND id <> '' AND label IS NOT NULL AND label >= 0
              AND confidence IS NOT NULL AND isfinite(confidence) AND confidence >= 0 AND confidence <= 1
          ), unique_ids AS (
            SELECT * FROM valid
            QUALIFY row_number() OVER (PARTITION BY id ORDER BY confidence DESC, label) = 1
          ), ranked AS (
            SELECT *,
                   row_number() OVER (PARTITION BY label ORDER BY confidence DESC, hash(id), id) - 1 AS rank,
                   count(*) OVER (PARTITION BY label) AS candidates
            FROM unique_ids
            WHERE confidence >= CAST({float(min_confidence)!r} AS FLOAT)
          )
          SELECT * EXCLUDE (rank, candidates),
                 CAST(rank AS INTEGER) AS rank,
                 CAST({int(per_class)} // {n} + CASE WHEN rank < {int(per_class)} % {n} THEN 1 ELSE 0 END
                      AS INTEGER) AS copies
          FROM ranked
          WHERE rank < {int(per_class)}
        ) TO '{target}' (FORMAT parquet)
    """)
    print(json.dumps({"duckdb_version": duckdb.__version__, "duckdb_threads": int(threads)}))


def run_elementwise(inp: str, out: str, per_class: int, min_confidence: float) -> None:
    """(c): the rule element-wise in Beam: one Python dict per row through every step."""
    import glob
    import hashlib
    import math

    import apache_beam as beam
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.options.pipeline_options import PipelineOptions

    files = sorted(glob.glob(os.path.join(inp, "*.parquet")))
    schema = pq.read_schema(files[0]).append(pa.field("rank", pa.int32())).append(pa.field("copies", pa.int32()))
    min_conf = float(np.float32(min_confidence))  # the rule compares float32 confidences

    def is_valid(row: dict) -> bool:
        c = row["confidence"]
        return (bool(row["id"]) and row["label"] is not None and row["label"] >= 0
                and c is not None and math.isfinite(c) and 0.0 <= c <= 1.0)

    def best_copy(rows) -> dict:  # of rows sharing an id: the most confident, then the lowest label
        return min(rows, key=lambda r: (-r["confidence"], r["label"]))

    def order(row: dict) -> tuple:  # Top keeps the largest: confidence desc, then hash asc
        h = int.from_bytes(hashlib.blake2b(row["id"].encode(), digest_size=8).digest(), "little")
        return row["confidence"], -h

    def with_copies(label_and_rows):
        _, rows = label_and_rows  # most confident first
        n = len(rows)
        for rank, row in enumerate(rows):
            yield dict(row, rank=rank, copies=per_class // n + (rank < per_class % n))

    os.makedirs(out, exist_ok=True)
    with beam.Pipeline(options=PipelineOptions(["--runner", "FnApiRunner"])) as p:
        _ = (p
             | "Read" >> beam.io.ReadFromParquet(os.path.join(inp, "*.parquet"))
             | "Valid" >> beam.Filter(is_valid)
             | "KeyById" >> beam.Map(lambda r: (r["id"], r))
             | "OneRowPerId" >> beam.CombinePerKey(best_copy)
             | "Candidates" >> beam.Filter(lambda kv: kv[1]["confidence"] >= min_conf)
             | "KeyByLabel" >> beam.Map(lambda kv: (kv[1]["label"], kv[1]))
             | "TopPerClass" >> beam.combiners.Top.PerKey(per_class, key=order)
             | "Copies" >> beam.FlatMap(with_copies)
             | "Write" >> beam.io.WriteToParquet(os.path.join(out, "selection"), schema,
                                                 file_name_suffix=".parquet"))


# ------------------------------------------------------------------------------------------------ checks


def class_counts(out: Path) -> dict[int, tuple[int, int]]:
    """label -> (selected rows, total copies), read from an output's selection*.parquet files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    files = sorted(out.glob("selection*.parquet"))
    table = pa.concat_tables([pq.read_table(f, columns=["label", "copies"]) for f in files])
    agg = table.group_by("label").aggregate([("label", "count"), ("copies", "sum")]).to_pydict()
    return {int(k): (int(n), int(c)) for k, n, c in zip(agg["label"], agg["label_count"], agg["copies_sum"])}


def compare_counts(name: str, counts: dict, reference: dict, per_class: int) -> list[str]:
    """Warnings where `counts` differs from `reference` (ns-data) or a class does not total per_class."""
    warnings = []
    differ = sorted(k for k in set(counts) | set(reference) if counts.get(k, (0,))[0] != reference.get(k, (0,))[0])
    if differ:
        warnings.append(f"{name}: rows per class differ from ns-data in {len(differ)} class(es), e.g. "
                        + ", ".join(f"{k}: {counts.get(k, (0,))[0]} vs {reference.get(k, (0,))[0]}"
                                    for k in differ[:5]))
    off = [k for k, (_, copies) in counts.items() if copies != per_class]
    if off:
        warnings.append(f"{name}: {len(off)} class(es) do not total {per_class} copies")
    return warnings


# ------------------------------------------------------------------------------------------------ report


@dataclass
class Summary:
    implementation: str
    rows: int
    columns: str  # "all" or "no top-k"
    per_class: int
    repeats: int
    wall_s: float | None  # median over the repeats that finished
    cpu_s: float | None
    peak_rss_mb: float  # highest over repeats, whole process tree
    rows_per_s: float | None
    status: str
    runs: list = field(default_factory=list)


def summarize(runs: list[Run], columns: str = "all", per_class: int = 0) -> Summary:
    ok = [r for r in runs if r.status == "ok"]
    wall = statistics.median(r.wall_s for r in ok) if ok else None
    return Summary(runs[0].implementation, runs[0].rows, columns, per_class, len(runs), wall,
                   statistics.median(r.cpu_s for r in ok) if ok else None,
                   max(r.tree_peak_mb for r in runs),
                   runs[0].rows / wall if wall else None,
                   "ok" if len(ok) == len(runs) else "; ".join(sorted({r.status for r in runs if r.status != "ok"})),
                   [asdict(r) for r in runs])


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def markdown_table(summaries: list[Summary]) -> str:
    lines = ["| rows | columns | per class | implementation | repeats | wall s (median) | CPU s | peak RSS MB "
             "(tree) | rows/s | status |", "|---:|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for s in summaries:
        lines.append(f"| {s.rows:,} | {s.columns} | {s.per_class:,} | {s.implementation} | {s.repeats} | "
                     f"{_fmt(s.wall_s, '.1f')} | {_fmt(s.cpu_s, '.1f')} | {s.peak_rss_mb:,.0f} | "
                     f"{_fmt(s.rows_per_s, ',.0f')} | {s.status} |")
    return "\n".join(lines)


def ratios(summaries: list[Summary], workers: list[int]) -> dict[str, float]:
    """Per case: each ns-data run's wall over DuckDB's, and the throughput of N workers over one worker."""
    out = {}
    cases = sorted({(s.rows, s.columns) for s in summaries})
    for rows, columns in cases:
        by = {s.implementation: s for s in summaries if (s.rows, s.columns) == (rows, columns) and s.wall_s}
        case = f"@ {rows:,} rows, {columns} columns"
        for w in workers:
            a, b = by.get(f"ns-data {w}w"), by.get("duckdb")
            if a and b:
                out[f"ns-data {w}w wall / duckdb wall {case}"] = a.wall_s / b.wall_s
        one = by.get("ns-data 1w")
        for w in workers:
            many = by.get(f"ns-data {w}w")
            if one and many and w != 1:
                out[f"ns-data throughput {w}w / 1w {case}"] = one.wall_s / many.wall_s
    # Marginal throughput between the smallest and the largest size: (rows2 - rows1) / (wall2 - wall1), which
    # leaves out the fixed start-up (interpreter, imports, building the pipeline, starting worker processes).
    sizes = sorted({s.rows for s in summaries})
    for columns in sorted({s.columns for s in summaries}):
        by = {(s.implementation, s.rows): s for s in summaries if s.columns == columns and s.wall_s}
        rate = {}
        for impl in {s.implementation for s in summaries}:
            a, b = by.get((impl, sizes[0])), by.get((impl, sizes[-1]))
            if a and b and b.wall_s > a.wall_s:
                rate[impl] = (b.rows - a.rows) / (b.wall_s - a.wall_s)
        for w in workers:
            if w != 1 and f"ns-data {w}w" in rate and "ns-data 1w" in rate:
                out[f"ns-data marginal throughput {w}w / 1w, {sizes[0]:,} -> {sizes[-1]:,} rows, {columns} "
                    "columns"] = rate[f"ns-data {w}w"] / rate["ns-data 1w"]
    return out


# -------------------------------------------------------------------------------------------------- main


def parse_args(argv=None) -> argparse.Namespace:
    import psutil

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 10_000_000], help="input sizes")
    p.add_argument("--classes", type=int, default=1000, help="classes in the synthetic data")
    p.add_argument("--files", type=int, default=8, help="Parquet files per synthetic table")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic data")
    p.add_argument("--invalid-fraction", type=float, default=0.0,
                   help="share of synthetic rows spoiled (NaN/out-of-range confidence, bad label, repeated id)")
    p.add_argument("--per-class", type=int, default=None,
                   help="rows kept per class (default: 0.13%% of the rows, e.g. 13,000 at 10M rows: caps ~120 and "
                        "upsamples ~880 of 1000 classes)")
    p.add_argument("--min-confidence", type=float, default=0.3, help="candidates have at least this confidence")
    p.add_argument("--workers", type=int, nargs="+", default=sorted({1, len(psutil.Process().cpu_affinity())}),
                   help="ns-data runs with each of these numbers of worker processes")
    p.add_argument("--columns", nargs="+", default=["all", "no top-k"], choices=["all", "no top-k"],
                   help="run on the table with its top-k columns (all) and/or on a copy without them")
    p.add_argument("--repeats", type=int, default=3, help="runs of (a) and (b) per case; (c) runs once")
    p.add_argument("--elementwise-rows", type=int, default=None,
                   help="input size for (c), which runs only when given; it runs at ~10K rows/s and needs "
                        "~2.2 KB of RSS per row: 10M rows would take ~17 minutes and ~22 GB")
    p.add_argument("--elementwise-timeout", type=float, default=2400, help="seconds before (c) is killed")
    p.add_argument("--memory-limit-gb", type=float, default=12, help="any child past this RSS is killed")
    p.add_argument("--keep-outputs", action="store_true", help="keep the selections in benchmarks/data/out")
    return p.parse_args(argv)


def environment() -> dict:
    import psutil

    versions = {}
    for package in ("ns-data", "duckdb", "apache-beam", "pyarrow", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    git = {}
    try:  # which library code was measured: the commit, and whether ns_data/ had uncommitted changes
        git["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                       check=True).stdout.strip()
        git["ns_data_modified"] = bool(subprocess.run(["git", "status", "--porcelain", "ns_data", "pipelines"],
                                                      cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        pass
    return {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1), "versions": versions, "git": git}


def main(argv=None) -> int:
    args = parse_args(argv)
    limit_mb = args.memory_limit_gb * 1024
    out_root = DATA_DIR / "out"
    logs = HERE / "results" / "logs"
    summaries: list[Summary] = []
    warnings: list[str] = []
    compared: list[str] = []
    duckdb_info: dict = {}
    cases = [(rows, columns) for rows in sorted(set(args.rows)) for columns in args.columns]
    if args.elementwise_rows:
        cases.append((args.elementwise_rows, "elementwise"))
    for rows, columns in cases:
        per_class = args.per_class or max(1, rows * 13 // 10_000)
        table = dataset(rows, args)
        if columns == "no top-k":
            table = without_topk(table)
        print(f"\n{rows:,} rows, {columns} columns, --per-class {per_class:,}:", flush=True)
        if columns == "elementwise":
            plan = [("elementwise", lambda o: child_command("elementwise", table, o, per_class, args))]
            repeats, timeout = 1, args.elementwise_timeout
        else:
            plan = [(f"ns-data {w}w", lambda o, w=w: nsdata_command(table, o, per_class, args, w))
                    for w in args.workers]
            plan.append(("duckdb", lambda o: child_command("duckdb", table, o, per_class, args)))
            repeats, timeout = args.repeats, None
        runs: dict[str, list[Run]] = {impl: [] for impl, _ in plan}
        for i in range(repeats):  # alternated: a slow spell of the machine hits every implementation
            for impl, command in plan:
                out = out_root / impl.replace(" ", "-")
                shutil.rmtree(out, ignore_errors=True)
                name = f"{impl.replace(' ', '-')}-{rows}-{columns.replace(' ', '')}-{i}.log"
                runs[impl].append(measure(impl, rows, command(out), logs / name, limit_mb, timeout))
        counts = {}
        for impl, _ in plan:
            out = out_root / impl.replace(" ", "-")
            summaries.append(summarize(runs[impl], columns, per_class))
            if runs[impl][-1].status == "ok":
                counts[impl] = class_counts(out)
                if impl == "duckdb":
                    duckdb_info = json.loads((ROOT / runs[impl][-1].log).read_text().strip().splitlines()[-1])
            if not args.keep_outputs:
                shutil.rmtree(out, ignore_errors=True)
        reference = next((counts[i] for i in counts if i.startswith("ns-data")), None)
        if reference is not None:
            for impl in counts:
                if impl != next(i for i in counts if i.startswith("ns-data")):
                    compared.append(f"{impl} @ {rows:,} ({columns})")
                    warnings += [f"@ {rows:,} rows ({columns}): {w}" for w in
                                 compare_counts(impl, counts[impl], reference, per_class)]
            sel = [n for n, _ in reference.values()]
            print(f"  classes: {len(sel)}, capped at {per_class:,}: {sum(n == per_class for n in sel)}, "
                  f"upsampled: {sum(n < per_class for n in sel)}; selected rows {sum(sel):,}", flush=True)

    env = environment() | duckdb_info
    table = markdown_table(summaries)
    rat = ratios(summaries, args.workers)
    print(f"\n## ns-data balance benchmark ({args.classes} classes, {args.files} files)\n")
    code = env["git"].get("commit", "?")[:10] + (" + uncommitted changes" if env["git"].get("ns_data_modified") else "")
    print(f"Machine: {env['cpus']} CPUs, {env['memory_gb']} GB RAM; Python {env['python']}; "
          f"DuckDB {env.get('duckdb_version', '-')} with {env.get('duckdb_threads', '-')} threads (its default); "
          f"ns-data on Beam {env['versions']['apache-beam']}'s local FnApiRunner; ns-data at {code}.\n")
    print(table + "\n")
    for name, value in rat.items():
        print(f"- {name}: {value:.2f}")
    print("\nNotes: wall time includes process start and imports (~2-3 s for Beam). Peak RSS is that of the "
          "whole process tree (max over repeats). DuckDB's hash() differs from ns-data's seeded hash: tied rows "
          "at a class's cut may differ, rows kept per class may not. ns-data also writes errors and stats.json.")
    for w in warnings:
        print(f"WARNING: {w}")
    if compared and not warnings:
        print("Check: rows selected per class agree with ns-data, and every class totals --per-class copies, "
              "for " + ", ".join(compared) + ".")
    elif not compared:
        print("WARNING: nothing was compared with ns-data (no pair of finished runs in one case).")

    RESULTS_FILE.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_FILE.write_text(json.dumps({
        "args": vars(args), "environment": env, "summaries": [asdict(s) for s in summaries], "ratios": rat,
        "warnings": warnings, "markdown": table}, indent=1))
    print(f"\nresults: {RESULTS_FILE.relative_to(ROOT)}")
    return 1 if warnings or any(s.status != "ok" and s.implementation != "elementwise" for s in summaries) else 0


def child(argv: list[str]) -> None:
    """`balance.py child {duckdb,elementwise} INPUT OUTPUT PER_CLASS MIN_CONFIDENCE`: one measured run."""
    kind, inp, out, per_class, min_conf = argv
    {"duckdb": run_duckdb, "elementwise": run_elementwise}[kind](inp, out, int(per_class), float(min_conf))


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        child(sys.argv[2:])
    else:
        sys.exit(main())
