"""TFRecord files of tf.train.Example, read and written without TensorFlow.

TensorFlow must stay out of processes that run PyTorch models (docs/design.md), yet `label` reads ImageNet/JFT
style TFRecords and `shard` writes them. The record framing is four fields (length, masked CRC32C of the length,
data, masked CRC32C of the data; see tensorflow/core/lib/io/record_writer.cc), and tf.train.Example is a small
protobuf message; its classes are built here from a descriptor with the `protobuf` package Beam already needs.
CRC32C comes from `google-crc32c` (C implementation).
"""
from __future__ import annotations

import struct
from typing import BinaryIO, Iterator

import google_crc32c
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

from ns_data import fs

_MASK_DELTA = 0xA282EAD8


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


class CorruptRecord(ValueError):
    """A record whose framing or checksum is wrong (truncated or damaged file)."""


def read_records(stream: BinaryIO, start_offset: int = 0) -> Iterator[tuple[int, bytes]]:
    """(byte offset of the record in the file, record data) for each record; CorruptRecord where one is damaged.

    After a damaged record the rest of the file cannot be framed, so iteration stops there.
    """
    offset = start_offset
    while True:
        header = stream.read(12)
        if not header:
            return
        if len(header) < 12:
            raise CorruptRecord(f"truncated record header at byte {offset}")
        length, length_crc = struct.unpack("<QI", header)
        if _masked_crc(header[:8]) != length_crc:
            raise CorruptRecord(f"bad length checksum at byte {offset}")
        body = stream.read(length + 4)
        if len(body) < length + 4:
            raise CorruptRecord(f"truncated record at byte {offset}")
        data, data_crc = body[:length], struct.unpack("<I", body[length:])[0]
        if _masked_crc(data) != data_crc:
            raise CorruptRecord(f"bad data checksum at byte {offset}")
        yield offset, data
        offset += 12 + length + 4


def scan_records(stream: BinaryIO, start_offset: int = 0) -> Iterator[tuple[int, bytes | None, str]]:
    """(byte offset, data, "") for each record, (byte offset, None, what is wrong) for each damaged one; never
    raises CorruptRecord.

    A record whose data checksum is wrong has a sound length (its own checksum held), so the scan goes on with
    the next record. When the framing itself is lost (a bad length checksum, a truncated header or record), the
    rest of the file is one damaged entry that says how many bytes were lost, and the scan ends there. The rest is
    read in chunks to count it, never held.
    """
    offset = start_offset
    while True:
        header = stream.read(12)
        if not header:
            return
        problem, taken = "", len(header)
        if len(header) < 12:
            problem = "truncated record header"
        else:
            length, length_crc = struct.unpack("<QI", header)
            if _masked_crc(header[:8]) != length_crc:
                problem = "bad length checksum"
            else:
                body = stream.read(length + 4)
                taken += len(body)
                if len(body) < length + 4:
                    problem = "truncated record"
                else:
                    data, data_crc = body[:length], struct.unpack("<I", body[length:])[0]
                    if _masked_crc(data) != data_crc:
                        yield offset, None, f"bad data checksum in the record at byte {offset}; skipped"
                    else:
                        yield offset, data, ""
                    offset += 12 + length + 4
                    continue
        while chunk := stream.read(1 << 20):
            taken += len(chunk)
        yield offset, None, (f"{problem} at byte {offset}: the framing is lost, the remaining {taken} bytes of "
                             "the file were not read as records")
        return


def read_record_at(stream: BinaryIO, offset: int) -> bytes:
    """The record that starts at `offset` (as given by read_records)."""
    stream.seek(offset)
    for _, data in read_records(stream, offset):
        return data
    raise CorruptRecord(f"no record at byte {offset}")


def count_records(path: str) -> int:
    """Records in a TFRecord file, reading only the length headers (checked) and seeking past the data."""
    n = 0
    with fs.open_read(path) as f:
        while header := f.read(12):
            if len(header) < 12:
                raise CorruptRecord(f"{path}: truncated record header after {n} records")
            length, length_crc = struct.unpack("<QI", header)
            if _masked_crc(header[:8]) != length_crc:
                raise CorruptRecord(f"{path}: bad length checksum after {n} records")
            f.seek(length + 4, 1)
            n += 1
    return n


