"""Which outputs the report's directories hold: each given directory is an output itself, or the outputs in its
subdirectories, two levels down at most. An output is a directory with its kind's marker (complete), or with the
kind's temp dir and no marker (unfinished: listed, not read); data files alone (labeled shards a user made) are
no output. Kinds are contract.OutputKind: the three stages' and an `ns-train` run directory's.

Each given directory is listed once (one recursive match); outputs, markers (each read once) and an output's
data files are all taken from that listing, so finding does not list any directory again.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, replace

from ns_data import contract, fs
from ns_data.outputs import PLAN
from ns_data.stage import InputError


KINDS = contract.STAGE_OUTPUTS + (contract.TRAIN_RUN,)
SEARCH_DEPTH = 2


@dataclass(frozen=True)
class Found:
    """An output in one of the report's directories; `marker` is None while it is unfinished."""

    kind: contract.OutputKind
    path: str  # absolute
    marker: dict | None
    name: str = ""  # as shown: the path below the outputs' common parent
    files: tuple[str, ...] = ()  # a complete output's data files, sorted, from the one listing of its tree

    @property
    def complete(self) -> bool:
        return self.marker is not None


def _signs(kind: contract.OutputKind) -> tuple[str, ...]:
    """The files whose presence makes a directory an output of `kind`: its marker, its temp dir's plan."""
    return kind.marker, f"{kind.tmp_name}/{PLAN}"


def _listing(directory: str) -> dict[str, list[str]]:
    """Every file below `directory` by the directory that holds it: one listing (`**`) of the whole tree."""
    by_dir: dict[str, list[str]] = {}
    for path, _ in fs.match(fs.join(directory, "**")):
        parent, name = fs.split(path)
        by_dir.setdefault(parent.rstrip("/"), []).append(name)
    return by_dir


def _has_files_below(by_dir: dict[str, list[str]], directory: str) -> bool:
    prefix = directory + "/"
    return directory in by_dir or any(d.startswith(prefix) for d in by_dir)


def _depth(directory: str, parent: str) -> int | None:
    """How many levels `directory` lies below `parent` (0: itself); None when it is not below it."""
    if directory == parent:
        return 0
    if not directory.startswith(parent.rstrip("/") + "/"):
        return None
    return len(directory[len(parent.rstrip("/")) + 1:].split("/"))


def _classify(directory: str, by_dir: dict[str, list[str]], markers: dict[str, dict]) -> Found | None:
    """The output `directory` is, if any, from the listing: complete (its marker names the kind), unfinished
    (files in the kind's temp dir, or locally an empty temp dir), or none (a marker of another stage). Its data
    files are taken from the listing, so the output's directory is not listed again."""
    names = set(by_dir.get(directory, ()))
    for kind in KINDS:
        if kind.marker in names:
            path = fs.join(directory, kind.marker)
            if path not in markers:
                markers[path] = fs.read_json(path)
            if markers[path].get("stage") != kind.stage:
                continue
            files = tuple(sorted(fs.join(directory, n) for n in names if fnmatch.fnmatchcase(n, kind.data_pattern)))
            return Found(kind, directory, markers[path], files=files)
        tmp = fs.join(directory, kind.tmp_name)
        if _has_files_below(by_dir, tmp) or (fs.is_local(tmp) and os.path.isdir(tmp)):
            return Found(kind, directory, None)
    return None


def _outputs_in(directory: str) -> list[Found]:
    """The output `directory` is, or else the outputs at most SEARCH_DEPTH levels below it that hold a sign of
    a kind (its marker, or its temp dir's plan); never inside a stage's temp dir."""
    by_dir = _listing(directory)
    markers: dict[str, dict] = {}
    own = _classify(directory, by_dir, markers)
    if own:
        return [own]
    signs = {s for kind in KINDS for s in _signs(kind)}
    candidates = set()
    for parent, names in by_dir.items():
        up, last = fs.split(parent)
        holders = [parent] if signs & set(names) else []
        if f"{last}/{PLAN}" in signs and PLAN in names:
            holders.append(up.rstrip("/"))
        for holder in holders:
            depth = _depth(holder, directory)
            if depth is not None and 0 < depth <= SEARCH_DEPTH and not any(
                    part.startswith(".tmp-") for part in holder[len(directory):].split("/")):
                candidates.add(holder)
    return [f for f in (_classify(c, by_dir, markers) for c in sorted(candidates)) if f]


def find_outputs(directories: tuple[str, ...] | list[str]) -> list[Found]:
    """The outputs of every directory in pipeline order (labels, selections, shards, runs), each kind in the
    order of the directories given and by path; named by their path below the outputs' common parent. A
    directory that holds none is an error."""
    outputs: list[Found] = []
    for directory in directories:
        directory = fs.absolute(directory).rstrip("/") or "/"
        found = _outputs_in(directory)
        if not found:
            raise InputError(f"{directory}: no ns-data output (labels, selection, shards) nor ns-train run in it "
                             f"or {SEARCH_DEPTH} levels below")
        outputs += [f for f in found if f.path not in {o.path for o in outputs}]
    paths = [f.path for f in outputs]
    root = fs.common_root(paths) if len(paths) > 1 else fs.split(paths[0])[0]
    named = [replace(f, name=fs.relative_to(f.path, root) if root else f.path) for f in outputs]
    return sorted(named, key=lambda f: KINDS.index(f.kind))
