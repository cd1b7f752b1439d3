"""The scale rehearsal's instruments (benchmarks/scale.py, benchmarks/gcs_emulator.py) and what they check.

First the harness itself: the local GCS emulator serves Beam's real GCS filesystem, and counts what it is asked.
Then growth, measured from outside through the public entry points at two input sizes:

- a stage's Dataflow job graph (the pipeline proto of a `--dry_run` launch through `pipelines.<stage>.run`) must not
  grow with the number of input files: no per-file or per-unit data in the job;
- finalize (the fused stage holding the `Finalize` step, on the local runner against the emulator) must not make
  more requests for more files: batched renames and deletes, no per-object metadata requests (O(files / 100)),
  and neither must the launch (what the command asks before the pipeline runs). label's inputs there are tar
  containers, each a work unit.
"""
from __future__ import annotations

import functools
import importlib
import os
import sys
from pathlib import Path

import pytest

from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner

from tests.test_dataflow import offline  # noqa: F401  (fixture: no network, no credentials)

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import scale  # noqa: E402
from gcs_emulator import CountingEmulator, classify  # noqa: E402


# ------------------------------------------------------------------------------------------------ harness


def test_the_emulator_serves_beams_gcs_filesystem_and_counts_its_requests():
    from apache_beam.io.filesystems import FileSystems

    before = os.environ.get("STORAGE_EMULATOR_HOST")
    with CountingEmulator("bucket") as emu:
        assert emu.endpoint.startswith("http://127.0.0.1:")
        assert os.environ["STORAGE_EMULATOR_HOST"] == emu.endpoint
        for i in range(3):
            with FileSystems.create(f"gs://bucket/d/f{i}.bin") as f:
                f.write(bytes([i]) * (1000 + i))
        listed = {m.path: m.size_in_bytes for m in FileSystems.match(["gs://bucket/d/*"])[0].metadata_list}
        assert listed == {f"gs://bucket/d/f{i}.bin": 1000 + i for i in range(3)}
        written = emu.counts()

        FileSystems.rename(["gs://bucket/d/f0.bin", "gs://bucket/d/f1.bin"],
                           ["gs://bucket/e/f0.bin", "gs://bucket/e/f1.bin"])
        with FileSystems.open("gs://bucket/e/f1.bin") as f:
            assert f.read() == b"\x01" * 1001
        FileSystems.delete(["gs://bucket/e/f0.bin", "gs://bucket/e/f1.bin", "gs://bucket/d/f2.bin"])
        assert FileSystems.match(["gs://bucket/**"])[0].metadata_list == []

        ops = emu.counts(items=True)
        http = emu.counts()
    assert os.environ.get("STORAGE_EMULATOR_HOST") == before  # restored on exit
    # Three uploads (a resumable upload: start, then its one chunk) and a listing before the rename.
    assert written["upload.resumable_start"] == 3 and written["upload.resumable_chunk"] == 3
    assert written["objects.list"] == 1
    # The rename is one batch of two copies and one batch of two deletes; the delete, batches of deletes.
    assert ops["batch:POST.copyTo"] == 2 and ops["batch:DELETE"] == 5
    assert http["batch"] >= 2 and "batch:DELETE" not in http
    assert ops["media.get"] >= 1 and http["objects.list"] == 2
    assert sum(ops.values()) > sum(http.values())  # batch items are operations, not HTTP requests
    phases = {r.phase for r in emu.requests}
    assert phases == {"launch"}  # no pipeline ran


