"""Decoding: every mode to upright 8-bit RGB, every failure to a reason."""
import io

import numpy as np
import pytest
from PIL import Image

from ns_data.images import DecodeError, decode_image


def encode(img, fmt="PNG", **kwargs):
    buf = io.BytesIO()
    img.save(buf, fmt, **kwargs)
    return buf.getvalue()


def test_exif_orientation_is_applied():
    img = Image.new("RGB", (64, 48), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    assert decode_image(encode(img, "JPEG", exif=exif)).size == (48, 64)
    assert decode_image(encode(img, "JPEG")).size == (64, 48)


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGBA", "LA", "1", "I;16", "I", "F"])
def test_every_mode_becomes_rgb(mode):
    grey = (np.arange(32 * 16).reshape(16, 32) % 256).astype(np.uint8)
    base = Image.fromarray(np.stack([grey] * 3, axis=-1), "RGB")
    if mode in ("I;16", "I", "F"):
        values = {"I;16": grey.astype(np.uint16) * 257, "I": grey.astype(np.int32) * 257,
                  "F": grey.astype(np.float32) / 255}[mode]
        img = Image.fromarray(values, mode)
        data = encode(img, "TIFF")
    else:
        img = base.convert(mode)
        data = encode(img, "JPEG" if mode == "CMYK" else "PNG")
    out = decode_image(data)
    assert out.mode == "RGB" and out.size == (32, 16)
    if mode in ("L", "I;16", "I", "F"):  # grey levels survive, whatever the bit depth
        assert np.abs(np.asarray(out)[..., 0].astype(int) - grey).max() <= 1


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_file"),
    (b"GIF89a but not really", "not_an_image"),
    (b"plain text", "not_an_image"),
])
def test_bad_bytes_have_reasons(data, reason):
    with pytest.raises(DecodeError) as err:
        decode_image(data)
    assert err.value.reason == reason


def test_truncated_and_oversized_images():
    jpeg = encode(Image.new("RGB", (64, 64), (1, 2, 3)), "JPEG")
    for cut in (jpeg[: len(jpeg) // 2], encode(Image.new("RGB", (64, 64)), "PNG")[:60]):
        with pytest.raises(DecodeError) as err:
            decode_image(cut)
        assert err.value.reason in ("truncated_image", "decode_error")
    big = encode(Image.new("L", (2000, 1000)), "PNG")
    with pytest.raises(DecodeError) as err:
        decode_image(big, max_pixels=1_999_999)
    assert err.value.reason == "too_many_pixels"
    assert decode_image(big, max_pixels=2_000_000).size == (2000, 1000)
