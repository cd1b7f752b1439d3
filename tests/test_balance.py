"""`balance` on the in-process runner against the pandas reference, and every bad input the issue names."""
from __future__ import annotations

import dataclasses
import glob
import json
import os

import apache_beam as beam
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import DirectOptions
from apache_beam.testing.test_pipeline import TestPipeline as BeamTestPipeline
from apache_beam.testing.util import assert_that, equal_to

from ns_data import balance as balance_module
from ns_data import contract, runner
from ns_data.balance import Balance, BalanceOptions, OptionsError, prepare, run_balance
from ns_data.stage import InputError, OutputExists
from tests.conftest import balance, random_table, read_output, write_parts
from tests.reference import reference

SELECTION_COLUMNS = ["id", "source", "offset", "label", "confidence", "topk_classes", "topk_probs", "rank",
                     "copies"]


def assert_same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    assert list(got.columns) == list(want.columns)
    assert len(got) == len(want)
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True), check_dtype=False)


def check_invariant(stats: dict) -> None:
    assert stats["input_rows"] == (stats["selected_rows"] + stats["rejected_rows"] + stats["not_kept"]
                                   + stats["below_min_confidence"])


@pytest.mark.parametrize("per_class,min_confidence,upsample,seed,unit_rows", [
    (40, 0.3, True, 0, 262_144),  # the defaults' shape: one level of bins
    (40, 0.3, True, 0, 3),  # tiny sort units force levels 2 and 3 (exact confidence, then hash digits)
    (1000, 0.0, False, 99, 7),  # per-class above every class size, no upsampling, another seed
    (5, 0.9, True, 2**63 + 5, 2),
])
def test_matches_reference(tmp_path, rng, per_class, min_confidence, upsample, seed, unit_rows):
    table = random_table(rng, 3000, 12)
    paths = write_parts(table, tmp_path / "in", files=3, row_group_rows=400)
    stats, got, errors = balance(paths, tmp_path / "out", per_class=per_class, min_confidence=min_confidence,
                                 upsample=upsample, seed=seed, unit_rows=unit_rows, batch_rows=256)
    want, want_errors = reference(table, per_class, min_confidence, upsample, seed)
    assert_same(got, want)
    assert errors.empty and want_errors.empty
    check_invariant(stats)
    for label, c in stats["classes"].items():
        kept = want[want["label"] == int(label)]
        assert c["selected"] == len(kept)
        assert c["copies"] == int(kept["copies"].sum())
        assert np.float32(c["min_confidence_selected"]) == kept["confidence"].min()


def test_ties_are_broken_by_hash_then_id_not_by_input_order(tmp_path, rng):
    # Every row has the same confidence: the order is purely the seeded id hash.
    n = 500
    table = pa.table({"id": [f"t{i}" for i in range(n)], "label": pa.array(np.zeros(n, np.int32)),
                      "confidence": pa.array(np.full(n, 1.0, np.float32))})
    _, got, _ = balance(write_parts(table, tmp_path / "a", 2), tmp_path / "out", per_class=100, seed=11)
    want, _ = reference(table, 100, seed=11)
    assert_same(got, want)
    _, other_seed, _ = balance(write_parts(table, tmp_path / "b", 2), tmp_path / "out2", per_class=100, seed=12)
    assert set(other_seed["id"]) != set(got["id"])


def test_same_selection_from_one_file_or_seven_in_any_order(tmp_path, rng):
    table = random_table(rng, 4000, 9)
    one = write_parts(table, tmp_path / "one", files=1, row_group_rows=4000)
    seven = write_parts(table, tmp_path / "seven", files=7, row_group_rows=123, order=rng.permutation(4000))
    opts = dict(per_class=150, unit_rows=50, batch_rows=100)
    _, a, _ = balance(one, tmp_path / "out1", **opts)
    _, b, _ = balance(list(reversed(seven)), tmp_path / "out7", **opts)
    assert_same(a, b)
    # Byte for byte: the sorted selections serialize identically.
    sink_a, sink_b = pa.BufferOutputStream(), pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(a, preserve_index=False), sink_a)
    pq.write_table(pa.Table.from_pandas(b, preserve_index=False), sink_b)
    assert sink_a.getvalue() == sink_b.getvalue()


