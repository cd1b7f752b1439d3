"""Finding training shards: the files of an `ns-data shard` output (refused while a run in it is unfinished) or
of any directory, glob or list of TFRecords. Neither torch nor TensorFlow: both readers (`ns_data.readers` for
PyTorch, `ns_data.tf_data` for tf.data) use it.
"""
from __future__ import annotations

from ns_data import contract, fs
from ns_data.stage import InputError

OTHER_SHARDS = "*.tfrecord"  # what a directory of TFRecords that `ns-data shard` did not write is read as


def list_shards(shards: str | list[str], allow_incomplete: bool = False) -> list[str]:
    """Shard files named by a list of paths, a glob, or a directory, sorted.

    A directory `ns-data shard` wrote gives the shards of its manifest.json, and is refused while a run in it is
    unfinished (`.tmp-shard/` and no manifest yet), unless `allow_incomplete`: then the shards already there.
    Any other directory (labeled TFRecords a user made) gives its *.tfrecord files.
    """
    if isinstance(shards, (list, tuple)):
        found = sorted(shards)
    elif fs.is_glob(shards) or fs.is_file(shards):
        found = [path for path, _ in fs.match(shards)]
    elif shard_manifest(shards) is not None or (not allow_incomplete and _unfinished(shards)):
        found = contract.SHARDS.data_files(shards)  # refuses an unfinished output
    else:
        found = fs.list_dir(shards, OTHER_SHARDS)
    if not found:
        raise InputError(f"no shards at {shards}")
    return found


def shard_manifest(shards: str) -> dict | None:
    """The manifest.json of a complete `ns-data shard` output (record count, teacher, ...); None for any other
    shards, even beside a manifest.json that another tool wrote."""
    return None if fs.is_glob(shards) else contract.SHARDS.state(shards)[1]


def _unfinished(directory: str) -> bool:
    """Whether a `shard` run is under way (or was killed) in `directory`: its temp dir is there."""
    return fs.dir_exists(fs.join(directory, contract.SHARDS.tmp_name))
