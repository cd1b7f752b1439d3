"""Benchmark `ns-data label` against a plain timm inference loop and against the model's forward pass alone.

What it measures, on --images (default 500) synthetic 500x375 JPEGs (ImageNet-like size) and the same number
again, with `tf_efficientnet_b0` (seeded random weights, classifier scaled so that predictions vary by image; the speed
does not depend on the weights) on the CPU, every run in
its own child process at the same torch thread count:

  (a) ns-data     `ns-data label DIR --teacher tf_efficientnet_b0 --random-weights --batch-size B`, fp32 and bf16.
                  Its throughput is marginal: (2N - N) / (wall(2N) - wall(N)), which removes the fixed start-up
                  (imports, checking the teacher, building the pipeline); the whole-command rate is reported too;
  (b) plain timm  a torch DataLoader (num_workers=0) over the files with timm's eval transform and the model as
                  timm creates it, under torch.no_grad() - what a user would write first; timed over the loop;
  (c) ceiling     the forward pass alone on ready tensors, the model as ns-data runs it (eval, channels-last,
                  inference mode), same batch size; and the NCHW forward for reference.

bf16 is compared with fp32 by top-1 agreement on the same images; random weights are no trained teacher, so
the figure is indicative only. Peak RSS is each child's own.

    .venv/bin/python benchmarks/label.py            # about 5 minutes on 2 cores
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from balance import BIN, measure, save_results  # noqa: E402  (same folder: the child-process measuring helper)

DATA = HERE / "data"
RESULTS = HERE / "results" / "label.json"
MODEL = "tf_efficientnet_b0"


def images(n: int) -> Path:
    path = DATA / f"images-{n}-500x375"
    if not (path / "done").exists():
        subprocess.run([str(BIN / "ns-data"), "synth", "images", "--count", str(n), "--width", "500", "--height",
                        "375", "--output", str(path), "--overwrite"], check=True)
        (path / "done").write_text("")
    return path


def weights() -> Path:
    """Seeded random weights with the classifier scaled up, so that predictions depend on the image (with timm's
    initialization every image gets nearly the same, flat, softmax and bf16 vs fp32 agreement means nothing)."""
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


def nsdata(inp: Path, out: Path, batch: int, precision: str) -> list[str]:
    return [str(BIN / "ns-data"), "label", str(inp), "--teacher", MODEL, "--checkpoint", str(weights()),
            "--output", str(out), "--batch-size", str(batch), "--precision", precision, "--overwrite",
            "--no-progress"]


def child_plain(inp: str, batch: int) -> dict:
    """(b) the loop a user would write first, timed from its first batch to its last."""
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from timm.data import create_transform, resolve_data_config

    model = timm.create_model(MODEL, pretrained=False)
    model.load_state_dict(load_file(str(weights())))
    model.eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    files = sorted(str(p) for p in Path(inp).glob("*.jpg"))

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return transform(Image.open(files[i]).convert("RGB"))

    start = time.perf_counter()
    with torch.no_grad():
        for x in torch.utils.data.DataLoader(Files(), batch_size=batch, num_workers=0):
            model(x).softmax(dim=1)
    seconds = time.perf_counter() - start
    return {"images": len(files), "seconds": seconds, "threads": torch.get_num_threads()}


def child_ceiling(inp: str, batch: int) -> dict:
    """(c) forward passes alone on tensors prepared beforehand: the model as ns-data runs it, and plain NCHW."""
    import torch
    from PIL import Image

    from ns_data.teacher import TeacherSpec, build_model, make_transform, resolve_preprocessing

    spec = TeacherSpec(model=MODEL, checkpoint=str(weights()))
    model = build_model(spec)
    transform = make_transform(resolve_preprocessing(spec, model))
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in sorted(Path(inp).glob("*.jpg"))])
    out = {"images": len(x), "threads": torch.get_num_threads()}
    for name, layout in (("channels_last", torch.channels_last), ("nchw", torch.contiguous_format)):
        m = model.to(memory_format=layout)
        with torch.inference_mode():
            m(x[:batch].contiguous(memory_format=layout))  # warm-up
            start = time.perf_counter()
            for i in range(0, len(x), batch):
                m(x[i: i + batch].contiguous(memory_format=layout)).softmax(dim=1)
            out[name] = len(x) / (time.perf_counter() - start)
    return out


def top1_agreement(a: Path, b: Path) -> dict:
    import numpy as np
    import pyarrow.parquet as pq

    def load(d):
        columns = ["id", "label", "confidence", "topk_probs"]
        return pq.read_table(sorted(d.glob("labels-*.parquet")), columns=columns).to_pandas().set_index("id")

    x = load(a)
    y = load(b).reindex(x.index)
    margin = np.array([p[0] - p[1] for p in x["topk_probs"]])
    return {"images": len(x), "top1_agreement": float((x["label"] == y["label"]).mean()),
            "mean_abs_confidence_diff": float((x["confidence"] - y["confidence"]).abs().mean()),
            "fp32_median_confidence": float(x["confidence"].median()),
            "near_ties": float((margin < 0.01).mean())}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"],
                   help="fp32 is always measured; leave bf16 out on CPUs that emulate it (no AVX512-BF16/AMX)")
    args = p.parse_args(argv)
    precisions = ["fp32"] + (["bf16"] if "bf16" in args.precisions else [])
    n = args.images
    small, large = images(n), images(2 * n)
    logs = HERE / "results" / "logs"
    out = DATA / "label-out"
    results: dict = {"args": vars(args)}
    walls: dict = {}
    for precision in precisions:
        for size, inp in ((n, small), (2 * n, large)):
            runs = [measure(f"ns-data {precision}", size, nsdata(inp, out / f"{precision}-{size}", args.batch_size,
                                                                  precision),
                            logs / f"label-{precision}-{size}-{i}.log", 12 * 1024, None) for i in range(args.repeats)]
            walls[(precision, size)] = statistics.median(r.wall_s for r in runs)
            results[f"ns-data {precision} {size}"] = {"wall_s": walls[(precision, size)],
                                                      "peak_rss_mb": max(r.peak_rss_mb for r in runs)}
        results[f"ns-data {precision}"] = {
            "marginal_images_per_s": n / (walls[(precision, 2 * n)] - walls[(precision, n)]),
            "whole_command_images_per_s": 2 * n / walls[(precision, 2 * n)]}
    for kind in ("plain", "ceiling"):
        rates = []
        for i in range(args.repeats):
            log = logs / f"label-{kind}-{i}.log"
            run = measure(kind, 2 * n, [sys.executable, __file__, "child", kind, str(large), str(args.batch_size)],
                          log, 12 * 1024, None)
            rates.append(json.loads(log.read_text().strip().splitlines()[-1]) | {"peak_rss_mb": run.peak_rss_mb})
        results[kind] = rates
    if "bf16" in precisions:
        results["bf16_vs_fp32"] = top1_agreement(out / f"fp32-{2 * n}", out / f"bf16-{2 * n}")

    plain = statistics.median(r["images"] / r["seconds"] for r in results["plain"])
    ceiling = statistics.median(r["channels_last"] for r in results["ceiling"])
    nchw = statistics.median(r["nchw"] for r in results["ceiling"])
    fp32 = results["ns-data fp32"]
    lines = [
        f"## ns-data label benchmark ({MODEL}, seeded random weights, {n} and {2 * n} JPEGs of 500x375, batch "
        f"{args.batch_size}, {results['plain'][0]['threads']} torch threads, medians of {args.repeats})", "",
        "| what | images/s | peak RSS MB |", "|---|---:|---:|",
        f"| ns-data label fp32, marginal ({n} -> {2 * n} images) | {fp32['marginal_images_per_s']:.1f} | "
        f"{results[f'ns-data fp32 {2 * n}']['peak_rss_mb']:,.0f} |",
        f"| ns-data label fp32, whole command on {2 * n} images | {fp32['whole_command_images_per_s']:.1f} | |",
        f"| plain timm DataLoader loop (fp32, NCHW, no_grad) | {plain:.1f} | "
        f"{max(r['peak_rss_mb'] for r in results['plain']):,.0f} |",
        f"| forward alone, as ns-data runs it (channels-last): the ceiling | {ceiling:.1f} | |",
        f"| forward alone, NCHW as created | {nchw:.1f} | |", "",
        f"- ns-data fp32 / plain loop: {fp32['marginal_images_per_s'] / plain:.2f}x marginal, "
        f"{fp32['whole_command_images_per_s'] / plain:.2f}x whole command",
        f"- ns-data fp32 / ceiling: {100 * fp32['marginal_images_per_s'] / ceiling:.0f}% marginal, "
        f"{100 * fp32['whole_command_images_per_s'] / ceiling:.0f}% whole command",
    ]
    if "bf16" in precisions:
        bf16, agreement = results["ns-data bf16"], results["bf16_vs_fp32"]
        lines[6:6] = [  # after the fp32 rows
            f"| ns-data label bf16, marginal | {bf16['marginal_images_per_s']:.1f} | "
            f"{results[f'ns-data bf16 {2 * n}']['peak_rss_mb']:,.0f} |",
            f"| ns-data label bf16, whole command on {2 * n} images | {bf16['whole_command_images_per_s']:.1f} | |"]
        lines.append(f"- bf16 vs fp32 on {agreement['images']} images: top-1 agreement "
                     f"{100 * agreement['top1_agreement']:.1f}%, mean |confidence difference| "
                     f"{agreement['mean_abs_confidence_diff']:.3f} (fp32 median confidence "
                     f"{agreement['fp32_median_confidence']:.2f}; {100 * agreement['near_ties']:.0f}% of images have "
                     "top-1 and top-2 within 0.01)")
    print("\n" + "\n".join(lines))
    results["markdown"] = "\n".join(lines)
    save_results(RESULTS, results)
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["child"]:
        kind, inp, batch = sys.argv[2:5]
        print(json.dumps({"plain": child_plain, "ceiling": child_ceiling}[kind](inp, int(batch))))
    else:
        sys.exit(main())
