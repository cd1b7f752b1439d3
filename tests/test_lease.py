"""One writer per output (ns_data.lease): a second run on an output refuses in one line naming the holder, and
takes it over only when the lease is stale; checked on the lease itself, on a local disk and an object store, and
on real `ns-data balance`, `ns-data shard` and `ns-train train` processes run two at a time on one output."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems

from ns_data import fs, lease
from ns_data.outputs import NEW, StageOutput
from tests.conftest import random_table, write_parts
from tests.fake_store import PREFIX, FakeObjectStore
from tests.test_shard import CLASSES as SHARD_CLASSES
from tests.test_shard import corpus  # noqa: F401 (a fixture)
from tests.test_train_resume import ENV as TRAIN_ENV
from tests.test_train_resume import STEPS as TRAIN_STEPS
from tests.test_train_resume import command as train_command
from tests.test_train_resume import data  # noqa: F401 (a fixture)
from tests.test_train_resume import logged_steps


def write_lease(tmp_dir, **holder) -> str:
    os.makedirs(tmp_dir, exist_ok=True)
    path = os.path.join(tmp_dir, lease.LEASE)
    now = time.time()
    with open(path, "w") as f:
        json.dump({"host": socket.gethostname(), "since": now, "heartbeat": now, "token": "theirs"} | holder, f)
    return path


@pytest.fixture
def sleeper():
    """A live process of another pid."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_live_holder_is_refused_in_one_line_naming_it(tmp_path, sleeper):
    tmp_dir = tmp_path / "out" / ".tmp-x"
    write_lease(tmp_dir, pid=sleeper.pid, since=0.0)
    with pytest.raises(lease.OutputBusy) as refused:
        lease.take(str(tmp_dir), str(tmp_path / "out"), overwrite=False)
    message = str(refused.value)
    assert "\n" not in message
    assert message == (f"{tmp_path / 'out'} is being written by another run (host {socket.gethostname()}, pid "
                       f"{sleeper.pid}, since 1970-01-01 00:00:00 UTC); wait for it to finish, or pass --overwrite "
                       "to break its lease")
    assert json.loads((tmp_dir / lease.LEASE).read_text())["token"] == "theirs"  # untouched


def test_overwrite_breaks_a_live_lease_and_says_whose(tmp_path, sleeper):
    tmp_dir = tmp_path / ".tmp-x"
    write_lease(tmp_dir, pid=sleeper.pid)
    said = []
    held = lease.take(str(tmp_dir), "OUT", overwrite=True, echo=said.append)
    assert len(said) == 1
    assert said[0].startswith(f"--overwrite breaks the lease of OUT held by host {socket.gethostname()}, pid "
                              f"{sleeper.pid}, since ")
    assert json.loads((tmp_dir / lease.LEASE).read_text())["pid"] == os.getpid()
    held.release()


def test_a_dead_holder_or_a_silent_one_is_taken_over(tmp_path, sleeper, monkeypatch):
    tmp_dir = tmp_path / ".tmp-x"
    sleeper.kill()
    sleeper.wait()
    write_lease(tmp_dir, pid=sleeper.pid)
    said = []
    held = lease.take(str(tmp_dir), "OUT", overwrite=False, echo=said.append)
    assert len(said) == 1 and said[0].endswith(": its process has ended") and f"pid {sleeper.pid}" in said[0]
    held.release()
    assert not tmp_dir.exists()  # nothing else was in it
    # another host's holder: only its heartbeat tells
    write_lease(tmp_dir, host="elsewhere", pid=1, heartbeat=time.time() - 30)
    os.utime(tmp_dir / lease.LEASE, (time.time() - 30, time.time() - 30))
    with pytest.raises(lease.OutputBusy, match="host elsewhere, pid 1"):
        lease.take(str(tmp_dir), "OUT", overwrite=False)
    monkeypatch.setenv("NS_DATA_LEASE_STALE_S", "10")
    said.clear()
    lease.take(str(tmp_dir), "OUT", overwrite=False, echo=said.append).release()
    assert len(said) == 1 and said[0].startswith("taking over the lease of OUT from host elsewhere, pid 1")
    assert said[0].endswith("no heartbeat for 30 s")


