"""Benchmark `ns-data label` against timm's own inference.py, and its decoding per core, exact and fast.

What it measures, with `tf_efficientnet_b0` on the CPU (seeded random weights with the classifier scaled so that
predictions vary by image, written once to a safetensors checkpoint that every tool loads; the speed does not
depend on the weights):

  (1) whole commands  on --sizes (default 50, 300, 1000) synthetic 500x375 JPEGs (ImageNet-like size), each run
      a child process timed from start to exit (imports, checking the teacher, building the pipeline and exit
      included), runs alternated in rounds (the first tool of a round rotates), medians of --repeats:
        ns-data     `ns-data label DIR --teacher tf_efficientnet_b0 --checkpoint W --batch-size 32`;
        timm        timm's `inference.py` from a checkout of its repository (--timm-repo; it is not in the pip
                    package), run with the installed timm (`python -P`): `--checkpoint W --device cpu
                    --channels-last -j 2 -b 32 --topk 10` (channels-last, 2 loader workers, ns-data's batch size);
        ns-data@ref only with --baseline-src DIR: the same command from another source tree (e.g. the code
                    before a change: `git archive COMMIT | tar -x -C DIR`), for before/after in one run.
      The ratio per size is timm's median over ns-data's. CPU time (user + system, children included) is
      reported beside wall time: it moves less when the machine is shared. The top-1 labels of the two tools
      are compared image by image (same weights, same transform: they should agree).
  (2) decode + preprocessing per core  on --decode-images synthetic photo-like JPEGs (smooth fields, pixel
      noise, shapes) at each of --decode-sizes (default 1024x768, 1600x1200, 2048x1536) and 500x375: image bytes
      in memory -> upright RGB -> timm's eval transform -> normalized tensor, one process per core all at once,
      one torch thread each, methods alternated; images/s per core (median of --repeats):
        before      Pillow decode + timm's transform, as ns-data did before (ns_data/images.py at 7072d0c);
        exact       ns_data.preprocess.Preprocessor: the same pixels bit for bit (the default);
        fast        Preprocessor(fast_decode=True): JPEG DCT-scaled decode (`ns-data label --fast-decode`).
  (3) what --fast-decode does to the labels  `ns-data label --probs` exact and fast on the --decode-sizes images:
      top-1 agreement, max and mean |probability difference|, mean |confidence difference|; and the whole
      command's wall time exact vs fast on the largest size.
  (4) the ceiling  the forward pass alone on tensors prepared beforehand, as ns-data runs the model.

    .venv/bin/python benchmarks/label.py --timm-repo TIMM_REPO         # about 25 minutes on 2 cores
    .venv/bin/python benchmarks/label.py --timm-repo TIMM_REPO --baseline-src /tmp/ns-ref --sizes 50 300
    (TIMM_REPO: a checkout of huggingface/pytorch-image-models)
    (/tmp/ns-ref: `git archive 7072d0c | tar -x -C /tmp/ns-ref`, the code before the Preprocessor)
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from balance import BIN, measure, save_results  # noqa: E402  (same folder: the child-process measuring helper)

DATA = HERE / "data"
RESULTS = HERE / "results" / "label.json"
MODEL = "tf_efficientnet_b0"
CONFIG = {"input_size": [3, 224, 224], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
          "std": [0.229, 0.224, 0.225], "crop_pct": 0.875, "crop_mode": "center"}  # timm's for MODEL
TIMM_FLAGS = ["--device", "cpu", "--channels-last", "-j", "2", "-b", "32", "--topk", "10"]


def images(n: int, width: int = 500, height: int = 375) -> Path:
    path = DATA / f"images-{n}-{width}x{height}"
    if not (path / "done").exists():
        subprocess.run([str(BIN / "ns-data"), "synth", "images", "--count", str(n), "--width", str(width),
                        "--height", str(height), "--output", str(path), "--overwrite"], check=True)
        (path / "done").write_text("")
    return path


def weights() -> Path:
    """Seeded random weights with the classifier scaled up, so that predictions depend on the image (with timm's
    initialization every image gets nearly the same, flat, softmax and agreement figures mean nothing)."""
    path = DATA / f"{MODEL}-random-sharp.safetensors"
    if not path.exists():
        import timm
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(0)
        model = timm.create_model(MODEL, pretrained=False)
        with torch.no_grad():
            model.get_classifier().weight.mul_(3e5)  # pooled features of a random b0 are ~1e-5
        DATA.mkdir(parents=True, exist_ok=True)
        save_file(model.state_dict(), str(path))
    return path


# ------------------------------------------------------------------------------------ (1) whole commands


def nsdata(inp: Path | list[Path], out: Path, *extra: str, src: Path | None = None) -> list[str]:
    inputs = [str(i) for i in (inp if isinstance(inp, list) else [inp])]
    args = ["label", *inputs, "--teacher", MODEL, "--checkpoint", str(weights()), "--output", str(out),
            "--batch-size", "32", "--overwrite", "--no-progress", *extra]
    if src is None:
        return [str(BIN / "ns-data"), *args]
    # Another source tree, run as the console script runs (python -P: the tree on PYTHONPATH comes first).
    return ["/usr/bin/env", f"PYTHONPATH={src}", sys.executable, "-P", "-c",
            "import sys; sys.argv[0] = 'ns-data'; from ns_data.cli import main; sys.exit(main())", *args]


def timm_cmd(repo: Path, inp: Path, out: Path) -> list[str]:
    # -P: not the checkout's own `timm/` beside inference.py, the installed one.
    return [sys.executable, "-P", str(repo / "inference.py"), str(inp), "--model", MODEL, "--checkpoint",
            str(weights()), *TIMM_FLAGS, "--include-index", "--label-type", "none", "--no-console-results",
            "--results-dir", str(out), "--results-file", "out", "--results-format", "parquet"]


def check_timm(repo: Path) -> dict:
    """inference.py from the checkout runs with the installed timm, on the same checkpoint."""
    import importlib.metadata

    script = repo / "inference.py"
    if not script.exists():
        raise SystemExit(f"--timm-repo {repo}: no inference.py there (a checkout of huggingface/"
                         "pytorch-image-models is needed; the pip package does not ship it)")
    version = subprocess.run([sys.executable, "-P", "-c", "import timm; print(timm.__version__, timm.__file__)"],
                             capture_output=True, text=True, cwd=str(repo), check=True).stdout.split()
    checkout = (repo / "timm" / "version.py").read_text().split("'")[1] if (repo / "timm" / "version.py").exists() \
        else None
    return {"inference_py": str(script), "checkout_version": checkout, "installed_timm": version[0],
            "installed_timm_path": version[1], "timm_dist": importlib.metadata.version("timm")}


def agreement_with_timm(ns_out: Path, timm_out: Path) -> dict:
    import pandas as pd
    import pyarrow.parquet as pq

    ns = pq.read_table(sorted(ns_out.glob("labels-*.parquet")), columns=["id", "label", "confidence"]).to_pandas()
    ns["filename"] = ns["id"].map(lambda i: Path(i).name)
    tm = pd.read_parquet(timm_out / "out.parquet").reset_index()
    tm["timm_label"] = tm["index"].map(lambda v: int(v[0]))
    tm["timm_confidence"] = tm["prob"].map(lambda v: float(v[0]))
    both = ns.merge(tm[["filename", "timm_label", "timm_confidence"]], on="filename")
    return {"images": len(both), "top1_agreement": float((both["label"] == both["timm_label"]).mean()),
            "max_abs_confidence_diff": float((both["confidence"] - both["timm_confidence"]).abs().max())}


def whole_commands(args, results: dict) -> None:
    tools = ["ns-data"] + (["timm"] if args.timm_repo else []) + (["ns-data@ref"] if args.baseline_src else [])
    logs = HERE / "results" / "logs"
    out = DATA / "label-out"
    runs: dict = {(t, n): [] for t in tools for n in args.sizes}
    for r in range(args.repeats):
        print(f"round {r + 1} of {args.repeats}", flush=True)
        for n in args.sizes:
            inp = images(n)
            order = tools[r % len(tools):] + tools[:r % len(tools)]
            for tool in order:
                target = out / f"{tool}-{n}"
                cmd = (timm_cmd(args.timm_repo, inp, target) if tool == "timm" else
                       nsdata(inp, target, src=args.baseline_src if tool == "ns-data@ref" else None))
                run = measure(tool, n, cmd, logs / f"label-{tool}-{n}-{r}.log", 12 * 1024, None)
                if run.status != "ok":
                    raise SystemExit(f"{tool} failed on {n} images: see {run.log}")
                runs[(tool, n)].append(run)
    table = {}
    for n in args.sizes:
        row = {}
        for tool in tools:
            rs = runs[(tool, n)]
            row[tool] = {"wall_s": statistics.median(r.wall_s for r in rs),
                         "cpu_s": statistics.median(r.cpu_s for r in rs),
                         "peak_rss_mb": max(r.tree_peak_mb for r in rs),
                         "walls": [round(r.wall_s, 2) for r in rs], "cpus": [round(r.cpu_s, 2) for r in rs]}
        for other in tools[1:]:
            row[f"{other} / ns-data"] = {
                "wall": row[other]["wall_s"] / row["ns-data"]["wall_s"],
                "cpu": row[other]["cpu_s"] / row["ns-data"]["cpu_s"],
                # per round (runs next to each other): the median of the paired ratios
                "wall_paired": statistics.median(a.wall_s / b.wall_s for a, b in zip(runs[(other, n)],
                                                                                      runs[("ns-data", n)]))}
        table[n] = row
    results["whole_commands"] = table
    if args.timm_repo:
        n = args.sizes[-1]
        results["ns-data vs timm labels"] = agreement_with_timm(out / f"ns-data-{n}", out / f"timm-{n}")


# --------------------------------------------------------------------- (2) decode + preprocessing per core


def decode_before(data: bytes, transform):
    """ns_data.images.decode_image as it was at 7072d0c (EXIF transpose by copy), then timm's transform."""
    import warnings

    from PIL import Image, ImageOps

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        img = Image.open(io.BytesIO(data))
        img.load()
        img = ImageOps.exif_transpose(img)
        if img.mode != "RGB":
            img = img.convert("RGB")
    return transform(img)


