import numpy as np
import pyarrow as pa

from ns_data.hashing import hash_ids


def test_known_values_never_change():
    # The hash orders ties in every selection: these values are part of the output contract.
    got = hash_ids(pa.array(["", "a", "img/000001.jpg", "ünïcødé/ファイル.png"]), seed=0)
    assert got.tolist() == PINNED_SEED0
    assert hash_ids(pa.array(["a"]), seed=7).tolist() != PINNED_SEED0[1:2]


def test_hash_does_not_depend_on_the_batch():
    ids = ["x", "a-much-longer-identifier/with/parts/0001.jpg", "ü", "short"]
    alone = [int(hash_ids(pa.array([i]), 3)[0]) for i in ids]
    together = hash_ids(pa.array(ids), 3).tolist()
    large = hash_ids(pa.array(ids, pa.large_string()), 3).tolist()
    sliced = hash_ids(pa.array(["pad"] + ids).slice(1), 3).tolist()
    assert alone == together == large == sliced


def test_zero_padding_and_length_are_distinguished():
    got = hash_ids(pa.array(["a", "a\0", "a\0\0\0\0\0\0\0", ""]), 0)
    assert len(set(got.tolist())) == 4


def test_seed_changes_order_and_bits_are_uniform():
    ids = pa.array([f"img/{i:07d}.jpg" for i in range(20000)])
    h0, h1 = hash_ids(ids, 0), hash_ids(ids, 1)
    assert len(np.unique(h0)) == len(h0)
    assert not np.array_equal(np.argsort(h0), np.argsort(h1))
    top = (h0 >> np.uint64(48)).astype(np.float64) / 2**16  # level-3 digits must spread uniformly
    assert abs(top.mean() - 0.5) < 0.02
    assert 0.45 < np.mean(h0 & np.uint64(1)) < 0.55


def test_nulls_hash_like_empty_string():
    assert hash_ids(pa.array([None, ""], pa.string()), 5)[0] == hash_ids(pa.array([""]), 5)[0]


# hash("", seed 0) is splitmix64's first output for state 0 (0xE220A8397B1DCDAF), a public check value.
PINNED_SEED0 = [16294208416658607535, 5114193057691249376, 14985968709284633881, 15158867038000543961]
