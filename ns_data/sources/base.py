"""What every input format shares: the work unit, the image record, the read settings, the error reasons, and
the `ImageFormat` interface each format implements (how `label` iterates a unit of it, how `shard` reads an
image back from its `source` and `offset`)."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

UNREADABLE = "unreadable_file"
CORRUPT_RECORD = "corrupt_record"
MISSING_SOURCE = "missing_source"
DUPLICATE_INPUT = "duplicate_input"
DANGLING_LINK = "dangling_link"
SYMLINK_LOOP = "symlink_loop"
UNREADABLE_DIRECTORY = "unreadable_directory"
NOT_A_REGULAR_FILE = "not_a_regular_file"
NON_UTF8_NAME = "non_utf8_name"
ReadBack = Iterator[tuple[bytes | None, str | None, str]]  # (bytes, None, "") or (None, reason, detail)


@dataclass(frozen=True)
class ReadSettings:
    """How label reads its inputs; recorded in its output (contract.INPUT) so `shard` reads them back alike."""

    format: str = "auto"  # auto (by extension) or one of FORMATS for every input file
    image_column: str | None = None  # Parquet inputs: the image-bytes column (resolved before the run)
    id_column: str = "id"  # Parquet inputs: the id column, used when present

    def as_metadata(self) -> dict:
        return {"format": self.format, "image_column": self.image_column, "id_column": self.id_column}

    @classmethod
    def from_metadata(cls, meta: dict | None) -> "ReadSettings":
        return cls(**{k: v for k, v in (meta or {}).items() if k in ("format", "image_column", "id_column")})


@dataclass(frozen=True)
class ImageUnit:
    """A work unit of `label`: some image files, or one container (one row group of a Parquet file).

    `key` says which files of the listing it holds (the same for a killed run and its rerun); `name`, a digest
    of it, names its files and marker."""

    key: str
    kind: str
    paths: tuple[str, ...]  # absolute URIs
    id_root: str
    row_group: int | None = None
    limit: int | None = None  # read at most this many images (--max-images)
    repeated: bool = False  # named by an earlier input too: every image is a duplicate_input error
    nbytes: int = 0  # bytes of the listing this unit accounts for (a Parquet file's on its first row group)
    faults: tuple[tuple[str, str, str], ...] = ()  # (path, reason, detail): paths the listing found unusable

    @property
    def name(self) -> str:
        return hashlib.blake2b(self.key.encode("utf-8", "surrogateescape"), digest_size=10).hexdigest()


@dataclass(frozen=True)
class ImageRecord:
    id: str
    source: str
    offset: int | None
    data: bytes | None = None  # None when `error` is set
    error: str | None = None  # a reason; `detail` says more
    detail: str = ""
    content: tuple[int, int] | None = None  # contract.content_fingerprint(data), kept when `data` is let go


def failed(offsets, reason: str, detail: str) -> ReadBack:
    """The same error for each of `offsets`."""
    for _ in offsets:
        yield None, reason, detail


class ImageFormat:
    """An input format: its work units, how a unit is iterated, how images are read back by offset.

    A format is a subclass in a module of its own, registered with `registry.register`: its `kind` (the name
    `--input-format` takes) and `extensions` (the lower-case file extensions `auto` gives it)."""

    kind = ""
    extensions: tuple[str, ...] = ()

    def checked_settings(self, path: str, settings: ReadSettings) -> ReadSettings:
        """The settings, completed or checked against one file of this format (the first the launcher lists);
        an InputError when they cannot read it."""
        return settings

    def units(self, unit: ImageUnit, settings: ReadSettings) -> list[ImageUnit]:
        """The work units of a container (`unit` covers all of it): one by default."""
        return [unit]

    def count(self, unit: ImageUnit, settings: ReadSettings) -> int:
        return sum(1 for _ in self.iterate(unit, settings, with_data=False))

    def iterate(self, unit: ImageUnit, settings: ReadSettings, with_data: bool = True) -> Iterator[ImageRecord]:
        raise NotImplementedError

    def read_back(self, source: str, offsets: list, settings: ReadSettings) -> ReadBack:
        raise NotImplementedError
