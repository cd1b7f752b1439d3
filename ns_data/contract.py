"""What passes between the stages, stated once: every table's schema, the metadata keys, the features of a
shard record, each output's file names and completeness marker, and how a stage finds the previous one's data.

    label  -> LABELS    labels-NNNNN.parquet     (+ errors-NNNNN.parquet)  stats.json last
    balance-> SELECTION selection-NNNNN.parquet  (+ errors-NNNNN.parquet)  stats.json last
    shard  -> SHARDS    train-NNNNN-of-NNNNN.tfrecord (+ errors-00000.parquet) manifest.json last
    ns-train -> TRAIN_RUN config.yaml, checkpoint.pt, metrics.jsonl                results.json last

An output is complete when its marker exists; the marker names the `stage` that wrote it, holds the
`fingerprint` of the inputs and options that made it, and the teacher's identity (`teacher`), once per output.
While a stage runs, its files are in `OUTPUT/.tmp-<stage>/` (with `plan.json`), so a directory with that folder
and no marker holds an unfinished run. Errors tables sit beside the data and are never read as data.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import google_crc32c
import pyarrow as pa

from ns_data.stage import InputError

# ns_data.fs (Beam's filesystems) is imported by the functions that look at files: the names and schemas here
# are read without loading Beam (`ns-train --help` builds its help from them).


TMP_PREFIX = ".tmp-"


def tmp_dir_name(stage: str) -> str:
    """The directory a run of `stage` writes into, inside its output, until it publishes."""
    return f"{TMP_PREFIX}{stage}"


@dataclass(frozen=True)
class OutputKind:
    """One stage's output directory: data files, errors files and the marker written last."""

    stage: str
    data_prefix: str
    data_suffix: str
    marker: str
    errors_prefix: str = "errors"

    @property
    def data_pattern(self) -> str:
        return f"{self.data_prefix}-*{self.data_suffix}"

    @property
    def errors_pattern(self) -> str:
        return f"{self.errors_prefix}-*.parquet"

    @property
    def tmp_name(self) -> str:
        return tmp_dir_name(self.stage)

    def data_name(self, index: int, total: int | None = None) -> str:
        of = f"-of-{total:05d}" if total is not None else ""
        return f"{self.data_prefix}-{index:05d}{of}{self.data_suffix}"

    def errors_name(self, index: int) -> str:
        return f"{self.errors_prefix}-{index:05d}.parquet"

    def state(self, directory: str) -> tuple[bool, dict | None]:
        """(whether `directory` holds this stage's output, complete or not; its marker when complete). A marker
        that names another stage makes it no output of this one."""
        from ns_data import fs

        path = fs.join(directory, self.marker)
        if fs.exists(path):
            marker = fs.read_json(path)
            return (True, marker) if marker.get("stage") == self.stage else (False, None)
        return fs.dir_exists(fs.join(directory, self.tmp_name)) or bool(fs.list_dir(directory, self.data_pattern)), None

    def is_output(self, directory: str) -> bool:
        return self.state(directory)[0]

    def check_complete(self, directory: str) -> dict:
        """The marker's content; a clear error when the output is unfinished or is not this stage's."""
        ours, marker = self.state(directory)
        if marker is not None:
            return marker
        if ours:
            raise InputError(f"{directory} holds an unfinished {self.stage} run (no {self.marker}): run "
                             f"`ns-data {self.stage}` again with the same arguments to finish it")
        raise InputError(f"{directory} is not a {self.stage} output (no {self.marker} of `ns-data {self.stage}`)")

    def data_files(self, directory: str) -> list[str]:
        """The data files of a complete output, sorted."""
        from ns_data import fs

        self.check_complete(directory)
        return fs.list_dir(directory, self.data_pattern)


LABELS = OutputKind("label", "labels", ".parquet", "stats.json")
SELECTION = OutputKind("balance", "selection", ".parquet", "stats.json")
SHARDS = OutputKind("shard", "train", ".tfrecord", "manifest.json")
STAGE_OUTPUTS = (LABELS, SELECTION, SHARDS)


