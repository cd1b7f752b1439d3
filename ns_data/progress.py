"""Progress lines on stderr for local runs: rows done per pass, rate, at most one line every few seconds."""
from __future__ import annotations

import sys
import threading
import time

_lock = threading.Lock()
_state: dict[str, list] = {}


class Progress:
    """Counts rows done in one named pass of a run; prints when enabled (local runs), silent otherwise."""

    def __init__(self, run_id: str, stage: str, total: int | None, enabled: bool, interval_s: float = 3.0,
                 unit: str = "rows"):
        self.key = f"{run_id}/{stage}"
        self.stage = stage
        self.total = total
        self.enabled = enabled
        self.interval = interval_s
        self.unit = unit

    def add(self, rows: int, errors: int = 0) -> None:
        """Count `rows` done (and `errors` among them or besides them); print if it is time to."""
        if not self.enabled:
            return
        now = time.monotonic()
        with _lock:
            done, started, last, failed = _state.setdefault(self.key, [0, now, 0.0, 0])
            done += rows
            failed += errors
            _state[self.key] = [done, started, last, failed]
            if now - last < self.interval and (self.total is None or done + failed < self.total):
                return
            _state[self.key][2] = now
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
