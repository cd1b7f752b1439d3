"""The selection rule of Noisy Student, on numpy arrays: validity, order keys, exact per-class cuts, ranks, copies.

Rule (DESIGN.md): a valid row is a candidate when confidence >= min_confidence; in each class candidates are
ordered by confidence descending, then by `hash_ids(seed, id)` ascending, then by id; the first `per_class` are
kept and get copies so that every non-empty class totals `per_class`.

How it scales. A row's place in its class is given by the 64-bit order key S = label << 32 | conf_inv, where
conf_inv = bits(1.0f) - bits(confidence as float32) grows as confidence falls (float32 bit patterns of
non-negative numbers are ordered like the numbers). Ranks are found without holding a class in memory:

- level 1 counts candidates per (class, S >> 12) bin: a sparse histogram of at most ~3.7K bins per class
  for min_confidence 0.3;
- a bin that holds kept rows and more than `unit_rows` rows is refined: level 2 counts its rows per exact S,
  level 3 counts rows of an oversized exact confidence by the top 16 bits of their id hash;
- the bins that hold kept rows, with their offsets in the class, are packed in order into sort units of about
  `unit_rows` rows; each unit is sorted on its own and a row's rank is its bin's offset plus its place in it.

Everything here is deterministic and independent of how rows are split into batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REQUIRED_COLUMNS = ("id", "label", "confidence")
KEY_COLUMNS = list(REQUIRED_COLUMNS)

# Reasons a row is rejected; code = index + 1, 0 = valid. The first that applies is reported.
REASONS = (
    "missing_id",
    "missing_label",
    "label_out_of_range",
    "missing_confidence",
    "confidence_not_finite",
    "confidence_out_of_range",
    "duplicate_id",
)
DUPLICATE = REASONS.index("duplicate_id") + 1
MAX_LABEL = 2**31 - 1
_ONE_BITS = np.uint32(0x3F800000)  # bits of 1.0f
LEVEL1_SHIFT = 12
LEVEL3_SHIFT = 48  # level 3 uses the top 16 bits of the id hash


@dataclass
class KeyBatch:
    """The columns the rule reads, from one record batch, with a validity code per row."""

    ids: pa.Array
    labels: np.ndarray  # int64, 0 where missing
    confidence: np.ndarray  # float32, 0 where missing
    reason: np.ndarray  # uint8: 0 valid, else 1 + index into REASONS


def read_keys(batch: pa.RecordBatch | pa.Table, num_classes: int | None) -> KeyBatch:
    """Validate id, label and confidence of every row (duplicates are found elsewhere)."""
    ids = batch.column("id")
    labels_arr = batch.column("label")
    conf_arr = batch.column("confidence")
    if isinstance(ids, pa.ChunkedArray):
        ids, labels_arr, conf_arr = (c.combine_chunks() for c in (ids, labels_arr, conf_arr))
    n = len(ids)
    id_missing = pc.fill_null(pc.equal(pc.binary_length(ids), 0), True).to_numpy(zero_copy_only=False)
    label_missing = labels_arr.is_null().to_numpy(zero_copy_only=False)
    labels = labels_arr.fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    conf_missing = conf_arr.is_null().to_numpy(zero_copy_only=False)
    conf64 = conf_arr.fill_null(0.0).to_numpy(zero_copy_only=False)
    with np.errstate(over="ignore", invalid="ignore"):
        confidence = conf64.astype(np.float32)
    upper = MAX_LABEL if num_classes is None else num_classes - 1
    checks = (
        id_missing,
        label_missing,
        (labels < 0) | (labels > upper),
        conf_missing,
        ~np.isfinite(confidence),
        (confidence < 0) | (confidence > 1),
    )
    reason = np.zeros(n, dtype=np.uint8)
    for code in range(len(checks), 0, -1):  # the first failing check wins
        reason[checks[code - 1]] = code
    labels = np.where(reason == 0, labels, 0)
    confidence = np.where(reason == 0, confidence + np.float32(0.0), np.float32(0.0))  # -0.0 -> 0.0
    return KeyBatch(ids=ids, labels=labels, confidence=confidence, reason=reason)


def conf_inv(confidence: np.ndarray) -> np.ndarray:
    """uint32 that grows as confidence (in [0, 1]) falls: bits(1.0f) - bits(confidence)."""
    return _ONE_BITS - confidence.astype(np.float32).view(np.uint32)


def conf_from_inv(inv: np.ndarray) -> np.ndarray:
    return (_ONE_BITS - inv.astype(np.uint32)).view(np.float32)


def order_keys(labels: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """S = label << 32 | conf_inv: ascending S is class by class, most confident first."""
    return (labels.astype(np.uint64) << np.uint64(32)) | conf_inv(confidence).astype(np.uint64)


def is_candidate(kb: KeyBatch, min_confidence: float) -> np.ndarray:
    return (kb.reason == 0) & (kb.confidence >= np.float32(min_confidence))


def positions(work_unit: int, first_row: int, n: int) -> np.ndarray:
    """Row identity inside one run: work unit index << 32 | row index in the unit."""
    return (np.int64(work_unit) << np.int64(32)) + np.arange(first_row, first_row + n, dtype=np.int64)


# ---------------------------------------------------------------------------------------------- counts


def sum_counts(keys: np.ndarray, counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Sparse histogram: sorted unique keys and the summed counts of each."""
    keys = np.asarray(keys, dtype=np.uint64)
    if counts is None:
        unique, n = np.unique(keys, return_counts=True)
        return unique, n.astype(np.int64)
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, np.bincount(inverse, weights=counts, minlength=len(unique)).astype(np.int64)


