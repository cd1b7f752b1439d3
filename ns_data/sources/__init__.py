"""Where unlabeled images come from: image files, TFRecords of tf.Example, webdataset tars, Parquet bytes columns.

One module per input format (`files`, `tfrecord`, `tar`, `parquet`), each a class (`base.ImageFormat`) that
holds both halves of it: how `label` iterates a work unit of it, and how `shard` reads an image back from its
`source` and `offset`. `registry.FORMATS` holds them by name. Every image gets:

| format   | id (below the id root)                      | offset                          |
|----------|---------------------------------------------|---------------------------------|
| files    | the file's path                             | null                            |
| tfrecord | the container's path + '#' + record number  | byte offset of the record       |
| tar      | the container's path + '/' + member name    | byte offset of the member's data|
| parquet  | the `id` column if present, else the container's path + '#' + row | row index     |

`source` is the absolute URI of the file or container. `listing` finds the input files (every file listed is an
image, a container or an error record), `units` plans `label`'s work units from them, `read` reads a unit's
images and reads images back by source and offset.

The names below are what the other stages use.
"""
# Each format module registers its class when imported; FORMATS keeps this order (--max-images takes an
# input's files format by format in it).
from ns_data.sources import files  # noqa: F401
from ns_data.sources import tfrecord  # noqa: F401
from ns_data.sources import tar  # noqa: F401
from ns_data.sources import parquet  # noqa: F401
from ns_data.sources.base import ImageRecord, ImageUnit, ReadSettings
from ns_data.sources.read import read_back, read_unit
from ns_data.sources.units import PlanUnits, plan_inputs

__all__ = ["ImageRecord", "ImageUnit", "PlanUnits", "ReadSettings", "plan_inputs", "read_back", "read_unit"]
