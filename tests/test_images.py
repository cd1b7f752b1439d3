"""Decoding: every mode to upright 8-bit RGB, every failure to a reason."""
import io
import warnings

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
    with pytest.raises(DecodeError) as again:
        decode_image(data)
    assert str(again.value) == str(err.value)  # the same words every run: error tables compare across runs


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


def noisy(size, seed=0, mode="RGB"):
    """A photo-like image (smooth fields, pixel noise) of `size` (width, height)."""
    rng = np.random.default_rng(seed)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    field = rng.random((3, 1, 1)) * 255 * (1 - xx) + rng.random((3, 1, 1)) * 255 * yy + rng.normal(0, 10, (3, h, w))
    return Image.fromarray(np.clip(field.transpose(1, 2, 0), 0, 255).astype(np.uint8), "RGB").convert(mode)


@pytest.mark.parametrize("size,min_side,reduced", [
    ((1024, 768), 256, (512, 384)),    # 1/2: 1/4 would make the short side 192
    ((2048, 1536), 256, (512, 384)),   # 1/4
    ((4000, 3000), 256, (500, 375)),   # 1/8, the most libjpeg does
    ((1024, 768), 400, (1024, 768)),   # 768 / 2 < 400: decoded whole
    ((300, 200), 168, (300, 200)),     # too small to reduce
    ((1023, 767), 256, (512, 384)),    # odd sizes round up: ceil(1023 / 2)
])
def test_min_side_decodes_jpegs_at_the_largest_reduction_keeping_both_sides(size, min_side, reduced):
    data = encode(noisy(size), "JPEG", quality=90)
    out = decode_image(data, min_side=min_side)
    assert out.mode == "RGB" and out.size == reduced
    assert min(out.size) >= min(min_side, *size)
    if reduced == size:  # nothing to reduce: exactly the full decode
        assert np.array_equal(np.asarray(out), np.asarray(decode_image(data)))
    else:  # the same picture, smaller: close to the full decode scaled down the usual way
        full = decode_image(data).resize(reduced, Image.BICUBIC)
        assert np.abs(np.asarray(out, dtype=int) - np.asarray(full, dtype=int)).mean() < 8


@pytest.mark.parametrize("fmt,mode", [("PNG", "RGB"), ("WEBP", "RGB"), ("PNG", "L"), ("TIFF", "RGB"), ("GIF", "P"),
                                      ("BMP", "RGB")])
def test_min_side_leaves_other_formats_exact(fmt, mode):
    data = encode(noisy((900, 700), seed=1, mode=mode), fmt)
    assert np.array_equal(np.asarray(decode_image(data, min_side=200)), np.asarray(decode_image(data)))


