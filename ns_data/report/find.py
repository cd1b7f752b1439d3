"""Which outputs the report's directories hold: each given directory is an output itself, or the outputs in its
subdirectories, two levels down at most. An output is a directory with its kind's marker (complete), or with the
kind's temp dir and no marker (unfinished: listed, not read); data files alone (labeled shards a user made) are
no output. Kinds are contract.OutputKind: the three stages' and an `ns-train` run directory's.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from ns_data import contract, fs
from ns_data.outputs import PLAN
from ns_data.stage import InputError


@dataclass(frozen=True)
class RunDirectory(contract.OutputKind):
    """An `ns-train` run directory: results.json written last, metrics.jsonl appended during the run. The names
    are ns_train.train's (RESULTS, METRICS, CONFIG), stated here so that a report does not import torch."""

    config: str = "config.yaml"

    @property
    def data_pattern(self) -> str:
        return self.data_prefix + self.data_suffix  # one file, not numbered


TRAIN_RUN = RunDirectory("train", "metrics", ".jsonl", "results.json")
KINDS = contract.STAGE_OUTPUTS + (TRAIN_RUN,)
SEARCH_DEPTH = 2


@dataclass(frozen=True)
class Found:
    """An output in one of the report's directories; `marker` is None while it is unfinished."""

    kind: contract.OutputKind
    path: str  # absolute
    marker: dict | None
    name: str = ""  # as shown: the path below the outputs' common parent

    @property
    def complete(self) -> bool:
        return self.marker is not None


def _signs(kind: contract.OutputKind) -> tuple[str, ...]:
    """The files whose presence makes a directory an output of `kind`: its marker, its temp dir's plan."""
    return kind.marker, f"{kind.tmp_name}/{PLAN}"


def _candidates(directory: str) -> list[str]:
    """Directories at most SEARCH_DEPTH levels below `directory` (itself included) that hold a sign of any kind;
    never a stage's temp dir."""
    found = set()
    for depth in range(SEARCH_DEPTH + 1):
        for sign in sorted({s for kind in KINDS for s in _signs(kind)}):
            for path, _ in fs.match(fs.join(directory, *(["*"] * depth), sign)):
                parent = fs.split(path)[0]
                if sign.startswith(".tmp-"):
                    parent = fs.split(parent)[0]
                if not any(part.startswith(".tmp-") for part in parent.split("/")):
                    found.add(parent.rstrip("/"))
    return sorted(found)


def _classify(directory: str) -> Found | None:
    """The output `directory` is, if any: complete (its marker names the kind) or unfinished (a temp dir)."""
    for kind in KINDS:
        ours, marker = kind.state(directory)
        if marker is not None or (ours and fs.dir_exists(fs.join(directory, kind.tmp_name))):
            return Found(kind, directory, marker)
    return None


def find_outputs(directories: tuple[str, ...] | list[str]) -> list[Found]:
    """The outputs of every directory in pipeline order (labels, selections, shards, runs), each kind in the
    order of the directories given and by path; named by their path below the outputs' common parent. A
    directory that holds none is an error."""
    outputs: list[Found] = []
    for directory in directories:
        directory = fs.absolute(directory).rstrip("/") or "/"
        own = _classify(directory) if fs.dir_exists(directory) else None
        found = [own] if own else [f for f in map(_classify, _candidates(directory)) if f]
        if not found:
            raise InputError(f"{directory}: no ns-data output (labels, selection, shards) nor ns-train run in it "
                             f"or {SEARCH_DEPTH} levels below")
        outputs += [f for f in found if f.path not in {o.path for o in outputs}]
    paths = [f.path for f in outputs]
    root = fs.common_root(paths) if len(paths) > 1 else fs.split(paths[0])[0]
    named = [replace(f, name=fs.relative_to(f.path, root) if root else f.path) for f in outputs]
    return sorted(named, key=lambda f: KINDS.index(f.kind))