@dataclass(frozen=True)
class RunDirectory(OutputKind):
    """An `ns-train` run directory: `config` (the resolved config), `checkpoint` (where a re-run resumes),
    `metrics` (a line per logged step and evaluation, appended during the run) and the marker, written last."""

    config: str = "config.yaml"
    checkpoint: str = "checkpoint.pt"

    @property
    def data_pattern(self) -> str:
        return self.data_prefix + self.data_suffix  # one file, not numbered

    @property
    def metrics(self) -> str:
        return self.data_pattern

    @property
    def files(self) -> tuple[str, ...]:
        """Every file of a finished run, the marker last."""
        return self.config, self.checkpoint, self.metrics, self.marker


TRAIN_RUN = RunDirectory("train", "metrics", ".jsonl", "results.json")


# ------------------------------------------------------------------------------------------- tables

PSEUDO_LABEL_SCHEMA = pa.schema([
    ("id", pa.string()),  # unique across the run's inputs (see ns_data.sources)
    ("source", pa.string()),  # absolute URI of the file or container holding the image
    ("offset", pa.int64()),  # byte offset in a TFRecord/tar, row in a Parquet file; null for a file
    ("label", pa.int32()),
    ("confidence", pa.float32()),
    ("topk_classes", pa.list_(pa.int32())),
    ("topk_probs", pa.list_(pa.float32())),
])
# The content fingerprint of each image, written by `label`, passed through by `balance`, checked by `shard`
# against the bytes it reads back (a mismatch is an error row SOURCE_CHANGED). Nullable: a user's own Parquet has
# no such columns, and `shard` then warns once (NO_FINGERPRINT) and checks nothing.
CONTENT_FIELDS = (pa.field("content_bytes", pa.int64()),  # the image's length in bytes
                  pa.field("content_crc32c", pa.int64()))  # the CRC32C of its bytes (0 .. 2**32 - 1)
CONTENT_COLUMNS = tuple(f.name for f in CONTENT_FIELDS)
SOURCE_CHANGED = "source_changed"
NO_FINGERPRINT = "no content fingerprint: images are not checked against what was labeled"
OPTIONAL_LABEL_FIELDS = (pa.field("entropy", pa.float32()), pa.field("probs", pa.list_(pa.float32())))
KEY_COLUMNS = ("id", "label", "confidence")  # all that `balance` needs; every other column passes through
SELECTION_FIELDS = (pa.field("rank", pa.int32()), pa.field("copies", pa.int32()))
READ_BACK_COLUMNS = ("id", "source", "offset", "label", "confidence", "copies")  # what `shard` needs
SOFT_LABEL_COLUMNS = ("topk_classes", "topk_probs", "probs")  # optional; checked by `balance`, read by `shard`
REASON = "reason"
# Errors of images (label, shard): one row per image that could not be read, decoded or written.
IMAGE_ERROR_SCHEMA = pa.schema([("id", pa.string()), ("source", pa.string()), ("offset", pa.int64()),
                                (REASON, pa.string()), ("detail", pa.string())])
# Errors of rows (balance): the rejected input row as it was, plus `reason`.


def pseudo_label_schema(probs: bool, metadata: dict[str, dict]) -> pa.Schema:
    fields = (list(PSEUDO_LABEL_SCHEMA) + list(CONTENT_FIELDS) + [OPTIONAL_LABEL_FIELDS[0]]
              + ([OPTIONAL_LABEL_FIELDS[1]] if probs else []))
    return pa.schema(fields, metadata=encode_metadata(metadata))


def content_fingerprint(data: bytes) -> tuple[int, int]:
    """(content_bytes, content_crc32c) of an image's bytes."""
    return len(data), google_crc32c.value(data)


def content_changed(row: dict, data: bytes) -> str | None:
    """The error detail when `data` is not the image `row`'s fingerprint describes; None when it is, or when the
    row has no fingerprint."""
    expected = (row.get("content_bytes"), row.get("content_crc32c"))
    if None in expected:
        return None
    actual = content_fingerprint(data)
    if actual == expected:
        return None
    return (f"labeled {expected[0]} bytes with CRC32C {expected[1]:08x}; "
            f"now {actual[0]} bytes with CRC32C {actual[1]:08x}")