def test_a_launched_job_holds_the_lease_until_overwrite(tmp_path, sleeper):
    tmp_dir = tmp_path / ".tmp-x"
    held = lease.take(str(tmp_dir), "OUT", overwrite=False)
    lease.launched("2026-12-06_job")
    holder = json.loads((tmp_dir / lease.LEASE).read_text())
    assert holder["job"] == "2026-12-06_job" and holder["pid"] == os.getpid()
    write_lease(tmp_dir, pid=sleeper.pid, job="2026-12-06_job")  # as when the launcher's process has ended
    sleeper.kill()
    sleeper.wait()
    with pytest.raises(lease.OutputBusy, match=f"pid {sleeper.pid}, since .*, job 2026-12-06_job"):
        lease.take(str(tmp_dir), "OUT", overwrite=False)
    said = []
    lease.take(str(tmp_dir), "OUT", overwrite=True, echo=said.append).release()
    assert said[0].startswith("--overwrite breaks the lease of OUT") and said[0].endswith("job 2026-12-06_job")
    held.release()


def test_a_dry_run_releases_its_lease(tmp_path):
    lease.take(str(tmp_path / ".tmp-x"), "OUT", overwrite=False)
    lease.launched(None)
    assert not (tmp_path / ".tmp-x").exists() and not lease.held()


def test_this_process_takes_its_own_lease_over_silently_and_the_heartbeat_renews_it(tmp_path, monkeypatch):
    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    tmp_dir = tmp_path / ".tmp-x"
    said = []
    first = lease.take(str(tmp_dir), "OUT", overwrite=False, echo=said.append)
    path = tmp_dir / lease.LEASE
    os.utime(path, (1, 1))
    deadline = time.time() + 10
    while os.stat(path).st_mtime < 2 and time.time() < deadline:
        time.sleep(0.02)
    assert os.stat(path).st_mtime > time.time() - 5  # renewed
    second = lease.take(str(tmp_dir), "OUT", overwrite=False, echo=said.append)
    assert said == [] and json.loads(path.read_text())["token"] == second.holder["token"]
    first._thread.join(timeout=5)
    assert not first._thread.is_alive()  # the earlier lease's heartbeat stopped
    second.release()
    assert not tmp_dir.exists()


def test_a_run_killed_while_creating_its_lease_leaves_nothing_in_the_way(tmp_path):
    """Killed between writing the lease under its own name and linking it: the next run starts NEW."""
    tmp_dir = tmp_path / "out" / ".tmp-x"
    tmp_dir.mkdir(parents=True)
    (tmp_dir / f"{lease.LEASE}.tmp-999999").write_text("{}")
    out = StageOutput(str(tmp_path / "out"), "x", "marker.json", ("x-*",), "f1")
    assert out.begin(False) == NEW
    assert sorted(os.listdir(tmp_dir)) == [lease.LEASE, "plan.json"]
    lease.held()[0].release()


def test_stage_output_holds_the_lease_from_begin_to_publish(tmp_path, sleeper):
    out = StageOutput(str(tmp_path / "out"), "x", "marker.json", ("x-*",), "f1")
    assert out.begin(False) == NEW
    assert (tmp_path / "out" / ".tmp-x" / lease.LEASE).exists()
    out.publish([], {})
    assert sorted(os.listdir(tmp_path / "out")) == ["marker.json"] and not lease.held()
    # a refusal (another fingerprint) leaves the output as it was
    other = StageOutput(str(tmp_path / "out"), "x", "marker.json", ("x-*",), "f2")
    with pytest.raises(Exception, match="pass --overwrite"):
        other.begin(False)
    assert sorted(os.listdir(tmp_path / "out")) == ["marker.json"]
    write_lease(tmp_path / "out" / ".tmp-x", pid=sleeper.pid)
    with pytest.raises(lease.OutputBusy, match=f"pid {sleeper.pid}"):
        other.begin(False)
    assert (tmp_path / "out" / "marker.json").exists()


@pytest.fixture
def object_store(tmp_path):
    FakeObjectStore.root = str(tmp_path / "store")
    os.makedirs(FakeObjectStore.root)
    yield PREFIX + "bucket"
    FakeObjectStore.root = None


def test_the_lease_on_an_object_store(object_store, sleeper):
    tmp_dir = object_store + "/out/.tmp-x"
    held = lease.take(tmp_dir, "OUT", overwrite=False)
    path = tmp_dir + "/" + lease.LEASE
    assert FileSystems.exists(path)
    fs.write_json(path, fs.read_json(path) | {"host": "elsewhere", "token": "theirs"})  # another host's live run
    with pytest.raises(lease.OutputBusy, match="host elsewhere"):
        lease.take(tmp_dir, "OUT", overwrite=False)
    held.release()  # no longer ours: left in place
    assert FileSystems.exists(path)
    lease.take(tmp_dir, "OUT", overwrite=True, echo=lambda m: None).release()
    assert not FileSystems.exists(path)


# ------------------------------------------------------------------------------------------- real commands


TIMINGS = ("wall_seconds", "megabytes_per_second", "images_per_second")  # a marker's measures of the run, not of its output


