"""The input-format registry: each format is one class registered by name and extensions, and the listing,
the planning and the reading find it through the registry alone."""
from __future__ import annotations

import io
from dataclasses import replace

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.testing.util import assert_that, equal_to
from PIL import Image

from ns_data.sources import ImageUnit, ReadSettings, plan_inputs, read_back, read_unit, registry
from ns_data.sources.base import CORRUPT_RECORD, ImageFormat, ImageRecord
from ns_data.sources.listing import Listed
from ns_data.sources.units import FormUnits
from ns_data.stage import InputError


def jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 256, 90, 200)).save(out, "JPEG")
    return out.getvalue()


def test_the_four_formats_are_registered_in_order_with_their_extensions():
    assert list(registry.FORMATS) == ["files", "tfrecord", "tar", "parquet"]
    for path, kind in [("a/b.JPG", "files"), ("x.png", "files"), ("s.tfrecord", "tfrecord"), ("s.tfr", "tfrecord"),
                       ("s.tar", "tar"), ("t.parquet", "parquet"), ("notes.txt", None)]:
        assert registry.kind_of(path, "auto") == kind
    assert registry.kind_of("notes.txt", "tar") == "tar"  # --input-format: one format for every file
    assert registry.format_for("tar") is registry.FORMATS["tar"]
    with pytest.raises(KeyError, match="unknown input format 'zip'; one of files, tfrecord, tar, parquet"):
        registry.format_for("zip")


def test_a_kind_or_an_extension_is_registered_once():
    class AnotherTar(ImageFormat):
        kind = "tar"
        extensions = (".tgz",)

    class Zips(ImageFormat):
        kind = "zip"
        extensions = (".zip", ".parquet")

    with pytest.raises(ValueError, match="'tar' registered twice"):
        registry.register(AnotherTar)
    with pytest.raises(ValueError, match=r"extensions \['.parquet'\] belong to another format"):
        registry.register(Zips)
    assert "zip" not in registry.FORMATS and registry.kind_of("a.zip", "auto") is None


class Lines(ImageFormat):
    """A format made for this test: a `.imglines` file names one image file a line; offset = the line number."""

    kind = "imglines"
    extensions = (".imglines",)

    def iterate(self, unit, settings, with_data=True):
        path = unit.paths[0]
        with open(path) as f:
            for n, line in enumerate(f.read().splitlines()):
                rid = f"{path}#{n}"
                try:
                    with open(line, "rb") as image:
                        yield ImageRecord(rid, path, n, image.read() if with_data else None)
                except OSError as err:
                    yield ImageRecord(rid, path, n, error=CORRUPT_RECORD, detail=str(err))

    def units(self, unit, settings):  # two units: the format decides how a container is split
        return [unit, replace(unit, key=unit.key + "#again", limit=1)]

    def read_back(self, source, offsets, settings):
        with open(source) as f:
            lines = f.read().splitlines()
        for n in offsets:
            with open(lines[n], "rb") as image:
                yield image.read(), None, ""


@pytest.fixture
def lines_format():
    registry.register(Lines)
    yield registry.FORMATS["imglines"]
    del registry.FORMATS["imglines"]
    del registry._BY_EXTENSION[".imglines"]


def test_a_new_format_is_one_registered_class(tmp_path, lines_format):
    images = [jpeg(i) for i in range(3)]
    for i, data in enumerate(images):
        (tmp_path / f"{i}.bin").write_bytes(data)
    index = tmp_path / "in" / "all.imglines"
    index.parent.mkdir()
    index.write_text("".join(f"{tmp_path / f'{i}.bin'}\n" for i in range(3)))

    patterns, id_root, settings = plan_inputs([str(tmp_path / "in")])  # found by its extension
    assert id_root == str(tmp_path / "in")
    listed = [Listed(str(index), index.stat().st_size, "imglines", 0)]
    with beam.Pipeline() as p:
        units = p | beam.Create(listed) | FormUnits(id_root, settings)
        assert_that(units | beam.Map(lambda u: (u.kind, u.key, u.limit)),
                    equal_to([("imglines", f"imglines/{index}", None), ("imglines", f"imglines/{index}#again", 1)]))

    records = list(read_unit(ImageUnit(f"imglines/{index}", "imglines", (str(index),), id_root), settings))
    assert [(r.offset, r.data) for r in records] == list(enumerate(images))
    assert list(read_back(str(index), [0, 2])) == [(images[0], None, ""), (images[2], None, "")]


def test_the_parquet_format_checks_the_settings_at_launch(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "pixels": [jpeg(1)], "thumb": [jpeg(2)]}), tmp_path / "t.parquet")
    with pytest.raises(InputError, match="cannot tell which column holds image bytes"):
        plan_inputs([str(tmp_path)])
    with pytest.raises(InputError, match="no column 'image'"):
        plan_inputs([str(tmp_path)], ReadSettings(image_column="image"))
    assert plan_inputs([str(tmp_path)], ReadSettings(image_column="thumb"))[2].image_column == "thumb"
    pq.write_table(pa.table({"id": ["a"], "jpg": [jpeg(1)]}), tmp_path / "t.parquet")
    assert plan_inputs([str(tmp_path)])[2].image_column == "jpg"


def test_the_cli_offers_the_registered_formats():
    from ns_data.cli import main

    option = next(p for p in main.commands["label"].params if p.name == "input_format")
    assert list(option.type.choices) == ["auto", *registry.FORMATS]