@pytest.mark.parametrize("method, path, query, kind, target", [
    ("GET", "/storage/v1/b/bk/o/a%2Fb.parquet", "", "objects.get", "bk/a/b.parquet"),
    ("GET", "/storage/v1/b/bk/o/a%2Fb.parquet", "alt=media", "media.get", "bk/a/b.parquet"),
    ("GET", "/download/storage/v1/b/bk/o/x", "alt=media", "media.get", "bk/x"),
    ("GET", "/storage/v1/b/bk/o", "prefix=d%2F", "objects.list", "bk/d/"),
    ("GET", "/storage/v1/b/bk", "", "buckets.get", "bk"),
    ("DELETE", "/storage/v1/b/bk/o/x", "", "objects.delete", "bk/x"),
    ("POST", "/storage/v1/b/bk/o/x/rewriteTo/b/bk/o/y", "", "objects.rewrite", "bk/y"),
    ("POST", "/upload/storage/v1/b/bk/o", "uploadType=multipart&name=z", "upload.multipart", "bk/z"),
    ("POST", "/batch/storage/v1", "", "batch", ""),
])
def test_requests_are_classified_by_kind(method, path, query, kind, target):
    assert classify(method, path, query) == (kind, target)


def test_a_stage_run_against_the_emulator_is_attributed_to_launch_work_finalize_and_after():
    """balance over 3 label files on gs://: every phase makes requests, and finalize writes the marker."""
    run = scale.requests_run("balance", 3)
    assert run["input_files"] == 3 and run["output_files"] >= 2  # data files and the marker
    assert all(run[group]["requests"] > 0 for group in ("launch", "work", "finalize"))
    assert sum(run[g]["requests"] for g in scale.PHASE_GROUPS) == run["whole"]["requests"]
    assert run["finalize"]["by_kind"].get("upload.resumable_start", 0) + \
        run["finalize"]["by_kind"].get("upload.multipart", 0) >= 1  # the marker


# ------------------------------------------------------------------------------------- growth: job graph

SMALL, LARGE = 300, 3000  # input files: 10x


@pytest.fixture
def graph_bytes(offline, monkeypatch):  # noqa: F811
    """`graph_bytes(stage, inputs, out)`: the bytes of the pipeline proto of the Dataflow job that
    `pipelines.<stage>.run` translates in a dry run (benchmarks/scale.py's options), offline."""
    jobs = []
    translate = DataflowRunner.run_pipeline

    def keep(runner, pipeline, options, pipeline_proto=None):
        result = translate(runner, pipeline, options, pipeline_proto)
        jobs.append(result.job)
        return result

    monkeypatch.setattr(DataflowRunner, "run_pipeline", keep)

    def measure(stage: str, inputs: Path, out: Path) -> int:
        importlib.import_module(f"pipelines.{stage}").run(scale.stage_argv(stage, str(inputs), str(out))
                                                          + scale.DATAFLOW)
        (job,) = jobs
        jobs.clear()
        return len(job.proto_pipeline.SerializeToString())

    return measure


@pytest.mark.parametrize("stage", scale.STAGES)
def test_the_job_graph_does_not_grow_with_input_files(stage, graph_bytes, tmp_path):
    """Dataflow dry runs over 300 and 3,000 input files (loose images for label, label files for balance,
    selection files for shard; the same path lengths at both sizes): the larger job graph is at most 1% larger.
    (A graph that grows by a byte per file, e.g. 300M bytes for 300M images, fails this.)"""
    small = graph_bytes(stage, scale.INPUTS[stage](SMALL, tmp_path), tmp_path / "out-small")
    large = graph_bytes(stage, scale.INPUTS[stage](LARGE, tmp_path), tmp_path / "out-large")
    per_file = (large - small) / (LARGE - SMALL)
    assert large <= small * 1.01, (f"{stage}: {small:,} bytes at {SMALL} files, {large:,} at {LARGE} "
                                   f"({large / small:.2f}x, {per_file:.1f} bytes per input file)")


# ------------------------------------------------------------------------------- growth: finalize requests

FEW, MORE = 4, 12  # input files


