"""Scale rehearsal: how a stage's launch, its Dataflow job and its object-store requests grow with the input.

Two measurements, both through the public entry points only (`pipelines.<stage>.run(argv)`, the `ns-data` CLI),
so the same script measures whatever the code is at the time:

1. **Launch** (`--sizes`, default 3000 30000; 1 input file is always added as the baseline). For each stage,
   synthetic inputs of N files under benchmarks/data/scale/ (git-ignored; built once, reused; each one small file
   hardlinked N times): N loose image files for `label`, N tar containers of 2 images for `label-tar`, a label
   output of N Parquet files for `balance` and a balance output of N selection files for `shard` (with the output's
   marker; --num-shards 2), and for `balance-plain` and `shard-plain` the same files as a directory of plain
   Parquet files (no marker: the launcher lists at most 1,000 of them). Each launch runs in a child process: `pipelines.<stage>.run(argv + Dataflow options +
   --dry_run=True)`, which translates the job as a real launch does (the options checked, every DoFn pickled into
   the pipeline proto) and stops before contacting anything. Printed: the pipeline proto's bytes (the job graph
   Dataflow is given: its steps and every pickled DoFn), the child's wall seconds (interpreter start, imports, the
   stage's checks and planning, the translation), its peak RSS (the kernel's rusage of the child), and the growth
   from the second smallest to the largest N.
2. **Object-store requests** (`--requests`, default 20 200 input files). Each stage runs on the local runner
   (`--direct_num_workers 1`) with its inputs and output on `gs://bucket/...` in a local GCS emulator
   (benchmarks/gcs_emulator.py: `gcp-storage-emulator` on 127.0.0.1, Beam's real GCS filesystem, every request
   counted). Inputs: N tar containers of 2 images for `label` (each container is a work unit); a label output
   of N files (`ns-data synth pseudo-labels`, 20 rows each) for `balance`; N selection files of 2 rows each,
   over 2N images in the bucket, for `shard` (--num-shards N/10). Printed: HTTP requests (a batch counts once)
   and operations (each item of a batch counts) for the whole command, per input file and per output file,
   split by phase: launch (before the pipeline runs), work, finalize (the fused stage holding the stage's
   `Finalize` step, which runs after every work unit: its input is their results) and after (the command's
   summary, once the pipeline has run).

    .venv/bin/python benchmarks/scale.py                     # about 20 minutes on 2 busy cores
    .venv/bin/python benchmarks/scale.py --sizes 3000 30000 300000 --requests 20 200
    .venv/bin/python benchmarks/scale.py --stages balance --sizes 3000 --requests   # launch only

Results go to benchmarks/results/scale.json. Needs the `gcp` extra and gcp-storage-emulator (the `test` and
`bench` extras), and for `label` the `label` extra (timm's test model with random weights: nothing downloaded).
"""
from __future__ import annotations

import argparse
import errno
import importlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "data" / "scale"
RESULTS = HERE / "results" / "scale.json"
sys.path.insert(0, str(HERE))
from gcs_emulator import AFTER, LAUNCH, CountingEmulator  # noqa: E402  (same folder)

STAGES = ("label", "balance", "shard")
CLASSES = 10
# What a Dataflow launch gives Beam (tests/test_dataflow.py's spelling); nothing is contacted in a dry run.
DATAFLOW = ["--runner=DataflowRunner", "--project=ns-data-scale", "--region=us-central1", "--job_name=ns-data-scale",
            "--temp_location=gs://ns-data-scale/tmp",
            "--sdk_container_image=us-central1-docker.pkg.dev/ns-data-scale/ns-data/ns-data-worker:0",
            "--experiments=use_runner_v2", "--dry_run=True"]
TEACHER = ["--teacher", "test_efficientnet", "--random-weights", "--num-classes", str(CLASSES)]
SELECTION_ROWS = 2  # rows per selection file


# ------------------------------------------------------------------------------------------------ inputs


def tiny_jpeg() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (120, 60, 30)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _linked(directory: Path, n: int, one: Path, name: str, marker: dict | None) -> Path:
    """`directory` holding `n` hardlinks of the file `one` named name.format(i) (and `marker` as stats.json), built
    once: a `.done` file says it is complete."""
    if (directory / ".done").exists():
        return directory
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    source = one
    for i in range(n):
        try:
            os.link(source, directory / name.format(i))
        except OSError as err:  # a file has at most 65,000 links (ext4): go on from a copy of it
            if err.errno != errno.EMLINK:
                raise
            source = directory / name.format(i)
            shutil.copyfile(one, source)
    if marker is not None:
        (directory / "stats.json").write_text(json.dumps(marker))
    (directory / ".done").write_text("")
    return directory


