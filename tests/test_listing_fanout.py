"""label's listing inside the pipeline: fanned out over directories and prefixes, and a stream.

`sources.listing.ListInputs` lists each input's top levels one at a time and spreads the directories (or prefixes) found
there over the workers; what it finds must be what one walk of each input finds (`match_input`), faults and
repeats included. A listing holds a page (object stores) or one branch of open directories (local), never the
whole listing: checked by counting what the filesystem had produced when the first path came out.
"""
from __future__ import annotations

import os
import sys
import tracemalloc
from pathlib import Path

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from ns_data.sources.listing import (Branch, InputPattern, ListInputs, Prefix, Subdir, input_kind, list_branch,
                                     mark_repeats, match_input)
from ns_data.sources.registry import kind_of

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
from gcs_emulator import CountingEmulator  # noqa: E402


def touch(path, data: bytes = b"x") -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


@pytest.fixture
def tree(tmp_path):
    """Images three levels deep beside every kind of fault: links to a file and to a directory outside, a dangling
    link, a self loop, a link back up, a FIFO, a name that is not UTF-8, a file that is not an image."""
    d = tmp_path / "in"
    for a in range(3):
        for b in range(2):
            for c in range(2):
                touch(d / f"a{a}" / f"b{b}" / f"c{c}" / f"x{a}{b}{c}.jpg")
            touch(d / f"a{a}" / f"b{b}" / f"y{a}{b}.jpg")
        touch(d / f"a{a}" / f"z{a}.tfrecord")
    touch(d / "top.jpg")
    touch(d / "notes.txt")
    touch(tmp_path / "elsewhere" / "deep" / "t.jpg")
    os.symlink("top.jpg", d / "link.jpg")
    os.symlink(tmp_path / "elsewhere", d / "a1" / "linked")
    os.symlink("nowhere.jpg", d / "a0" / "dangling.jpg")
    os.symlink("self.jpg", d / "a2" / "b1" / "self.jpg")
    os.symlink("../..", d / "a2" / "b0" / "up")
    os.mkfifo(d / "a0" / "b0" / "pipe.jpg")
    touch(os.path.join(os.fsencode(d / "a1"), b"caf\xe9.jpg"))
    return d


def one_walk(patterns, input_format="auto"):
    """What today's one-call listing of each pattern gives, grouped by path as the pipeline groups it."""
    by_path: dict = {}
    for pattern in patterns:
        for path, size, reason, detail in match_input(pattern.pattern):
            kind = input_kind(path, reason, input_format)
            if kind:
                by_path.setdefault(os.path.abspath(path), []).append((pattern.index, size, kind, reason, detail))
    return [listed for element in by_path.items() for listed in mark_repeats(element)]


def fanned_out(patterns, split_levels):
    """What ListInputs finds (checked equal to `one_walk`), and how many branches it spread (its counter)."""
    p = BeamTestPipeline()
    listed = (p
              | ListInputs(patterns, "auto", split_levels)
              | beam.GroupByKey()
              | beam.FlatMap(mark_repeats))
    expected = one_walk(patterns)
    assert_that(listed, equal_to(expected))
    result = p.run()
    result.wait_until_finish()
    spread = result.metrics().query(MetricsFilter().with_name("listing_branches"))["counters"]
    return expected, sum(c.committed for c in spread)


@pytest.mark.parametrize("split_levels", [0, 1, 2, 3])
def test_the_fanned_out_listing_finds_what_one_walk_finds(tree, split_levels):
    patterns = (InputPattern(0, f"{tree}/**"), InputPattern(1, f"{tree}/a1/**"),  # a1's files repeat
                InputPattern(2, f"{tree}/*/*/*.jpg"), InputPattern(3, f"{tree}/*/b0/**"),
                InputPattern(4, f"{tree}/top.jpg"))
    expected, spread = fanned_out(patterns, split_levels)
    # one split level: a0-a2 below in/ for three patterns, b0, b1 and linked below in/a1; none without a split
    assert spread == {0: 0, 1: 12}.get(split_levels, spread) and (spread > 12) == (split_levels > 1)
    reasons = {os.path.relpath(e.path, tree): e.reason for e in expected if e.reason}
    assert reasons == {"a0/dangling.jpg": "dangling_link", "a2/b1/self.jpg": "symlink_loop",
                       "a2/b0/up": "symlink_loop", "a0/b0/pipe.jpg": "not_a_regular_file",
                       "a1/caf\\xe9.jpg": "non_utf8_name"}
    assert any(e.repeated for e in expected) and any(e.kind == "tfrecord" for e in expected)
    assert {"a1/linked/deep/t.jpg", "link.jpg"} <= {os.path.relpath(e.path, tree) for e in expected}


