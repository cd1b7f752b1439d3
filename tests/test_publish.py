"""Publishing and clean-up: requests counted on an object store, whole files, and outputs that any kill leaves
completable by the same command."""
from __future__ import annotations

import os

import pytest

from ns_data import fs
from tests.fake_store import FakeObjectStore


@pytest.fixture
def store(tmp_path):
    FakeObjectStore.root = str(tmp_path / "store")
    FakeObjectStore.requests.clear()
    os.makedirs(FakeObjectStore.root)
    yield "fakestore://bucket"
    FakeObjectStore.root = None


def put(path: str, data: bytes = b"x") -> str:
    with fs.create(path) as f:
        f.write(data)
    return path


def requests() -> dict:
    counts = dict(FakeObjectStore.requests)
    FakeObjectStore.requests.clear()
    return counts


def test_deletes_are_batched_and_ask_nothing_first(store):
    paths = [put(f"{store}/d/f{i:03d}") for i in range(250)]
    requests()
    fs.delete(paths + [f"{store}/d/missing"])  # a missing file is fine
    assert requests() == {"batch": 3}  # 251 objects in batches of 100, no metadata request
    assert not os.listdir(os.path.join(FakeObjectStore.root, "bucket", "d"))
    for i in range(250):
        put(f"{store}/tree/{i % 3}/f{i:03d}")
    requests()
    fs.delete_dir(f"{store}/tree")
    assert requests() == {"list": 1, "batch": 3}  # one listing, then batches
    assert not fs.match(f"{store}/tree/**")


def test_local_deletes_ignore_missing_files(tmp_path):
    kept = tmp_path / "kept"
    kept.write_bytes(b"k")
    gone = tmp_path / "gone"
    gone.write_bytes(b"g")
    fs.delete([str(gone), str(tmp_path / "never")])
    assert not gone.exists() and kept.exists()
    (tmp_path / "tree" / "a").mkdir(parents=True)
    (tmp_path / "tree" / "a" / "f").write_bytes(b"f")
    fs.delete_dir(str(tmp_path / "tree"))
    fs.delete_dir(str(tmp_path / "tree"))  # already gone: nothing to do
    assert not (tmp_path / "tree").exists()


def test_write_atomic_replaces_and_leaves_no_temp_file(tmp_path, store):
    target = tmp_path / "out" / "stats.json"
    fs.write_json(str(target), {"a": 1})
    fs.write_json(str(target), {"a": 2})
    assert fs.read_json(str(target)) == {"a": 2}
    assert os.listdir(target.parent) == ["stats.json"]
    fs.write_json(str(target), {"a": 3}, tmp=str(tmp_path / "elsewhere.tmp"))
    assert fs.read_json(str(target)) == {"a": 3} and not (tmp_path / "elsewhere.tmp").exists()
    requests()
    fs.write_json(f"{store}/out/stats.json", {"a": 1})
    fs.write_json(f"{store}/out/stats.json", {"a": 2})
    assert requests() == {"write": 2}  # an object appears whole when written: no temp name, no delete
    assert fs.read_json(f"{store}/out/stats.json") == {"a": 2}