# Input folders are named with the same number of characters at every size, so that paths recorded in a job
# have the same length whatever N is.
def images(n: int, base: Path = DATA) -> Path:
    """`n` loose JPEG files (one tiny image, hardlinked)."""
    one = base / "one.jpg"
    if not one.exists():
        one.parent.mkdir(parents=True, exist_ok=True)
        one.write_bytes(tiny_jpeg())
    return _linked(base / f"images-{n:09d}", n, one, "img-{:07d}.jpg", None)


def labels(n: int, base: Path = DATA) -> Path:
    """A label output of `n` Parquet files: one file of `ns-data synth pseudo-labels`, hardlinked."""
    one = base / "labels-one"
    if not (one / "stats.json").exists():
        ns_data("synth", "pseudo-labels", "--output", str(one), "--rows", "64", "--files", "1", "--classes",
                str(CLASSES), "--overwrite")
    (data,) = sorted(one.glob("labels-*.parquet"))
    marker = json.loads((one / "stats.json").read_text())
    return _linked(base / f"labels-{n:09d}", n, data, "labels-{:07d}.parquet", marker)


def selection_table(sources: list[str], first: int):
    """A selection (what `balance` writes: id, source, offset, label, confidence, rank, copies) over `sources`,
    ids numbered from `first`."""
    import numpy as np
    import pyarrow as pa

    n = len(sources)
    return pa.table({
        "id": [f"img-{first + i:07d}" for i in range(n)], "source": sources,
        "offset": pa.array([None] * n, pa.int64()),
        "label": pa.array((np.arange(n) + first) % CLASSES, pa.int32()),
        "confidence": pa.array(np.full(n, 0.9), pa.float32()),
        "rank": pa.array(np.zeros(n), pa.int32()), "copies": pa.array(np.ones(n), pa.int32())})


def selection(n: int, base: Path = DATA) -> Path:
    """A balance output of `n` selection files, each the same rows over two of images(2)'s files."""
    import pyarrow.parquet as pq

    one = base / "selection-one.parquet"
    if not one.exists():
        pq.write_table(selection_table(sorted(str(p) for p in images(2, base).glob("img-*")), 0), one)
    rows = 2 * n  # images(2): two rows a file
    return _linked(base / f"selection-{n:09d}", n, one, "selection-{:05d}.parquet", selection_marker(rows))


def selection_marker(rows: int) -> dict:
    """What a balance output's stats.json says of its rows (shard's launcher reads its totals from it)."""
    return {"stage": "balance", "selected_rows": rows, "total_copies": rows, "input_rows": rows,
            "fingerprint": f"scale-{rows}"}


def plain_labels(n: int, base: Path = DATA) -> Path:
    """A directory of `n` plain Parquet files of pseudo-labels (labels(1)'s data file hardlinked, no marker): an
    input `balance` takes as a user's Parquet files, not as a label output."""
    (data,) = sorted(labels(1, base).glob("labels-*.parquet"))
    return _linked(base / f"plainlabels-{n:09d}", n, data, "part-{:07d}.parquet", None)


def plain_selection(n: int, base: Path = DATA) -> Path:
    """A directory of `n` plain Parquet selection files (selection(1)'s file hardlinked, no marker)."""
    (data,) = sorted(selection(1, base).glob("selection-*.parquet"))
    return _linked(base / f"plainselect-{n:09d}", n, data, "part-{:07d}.parquet", None)


def containers(n: int, base: Path = DATA) -> Path:
    """`n` webdataset-style tar containers of 2 tiny JPEGs each (one tar, hardlinked)."""
    one = base / "one.tar"
    if not one.exists():
        one.parent.mkdir(parents=True, exist_ok=True)
        one.write_bytes(container(0, 2))
    return _linked(base / f"containers-{n:09d}", n, one, "part-{:07d}.tar", None)


# The launches measured, by name: the stage, and its input of N files.
INPUTS = {"label": images, "label-tar": containers, "balance": labels, "shard": selection,
          "balance-plain": plain_labels, "shard-plain": plain_selection}
LAUNCHES = tuple(INPUTS)


def stage_of(launch: str) -> str:
    return launch.split("-")[0]


def ns_data(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "ns_data.cli", *args], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)


def stage_argv(stage: str, inp: str, out: str, shards: int = SELECTION_ROWS) -> list[str]:
    """The stage's command line over `inp` into `out` (`shards`: shard's --num-shards)."""
    common = ["--output", out, "--no-progress"]
    if stage == "label":
        return [inp, *common, *TEACHER]
    if stage == "balance":
        return [inp, *common, "--per-class", "20", "--num-classes", str(CLASSES)]
    return [inp, *common, "--num-shards", str(shards), "--num-classes", str(CLASSES)]


# ------------------------------------------------------------------------------------------ launch (dry run)


