"""Progress lines on stderr for local runs: rows done per pass, rate, at most one line every few seconds.

The local runner may run a pass in several worker processes; their counts meet in a small file in the run's
temp dir (locked while it is updated), so every line shows the whole run's count, whichever process prints it.
"""
from __future__ import annotations

import os
import struct
import sys
import threading
import time

try:
    import fcntl
except ImportError:  # not POSIX: counts stay per process
    fcntl = None

_lock = threading.Lock()
_state: dict[str, list] = {}
_RECORD = struct.Struct("<qqdd")  # rows done, errors, started, last printed


class Progress:
    """Counts rows done in one named pass of a run; prints when enabled (local runs), silent otherwise.

    `shared_dir` (a local directory of the run) makes the count shared by all processes of the run."""

    def __init__(self, run_id: str, stage: str, total: int | None, enabled: bool, interval_s: float = 3.0,
                 unit: str = "rows", shared_dir: str | None = None):
        self.key = f"{run_id}/{stage}"
        self.stage = stage
        self.total = total
        self.enabled = enabled
        self.interval = interval_s
        self.unit = unit
        self.shared = (os.path.join(shared_dir, f"progress-{stage}.bin")
                       if shared_dir and fcntl is not None and os.path.isdir(shared_dir) else None)

    def _update(self, rows: int, errors: int, now: float) -> tuple[int, int, float] | None:
        """Adds the counts; returns (done, errors, started) when it is time to print."""
        with _lock:
            if self.shared is None:
                state = _state.setdefault(self.key, [0, 0, now, 0.0])
                return self._advance(state, rows, errors, now)
            fd = os.open(self.shared, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                raw = os.pread(fd, _RECORD.size, 0)
                state = list(_RECORD.unpack(raw)) if len(raw) == _RECORD.size else [0, 0, now, 0.0]
                due = self._advance(state, rows, errors, now)
                os.pwrite(fd, _RECORD.pack(*state), 0)
                return due
            finally:
                os.close(fd)

    def _advance(self, state: list, rows: int, errors: int, now: float) -> tuple[int, int, float] | None:
        state[0] += rows
        state[1] += errors
        done, failed, started, last = state
        if now - last < self.interval and (self.total is None or done + failed < self.total):
            return None
        state[3] = now
        return done, failed, started

    def add(self, rows: int, errors: int = 0) -> None:
        """Count `rows` done (and `errors` among them or besides them); print if it is time to."""
        if not self.enabled:
            return
        now = time.time()
        due = self._update(rows, errors, now)
        if due is None:
            return
        done, failed, started = due
        elapsed = now - started
        rate = done / elapsed if elapsed > 0.5 else None
        rate_text = "" if rate is None else (f"  {rate / 1e6:6.2f}M {self.unit}/s" if rate >= 1e5
                                             else f"  {rate:8.1f} {self.unit}/s")
        if self.total is None:
            count = f"{done:>13,} {self.unit}"
        else:
            pct = 100.0 * done / self.total if self.total else 100.0
            count = f"{done:>13,} / {self.total:,} {self.unit} ({pct:5.1f}%)"
        failed_text = f"  {failed:,} errors" if failed else ""
        print(f"  {self.stage:<10} {count}{rate_text}{failed_text}", file=sys.stderr, flush=True)
