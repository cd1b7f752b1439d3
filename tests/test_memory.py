import os

import apache_beam as beam
import pyarrow as pa

from ns_data import runner
from ns_data.memory import COMPACT_HEAP


class RecordHeap(beam.DoFn):
    """Writes what allocator settings the process running it has, one file per process."""

    def __init__(self, out_dir):
        self.out_dir = out_dir

    def process(self, unit):
        path = os.path.join(self.out_dir, f"{os.getpid()}.txt")
        with open(path, "w") as f:
            f.write(f"{os.environ.get('MALLOC_ARENA_MAX')} {pa.default_memory_pool().backend_name}")
        yield unit


class Stage(beam.PTransform):
    def __init__(self, out_dir):
        super().__init__()
        self.out_dir = out_dir

    def expand(self, units):
        return units | "Record" >> beam.ParDo(RecordHeap(self.out_dir))


def _run(tmp_path, name, workers, compact):
    out = tmp_path / name
    out.mkdir()
    assert runner.run_stage("Stage", range(4), Stage(str(out)), ["--direct_num_workers", str(workers)],
                            compact=compact)
    return {f.read_text() for f in out.iterdir()}, len(list(out.iterdir()))


def test_compact_heap_reaches_worker_processes_and_is_undone_after(tmp_path, monkeypatch):
    for name in COMPACT_HEAP:
        monkeypatch.delenv(name, raising=False)
    pool = pa.default_memory_pool().backend_name
    settings, processes = _run(tmp_path, "workers", 2, compact=True)
    assert processes == 2 and settings == {"2 system"}
    assert _run(tmp_path, "in_process", 1, compact=True)[0] == {"2 system"}
    assert all(name not in os.environ for name in COMPACT_HEAP)
    assert pa.default_memory_pool().backend_name == pool
    assert _run(tmp_path, "not_compact", 2, compact=False)[0] == {f"None {pool}"}


def test_compact_heap_leaves_what_the_user_set(tmp_path, monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL", raising=False)
    assert _run(tmp_path, "workers", 2, compact=True)[0] == {"4 system"}
    assert os.environ["MALLOC_ARENA_MAX"] == "4"
