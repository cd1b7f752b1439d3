"""The rule's building blocks on numpy arrays: validity codes, multi-level plan, ranks, copies."""
import numpy as np
import pyarrow as pa
import pytest

from ns_data import selection as sel


def plan_in_memory(labels, conf, hashes, per_class, unit_rows):
    """The pipeline's passes, run on whole arrays in one process."""
    s = sel.order_keys(labels, conf)
    l1 = sel.level1(*sel.sum_counts(sel.level1_keys(s)), per_class, unit_rows)
    in2 = np.isin(sel.level1_keys(s), l1.refined_keys)
    l2 = sel.level2(l1, *sel.sum_counts(s[in2]), per_class, unit_rows)
    in3 = np.isin(s, l2.refined_keys)
    l3 = sel.level3(l2, *sel.sum_counts(sel.level3_keys(l2.refined_keys, s[in3], hashes[in3])), per_class)
    return s, sel.finish_plan([l1, l2, l3], per_class, unit_rows, True)


@pytest.mark.parametrize("max_unit_groups", [sel.MAX_UNIT_GROUPS, 3])
def test_plan_with_three_levels_gives_exact_ranks(monkeypatch, max_unit_groups):
    monkeypatch.setattr(sel, "MAX_UNIT_GROUPS", max_unit_groups)
    rng = np.random.default_rng(0)
    n = 20000
    labels = rng.integers(0, 3, n)
    conf = rng.choice(np.array([1.0, 0.9, 0.5], np.float32), n)  # massive ties
    conf[: n // 4] = rng.random(n // 4).astype(np.float32)
    hashes = rng.integers(0, 2**63, n, dtype=np.uint64) * np.uint64(2) + rng.integers(0, 2, n, dtype=np.uint64)
    per_class, unit_rows = 3000, 100
    s, plan = plan_in_memory(labels, conf, hashes, per_class, unit_rows)
    assert len(plan.lookups[1].keys) and len(plan.lookups[2].keys), "ties must reach levels 2 and 3"
    assert np.bincount(plan.group_unit).max() <= max_unit_groups
    group = sel.assign_groups(plan, s, hashes)
    rows = np.flatnonzero(group >= 0)
    ranks = np.full(n, -1)
    for u in range(plan.num_units):
        m = rows[plan.group_unit[group[rows]] == u]
        assert len(m) <= 2 * unit_rows + 1
        inv = (s[m] & np.uint64(0xFFFFFFFF)).astype(np.uint32)
        keys = plan.unit_keys(u, group[m], inv)
        np.testing.assert_array_equal(plan.from_unit_keys(u, keys)[1], inv)
        order, _, rank = sel.rank_unit(plan, u, keys, hashes[m], pa.array([""] * len(m)))
        ranks[m[order]] = rank
    ranks[ranks >= per_class] = -1
    # Reference: a full sort by (label, confidence desc, hash).
    want = np.full(n, -1)
    order = np.lexsort((hashes, -conf.astype(np.float64), labels))
    for label in range(3):
        members = order[labels[order] == label]
        want[members[:per_class]] = np.arange(min(per_class, len(members)))
    np.testing.assert_array_equal(ranks, want)
    np.testing.assert_array_equal(plan.class_selected, [min(per_class, (labels == c).sum()) for c in range(3)])


def test_rank_unit_orders_colliding_hashes_by_id():
    plan = sel.finish_plan([sel.level1(*sel.sum_counts(np.zeros(3, np.uint64)), 10, 10),
                            sel.Level.empty(), sel.Level.empty()], 10, 10, True)
    same_hash = np.full(3, 42, np.uint64)
    order, _, rank = sel.rank_unit(plan, 0, np.zeros(3, np.uint32), same_hash, pa.array(["c", "a", "b"]))
    assert order.tolist() == [1, 2, 0] and rank.tolist() == [0, 1, 2]


def test_rank_unit_orders_hashes_equal_in_their_top_bits_by_the_whole_hash():
    plan = sel.finish_plan([sel.level1(*sel.sum_counts(np.zeros(4, np.uint64)), 10, 10),
                            sel.Level.empty(), sel.Level.empty()], 10, 10, True)
    hashes = np.array([(5 << 32) | 9, (5 << 32) | 3, (4 << 32) | 7, (1 << 63) | 1], np.uint64)
    order, _, rank = sel.rank_unit(plan, 0, np.array([0, 0, 0, 0], np.uint32), hashes, None)
    assert order.tolist() == [2, 1, 0, 3] and rank.tolist() == [0, 1, 2, 3]
    order, _, _ = sel.rank_unit(plan, 0, np.array([1, 0, 0, 0], np.uint32), hashes, None)
    assert order.tolist() == [2, 1, 3, 0]  # the unit key first


def test_copies_spread_the_remainder_over_the_first_rows():
    rank = np.arange(3)
    assert sel.copies_for(rank, np.full(3, 3), 10, True).tolist() == [4, 3, 3]
    assert sel.copies_for(rank, np.full(3, 3), 9, True).tolist() == [3, 3, 3]
    assert sel.copies_for(rank, np.full(3, 3), 10, False).tolist() == [1, 1, 1]
    assert sel.copies_for(np.arange(7), np.full(7, 7), 7, True).tolist() == [1] * 7
    assert sel.copies_total(np.array([0, 3, 10]), 10, True).tolist() == [0, 10, 10]


def test_first_failing_check_names_the_reason():
    batch = pa.table({
        "id": pa.array([None, "b", "c", "d", "e", "f"], pa.string()),
        "label": pa.array([None, None, 7, 1, 1, 1], pa.int64()),
        "confidence": pa.array([float("nan"), 0.5, 0.5, None, float("nan"), -0.0], pa.float64()),
    })
    kb = sel.read_keys(batch, num_classes=5)
    names = [sel.REASONS[r - 1] if r else None for r in kb.reason]
    assert names == ["missing_id", "missing_label", "label_out_of_range", "missing_confidence",
                     "confidence_not_finite", None]
    assert kb.confidence[5] == 0 and not np.signbit(kb.confidence[5])  # -0.0 ranks like 0.0


def test_order_key_sorts_by_class_then_confidence_descending():
    labels = np.array([1, 0, 0, 0, 1])
    conf = np.array([1.0, 0.3, 1.0, 0.31, 0.0], np.float32)
    assert np.argsort(sel.order_keys(labels, conf)).tolist() == [2, 3, 1, 0, 4]
    np.testing.assert_array_equal(sel.conf_from_inv(sel.conf_inv(conf)), conf)
