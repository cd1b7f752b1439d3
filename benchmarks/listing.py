"""What `label`'s listing step holds as the number of input files grows: peak memory of the process that lists.

    python -m benchmarks.listing --local 30000 300000 --gcs 3000 30000 [--dir /tmp/ns-data-listing] [--repo PATH]

For each N a tree of N empty `.jpg` files (100 directories of 10 sub-directories) is made once locally, and N
objects of the same names are put in a local GCS emulator (benchmarks/gcs_emulator.py, pages of 1,000 as GCS
serves them). A fresh process then runs the listing's DoFn calls one after the other, as the workers would: the
whole-pattern call (`list_input`, one call per pattern) where `--repo` points at a version that has it, else
`sources.listing.ListInputs`' calls (`list_branch`: two split levels, then a walk of each branch found; the
branches handed on are kept in a list, as the pipeline keeps them in a PCollection). It reports the number of
calls (elements listed in parallel), the most files one call listed, the peak of what the listing allocated
(tracemalloc, from the first call on; the storage client's modules imported before) and the process's peak RSS
(VmHWM).
The emulator runs in this process, the listing in the child. `--repo` (default: this checkout) chooses the code
measured, e.g. a copy of an earlier commit.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = r"""
import json, sys, time, tracemalloc
pattern = sys.argv[1]


def peak_rss_kb():  # this process's own (getrusage's ru_maxrss keeps the forking parent's across exec)
    return int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM")).split()[1])


if pattern.startswith("gs://"):
    from apache_beam.internal.gcp import auth  # the emulator needs no credentials: an anonymous client at once
    auth._Credentials._credentials_init, auth._Credentials._credentials = True, None
    from apache_beam.io.gcp import gcsfilesystem, gcsio  # noqa: F401  (imported before the measurement)
try:
    from ns_data.sources.listing import Branch, InputPattern, list_branch, SPLIT_LEVELS
except ImportError:
    Branch = None
    from ns_data.sources import InputPattern, list_input
import apache_beam  # noqa: F401  (imported before the baseline)
tracemalloc.start()
t0 = time.perf_counter()
files, calls, most = 0, 0, 0
if Branch is None:
    files = most = sum(1 for _ in list_input(InputPattern(0, pattern), "auto"))
    calls = 1
else:
    branches = [Branch(InputPattern(0, pattern))]
    for level in range(SPLIT_LEVELS + 1):
        handed_on = []
        for branch in branches:
            n = 0
            for out in list_branch(branch, "auto", split=level < SPLIT_LEVELS):
                if hasattr(out, "tag"):
                    handed_on.append(out.value)
                else:
                    n += 1
            files, calls, most = files + n, calls + 1, max(most, n)
        branches = handed_on
seconds = time.perf_counter() - t0
listing = tracemalloc.get_traced_memory()[1]
print(json.dumps({"files": files, "calls": calls, "most_in_one_call": most, "seconds": seconds,
                  "listing_mb": listing / 2**20, "peak_rss_mb": peak_rss_kb() / 1024}))
"""


def names(n: int) -> list[str]:
    return [f"d{i % 100:02d}/e{i // 100 % 10}/f{i:07d}.jpg" for i in range(n)]


def make_tree(root: str, n: int) -> str:
    folder = os.path.join(root, f"local-{n}")
    if not os.path.exists(os.path.join(folder, ".done")):
        for name in names(n):
            path = os.path.join(folder, "in", name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            open(path, "wb").close()
        open(os.path.join(folder, ".done"), "w").close()
    return os.path.join(folder, "in")


def measure(pattern: str, repo: str, env: dict | None = None) -> dict:
    env = {**os.environ, **(env or {}), "PYTHONPATH": repo}
    run = subprocess.run([sys.executable, "-c", CHILD, pattern], capture_output=True, text=True, env=env, cwd=repo)
    if run.returncode:
        raise SystemExit(run.stderr[-3000:])
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--local", type=int, nargs="*", default=[])
    parser.add_argument("--gcs", type=int, nargs="*", default=[])
    parser.add_argument("--dir", default="/tmp/ns-data-listing")
    parser.add_argument("--repo", default=REPO)
    args = parser.parse_args()
    rows = []
    for n in args.local:
        folder = make_tree(args.dir, n)
        rows.append(("local", n, measure(f"{folder}/**", args.repo)))
    if args.gcs:
        sys.path.insert(0, os.path.join(REPO, "benchmarks"))
        from gcs_emulator import CountingEmulator

        for n in args.gcs:
            with CountingEmulator("bucket") as emu:
                emu.put([f"in/{name}" for name in names(n)], size=0)
                emu.reset()
                result = measure("gs://bucket/in/**", args.repo, {"STORAGE_EMULATOR_HOST": emu.endpoint,
                                                                  "GOOGLE_CLOUD_PROJECT": "emulated"})
                result["list_requests"] = emu.counts().get("objects.list", 0)
            rows.append(("gcs", n, result))
    print("| where | files | listing calls | most files in one call | seconds | listing's peak | process peak RSS "
          "| list requests |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for where, n, r in rows:
        assert r["files"] == n, (where, n, r)
        print(f"| {where} | {n:,} | {r['calls']:,} | {r['most_in_one_call']:,} | {r['seconds']:.1f} | "
              f"{r['listing_mb'] * 1024:,.0f} KB | {r['peak_rss_mb']:.0f} MB | {r.get('list_requests', '')} |")
    sys.stdout.flush()


if __name__ == "__main__":
    started = time.time()
    main()
    print(f"({time.time() - started:.0f} s)", file=sys.stderr)