def selection_schema(input_schema: pa.Schema) -> pa.Schema:
    return input_schema.append(SELECTION_FIELDS[0]).append(SELECTION_FIELDS[1])


def row_error_schema(input_schema: pa.Schema) -> pa.Schema:
    return input_schema.append(pa.field(REASON, pa.string()))


_TYPE_CHECKS = {
    "id": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    "source": (lambda t: pa.types.is_string(t) or pa.types.is_large_string(t), "string"),
    "offset": (pa.types.is_integer, "an integer type (int64)"),
    "content_bytes": (pa.types.is_integer, "an integer type (int64)"),
    "content_crc32c": (pa.types.is_integer, "an integer type (int64)"),
    "label": (pa.types.is_integer, "an integer type (int32)"),
    "confidence": (pa.types.is_floating, "a float type (float32)"),
    "rank": (pa.types.is_integer, "an integer type (int32)"),
    "copies": (pa.types.is_integer, "an integer type (int32)"),
    "topk_classes": (lambda t: pa.types.is_list(t) and pa.types.is_integer(t.value_type), "list<int32>"),
    "topk_probs": (lambda t: pa.types.is_list(t) and pa.types.is_floating(t.value_type), "list<float32>"),
    "probs": (lambda t: pa.types.is_list(t) and pa.types.is_floating(t.value_type), "list<float32>"),
}


def check_columns(path: str, schema: pa.Schema, required: tuple[str, ...], hint: str = "") -> None:
    """Required columns present, and every known column (required or optional) of its documented type."""
    for column in required:
        if column not in schema.names:
            raise InputError(f"{path}: missing required column '{column}' (has: {', '.join(schema.names)})"
                             + (f"; {hint}" if hint else ""))
    for column, (ok, expected) in _TYPE_CHECKS.items():
        if column in schema.names and not ok(schema.field(column).type):
            raise InputError(f"{path}: column '{column}' has type {schema.field(column).type}; expected {expected}")


# ------------------------------------------------------------------------------------------- metadata
# Parquet schema metadata (JSON values), written by `label`, passed through by `balance`, read by `shard`.
#
# The teacher's identity (model, checkpoint digest, preprocessing, precision, num_classes, class_names, ...) is
# stored once per output, in its marker (`teacher` in label's and balance's stats.json, shard's manifest.json).
# A data file's footer holds the identity in brief (`footer_teacher`): what a reader of the file alone needs (the
# class count) and what ties it to the whole (the model, the identity's digest), a few hundred bytes whatever
# the number of classes. A user's own table (not an ns-data output) may hold the whole identity there.

TEACHER = "ns_data.teacher"  # the teacher in brief: {"model", "num_classes", "identity_sha256"}
INPUT = "ns_data.input"  # how label read its inputs: {"format": auto|files|tfrecord|tar|parquet, "image_column"}
RULE = "ns_data.balance"  # the selection rule's options
IDENTITY_DIGEST = "identity_sha256"  # in the brief: the SHA-256 of the whole identity (teacher_digest)


def encode_metadata(values: dict[str, dict]) -> dict[bytes, bytes]:
    return {k.encode(): json.dumps(v, sort_keys=True).encode() for k, v in values.items()}


def read_metadata(schema: pa.Schema, key: str) -> dict | None:
    raw = (schema.metadata or {}).get(key.encode())
    return json.loads(raw) if raw else None


def teacher_digest(teacher: dict) -> str:
    """The SHA-256 of a teacher's identity as JSON (keys sorted): the same for the identity and its copy read
    back from a marker."""
    return hashlib.sha256(json.dumps(teacher, sort_keys=True).encode()).hexdigest()


def footer_teacher(teacher: dict | None) -> dict | None:
    """What a data file's footer holds of the teacher's identity (TEACHER): its model, class count and digest,
    without class names or preprocessing; the brief of a brief is itself."""
    if teacher is None:
        return None
    brief = {"model": teacher.get("model"), "num_classes": teacher.get("num_classes"),
             IDENTITY_DIGEST: teacher.get(IDENTITY_DIGEST) or teacher_digest(teacher)}
    return {k: v for k, v in brief.items() if v is not None}