@dataclass
class SparseCounts:
    """Accumulates sparse histograms; compacts lazily so that merging many parts stays linear."""

    parts: list = field(default_factory=list)
    pending: int = 0
    compacted: int = 0

    def add(self, keys: np.ndarray, counts: np.ndarray) -> "SparseCounts":
        if len(keys):
            self.parts.append((keys, counts))
            self.pending += len(keys)
            if self.pending > max(1 << 20, 2 * self.compacted):
                self.compact()
        return self

    def compact(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.parts:
            return np.zeros(0, np.uint64), np.zeros(0, np.int64)
        if len(self.parts) > 1:
            keys = np.concatenate([k for k, _ in self.parts])
            counts = np.concatenate([c for _, c in self.parts])
            self.parts = [sum_counts(keys, counts)]
        self.compacted = len(self.parts[0][0])
        self.pending = 0
        return self.parts[0]


# ---------------------------------------------------------------------------------------------- plan


def _offsets_within(parents: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Exclusive running sum of counts, restarted at each new parent (parents are sorted)."""
    csum = np.cumsum(counts) - counts
    if not len(parents):
        return csum
    starts = np.flatnonzero(np.r_[True, parents[1:] != parents[:-1]])
    run_of = np.repeat(np.arange(len(starts)), np.diff(np.r_[starts, len(parents)]))
    return csum - csum[starts][run_of]


@dataclass
class Level:
    """One level of bins: sorted keys, counts, offsets within the class, and which are refined."""

    keys: np.ndarray  # uint64, sorted
    counts: np.ndarray  # int64
    offsets: np.ndarray  # int64: rows of the class before this bin
    labels: np.ndarray  # int64
    refine: np.ndarray  # bool: holds kept rows and is too large for one sort unit

    @property
    def refined_keys(self) -> np.ndarray:
        return self.keys[self.refine]


def place_bins(keys, counts, parents, parent_offsets, parent_labels, per_class, unit_rows, can_refine) -> Level:
    offsets = parent_offsets[parents] + _offsets_within(parents, counts)
    needed = offsets < per_class
    refine = needed & (counts > unit_rows) if can_refine else np.zeros(len(keys), bool)
    return Level(keys=keys, counts=counts, offsets=offsets, labels=parent_labels[parents], refine=refine)


def level1(keys: np.ndarray, counts: np.ndarray, per_class: int, unit_rows: int) -> Level:
    classes, parents = np.unique((keys >> np.uint64(32)).astype(np.int64), return_inverse=True)
    zero = np.zeros(len(classes), np.int64)
    return place_bins(keys, counts, parents, zero, classes, per_class, unit_rows, True)


def level1_keys(s: np.ndarray) -> np.ndarray:
    return s & ~np.uint64((1 << LEVEL1_SHIFT) - 1)


def level2(parent: Level, keys: np.ndarray, counts: np.ndarray, per_class: int, unit_rows: int) -> Level:
    refined = parent.refined_keys
    parents = np.searchsorted(refined, level1_keys(keys))
    return place_bins(keys, counts, parents, parent.offsets[parent.refine], parent.labels[parent.refine],
                      per_class, unit_rows, True)


def level3_keys(parent: Level, s: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    idx = np.searchsorted(parent.refined_keys, s).astype(np.uint64)
    return (idx << np.uint64(16)) | (hashes >> np.uint64(LEVEL3_SHIFT))


def level3(parent: Level, keys: np.ndarray, counts: np.ndarray, per_class: int) -> Level:
    parents = (keys >> np.uint64(16)).astype(np.int64)
    return place_bins(keys, counts, parents, parent.offsets[parent.refine], parent.labels[parent.refine],
                      per_class, 0, False)


@dataclass
class Plan:
    """Where every kept row goes: its group (a bin of some level), the group's offset, and its sort unit."""

    per_class: int
    upsample: bool
    levels: list  # [Level, ...] 1 to 3 levels
    group_level: np.ndarray  # per group: level index
    group_index: np.ndarray  # per group: index of the bin in its level
    group_offset: np.ndarray  # int64
    group_count: np.ndarray
    group_label: np.ndarray
    group_unit: np.ndarray  # sort unit of the group
    class_labels: np.ndarray  # sorted labels with candidates
    class_candidates: np.ndarray
    class_selected: np.ndarray
    # lookup: per level, the group id of each bin that is a group (-1 otherwise)
    bin_group: list

    @property
    def num_units(self) -> int:
        return int(self.group_unit.max()) + 1 if len(self.group_unit) else 0

    def selected_for(self, labels: np.ndarray) -> np.ndarray:
        idx = np.searchsorted(self.class_labels, labels)
        return self.class_selected[np.minimum(idx, len(self.class_selected) - 1)]


def finish_plan(levels: list, per_class: int, unit_rows: int, upsample: bool) -> Plan:
    """Collect the groups (needed bins that were not refined) and pack them into sort units."""
    g_level, g_index = [], []
    for i, lev in enumerate(levels):
        idx = np.flatnonzero((lev.offsets < per_class) & ~lev.refine)
        g_level.append(np.full(len(idx), i))
        g_index.append(idx)
    g_level = np.concatenate(g_level)
    g_index = np.concatenate(g_index)
    offset = np.concatenate([levels[lv].offsets[ix] for lv, ix in _by_level(g_level, g_index, len(levels))])
    count = np.concatenate([levels[lv].counts[ix] for lv, ix in _by_level(g_level, g_index, len(levels))])
    label = np.concatenate([levels[lv].labels[ix] for lv, ix in _by_level(g_level, g_index, len(levels))])
    order = np.lexsort((offset, label))
    g_level, g_index, offset, count, label = (a[order] for a in (g_level, g_index, offset, count, label))
    start = np.cumsum(count) - count
    unit = (start // max(unit_rows, 1)).astype(np.int64)
    if len(unit):  # renumber densely so that units are 0..k-1
        unit = np.unique(unit, return_inverse=True)[1].astype(np.int64)
    bin_group = []
    for i, lev in enumerate(levels):
        lookup = np.full(len(lev.keys), -1, np.int64)
        mine = g_level == i
        lookup[g_index[mine]] = np.flatnonzero(mine)
        bin_group.append(lookup)
    first = levels[0]
    class_labels, class_candidates = sum_counts(first.labels.astype(np.uint64), first.counts)
    return Plan(
        per_class=per_class, upsample=upsample, levels=levels, group_level=g_level, group_index=g_index,
        group_offset=offset, group_count=count, group_label=label, group_unit=unit,
        class_labels=class_labels.astype(np.int64), class_candidates=class_candidates,
        class_selected=np.minimum(class_candidates, per_class), bin_group=bin_group,
    )


def _by_level(g_level, g_index, n_levels):
    return [(lv, g_index[g_level == lv]) for lv in range(n_levels)]


def _lookup(keys: np.ndarray, table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index of each key in a sorted table, and whether it is there."""
    if not len(table):
        return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
    idx = np.minimum(np.searchsorted(table, keys), len(table) - 1)
    return idx, table[idx] == keys


def assign_groups(plan: Plan, s: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Group id of each candidate (by order key S and id hash); -1 where the row cannot be kept."""
    group = np.full(len(s), -1, np.int64)
    lev1 = plan.levels[0]
    idx, found = _lookup(level1_keys(s), lev1.keys)
    group[found] = plan.bin_group[0][idx[found]]
    pending = found & lev1.refine[idx]
    for depth in (1, 2):
        if depth >= len(plan.levels) or not pending.any():
            break
        lev = plan.levels[depth]
        rows = np.flatnonzero(pending)
        keys = s[rows] if depth == 1 else level3_keys(plan.levels[1], s[rows], hashes[rows])
        idx, found = _lookup(keys, lev.keys)
        group[rows[found]] = plan.bin_group[depth][idx[found]]
        pending = np.zeros(len(s), bool)
        pending[rows[found]] = lev.refine[idx[found]]
    return group


def copies_for(rank: np.ndarray, selected: np.ndarray, per_class: int, upsample: bool) -> np.ndarray:
    """per_class // n copies for every row of a class with n kept rows, one more for its first per_class % n."""
    if not upsample:
        return np.ones(len(rank), np.int32)
    n = np.maximum(selected, 1)
    return (per_class // n + (rank < per_class % n)).astype(np.int32)


def copies_total(selected: np.ndarray, per_class: int, upsample: bool) -> np.ndarray:
    """Rows a class contributes to the corpus: per_class when upsampling a non-empty class, else its kept rows."""
    return np.where(upsample & (selected > 0), per_class, selected).astype(np.int64)


def rank_unit(plan: Plan, group: np.ndarray, inv: np.ndarray, hashes: np.ndarray,
              tie_ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Sort one unit's rows by (group, confidence desc, hash, id); return the sort order and each row's rank."""
    table = pa.table({"g": group, "c": inv, "h": hashes, "id": tie_ids})
    order = pc.sort_indices(table, sort_keys=[("g", "ascending"), ("c", "ascending"), ("h", "ascending"),
                                              ("id", "ascending")]).to_numpy()
    g = group[order]
    n = len(g)
    run_start = np.flatnonzero(np.r_[True, g[1:] != g[:-1]]) if n else np.zeros(0, np.int64)
    start_of_row = np.repeat(run_start, np.diff(np.r_[run_start, n]))
    rank = plan.group_offset[g] + (np.arange(n) - start_of_row)
    return order, rank