def test_upsampling_totals_exactly_per_class(tmp_path, rng):
    table = random_table(rng, 3000, 15)
    stats, got, _ = balance(write_parts(table, tmp_path / "in", 2), tmp_path / "out", per_class=97)
    totals = got.groupby("label")["copies"].sum()
    assert (totals == 97).all()
    assert len(totals) == len(stats["classes"])
    assert stats["total_copies"] == 97 * len(totals)
    assert any(c["candidates"] < 97 for c in stats["classes"].values())  # some classes were upsampled
    # Copies differ by at most one within a class, and the extra ones go to the most confident rows.
    for _, cls in got.groupby("label"):
        cls = cls.sort_values("rank")
        assert cls["copies"].max() - cls["copies"].min() <= 1
        assert cls["copies"].is_monotonic_decreasing


def test_pass_through_columns_types_and_metadata(tmp_path, rng):
    table = random_table(rng, 500, 4).replace_schema_metadata({b"ns_data.teacher": b'{"model": "m"}'})
    stats, got, _ = balance(write_parts(table, tmp_path / "in", 1), tmp_path / "out", per_class=30)
    schema = pq.read_schema(next((tmp_path / "out").glob("selection-*.parquet")))
    assert schema.names == SELECTION_COLUMNS
    assert schema.field("rank").type == pa.int32() and schema.field("copies").type == pa.int32()
    assert schema.field("topk_probs").type == pa.list_(pa.float32())
    # A plain table's teacher: in stats.json as it is, in every selection file's footer in brief.
    assert stats["teacher"] == {"model": "m"}
    assert json.loads(schema.metadata[b"ns_data.teacher"]) == contract.footer_teacher({"model": "m"})
    assert set(contract.footer_teacher({"model": "m"})) == {"model", "identity_sha256"}
    assert json.loads(schema.metadata[b"ns_data.balance"])["per_class"] == 30
    assert stats["options"]["per_class"] == 30


def bad_rows_table() -> tuple[pa.Table, dict]:
    """One good class and every kind of bad row; returns the table and the expected reason per id."""
    rows = [  # id, label, confidence
        ("good-0", 0, 0.9), ("good-1", 0, 0.8), ("good-2", 1, 0.95), ("low", 1, 0.1),
        (None, 0, 0.9), ("", 0, 0.9),
        ("nolabel", None, 0.9), ("neg-label", -1, 0.9), ("big-label", 5, 0.9),
        ("noconf", 0, None), ("nan", 0, float("nan")), ("inf", 0, float("inf")), ("ninf", 0, float("-inf")),
        ("neg", 0, -0.01), ("over", 0, 1.0001),
        ("dup", 0, 0.5), ("dup", 1, 0.7), ("dup", 0, 0.7),  # kept: conf 0.7, then lowest label -> label 0
        ("dup-nan", 0, float("nan")), ("dup-nan", 0, 0.6),  # an invalid copy does not block the valid one
        ("same", 1, 0.4), ("same", 1, 0.4),  # identical rows: one kept, one rejected
    ]
    table = pa.table({
        "id": pa.array([r[0] for r in rows], pa.string()),
        "label": pa.array([r[1] for r in rows], pa.int32()),
        "confidence": pa.array([r[2] for r in rows], pa.float32()),
    })
    return table, {
        None: "missing_id", "": "missing_id", "nolabel": "missing_label", "neg-label": "label_out_of_range",
        "big-label": "label_out_of_range", "noconf": "missing_confidence", "nan": "confidence_not_finite",
        "inf": "confidence_not_finite", "ninf": "confidence_not_finite", "neg": "confidence_out_of_range",
        "over": "confidence_out_of_range",
    }


