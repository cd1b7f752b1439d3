"""Decoding image bytes into RGB PIL images, or a reason why not: the one decode of the teacher (label), the
trainer (labeled, unlabeled and eval streams) and the report.

Every way an image can be bad is a reason string (never an exception out of `decode_image` but DecodeError): the
label stage writes it to its errors table and counts it. Good images of any mode come out as 8-bit RGB, upright
(EXIF orientation applied): 16- and 32-bit grey levels scaled, palette images with transparency and other alpha
modes without their alpha (as `convert("RGB")` does), CMYK converted, animated images as their first frame.
The pixel limit (`max_pixels`) is checked per image, from its header, before any pixel is decoded; Pillow's own,
process-wide limit (`Image.MAX_IMAGE_PIXELS`) is neither used nor changed.

`decode_image(data, min_side=S)` is the approximate, faster decode (`ns-data label --fast-decode`): a JPEG is
decoded at 1/2, 1/4 or 1/8 of its size by libjpeg's DCT scaling, the largest reduction that keeps both sides at
least S pixels (Pillow's `Image.draft`), so a transform resizing to S or less starts from a slightly larger image
instead of the full one. The pixels differ from a full decode followed by the same resize; other formats, and
JPEGs too small to reduce, decode exactly as without it.
"""
from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 50_000_000
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")

# Reasons an image is rejected.
EMPTY = "empty_file"
NOT_AN_IMAGE = "not_an_image"
TRUNCATED = "truncated_image"
TOO_MANY_PIXELS = "too_many_pixels"
DECODE_ERROR = "decode_error"


class DecodeError(ValueError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def _to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB from any mode; 16- and 32-bit integer grey levels are scaled, not clipped."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I"):  # I, I;16, I;16B, ...: integer grey levels, 16 bits in practice
        grey = np.asarray(img, dtype=np.float64)
        top = 65535.0 if grey.max(initial=0) > 255 else 255.0
        img = Image.fromarray(np.clip(grey * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")
    elif img.mode == "F":
        grey = np.asarray(img, dtype=np.float64)
        img = Image.fromarray((np.clip(grey, 0.0, 1.0) * 255.0).round().astype(np.uint8), mode="L")
    return img.convert("RGB")


def is_jpeg(data: bytes) -> bool:
    """Whether the bytes start as a JPEG (or an MPO, a JPEG with more pictures after the first) does."""
    return data[:3] == b"\xff\xd8\xff"


def _open(data: bytes) -> Image.Image:
    """`Image.open` of the bytes, less its check against Pillow's process-wide pixel limit (the caller checks its
    own): each registered format that accepts the bytes' first 16 bytes tries to read the header, in Pillow's
    order. Raises UnidentifiedImageError when none can."""
    Image.preinit()
    Image.init()
    prefix = data[:16]
    for fmt in list(Image.ID):
        factory, accept = Image.OPEN[fmt]
        accepted = not accept or accept(prefix)
        if not accepted or isinstance(accepted, str):  # a string: why the format does not accept them
            continue
        try:
            return factory(io.BytesIO(data), "")
        except (SyntaxError, IndexError, TypeError, struct.error):  # as Image.open: not this format
            continue
    raise UnidentifiedImageError("cannot identify image file")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, min_side: int | None = None) -> Image.Image:
    """Decode, apply EXIF orientation, convert to RGB. Raises DecodeError with a reason.

    With `min_side`, a JPEG whose sides are both at least twice `min_side` is decoded at a reduced scale (both
    sides still at least `min_side`): approximate, see the module's docstring. `max_pixels` applies to the
    image's full size either way."""
    if not data:
        raise DecodeError(EMPTY)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = _open(data)
        except UnidentifiedImageError as err:  # Pillow's message names a memory address: say what the bytes are
            raise DecodeError(NOT_AN_IMAGE, f"no image format recognises these {len(data):,} bytes, starting "
                                            f"{data[:16]!r}") from err
        except Exception as err:  # noqa: BLE001 - any parser failure is a property of the data
            raise DecodeError(DECODE_ERROR, f"{type(err).__name__}: {err}") from err
        width, height = img.size
        if width * height > max_pixels:
            raise DecodeError(TOO_MANY_PIXELS, f"{width}x{height} is over {max_pixels:,} pixels")
        try:
            if min_side:  # a no-op for formats without reduced-scale decoding (all but JPEG)
                img.draft(None, (min_side, min_side))
            img.load()
            ImageOps.exif_transpose(img, in_place=True)  # the image is ours: no copy when it is upright already
            return _to_rgb(img)
        except Image.DecompressionBombError as err:  # a plugin's own check of a frame's size
            raise DecodeError(TOO_MANY_PIXELS, str(err)) from err
        except OSError as err:
            message = str(err).lower()
            reason = TRUNCATED if "truncated" in message or "broken data stream" in message else DECODE_ERROR
            raise DecodeError(reason, str(err)) from err
        except Exception as err:  # noqa: BLE001
            raise DecodeError(DECODE_ERROR, f"{type(err).__name__}: {err}") from err

