"""What launching `label` on Dataflow costs as the number of input files grows: job-graph bytes, launcher seconds,
peak memory.

    python -m benchmarks.label_launch 1 3000 30000 [--dir /tmp/label-launch]

For each N, a folder of N tiny JPEG files (hard links of a few copies of one file) is made once, then `pipelines.label.run` is
called in a fresh process with Beam's Dataflow runner and `--dry_run`: the job is translated, never submitted
(nothing is contacted: the project, bucket and image are fake). Printed per N: the job's JSON request (what
Dataflow's 10 MB limit applies to) and pipeline proto sizes, the seconds from the call to the translated job,
and the process's peak RSS.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys

DATAFLOW = ["--runner=DataflowRunner", "--project=ns-data-bench", "--region=us-central1",
            "--job_name=ns-data-label-launch", "--temp_location=gs://ns-data-bench/tmp",
            "--sdk_container_image=example.com/ns-data-worker:bench", "--experiments=use_runner_v2", "--dry_run=True"]

CHILD = r"""
import json, resource, sys, time
from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

jobs = []
translate = DataflowRunner.run_pipeline


class Translated(Exception):
    pass


def translate_only(runner, pipeline, options, pipeline_proto=None):
    jobs.append((translate(runner, pipeline, options, pipeline_proto), time.perf_counter()))
    raise Translated


DataflowRunner.run_pipeline = translate_only
from pipelines import label

argv = json.loads(sys.argv[1])
start = time.perf_counter()
try:
    label.run(argv)
except Translated:
    pass
(result, done), = jobs
print(json.dumps({"job_json_bytes": len(result.job.json()),
                  "proto_bytes": len(result.job.proto_pipeline.SerializeToString()),
                  "launch_s": round(done - start, 2),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}))
"""


def make_files(directory: str, n: int) -> str:
    folder = os.path.join(directory, f"files-{n}")
    done = os.path.join(directory, f"files-{n}.done")
    if os.path.exists(done):
        return folder
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    one = os.path.join(directory, "one.jpg")
    if not os.path.exists(one):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (120, 30, 200)).save(buf, "JPEG")
        with open(one, "wb") as f:
            f.write(buf.getvalue())
    for i in range(n):  # 1,000 files a folder, as a crawl would store them
        sub = os.path.join(folder, f"{i // 1000:04d}")
        if i % 1000 == 0:
            os.makedirs(sub, exist_ok=True)
        path = os.path.join(sub, f"img-{i:07d}.jpg")
        source = f"{one}.{i // 50_000}"  # a file system allows some 65,000 links to one file
        if not os.path.exists(source):
            with open(one, "rb") as f, open(source, "wb") as g:
                g.write(f.read())
        if not os.path.exists(path):
            os.link(source, path)
    open(done, "w").close()
    return folder


def measure(folder: str, output: str) -> dict:
    argv = [folder, "--output", output, "--teacher", "test_efficientnet", "--random-weights", "--num-classes", "10",
            "--overwrite", "--no-progress"] + DATAFLOW
    out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(argv)], capture_output=True, text=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if out.returncode != 0:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("counts", nargs="+", type=int)
    parser.add_argument("--dir", default="/tmp/ns-data-label-launch")
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    print(f"{'files':>9} {'job JSON':>12} {'proto':>12} {'launch s':>9} {'peak RSS MB':>12}")
    for n in args.counts:
        folder = make_files(args.dir, n)
        r = measure(folder, os.path.join(args.dir, f"out-{n}"))
        print(f"{n:>9,} {r['job_json_bytes']:>12,} {r['proto_bytes']:>12,} {r['launch_s']:>9.2f} "
              f"{r['peak_rss_mb']:>12,.1f}", flush=True)


if __name__ == "__main__":
    main()