def test_every_bad_row_is_rejected_with_its_reason_and_nothing_is_lost(tmp_path):
    table, reasons = bad_rows_table()
    paths = write_parts(table, tmp_path / "in", files=3, row_group_rows=4)
    stats, got, errors = balance(paths, tmp_path / "out", per_class=10, num_classes=3)
    want, want_errors = reference(table, 10, num_classes=3)
    assert_same(got, want)
    assert_same(errors, want_errors)
    by_id = dict(zip(errors["id"].fillna("<null>"), errors["reason"]))
    for row_id, reason in reasons.items():
        assert by_id["<null>" if row_id is None else row_id] == reason
    assert sorted(errors.loc[errors["id"].isin(["dup", "same"]), "reason"]) == ["duplicate_id"] * 3
    kept_dup = got[got["id"] == "dup"]
    assert kept_dup[["label", "confidence"]].values.tolist() == [[0, np.float32(0.7)]]
    assert got[got["id"] == "dup-nan"]["confidence"].tolist() == [np.float32(0.6)]
    assert stats["rejected_rows"] == len(errors) == 15
    assert stats["rejected_by_reason"] == errors["reason"].value_counts().to_dict()
    assert stats["below_min_confidence"] == 1
    check_invariant(stats)
    assert stats["input_rows"] == table.num_rows


def test_labels_are_unbounded_without_num_classes(tmp_path):
    table, _ = bad_rows_table()
    _, got, errors = balance(write_parts(table, tmp_path / "in", 1), tmp_path / "out", per_class=2)
    assert "big-label" in set(got["id"])
    assert "label_out_of_range" in set(errors["reason"])  # -1 is still out of range


def test_duplicates_with_different_pass_through_columns_pick_by_content(tmp_path):
    # Same id, label and confidence but different source: the smaller content digest wins, whatever the order.
    def table(order):
        rows = [("x", 0, 0.5, "a.tar"), ("x", 0, 0.5, "b.tar"), ("y", 0, 0.4, "c.tar")]
        rows = [rows[i] for i in order]
        return pa.table({"id": [r[0] for r in rows], "label": pa.array([r[1] for r in rows], pa.int32()),
                         "confidence": pa.array([r[2] for r in rows], pa.float32()),
                         "source": [r[3] for r in rows]})
    _, a, _ = balance(write_parts(table([0, 1, 2]), tmp_path / "a", 3, 1), tmp_path / "oa", per_class=5)
    _, b, _ = balance(write_parts(table([2, 1, 0]), tmp_path / "b", 3, 1), tmp_path / "ob", per_class=5)
    assert_same(a, b)
    want, _ = reference(table([0, 1, 2]), 5)
    assert_same(a, want)


def test_class_with_no_candidate_and_per_class_above_corpus(tmp_path):
    table = pa.table({"id": ["a", "b", "c", "d"], "label": pa.array([0, 0, 2, 2], pa.int32()),
                      "confidence": pa.array([0.9, 0.8, 0.1, 0.2], pa.float32())})
    stats, got, _ = balance(write_parts(table, tmp_path / "in", 1), tmp_path / "out", per_class=1_000_000,
                            num_classes=3)
    assert sorted(got["id"]) == ["a", "b"]
    assert got["copies"].sum() == 1_000_000
    assert set(stats["classes"]) == {"0"}  # classes 1 and 2 have no candidate
    assert stats["below_min_confidence"] == 2
    check_invariant(stats)


def test_empty_input_writes_a_complete_selection_without_files(tmp_path):
    empty = pa.table({"id": pa.array([], pa.string()), "label": pa.array([], pa.int32()),
                      "confidence": pa.array([], pa.float32())})
    stats, got, errors = balance(write_parts(empty, tmp_path / "in", 1), tmp_path / "out", per_class=5)
    assert got.empty and errors.empty
    assert stats["input_rows"] == stats["selected_rows"] == 0
    assert stats["classes"] == {}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["stats.json"]  # no empty file


