"""Exact resume: a run killed mid-epoch and started again sees the batches (images after augmentation, targets)
an uninterrupted run sees, for 0, 1, 2 and more DataLoader workers than shards; checked on the streams
themselves, and on whole runs, killed with SIGKILL, by their per-step losses and bit-identical final weights."""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from ns_train import train as train_mod
from ns_train.config import TrainConfig
from ns_train.data import TrainStream, train_loader
from tests.test_train import CLASSES, MODEL, picture, write_shards

STEPS, CHECKPOINT_EVERY = 30, 5
ENV = os.environ | {"OMP_NUM_THREADS": "1"}  # as torchrun sets it: two threads on a busy 2-core machine crawl


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs as the commands below run (ENV): one thread each."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """6 labeled records (fewer than a batch of 8: the labeled stream cycles) and 96 pseudo-labeled ones, 8 a
    step: 12 steps an epoch, so checkpoints every 5 steps fall inside epochs. Two shards of each."""
    root = tmp_path_factory.mktemp("resume-data")
    rng = np.random.default_rng(0)
    labeled = [{"image/encoded": picture(i % CLASSES, rng), "label": i % CLASSES} for i in range(6)]
    pseudo = [{"image/encoded": picture(i % CLASSES, rng), "label": i % CLASSES, "prob": 0.6, "id": f"u{i}",
               "copy": 0, "topk_classes": [i % CLASSES, (i + 1) % CLASSES], "topk_probs": [0.6, 0.3]}
              for i in range(96)]
    return {"labeled": write_shards(root / "labeled", labeled), "unlabeled": write_shards(root / "unlabeled", pseudo)}


def options(data) -> dict:
    """Noise on (RandAugment, flips, dropout, stochastic depth) and an EMA: every source of randomness."""
    return dict(labeled=data["labeled"], unlabeled=data["unlabeled"], model=MODEL, num_classes=CLASSES,
                image_size=32, crop_pct=1.0, batch_size=8, unlabeled_ratio=1.0, shuffle_buffer=16, steps=STEPS,
                checkpoint_every=CHECKPOINT_EVERY, log_every=1, ema_decay=0.9, optimizer="adamw", lr=0.003,
                progress=False)


def losses(run_dir) -> dict[int, float]:
    """Each step's logged loss; a step logged twice (before a kill and after the resume) keeps the last."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {m["step"]: m["loss_total"] for m in map(json.loads, f) if "loss_total" in m}


def logged_steps(run_dir) -> list[int]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [m["step"] for m in map(json.loads, f) if "loss_total" in m]


def assert_same_run(run_dir, whole_dir) -> None:
    assert losses(run_dir) == losses(whole_dir) and len(losses(whole_dir)) == STEPS
    assert logged_steps(run_dir) == list(range(1, STEPS + 1))  # each step once, after a resume too
    got, want = (torch.load(os.path.join(d, "checkpoint.pt"), weights_only=True) for d in (run_dir, whole_dir))
    for part in ("model", "ema"):
        assert got[part].keys() == want[part].keys()
        different = [k for k in want[part] if not torch.equal(got[part][k], want[part][k])]
        assert not different, f"{part} differs in {different[:5]}"


@pytest.mark.parametrize("workers", [0, 1, 2, 3])  # 3: more workers than the 2 shards, one of them idle
def test_a_stream_resumed_from_its_state_yields_the_same_batches(data, workers):
    cfg = TrainConfig(**options(data)).validate()
    for shards, pseudo in ((cfg.labeled, False), (cfg.unlabeled, True)):
        first = train_loader(TrainStream(shards, cfg, pseudo), 8, workers)
        batches = iter(first)
        for _ in range(7):  # 56 of the 96 unlabeled records: mid-epoch for one worker or two
            next(batches)
        state = first.state_dict()
        want = [next(batches) for _ in range(9)]  # on into the next epoch
        got = [b for b, _ in zip(train_loader(TrainStream(shards, cfg, pseudo), 8, workers, state), range(9))]
        for (images, targets), (want_images, want_targets) in zip(got, want, strict=True):
            assert torch.equal(images, want_images) and torch.equal(targets, want_targets)


def command(data, output, workers: int, processes: int = 1) -> list[str]:
    """`ns-train train` as a user starts it: in one process, or under torchrun."""
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)] if processes > 1 \
        else []
    args = [sys.executable, *launcher, "-m", "ns_train.cli", "train", "--output", str(output), "--workers",
            str(workers)]
    for name, value in options(data).items():
        flag = "--" + name.replace("_", "-")
        args += [flag if value is not False else "--no-" + name.replace("_", "-")] if isinstance(value, bool) else \
            [flag, str(value)]
    return args


def descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs (torchrun's ranks run in sessions of their own)."""
    found = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                for child in map(int, f.read().split()):
                    found += [child, *descendants(child)]
    except FileNotFoundError:  # it ended meanwhile
        pass
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL, as when a machine is lost: the command, and every process under it."""
    tree = [proc.pid, *descendants(proc.pid)]
    for pid in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


@pytest.mark.parametrize("workers,processes", [(0, 1), (2, 1), (0, 2)])
def test_a_run_killed_mid_epoch_resumes_on_the_same_batches(data, tmp_path, workers, processes):
    """SIGKILL (the trainer, its DataLoader workers, torchrun and its ranks) once a checkpoint is written and
    steps after it are done, then the same command again: every step's loss and the final weights (model and
    EMA) equal those of a run that was never killed. Two processes keep each rank's position in rank 0's
    checkpoint."""
    whole = subprocess.run(command(data, tmp_path / "whole", workers, processes), capture_output=True, text=True,
                           timeout=600, env=ENV)
    assert whole.returncode == 0, whole.stderr[-3000:]

    run = tmp_path / "killed"
    proc = subprocess.Popen(command(data, run, workers, processes), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=ENV)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-3000:]}"
        if (run / "checkpoint.pt").exists() and (run / "metrics.jsonl").exists() and \
                len(losses(run)) >= CHECKPOINT_EVERY + 2:
            break
        time.sleep(0.005)
    kill_tree(proc)
    assert not (run / "results.json").exists()
    killed_at = torch.load(run / "checkpoint.pt", weights_only=True)["step"]
    per_epoch = 96 // (8 * processes)
    assert killed_at % per_epoch and killed_at < STEPS  # inside an unlabeled epoch, before the end
    assert max(losses(run)) > killed_at  # steps after the checkpoint were lost and are done again

    again = subprocess.run(command(data, run, workers, processes), capture_output=True, text=True, timeout=600,
                           env=ENV)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {run} at step {killed_at} of {STEPS}" in again.stderr
    assert_same_run(run, tmp_path / "whole")


@pytest.mark.parametrize("workers", [1, 3])
def test_a_run_stopped_mid_epoch_resumes_on_the_same_batches(data, tmp_path, workers):
    cfg = TrainConfig(**options(data), workers=workers).validate()
    train_mod.train(cfg, str(tmp_path / "whole"), echo=lambda m: None)
    stopped = train_mod.train(cfg, str(tmp_path / "run"), echo=lambda m: None, stop_after=CHECKPOINT_EVERY + 2)
    assert not stopped["finished"]
    said = []
    assert train_mod.train(cfg, str(tmp_path / "run"), echo=said.append)["finished"]
    assert said == [f"resuming {tmp_path / 'run'} at step {CHECKPOINT_EVERY} of {STEPS}"]
    assert_same_run(tmp_path / "run", tmp_path / "whole")


def test_a_resume_with_other_workers_goes_on_from_the_epochs_start(data, tmp_path):
    """Each worker reads its own shards, so the positions of one number of workers mean nothing to another: the
    run goes on, and says its data order now differs from an uninterrupted run's."""
    cfg = TrainConfig(**options(data), workers=0).validate()
    train_mod.train(cfg, str(tmp_path / "run"), echo=lambda m: None, stop_after=CHECKPOINT_EVERY + 1)
    said = []
    results = train_mod.train(dataclasses.replace(cfg, workers=1), str(tmp_path / "run"), echo=said.append)
    assert results["finished"] and len(said) == 2
    assert said[0].startswith("warning: this run read its data with 0 workers in 1 processes; with 1 in 1, its "
                              "streams start again at their epoch's start")


STRACE = shutil.which("strace")


@pytest.mark.skipif(STRACE is None, reason="strace is not installed (apt-get install strace): SIGKILL is injected at "
                                           "a rename with it")
def test_a_run_killed_at_any_rename_of_its_files_is_completed_by_the_same_command(data, tmp_path):
    """SIGKILL injected at the first, a middle and the last two renames of a run (config.yaml, each checkpoint.pt,
    results.json, which marks the run finished), then the same command: the run finishes with the losses and
    weights of a run that was never killed, each step logged once, and no temp file left."""
    whole = tmp_path / "whole"
    traced = tmp_path / "renames.log"
    done = subprocess.run([STRACE, "-f", "-qq", "-e", "trace=rename", "-o", str(traced),
                           *command(data, whole, 0)], capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    renames = [line for line in traced.read_text().splitlines() if "rename(" in line and "= 0" in line]
    assert any("results.json" in line for line in renames[-1:]), renames[-3:]
    points = sorted({1, len(renames) // 2, len(renames) - 1, len(renames)})
    for n in points:
        run = tmp_path / f"killed-{n}"
        killed = subprocess.run([STRACE, "-f", "-qq", "-o", os.devnull, "-e", "trace=rename", "-e",
                                 f"inject=rename:signal=SIGKILL:when={n}", *command(data, run, 0)],
                                capture_output=True, text=True, timeout=600, env=ENV)
        assert killed.returncode != 0, f"not killed at rename {n}"
        assert not (run / "results.json").exists()
        again = subprocess.run(command(data, run, 0), capture_output=True, text=True, timeout=600, env=ENV)
        assert again.returncode == 0, (n, again.stderr[-3000:])
        assert (run / "results.json").exists()
        assert_same_run(run, whole)
        assert not [p for p in os.listdir(run) if ".tmp" in p], os.listdir(run)