def dry_run(launch: str, n: int) -> dict:
    """Launches a stage over N input files (`launch`: a name of INPUTS) as a Dataflow dry run in a child process:
    job graph bytes, seconds, peak RSS."""
    stage = stage_of(launch)
    inp = INPUTS[launch](n)
    out = DATA / "out" / stage
    shutil.rmtree(out, ignore_errors=True)
    result = DATA / "out" / f"{stage}-{n}.json"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-dry-run", stage, str(result), "--",
           *stage_argv(stage, str(inp), str(out))]
    began = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not result.exists():
        raise RuntimeError(f"{stage} dry run over {n} files failed ({proc.returncode}):\n"
                           f"{output.decode(errors='replace')[-3000:]}")
    sizes = json.loads(result.read_text())
    shutil.rmtree(out, ignore_errors=True)
    return {"stage": launch, "files": n, **sizes, "seconds": round(seconds, 2),
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}  # ru_maxrss: KiB on Linux


def child_dry_run(stage: str, result: str, argv: list[str]) -> None:
    """In the child: the stage's entry point with Dataflow's options and --dry_run; DataflowRunner's translated
    job is measured as it returns."""
    from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

    translate = DataflowRunner.run_pipeline

    def measured(runner, pipeline, options, pipeline_proto=None):
        out = translate(runner, pipeline, options, pipeline_proto)
        job = out.job
        Path(result).write_text(json.dumps({"graph_bytes": len(job.proto_pipeline.SerializeToString())}))
        return out

    DataflowRunner.run_pipeline = measured
    importlib.import_module(f"pipelines.{stage}").run(argv + DATAFLOW)


# ----------------------------------------------------------------------------------- requests (GCS emulator)


def container(index: int, count: int) -> bytes:
    """A webdataset-style tar of `count` tiny JPEGs."""
    import tarfile

    jpeg, buf = tiny_jpeg(), io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(count):
            info = tarfile.TarInfo(f"{index:07d}-{i}.jpg")
            info.size = len(jpeg)
            tar.addfile(info, io.BytesIO(jpeg))
    return buf.getvalue()


def upload(path: str, data: bytes) -> None:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.create(path) as f:
        f.write(data)


