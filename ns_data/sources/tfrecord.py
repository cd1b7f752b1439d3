"""TFRecords of tf.Example (the image in `image/encoded`): id = the container's path + '#' + record number,
offset = the record's byte offset."""
from __future__ import annotations

from ns_data import fs, tfrecord
from ns_data.sources.base import CORRUPT_RECORD, UNREADABLE, ImageFormat, ImageRecord
from ns_data.sources.registry import register


@register
class TFRecord(ImageFormat):
    kind = "tfrecord"
    extensions = (".tfrecord", ".tfrecords", ".tfr")

    def iterate(self, unit, settings, with_data=True):
        path = unit.paths[0]
        name = fs.relative_to(path, unit.id_root)
        index = 0
        try:
            with fs.open_read(path) as f:
                for offset, record, damage in tfrecord.scan_records(f):
                    rid = f"{name}#{index}"
                    index += 1
                    if damage:
                        yield ImageRecord(rid, path, offset, error=CORRUPT_RECORD, detail=damage)
                    elif not with_data:
                        yield ImageRecord(rid, path, offset)
                    else:
                        data, reason, detail = self._image(record, offset)
                        yield ImageRecord(rid, path, offset, data, reason, detail)
        except Exception as err:  # noqa: BLE001
            yield ImageRecord(f"{name}#{index}", path, None, error=UNREADABLE, detail=str(err))

    @staticmethod
    def _image(record: bytes, offset: int) -> tuple[bytes | None, str | None, str]:
        try:
            encoded = tfrecord.parse_example(record).get("image/encoded")
        except Exception as err:  # noqa: BLE001
            return None, CORRUPT_RECORD, f"not a tf.Example at byte {offset}: {err}"
        if not encoded:
            return None, CORRUPT_RECORD, f"no image/encoded in the record at byte {offset}"
        return encoded[0], None, ""

    def read_back(self, source, offsets, settings):
        with fs.open_read(source) as f:
            for offset in offsets:
                try:
                    yield self._image(tfrecord.read_record_at(f, offset), offset)
                except (tfrecord.CorruptRecord, ValueError, OSError) as err:
                    yield None, CORRUPT_RECORD, f"at byte {offset}: {type(err).__name__}: {err}"
