"""Progress lines on stderr for local runs: rows done per pass, rate, at most one line every few seconds."""
from __future__ import annotations

import sys
import threading
import time

_lock = threading.Lock()
_state: dict[str, list] = {}


class Progress:
    """Counts rows done in one named pass of a run; prints when enabled (local runs), silent otherwise."""

    def __init__(self, run_id: str, stage: str, total_rows: int, enabled: bool, interval_s: float = 3.0):
        self.key = f"{run_id}/{stage}"
        self.stage = stage
        self.total = total_rows
        self.enabled = enabled
        self.interval = interval_s

    def add(self, rows: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        with _lock:
            done, started, last = _state.setdefault(self.key, [0, now, 0.0])
            done += rows
            _state[self.key] = [done, started, last]
            if now - last < self.interval and done < self.total:
                return
            _state[self.key][2] = now
        elapsed = now - started
        rate = f"  {done / elapsed / 1e6:6.2f}M rows/s" if elapsed > 0.5 else ""
        pct = 100.0 * done / self.total if self.total else 100.0
        print(f"  {self.stage:<10} {done:>13,} / {self.total:,} rows ({pct:5.1f}%){rate}", file=sys.stderr, flush=True)
