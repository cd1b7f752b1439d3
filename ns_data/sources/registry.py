"""The input formats by name: each format module registers its class with `register`."""
from __future__ import annotations

import os

from ns_data.images import IMAGE_EXTENSIONS
from ns_data.sources.base import ImageFormat

FORMATS: dict[str, ImageFormat] = {}
_EXTENSION_KIND = {".tfrecord": "tfrecord", ".tfrecords": "tfrecord", ".tfr": "tfrecord", ".tar": "tar",
                   ".parquet": "parquet", **{ext: "files" for ext in IMAGE_EXTENSIONS}}


def register(cls: type[ImageFormat]) -> type[ImageFormat]:
    FORMATS[cls.kind] = cls()
    return cls


def kind_of(path: str, input_format: str) -> str | None:
    """The format of an input file: the one given for all, else by its extension (None: not an input)."""
    if input_format != "auto":
        return input_format
    return _EXTENSION_KIND.get(os.path.splitext(path)[1].lower())