def test_no_empty_selection_file_and_files_numbered_without_gaps(tmp_path, rng):
    """Row groups sorted by confidence, a unit each: the low-confidence units keep nothing and write no file;
    the files written are numbered 0..n-1."""
    table = random_table(rng, 2000, 4)
    order = np.argsort(-table.column("confidence").to_numpy(), kind="stable")
    stats, got, _ = balance(write_parts(table, tmp_path / "in", 4, 100, order=order), tmp_path / "out",
                            per_class=20, upsample=False)
    files = sorted((tmp_path / "out").glob("selection-*.parquet"))
    assert 0 < len(files) < 20  # 20 units, most keep nothing
    assert [p.name for p in files] == [f"selection-{i:05d}.parquet" for i in range(len(files))]
    assert all(pq.ParquetFile(p).metadata.num_rows > 0 for p in files)
    want, _ = reference(table, 20, upsample=False)
    assert_same(got, want)


def test_all_rows_invalid(tmp_path):
    table = pa.table({"id": ["a", "b"], "label": pa.array([0, 1], pa.int32()),
                      "confidence": pa.array([float("nan"), 2.0], pa.float32())})
    stats, got, errors = balance(write_parts(table, tmp_path / "in", 1), tmp_path / "out", per_class=5)
    assert got.empty and len(errors) == 2
    check_invariant(stats)


@pytest.mark.parametrize("kwargs,message", [
    (dict(per_class=0), "--per-class"),
    (dict(per_class=-5), "--per-class"),
    (dict(min_confidence=1.5), "--min-confidence"),
    (dict(min_confidence=-0.1), "--min-confidence"),
    (dict(num_classes=0), "--num-classes"),
    (dict(seed=-1), "--seed"),
    (dict(unit_rows=0), "--unit-rows"),
])
def test_bad_options_are_clear_errors_before_any_work(tmp_path, kwargs, message):
    with pytest.raises(OptionsError, match=message):
        prepare(BalanceOptions(inputs=(str(tmp_path),), output=str(tmp_path / "out"), **kwargs))
    assert not (tmp_path / "out").exists()


def test_missing_column_wrong_type_and_missing_file_are_clear_errors(tmp_path):
    good = pa.table({"id": ["a"], "label": pa.array([0], pa.int32()), "confidence": pa.array([0.5], pa.float32())})
    pq.write_table(good, tmp_path / "good.parquet")
    pq.write_table(good.drop(["confidence"]), tmp_path / "noconf.parquet")
    pq.write_table(good.set_column(1, "label", pa.array(["zero"])), tmp_path / "strlabel.parquet")
    pq.write_table(good.set_column(0, "id", pa.array([7])), tmp_path / "intid.parquet")
    pq.write_table(good.append_column("rank", pa.array([1])), tmp_path / "hasrank.parquet")
    (tmp_path / "notparquet.parquet").write_text("hello")
    (tmp_path / "emptydir").mkdir()
    out = str(tmp_path / "out")
    cases = [
        ("noconf.parquet", r"noconf\.parquet: missing required column 'confidence'"),
        ("strlabel.parquet", r"strlabel\.parquet: column 'label' has type string"),
        ("intid.parquet", r"intid\.parquet: column 'id' has type int64"),
        ("hasrank.parquet", r"hasrank\.parquet: has a column named 'rank'"),
        ("notparquet.parquet", r"notparquet\.parquet: cannot read as Parquet"),
        ("missing.parquet", r"input not found.*missing\.parquet"),
        ("nothing-*.parquet", r"input not found"),
        ("emptydir", r"input not found or empty: .*emptydir"),
    ]
    for name, message in cases:
        with pytest.raises(InputError, match=message):
            prepare(BalanceOptions(inputs=(str(tmp_path / "good.parquet"), str(tmp_path / name)), output=out))
    assert not os.path.exists(out)


