"""Shared fixtures: small pseudo-label tables built in the test, and a helper that runs `balance` locally."""
from __future__ import annotations

import glob
import os

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ns_data.balance import BalanceOptions, run_balance

TIE_VALUES = np.array([0.1, 0.3, 0.5, 0.75, 0.9, 0.99, 1.0], dtype=np.float32)


@pytest.fixture(autouse=True)
def unit_per_row_group(monkeypatch):
    """Work units of one row group each: small test inputs would otherwise make a single unit (ReadUnits cuts
    units of reading.UNIT_BYTES), and the stages' paths across units would go untested. Tests of larger units
    set their own size."""
    from ns_data import reading

    monkeypatch.setattr(reading, "UNIT_BYTES", 1)


@pytest.fixture
def object_store(tmp_path):
    """An object store with GCS's semantics (tests/fake_store.py), empty, its requests counted."""
    from tests.fake_store import FakeObjectStore

    FakeObjectStore.root = str(tmp_path / "store")
    FakeObjectStore.requests.clear()
    os.makedirs(FakeObjectStore.root)
    yield "fakestore://bucket"
    FakeObjectStore.root = None


def random_table(rng: np.random.Generator, n: int, classes: int, tie_share: float = 0.6) -> pa.Table:
    """Rows with skewed classes and many exact confidence ties, plus pass-through columns."""
    p = 1.0 / np.arange(1, classes + 1)
    labels = rng.choice(classes, size=n, p=p / p.sum()).astype(np.int32)
    conf = rng.random(n).astype(np.float32)
    tie = rng.random(n) < tie_share
    conf[tie] = rng.choice(TIE_VALUES, size=int(tie.sum()))
    ids = [f"img/{i:06d}.jpg" for i in rng.permutation(n)]
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "source": pa.array([f"shard-{i % 7}.tar" for i in range(n)], pa.string()),
        "offset": pa.array(np.arange(n, dtype=np.int64) * 512),
        "label": pa.array(labels),
        "confidence": pa.array(conf),
        "topk_classes": pa.array([[int(l), (int(l) + 1) % classes] for l in labels], pa.list_(pa.int32())),
        "topk_probs": pa.array([[float(c), float(1 - c) / 2] for c in conf], pa.list_(pa.float32())),
    })


def write_parts(table: pa.Table, directory, files: int, row_group_rows: int = 1000, order=None) -> list[str]:
    """Split a table into `files` Parquet files (rows in `order` if given); returns the paths."""
    os.makedirs(directory, exist_ok=True)
    if order is not None:
        table = table.take(pa.array(order))
    bounds = np.linspace(0, table.num_rows, files + 1).astype(int)
    paths = []
    for i in range(files):
        path = os.path.join(str(directory), f"part-{i:03d}.parquet")
        pq.write_table(table.slice(bounds[i], bounds[i + 1] - bounds[i]), path, row_group_size=row_group_rows)
        paths.append(path)
    return paths


def read_output(output, kind: str) -> pd.DataFrame:
    paths = sorted(glob.glob(os.path.join(str(output), f"{kind}-*.parquet")))
    if not paths:
        return pd.DataFrame()
    df = pq.read_table(paths).to_pandas()
    keys = ["id", "reason"] if kind == "errors" else ["id"]
    return df.sort_values(keys, kind="stable").reset_index(drop=True)


def balance(inputs, output, **options) -> tuple[dict, pd.DataFrame, pd.DataFrame]:
    """Run the pipeline on the in-process runner; (stats, selection sorted by id, errors sorted by id), after
    checking that stats.json describes the files written beside it."""
    inputs = (inputs,) if isinstance(inputs, (str, os.PathLike)) else inputs
    opts = BalanceOptions(inputs=tuple(str(i) for i in inputs), output=str(output), **options)
    stats, wrote = run_balance(opts, [], echo=lambda message: None)
    assert wrote
    selection, errors = read_output(output, "selection"), read_output(output, "errors")
    assert len(selection) == stats["selected_rows"]
    assert int(selection["copies"].sum() if len(selection) else 0) == stats["total_copies"]
    assert len(errors) == stats["rejected_rows"]
    assert stats["input_rows"] == stats["rejected_rows"] + stats["below_min_confidence"] + stats["candidates"]
    return stats, selection, errors


@pytest.fixture(autouse=True)
def one_local_worker(monkeypatch):
    """The local runner in this process unless a test asks for workers (each worker process takes a second or
    two to start, longer than most tests' pipelines run); tests of several workers pass --direct_num_workers
    or patch `local_cores` back."""
    from ns_data import runner

    monkeypatch.setattr(runner, "local_cores", lambda: 1)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
