"""The trainer's streams read images as the teacher did (one decode) and name the record they cannot read."""
from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

from ns_data.images import decode_image
from ns_train.config import TrainConfig
from ns_train.data import EvalSet, TrainStream, eval_transform
from tests.test_train import write_shards


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
    return TrainConfig(labeled=shards, num_classes=4, image_size=32, crop_pct=1.0, noise=False, shuffle_buffer=1,
                       workers=0, **changes)


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
