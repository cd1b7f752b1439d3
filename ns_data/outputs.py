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

Publishing is idempotent. Before it moves anything, `publish` writes its moves and the marker to the temp dir
(`publishing.json`); a run killed at any instant after that (during the moves, before the marker, before the
temp dir is gone) is completed by the next run's `begin`, which finishes the same moves and writes the same
marker without redoing the stage's work. Finishing takes one listing of the temp dir (the moves whose source is
still there are done again; a rename replaces its destination) and, only if some sources are gone, one listing
of the output to check that they arrived. No request is made per file to ask whether it exists.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from ns_data import contract, fs, lease
from ns_data.stage import InputError, OutputExists

PLAN = "plan.json"
PUBLISHING = "publishing.json"  # the moves and the marker of a publish under way
LISTING = "listing.json"  # what the first run of a fingerprint listed of its inputs
NEW, RESUME, COMPLETE = "new", "resume", "complete"


def already_complete(output: str) -> str:
    return f"{output} is already complete for these inputs and options; nothing to do"


def resuming(output: str, stage: str) -> str:
    return f"{stage}: finishing an interrupted run in {output}"


def check_listing(summary: tuple[int, int], tmp_dir: str, counted: str = "units") -> int:
    """For a run whose fingerprint holds its input patterns, not the files they match: records the listing's
    (number of `counted` things, bytes) in the temp dir (LISTING) on the run's first pass; on a resumed run,
    stops with an error if they differ from the recorded ones (the inputs changed under the same patterns; a
    changed file of the same size is not seen). Returns the number."""
    count, nbytes = summary
    path = fs.join(tmp_dir, LISTING)
    now = {counted: count, "bytes": nbytes}
    if fs.exists(path):
        before = fs.read_json(path)
        if before != now:
            raise InputError(f"the inputs changed since the interrupted run in {tmp_dir} began "
                             f"({before.get(counted, 0):,} {counted} of {before.get('bytes', 0):,} bytes then, "
                             f"{count:,} of {nbytes:,} now); pass --overwrite to start over")
    else:
        fs.write_json(path, now)
    return count


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
        return fs.join(self.path, contract.tmp_dir_name(self.stage))

    def tmp(self, name: str) -> str:
        return fs.join(self.tmp_dir, name)

    def final(self, name: str) -> str:
        return fs.join(self.path, name)

    def _stage_files(self) -> list[str]:
        return [p for pattern in self.patterns for p in fs.list_dir(self.path, pattern)]

    def begin(self, overwrite: bool) -> str:
        """Takes the output's lease (one writer per output: ns_data.lease), then checks the output against the
        policy; returns NEW (temp dir ready), RESUME or COMPLETE (the lease given back). An interrupted publish of
        the same inputs and options is finished here: the output is then COMPLETE."""
        held = lease.take(self.tmp_dir, self.path, overwrite)
        try:
            found = next(((state, path) for state, path in ((COMPLETE, self.final(self.marker)),
                                                             (RESUME, self.tmp(PLAN))) if fs.exists(path)), None)
            if found and not overwrite:
                state, path = found
                if fs.read_json(path).get("fingerprint") == self.fingerprint:
                    if state == COMPLETE:
                        lease.clear_dir(self.tmp_dir)  # a run killed after its marker, before dropping its temp dir
                        held.release()
                    elif fs.exists(self.tmp(PUBLISHING)):
                        self._finish_publishing(fs.read_json(self.tmp(PUBLISHING)))
                        return COMPLETE
                    return state
                held_by = f"a complete {self.stage} output" if state == COMPLETE else f"an unfinished {self.stage} run"
                raise OutputExists(f"{self.path} holds {held_by} of other inputs or options; pass --overwrite to "
                                   "replace it")
            # A temp dir without its plan is a run killed before it began work (begin writes the plan first):
            # nothing in it is worth keeping, and it is cleared below. Data files without a marker are refused.
            if not found and self._stage_files() and not overwrite:
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
        """Moves (temp path, final name) pairs into the output, writes the marker last, drops the temp dir.

        The moves and the marker are written to the temp dir first, so that a run killed at any instant of this
        is finished by the next run's `begin` (see the module docstring)."""
        prefix = self.tmp_dir.rstrip("/") + "/"
        outside = [src for src, _ in moves if not src.startswith(prefix)]
        if outside:
            raise ValueError(f"publish moves files from the temp dir {self.tmp_dir} only, not {outside[0]}")
        plan = {"moves": [[src[len(prefix):], name] for src, name in moves],
                "marker": {**marker, "stage": self.stage, "fingerprint": self.fingerprint}}
        fs.write_json(self.tmp(PUBLISHING), plan)
        return self._finish_publishing(plan)

    def _finish_publishing(self, plan: dict) -> str:
        """The moves of `plan` not done yet, the marker, then the temp dir dropped; safe to repeat."""
        prefix = self.tmp_dir.rstrip("/") + "/"
        below = f"/{contract.tmp_dir_name(self.stage)}/"  # names below the temp dir, however the listing spells its scheme
        left = {path.split(below, 1)[-1] for path, _ in fs.match(prefix + "**")}
        todo = [(src, name) for src, name in plan["moves"] if src in left]
        gone = [name for src, name in plan["moves"] if src not in left]
        if gone:
            there = {fs.name(path) for path, _ in fs.match(fs.join(self.path, "*"))}
            lost = [name for name in gone if name not in there]
            if lost:
                raise OutputExists(f"{self.path}: an interrupted publish lost {self.final(lost[0])} (neither in the "
                                   f"temp dir nor in place); pass --overwrite to start over")
        fs.rename([self.tmp(src) for src, _ in todo], [self.final(name) for _, name in todo])
        fs.write_json(self.final(self.marker), plan["marker"], tmp=self.tmp(self.marker))
        fs.delete_dir(self.tmp_dir)
        lease.published(self.tmp_dir)
        return self.final(self.marker)

    def read_marker(self) -> dict:
        return fs.read_json(self.final(self.marker))