def requests_run(stage: str, n: int, shards: int | None = None) -> dict:
    """Runs `stage` over N input files on gs://bucket in a fresh emulator (shard: into `shards` shards, default
    N / 10); the requests it made, by phase."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from ns_data import cli

    with CountingEmulator("bucket") as emu:
        # The inputs, uploaded before counting starts.
        if stage == "label":
            for i in range(n):
                upload(f"gs://bucket/in/part-{i:07d}.tar", container(i, SELECTION_ROWS))
        elif stage == "balance":
            cli.main.main(["synth", "pseudo-labels", "--output", "gs://bucket/in", "--rows", str(20 * n), "--files",
                           str(n), "--classes", str(CLASSES)], prog_name="ns-data", standalone_mode=False)
        else:
            jpeg = tiny_jpeg()
            for i in range(SELECTION_ROWS * n):
                upload(f"gs://bucket/images/img-{i:07d}.jpg", jpeg)
            for f in range(n):
                first = f * SELECTION_ROWS
                table = selection_table([f"gs://bucket/images/img-{i:07d}.jpg"
                                         for i in range(first, first + SELECTION_ROWS)], first)
                buf = pa.BufferOutputStream()
                pq.write_table(table, buf)
                upload(f"gs://bucket/in/selection-{f:05d}.parquet", buf.getvalue().to_pybytes())
            upload("gs://bucket/in/stats.json", json.dumps(selection_marker(SELECTION_ROWS * n)).encode())
        emu.reset()
        began = time.perf_counter()
        argv = stage_argv(stage, "gs://bucket/in", "gs://bucket/out", shards or max(1, n // 10))
        cli.main.main([stage, *argv, "--direct_num_workers", "1"], prog_name="ns-data", standalone_mode=False)
        seconds = time.perf_counter() - began
        made = list(emu.requests)
        outputs = [m.path for m in FileSystems.match(["gs://bucket/out/*"])[0].metadata_list]
    groups = {group: [r for r in made if phase_group(r.phase) == group] for group in PHASE_GROUPS}
    return {"stage": stage, "input_files": n, "output_files": len(outputs), "seconds": round(seconds, 2),
            "whole": summary(emu, made), **{group: summary(emu, rs) for group, rs in groups.items()},
            "phases": sorted({r.phase for r in made}, key=[r.phase for r in made].index)}


PHASE_GROUPS = ("launch", "work", "finalize", "after")


def phase_group(phase: str) -> str:
    """launch (before the pipeline runs), finalize (the fused stage holding the `Finalize` step), after (the
    command once the pipeline has run), or work (every other fused stage)."""
    if phase in (LAUNCH, AFTER):
        return phase
    return "finalize" if "Finalize" in phase else "work"


def summary(emu: CountingEmulator, made) -> dict:
    http = emu.counts(made)
    ops = emu.counts(made, items=True)
    return {"requests": sum(http.values()), "operations": sum(ops.values()), "by_kind": ops}


# ------------------------------------------------------------------------------------------------- report


def growth(small: float, large: float) -> str:
    return f"{large / small:.2f}x" if small else "-"


def print_launches(rows: list[dict]) -> None:
    print("\n## Launch (Dataflow dry run, child process)\n")
    print("| stage | input files | graph bytes | launch s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['stage']} | {r['files']:,} | {r['graph_bytes']:,} | {r['seconds']:.1f} "
              f"| {r['peak_rss_mb']:.0f} |")
    print()
    for launch in LAUNCHES:
        mine = sorted((r for r in rows if r["stage"] == launch), key=lambda r: r["files"])
        if len(mine) < 2:
            continue
        a, b = (mine[1] if len(mine) > 2 else mine[0]), mine[-1]
        per_file = (b["graph_bytes"] - a["graph_bytes"]) / (b["files"] - a["files"])
        print(f"- {launch}: {a['files']:,} -> {b['files']:,} files: graph {growth(a['graph_bytes'], b['graph_bytes'])} "
              f"({per_file:,.1f} bytes per file), launch {growth(a['seconds'], b['seconds'])} "
              f"({(b['seconds'] - a['seconds']) / (b['files'] - a['files']) * 1000:.3f} ms per file), peak RSS "
              f"{growth(a['peak_rss_mb'], b['peak_rss_mb'])} "
              f"({(b['peak_rss_mb'] - a['peak_rss_mb']) * 1024 / (b['files'] - a['files']):.2f} KiB per file)")


def print_requests(rows: list[dict]) -> None:
    print("\n## Object-store requests (local runner, GCS emulator)\n")
    print("| stage | input files | output files | requests | per input file | per output file | operations "
          "| launch | work | finalize | after | finalize per output file |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        w = r["whole"]
        print(f"| {r['stage']} | {r['input_files']} | {r['output_files']} | {w['requests']} "
              f"| {w['requests'] / r['input_files']:.1f} | {w['requests'] / r['output_files']:.1f} "
              f"| {w['operations']} | " + " | ".join(str(r[g]["requests"]) for g in PHASE_GROUPS)
              + f" | {r['finalize']['requests'] / r['output_files']:.1f} |")
    print()
    for r in rows:
        print(f"- {r['stage']} over {r['input_files']} files, operations by kind: {r['whole']['by_kind']}; "
              f"in finalize: {r['finalize']['by_kind']}")
    for stage in STAGES:
        mine = sorted((r for r in rows if r["stage"] == stage), key=lambda r: r["input_files"])
        if len(mine) < 2:
            continue
        a, b = mine[0], mine[-1]
        d_in, d_out = b["input_files"] - a["input_files"], b["output_files"] - a["output_files"]
        print(f"- {stage}: {a['input_files']} -> {b['input_files']} input files: "
              f"{(b['whole']['requests'] - a['whole']['requests']) / d_in:.1f} more requests per input file; "
              f"finalize {a['finalize']['requests']} -> {b['finalize']['requests']}"
              + (f", {(b['finalize']['requests'] - a['finalize']['requests']) / d_out:.1f} more per output file"
                 if d_out else ""))


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stages", nargs="+", choices=LAUNCHES, default=list(LAUNCHES),
                   help="label-tar: label's launch over tar containers (the requests runs take label's inputs as "
                        "containers anyway)")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--sizes", nargs="*", type=int, default=[3000, 30000],
                   help="input files per launch (1 is always added as the baseline); none: skip launches")
    p.add_argument("--requests", nargs="*", type=int, default=[20, 200],
                   help="input files per emulated run; none: skip them")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    results: dict = {"commit": _commit(), "launches": [], "requests": []}
    if args.sizes:
        for launch in args.stages:
            for n in sorted({1, *args.sizes}):
                results["launches"].append(dry_run(launch, n))
                print(json.dumps(results["launches"][-1]), flush=True)
        print_launches(results["launches"])
    for stage in [s for s in args.stages if s in STAGES]:
        for n in args.requests:
            results["requests"].append(requests_run(stage, n))
    if results["requests"]:
        print_requests(results["requests"])
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1))
    print(f"\n{args.results}")
    return 0


def _commit() -> str:
    out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    return out.stdout.strip()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child-dry-run"]:
        child_dry_run(sys.argv[2], sys.argv[3], sys.argv[5:])
    else:
        sys.exit(main())
