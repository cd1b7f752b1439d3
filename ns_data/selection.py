"""The selection rule of Noisy Student, on numpy arrays: validity, order keys, exact per-class cuts, ranks, copies.

Rule (docs/design.md): a valid row is a candidate when confidence >= min_confidence; in each class candidates are
ordered by confidence descending, then by `hash_ids(seed, id)` ascending, then by id; the first `per_class` are
kept and get copies so that every non-empty class totals `per_class`.

How it scales. A row's place in its class is given by the 64-bit order key S = label << 32 | conf_inv, where
conf_inv = bits(1.0f) - bits(confidence as float32) grows as confidence falls (float32 bit patterns of
non-negative numbers are ordered like the numbers). Ranks are found without holding a class in memory:

- level 1 counts candidates per (class, S >> 16) bin: a sparse histogram of at most ~230 bins per class
  for min_confidence 0.3 (relative width 1/128 of a confidence);
- a bin that holds kept rows and more than `unit_rows` rows is refined: level 2 counts its rows per exact S,
  level 3 counts rows of an oversized exact confidence by the top 16 bits of their id hash;
- the bins that hold kept rows, with their offsets in the class, are packed in order into sort units of about
  `unit_rows` rows; each unit is sorted on its own and a row's rank is its bin's offset plus its place in it.

Everything here is deterministic and independent of how rows are split into batches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from ns_data.contract import KEY_COLUMNS, SOFT_LABEL_COLUMNS
from ns_data.soft_labels import PROBABILITY_REASONS, classes_outside, probability_checks

# Reasons a row is rejected; code = index + 1, 0 = valid. The first that applies is reported.
REASONS = (
    "missing_id",
    "missing_label",
    "label_out_of_range",
    "missing_confidence",
    "confidence_not_finite",
    "confidence_out_of_range",
    "topk_out_of_range",  # a class in topk_classes negative, null, or >= --num-classes
    *PROBABILITY_REASONS,  # topk_probs or probs with a NaN, an infinity, a negative, or summing above 1 + 1e-3
    "duplicate_id",
)
DUPLICATE = REASONS.index("duplicate_id") + 1
MAX_LABEL = 2**31 - 1
_ONE_BITS = np.uint32(0x3F800000)  # bits of 1.0f
LEVEL1_SHIFT = 16  # level-1 bins: the top 16 bits of conf_inv, ~230 bins per class above 0.3
LEVEL3_SHIFT = 48  # level 3 uses the top 16 bits of the id hash
MAX_UNIT_GROUPS = 1 << 16
DENSE_LABELS = 1 << 22  # up to this label, the plan looks up per-class counts in a table indexed by label


@dataclass
class KeyBatch:
    """The columns the rule reads, from one record batch, with a validity code per row."""

    ids: pa.Array
    labels: np.ndarray  # int64, 0 where missing
    confidence: np.ndarray  # float32, 0 where missing
    reason: np.ndarray  # uint8: 0 valid, else 1 + index into REASONS


def value_columns(names) -> list[str]:
    """The columns `read_keys` reads from a table with columns `names`: the key columns and the soft-label
    columns it has. Every pass over the rows reads these, so that each pass finds the same rows valid."""
    return [*KEY_COLUMNS, *(c for c in SOFT_LABEL_COLUMNS if c in names)]


def read_keys(batch: pa.RecordBatch | pa.Table, num_classes: int | None) -> KeyBatch:
    """Validate id, label and confidence of every row, and the top-k classes and probabilities of the rows of a
    batch that has them (contract.SOFT_LABEL_COLUMNS); duplicates are found elsewhere."""
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
        *_value_checks(batch, num_classes, n),
    )
    reason = np.zeros(n, dtype=np.uint8)
    for code in range(len(checks), 0, -1):  # the first failing check wins
        reason[checks[code - 1]] = code
    labels = np.where(reason == 0, labels, 0)
    confidence = np.where(reason == 0, confidence + np.float32(0.0), np.float32(0.0))  # -0.0 -> 0.0
    return KeyBatch(ids=ids, labels=labels, confidence=confidence, reason=reason)


def _value_checks(batch: pa.RecordBatch | pa.Table, num_classes: int | None, n: int) -> list[np.ndarray]:
    """The checks of REASONS from topk_out_of_range to the probability reasons, in that order: a column the
    batch does not have fails no row."""
    names = batch.schema.names
    none = np.zeros(n, dtype=bool)
    outside = classes_outside(batch.column("topk_classes"), num_classes, MAX_LABEL) if "topk_classes" in names \
        else none
    probability = [probability_checks(batch.column(c)) for c in ("topk_probs", "probs") if c in names]
    return [outside] + [np.logical_or.reduce([p[r] for p in probability]) if probability else none
                        for r in PROBABILITY_REASONS]


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
    """The bins of one level that hold kept rows: sorted keys, counts, offsets in the class, refined or not.

    Bins whose rows all rank beyond per_class are dropped: they need no lookup, and the plan stays small.
    """

    keys: np.ndarray  # uint64, sorted
    counts: np.ndarray  # int64
    offsets: np.ndarray  # int64: rows of the class before this bin
    labels: np.ndarray  # int64
    refine: np.ndarray  # bool: too large for one sort unit, counted again one level finer
    # Level 1 only: candidates per class (sorted labels), counted over all bins.
    class_labels: np.ndarray | None = None
    class_candidates: np.ndarray | None = None

    @property
    def refined_keys(self) -> np.ndarray:
        return self.keys[self.refine]

    @staticmethod
    def empty() -> "Level":
        return Level(*(np.zeros(0, t) for t in (np.uint64, np.int64, np.int64, np.int64, bool)))


def place_bins(keys, counts, parents, parent_offsets, parent_labels, per_class, unit_rows, can_refine) -> Level:
    offsets = parent_offsets[parents] + _offsets_within(parents, counts)
    needed = offsets < per_class
    keys, counts, offsets, labels = keys[needed], counts[needed], offsets[needed], parent_labels[parents][needed]
    refine = counts > unit_rows if can_refine else np.zeros(len(keys), bool)
    return Level(keys=keys, counts=counts, offsets=offsets, labels=labels, refine=refine)


def level1(keys: np.ndarray, counts: np.ndarray, per_class: int, unit_rows: int) -> Level:
    classes, parents = np.unique((keys >> np.uint64(32)).astype(np.int64), return_inverse=True)
    zero = np.zeros(len(classes), np.int64)
    level = place_bins(keys, counts, parents, zero, classes, per_class, unit_rows, True)
    level.class_labels = classes
    level.class_candidates = np.bincount(parents, weights=counts, minlength=len(classes)).astype(np.int64)
    return level


def level1_keys(s: np.ndarray) -> np.ndarray:
    return s & ~np.uint64((1 << LEVEL1_SHIFT) - 1)


def level2(parent: Level, keys: np.ndarray, counts: np.ndarray, per_class: int, unit_rows: int) -> Level:
    refined = parent.refined_keys
    parents = np.searchsorted(refined, level1_keys(keys))
    return place_bins(keys, counts, parents, parent.offsets[parent.refine], parent.labels[parent.refine],
                      per_class, unit_rows, True)


def level3_keys(refined: np.ndarray, s: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Level-3 key: index of the row's exact order key among the refined level-2 keys, then 16 hash bits."""
    idx = np.searchsorted(refined, s).astype(np.uint64)
    return (idx << np.uint64(16)) | (hashes >> np.uint64(LEVEL3_SHIFT))


