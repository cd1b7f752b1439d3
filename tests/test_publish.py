"""Publishing and clean-up: requests counted on an object store, whole files, and outputs that any kill leaves
completable by the same command."""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from ns_data import fs
from ns_data.cli import main
from ns_data.synth import write_images
from ns_data.outputs import COMPLETE, NEW, StageOutput
from ns_data.stage import OutputExists
from tests.fake_store import FakeObjectStore


@pytest.fixture
def store(object_store):
    return object_store


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


def staged(root: str, files: int, fingerprint: str = "f1") -> tuple[StageOutput, list[tuple[str, str]]]:
    """A new output with `files` data files written in its temp dir; (output, moves)."""
    out = StageOutput(root, "demo", "stats.json", ("data-*",), fingerprint)
    assert out.begin(overwrite=False) == NEW
    moves = [(put(out.tmp(f"part-{i:04d}"), f"p{i}".encode()), f"data-{i:04d}") for i in range(files)]
    return out, moves


def test_publish_and_clear_make_no_request_per_object(store):
    out, moves = staged(f"{store}/out", 250)
    requests()
    out.publish(moves, {"n": 250})
    made = requests()
    assert "stat" not in made and "read" not in made, made  # nothing asked per object
    # the plan and the marker written, one listing of the temp dir, 3 batches of renames (copy + delete each),
    # one listing and 3 batches deleting the temp dir
    assert sum(made.values()) <= 12, made
    assert len(fs.list_dir(f"{store}/out", "data-*")) == 250 and not fs.dir_exists(out.tmp_dir)
    requests()
    StageOutput(f"{store}/out", "demo", "stats.json", ("data-*",), "f2").begin(overwrite=True)
    made = requests()
    assert made.get("stat", 0) <= 2 and sum(made.values()) <= 12, made  # begin's two checks; clearing is batched
    assert not fs.list_dir(f"{store}/out", "data-*")


@pytest.mark.parametrize("moved", [0, 1, 2, 3])
def test_a_publish_interrupted_after_any_move_is_finished_by_begin(tmp_path, monkeypatch, moved):
    out, moves = staged(str(tmp_path / "out"), 3)
    real_rename = fs.rename

    def rename_then_die(sources, destinations):  # moves the first `moved` files, then the process "dies"
        real_rename(sources[:moved], destinations[:moved])
        raise KeyboardInterrupt

    monkeypatch.setattr(fs, "rename", rename_then_die)
    with pytest.raises(KeyboardInterrupt):
        out.publish(moves, {"n": 3})
    monkeypatch.setattr(fs, "rename", real_rename)
    assert not (tmp_path / "out" / "stats.json").exists()
    again = StageOutput(str(tmp_path / "out"), "demo", "stats.json", ("data-*",), "f1")
    assert again.begin(overwrite=False) == COMPLETE
    assert sorted(os.listdir(tmp_path / "out")) == ["data-0000", "data-0001", "data-0002", "stats.json"]
    assert [(tmp_path / "out" / f"data-{i:04d}").read_bytes() for i in range(3)] == [b"p0", b"p1", b"p2"]
    assert again.read_marker() == {"n": 3, "stage": "demo", "fingerprint": "f1"}


def test_a_run_killed_after_its_marker_leaves_no_temp_dir_behind(tmp_path, monkeypatch):
    out, moves = staged(str(tmp_path / "out"), 2)
    monkeypatch.setattr(fs, "delete_dir", lambda directory: None)  # killed before the temp dir went
    out.publish(moves, {"n": 2})
    monkeypatch.undo()
    assert (tmp_path / "out" / ".tmp-demo").exists()
    assert out.begin(overwrite=False) == COMPLETE
    assert sorted(os.listdir(tmp_path / "out")) == ["data-0000", "data-0001", "stats.json"]


