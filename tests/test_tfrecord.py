"""TFRecord framing and tf.Example without TensorFlow."""
import io

import google_crc32c
import pytest

from ns_data import tfrecord


def test_crc32c_and_tensorflow_masking():
    assert google_crc32c.value(b"123456789") == 0xE3069283  # the CRC-32C check value
    crc = 0xE3069283
    assert tfrecord._masked_crc(b"123456789") == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def test_records_round_trip_with_offsets():
    records = [b"", b"a", b"x" * 1000]
    framed = b"".join(tfrecord.frame_record(r) for r in records)
    got = list(tfrecord.read_records(io.BytesIO(framed)))
    assert [data for _, data in got] == records
    assert [offset for offset, _ in got] == [0, 16, 33]
    assert tfrecord.read_record_at(io.BytesIO(framed), 33) == records[2]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_records_are_reported(damage):
    framed = bytearray(tfrecord.frame_record(b"hello") + tfrecord.frame_record(b"world"))
    if damage == "truncate":
        framed = framed[:-3]
    else:
        framed[-6] ^= 0xFF
    it = tfrecord.read_records(io.BytesIO(bytes(framed)))
    assert next(it)[1] == b"hello"
    with pytest.raises(tfrecord.CorruptRecord):
        next(it)


def test_example_round_trip_with_original_feature_names():
    data = tfrecord.make_example({"image/encoded": b"\xff\xd8jpeg", "label": 7, "prob": 0.25,
                                  "probabilities": [0.25, 0.75], "id": "img/1.jpg"})
    parsed = tfrecord.parse_example(data)
    assert parsed == {"image/encoded": [b"\xff\xd8jpeg"], "label": [7], "prob": [0.25],
                      "probabilities": [0.25, 0.75], "id": [b"img/1.jpg"]}


def test_record_parts_frame_the_same_example_without_copying_the_image():
    image = bytes(range(256)) * 300
    features = {"label": 3, "prob": 0.5, "id": "x", "topk_classes": [1, 2]}
    shared = tfrecord.serialized_features(features)
    head, body, tail = tfrecord.example_record_parts(shared + tfrecord.serialized_features({"copy": 2}),
                                                     "image/encoded", image)
    assert body is image
    (_, data), = tfrecord.read_records(io.BytesIO(head + body + tail))  # checksums verified here
    assert tfrecord.parse_example(data) == tfrecord.parse_example(
        tfrecord.make_example(features | {"copy": 2, "image/encoded": image}))
