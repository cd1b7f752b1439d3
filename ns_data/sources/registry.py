"""The input formats by name. Each format module registers its class with `@register`; `ns_data/sources/__init__.py`
imports the format modules, in the order FORMATS keeps."""
from __future__ import annotations

import os

from ns_data.sources.base import ImageFormat

FORMATS: dict[str, ImageFormat] = {}  # kind -> the format
_BY_EXTENSION: dict[str, str] = {}  # lower-case extension -> kind


def register(cls: type[ImageFormat]) -> type[ImageFormat]:
    """Adds a format (a class with its `kind` and `extensions`) to FORMATS."""
    if cls.kind in FORMATS:
        raise ValueError(f"input format {cls.kind!r} registered twice")
    taken = [ext for ext in cls.extensions if ext in _BY_EXTENSION]
    if taken:
        raise ValueError(f"input format {cls.kind!r}: extensions {taken} belong to another format")
    FORMATS[cls.kind] = cls()
    _BY_EXTENSION.update({ext: cls.kind for ext in cls.extensions})
    return cls


def format_for(kind: str) -> ImageFormat:
    """The format named `kind` (KeyError, with the known names, for another)."""
    try:
        return FORMATS[kind]
    except KeyError:
        raise KeyError(f"unknown input format {kind!r}; one of {', '.join(FORMATS)}") from None


def kind_of(path: str, input_format: str) -> str | None:
    """The format of an input file: the one given for all, else by its extension (None: not an input)."""
    if input_format != "auto":
        return input_format
    return _BY_EXTENSION.get(os.path.splitext(path)[1].lower())
