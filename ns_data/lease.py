"""One writer per output: a run takes its output by creating a lease file in the output's temp dir.

The lease (`OUTPUT/.tmp-<stage>/lease.json`) names its holder: host, pid (and the process's start time, so a
reused pid is not taken for the holder), when it took the output, and a heartbeat that a thread of the holder
renews every `HEARTBEAT_S` seconds. A second run on the same output refuses in one line naming the holder. It
takes the output over only when the lease is stale: the holder's process has ended (same host), or the lease has
had no heartbeat for `STALE_AFTER_S` seconds (`NS_DATA_LEASE_STALE_S` overrides it). A run that only launches its
job (`runner.launch_only`: --no_wait_until_finish, a template) leaves the job's id in the lease, which then holds
until the job publishes the output (publishing removes the temp dir, lease included) or `--overwrite` breaks it.
`--overwrite` breaks any lease, and says whose. A lease of this very process (an earlier run in it that stopped)
is taken over without a word.

Creation is atomic on a local disk (O_CREAT | O_EXCL). Beam's filesystems have no create-if-absent (GCS's
`if_generation_match=0` is not exposed through `FileSystems.create`), so on an object store the lease is written
when absent and read back: of two runs that start within the same moment, both may go on. Taking over a stale
lease deletes it only if it is still the one judged stale, then creates a new one as above.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid

from ns_data import fs
from ns_data.stage import OutputExists

LEASE = "lease.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0

_HELD: dict[str, "Lease"] = {}  # this process's leases, by path


class OutputBusy(OutputExists):
    """Another run holds the output's lease."""


def stale_after() -> float:
    return float(os.environ.get("NS_DATA_LEASE_STALE_S", STALE_AFTER_S))


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def describe(holder: dict) -> str:
    """`host H, pid P, since T` (and the job it launched)."""
    text = f"host {holder.get('host')}, pid {holder.get('pid')}, since {_when(holder.get('since', 0))}"
    return text + (f", job {holder['job']}" if holder.get("job") else "")


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), which tells a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return None if fields[0] in "ZX" else fields[19]  # a zombie has ended
    except (OSError, IndexError):
        return None


def _alive(pid, start: str | None) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if os.path.exists(f"/proc/{pid}"):
        now = _start_time(pid)
        return now is not None and (start is None or now == start)
    return True


def _read(path: str) -> tuple[dict | None, float | None]:
    """The lease's content and its last heartbeat; (None, None) when it is gone or (being written) unreadable."""
    try:
        holder = fs.read_json(path)
    except (OSError, ValueError):
        return None, None
    beat = holder.get("heartbeat", holder.get("since", 0))
    if fs.is_local(path):
        try:
            beat = max(beat, os.stat(path).st_mtime)  # the local heartbeat touches the file
        except OSError:
            return None, None
    return holder, beat


def _ours(holder: dict) -> bool:
    return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()


def stale(holder: dict, beat: float, now: float | None = None) -> str | None:
    """Why the lease no longer holds, or None while it does."""
    if holder.get("job"):
        return None  # held while its job runs: that job's publish removes it
    if holder.get("host") == socket.gethostname() and not _alive(holder.get("pid"), holder.get("pid_start")):
        return "its process has ended"
    idle = (now or time.time()) - beat
    if idle > stale_after():
        return f"no heartbeat for {idle:,.0f} s"
    return None


def _create(path: str, data: bytes) -> bool:
    """Creates the file with `data` unless it exists; False when it does (another run was first). Locally the
    data is written under a name of its own, then hard-linked to `path` (which fails if `path` exists): the
    lease is never seen half written."""
    if fs.is_local(path):
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
        return True
    if fs.exists(path):
        return False
    with fs.create(path) as f:
        f.write(data)
    return fs.read_bytes(path) == data  # another run's write in between: theirs


