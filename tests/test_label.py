"""`label` on the in-process runner with a tiny timm model: every input kind, exactness, bad images, errors."""
from __future__ import annotations

import glob
import io
import json
import os
import tarfile

import google_crc32c
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import timm
from PIL import Image
from timm.data import create_transform, resolve_data_config

from ns_data import contract, tfrecord
from ns_data.label import LabelOptions, prepare, run_label
from ns_data.shard import ShardOptions, run_shard
from ns_data.sources import ReadSettings
from ns_data.stage import OutputExists
from ns_data.teacher import TeacherError
from tests.conftest import balance

MODEL = "test_efficientnet"
CLASSES = 10


def encode(img: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def photo(seed: int, size=(64, 48)) -> Image.Image:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    return Image.fromarray(base).resize(size, Image.BILINEAR)


@pytest.fixture(scope="module")
def teacher_files(tmp_path_factory):
    """A tiny timm teacher with 10 classes: safetensors, a state dict, and TorchScript."""
    return write_teacher(tmp_path_factory.mktemp("teacher"))


def write_teacher(d) -> dict:
    """The tiny teacher's files in directory `d` (a pathlib.Path): seeded, so the same weights every time."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = timm.create_model(MODEL, pretrained=False, num_classes=CLASSES).eval()
    with torch.no_grad():  # sharper logits than at init, so that confidences spread over [0, 1]
        model.get_classifier().weight.mul_(40)
    save_file(model.state_dict(), str(d / "teacher.safetensors"))
    torch.save({"state_dict": model.state_dict()}, d / "teacher.pth")
    cfg = resolve_data_config({}, model=model)
    torch.jit.trace(model, torch.zeros(1, *cfg["input_size"])).save(str(d / "teacher.ts"))
    other = timm.create_model("test_resnet", pretrained=False, num_classes=CLASSES)
    torch.save(other.state_dict(), d / "other.pth")
    return {"model": model, "dir": d}


def image_set() -> dict[str, bytes]:
    """Good images of every mode the decoder must handle, by name."""
    rgb = photo(1)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise on display
    rows16 = (np.arange(48 * 64).reshape(48, 64) * 21).astype(np.uint16)
    return {
        "rgb.jpg": encode(rgb),
        "photo2.jpg": encode(photo(2, (120, 90))),
        "gray.png": encode(photo(3).convert("L"), "PNG"),
        "cmyk.jpg": encode(photo(4).convert("CMYK")),
        "palette.png": encode(photo(5).convert("P"), "PNG"),
        "alpha.png": encode(photo(6).convert("RGBA"), "PNG"),
        "deep16.png": encode(Image.fromarray(rows16), "PNG"),
        "rotated.jpg": encode(photo(7), exif=exif),
        "tiny.png": encode(photo(8, (1, 1)), "PNG"),
        "wide.webp": encode(photo(9, (400, 30)), "WEBP"),
    }


@pytest.fixture(scope="module")
def images():
    return image_set()


def noisy_photo(seed: int, size) -> Image.Image:
    """A photo-like image: smooth colour fields, shapes and pixel noise (the decoder has real work to do)."""
    rng = np.random.default_rng(seed)
    width, height = size
    base = np.asarray(photo(seed, (max(width // 16, 1) * 8, max(height // 16, 1) * 8)).resize(size, Image.BICUBIC),
                      dtype=np.float64)
    base += rng.normal(0, 10, base.shape)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    from PIL import ImageDraw

    draw = ImageDraw.Draw(img)
    for _ in range(4):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        box = [x0, y0, x0 + int(rng.integers(8, width // 2)), y0 + int(rng.integers(8, height // 2))]
        draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    return img


def known_images() -> dict[str, bytes]:
    """The known run's images: every mode of `image_set`, and JPEGs large enough for DCT-scaled decoding (four
    times the teacher's resize target and more): baseline, progressive, rotated by EXIF, grey, CMYK, 4:4:4."""
    exif = Image.Exif()
    exif[0x0112] = 6
    return image_set() | {
        "big.jpg": encode(noisy_photo(11, (1024, 768)), quality=90),
        "big-progressive.jpg": encode(noisy_photo(12, (800, 600)), quality=85, progressive=True),
        "big-rotated.jpg": encode(noisy_photo(13, (900, 700)), exif=exif),
        "big-grey.jpg": encode(noisy_photo(14, (700, 700)).convert("L")),
        "big-cmyk.jpg": encode(noisy_photo(15, (720, 540)).convert("CMYK")),
        "big-444.jpg": encode(noisy_photo(16, (1000, 640)), subsampling=0, quality=95),
        "big.png": encode(noisy_photo(17, (800, 600)), "PNG"),
    }


BAD = {
    "empty.jpg": (b"", "empty_file"),
    "text.jpg": (b"this is not an image", "not_an_image"),
    "truncated.png": (None, "truncated_image"),
    "bomb.png": (None, "too_many_pixels"),
}


def bad_images() -> dict[str, tuple[bytes, str]]:
    out = dict(BAD)
    out["truncated.png"] = (encode(photo(10), "PNG")[:150], "truncated_image")
    out["bomb.png"] = (encode(Image.new("L", (3000, 2000)), "PNG"), "too_many_pixels")  # over --max-pixels below
    return out


def write_dir(path, files: dict[str, bytes]) -> str:
    os.makedirs(path, exist_ok=True)
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return str(path)


def label(inputs, output, teacher_files, **kwargs):
    opts = dict(teacher=MODEL, checkpoint=str(teacher_files["dir"] / "teacher.safetensors"), batch_size=4,
                topk=3, max_pixels=1_000_000)
    opts.update(kwargs)
    stats, wrote = run_label(LabelOptions(inputs=tuple(str(i) for i in inputs), output=str(output), **opts), [],
                             echo=lambda message: None)
    assert wrote
    labels = pq.read_table(sorted(glob.glob(os.path.join(str(output), "labels-*.parquet"))))
    errors_files = sorted(glob.glob(os.path.join(str(output), "errors-*.parquet")))
    errors = pq.read_table(errors_files).to_pandas() if errors_files else None
    return stats, labels.to_pandas().sort_values("id").reset_index(drop=True), errors


def direct_predictions(model, files: dict[str, bytes]) -> dict[str, np.ndarray]:
    """What the teacher says for each image, computed here with timm's own eval transform and a plain forward."""
    from ns_data.images import decode_image

    transform = create_transform(**resolve_data_config({}, model=model), is_training=False)
    out = {}
    with torch.no_grad():
        for name, data in files.items():
            x = transform(decode_image(data)).unsqueeze(0)
            out[name] = torch.softmax(model(x), dim=1)[0].numpy()
    return out


def test_labels_equal_the_model_run_directly_and_record_the_teacher(tmp_path, teacher_files, images):
    stats, got, errors = label([write_dir(tmp_path / "imgs", images)], tmp_path / "out", teacher_files,
                               probs=True)
    assert errors is None and stats["labeled"] == stats["images_read"] == len(images)
    want = direct_predictions(teacher_files["model"], images)
    assert sorted(got["id"]) == sorted(images)
    for _, row in got.iterrows():
        probs = want[row["id"]]
        order = np.argsort(-probs, kind="stable")[:3]
        assert row["label"] == order[0]
        np.testing.assert_allclose(row["confidence"], probs[order[0]], rtol=1e-4, atol=1e-6)
        assert list(row["topk_classes"]) == list(order)
        np.testing.assert_allclose(row["topk_probs"], probs[order], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(row["probs"], probs, rtol=1e-4, atol=1e-6)
        entropy = -(probs * np.log(probs)).sum()
        np.testing.assert_allclose(row["entropy"], entropy, rtol=1e-4)
        assert row["source"] == os.path.join(str(tmp_path / "imgs"), row["id"])  # absolute: valid from anywhere
        assert pd.isna(row["offset"])
    meta = stats["teacher"]  # the identity is in stats.json; every footer holds it in brief
    brief = json.loads(pq.read_schema(glob.glob(str(tmp_path / "out" / "labels-*.parquet"))[0])
                       .metadata[b"ns_data.teacher"])
    assert brief == {"model": MODEL, "num_classes": CLASSES, "identity_sha256": contract.teacher_digest(meta)}
    assert meta["model"] == MODEL and meta["num_classes"] == CLASSES and meta["precision"] == "fp32"
    assert meta["preprocessing"] == {k: list(v) if isinstance(v, tuple) else v
                                     for k, v in resolve_data_config({}, model=teacher_files["model"]).items()}
    assert len(meta["checkpoint_sha256"]) == 64
    assert meta["class_names"] is None and "pretrained" not in meta  # 10 classes: no ImageNet head, no names
    assert spread(got["confidence"]) > 0.1  # the fixture's teacher is confident enough to be interesting


def spread(values) -> float:
    return float(np.max(values) - np.min(values))


def test_every_input_kind_gives_the_same_labels_with_documented_ids(tmp_path, teacher_files, images):
    names = sorted(images)
    kinds = tmp_path / "kinds"
    kinds.mkdir()
    # TFRecord of tf.Example (ImageNet layout), no file extension: needs --input-format tfrecord.
    with open(kinds / "train-00000-of-00001", "wb") as f:
        for name in names:
            f.write(tfrecord.frame_record(tfrecord.make_example({"image/encoded": images[name], "image/class/label": 1})))
    with tarfile.open(kinds / "shard-000.tar", "w") as tar:
        for name in names:
            info = tarfile.TarInfo(f"{os.path.splitext(name)[0]}.{name.split('.')[-1]}")
            info.size = len(images[name])
            tar.addfile(info, io.BytesIO(images[name]))
            meta = tarfile.TarInfo(f"{os.path.splitext(name)[0]}.json")
            meta.size = 2
            tar.addfile(meta, io.BytesIO(b"{}"))
    pq.write_table(pa.table({"key": names, "image": [images[n] for n in names]}), kinds / "images.parquet",
                   row_group_size=4)
    _, tfr, _ = label([kinds / "train-00000-of-00001"], tmp_path / "o1", teacher_files, input_format="tfrecord")
    _, tar, _ = label([kinds / "shard-000.tar"], tmp_path / "o2", teacher_files)
    _, par, _ = label([kinds / "images.parquet"], tmp_path / "o3", teacher_files, id_column="key")
    _, fil, _ = label([write_dir(tmp_path / "files", images)], tmp_path / "o4", teacher_files)

    assert sorted(tfr["id"]) == sorted(f"train-00000-of-00001#{i}" for i in range(len(names)))
    assert sorted(tar["id"]) == sorted(f"shard-000.tar/{n}" for n in names)
    assert sorted(par["id"]) == names
    # Offsets locate the bytes: a TFRecord record, a tar member's data, a Parquet row.
    with open(kinds / "train-00000-of-00001", "rb") as f:
        for _, row in tfr.iterrows():
            index = int(row["id"].split("#")[1])
            assert tfrecord.parse_example(tfrecord.read_record_at(f, int(row["offset"])))["image/encoded"] == [
                images[names[index]]]
    with open(kinds / "shard-000.tar", "rb") as f:
        for _, row in tar.iterrows():
            data = images[row["id"].split("/", 1)[1]]
            f.seek(int(row["offset"]))
            assert f.read(len(data)) == data
    assert [int(o) for o in par.sort_values("offset")["offset"]] == list(range(len(names)))

    def by_image(df, key):
        return {key(i): (l, round(float(c), 5)) for i, l, c in zip(df["id"], df["label"], df["confidence"])}

    # Each row's content fingerprint is the length and CRC32C of its image's bytes (not of the container).
    for df, name in ((fil, lambda i: i), (par, lambda i: i), (tar, lambda i: i.split("/", 1)[1]),
                     (tfr, lambda i: names[int(i.split("#")[1])])):
        assert {i: (int(n), int(c)) for i, n, c in zip(df["id"], df["content_bytes"], df["content_crc32c"])} == {
            i: (len(images[name(i)]), google_crc32c.value(images[name(i)])) for i in df["id"]}

    reference = by_image(fil, lambda i: i)
    assert by_image(par, lambda i: i) == reference
    assert by_image(tar, lambda i: i.split("/", 1)[1]) == reference
    assert by_image(tfr, lambda i: names[int(i.split("#")[1])]) == reference


def test_bad_images_go_to_errors_and_counts_add_up(tmp_path, teacher_files, images):
    bad = bad_images()
    files = {**images, **{name: data for name, (data, _) in bad.items()}}
    # A damaged TFRecord: the good records before the damage are labeled, the damage is one error.
    good_then_broken = b"".join(tfrecord.frame_record(tfrecord.make_example({"image/encoded": images[n]}))
                                for n in ("rgb.jpg", "gray.png"))
    broken = good_then_broken + tfrecord.frame_record(tfrecord.make_example({"image/encoded": images["rgb.jpg"]}))[:30]
    d = write_dir(tmp_path / "mixed", files)
    with open(os.path.join(d, "broken.tfrecord"), "wb") as f:
        f.write(broken)
    with open(os.path.join(d, "no-image.tfrecord"), "wb") as f:
        f.write(tfrecord.frame_record(tfrecord.make_example({"label": 3})))
    with open(os.path.join(d, "garbage.tar"), "wb") as f:
        f.write(b"\x00garbage" * 100)
    stats, got, errors = label([d], tmp_path / "out", teacher_files)
    by_id = dict(zip(errors["id"], errors["reason"]))
    for name, (_, reason) in bad.items():
        assert by_id[name] == reason
    assert by_id["broken.tfrecord#2"] == "corrupt_record"
    assert by_id["no-image.tfrecord#0"] == "corrupt_record"
    assert by_id["garbage.tar/"] == "unreadable_file"
    assert {"broken.tfrecord#0", "broken.tfrecord#1"} <= set(got["id"])
    assert set(images) <= set(got["id"])
    assert stats["images_read"] == stats["labeled"] + stats["errors"] == len(got) + len(errors)
    assert stats["errors_by_reason"] == errors["reason"].value_counts().to_dict()


def test_balance_reads_the_output_unchanged(tmp_path, teacher_files, images):
    label([write_dir(tmp_path / "imgs", images)], tmp_path / "labels", teacher_files)
    stats, selection, _ = balance([tmp_path / "labels"], tmp_path / "sel", per_class=3, min_confidence=0.0,
                                  num_classes=CLASSES)
    assert stats["input_rows"] == len(images) and stats["rejected_rows"] == 0
    assert set(selection.columns) >= {"id", "source", "offset", "topk_classes", "topk_probs", "entropy", "rank",
                                      "copies"}
    assert (selection.groupby("label")["copies"].sum() == 3).all()


def test_an_image_changed_between_label_and_shard_is_a_source_changed_error(tmp_path, teacher_files, images):
    """label -> balance -> shard, with selected images replaced by HTML, emptied, and changed to other bytes of
    the same length in between: those are error rows, the rest is written, and the counts add up."""
    label([write_dir(tmp_path / "imgs", images)], tmp_path / "labels", teacher_files)
    _, selection, _ = balance([tmp_path / "labels"], tmp_path / "sel", per_class=1, min_confidence=0.0,
                              num_classes=CLASSES)
    assert set(selection.columns) >= {"content_bytes", "content_crc32c"}  # passed through by balance
    html, empty, same_length = selection["id"][:3]
    open(tmp_path / "imgs" / html, "wb").write(b"<html><body>moved</body></html>")
    open(tmp_path / "imgs" / empty, "wb").close()
    changed = bytearray(images[same_length])
    changed[-3] ^= 0x01
    open(tmp_path / "imgs" / same_length, "wb").write(changed)
    manifest, _ = run_shard(ShardOptions(inputs=(str(tmp_path / "sel"),), output=str(tmp_path / "shards"),
                                         num_shards=2), [], echo=lambda m: None)
    errors = pq.read_table(tmp_path / "shards" / "errors-00000.parquet").to_pandas()
    assert sorted(errors["id"]) == sorted([html, empty, same_length])
    assert set(errors["reason"]) == {"source_changed"}
    assert manifest["unique_images"] + manifest["errors"] == len(selection)
    assert manifest["records"] == int(selection[~selection["id"].isin(errors["id"])]["copies"].sum())


def test_ids_and_labels_are_stable_across_runs_and_teacher_formats(tmp_path, teacher_files, images):
    d = write_dir(tmp_path / "imgs", images)
    _, a, _ = label([d], tmp_path / "a", teacher_files)
    _, b, _ = label([d], tmp_path / "b", teacher_files, checkpoint=str(teacher_files["dir"] / "teacher.pth"))
    _, c, _ = label([d], tmp_path / "c", teacher_files, teacher=str(teacher_files["dir"] / "teacher.ts"),
                    checkpoint=None, input_size=160, crop_pct=0.95)
    assert a["id"].tolist() == b["id"].tolist() == c["id"].tolist()
    assert a["label"].tolist() == b["label"].tolist() == c["label"].tolist()
    np.testing.assert_allclose(a["confidence"], c["confidence"], rtol=1e-4)


def test_max_images_and_bf16(tmp_path, teacher_files, images):
    d = write_dir(tmp_path / "imgs", images)
    stats, got, _ = label([d], tmp_path / "out", teacher_files, max_images=4, precision="bf16")
    assert stats["images_read"] == 4 and len(got) == 4
    assert got["id"].tolist() == sorted(images)[:4]
    assert pq.read_schema(glob.glob(str(tmp_path / "out" / "labels-*.parquet"))[0]).field("confidence").type == pa.float32()


@pytest.mark.parametrize("kwargs,message", [
    (dict(teacher="no_such_model_xyz"), "unknown model 'no_such_model_xyz'"),
    (dict(checkpoint="/nonexistent/w.safetensors"), "checkpoint not found"),
    (dict(checkpoint=None), "give --checkpoint"),
    (dict(checkpoint="OTHER"), "does not fit test_efficientnet"),
    (dict(precision="fp8"), "--precision"),
    (dict(batch_size=0), "--batch-size"),
])
def test_teacher_and_option_errors_come_before_any_image_is_read(tmp_path, teacher_files, kwargs, message):
    opts = dict(teacher=MODEL, checkpoint=str(teacher_files["dir"] / "teacher.safetensors"))
    opts.update(kwargs)
    if opts["checkpoint"] == "OTHER":
        opts["checkpoint"] = str(teacher_files["dir"] / "other.pth")
    with pytest.raises((TeacherError, ValueError), match=message):
        prepare(LabelOptions(inputs=(str(tmp_path / "nowhere"),), output=str(tmp_path / "out"), **opts))
    assert not (tmp_path / "out").exists()


def test_a_runner_option_ns_data_refuses_comes_before_the_output_is_touched(tmp_path, teacher_files, images):
    from ns_data.stage import OptionsError

    opts = LabelOptions(inputs=(write_dir(tmp_path / "imgs", images),), output=str(tmp_path / "out"), teacher=MODEL,
                        checkpoint=str(teacher_files["dir"] / "teacher.safetensors"))
    with pytest.raises(OptionsError, match="multi_threading is not supported"):
        run_label(opts, ["--direct_running_mode=multi_threading", "--direct_num_workers=2"])
    assert not (tmp_path / "out").exists()


def test_missing_inputs_and_existing_output_are_clear_errors(tmp_path, teacher_files, images):
    from ns_data.stage import InputError

    opts = dict(teacher=MODEL, checkpoint=str(teacher_files["dir"] / "teacher.safetensors"))
    with pytest.raises(InputError, match="no images"):
        prepare(LabelOptions(inputs=(str(tmp_path / "nowhere"),), output=str(tmp_path / "out"), **opts))
    d = write_dir(tmp_path / "imgs", images)
    label([d], tmp_path / "out", teacher_files)
    assert prepare(LabelOptions(inputs=(d,), output=str(tmp_path / "out"), batch_size=4, topk=3,
                                max_pixels=1_000_000, **opts)) is None  # the same run: already complete
    with pytest.raises(OutputExists, match="complete label output of other inputs or options"):
        prepare(LabelOptions(inputs=(d,), output=str(tmp_path / "out"), topk=2, **opts))


def test_random_weights_are_seeded_so_runs_repeat():
    from ns_data.teacher import TeacherSpec, _build_timm

    a = _build_timm(TeacherSpec(model=MODEL, random_weights=True, num_classes=4)).state_dict()
    torch.manual_seed(123)  # whatever the caller's RNG state
    b = _build_timm(TeacherSpec(model=MODEL, random_weights=True, num_classes=4)).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_same_folder_twice_is_labeled_once_and_the_repeat_reported(tmp_path, teacher_files, images):
    d = write_dir(tmp_path / "imgs", images)
    stats, got, errors = label([d, d], tmp_path / "out", teacher_files)
    assert sorted(got["id"]) == sorted(images)  # ids relative to the one root, each image once
    assert sorted(errors["id"]) == sorted(images) and set(errors["reason"]) == {"duplicate_input"}
    assert stats["images_read"] == 2 * len(images) == len(got) + len(errors)


# ------------------------------------------------------------------------------------ the known run
# `tests/data/label_known_run.json` holds what `label` wrote for `known_images()` with the tiny teacher before
# decoding and preprocessing were reworked (written by `python -m tests.test_label`, at commit b3520dd): every
# float bit for bit. The default (exact) path must still write exactly these rows.

KNOWN_RUN = os.path.join(os.path.dirname(__file__), "data", "label_known_run.json")
KNOWN_OPTIONS = dict(batch_size=4, topk=3, probs=True)


def _hex(values) -> list[str]:
    return [v.hex() for v in np.asarray(values, dtype=np.float32).ravel().tolist()]


def known_run_record(labels: pd.DataFrame, teacher_sha: str, files: dict[str, bytes]) -> dict:
    import hashlib

    import PIL

    from ns_data.images import decode_image

    transform = create_transform(**resolve_data_config({}, model=timm.create_model(MODEL, num_classes=CLASSES)),
                                 is_training=False)
    return {
        "env": {"torch": torch.__version__, "timm": timm.__version__, "pillow": PIL.__version__,
                "cpu_capability": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()},
        "teacher_sha256": teacher_sha,
        "inputs_sha256": {n: hashlib.sha256(d).hexdigest() for n, d in sorted(files.items())},
        "preprocessed_sha256": {n: hashlib.sha256(transform(decode_image(d)).numpy().tobytes()).hexdigest()
                                for n, d in sorted(files.items())},
        "rows": {r["id"]: {"label": int(r["label"]), "topk_classes": [int(c) for c in r["topk_classes"]],
                           "confidence": _hex(r["confidence"]), "topk_probs": _hex(r["topk_probs"]),
                           "entropy": _hex(r["entropy"]), "probs": _hex(r["probs"])}
                 for _, r in labels.iterrows()},
    }


def write_known_run() -> None:
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        teacher = write_teacher(tmp)
        files = known_images()
        stats, got, errors = label([write_dir(tmp / "imgs", files)], tmp / "out", teacher, **KNOWN_OPTIONS)
        assert errors is None
        meta = stats["teacher"]
        record = known_run_record(got, meta["checkpoint_sha256"], files)
        record["teacher"] = {k: v for k, v in meta.items() if k not in ("torch", "checkpoint")}
    os.makedirs(os.path.dirname(KNOWN_RUN), exist_ok=True)
    with open(KNOWN_RUN, "w") as f:
        json.dump(record, f, indent=1, sort_keys=True)
        f.write("\n")


if __name__ == "__main__":
    write_known_run()


def test_the_default_path_writes_the_known_run_bit_for_bit(tmp_path, teacher_files):
    """The rows of the known run (before decoding and batching were reworked), every float bit for bit, when
    this machine can reproduce it (same torch, timm and Pillow, same CPU kernels, same teacher weights)."""
    with open(KNOWN_RUN) as f:
        known = json.load(f)
    files = known_images()
    stats, got, errors = label([write_dir(tmp_path / "imgs", files)], tmp_path / "out", teacher_files,
                               **KNOWN_OPTIONS)
    assert errors is None
    meta = stats["teacher"]
    assert {k: v for k, v in meta.items() if k not in ("torch", "checkpoint")} == known["teacher"]  # nothing added
    now = known_run_record(got, meta["checkpoint_sha256"], files)
    reproducible = all(now[k] == known[k] for k in ("env", "teacher_sha256", "inputs_sha256"))
    if not reproducible:
        pytest.skip(f"the known run was made with {known['env']}; this machine has {now['env']}")
    assert now["preprocessed_sha256"] == known["preprocessed_sha256"]
    assert now["rows"] == known["rows"]


def test_fast_decode_is_recorded_close_to_exact_and_exact_for_other_formats(tmp_path, teacher_files):
    files = known_images()
    d = write_dir(tmp_path / "imgs", files)
    _, exact, _ = label([d], tmp_path / "exact", teacher_files, **KNOWN_OPTIONS)
    stats, fast, errors = label([d], tmp_path / "fast", teacher_files, fast_decode=True, **KNOWN_OPTIONS)
    assert errors is None and stats["labeled"] == len(files)
    decode = {"method": "jpeg_dct_scaling", "min_side": 168}  # test_efficientnet: floor(160 / 0.95)
    assert stats["options"]["fast_decode"] is True and stats["teacher"]["decode"] == decode
    exact_stats = json.loads((tmp_path / "exact" / "stats.json").read_text())
    assert "decode" not in exact_stats["teacher"]
    briefs = [json.loads(pq.read_schema(glob.glob(str(tmp_path / run / "labels-*.parquet"))[0])
                         .metadata[b"ns_data.teacher"]) for run in ("fast", "exact")]
    assert briefs[0]["identity_sha256"] != briefs[1]["identity_sha256"]  # a file alone tells the two apart
    exact, fast = exact.set_index("id"), fast.set_index("id")
    jpegs = [n for n in files if n.endswith(".jpg")]  # the big ones (2 x 168 a side or more) decoded reduced
    for name in files:  # PNG, WebP: the exact path, the same rows bit for bit
        if name not in jpegs:
            assert np.array_equal(np.stack(fast.loc[name, "probs"]), np.stack(exact.loc[name, "probs"])), name
    probs_fast = np.stack(fast.loc[jpegs, "probs"].tolist())
    probs_exact = np.stack(exact.loc[jpegs, "probs"].tolist())
    assert not np.array_equal(probs_fast, probs_exact)  # the JPEGs took the fast path
    assert np.abs(probs_fast - probs_exact).max() < 0.01  # ... and the teacher saw nearly the same images
    assert (fast.loc[jpegs, "label"] == exact.loc[jpegs, "label"]).all()
    # A different decode is a different run: not mixed with the exact labels, nor resumed from them.
    with pytest.raises(OutputExists):
        prepare(LabelOptions(inputs=(d,), output=str(tmp_path / "exact"), teacher=MODEL,
                             checkpoint=str(teacher_files["dir"] / "teacher.safetensors"), fast_decode=True,
                             **KNOWN_OPTIONS))


# ------------------------------------------------------------------------------------ resume and planning


def _interrupted(monkeypatch, inputs, output, teacher_files, keep: int, **kwargs) -> list[str]:
    """A run whose every unit is done but whose last step failed, with all but `keep` markers removed as if
    it had been killed; returns the kept markers' names."""
    from ns_data import label as label_module

    def killed(*args, **kw):
        raise RuntimeError("killed before the last step")

    finalize = label_module.finalize
    monkeypatch.setattr(label_module, "finalize", killed)
    with pytest.raises(Exception, match="killed before the last step"):
        label(inputs, output, teacher_files, **kwargs)
    monkeypatch.setattr(label_module, "finalize", finalize)
    markers = sorted(glob.glob(os.path.join(str(output), ".tmp-label", "unit-*.json")))
    for path in markers[keep:]:
        os.remove(path)
    return [os.path.basename(p) for p in markers[:keep]]


def many_images(images, copies: int = 4) -> dict[str, bytes]:
    return {f"{i:02d}-{name}": data for i in range(copies) for name, data in images.items()}


@pytest.fixture
def small_units(monkeypatch):
    """Units of 16 files or more (128 by default), so that a few dozen images make several units."""
    from ns_data.sources import units

    monkeypatch.setattr(units, "MIN_FILES_PER_UNIT", 16)


@pytest.mark.parametrize("group_units", [None, 1], ids=["one group", "a group per unit"])
def test_a_run_resumed_with_another_batch_size_gives_the_rows_of_an_uninterrupted_run(tmp_path, teacher_files,
                                                                                     images, monkeypatch,
                                                                                     small_units, group_units):
    """The finished units are found by listing their markers, in one group or prefix by prefix."""
    from ns_data import label as label_module
    from ns_data.label import parse_marker

    if group_units:
        monkeypatch.setattr(label_module, "GROUP_UNITS", group_units)
    files = many_images(images)  # 40 images: 3 units of loose files
    d = write_dir(tmp_path / "imgs", files)
    _, whole, _ = label([d], tmp_path / "whole", teacher_files, batch_size=4, probs=True)
    kept = _interrupted(monkeypatch, [d], tmp_path / "out", teacher_files, keep=1, batch_size=4, probs=True)
    stats, got, errors = label([d], tmp_path / "out", teacher_files, batch_size=3, probs=True)
    assert stats["units"] == 3 and stats["resumed_units"] == 1
    assert stats["images_read_this_run"] == len(files) - parse_marker(kept[0])[1]["labeled"] > 0
    assert stats["images_read"] == stats["labeled"] == len(files) and errors is None
    assert got["id"].tolist() == whole["id"].tolist() == sorted(files)
    assert got["label"].tolist() == whole["label"].tolist()
    np.testing.assert_allclose(np.stack(got["probs"]), np.stack(whole["probs"]), rtol=1e-5, atol=1e-6)


def test_a_resumed_run_whose_inputs_changed_stops_before_labeling(tmp_path, teacher_files, images, monkeypatch,
                                                                  small_units):
    d = write_dir(tmp_path / "imgs", many_images(images))
    _interrupted(monkeypatch, [d], tmp_path / "out", teacher_files, keep=1)
    write_dir(tmp_path / "imgs", {"new.jpg": images["rgb.jpg"]})
    with pytest.raises(Exception, match="the inputs changed since the interrupted run"):
        label([d], tmp_path / "out", teacher_files)
    assert len(glob.glob(str(tmp_path / "out" / ".tmp-label" / "unit-*.json"))) == 1  # nothing more was labeled


def test_units_do_not_depend_on_the_listing_order(tmp_path):
    """The units are a function of the files listed (and take no batch size): the same whichever order the
    listing gives the files in."""
    import apache_beam as beam

    from ns_data.sources.listing import Listed
    from ns_data.sources.units import FormUnits

    def dump(units, path):
        with open(path, "w") as f:
            json.dump(sorted(units), f)

    listed = [Listed(f"/in/{i % 7}/img-{i:04d}.jpg", 100 + i, "files", 0) for i in range(2000)]
    listed += [Listed(f"/in/shard-{i}.tar", 5000, "tar", 0) for i in range(3)]
    listed += [Listed("/in/0/img-0000.jpg", 100, "files", 1, repeated=True)]
    runs = []
    for order in (listed, listed[::-1]):
        with beam.Pipeline() as p:
            _ = (p | beam.Create(order) | FormUnits("/in", ReadSettings())
                 | beam.Map(lambda u: (u.name, u.key, list(u.paths), u.repeated, u.nbytes)) | beam.combiners.ToList()
                 | beam.Map(dump, str(tmp_path / f"units-{len(runs)}.json")))
        with open(tmp_path / f"units-{len(runs)}.json") as f:
            runs.append(json.load(f))
    assert runs[0] == runs[1]
    files = [u for u in runs[0] if u[1].startswith("files/") and not u[3]]
    assert len(files) == 16  # 2,000 files, 128 or more a unit: 16 buckets, each with some files
    assert sorted(p for u in files for p in u[2]) == sorted(e.path for e in listed[:2000])
    assert sum(u[4] for u in runs[0]) == sum(e.size for e in listed)  # the bytes the listing check adds up
    assert [u[2] for u in runs[0] if u[3]] == [["/in/0/img-0000.jpg"]]  # the repeat: a unit of its own
    assert len(runs[0]) == 16 + 3 + 1


def test_a_parquet_input_without_the_image_column_is_an_error_row(tmp_path, teacher_files, images):
    names = sorted(images)
    pq.write_table(pa.table({"id": names, "image": [images[n] for n in names]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["x"], "thumb": [images["rgb.jpg"]]}), tmp_path / "b.parquet")
    stats, got, errors = label([tmp_path / "a.parquet", tmp_path / "b.parquet"], tmp_path / "out", teacher_files)
    assert sorted(got["id"]) == names
    assert errors["id"].tolist() == ["b.parquet#"] and errors["reason"].tolist() == ["unreadable_file"]
    assert "no column 'image'" in errors["detail"][0]
    assert stats["images_read"] == len(names) + 1


def test_units_are_merged_into_output_files_by_bytes(tmp_path, teacher_files, images, monkeypatch, small_units):
    from ns_data import label as label_module

    d = write_dir(tmp_path / "imgs", many_images(images))  # 40 images: 3 units
    stats, merged, _ = label([d], tmp_path / "merged", teacher_files)
    files = sorted(glob.glob(str(tmp_path / "merged" / "labels-*.parquet")))
    assert stats["units"] == 3 and len(files) == 1  # far below 64 MB: one file, a row group per unit
    assert pq.ParquetFile(files[0]).num_row_groups == 3
    monkeypatch.setattr(label_module, "TARGET_FILE_BYTES", 1)  # every unit's file reaches it: a file each
    _, apart, _ = label([d], tmp_path / "apart", teacher_files)
    files = sorted(glob.glob(str(tmp_path / "apart" / "labels-*.parquet")))
    assert [os.path.basename(f) for f in files] == [f"labels-{i:05d}.parquet" for i in range(3)]
    assert all(pq.ParquetFile(f).metadata.num_rows > 0 for f in files)  # never an empty file
    assert apart["id"].tolist() == merged["id"].tolist() == sorted(many_images(images))
    assert apart["label"].tolist() == merged["label"].tolist()
    assert json.loads(pq.read_schema(files[0]).metadata[b"ns_data.teacher"])["model"] == MODEL  # in brief


def test_units_listed_and_planned_in_groups_by_name_give_the_same_output(tmp_path, teacher_files, images,
                                                                        monkeypatch, small_units):
    """With groups of one unit (16 name prefixes for 3 units), the markers are listed and the merges planned
    prefix by prefix: the same files, numbered in the order of the units' names, the same rows; the groups'
    leftover files are packed together (one output file, not one a group)."""
    from ns_data import label as label_module

    assert label_module.name_prefixes(4096) == [""] and len(label_module.name_prefixes(4097)) == 16
    assert len(label_module.name_prefixes(293_000)) == 256
    d = write_dir(tmp_path / "imgs", many_images(images))  # 40 images: 3 units
    for target, files_out in ((1, 3), (label_module.TARGET_FILE_BYTES, 1)):
        # a file each, the groups' files full; then the groups' leftovers packed into one file (3 row groups)
        monkeypatch.setattr(label_module, "TARGET_FILE_BYTES", target)
        monkeypatch.setattr(label_module, "GROUP_UNITS", 4096)
        _, whole, _ = label([d], tmp_path / f"whole-{target}", teacher_files)
        monkeypatch.setattr(label_module, "GROUP_UNITS", 1)
        stats, grouped, _ = label([d], tmp_path / f"grouped-{target}", teacher_files)
        files = sorted(os.path.basename(f) for f in glob.glob(str(tmp_path / f"grouped-{target}" / "labels-*.parquet")))
        assert files == [f"labels-{i:05d}.parquet" for i in range(files_out)] and stats["units"] == 3
        for name in files:
            assert pq.read_table(tmp_path / f"grouped-{target}" / name).equals(
                pq.read_table(tmp_path / f"whole-{target}" / name))
        assert pq.ParquetFile(tmp_path / f"grouped-{target}" / files[-1]).num_row_groups == 3 // files_out
        assert grouped["id"].tolist() == whole["id"].tolist()


def test_the_teacher_is_in_stats_json_once_and_footers_hold_it_in_brief(tmp_path, images):
    """Class names are stored once per output (stats.json), never in the data files: a labels file's footer is
    the same size (within the digits of the class count) for 10 and 1,000 named classes."""
    footers = {}
    for classes in (10, 1000):
        names, out = tmp_path / f"names-{classes}.txt", tmp_path / f"out-{classes}"
        names.write_text("".join(f"name-{i:05d}-of-the-class\n" for i in range(classes)))
        opts = LabelOptions(inputs=(write_dir(tmp_path / "imgs", images),), output=str(out), teacher=MODEL,
                            random_weights=True, num_classes=classes, class_names=str(names), batch_size=4, topk=3)
        stats, _ = run_label(opts, [], echo=lambda message: None)
        assert stats["teacher"]["class_names"][-1] == f"name-{classes - 1:05d}-of-the-class"
        holding = {str(p.relative_to(out)): p.read_bytes().count(b"name-00007-of-the-class")
                   for p in out.rglob("*") if p.is_file()}
        assert {name: n for name, n in holding.items() if n} == {"stats.json": 1}
        (data,) = glob.glob(str(out / "labels-*.parquet"))
        schema = pq.read_schema(data)
        assert contract.read_metadata(schema, contract.TEACHER) == {
            "model": MODEL, "num_classes": classes, "identity_sha256": contract.teacher_digest(stats["teacher"])}
        assert len(schema.metadata[contract.TEACHER.encode()]) < 200
        footers[classes] = pq.ParquetFile(data).metadata.serialized_size
    assert abs(footers[1000] - footers[10]) <= 16, footers  # "1000" vs "10", stored twice
