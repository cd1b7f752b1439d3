"""Benchmark `ns-data shard` against a plain sequential copy of the same bytes on the same disk (the ceiling).

Input: --images (default 3000) synthetic 500x375 JPEGs (ImageNet-like size), in two layouts - standalone files,
and 8 webdataset-style tar containers - and a selection of every image with 1-3 copies (about 2 records per
image, as upsampling gives). Every run is a child process; medians of --repeats runs, interleaved.

  (a) ns-data  `ns-data shard SELECTION --num-shards 16 --num-classes 100` on the in-process runner, with its
               default local shuffle through spill files, and with `--shuffle beam` (what Dataflow runs);
  (b) ceiling  a plain Python loop that reads every selected image from its source in source order and
               appends its bytes, once per copy, to one output file: the least I/O `shard` has to do, with
               nothing else (no shuffle, no tf.Example, no CRCs).

Both are reported as MB/s of image bytes written (records x image size), the same numerator for both, for the
whole command at 2N images (including interpreter start-up, imports and building the Beam pipeline) and as the
marginal rate between N and 2N images, (bytes(2N) - bytes(N)) / (wall(2N) - wall(N)), which removes fixed
start-up costs. The page cache is warm for all (the machine is shared; caches are not dropped).

    .venv/bin/python benchmarks/shard.py        # about 8 minutes on 2 cores
    .venv/bin/python benchmarks/shard.py --memory-records 1000000   # peak memory at a million records
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from balance import BIN, measure, save_results  # noqa: E402  (same folder: the child-process measuring helper)

DATA = HERE / "data"
RESULTS = HERE / "results" / "shard.json"
CONTAINERS = 8


def corpus(n: int) -> dict[str, Path]:
    """The images as files and as tars, and a selection over each layout (same images, same copies)."""
    base = DATA / f"shard-{n}"
    if (base / "done").exists():
        return {"files": base / "sel-files", "tar": base / "sel-tar"}
    files = base / "files"
    subprocess.run([str(BIN / "ns-data"), "synth", "images", "--count", str(n), "--width", "500", "--height", "375",
                    "--output", str(files), "--overwrite"], check=True)
    paths = sorted(str(p) for p in files.glob("img-*"))  # the images, not synth's marker
    rng = np.random.default_rng(0)
    copies = rng.integers(1, 4, n).astype(np.int32)
    rows = {"files": [(os.path.relpath(p, files), p, None) for p in paths], "tar": []}
    for c, chunk in enumerate(np.array_split(np.arange(n), CONTAINERS)):
        tar_path = base / f"part-{c:02d}.tar"
        with tarfile.open(tar_path, "w") as tar:
            for i in chunk:
                data = Path(paths[i]).read_bytes()
                info = tarfile.TarInfo(f"{i:06d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with tarfile.open(tar_path) as tar:
            rows["tar"] += [(f"{tar_path.name}/{m.name}", str(tar_path), m.offset_data) for m in tar]
    for layout, layout_rows in rows.items():
        sel = base / f"sel-{layout}"
        sel.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({
            "id": [r[0] for r in layout_rows], "source": [r[1] for r in layout_rows],
            "offset": pa.array([r[2] for r in layout_rows], pa.int64()),
            "label": pa.array(rng.integers(0, 100, n), pa.int32()),
            "confidence": pa.array(rng.uniform(0.3, 1, n), pa.float32()),
            "rank": pa.array(np.zeros(n), pa.int32()), "copies": pa.array(copies)}),
            sel / "selection-00000.parquet")
        (sel / "stats.json").write_text('{"stage": "balance"}')  # the marker of a complete balance output
    (base / "done").write_text("")
    return {"files": base / "sel-files", "tar": base / "sel-tar"}


def tiny_corpus(records: int) -> Path:
    """For the memory check: `records` / 2 copies of one small JPEG in 8 tars, each selected with 2 copies."""
    from PIL import Image

    n = records // 2
    base = DATA / f"shard-tiny-{records}"
    if (base / "done").exists():
        return base / "sel"
    base.mkdir(parents=True, exist_ok=True)
    jpeg = io.BytesIO()
    Image.new("RGB", (32, 24), (120, 60, 30)).save(jpeg, "JPEG")
    data = jpeg.getvalue()
    ids, sources, offsets = [], [], []
    for c, chunk in enumerate(np.array_split(np.arange(n), CONTAINERS)):
        tar_path = base / f"part-{c:02d}.tar"
        with tarfile.open(tar_path, "w") as tar:
            for i in chunk:
                info = tarfile.TarInfo(f"{i:07d}.jpg")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        with tarfile.open(tar_path) as tar:
            for m in tar:
                ids.append(f"{tar_path.name}/{m.name}")
                sources.append(str(tar_path))
                offsets.append(m.offset_data)
    rng = np.random.default_rng(0)
    sel = base / "sel"
    sel.mkdir(exist_ok=True)
    pq.write_table(pa.table({
        "id": ids, "source": sources, "offset": pa.array(offsets, pa.int64()),
        "label": pa.array(rng.integers(0, 100, n), pa.int32()),
        "confidence": pa.array(rng.uniform(0.3, 1, n), pa.float32()),
        "rank": pa.array(np.zeros(n), pa.int32()), "copies": pa.array(np.full(n, 2, np.int32))}),
        sel / "selection-00000.parquet", row_group_size=50_000)
    (sel / "stats.json").write_text('{"stage": "balance"}')
    (base / "done").write_text("")
    return sel


def memory_check(records: int, workers: list[int]) -> dict:
    """Peak RSS of the whole process tree of `ns-data shard` over `records` records, per number of workers."""
    sel = tiny_corpus(records)
    out = DATA / "shard-out"
    result = {}
    for w in workers:
        o = out / f"tiny-{records}-{w}w"
        run = measure(f"ns-data {w}w", records, [str(BIN / "ns-data"), "shard", str(sel), "--output", str(o),
                                                  "--num-shards", "64", "--num-classes", "100", "--overwrite",
                                                  "--no-progress", "--direct_num_workers", str(w)],
                      out / f"tiny-{records}-{w}w.log", 12000, 3600)
        result[f"{w}w"] = {"wall_s": round(run.wall_s, 1), "cpu_s": round(run.cpu_s, 1),
                           "peak_tree_rss_mb": round(run.tree_peak_mb),
                           "status": run.status}
    return result


def child_copy(selection: str, output: str) -> None:
    """(b) the ceiling: read each selected image in source order, append its bytes once per copy."""
    from ns_data.sources import read_back

    table = pq.read_table(selection).sort_by([("source", "ascending"), ("offset", "ascending")]).to_pylist()
    written = 0
    with open(output, "wb") as out:
        i = 0
        while i < len(table):
            j = i
            while j < len(table) and table[j]["source"] == table[i]["source"]:
                j += 1
            for row, (data, _, _) in zip(table[i:j], read_back(table[i]["source"], [r["offset"] for r in table[i:j]])):
                for _ in range(row["copies"]):
                    out.write(data)
                    written += len(data)
            i = j
    print(json.dumps({"image_bytes": written}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--memory-records", type=int, default=0,
                        help="instead: peak memory of `ns-data shard` over this many records of tiny images "
                             "(e.g. 1000000), with 1 and 2 worker processes")
    args = parser.parse_args(argv)
    if args.memory_records:
        result = memory_check(args.memory_records, [1, 2])
        save_results(RESULTS.with_name("shard-memory.json"), result)
        return 0
    sizes = (args.images, 2 * args.images)
    out = DATA / "shard-out"
    results = {"images": list(sizes), "layouts": {}}
    commands = {
        "ns-data": lambda sel, o: [str(BIN / "ns-data"), "shard", str(sel), "--output", str(o), "--num-shards", "16",
                                   "--num-classes", "100", "--overwrite", "--no-progress"],
        "ns-data beam": lambda sel, o: commands["ns-data"](sel, o) + ["--shuffle", "beam"],
        "ceiling": lambda sel, o: [sys.executable, __file__, "child", str(sel / "selection-00000.parquet"),
                                   str(o) + ".bin"],
    }
    for layout in ("tar", "files"):
        summary = results["layouts"][layout] = {}
        for n in sizes:
            sel = corpus(n)[layout]
            print(f"{layout}: {n:,} images, selection {sel}", flush=True)
            runs = {k: [] for k in commands}
            for r in range(args.repeats):
                for impl, command in commands.items():
                    runs[impl].append(measure(impl, n, command(sel, out / f"{layout}-{n}-{impl.replace(' ', '-')}"),
                                              out / f"{layout}-{n}-{impl.replace(' ', '-')}-{r}.log", 6000, 900))
            log = out / f"{layout}-{n}-ceiling-0.log"
            summary[n] = {
                "image_bytes": json.loads(log.read_text().strip().splitlines()[-1])["image_bytes"],
                "wall_s": {k: [round(x.wall_s, 2) for x in v] for k, v in runs.items()},
                "median_wall_s": {k: round(statistics.median(x.wall_s for x in v), 2) for k, v in runs.items()},
                "peak_rss_mb": {k: round(max(x.tree_peak_mb for x in v))
                                for k, v in runs.items()}}
        small, large = summary[sizes[0]], summary[sizes[1]]
        whole = {k: large["image_bytes"] / 1e6 / large["median_wall_s"][k] for k in commands}
        marginal = {k: (large["image_bytes"] - small["image_bytes"]) / 1e6
                    / (large["median_wall_s"][k] - small["median_wall_s"][k]) for k in commands}
        summary["mb_per_s_whole_command"] = {k: round(v, 1) for k, v in whole.items()}
        summary["mb_per_s_marginal"] = {k: round(v, 1) for k, v in marginal.items()}
        for name, rate in (("whole command", whole), ("marginal", marginal)):
            print(f"  {layout} {name}: " + ", ".join(
                f"{k} {v:.1f} MB/s ({v / rate['ceiling']:.0%} of ceiling)" for k, v in rate.items()), flush=True)
    save_results(RESULTS, results)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "child":
        child_copy(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
