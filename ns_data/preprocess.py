"""The teacher's input: image bytes -> RGB image (`images.decode_image`) -> timm's eval transform -> batches.

`Preprocessor` is what a label worker's decode threads call on each image, and what its main thread calls to
make a batch. The exact path (the default) gives, bit for bit, `torch.stack([transform(decode_image(b)) ...])`,
the tensors timm's own eval transform makes; it only lays each image out in memory the way the model reads it
(channels-last, in the decode thread), so that the batch is one copy in the main thread (which the model's
threads wait on), and pins the batch's memory when the model is on a GPU.

`fast_decode` changes how JPEGs are made ready (other formats take the exact path): it decodes them at a
reduced scale first (`decode_image(min_side=...)`), so that the resize starts
from a slightly larger image than its target instead of the full one, and fuses timm's resize and center crop
into one resampling of the region the crop keeps (Pillow's `resize(box=...)`: the same filter, centred on the
same points, but only the kept pixels are computed; it differs from resize-then-crop by rounding, at most 1 in
255). That changes pixels, so it changes labels a little: opt-in, and recorded in the teacher's identity
(`decode_identity`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from ns_data.images import DEFAULT_MAX_PIXELS, decode_image, is_jpeg

FAST_DECODE_METHOD = "jpeg_dct_scaling"


def eval_transform(config: dict[str, Any], uint8: bool = False):
    """timm's own eval transform for a data config (input_size as (3, H, W) or one side, crop_pct, interpolation,
    mean, std, crop_mode: the teacher's `preprocessing`): PIL RGB image in, normalized CHW float tensor out; with
    `uint8`, the uint8 tensor before normalizing. The one eval transform of the teacher (label) and the trainer
    (ns_train.data, from its config's preprocessing), so a student exported as a teacher sees its images as its
    evaluation did."""
    from timm.data import create_transform

    args = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items()}
    return create_transform(**args, is_training=False, use_prefetcher=uint8)


def resize_target(config: dict[str, Any]) -> int | None:
    """The side both of an image's sides must keep for timm's eval transform of `config` to resize down (never
    up) from it: the larger side of the resize target, floor(input size / crop_pct) (timm's
    transforms_imagenet_eval, every crop mode). None when the transform does something else first (trims a
    border), where a reduced decode would change more than the resize's input."""
    if config.get("crop_border_pixels"):
        return None
    size = config["input_size"][-2:]
    crop_pct = config.get("crop_pct") or 0.875  # timm's DEFAULT_CROP_PCT
    return max(math.floor(s / crop_pct) for s in size)


def decode_identity(config: dict[str, Any]) -> dict[str, Any]:
    """What `--fast-decode` adds to the teacher's identity (the labels depend on it)."""
    return {"method": FAST_DECODE_METHOD, "min_side": resize_target(config)}


def fused_resize_crop(transforms: list) -> Any:
    """One resampling for timm's eval transform's first two steps, torchvision's Resize and CenterCrop on a PIL
    image: `fn(image)` gives the crop, computed from the crop's region of the source (None when the steps are
    other ones). For an image smaller than the crop (which CenterCrop pads), `fn` gives None."""
    from torchvision.transforms import CenterCrop, Resize
    from torchvision.transforms.functional import _compute_resized_output_size, pil_modes_mapping

    if len(transforms) < 2 or type(transforms[0]) is not Resize or type(transforms[1]) is not CenterCrop:
        return None
    resize, crop = transforms[0], transforms[1]
    size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
    resample = pil_modes_mapping.get(resize.interpolation)
    if resample is None or not resize.antialias:
        return None
    crop_h, crop_w = crop.size

    def fn(image):
        width, height = image.size
        new_h, new_w = _compute_resized_output_size((height, width), size, resize.max_size)
        if crop_h > new_h or crop_w > new_w:
            return None
        top, left = int(round((new_h - crop_h) / 2.0)), int(round((new_w - crop_w) / 2.0))  # CenterCrop's
        sx, sy = width / new_w, height / new_h
        box = (left * sx, top * sy, (left + crop_w) * sx, (top + crop_h) * sy)
        return image.resize((crop_w, crop_h), resample, box=box)

    return fn


class Preprocessor:
    """Bytes in, the teacher's input tensor out (or `images.DecodeError`); `batch` stacks them for the model."""

    def __init__(self, config: dict[str, Any], max_pixels: int = DEFAULT_MAX_PIXELS, fast_decode: bool = False,
                 channels_last: bool = True, device: str = "cpu"):
        self.transform = eval_transform(config)
        self.max_pixels = max_pixels
        self.min_side = resize_target(config) if fast_decode else None
        steps = list(getattr(self.transform, "transforms", []))
        self.resize_crop = fused_resize_crop(steps) if self.min_side else None
        if self.resize_crop is not None:
            from torchvision.transforms import Compose

            self.rest = Compose(steps[2:])
        self.channels_last = channels_last
        self.pin = device.startswith("cuda") and torch.cuda.is_available()

    def __call__(self, data: bytes) -> torch.Tensor:
        """One image, in a decode thread (Pillow and torch release the GIL)."""
        fast = self.min_side is not None and is_jpeg(data)  # other formats: the exact path, bit for bit
        image = decode_image(data, self.max_pixels, self.min_side if fast else None)
        cropped = self.resize_crop(image) if fast and self.resize_crop is not None else None
        x = self.transform(image) if cropped is None else self.rest(cropped)
        if self.channels_last and x.ndim == 3:
            # The same values, laid out HWC: stacking such tensors gives a channels-last batch directly.
            x = x.permute(1, 2, 0).contiguous().permute(2, 0, 1)
        return x

    def batch(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """The images as one batch, in the model's memory format; in pinned memory for a GPU, so that the copy
        to the device overlaps the work that follows."""
        hwc = self.channels_last and all(x.ndim == 3 and x.permute(1, 2, 0).is_contiguous() for x in images)
        if not self.pin:
            if hwc:  # stacked as NHWC, seen as NCHW: channels-last without a copy
                return torch.stack([x.permute(1, 2, 0) for x in images]).permute(0, 3, 1, 2)
            return torch.stack(list(images))
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        out = torch.empty((len(images), *images[0].shape), dtype=images[0].dtype, memory_format=fmt,
                          pin_memory=True)
        for i, x in enumerate(images):
            out[i].copy_(x)
        return out