def child_decode(inp: str, method: str, part: int, parts: int, passes: int) -> dict:
    """One process of (2): its share of the images, decoded and preprocessed `passes` times on one thread."""
    import torch

    from ns_data.preprocess import Preprocessor, eval_transform

    torch.set_num_threads(1)
    files = sorted(Path(inp).glob("*.jpg"))[part::parts]
    blobs = [f.read_bytes() for f in files]
    if method == "before":
        transform = eval_transform(CONFIG)
        fn = lambda b: decode_before(b, transform)  # noqa: E731
    else:
        fn = Preprocessor(CONFIG, fast_decode=method == "fast")
    fn(blobs[0])  # warm-up
    start = time.perf_counter()
    for _ in range(passes):
        for b in blobs:
            fn(b)
    seconds = time.perf_counter() - start
    return {"images": passes * len(blobs), "seconds": seconds}


def decode_rates(args, results: dict) -> None:
    from ns_data.runner import local_cores

    cores = local_cores()
    sizes = [(500, 375)] + [tuple(int(v) for v in s.split("x")) for s in args.decode_sizes]
    methods = ("before", "exact", "fast")
    table: dict = {}
    for width, height in sizes:
        inp = images(args.decode_images, width, height)
        share = max(1, args.decode_images // cores)
        passes = max(1, round(100e6 / (width * height * share)))  # ~100 Mpixel per process: a few seconds
        rates: dict = {m: [] for m in methods}
        for r in range(args.repeats):
            for method in methods[r % 3:] + methods[:r % 3]:
                procs = [subprocess.Popen([sys.executable, __file__, "child", "decode", str(inp), method, str(i),
                                           str(cores), str(passes)], stdout=subprocess.PIPE, text=True)
                         for i in range(cores)]
                outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
                rates[method].append(statistics.mean(o["images"] / o["seconds"] for o in outs))
        row = {m: {"per_core_images_per_s": statistics.median(v), "runs": [round(x, 1) for x in v]}
               for m, v in rates.items()}
        row["exact / before"] = row["exact"]["per_core_images_per_s"] / row["before"]["per_core_images_per_s"]
        row["fast / before"] = row["fast"]["per_core_images_per_s"] / row["before"]["per_core_images_per_s"]
        table[f"{width}x{height}"] = row
        print(f"  decode {width}x{height}: " + ", ".join(f"{m} {row[m]['per_core_images_per_s']:.1f}"
                                                       for m in methods) + " images/s per core", flush=True)
    results["decode_per_core"] = {"cores": cores, "sizes": table}


# ---------------------------------------------------------------------------- (3) fast decode vs exact


def fast_vs_exact(args, results: dict) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    logs = HERE / "results" / "logs"
    dirs = [images(args.decode_images, *(int(v) for v in s.split("x"))) for s in args.decode_sizes]
    out = DATA / "label-out"
    walls: dict = {"exact": [], "fast": []}
    for r in range(args.repeats):
        for mode in ("exact", "fast") if r % 2 == 0 else ("fast", "exact"):
            extra = ["--probs"] + (["--fast-decode"] if mode == "fast" else [])
            run = measure(f"label {mode}", len(dirs) * args.decode_images,
                          nsdata(dirs[-1], out / f"big-{mode}", *extra), logs / f"label-big-{mode}-{r}.log",
                          12 * 1024, None)
            walls[mode].append(run.wall_s)
    for mode in ("exact", "fast"):  # every size, for the agreement
        extra = ["--probs"] + (["--fast-decode"] if mode == "fast" else [])
        subprocess.run(nsdata(dirs, out / f"all-{mode}", *extra), check=True, capture_output=True)

    def load(d):
        t = pq.read_table(sorted(d.glob("labels-*.parquet")), columns=["id", "label", "confidence", "probs"])
        t = t.sort_by("id")
        return t["id"].to_pylist(), t["label"].to_numpy(), t["confidence"].to_numpy(), np.stack(
            t["probs"].to_numpy(zero_copy_only=False))

    ids_e, label_e, conf_e, probs_e = load(out / "all-exact")
    ids_f, label_f, conf_f, probs_f = load(out / "all-fast")
    assert ids_e == ids_f
    diff = np.abs(probs_f - probs_e)
    margin = np.sort(probs_e, axis=1)[:, -1] - np.sort(probs_e, axis=1)[:, -2]
    meta = json.loads((out / "all-fast" / "stats.json").read_text())["teacher"]["decode"]
    results["fast_vs_exact"] = {
        "images": len(ids_e), "sizes": args.decode_sizes, "decode": meta,
        "top1_agreement": float((label_e == label_f).mean()),
        "max_abs_prob_diff": float(diff.max()), "mean_abs_prob_diff": float(diff.mean()),
        "mean_abs_confidence_diff": float(np.abs(conf_f - conf_e).mean()),
        "exact_median_confidence": float(np.median(conf_e)),
        "exact_top1_top2_margin_below_0.01": float((margin < 0.01).mean()),
        "top1_changed": int((label_e != label_f).sum()),
        "largest_exact_margin_where_top1_changed": float(margin[label_e != label_f].max(initial=0.0)),
        f"label_wall_s_{args.decode_sizes[-1]}": {m: statistics.median(v) for m, v in walls.items()},
        f"label_walls_{args.decode_sizes[-1]}": walls,
    }


# --------------------------------------------------------------------------------------- (4) ceiling


def child_ceiling(inp: str, batch: int) -> dict:
    """Forward passes alone on tensors prepared beforehand: the model as ns-data runs it."""
    import torch

    from ns_data.preprocess import Preprocessor
    from ns_data.teacher import TeacherSpec, build_model, resolve_preprocessing

    spec = TeacherSpec(model=MODEL, checkpoint=str(weights()))
    model = build_model(spec)
    prep = Preprocessor(resolve_preprocessing(spec, model))
    x = prep.batch([prep(p.read_bytes()) for p in sorted(Path(inp).glob("*.jpg"))])
    with torch.inference_mode():
        model(x[:batch])  # warm-up
        start = time.perf_counter()
        for i in range(0, len(x), batch):
            model(x[i: i + batch]).softmax(dim=1)
        rate = len(x) / (time.perf_counter() - start)
    return {"images": len(x), "threads": torch.get_num_threads(), "images_per_s": rate}


# ------------------------------------------------------------------------------------------ report


def markdown(args, results: dict) -> str:
    lines = []
    wc = results.get("whole_commands")
    if wc:
        tools = [t for t in next(iter(wc.values())) if "/" not in t]
        lines += [f"### Whole commands ({MODEL}, 500x375 JPEGs, batch 32, medians of {args.repeats}, alternated)", "",
                  "| images | " + " | ".join(f"{t} wall s (cpu s)" for t in tools) + " | "
                  + " | ".join(f"{t} / ns-data wall (paired)" for t in tools[1:]) + " |",
                  "|---:|" + "---:|" * (2 * len(tools) - 1)]
        for n, row in wc.items():
            lines.append(f"| {n} | " + " | ".join(f"{row[t]['wall_s']:.1f} ({row[t]['cpu_s']:.1f})" for t in tools)
                         + " | " + " | ".join(f"{row[f'{t} / ns-data']['wall']:.2f}x "
                                              f"({row[f'{t} / ns-data']['wall_paired']:.2f}x)" for t in tools[1:])
                         + " |")
        if "ns-data vs timm labels" in results:
            a = results["ns-data vs timm labels"]
            lines += ["", f"- ns-data and timm's inference.py agree on top-1 for {100 * a['top1_agreement']:.1f}% of "
                          f"{a['images']} images (max |confidence difference| {a['max_abs_confidence_diff']:.2g})"]
        if "ceiling" in results:
            lines.append(f"- forward alone (the ceiling): {results['ceiling']:.1f} images/s")
        lines.append("")
    dc = results.get("decode_per_core")
    if dc:
        lines += [f"### Decode + preprocessing, images/s per core ({dc['cores']} processes at once, 1 thread each, "
                  f"medians of {args.repeats})", "",
                  "| JPEG size | before | exact (default) | fast (--fast-decode) | exact / before | fast / before |",
                  "|---|---:|---:|---:|---:|---:|"]
        for size, row in dc["sizes"].items():
            lines.append(f"| {size} | {row['before']['per_core_images_per_s']:.1f} | "
                         f"{row['exact']['per_core_images_per_s']:.1f} | {row['fast']['per_core_images_per_s']:.1f}"
                         f" | {row['exact / before']:.2f}x | {row['fast / before']:.2f}x |")
        lines.append("")
    fe = results.get("fast_vs_exact")
    if fe:
        walls = fe[f"label_wall_s_{args.decode_sizes[-1]}"]
        lines += [f"### --fast-decode against the exact path ({fe['images']} JPEGs of "
                  f"{', '.join(fe['sizes'])})", "",
                  f"- top-1 agreement {100 * fe['top1_agreement']:.1f}%, max |probability difference| "
                  f"{fe['max_abs_prob_diff']:.4f}, mean {fe['mean_abs_prob_diff']:.2e}, mean |confidence "
                  f"difference| {fe['mean_abs_confidence_diff']:.4f} (exact median confidence "
                  f"{fe['exact_median_confidence']:.2f}; {100 * fe['exact_top1_top2_margin_below_0.01']:.0f}% of "
                  "images have top-1 and top-2 within 0.01)",
                  f"- top-1 changed for {fe['top1_changed']} images; the largest exact top-1 / top-2 margin among "
                  f"them: {fe['largest_exact_margin_where_top1_changed']:.4f}",
                  f"- `ns-data label` on the {args.decode_images} {args.decode_sizes[-1]} JPEGs: "
                  f"{walls['exact']:.1f} s exact, {walls['fast']:.1f} s with --fast-decode (medians)", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[50, 300, 1000])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timm-repo", type=Path, default=None,
                   help="a checkout of huggingface/pytorch-image-models (for its inference.py); without it the "
                        "comparison with timm is skipped")
    p.add_argument("--baseline-src", type=Path, default=None,
                   help="another ns-data source tree to run beside this one (before/after)")
    p.add_argument("--decode-sizes", nargs="+", default=["1024x768", "1600x1200", "2048x1536"])
    p.add_argument("--decode-images", type=int, default=48)
    p.add_argument("--parts", nargs="+", default=["commands", "decode", "fast", "ceiling"],
                   choices=["commands", "decode", "fast", "ceiling"])
    args = p.parse_args(argv)
    if args.timm_repo is not None and not (args.timm_repo / "inference.py").exists():
        print(f"--timm-repo {args.timm_repo}: no inference.py there; the comparison with timm is skipped")
        args.timm_repo = None
    elif args.timm_repo is None:
        print("no --timm-repo: the comparison with timm's inference.py is skipped (it lives in timm's repository, "
              "not in the pip package: give a checkout of huggingface/pytorch-image-models)")
    results: dict = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                     "load_before": os.getloadavg()}
    if args.timm_repo:
        results["timm"] = check_timm(args.timm_repo)
        print(f"timm's inference.py: {results['timm']}", flush=True)
    if "commands" in args.parts:
        whole_commands(args, results)
    if "ceiling" in args.parts:
        runs = [json.loads(subprocess.run([sys.executable, __file__, "child", "ceiling", str(images(max(args.sizes))),
                                           "32"], capture_output=True, text=True, check=True).stdout.strip()
                           .splitlines()[-1]) for _ in range(args.repeats)]
        results["ceiling"] = statistics.median(r["images_per_s"] for r in runs)
    if "decode" in args.parts:
        decode_rates(args, results)
    if "fast" in args.parts:
        fast_vs_exact(args, results)
    results["load_after"] = os.getloadavg()
    results["markdown"] = markdown(args, results)
    print("\n" + results["markdown"])
    save_results(RESULTS, results)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        kind = sys.argv[2]
        if kind == "decode":
            inp, method, part, parts, passes = sys.argv[3:8]
            print(json.dumps(child_decode(inp, method, int(part), int(parts), int(passes))))
        else:
            print(json.dumps(child_ceiling(sys.argv[3], int(sys.argv[4]))))
    else:
        sys.exit(main())