def files(directory) -> dict[str, bytes]:
    """Every file's bytes; in the marker (JSON), the output's own path made OUTPUT and the timings left out."""
    found = {}
    for name in sorted(os.listdir(directory)):
        data = open(os.path.join(directory, name), "rb").read()
        if name.endswith(".json"):
            marker = {k: v for k, v in json.loads(data.replace(str(directory).encode(), b"OUTPUT")).items()
                      if k not in TIMINGS}
            data = json.dumps(marker, sort_keys=True).encode()
        found[name] = data
    return found


def wait_for_lease(proc: subprocess.Popen, tmp_dir) -> None:
    deadline = time.monotonic() + 300
    while not os.path.exists(os.path.join(tmp_dir, lease.LEASE)):
        assert proc.poll() is None, f"it ended before taking its lease: {proc.communicate()[1][-3000:]}"
        assert time.monotonic() < deadline
        time.sleep(0.005)


def two_runs(command: list[str], output, tmp_name: str, env=None) -> tuple[subprocess.CompletedProcess, str]:
    """The command, paused once it holds the output's lease, and the same command meanwhile; then the first
    goes on. Returns the second run and the first one's stderr."""
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_for_lease(first, os.path.join(output, tmp_name))
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    finally:
        first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert second.returncode == 1, second.stderr[-3000:]
    lines = second.stderr.strip().splitlines()
    assert lines and "since " in lines[0], second.stderr
    assert lines == [f"Error: {output} is being written by another run (host {socket.gethostname()}, pid "
                     f"{first.pid}, since {lines[0].split('since ')[1].split(')')[0]}); wait for it to finish, or "
                     "pass --overwrite to break its lease"], second.stderr
    return second, err


def killed_then_again(command: list[str], output, tmp_name: str, env=None) -> subprocess.CompletedProcess:
    """The command SIGKILLed once it holds the lease, then the same command: it takes the lease over."""
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    wait_for_lease(first, os.path.join(output, tmp_name))
    first.send_signal(signal.SIGKILL)
    first.wait()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"taking over the lease of {output} from host {socket.gethostname()}, pid {first.pid}, since " \
           in again.stderr and ": its process has ended" in again.stderr
    return again


NS_DATA = [sys.executable, "-m", "ns_data.cli"]


@pytest.fixture(scope="module")
def labels(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    return write_parts(random_table(np.random.default_rng(5), 3000, 4), root, 2, 500)


def one_writer(stage: str, args: list[str], tmp_path) -> None:
    """Two runs of `stage` on one output, and a run killed then started again: each output equals a single run's."""
    single = tmp_path / "single"
    done = subprocess.run([*NS_DATA, stage, *args, "--output", str(single)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = str(tmp_path / "out")
    two_runs([*NS_DATA, stage, *args, "--output", out], out, f".tmp-{stage}")
    assert files(out) == files(single)
    out = str(tmp_path / "killed")
    killed_then_again([*NS_DATA, stage, *args, "--output", out], out, f".tmp-{stage}")
    assert files(out) == files(single)


def test_two_balance_runs_on_one_output(labels, tmp_path):
    one_writer("balance", [*labels, "--per-class", "300", "--direct_num_workers", "1"], tmp_path)


def test_two_shard_runs_on_one_output(corpus, tmp_path):  # noqa: F811
    one_writer("shard", [corpus["selection"], "--num-shards", "5", "--num-classes", str(SHARD_CLASSES),
                         "--no-progress", "--direct_num_workers", "1"], tmp_path)


def test_two_trainings_on_one_run_directory(tmp_path, data):  # noqa: F811
    """The second refuses; the first finishes with each step logged once; a killed one is taken over."""
    run = str(tmp_path / "run")
    two_runs(train_command(data, run, workers=0), run, ".tmp-train", env=TRAIN_ENV)
    assert logged_steps(run) == list(range(1, TRAIN_STEPS + 1))
    killed = str(tmp_path / "killed")
    killed_then_again(train_command(data, killed, workers=0), killed, ".tmp-train", env=TRAIN_ENV)
    assert logged_steps(killed) == list(range(1, TRAIN_STEPS + 1))


def test_two_label_runs_on_one_output(tmp_path):
    from ns_data.synth import write_images
    from tests.test_seams import label_command

    def command(output) -> list[str]:
        return [*NS_DATA, "label", *label_command(tmp_path / "images", output)[3:]]  # as `ns-data label`

    write_images(str(tmp_path / "images"), 64, width=96, height=64)
    single = tmp_path / "single"
    done = subprocess.run(command(single), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = str(tmp_path / "out")
    two_runs(command(out), out, ".tmp-label")
    assert files(out) == files(single)