def test_files_with_different_schemas_are_rejected(tmp_path):
    a = pa.table({"id": ["a"], "label": pa.array([0], pa.int32()), "confidence": pa.array([0.5], pa.float32())})
    pq.write_table(a, tmp_path / "a.parquet")
    pq.write_table(a.append_column("extra", pa.array([1])), tmp_path / "b.parquet")
    # The launcher reads one footer per input; the others are checked in the pipeline, before any output file.
    with pytest.raises(Exception, match=r"b\.parquet: schema differs from .*a\.parquet"):
        run_balance(BalanceOptions(inputs=(str(tmp_path),), output=str(tmp_path / "out")), [])
    assert not list((tmp_path / "out").glob("*.parquet")) and not (tmp_path / "out" / "stats.json").exists()


def test_output_is_complete_or_absent_and_never_silently_replaced(tmp_path, rng):
    paths = write_parts(random_table(rng, 300, 3), tmp_path / "in", 1)
    out = tmp_path / "out"
    opts = BalanceOptions(inputs=tuple(paths), output=str(out), per_class=10)
    balance(paths, out, per_class=10)
    assert sorted(p.name for p in out.iterdir())[-1] == "stats.json"
    assert not any(p.name.startswith(".tmp") for p in out.iterdir())
    notes = []
    stats, wrote = run_balance(opts, [], echo=notes.append)
    assert not wrote and notes == [f"{out} is already complete for these inputs and options; nothing to do"]
    with pytest.raises(OutputExists, match="holds a complete balance output of other inputs or options"):
        balance(paths, out, per_class=11)
    (out / "stats.json").unlink()  # files without a marker or a plan: not this policy's to replace
    with pytest.raises(OutputExists, match="already holds balance files"):
        balance(paths, out, per_class=10)
    prepare(dataclasses.replace(opts, overwrite=True))  # a run that started and died: its plan is in place
    assert not (out / "stats.json").exists() and (out / ".tmp-balance" / "plan.json").exists()
    with pytest.raises(OutputExists, match="unfinished balance run of other inputs or options"):
        balance(paths, out, per_class=12)
    notes.clear()
    stats, wrote = run_balance(opts, [], echo=notes.append)  # the same command: the run starts over
    assert wrote and notes == [f"balance: restarting the interrupted run in {out}"]
    stats, got, _ = balance(paths, out, per_class=20, overwrite=True)
    assert got.groupby("label")["copies"].sum().eq(20).all()
    assert not (out / ".tmp-balance").exists()


def test_balance_transform_on_test_pipeline(tmp_path, rng):
    table = random_table(rng, 800, 5)
    ctx = prepare(BalanceOptions(inputs=tuple(write_parts(table, tmp_path / "in", 2, 100)),
                                 output=str(tmp_path / "out"), per_class=25, unit_rows=10))
    with BeamTestPipeline(runner="FnApiRunner") as p:
        stats_path = p | ctx.read_units() | beam.Reshuffle() | Balance(ctx)
        assert_that(stats_path, equal_to([os.path.join(str(tmp_path / "out"), "stats.json")]))
    want, _ = reference(table, 25)
    assert_same(read_output(tmp_path / "out", "selection"), want)


def test_directory_glob_and_file_inputs_are_the_same_rows(tmp_path, rng):
    table = random_table(rng, 600, 4)
    write_parts(table, tmp_path / "in" / "nested", 3)
    a, _, _ = balance([tmp_path / "in"], tmp_path / "o1", per_class=10)
    b, _, _ = balance([str(tmp_path / "in" / "nested" / "part-*.parquet"), str(tmp_path / "in" / "nested")],
                      tmp_path / "o2", per_class=10)
    assert a["input_rows"] == b["input_rows"] == 600