def test_a_file_lost_during_publishing_is_one_line(tmp_path, monkeypatch):
    out, moves = staged(str(tmp_path / "out"), 2)
    monkeypatch.setattr(fs, "rename", lambda sources, destinations: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        out.publish(moves, {"n": 2})
    monkeypatch.undo()
    os.remove(out.tmp("part-0001"))  # neither in the temp dir nor in place
    with pytest.raises(OutputExists, match="data-0001.*--overwrite"):
        out.begin(overwrite=False)
    assert out.begin(overwrite=True) == NEW


# ------------------------------------------------------------------ a real process killed at a rename

STRACE = shutil.which("strace")
needs_strace = pytest.mark.skipif(STRACE is None, reason="strace is not installed (apt-get install strace): the "
                                                         "kill tests inject SIGKILL at a rename with it")
RENAME = re.compile(r'rename\("([^"]+)", "([^"]+)"\) = 0')
VOLATILE = {"wall_seconds", "images_per_second", "megabytes_per_second", "images_read_this_run", "resumed_units",
            "resumed_shards"}  # what a resumed run reports differently from a whole one
TEACHER10 = ["--teacher", "test_efficientnet", "--random-weights", "--num-classes", "10"]


def cli(*args) -> list[str]:
    return [sys.executable, "-m", "ns_data.cli", *(str(a) for a in args)]


def traced_renames(args: list[str], cwd) -> list[tuple[str, str]]:
    """Runs the command to the end under strace; the renames it made, in order."""
    log = os.path.join(cwd, "renames.log")
    subprocess.run([STRACE, "-f", "-qq", "-e", "trace=rename", "-o", log, *cli(*args)], cwd=cwd, check=True,
                   capture_output=True)
    with open(log) as f:
        return [m.groups() for m in map(RENAME.search, f) if m]


def killed_at_rename(args: list[str], cwd, n: int) -> None:
    """Runs the command with SIGKILL injected at its n-th rename."""
    proc = subprocess.run([STRACE, "-f", "-qq", "-o", os.devnull, "-e", "trace=rename",
                           "-e", f"inject=rename:signal=SIGKILL:when={n}", *cli(*args)], cwd=cwd, capture_output=True)
    assert proc.returncode != 0, f"the run was not killed at rename {n}"


def contents(directory) -> dict:
    """Every file below `directory`: bytes, or for the marker its JSON without the timings."""
    found = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, directory)
            if name in ("stats.json", "manifest.json"):
                found[rel] = {k: v for k, v in json.load(open(path)).items() if k not in VOLATILE}
            else:
                found[rel] = open(path, "rb").read()
    return found