def frame_record(data: bytes) -> bytes:
    """One record in TFRecord framing, ready to append to a file."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", _masked_crc(length)) + data + struct.pack("<I", _masked_crc(data))


def _example_classes():
    """tf.train.Example and friends (tensorflow/core/example/{example,feature}.proto), built from a descriptor."""
    fdp = descriptor_pb2.FileDescriptorProto(name="ns_data/tf_example.proto", package="tensorflow",
                                             syntax="proto3")
    label = descriptor_pb2.FieldDescriptorProto

    def message(name, fields, oneof=None):
        msg = fdp.message_type.add(name=name)
        if oneof:
            msg.oneof_decl.add(name=oneof)
        for number, (field_name, ftype, rep, type_name) in enumerate(fields, start=1):
            f = msg.field.add(name=field_name, number=number, type=ftype,
                              label=label.LABEL_REPEATED if rep else label.LABEL_OPTIONAL)
            if type_name:
                f.type_name = type_name
            if oneof:
                f.oneof_index = 0
        return msg

    message("BytesList", [("value", label.TYPE_BYTES, True, None)])
    message("FloatList", [("value", label.TYPE_FLOAT, True, None)])
    message("Int64List", [("value", label.TYPE_INT64, True, None)])
    message("Feature", [("bytes_list", label.TYPE_MESSAGE, False, ".tensorflow.BytesList"),
                        ("float_list", label.TYPE_MESSAGE, False, ".tensorflow.FloatList"),
                        ("int64_list", label.TYPE_MESSAGE, False, ".tensorflow.Int64List")], oneof="kind")
    features = message("Features", [("feature", label.TYPE_MESSAGE, True, ".tensorflow.Features.FeatureEntry")])
    entry = features.nested_type.add(name="FeatureEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=label.TYPE_STRING, label=label.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=label.TYPE_MESSAGE, label=label.LABEL_OPTIONAL,
                    type_name=".tensorflow.Feature")
    message("Example", [("features", label.TYPE_MESSAGE, False, ".tensorflow.Features")])
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return {name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"tensorflow.{name}"))
            for name in ("Example", "Feature", "Features", "BytesList", "FloatList", "Int64List")}


_CLASSES = _example_classes()
Example = _CLASSES["Example"]


def parse_example(data: bytes) -> dict[str, list]:
    """A serialized tf.train.Example as {feature name: list of values (bytes, float or int)}."""
    example = Example.FromString(data)
    out = {}
    for name, feature in example.features.feature.items():
        kind = feature.WhichOneof("kind")
        out[name] = list(getattr(feature, kind).value) if kind else []
    return out


def make_example(features: dict[str, list | bytes | int | float]) -> bytes:
    """Serialize {name: values} as a tf.train.Example; value types pick bytes_list, int64_list or float_list."""
    example = Example()
    _fill(example.features, features)
    return example.SerializeToString(deterministic=True)  # map entries sorted: same bytes in every process


def serialized_features(features: dict[str, list | bytes | int | float]) -> bytes:
    """The tf.train.Features message of {name: values}, serialized. Concatenating such messages merges their
    features (protobuf semantics), which lets a writer reuse the part shared by many records."""
    message = _CLASSES["Features"]()
    _fill(message, features)
    return message.SerializeToString(deterministic=True)


def _fill(message, features: dict) -> None:
    for name, values in features.items():
        values = values if isinstance(values, (list, tuple)) else [values]
        feature = message.feature[name]
        if values and isinstance(values[0], (bytes, str)):
            feature.bytes_list.value.extend(v.encode() if isinstance(v, str) else v for v in values)
        elif values and all(isinstance(v, int) for v in values):
            feature.int64_list.value.extend(values)
        else:
            feature.float_list.value.extend(float(v) for v in values)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload_length: int) -> bytes:
    """The tag and length of a length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(payload_length)


def example_record_parts(features: bytes, image_key: str, image: bytes) -> tuple[bytes, bytes, bytes]:
    """One framed TFRecord holding a tf.Example of `features` (serialized_features output) plus `image` under
    `image_key`, as three parts (head, image, tail) to write one after the other: the image bytes, the bulk of
    the record, are never copied. Parses as make_example(those features | {image_key: image}) does."""
    key = image_key.encode()
    bytes_list = _field(1, len(image))  # BytesList.value, then the image
    feature = _field(1, len(bytes_list) + len(image)) + bytes_list  # Feature.bytes_list
    entry_size = len(_field(1, len(key))) + len(key) + len(_field(2, len(feature) + len(image))) + len(feature) + len(image)
    entry = _field(1, entry_size) + _field(1, len(key)) + key + _field(2, len(feature) + len(image)) + feature
    data_head = _field(1, len(features) + len(entry) + len(image)) + features + entry
    length = struct.pack("<Q", len(data_head) + len(image))
    crc = google_crc32c.Checksum(data_head)
    crc.update(image)
    crc_value = int.from_bytes(crc.digest(), "big")
    masked = (((crc_value >> 15) | (crc_value << 17)) + _MASK_DELTA) & 0xFFFFFFFF
    head = length + struct.pack("<I", _masked_crc(length)) + data_head
    return head, image, struct.pack("<I", masked)