def test_a_split_lists_one_level_and_hands_on_the_directories(tree, monkeypatch):
    calls = []
    scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path: calls.append(str(path)) or scandir(path))
    out = list(list_branch(Branch(InputPattern(0, f"{tree}/**")), "auto", split=True))
    assert calls == [str(tree)]
    handed_on = sorted(os.path.relpath(o.value.at.path, tree) for o in out if hasattr(o, "tag"))
    assert handed_on == ["a0", "a1", "a2"]  # a file link is listed here; directories are branches
    assert sorted(os.path.relpath(o[0], tree) for o in out if not hasattr(o, "tag")) == ["link.jpg", "top.jpg"]
    # a branch walks below where it starts, carrying the directories above it (a link back up is a loop)
    (a2,) = [o.value for o in out if hasattr(o, "tag") and o.value.at.path.endswith("a2")]
    assert isinstance(a2.at, Subdir) and len(a2.at.above) == 1
    found = {os.path.relpath(p, tree): r for p, (_, _, _, r, _) in list_branch(a2, "auto")}
    assert found["a2/b0/up"] == "symlink_loop" and found["a2/b0/c1/x201.jpg"] == ""


def test_a_local_listing_holds_the_same_memory_for_more_files(tmp_path):
    def peak(n: int) -> int:
        d = tmp_path / str(n)
        for i in range(n):
            touch(d / f"s{i % 10}" / f"f{i:06d}.jpg")
        tracemalloc.start()
        count = sum(1 for _ in match_input(f"{d}/**"))
        _, high = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert count == n
        return high

    small, large = peak(500), peak(5000)
    assert large < small * 1.5 + 50_000, (small, large)


def test_an_object_store_listing_streams_the_filesystems_listing(object_store, monkeypatch):
    from tests.fake_store import FakeObjectStore

    for i in range(50):
        touch(os.path.join(FakeObjectStore.root, "bucket", "in", f"s{i % 5}", f"f{i:03d}.jpg"))
    produced = []
    objects = FakeObjectStore._objects

    def listing(self, prefix):  # what a paging client does: an object at a time
        for m in objects(self, prefix):
            produced.append(m.path)
            yield m

    monkeypatch.setattr(FakeObjectStore, "_list", listing)
    found = match_input(f"{object_store}/in/**")
    first = next(found)
    assert len(produced) == 1 and first[0] == produced[0]
    assert 1 + sum(1 for _ in found) == 50


@pytest.fixture(scope="module")
def emulator():
    with CountingEmulator("bucket") as emu:
        emu.put([f"d/s{i % 7}/t{i % 3}/f{i:05d}.jpg" for i in range(2500)] + ["d/top.jpg", "d/x.txt", "e/a.jpg"])
        yield emu


def test_a_gcs_listing_asks_for_one_page_at_a_time(emulator):
    emulator.reset()
    found = match_input("gs://bucket/d/**")
    next(found)
    assert emulator.counts().get("objects.list") == 1  # 2,502 objects: 3 pages, 1 asked for so far
    assert 1 + sum(1 for _ in found) == 2502
    assert emulator.counts()["objects.list"] == 3


@pytest.mark.parametrize("pattern", ["gs://bucket/**", "gs://bucket/d/*/*/*.jpg", "gs://bucket/d/*.jpg",
                                     "gs://bucket/d/s1/**", "gs://bucket/d/top.jpg"])
def test_a_fanned_out_gcs_listing_finds_what_beams_match_finds(emulator, pattern):
    from apache_beam.io.filesystems import FileSystems

    matched = sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)
    assert sorted(p for p, *_ in match_input(pattern)) == matched
    with BeamTestPipeline() as p:
        paths = p | ListInputs((InputPattern(0, pattern),), "auto") | beam.Keys()
        assert_that(paths, equal_to([m for m in matched if kind_of(m, "auto")]))


def test_a_gcs_split_lists_one_level_and_only_prefixes_that_can_hold_a_match(emulator):
    emulator.reset()
    out = list(list_branch(Branch(InputPattern(0, "gs://bucket/d/*.jpg")), "auto", split=True))
    assert [o[0] for o in out] == ["gs://bucket/d/top.jpg"]  # no prefix below d/ can hold a match of d/*.jpg
    assert emulator.counts() == {"objects.list": 1}
    out = list(list_branch(Branch(InputPattern(0, "gs://bucket/d/**")), "auto", split=True))
    assert sorted(o.value.at.path for o in out if hasattr(o, "tag")) == [f"gs://bucket/d/s{i}/" for i in range(7)]
    assert all(isinstance(o.value.at, Prefix) for o in out if hasattr(o, "tag"))


def test_the_launchers_check_of_a_gcs_input_lists_one_page(emulator):
    from ns_data.sources.units import plan_inputs

    emulator.reset()
    (pattern,), root, _ = plan_inputs(["gs://bucket/d"])
    assert pattern.pattern == "gs://bucket/d/**" and root == "gs://bucket/d"
    assert emulator.counts().get("objects.list") == 1  # its first 1,000 of 2,502 objects, not all of them