@functools.lru_cache(maxsize=None)
def emulated(stage: str) -> tuple[dict, dict]:
    """The stage on the local runner over 4 and 12 input files on gs:// in the emulator (shard: into 2 and 6
    shards); run once per stage for the tests below."""
    return scale.requests_run(stage, FEW, shards=FEW // 2), scale.requests_run(stage, MORE, shards=MORE // 2)


@pytest.mark.parametrize("stage", scale.STAGES)
def test_finalize_requests_do_not_grow_with_files(stage):
    """finalize's requests (HTTP requests; a batch is one) over 12 input files are those over 4 up to 2, i.e.
    O(files / 100): no per-object metadata request, read or one-object delete."""
    few, more = emulated(stage)
    a, b = few["finalize"], more["finalize"]
    assert a["requests"] > 0 and b["requests"] > 0, "no request in a step named Finalize: where is finalize?"
    assert b["requests"] <= a["requests"] + 2, (
        f"{stage}: finalize made {a['requests']} requests for {FEW} input / {few['output_files']} output files, "
        f"{b['requests']} for {MORE} / {more['output_files']}; by kind {a['by_kind']} -> {b['by_kind']}")


@pytest.mark.parametrize("stage", scale.STAGES)
def test_launch_requests_do_not_grow_with_input_files(stage):
    """What the command asks the object store before its pipeline runs (listing, checking the output) is the
    same up to 2 requests over 4 and 12 input files: no footer or header of each input read on the launcher."""
    few, more = emulated(stage)
    a, b = few["launch"], more["launch"]
    assert b["requests"] <= a["requests"] + 2, (
        f"{stage}: the launch made {a['requests']} requests for {FEW} input files, {b['requests']} for {MORE}; "
        f"by kind {a['by_kind']} -> {b['by_kind']}")


# --------------------------------------------------------------------- growth: plain Parquet inputs' launch

PLAIN = ("balance-plain", "shard-plain")


@pytest.mark.parametrize("launch", PLAIN)
def test_a_launch_over_plain_parquet_files_does_not_grow_with_them(launch, graph_bytes, tmp_path, monkeypatch):
    """balance and shard over a directory of plain Parquet files (no marker): Dataflow dry runs over 300 and
    3,000 files list the same number of files and open the same number of Parquet files on the launcher (the
    listing stops after reading.LAUNCH_CHECK_FILES, set to 100 here; one footer and a bounded sample are read),
    and the job graph is at most 1% larger. (A launcher that lists or opens every file fails this.)"""
    import pyarrow.parquet as pq
    from apache_beam.io.filesystems import FileSystems

    from ns_data import reading

    monkeypatch.setattr(reading, "LAUNCH_CHECK_FILES", 100)
    listed, opened = [], []
    match = FileSystems.match
    monkeypatch.setattr(FileSystems, "match", staticmethod(
        lambda patterns, limits=None: [listed.append(len(r.metadata_list)) or r for r in match(patterns, limits)]))

    class CountedParquetFile(pq.ParquetFile):
        def __init__(self, source, *args, **kwargs):
            opened.append(source)
            super().__init__(source, *args, **kwargs)

    monkeypatch.setattr(pq, "ParquetFile", CountedParquetFile)
    stage = scale.stage_of(launch)
    seen = []
    for n in (SMALL, LARGE):
        inputs = scale.INPUTS[launch](n, tmp_path)
        listed.clear()
        opened.clear()
        seen.append((graph_bytes(stage, inputs, tmp_path / f"out-{n}"), sum(listed), len(opened)))
    (small, listed_small, opened_small), (large, listed_large, opened_large) = seen
    assert (listed_large, opened_large) == (listed_small, opened_small), (
        f"{launch}: the launcher listed {listed_small:,} files and opened {opened_small} at {SMALL} input files, "
        f"{listed_large:,} and {opened_large} at {LARGE}")
    assert opened_small <= 4 and listed_small <= 200  # a footer, a sample; the first 100 files
    assert large <= small * 1.01, f"{launch}: {small:,} bytes at {SMALL} files, {large:,} at {LARGE}"