def kill_points(renames: list[tuple[str, str]], output: str) -> list[int]:
    """1-based numbers of the renames to kill at: the publishing plan, the first, middle and last move, the marker,
    and the first and last file a writer renamed into the output before publishing."""
    plan = next(i for i, (_, dst) in enumerate(renames) if dst.endswith("publishing.json"))
    moves = list(range(plan + 1, len(renames) - 1))
    early = [i for i, (src, dst) in enumerate(renames[:plan]) if os.path.dirname(dst) == output and ".tmp-" in src]
    points = [plan, len(renames) - 1] + moves[:1] + moves[len(moves) // 2:][:1] + moves[-1:] + early[:1] + early[-1:]
    return sorted({p + 1 for p in points})


def check_every_kill_point(args: list[str], cwd, output: str, monkeypatch) -> list[int]:
    """An uninterrupted run, then for each kill point: a run killed there and the same command again, which
    must give the uninterrupted run's output (and leave no temp file beside it)."""
    renames = traced_renames(args, cwd)
    os.rename(os.path.join(cwd, output), os.path.join(cwd, f"{output}-whole"))
    want = contents(os.path.join(cwd, f"{output}-whole"))
    points = kill_points(renames, output)
    monkeypatch.chdir(cwd)
    for n in points:
        shutil.rmtree(os.path.join(cwd, output), ignore_errors=True)
        killed_at_rename(args, cwd, n)
        assert not os.path.exists(os.path.join(cwd, output, renames[-1][1].split("/")[-1])), n  # no marker yet
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, (n, result.output)
        assert contents(os.path.join(cwd, output)) == want, f"killed at rename {n} of {len(renames)}"
    return points


LABEL = ["label", "images", *TEACHER10, "--batch-size", "4", "--no-progress", "--output", "labels"]
BALANCE = ["balance", "labels", "--output", "selection", "--per-class", 3, "--min-confidence", 0, "--no-progress"]
SHARD = ["shard", "selection", "--output", "shards", "--num-shards", 3, "--no-progress"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder with 40 synthetic images (label makes 3 units of 16 images of them)."""
    root = tmp_path_factory.mktemp("kill")
    write_images(str(root / "images"), 40)
    return root


def made(root, monkeypatch, *commands) -> None:
    """Runs the commands (in-process) in `root`; each does nothing when its output is already complete."""
    monkeypatch.chdir(root)
    for args in commands:
        result = CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output


@needs_strace
def test_label_killed_at_any_rename_is_completed_by_a_rerun(images, monkeypatch):
    points = check_every_kill_point(LABEL, str(images), "labels", monkeypatch)
    assert len(points) >= 3  # plan, the move of the one labels file (units are merged by bytes), marker


@needs_strace
def test_balance_killed_at_any_rename_is_completed_by_a_rerun(images, monkeypatch):
    made(images, monkeypatch, LABEL)
    assert len(check_every_kill_point(BALANCE, str(images), "selection", monkeypatch)) >= 3  # plan, move, marker


@needs_strace
def test_shard_killed_at_any_rename_is_completed_by_a_rerun(images, monkeypatch):
    made(images, monkeypatch, LABEL, BALANCE)
    assert len(check_every_kill_point(SHARD, str(images), "shards", monkeypatch)) >= 4  # two shards, plan, marker


# ------------------------------------------------------------------ shard's finalize at scale

def test_shard_finalize_memory_stays_bounded_at_61k_shards_of_1000_classes():
    """61K shards (130M records at 256 MiB each) of 1,000 classes: the combined infos, the manifest's shard
    list and its JSON together stay far under 200 MB (their AsList of per-shard dicts was ~4.9 GB)."""
    import tracemalloc

    import numpy as np

    from ns_data.shard.manifest import ShardInfos, summarize_shards

    shards, classes = 61_000, 1_000
    rng = np.random.default_rng(0)
    labels = np.arange(classes, dtype=np.int64)
    per_shard = [rng.integers(1, 5, classes) for _ in range(8)]  # ~2,500 records a shard, every class
    combiner = ShardInfos()
    tracemalloc.start()
    parts = []
    for worker in range(4):  # four workers' partial combines, merged
        acc = combiner.create_accumulator()
        for shard in range(worker, shards, 4):
            counts = per_shard[shard % 8]
            acc = combiner.add_input(acc, (shard, int(counts.sum()), 256 * 2**20, labels, counts))
        parts.append(acc)
    infos = combiner.extract_output(combiner.merge_accumulators(parts))
    entries, totals = summarize_shards(infos, lambda s: f"train-{s:05d}-of-{shards:05d}.tfrecord")
    text = json.dumps({"shards": entries, "classes": totals}, indent=1, sort_keys=True)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert infos["shard"].tolist() == list(range(shards))
    assert sum(totals.values()) == int(infos["records"].sum()) == sum(int(per_shard[s % 8].sum())
                                                                       for s in range(shards))
    assert len(totals) == classes and len(entries) == shards
    assert len(text) < 8e6, len(text)
    assert peak < 100e6, f"finalize took {peak / 1e6:.0f} MB at {shards:,} shards"


# ------------------------------------------------------------------ a full device

@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs (tests run as root here); `remount(size)` gives it more room."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")

    def remount(size: str) -> None:
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mount)], check=True)

    yield mount, remount
    subprocess.run(["umount", "--lazy", str(mount)], check=False)  # a failed run may still hold a file open


def test_a_full_device_is_an_error_naming_the_file_and_leaves_no_temp_file(small_disk):
    disk, _ = small_disk
    fs.write_atomic(str(disk / "kept.bin"), b"k" * 1000)
    with pytest.raises(OSError, match="No space left on device.*same command again") as raised:
        fs.write_atomic(str(disk / "kept.bin"), b"x" * 200_000)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(disk / "kept.bin.tmp")
    assert os.listdir(disk) == ["kept.bin"] and (disk / "kept.bin").read_bytes() == b"k" * 1000
    with pytest.raises(OSError, match="No space left on device") as raised:
        with fs.create(str(disk / "sub" / "big.bin")) as f:
            for _ in range(100):
                f.write(b"y" * 10_000)
    assert raised.value.filename == str(disk / "sub" / "big.bin")


def test_shard_on_a_full_device_says_so_and_finishes_once_there_is_room(images, small_disk, monkeypatch):
    disk, remount = small_disk
    made(images, monkeypatch, LABEL, BALANCE, SHARD)
    output = str(disk / "shards")
    args = ["shard", "selection", "--num-shards", "3", "--output", output, "--no-progress"]
    failed = CliRunner().invoke(main, args)
    assert failed.exit_code != 0
    error = failed.output.strip().splitlines()[-1]  # one line, Error: ..., naming the file on the full device
    assert error.startswith("Error: ") and "no space left on device" in error.lower() and output in error, \
        failed.output
    assert not os.path.exists(os.path.join(output, "manifest.json"))
    remount("8m")
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    want = {k: v for k, v in contents(images / "shards").items() if k.endswith(".tfrecord")}
    got = contents(output)
    assert {k: v for k, v in got.items() if k.endswith(".tfrecord")} == want
    assert set(got) == set(want) | {"manifest.json"}  # no temp dir, no spill file left


def test_shard_on_an_object_store_asks_nothing_per_shard(images, store, monkeypatch):
    """Metadata requests and reads of a shard run on an object store do not grow with the number of shards:
    finalize reads no note back and asks about no shard (only a resumed run reads its finished shards' notes)."""
    made(images, monkeypatch, LABEL, BALANCE)
    asked = {}
    for shards in (2, 8):
        requests()
        made(images, monkeypatch, ["shard", "selection", "--num-shards", shards, "--no-progress",
                                   "--output", f"{store}/shards-{shards}"])
        counts = requests()
        asked[shards] = (counts.get("stat", 0), counts.get("read", 0))
        assert len(fs.list_dir(f"{store}/shards-{shards}", "train-*")) == shards
    assert asked[8] == asked[2], asked
