"""A full disk is one line naming the path (and, for a checkpoint, the space it needs), and the same command
resumes once space is freed: on a small tmpfs filled up but for a few KB (mounting needs root; skipped, with the
reason, otherwise)."""
from __future__ import annotations

import os
import subprocess

import pytest
from click.testing import CliRunner

from ns_data.console import disk_full
from tests.test_lease import NS_DATA, files, labels  # noqa: F401 (a fixture)
from tests.test_shard import CLASSES as SHARD_CLASSES
from tests.test_shard import corpus  # noqa: F401 (a fixture)
from tests.test_train_cli import TINY, one_line_error, setup  # noqa: F401 (a fixture)

LEFT_FREE = 48 * 1024


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs (a checkpoint of the test model is 4.5 MB), filled but for LEFT_FREE bytes by `filler` (remove it to free the space)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    filler = disk / "filler"
    stat = os.statvfs(disk)
    with open(filler, "wb") as f:
        f.write(b"\0" * (stat.f_bavail * stat.f_frsize - LEFT_FREE))
    yield disk, filler
    subprocess.run(["umount", "--lazy", str(disk)], check=True)  # lazy: a failed run's files may still be open


def test_the_error_printer_finds_a_full_disk_in_a_chain_or_a_workers_text():
    try:
        try:
            raise OSError(28, "No space left on device", "/d/f")
        except OSError as err:
            raise RuntimeError("Rename operation failed") from err
    except RuntimeError as err:
        assert disk_full(err) == ("no space left on device writing /d/f; free some space and run the same command "
                                  "again (it resumes)")
    worker = RuntimeError("Traceback ...\n  OSError: [Errno 28] No space left on device: '/out/.tmp-x/a'\n...")
    assert disk_full(worker).startswith("no space left on device writing /out/.tmp-x/a;")
    assert disk_full(RuntimeError("[Errno 28] No space left on device"), "OUT").startswith(
        "no space left on device writing into OUT;")
    assert disk_full(ValueError("bad")) is None and disk_full(OSError(2, "No such file", "x")) is None


def test_a_training_on_a_full_disk_is_one_line_and_resumes(setup, small_disk):  # noqa: F811
    disk, filler = small_disk
    run = str(disk / "run")
    args = ["train", "--output", run, "--labeled", setup["labeled"], *TINY, "--checkpoint-every", "1"]
    failed = CliRunner().invoke(main_train(), args)
    assert failed.exit_code == 1 and "Traceback" not in failed.output, failed.output
    errors = [line for line in failed.output.splitlines() if not line.startswith("training ")]  # its plan first
    assert len(errors) == 1, failed.output
    error = errors[0]
    assert error.startswith(f"Error: no space left on device writing {run}/.tmp-train/checkpoint.pt: it needs about ")
    assert "MB free; free some space and run the same command again (it resumes)" in error
    assert sorted(os.listdir(run)) == [".tmp-train", "config.yaml", "metrics.jsonl"]
    assert sorted(os.listdir(os.path.join(run, ".tmp-train"))) == ["lease.json", "plan.json"]  # no half checkpoint
    filler.unlink()
    done = CliRunner().invoke(main_train(), args)
    assert done.exit_code == 0 and "step 2 of 2" in done.output, done.output


def main_train():
    from ns_train.cli import main

    return main


def test_balance_on_a_full_disk_is_one_line_and_resumes(labels, small_disk, tmp_path):  # noqa: F811
    disk, filler = small_disk
    args = [*labels, "--per-class", "300", "--no-progress", "--direct_num_workers", "1"]
    single = tmp_path / "single"
    assert subprocess.run([*NS_DATA, "balance", *args, "--output", str(single)], capture_output=True).returncode == 0
    out = str(disk / "out")
    failed = subprocess.run([*NS_DATA, "balance", *args, "--output", out], capture_output=True, text=True)
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: no space left on device writing ") and out in lines[0] \
        and lines[0].endswith("; free some space and run the same command again (it resumes)"), failed.stderr
    assert os.listdir(out) == [".tmp-balance"]  # nothing outside its temp dir
    filler.unlink()
    again = subprocess.run([*NS_DATA, "balance", *args, "--output", out], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert files(out) == files(single)


def test_an_export_to_a_full_disk_is_one_line(setup, small_disk):  # noqa: F811
    disk, _ = small_disk
    teacher = disk / "teacher.safetensors"
    error = one_line_error(["export", setup["run"], "--output", str(teacher)])
    assert error.startswith("Error: no space left on device writing ")
    assert not teacher.exists()


def test_shard_on_a_full_disk_is_one_line_and_resumes(corpus, small_disk, tmp_path):  # noqa: F811
    disk, filler = small_disk
    args = [corpus["selection"], "--num-shards", "5", "--num-classes", str(SHARD_CLASSES), "--no-progress",
            "--direct_num_workers", "1"]
    single = tmp_path / "single"
    assert subprocess.run([*NS_DATA, "shard", *args, "--output", str(single)], capture_output=True).returncode == 0
    out = str(disk / "out")
    failed = subprocess.run([*NS_DATA, "shard", *args, "--output", out], capture_output=True, text=True)
    assert failed.returncode == 1
    lines = [line for line in failed.stderr.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("Error: no space left on device writing ") and out in lines[0], \
        failed.stderr
    assert os.listdir(out) == [".tmp-shard"]  # nothing outside its temp dir
    filler.unlink()
    again = subprocess.run([*NS_DATA, "shard", *args, "--output", out], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-3000:]
    assert files(out) == files(single)
