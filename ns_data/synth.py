"""Synthetic pseudo-label tables in the documented schema, for demos, tests and benchmarks.

Class sizes are skewed (Zipf-like, so some classes are capped and others upsampled), and confidences have the
ties a real teacher produces: a share rounded to 0.01 and a share saturated at exactly 1.0.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ns_data import contract, fs
from ns_data.outputs import COMPLETE, StageOutput
from ns_data.stage import OptionsError

TEACHER = {"model": "synthetic", "checkpoint_sha256": None, "preprocessing": None}
SCHEMA = contract.PSEUDO_LABEL_SCHEMA


@dataclass(frozen=True)
class SynthOptions:
    output: str
    rows: int = 1_000_000
    classes: int = 1000
    files: int = 4
    topk: int = 5
    seed: int = 0
    invalid_fraction: float = 0.0
    row_group_rows: int = 262_144
    overwrite: bool = False

    def validate(self) -> "SynthOptions":
        if self.rows < 0 or self.classes < 1 or self.files < 1 or self.row_group_rows < 1:
            raise OptionsError("--rows must be >= 0; --classes, --files and row groups >= 1")
        if not 1 <= self.topk <= self.classes:
            raise OptionsError(f"--topk must be in [1, --classes], got {self.topk}")
        if not 0.0 <= self.invalid_fraction <= 1.0:
            raise OptionsError("--invalid-fraction must be in [0, 1]")
        return self


def _names(numbers: np.ndarray, prefix: str, width: int, suffix: str) -> pa.Array:
    """prefix + zero-padded number + suffix, built in Arrow (no Python loop per row)."""
    digits = pc.utf8_lpad(pa.array(numbers).cast(pa.string()), width=width, padding="0")
    return pc.binary_join_element_wise(prefix, digits, suffix, "")


def make_table(start: int, n: int, opts: SynthOptions, rng: np.random.Generator, class_p: np.ndarray) -> pa.Table:
    k = opts.topk
    labels = rng.choice(opts.classes, size=n, p=class_p).astype(np.int32)
    conf = rng.beta(2.5, 1.2, size=n).astype(np.float32)
    share = rng.random(n)
    conf = np.where(share < 0.2, np.round(conf, 2), conf).astype(np.float32)  # ties on a 0.01 grid
    conf = np.where(share > 0.97, np.float32(1.0), conf).astype(np.float32)  # saturated teacher
    # The other top-k classes: distinct, different from the label.
    step = max(1, (opts.classes - 1) // max(k, 1))
    others = (labels[:, None] + np.cumsum(rng.integers(1, step + 1, size=(n, k - 1)), axis=1)) % opts.classes
    rest = rng.dirichlet(np.ones(k), size=n)[:, : k - 1] * (1.0 - conf[:, None])
    rest = np.minimum(-np.sort(-rest, axis=1), conf[:, None]).astype(np.float32)
    topk_classes = np.concatenate([labels[:, None], others], axis=1).astype(np.int32)
    topk_probs = np.concatenate([conf[:, None], rest], axis=1).astype(np.float32)
    offsets = np.arange(0, n * k + 1, k, dtype=np.int32)
    index = np.arange(start, start + n)
    table = pa.table({
        "id": _names(index, "synth/", 10, ".jpg"),
        "source": _names(index // 1000, "synth/shard-", 7, ".tar"),
        "offset": (index % 1000 * 120_000).astype(np.int64),
        "label": labels,
        "confidence": conf,
        "topk_classes": pa.ListArray.from_arrays(pa.array(offsets), pa.array(topk_classes.ravel())),
        "topk_probs": pa.ListArray.from_arrays(pa.array(offsets), pa.array(topk_probs.ravel())),
    }, schema=SCHEMA)
    if opts.invalid_fraction > 0:
        table = _inject_invalid(table, rng, opts.invalid_fraction)
    return table


def _inject_invalid(table: pa.Table, rng: np.random.Generator, fraction: float) -> pa.Table:
    """Spoil a fraction of rows, each in one way: NaN or out-of-range confidence, bad label, repeated id."""
    n = table.num_rows
    bad = np.flatnonzero(rng.random(n) < fraction)
    kind = rng.integers(0, 4, size=len(bad))
    conf = table.column("confidence").to_numpy().copy()
    labels = table.column("label").to_numpy().copy()
    ids = table.column("id").to_numpy(zero_copy_only=False).copy()
    conf[bad[kind == 0]] = np.nan
    conf[bad[kind == 1]] = 1.5
    labels[bad[kind == 2]] = -1
    dup = bad[kind == 3]
    ids[dup] = ids[(dup + 1) % n]
    table = table.set_column(0, "id", pa.array(ids, pa.string()))
    table = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels, pa.int32()))
    return table.set_column(table.schema.get_field_index("confidence"), "confidence", pa.array(conf, pa.float32()))


def write_pseudo_labels(opts: SynthOptions) -> tuple[list[str], bool]:
    """Writes a pseudo-label output exactly as `label` does (contract.LABELS: labels-NNNNN.parquet, the
    teacher and input metadata, stats.json last); returns (the data files, whether this run wrote them)."""
    opts.validate()
    decisive = {k: v for k, v in dataclasses.asdict(opts).items() if k not in ("output", "overwrite")}
    output = StageOutput(opts.output, "label", contract.LABELS.marker,
                         (contract.LABELS.data_pattern, contract.LABELS.errors_pattern), fs.fingerprint([], decisive))
    if output.begin(opts.overwrite) == COMPLETE:
        return contract.LABELS.data_files(opts.output), False
    rng = np.random.default_rng(opts.seed)
    class_p = 1.0 / np.arange(1, opts.classes + 1) ** 0.8
    class_p = rng.permutation(class_p / class_p.sum())
    teacher = TEACHER | {"num_classes": opts.classes}
    metadata = contract.encode_metadata({contract.TEACHER: contract.footer_teacher(teacher),
                                         contract.INPUT: {"format": "auto"}})
    schema = SCHEMA.with_metadata(metadata)
    bounds = np.linspace(0, opts.rows, opts.files + 1).astype(np.int64)
    moves = []
    chunk = 1_000_000
    for i in range(opts.files):
        name = contract.LABELS.data_name(i)
        with fs.create(output.tmp(name)) as f, pq.ParquetWriter(f, schema) as writer:
            for start in range(int(bounds[i]), int(bounds[i + 1]), chunk):
                n = min(chunk, int(bounds[i + 1]) - start)
                table = make_table(start, n, opts, rng, class_p).replace_schema_metadata(metadata)
                writer.write_table(table, row_group_size=opts.row_group_rows)
        moves.append((output.tmp(name), name))
    output.publish(moves, {"images_read": opts.rows, "labeled": opts.rows, "errors": 0, "errors_by_reason": {},
                           "teacher": teacher, "synthetic": decisive})
    return [output.final(name) for _, name in moves], True


def write_images(output: str, count: int, width: int = 96, height: int = 72, seed: int = 0,
                 image_format: str = "jpg", overwrite: bool = False) -> list[str]:
    """`count` synthetic photos-to-be (smooth colour fields with a few shapes) as image files; returns paths."""
    from PIL import Image, ImageDraw

    if count < 0 or width < 1 or height < 1:
        raise OptionsError("--count must be >= 0 and sizes >= 1")
    if image_format not in ("jpg", "png", "webp"):
        raise OptionsError(f"--format must be jpg, png or webp, got {image_format}")
    decisive = {"count": count, "width": width, "height": height, "seed": seed, "format": image_format}
    out = StageOutput(output, "synth", "synth.json", ("img-*",), fs.fingerprint([], decisive))
    names = [f"img-{i:06d}.{image_format}" for i in range(count)]
    if out.begin(overwrite) == COMPLETE:
        return [out.final(n) for n in names]
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    for i in range(count):
        a, b = rng.random((2, 3, 1, 1)) * 255
        field = a * (1 - xx) + b * yy + rng.normal(0, 12, (3, height, width))
        img = Image.fromarray(np.clip(field.transpose(1, 2, 0), 0, 255).astype(np.uint8), "RGB")
        draw = ImageDraw.Draw(img)
        for _ in range(rng.integers(1, 5)):
            x0, y0 = rng.integers(0, width), rng.integers(0, height)
            box = [x0, y0, x0 + rng.integers(4, width // 2 + 5), y0 + rng.integers(4, height // 2 + 5)]
            fill = tuple(int(v) for v in rng.integers(0, 255, 3))
            (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
        with fs.create(out.tmp(names[i])) as f:
            img.save(f, format={"jpg": "JPEG"}.get(image_format, image_format.upper()),
                     **({"quality": 90} if image_format == "jpg" else {}))
    out.publish([(out.tmp(n), n) for n in names], {"images": count, "options": decisive})
    return [out.final(n) for n in names]