def level3(parent: Level, keys: np.ndarray, counts: np.ndarray, per_class: int) -> Level:
    parents = (keys >> np.uint64(16)).astype(np.int64)
    return place_bins(keys, counts, parents, parent.offsets[parent.refine], parent.labels[parent.refine],
                      per_class, 0, False)


@dataclass
class Lookup:
    """One level's bins that hold kept rows, for finding a row's bin: keys, refined or not, group id."""

    keys: np.ndarray  # uint64, sorted
    refine: np.ndarray  # bool
    group: np.ndarray  # int32: the bin's group id, -1 where the bin is refined
    _index: pd.Index | None = field(default=None, repr=False, compare=False)

    @property
    def refined_keys(self) -> np.ndarray:
        return self.keys[self.refine]

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Index of each key among the bins, and whether it is there (a hash index, built once).

        Threads of one worker can share the plan (a side input), so the index is complete, its hash table
        built by a first lookup, before it is stored where they can see it."""
        if self._index is None:
            index = pd.Index(self.keys)
            index.get_indexer(self.keys[:1])
            self._index = index
        idx = self._index.get_indexer(keys)
        return np.maximum(idx, 0), idx >= 0

    def __getstate__(self):
        return {**self.__dict__, "_index": None}


@dataclass
class Plan:
    """Where every kept row goes: its group (a bin of some level), the group's offset, and its sort unit."""

    per_class: int
    upsample: bool
    lookups: list  # one Lookup per level
    group_offset: np.ndarray  # int64: rows of the class before the group
    group_label: np.ndarray  # int32
    group_unit: np.ndarray  # int32: the sort unit that ranks the group
    group_conf_hi: np.ndarray  # uint32: the top 16 bits of conf_inv, the same for every row of a group
    unit_first_group: np.ndarray  # int32: groups of a unit are unit_first_group[u] + 0..MAX_UNIT_GROUPS-1
    class_labels: np.ndarray  # sorted labels that have candidates
    class_candidates: np.ndarray
    class_selected: np.ndarray
    _selected_by_label: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def num_units(self) -> int:
        return len(self.unit_first_group)

    def unit_keys(self, unit: int, group: np.ndarray, inv: np.ndarray) -> np.ndarray:
        """uint32 sort key inside a unit: group within the unit << 16 | the low 16 bits of conf_inv.

        It orders rows exactly like (group, conf_inv), because a group's rows share conf_inv's top 16 bits.
        """
        local = (group - self.unit_first_group[unit]).astype(np.uint32)
        return (local << np.uint32(16)) | (inv & np.uint32(0xFFFF)).astype(np.uint32)

    def from_unit_keys(self, unit: int, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(group, conf_inv) back from unit keys."""
        group = self.unit_first_group[unit] + (keys >> np.uint32(16)).astype(np.int32)
        inv = (self.group_conf_hi[group] << np.uint32(16)) | (keys & np.uint32(0xFFFF))
        return group, inv

    def selected_for(self, labels: np.ndarray) -> np.ndarray:
        """Kept rows of each row's class (labels of classes with candidates)."""
        if not len(self.class_labels) or self.class_labels[-1] >= DENSE_LABELS:
            idx = np.searchsorted(self.class_labels, labels)
            return self.class_selected[np.minimum(idx, len(self.class_selected) - 1)]
        if self._selected_by_label is None:  # a table indexed by label: no search per row
            table = np.zeros(self.class_labels[-1] + 1, np.int64)
            table[self.class_labels] = self.class_selected
            self._selected_by_label = table  # stored once complete: threads of a worker share the plan
        return self._selected_by_label[labels]

    def __getstate__(self):
        return {**self.__dict__, "_selected_by_label": None}


def finish_plan(levels: list, per_class: int, unit_rows: int, upsample: bool) -> Plan:
    """Groups are the bins that were not refined; ordered by class and offset, they are packed into sort units
    of about `unit_rows` rows (a unit starts at most unit_rows after the previous one)."""
    parts = [(i, np.flatnonzero(~lev.refine)) for i, lev in enumerate(levels)]
    offset = np.concatenate([levels[i].offsets[ix] for i, ix in parts])
    count = np.concatenate([levels[i].counts[ix] for i, ix in parts])
    label = np.concatenate([levels[i].labels[ix] for i, ix in parts])
    order = np.lexsort((offset, label))
    group_of_part = np.empty(len(order), np.int32)
    group_of_part[order] = np.arange(len(order), dtype=np.int32)
    offset, count, label = offset[order], count[order], label[order]
    hi = [((levels[1].refined_keys[levels[i].keys[ix] >> np.uint64(16)] if i == 2 else levels[i].keys[ix])
           >> np.uint64(16)) & np.uint64(0xFFFF) for i, ix in parts]
    conf_hi = np.concatenate(hi).astype(np.uint32)[order]
    # A new unit starts every unit_rows rows, and every MAX_UNIT_GROUPS groups (unit keys hold 16 bits of group).
    start = np.cumsum(count) - count
    by_rows = start // max(unit_rows, 1)
    by_groups = np.arange(len(start)) // MAX_UNIT_GROUPS
    unit = np.unique(by_rows * (by_groups[-1] + 1 if len(start) else 1) + by_groups,
                     return_inverse=True)[1].astype(np.int32)
    first_group = np.searchsorted(unit, np.arange(unit.max() + 1 if len(unit) else 0)).astype(np.int32)
    lookups, first = [], 0
    for (i, ix), lev in zip(parts, levels):
        group = np.full(len(lev.keys), -1, np.int32)
        group[ix] = group_of_part[first: first + len(ix)]
        first += len(ix)
        lookups.append(Lookup(keys=lev.keys, refine=lev.refine, group=group))
    return Plan(
        per_class=per_class, upsample=upsample, lookups=lookups, group_offset=offset,
        group_label=label.astype(np.int32), group_unit=unit, group_conf_hi=conf_hi, unit_first_group=first_group,
        class_labels=levels[0].class_labels,
        class_candidates=levels[0].class_candidates,
        class_selected=np.minimum(levels[0].class_candidates, per_class),
    )


def assign_groups(plan: Plan, s: np.ndarray, hashes: np.ndarray) -> np.ndarray:
    """Group id of each candidate (by order key S and id hash); -1 where the row cannot be kept."""
    group = np.full(len(s), -1, np.int32)
    rows = np.arange(len(s))
    keys = level1_keys(s)
    for depth, lookup in enumerate(plan.lookups):
        idx, found = lookup.find(keys)
        rows, idx = rows[found], idx[found]
        group[rows] = lookup.group[idx]
        deeper = lookup.refine[idx]
        rows = rows[deeper]
        if not len(rows) or depth + 1 == len(plan.lookups):
            break
        keys = s[rows] if depth == 0 else level3_keys(lookup.refined_keys, s[rows], hashes[rows])
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


def rank_unit(plan: Plan, unit: int, keys: np.ndarray, hashes: np.ndarray, tie_ids: pa.Array | None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort one unit's rows by (unit key, hash, id); return the order, and each sorted row's group and rank.

    `tie_ids` holds the ids of rows whose hash collides with another row's ("" elsewhere), or None if none do.
    """
    # One 64-bit key (unit key, the hash's top 32 bits) sorts ~3x faster than two columns; only when two rows
    # are equal in it (rare) does the unit take the full sort by (unit key, hash, id).
    composite = (keys.astype(np.uint64) << np.uint64(32)) | (hashes >> np.uint64(32))
    order = np.argsort(composite)
    ordered = composite[order]
    if len(ordered) > 1 and bool((ordered[1:] == ordered[:-1]).any()):
        columns = {"k": keys, "h": hashes}
        if tie_ids is not None:
            columns["id"] = tie_ids
        order = pc.sort_indices(pa.table(columns), sort_keys=[(k, "ascending") for k in columns]).to_numpy()
    group = plan.unit_first_group[unit] + (keys[order] >> np.uint32(16)).astype(np.int32)
    n = len(group)
    run_start = np.flatnonzero(np.r_[True, group[1:] != group[:-1]]) if n else np.zeros(0, np.int64)
    start_of_row = np.repeat(run_start, np.diff(np.r_[run_start, n]))
    rank = plan.group_offset[group] + (np.arange(n) - start_of_row)
    return order, group, rank
