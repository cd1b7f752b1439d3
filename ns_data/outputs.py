"""One output policy for every command: complete or absent, the same --overwrite, the same messages, resume.

A run writes into `OUTPUT/.tmp-<stage>/`, whose `plan.json` holds the fingerprint of the run's inputs and
options; it moves its files into OUTPUT when all are written, and writes the marker (stats.json, manifest.json,
...) last, with the same fingerprint. Starting a run over an existing OUTPUT:

| OUTPUT holds                                  | same inputs and options        | others                      |
|-----------------------------------------------|--------------------------------|-----------------------------|
| a complete output (the marker)                | "already complete; nothing to do" | error, unless --overwrite |
| an unfinished run (`.tmp-<stage>/plan.json`)  | resumed: the stage keeps what it finished | error, unless --overwrite |
| files of the stage but neither of the above   | error, unless --overwrite      | error, unless --overwrite   |

--overwrite deletes the marker first (the output is no longer complete), then the stage's files and temp dir.
Files that are not the stage's are never touched. A run holds the output's lease (`.tmp-<stage>/lease.json`,
ns_data.lease) from begin() until it publishes: a second run on the same output refuses, naming the holder.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ns_data import fs, lease
from ns_data.stage import OutputExists

PLAN = "plan.json"
NEW, RESUME, COMPLETE = "new", "resume", "complete"


def already_complete(output: str) -> str:
    return f"{output} is already complete for these inputs and options; nothing to do"


def resuming(output: str, stage: str) -> str:
    return f"{stage}: finishing an interrupted run in {output}"


@dataclass(frozen=True)
class StageOutput:
    """The output directory of one run of a stage: its state, its temp dir, and publishing it."""

    path: str
    stage: str
    marker: str
    patterns: tuple[str, ...]  # the stage's own files (replaced by --overwrite)
    fingerprint: str

    @property
    def tmp_dir(self) -> str:
        return fs.join(self.path, f".tmp-{self.stage}")

    def tmp(self, name: str) -> str:
        return fs.join(self.tmp_dir, name)

    def final(self, name: str) -> str:
        return fs.join(self.path, name)

    def _stage_files(self) -> list[str]:
        return [p for pattern in self.patterns for p in fs.list_dir(self.path, pattern)]

    def begin(self, overwrite: bool) -> str:
        """Takes the output's lease (one writer per output: ns_data.lease), then checks the output against the
        policy; returns NEW (temp dir ready), RESUME or COMPLETE (the lease given back)."""
        held = lease.take(self.tmp_dir, self.path, overwrite)
        try:
            found = next(((state, path) for state, path in ((COMPLETE, self.final(self.marker)),
                                                             (RESUME, self.tmp(PLAN))) if fs.exists(path)), None)
            if found and not overwrite:
                state, path = found
                if fs.read_json(path).get("fingerprint") == self.fingerprint:
                    if state == COMPLETE:
                        held.release()
                    return state
                held_by = f"a complete {self.stage} output" if state == COMPLETE else f"an unfinished {self.stage} run"
                raise OutputExists(f"{self.path} holds {held_by} of other inputs or options; pass --overwrite to "
                                   "replace it")
            if not found and (self._stage_files() or lease.others(self.tmp_dir)) and not overwrite:
                raise OutputExists(f"{self.path} already holds {self.stage} files; pass --overwrite to replace them")
            fs.delete([self.final(self.marker)])  # as clear(), keeping the lease
            fs.delete(self._stage_files())
            lease.clear_dir(self.tmp_dir)
            fs.write_json(self.tmp(PLAN), {"stage": self.stage, "fingerprint": self.fingerprint, "started": time.time()})
        except BaseException:
            held.release()
            raise
        return NEW

    def clear(self) -> None:
        """The marker first (the output is no longer complete), then the stage's files and temp dir."""
        fs.delete([self.final(self.marker)])
        fs.delete(self._stage_files())
        fs.delete_dir(self.tmp_dir)

    def publish(self, moves: list[tuple[str, str]], marker: dict) -> str:
        """Moves (temp path, final name) pairs into the output, writes the marker last, drops the temp dir."""
        fs.rename([src for src, _ in moves], [self.final(name) for _, name in moves])
        fs.write_json(self.final(self.marker), {**marker, "stage": self.stage, "fingerprint": self.fingerprint})
        fs.delete_dir(self.tmp_dir)
        lease.published(self.tmp_dir)
        return self.final(self.marker)

    def read_marker(self) -> dict:
        return fs.read_json(self.final(self.marker))