def _output_bytes(output) -> dict:
    """Every file of an output, byte for byte; stats.json without the options (they name the run's settings)."""
    files = {}
    for path in sorted(glob.glob(os.path.join(str(output), "*"))):
        data = open(path, "rb").read()
        if path.endswith("stats.json"):
            data = {k: v for k, v in json.loads(data).items() if k not in ("options", "fingerprint")}
        files[os.path.basename(path)] = data
    return files


def test_same_bytes_with_one_or_two_worker_processes_and_either_shuffle(tmp_path, rng, monkeypatch):
    table = random_table(rng, 5000, 8)
    repeated = table.slice(0, 300).set_column(4, "confidence", pa.array(rng.random(300).astype(np.float32)))
    table = pa.concat_tables([table, repeated])  # 300 ids twice: duplicates, decided across files
    paths = write_parts(table, tmp_path / "in", files=4, row_group_rows=300, order=rng.permutation(table.num_rows))
    opts = dict(inputs=tuple(paths), per_class=400, unit_rows=64, batch_rows=128, dedup_bucket_rows=1000)
    monkeypatch.setattr(runner, "local_cores", lambda: 2)  # the default: one worker process per core...
    monkeypatch.setattr(balance_module, "MIN_ROWS_FOR_WORKERS", 1000)  # ...when the input is large enough
    assert runner.pipeline_options([], 2).view_as(DirectOptions).direct_running_mode == "multi_processing"
    outputs = {}
    for name, shuffle, args in [("default", "auto", []), ("one", "auto", ["--direct_num_workers", "1"]),
                                ("beam", "beam", ["--direct_num_workers=2"])]:
        out = tmp_path / name
        stats, wrote = run_balance(BalanceOptions(output=str(out), shuffle=shuffle, **opts), args)
        assert wrote and not os.path.exists(out / ".tmp-balance")  # spill files go with the temp dir
        outputs[name] = _output_bytes(out)
    assert stats["rejected_by_reason"] == {"duplicate_id": 300}
    assert outputs["default"] == outputs["one"] == outputs["beam"]
    want, _ = reference(table, 400)
    assert_same(read_output(tmp_path / "default", "selection"), want)


def test_local_workers_default_to_the_cores_and_at_most_the_units(monkeypatch):
    monkeypatch.setattr(runner, "local_cores", lambda: 8)
    direct = runner.pipeline_options([]).view_as(DirectOptions)
    assert (direct.direct_num_workers, direct.direct_running_mode) == (8, "multi_processing")
    direct = runner.pipeline_options(["--direct_num_workers=1"]).view_as(DirectOptions)
    assert (direct.direct_num_workers, direct.direct_running_mode) == (1, "in_memory")
    with pytest.raises(OptionsError, match="multi_threading is not supported"):
        runner.pipeline_options(["--direct_running_mode", "multi_threading"], 3)
    one = runner.pipeline_options(["--direct_running_mode=multi_threading", "--direct_num_workers=1"])
    assert one.view_as(DirectOptions).direct_running_mode == "multi_threading"  # one thread: nothing to lose


@pytest.mark.parametrize("dtype,high",
                         [(np.uint64, 400), (np.int64, 400), (np.uint64, 2**16 + 1000), (np.uint64, 2**40)])
def test_split_by_groups_in_key_order_keeping_each_groups_order(rng, dtype, high):
    keys = rng.integers(0, high, 5000).astype(dtype)  # 2**16 and above: too wide for the 16-bit sort
    values = np.arange(5000)
    groups = [(key, part) for key, (part,) in balance_module.split_by(keys, values)]
    assert [k for k, _ in groups] == sorted(set(keys.tolist()))
    for key, part in groups:
        assert part.tolist() == np.flatnonzero(keys == key).tolist() and type(key) is dtype


