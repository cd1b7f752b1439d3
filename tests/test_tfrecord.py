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


def test_a_bad_data_checksum_is_skipped_and_the_records_after_it_are_read():
    records = [b"rec%d" % i for i in range(6)]
    framed = bytearray(b"".join(tfrecord.frame_record(r) for r in records))
    framed[2 * 20 + 12] ^= 0xFF  # record 2's data (each record is 12 + 4 + 4 bytes here)
    got = list(tfrecord.scan_records(io.BytesIO(bytes(framed))))
    assert [d for _, d, _ in got] == [b"rec0", b"rec1", None, b"rec3", b"rec4", b"rec5"]
    assert got[2][0] == 40 and "bad data checksum" in got[2][2]
    assert [o for o, _, _ in got] == [0, 20, 40, 60, 80, 100]


@pytest.mark.parametrize("damage, lost", [("length", 4 * 20), ("truncate", 20 - 3)])
def test_lost_framing_ends_the_file_with_one_entry_counting_the_bytes_lost(damage, lost):
    framed = bytearray(b"".join(tfrecord.frame_record(b"rec%d" % i) for i in range(6)))
    if damage == "length":
        framed[2 * 20] ^= 0xFF  # record 2's length: its checksum no longer holds
    else:
        framed = framed[:-3]
    got = list(tfrecord.scan_records(io.BytesIO(bytes(framed))))
    good = 2 if damage == "length" else 5
    assert [d for _, d, _ in got[:good]] == [b"rec%d" % i for i in range(good)]
    assert len(got) == good + 1 and got[-1][1] is None
    assert f"remaining {lost} bytes" in got[-1][2]