class Lease:
    """A held lease: renewed by a daemon thread until released, its job recorded, or taken over."""

    def __init__(self, path: str, holder: dict):
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease {path}", daemon=True)
        self._thread.start()

    def _still_ours(self) -> bool:
        holder, _ = _read(self.path)
        return holder is not None and holder.get("token") == self.holder["token"]

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if not self._still_ours():
                    return  # published (the temp dir is gone), or broken by --overwrite
                if fs.is_local(self.path):
                    os.utime(self.path)
                else:
                    self.holder["heartbeat"] = time.time()
                    fs.write_json(self.path, self.holder)
            except OSError:
                return

    def record_job(self, job: str) -> None:
        """The job this launch left running: the lease holds for it, without heartbeats."""
        self._stop.set()
        if self._still_ours():
            fs.write_json(self.path, {**self.holder, "job": job})

    def release(self) -> None:
        """Stops the heartbeat; deletes the lease when it is still ours, and the temp dir when nothing else is in
        it (a run that refused or found its output complete leaves the output as it was)."""
        self._stop.set()
        _HELD.pop(self.path, None)
        if self._still_ours():
            fs.delete([self.path])
        directory = os.path.dirname(self.path)
        if fs.is_local(self.path):
            try:
                os.rmdir(directory)
            except OSError:
                pass


def take(tmp_dir: str, output: str, overwrite: bool, echo=None) -> Lease:
    """Takes the output's lease, or raises OutputBusy naming its holder. A stale lease is taken over, a live
    one only with `overwrite`; `echo` (default: stderr) says whose lease is broken or taken over."""
    echo = echo or (lambda m: print(m, file=sys.stderr, flush=True))
    path = fs.join(tmp_dir, LEASE)
    now = time.time()
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _start_time(os.getpid()),
              "since": now, "heartbeat": now, "token": uuid.uuid4().hex}
    data = json.dumps(holder, indent=1, sort_keys=True).encode()
    fs.mkdirs(tmp_dir)
    unreadable = 0
    for _ in range(100):
        if _create(path, data):
            earlier = _HELD.pop(path, None)
            if earlier is not None:
                earlier._stop.set()
            lease = _HELD[path] = Lease(path, holder)
            return lease
        current, beat = _read(path)
        if current is None:  # deleted meanwhile, or (on an object store) being written: look again, for a while
            unreadable += 1
            if unreadable > 20 and fs.exists(path):
                echo(f"taking over the lease of {output}: {path} has been unreadable for 2 s")
                fs.delete([path])
            time.sleep(0.1)
            continue
        reason = "an earlier run of this process" if _ours(current) else stale(current, beat)
        if reason is None and not overwrite:
            raise OutputBusy(f"{output} is being written by another run ({describe(current)}); wait for it to "
                             "finish, or pass --overwrite to break its lease")
        if not _ours(current):
            echo(f"taking over the lease of {output} from {describe(current)}: {reason}" if reason else
                 f"--overwrite breaks the lease of {output} held by {describe(current)}")
        again, _ = _read(path)
        if again is not None and again.get("token") == current.get("token"):
            fs.delete([path])
    raise OutputBusy(f"{output}: could not take its lease at {path}")


def held() -> list[Lease]:
    return list(_HELD.values())


def run_failed() -> None:
    """This process's run failed: its leases are given back (a rerun resumes from the temp dir)."""
    for lease in held():
        try:
            lease.release()
        except Exception:  # noqa: BLE001 - an unreachable lease is stale for the next run anyway
            _HELD.pop(lease.path, None)


def launched(job: str | None) -> None:
    """This process launched its job without waiting: its leases name the job (none to name: a dry run, which
    writes nothing, releases them)."""
    for lease in held():
        try:
            lease.record_job(job) if job else lease.release()
        except Exception:  # noqa: BLE001 - a lease this process can no longer reach is not this launch's
            _HELD.pop(lease.path, None)


def clear_dir(tmp_dir: str) -> None:
    """Deletes everything in the temp dir but the lease."""
    lease = fs.join(tmp_dir, LEASE)
    if fs.is_local(tmp_dir):
        for entry in os.scandir(tmp_dir) if os.path.isdir(tmp_dir) else ():
            if entry.name != LEASE:
                fs.delete_dir(entry.path) if entry.is_dir(follow_symlinks=False) else os.unlink(entry.path)
    else:
        fs.delete(p for p, _ in fs.match(fs.join(tmp_dir, "**")) if p != lease)


def published(tmp_dir: str) -> None:
    """The output was published (its temp dir, lease included, is gone): this process's heartbeat stops."""
    lease = _HELD.pop(fs.join(tmp_dir, LEASE), None)
    if lease is not None:
        lease._stop.set()