def test_poisoned_probabilities_and_top_k_classes_are_rejected_with_their_reasons(tmp_path):
    """Rows with a valid confidence but NaN, infinite, negative or over-full `topk_probs` / `probs`, or top-k
    classes out of range, are error rows; the selection of the valid rows is the rule's, and nothing is lost."""
    nan, inf = float("nan"), float("inf")
    rows = [  # id, label, confidence, topk_classes, topk_probs, probs
        ("good-0", 0, 0.9, [0, 1], [0.9, 0.1], [0.9, 0.1, 0.0]),
        ("good-1", 1, 0.8, [1, 2], [0.8, 0.2], [0.0, 0.8, 0.2]),
        ("good-2", 1, 0.7, [1, 0], [0.7, 0.3000005], None),  # float32 rounding above 1 is not poison
        ("nan-topk", 0, 0.95, [0, 1], [0.95, nan], [0.95, 0.05, 0.0]),
        ("inf-topk", 0, 0.95, [0, 1], [0.95, inf], [0.95, 0.05, 0.0]),
        ("null-prob", 0, 0.95, [0, 1], [0.95, None], [0.95, 0.05, 0.0]),
        ("neg-topk", 0, 0.95, [0, 1], [0.95, -10.0], [0.95, 0.05, 0.0]),
        ("sum-topk", 0, 0.95, [0, 1], [0.95, 0.5], [0.95, 0.05, 0.0]),
        ("nan-probs", 1, 0.99, [1, 0], [0.99, 0.01], [nan, 0.99, 0.01]),
        ("neg-probs", 1, 0.99, [1, 0], [0.99, 0.01], [-0.5, 0.99, 0.01]),
        ("sum-probs", 1, 0.99, [1, 0], [0.99, 0.01], [0.9, 0.99, 0.01]),
        ("big-class", 2, 0.99, [2, 3], [0.99, 0.01], [0.0, 0.01, 0.99]),
        ("neg-class", 2, 0.99, [2, -1], [0.99, 0.01], [0.0, 0.01, 0.99]),
    ]
    columns = ("id", "label", "confidence", "topk_classes", "topk_probs", "probs")
    types = (pa.string(), pa.int32(), pa.float32(), pa.list_(pa.int32()), pa.list_(pa.float32()),
             pa.list_(pa.float32()))
    table = pa.table({c: pa.array([r[i] for r in rows], t) for i, (c, t) in enumerate(zip(columns, types))})
    paths = write_parts(table, tmp_path / "in", files=2, row_group_rows=3)
    stats, got, errors = balance(paths, tmp_path / "out", per_class=10, num_classes=3, min_confidence=0.3)
    want, want_errors = reference(table, 10, 0.3, num_classes=3)
    assert sorted(got["id"]) == ["good-0", "good-1", "good-2"]
    assert_same(got, want)
    assert_same(errors, want_errors)
    assert dict(zip(errors["id"], errors["reason"])) == {
        "nan-topk": "probs_not_finite", "inf-topk": "probs_not_finite", "null-prob": "probs_not_finite",
        "neg-topk": "probs_negative", "sum-topk": "probs_sum_over_one", "nan-probs": "probs_not_finite",
        "neg-probs": "probs_negative", "sum-probs": "probs_sum_over_one", "big-class": "topk_out_of_range",
        "neg-class": "topk_out_of_range"}
    assert stats["rejected_by_reason"] == errors["reason"].value_counts().to_dict()
    check_invariant(stats)
    assert stats["input_rows"] == table.num_rows == len(got) + len(errors)


