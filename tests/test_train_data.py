"""The trainer's streams read images as the teacher did (one decode) and name the record they cannot read."""
from __future__ import annotations

import dataclasses
import io
import itertools
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ns_data import tfrecord
from ns_data.images import decode_image
from ns_train.config import TrainConfig
from ns_train.data import BadRecord, EvalSet, TrainStream, eval_transform, train_loader
from tests.test_train import picture, write_shards


def sideways_jpeg() -> bytes:
    """A phone photo stored sideways: 48x32 pixels with EXIF orientation 6 (shown rotated 90 degrees)."""
    pixels = np.zeros((32, 48, 3), np.uint8)
    pixels[:, :16] = (230, 20, 20)  # a red band on the left as stored
    pixels[:, 16:] = (20, 20, 230)
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95, exif=exif)
    return buf.getvalue()


def config(shards: str, **changes) -> TrainConfig:
    return TrainConfig(**{"labeled": shards, "num_classes": 4, "image_size": 32, "crop_pct": 1.0, "noise": False,
                          "shuffle_buffer": 1, "workers": 0} | changes)


def test_an_exif_rotated_jpeg_is_trained_on_as_it_was_labeled(tmp_path):
    data = sideways_jpeg()
    shards = write_shards(tmp_path / "s", [{"image/encoded": data, "label": 1, "id": "phone", "prob": 0.9,
                                            "topk_classes": [1, 2], "topk_probs": [0.9, 0.1]}], count=1)
    cfg = config(shards)
    upright = decode_image(data)  # label's decode
    assert upright.size == (32, 48)
    expected = eval_transform(cfg)(upright)
    sideways = eval_transform(cfg)(Image.open(io.BytesIO(data)).convert("RGB"))
    assert not torch.allclose(expected, sideways)  # the test can tell the two apart
    image, label = next(iter(EvalSet(shards, cfg)))
    assert label == 1 and torch.equal(image, expected)
    uint8 = eval_transform(cfg, uint8=True)(upright)  # training streams leave the workers as uint8
    for pseudo in (False, True):
        image, _ = next(iter(TrainStream(shards, cfg, pseudo=pseudo)))
        assert torch.equal(image, uint8), pseudo


def records_with_a_bad_image(rng) -> list[dict]:
    records = [{"image/encoded": picture(i % 4, rng), "label": i % 4, "id": f"img-{i}", "prob": 0.9} for i in range(6)]
    records[3]["image/encoded"] = b"<html>not an image</html>"
    return records


def damaged_shard(directory, rng) -> tuple[str, int]:
    """One shard of 6 records whose 3rd record (index 2) has a bad data checksum; its path, and the record's
    byte offset."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "train-00000-of-00001.tfrecord")
    frames = [tfrecord.frame_record(tfrecord.make_example({"image/encoded": picture(i % 4, rng), "label": i % 4,
                                                            "id": f"img-{i}"})) for i in range(6)]
    spoiled = bytearray(frames[2])
    spoiled[-5] ^= 0xFF  # a byte of the data: the data checksum fails
    frames[2] = bytes(spoiled)
    with open(path, "wb") as f:
        f.write(b"".join(frames))
    return path, len(frames[0]) + len(frames[1])


@pytest.mark.parametrize("workers", [0, 1])
def test_a_bad_image_in_training_is_one_error_naming_file_index_and_id_or_skipped(tmp_path, workers):
    rng = np.random.default_rng(0)
    shards = write_shards(tmp_path / "s", records_with_a_bad_image(rng), count=1)
    path = os.path.join(shards, "train-00000-of-00001.tfrecord")
    cfg = config(shards, workers=workers)
    with pytest.raises(BadRecord) as err:
        list(itertools.islice(iter(train_loader(TrainStream(shards, cfg, pseudo=False), 1, workers)), 6))
    assert str(err.value).startswith(f"{path}: record 3 (id img-3): not_an_image"), str(err.value)
    assert "\n" not in str(err.value)
    skipping = dataclasses.replace(cfg, skip_bad_records=True)
    images = list(itertools.islice(iter(train_loader(TrainStream(shards, skipping, pseudo=False), 1, workers)), 10))
    assert len(images) == 10  # the stream goes on past it, epoch after epoch


def test_a_damaged_shard_stops_eval_and_training_naming_the_record_or_is_skipped(tmp_path, caplog):
    rng = np.random.default_rng(0)
    path, offset = damaged_shard(tmp_path / "s", rng)
    cfg = config(str(tmp_path / "s"))
    message = (f"{path}: record 2: corrupt_record (bad data checksum at byte {offset}); the rest of the file is "
               "unreadable")
    for stream in (EvalSet(str(tmp_path / "s"), cfg), TrainStream(str(tmp_path / "s"), cfg, pseudo=False)):
        with pytest.raises(BadRecord) as err:
            list(itertools.islice(iter(stream), 6))
        assert str(err.value) == message
    skipping = dataclasses.replace(cfg, skip_bad_records=True)
    with caplog.at_level(logging.WARNING, logger="ns_train"):
        labels = [label for _, label in EvalSet(str(tmp_path / "s"), skipping)]
    assert labels == [0, 1]  # the records before the damage; the rest of the file cannot be framed
    assert [r.getMessage() for r in caplog.records] == [f"skipped: {message}"]


def test_the_command_line_says_it_in_one_line(tmp_path):
    """`ns-train train` and `ns-train eval` on a shard with a bad image: `Error: <file>: record <i> (id ...)`."""
    from click.testing import CliRunner

    from ns_train.cli import main
    from tests.test_train_cli import TINY

    rng = np.random.default_rng(0)
    shards = write_shards(tmp_path / "s", records_with_a_bad_image(rng), count=1)
    path = os.path.join(shards, "train-00000-of-00001.tfrecord")
    result = CliRunner().invoke(main, ["train", "--output", str(tmp_path / "run"), "--labeled", shards, *TINY,
                                       "--batch-size", "6", "--workers", "1"])
    last = result.output.rstrip().splitlines()[-1]
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert last == f"Error: {path}: record 3 (id img-3): not_an_image: no image format recognises these 25 bytes, " \
                   "starting b'<html>not an ima'", result.output
    result = CliRunner().invoke(main, ["train", "--output", str(tmp_path / "run2"), "--labeled", shards, *TINY,
                                       "--batch-size", "6", "--skip-bad-records"])
    assert result.exit_code == 0, result.output