def test_min_side_keeps_orientation_modes_and_the_pixel_limit():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 on display
    rotated = encode(noisy((1200, 800), seed=2), "JPEG", exif=exif)
    assert decode_image(rotated).size == (800, 1200)
    assert decode_image(rotated, min_side=200).size == (200, 300)  # reduced 1/4, then turned upright
    for mode in ("L", "CMYK"):
        out = decode_image(encode(noisy((1200, 800), seed=3, mode=mode), "JPEG"), min_side=200)
        assert out.mode == "RGB" and out.size == (300, 200)
    progressive = encode(noisy((1200, 800), seed=4), "JPEG", progressive=True)
    assert decode_image(progressive, min_side=200).size == (300, 200)
    big = encode(noisy((2000, 1000), seed=5), "JPEG")
    with pytest.raises(DecodeError) as err:  # the limit is on the image's full size, whatever it is decoded at
        decode_image(big, max_pixels=1_999_999, min_side=100)
    assert err.value.reason == "too_many_pixels"
    truncated = encode(noisy((1200, 800), seed=6), "JPEG")
    with pytest.raises(DecodeError) as err:
        decode_image(truncated[: len(truncated) // 3], min_side=200)
    assert err.value.reason in ("truncated_image", "decode_error")


def test_preprocessor_gives_timms_transform_bit_for_bit_in_the_models_layout():
    """The exact path: the batch equals torch.stack of timm's transform of each decoded image, channels-last."""
    import torch
    from timm.data import create_transform

    from ns_data.preprocess import Preprocessor, resize_target

    config = {"input_size": [3, 160, 160], "interpolation": "bicubic", "mean": [0.485, 0.456, 0.406],
              "std": [0.229, 0.224, 0.225], "crop_pct": 0.95, "crop_mode": "center"}
    transform = create_transform(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()})
    images = [encode(noisy((640, 480), seed=7), "JPEG"), encode(noisy((97, 211), seed=8, mode="L"), "PNG"),
              encode(noisy((500, 375), seed=9, mode="CMYK"), "JPEG"), encode(noisy((120, 90), seed=10), "WEBP")]
    want = torch.stack([transform(decode_image(d)) for d in images])
    for channels_last in (True, False):
        prep = Preprocessor(config, channels_last=channels_last)
        got = prep.batch([prep(d) for d in images])
        assert torch.equal(got, want)
        assert got.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert resize_target(config) == 168  # floor(160 / 0.95)
    fast = Preprocessor(config, fast_decode=True)
    assert fast.min_side == 168 and Preprocessor(config).min_side is None
    assert torch.equal(fast(images[1]), want[1]) and torch.equal(fast(images[3]), want[3])  # PNG, WebP: exact
    assert not torch.equal(fast(images[0]), want[0])  # a 640x480 JPEG: decoded at 1/2


def test_decoding_leaves_pillows_process_wide_pixel_limit_alone(monkeypatch):
    """The limit is per image (`max_pixels`), checked from the header: neither importing ns_data.images nor
    decoding changes Pillow's global, and Pillow's global does not cap `max_pixels`."""
    import subprocess
    import sys

    program = "from PIL import Image; before = Image.MAX_IMAGE_PIXELS; import ns_data.images; " \
              "print(before, Image.MAX_IMAGE_PIXELS)"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True)
    before, after = done.stdout.split()
    assert before == after != "None"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Pillow alone would refuse 400 pixels (> 2 x 100)
    png = encode(Image.new("RGB", (20, 20), (9, 8, 7)), "PNG")
    assert decode_image(png, max_pixels=400).size == (20, 20)
    with pytest.raises(DecodeError) as err:
        decode_image(png, max_pixels=399)
    assert err.value.reason == "too_many_pixels" and "20x20 is over 399 pixels" in str(err.value)
    assert Image.MAX_IMAGE_PIXELS == 100


def test_a_palette_with_transparency_decodes_without_a_warning_to_its_colours():
    img = Image.new("P", (8, 4), 1)
    img.putpalette([0, 0, 0, 250, 20, 30] + [0] * 762)
    img.putpixel((0, 0), 0)
    data = encode(img, "PNG", transparency=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = np.asarray(decode_image(data))
    assert out.shape == (4, 8, 3) and out[0, 0].tolist() == [0, 0, 0] and out[3, 7].tolist() == [250, 20, 30]


def test_an_animated_image_decodes_to_its_first_frame():
    frames = [Image.new("RGB", (10, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50)
    out = np.asarray(decode_image(buf.getvalue()))
    assert out.shape == (6, 10, 3) and out[..., 0].min() > 200 and out[..., 2].max() < 50


def test_the_decode_is_the_same_bytes_in_as_image_open_for_ordinary_images():
    """What the decode gave before it opened images itself: Image.open + exif_transpose + convert."""
    from PIL import ImageOps

    for fmt, mode in (("JPEG", "RGB"), ("PNG", "RGBA"), ("WEBP", "RGB"), ("PNG", "L"), ("BMP", "RGB")):
        data = encode(noisy((37, 23), mode=mode), fmt)
        with Image.open(io.BytesIO(data)) as img:
            expected = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
        assert np.array_equal(np.asarray(decode_image(data)), expected), fmt