def with_footer_teacher(schema: pa.Schema) -> pa.Schema:
    """`schema` with its TEACHER metadata (when it has one) in brief (footer_teacher); other metadata kept."""
    teacher = read_metadata(schema, TEACHER)
    if teacher is None:
        return schema
    return schema.with_metadata(dict(schema.metadata) | encode_metadata({TEACHER: footer_teacher(teacher)}))


def teacher_of(marker: dict | None, schema: pa.Schema) -> dict | None:
    """The teacher's identity of an input: its marker's `teacher` when it is an ns-data output that records it,
    else its footer's TEACHER (a user's own table; a file read alone, then in brief)."""
    return (marker or {}).get("teacher") or read_metadata(schema, TEACHER)


def num_classes(schema: pa.Schema) -> int | None:
    """The class count as recorded by the teacher (label) or the rule (balance --num-classes)."""
    for key in (TEACHER, RULE):
        value = (read_metadata(schema, key) or {}).get("num_classes")
        if value:
            return int(value)
    return None


# ------------------------------------------------------------------------------------------- shard records
# Feature of a training record (tf.train.Example): name -> (type, meaning). `image/encoded`, `label`, `prob`
# and `probabilities` are the original Noisy Student code's names, so its TF readers parse these shards.

RECORD_FEATURES = {
    "image/encoded": ("bytes", "the image file's bytes, as read from its source (not re-encoded)"),
    "label": ("int64", "the teacher's class"),
    "prob": ("float", "the teacher's confidence in `label`"),
    "id": ("bytes", "the image id; the record key is id#copy"),
    "copy": ("int64", "which copy of the image this record is (0 .. copies-1)"),
    "topk_classes": ("int64 list", "the teacher's top-k classes, most probable first"),
    "topk_probs": ("float list", "their probabilities"),
    "probabilities": ("float list [num_classes]", "the dense soft label (the teacher's full vector when the "
                      "selection has `probs`, else the top-k with the remaining mass spread evenly)"),
}
IMAGENET_LABEL = "image/class/label"  # labeled ImageNet shards name their class so; readers accept both


# ------------------------------------------------------------------------------------------- finding inputs


def stage_output(item: str, kind: OutputKind) -> dict | None:
    """How a stage finds the previous one's data, input by input: a `kind` output directory gives its data
    files (its marker returned here; an unfinished output is an error); any other directory every *.parquet
    below it; a file or a glob itself (None). Another stage's output is an error."""
    from ns_data import fs

    if fs.is_glob(item) or fs.is_file(item):
        return None
    if kind.is_output(item):
        return kind.check_complete(item)
    if other := next((k for k in STAGE_OUTPUTS if k.is_output(item)), None):
        raise InputError(f"{item} is a {other.stage} output; expected a {kind.stage} output or Parquet files")
    return None


def input_files(item: str, is_output: bool, kind: OutputKind) -> list[tuple[str, int]]:
    """(path, size) of an input's Parquet files, sorted: a `kind` output's data files, else as `fs.list_files`
    finds them."""
    from ns_data import fs

    if is_output:
        return fs.match(fs.join(item, kind.data_pattern))
    return [(p, n) for p, n in fs.list_files(item) if p.endswith(".parquet")]


def some_input_files(item: str, is_output: bool, kind: OutputKind, limit: int) -> list[tuple[str, int]]:
    """(path, size) of at most `limit` of an input's Parquet files, in the order the filesystem lists them: a
    listing that stops early (a launcher's check); `input_files` finds them all."""
    from ns_data import fs

    if is_output:
        return fs.match_some(fs.join(item, kind.data_pattern), limit)
    if fs.is_glob(item) or fs.is_file(item):
        return [(p, n) for p, n in fs.match_some(item, limit) if p.endswith(".parquet")]
    return fs.match_some(fs.join(item.rstrip("/"), "**.parquet"), limit)