def test_units_are_cut_by_bytes_across_files_and_the_result_does_not_depend_on_the_files(tmp_path, rng,
                                                                                         monkeypatch):
    """With units of reading.UNIT_BYTES, 60 small files make one unit and one selection file; the selection is
    the same as from one file read a row group per unit."""
    from ns_data import reading

    table = random_table(rng, 1200, 6)
    per_rg, _, _ = balance(write_parts(table, tmp_path / "one", 1, 100), tmp_path / "out1", per_class=30)
    monkeypatch.setattr(reading, "UNIT_BYTES", 64 * 2**20)
    write_parts(table, tmp_path / "many", 60, 7)
    stats, got, _ = balance([str(tmp_path / "many")], tmp_path / "out60", per_class=30)
    assert [p.name for p in (tmp_path / "out60").glob("selection-*.parquet")] == ["selection-00000.parquet"]
    assert len(stats["input_files"]) == 60
    assert_same(got, read_output(tmp_path / "out1", "selection"))
    same = [k for k in stats if k not in ("input_files", "options", "fingerprint")]
    assert {k: stats[k] for k in same} == {k: per_rg[k] for k in same}


def test_the_context_holds_totals_not_units(tmp_path):
    """prepare reads the label marker's row count; the context carries no list of files or units, so its pickle
    is the same size for 3 and 60 input files."""
    import pickle

    from ns_data.synth import SynthOptions, write_pseudo_labels

    sizes = []
    for files in (3, 60):
        write_pseudo_labels(SynthOptions(output=str(tmp_path / f"l{files:03d}"), rows=600, files=files, classes=5))
        ctx = prepare(BalanceOptions(inputs=(str(tmp_path / f"l{files:03d}"),), output=str(tmp_path / f"o{files:03d}")))
        assert ctx.total_rows == 600 and isinstance(ctx.total_rows, int) and ctx.inputs.marker_rows == 600
        assert not any(isinstance(v, (list, tuple)) and len(v) >= 3 for v in vars(ctx).values())
        sizes.append(len(pickle.dumps(ctx)))
    assert sizes[0] == sizes[1]


def test_the_teacher_goes_from_the_label_stats_json_to_the_selection_stats_json_once(tmp_path):
    """A label output's stats.json holds the teacher (class names); balance records it in its own stats.json,
    its selection files' footers hold it in brief, and the job carries it in its last step only (about one
    copy of the names, not one per step)."""
    import hashlib

    from ns_data.synth import SynthOptions, write_pseudo_labels

    sizes = {}
    for classes in (10, 1000):
        labels = tmp_path / f"labels-{classes}"
        write_pseudo_labels(SynthOptions(output=str(labels), rows=400, files=2, classes=classes, topk=1))
        marker = json.loads((labels / "stats.json").read_text())
        # names that do not compress (Beam compresses what it pickles)
        teacher = marker["teacher"] | {"class_names": [hashlib.sha256(b"%d" % i).hexdigest()[:16]
                                                       for i in range(classes)]}
        (labels / "stats.json").write_text(json.dumps(marker | {"teacher": teacher}))
        opts = BalanceOptions(inputs=(str(labels),), output=str(tmp_path / f"sel-{classes}"), per_class=5,
                              min_confidence=0.0)
        ctx = prepare(opts, echo=lambda m: None)
        brief = contract.footer_teacher(marker["teacher"])  # as the label files hold it: the same in the selection's
        assert brief == {"model": "synthetic", "num_classes": classes,
                         "identity_sha256": contract.teacher_digest(marker["teacher"])}
        assert ctx.teacher == teacher and contract.read_metadata(ctx.schema, contract.TEACHER) == brief
        pipeline = beam.Pipeline()
        _ = pipeline | ctx.read_units() | Balance(ctx)
        sizes[classes] = len(pipeline.to_runner_api().SerializeToString())
        stats, _ = run_balance(opts, echo=lambda m: None)
        assert stats["teacher"] == teacher
        for path in glob.glob(str(tmp_path / f"sel-{classes}" / "*.parquet")):
            assert contract.read_metadata(pq.read_schema(path), contract.TEACHER) == brief
    names = len(json.dumps(teacher["class_names"]))
    assert sizes[1000] - sizes[10] < 1.5 * names, (sizes, names)
