"""`ns-train` on CPU with a tiny timm model: learning (from fewer labels than a batch), targets, the mixed batch,
epochs of the unlabeled set, the EMA's warm-up, noise, resume, export -> label."""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from PIL import Image

from ns_data import contract, outputs, tfrecord
from ns_data.stage import InputError, OutputExists
from ns_train import train as train_mod
from ns_train.cli import main
from ns_train.config import ConfigError, TrainConfig, load_config
from ns_train.data import (Normalize, TrainStream, count_records, eval_transform, soft_target, train_loader,
                           train_transform)
from ns_train.train import lr_factor, plan_steps, total_loss, unlabeled_loss

CLASSES = 4
MODEL = "test_resnet"
COLOURS = [(220, 30, 30), (30, 200, 40), (40, 60, 220), (230, 220, 40)]


def picture(label: int, rng) -> bytes:
    """A class-coloured square on noise: easy to learn, different every time."""
    pixels = rng.integers(0, 80, (32, 32, 3), dtype=np.uint8)
    x, y = rng.integers(0, 12, 2)
    pixels[y: y + 20, x: x + 20] = COLOURS[label]
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def write_shards(directory, records: list[dict], count: int = 2) -> str:
    os.makedirs(directory, exist_ok=True)
    for s in range(count):
        with open(os.path.join(directory, f"train-{s:05d}-of-{count:05d}.tfrecord"), "wb") as f:
            for features in records[s::count]:
                f.write(tfrecord.frame_record(tfrecord.make_example(features)))
    return str(directory)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("train-data")
    rng = np.random.default_rng(0)
    labeled = [{"image/encoded": picture(i % CLASSES, rng), "label": i % CLASSES} for i in range(32)]
    val = [{"image/encoded": picture(i % CLASSES, rng), "label": i % CLASSES} for i in range(24)]
    pseudo = []
    for i in range(48):
        label = i % CLASSES
        pseudo.append({"image/encoded": picture(label, rng), "label": label, "prob": 0.7, "id": f"u{i}", "copy": 0,
                       "topk_classes": [label, (label + 1) % CLASSES], "topk_probs": [0.7, 0.2]})
    return {"labeled": write_shards(root / "labeled", labeled), "val": write_shards(root / "val", val),
            "unlabeled": write_shards(root / "unlabeled", pseudo), "root": root}


def config(data, **overrides) -> TrainConfig:
    base = dict(labeled=data["labeled"], val=data["val"], model=MODEL, num_classes=CLASSES, image_size=32,
                crop_pct=1.0, batch_size=8, workers=0, optimizer="adamw", lr=0.01, schedule="constant",
                ema_decay=0.0, progress=False, log_every=1, shuffle_buffer=16, hflip=0.0, crop_scale=(0.8, 1.0))
    return TrainConfig(**(base | overrides)).validate()


def metrics(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_a_few_steps_overfit_a_tiny_batch(data, tmp_path):
    rng = np.random.default_rng(1)
    tiny = write_shards(tmp_path / "tiny", [{"image/encoded": picture(i % CLASSES, rng), "label": i % CLASSES}
                                            for i in range(8)], count=1)
    cfg = config(data, labeled=tiny, val=tiny, steps=30, noise=False, label_smoothing=0.0)
    results = train_mod.train(cfg, str(tmp_path / "run"), echo=lambda m: None)
    losses = [m["loss_total"] for m in metrics(tmp_path / "run") if "loss_total" in m]
    assert len(losses) == 30
    assert np.mean(losses[-3:]) < 0.2 * np.mean(losses[:3])
    assert results["finished"] and results["eval"]["top1"] == 1.0
    assert os.path.exists(tmp_path / "run" / "config.yaml") and os.path.exists(tmp_path / "run" / "checkpoint.pt")


def state_distance(a: dict, b: dict) -> float:
    """Euclidean distance between two state dicts over their floating-point entries."""
    return math.sqrt(sum(float((a[k].double() - b[k].double()).pow(2).sum()) for k in a if a[k].is_floating_point()))


def test_a_labeled_set_smaller_than_a_batch_cycles_and_learns(data, tmp_path, monkeypatch):
    """10 labels, batches of 32: the labeled stream cycles (records repeat within a batch), epochs count the
    labeled set (48 epochs x 10 records / 32 = 15 steps), and the model learns the classes."""
    rng = np.random.default_rng(2)
    few = write_shards(tmp_path / "few", [{"image/encoded": picture(i % CLASSES, rng), "label": i % CLASSES}
                                          for i in range(10)])
    cfg = config(data, labeled=few, batch_size=32, epochs=48.0, noise=False, label_smoothing=0.0)
    plan = plan_steps(cfg)
    assert (plan.total_steps, plan.steps_per_epoch, plan.epoch_of) == (15, 10 / 32, "labeled")
    sizes = []
    real = train_mod.create_student

    def recording(c):
        model = real(c)
        model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]) if m.training else None)
        return model

    monkeypatch.setattr(train_mod, "create_student", recording)
    said = []
    results = train_mod.train(cfg, str(tmp_path / "run"), echo=said.append)
    assert said == ["training 15 steps: 48 epochs of the labeled set (10 records, 0.3125 steps each)"]
    assert sizes == [32] * 15
    losses = [m["loss_total"] for m in metrics(tmp_path / "run") if "loss_total" in m]
    assert np.mean(losses[-3:]) < 0.3 * np.mean(losses[:3])
    assert results["eval"]["top1"] >= 0.9  # 24 held-out pictures
    assert (results["epoch_of"], results["epoch_records"], results["epochs"]) == ("labeled", 10, 48.0)


def test_epochs_count_the_unlabeled_set_and_share_their_unit_with_the_schedule(data, tmp_path):
    """With unlabeled data an epoch is a pass over it: 48 records, 20 a step, so 2.4 steps; total steps are
    ceil(epochs x 2.4); --steps overrides; labeled-only runs (or a ratio of 0) count the labeled set."""
    cfg = config(data, unlabeled=data["unlabeled"], unlabeled_ratio=2.5)
    for epochs, steps in ((5.0, 12), (0.7, 2), (10.0, 24), (1.25, 3)):
        plan = plan_steps(dataclasses.replace(cfg, epochs=epochs))
        assert (plan.total_steps, plan.steps_per_epoch, plan.epoch_of) == (steps, 2.4, "unlabeled")
    assert plan_steps(dataclasses.replace(cfg, steps=7)).total_steps == 7
    assert plan_steps(cfg, world=2).steps_per_epoch == 1.2  # two processes take 40 unlabeled images a step
    assert plan_steps(dataclasses.replace(cfg, epochs=3.0, unlabeled=None)).total_steps == 12  # 3 x 32 / 8
    assert plan_steps(dataclasses.replace(cfg, epochs=3.0, unlabeled_ratio=0.0)).epoch_of == "labeled"
    # warmup and decay epochs are epochs of the same set: 1 epoch of warmup is 2.4 steps here
    warm = dataclasses.replace(cfg, warmup_epochs=1.0)
    assert [lr_factor(s, warm, 2.4, 12) for s in (0, 1, 2)] == pytest.approx([1 / 2.4, 2 / 2.4, 1.0])
    with pytest.raises(ConfigError, match="the labeled set has 2 shards, fewer than the 3 processes"):
        plan_steps(cfg, world=3)
    empty = write_shards(tmp_path / "empty", [], count=1)
    with pytest.raises(ConfigError, match="the labeled set has no records"):
        plan_steps(dataclasses.replace(cfg, labeled=empty))


def test_the_ema_of_a_short_run_follows_the_trained_weights(data, tmp_path):
    """timm's EMA warm-up: after 30 steps at ema_decay 0.9998 the EMA is near the trained weights, not the
    initial ones (measured: 0.34 of the way from them; without the warm-up 0.999, the EMA barely moves)."""
    cfg = config(data, steps=30, noise=False, ema_decay=0.9998, val=None)
    torch.manual_seed(cfg.seed)  # as train() does before it builds the student
    initial = train_mod.create_student(cfg).state_dict()
    train_mod.train(cfg, str(tmp_path / "run"), echo=lambda m: None)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    travelled = state_distance(initial, state["model"])
    assert state_distance(state["ema"], state["model"]) < 0.5 * travelled
    assert state_distance(state["ema"], initial) > 0.5 * travelled


def test_soft_and_hard_targets_as_specified():
    cfg = TrainConfig(labeled="x", num_classes=4, teacher_temperature=1.0)
    record = {"label": 2, "topk_classes": np.array([2, 0]), "topk_probs": np.array([0.6, 0.2], np.float32)}
    assert soft_target(record, cfg) == pytest.approx([0.2, 0.1, 0.6, 0.1])  # the rest, 0.2, spread over 2
    sharp = soft_target(record, dataclasses.replace(cfg, teacher_temperature=0.5))  # p^2, renormalized
    assert sharp == pytest.approx(np.array([0.04, 0.01, 0.36, 0.01]) / 0.42)
    record["probabilities"] = np.array([0.1, 0.1, 0.7, 0.1], np.float32)  # the dense vector wins when present
    assert soft_target(record, cfg) == pytest.approx([0.1, 0.1, 0.7, 0.1])

    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    logp = F.log_softmax(logits, dim=1)[0]
    soft = torch.tensor([[0.2, 0.1, 0.6, 0.1]])
    assert unlabeled_loss(logits, soft, 0.1).item() == pytest.approx(-(soft[0] * logp).sum().item(), rel=1e-6)
    # hard label 2 with smoothing 0.1 over 4 classes: target 0.925 on class 2, 0.025 elsewhere
    smoothed = torch.full((4,), 0.025)
    smoothed[2] = 0.925
    assert unlabeled_loss(logits, torch.tensor([2]), 0.1).item() == pytest.approx(-(smoothed * logp).sum().item(),
                                                                                  rel=1e-6)
    cfg = TrainConfig(labeled="x", num_classes=4, unlabeled="u", unlabeled_ratio=3.0, label_smoothing=0.0)
    parts = total_loss(cfg, logits, torch.tensor([0]), logits, soft)
    assert parts["labeled"].item() == pytest.approx(-logp[0].item(), rel=1e-6)
    assert parts["total"].item() == pytest.approx(parts["labeled"].item() + 3 * parts["unlabeled"].item(), rel=1e-6)


def test_each_step_mixes_labeled_and_unlabeled_at_the_configured_ratio(data, tmp_path, monkeypatch):
    cfg = config(data, unlabeled=data["unlabeled"], unlabeled_ratio=2.5, epochs=1.25)  # 3 steps of 2.4 an epoch
    assert cfg.unlabeled_batch_size == 20
    sizes = []
    real = train_mod.create_student

    def recording(c):
        model = real(c)
        model.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
        return model

    monkeypatch.setattr(train_mod, "create_student", recording)
    results = train_mod.train(dataclasses.replace(cfg, val=None), str(tmp_path / "run"), echo=lambda m: None)
    assert sizes == [8 + 20] * 3
    assert (results["epoch_of"], results["steps_per_epoch"], results["epochs"]) == ("unlabeled", 2.4, 1.25)
    assert [m["epoch"] for m in metrics(tmp_path / "run")] == [0.417, 0.833, 1.25]
    images, targets = next(iter(train_loader(TrainStream(data["unlabeled"], cfg, pseudo=True), 20, 0)))
    assert images.shape == (20, 3, 32, 32) and images.dtype == torch.uint8 and targets.shape == (20, CLASSES)
    assert targets.sum(1) == pytest.approx(torch.ones(20))
    hard = dataclasses.replace(cfg, hard_labels=True)
    _, labels = next(iter(train_loader(TrainStream(data["unlabeled"], hard, pseudo=True), 20, 0)))
    assert labels.dtype == torch.int64


def test_noise_only_on_the_training_student(data):
    noisy = config(data, dropout=0.5, drop_path=0.2)
    model = train_mod.create_student(noisy)
    x = torch.randn(4, 3, 32, 32)
    model.train()
    assert not torch.equal(model(x), model(x))  # dropout and stochastic depth are on while training
    model.eval()
    assert torch.equal(model(x), model(x))  # and off in eval (evaluation, pseudo labels)
    quiet = train_mod.create_student(dataclasses.replace(noisy, noise=False)).train()
    assert torch.equal(quiet(x), quiet(x))
    assert "RandAugment" in repr(train_transform(noisy))
    assert repr(train_transform(dataclasses.replace(noisy, noise=False))) == repr(eval_transform(noisy, uint8=True))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8))
    raw = train_transform(dataclasses.replace(noisy, noise=False))(image)
    assert raw.dtype == torch.uint8  # normalized on the batch, as the trainer does, equals timm's eval transform
    assert Normalize(noisy, torch.device("cpu"))(raw[None])[0] == pytest.approx(eval_transform(noisy)(image), abs=1e-5)


def test_random_erasing_only_with_noise(data):
    torch.manual_seed(0)
    image = Image.new("RGB", (32, 32), (255, 255, 255))
    cfg = config(data, random_erasing=1.0, crop_scale=(1.0, 1.0), randaugment_magnitude=0)
    erased = train_transform(cfg)(image)
    assert erased.dtype == torch.uint8
    assert (erased == torch.tensor([124, 116, 104]).view(3, 1, 1)).all(0).any()  # a rectangle of the mean colour
    assert "RandomErasing" not in repr(train_transform(dataclasses.replace(cfg, random_erasing=0.0)))
    quiet = dataclasses.replace(cfg, noise=False)
    assert repr(train_transform(quiet)) == repr(eval_transform(quiet, uint8=True))
    assert (train_transform(quiet)(image) == 255).all()
    with pytest.raises(ConfigError, match="random_erasing=1.5"):
        config(data, random_erasing=1.5)


def test_kill_and_resume_continue_the_same_schedule(data, tmp_path):
    cfg = config(data, steps=8, checkpoint_every=2, schedule="exponential", decay_epochs=0.5, decay_rate=0.5)
    whole = tmp_path / "whole"
    train_mod.train(cfg, str(whole), echo=lambda m: None)
    killed = tmp_path / "killed"
    partial = train_mod.train(cfg, str(killed), echo=lambda m: None, stop_after=5)  # killed after step 5
    assert not partial["finished"] and not (killed / "results.json").exists()
    assert torch.load(killed / "checkpoint.pt", weights_only=True)["step"] == 4  # the last checkpoint
    with pytest.raises(OutputExists, match="unfinished train run of other inputs or options; pass --overwrite"):
        train_mod.train(dataclasses.replace(cfg, lr=0.5), str(killed), echo=lambda m: None)
    said = []
    results = train_mod.train(cfg, str(killed), echo=said.append)
    assert said == [f"resuming {killed} at step 4 of 8"]
    assert results["step"] == 8 and results["finished"]
    lr = {m["step"]: m["lr"] for m in metrics(whole) if "lr" in m}
    resumed = {m["step"]: m["lr"] for m in metrics(killed) if "lr" in m}
    assert resumed == lr  # step 5 was logged twice (before the kill and after), with the same rate
    # 4 steps per epoch, so the rate halves every 2 steps; logged after each step's scheduler update
    assert [lr[s] for s in (1, 2, 3, 8)] == pytest.approx([0.01, 0.005, 0.005, 0.000625])


def test_a_run_directory_follows_the_output_policy(data, tmp_path):
    """Finished with the same config: nothing to do; another config: an error unless overwrite; the marker
    (results.json) last, with the config's fingerprint."""
    cfg = config(data, steps=2, val=None)
    run = tmp_path / "run"
    first = train_mod.train(cfg, str(run), echo=lambda m: None)
    marker = json.loads((run / "results.json").read_text())
    assert marker["fingerprint"] == train_mod.run_output(cfg, str(run)).fingerprint
    assert marker["fingerprint"] == train_mod.run_output(dataclasses.replace(cfg, skip_bad_records=True),
                                                         str(run)).fingerprint  # a resume may skip bad records
    assert sorted(os.listdir(run)) == sorted(contract.TRAIN_RUN.files)  # the names the report reads
    said = []
    again = train_mod.train(dataclasses.replace(cfg, log_every=5, workers=1), str(run), echo=said.append)
    assert said == [outputs.already_complete(str(run))] and again["step"] == first["step"] == 2
    assert len(metrics(run)) == 2  # nothing was trained again
    with pytest.raises(OutputExists, match="complete train output of other inputs or options; pass --overwrite"):
        train_mod.train(dataclasses.replace(cfg, steps=3), str(run), echo=lambda m: None)
    replaced = train_mod.train(dataclasses.replace(cfg, steps=3), str(run), echo=lambda m: None, overwrite=True)
    assert replaced["step"] == 3 and [m["step"] for m in metrics(run)] == [1, 2, 3]  # old metrics are gone
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.jsonl").write_text("")  # train files without a plan or marker: not ours to mix
    with pytest.raises(OutputExists, match="pass --overwrite"):
        train_mod.train(cfg, str(tmp_path / "other"), echo=lambda m: None)


@pytest.mark.parametrize("optimizer,schedule", [("rmsprop", "exponential"), ("sgd", "cosine"), ("adamw", "constant")])
def test_checkpoints_load_as_weights_only(data, tmp_path, optimizer, schedule):
    """Checkpoints hold tensors, numbers, strings and containers only: loadable with weights_only=True, and a
    resume restores the optimizer, schedule and EMA state from them."""
    cfg = config(data, steps=2, checkpoint_every=1, optimizer=optimizer, schedule=schedule, ema_decay=0.9,
                 val=None)
    train_mod.train(cfg, str(tmp_path / "run"), echo=lambda m: None, stop_after=1)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert state["step"] == 1 and state["ema"] and state["optimizer"]["state"]
    assert state["processes"][0]["rng"].dtype == torch.uint8 and state["processes"][0]["data"]["labeled"]
    said = []
    assert train_mod.train(cfg, str(tmp_path / "run"), echo=said.append)["finished"]
    assert said == [f"resuming {tmp_path / 'run'} at step 1 of 2"]


def test_records_are_counted_from_the_manifest_and_incomplete_shards_refused(data, tmp_path):
    assert count_records(data["labeled"]) == 32  # labeled TFRecords of a user: walked
    shards = tmp_path / "shards"
    write_shards(shards, [{"image/encoded": b"x", "label": 0}] * 3)
    (shards / ".tmp-shard").mkdir()
    (shards / ".tmp-shard" / "plan.json").write_text("{}")  # `ns-data shard` was killed here
    with pytest.raises(InputError, match="unfinished shard run"):
        count_records(str(shards))
    (shards / "manifest.json").write_text(json.dumps({"stage": "shard", "records": 5}))
    assert count_records(str(shards)) == 5  # complete: the manifest says


def test_exported_student_labels_like_the_trainers_own_eval(data, tmp_path):
    from ns_data.label import LabelOptions, run_label
    from ns_train.export import load_run_model

    run_dir = tmp_path / "run"
    runner = CliRunner()
    result = runner.invoke(main, ["train", "--output", str(run_dir), "--labeled", data["labeled"], "--model", MODEL,
                                  "--num-classes", str(CLASSES), "--image-size", "32", "--crop-pct", "1.0",
                                  "--steps", "5", "--batch-size", "8", "--workers", "0", "--no-progress",
                                  "--ema-decay", "0.9"])
    assert result.exit_code == 0, result.output
    evaluated = runner.invoke(main, ["eval", str(run_dir), "--shards", data["val"], "--weights", "model"])
    assert evaluated.exit_code == 0, evaluated.output
    raw_model, run_cfg = load_run_model(str(run_dir), "model")
    own = train_mod.evaluate(raw_model, data["val"], run_cfg, torch.device("cpu"))
    assert json.loads(evaluated.output.strip().splitlines()[-1]) == pytest.approx(own)
    teacher = str(tmp_path / "student.safetensors")
    result = runner.invoke(main, ["export", str(run_dir), "--output", teacher])
    assert result.exit_code == 0 and "ns-data label" in result.output, result.output
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(5)
    for i in range(12):
        (images / f"{i:02d}.png").write_bytes(picture(i % CLASSES, rng))
    run_label(LabelOptions(inputs=(str(images),), output=str(tmp_path / "labels"), teacher=teacher, topk=CLASSES), [])
    import pyarrow.parquet as pq

    labels = pq.read_table(str(tmp_path / "labels" / "labels-00000.parquet")).to_pylist()
    model, cfg = load_run_model(str(run_dir), "ema")
    transform = eval_transform(cfg)
    for row in labels:
        with Image.open(images / row["id"]) as img:
            x = transform(img.convert("RGB"))[None]
        with torch.no_grad():
            probs = torch.softmax(model(x), dim=1)[0].numpy()
        assert row["label"] == int(probs.argmax())
        assert np.array(row["topk_probs"]) == pytest.approx(probs[row["topk_classes"]], abs=1e-4)


def test_config_file_and_overrides(data, tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text(f"labeled: {data['labeled']}\nmodel: {MODEL}\nlr: 0.5\nmean: [0.5, 0.5, 0.5]\n")
    cfg = load_config(str(path), {"lr": 0.1, "batch_size": None})
    assert cfg.lr == 0.1 and cfg.model == MODEL and cfg.mean == (0.5, 0.5, 0.5) and cfg.batch_size == 64
    path.write_text("labeled: x\nlearning_rate: 1\n")
    with pytest.raises(ConfigError, match="unknown keys"):
        load_config(str(path), {})
    with pytest.raises(ConfigError, match="out of range"):
        load_config(None, {"labeled": "x", "dropout": 1.5})
    assert lr_factor(0, TrainConfig(labeled="x", warmup_epochs=1), 10, 100) == pytest.approx(0.1)


def test_two_processes_under_torchrun_share_the_shards(data, tmp_path):
    """DDP on CPU (gloo): each rank reads its own shards; rank 0 alone writes the run directory."""
    import subprocess
    import sys

    out = tmp_path / "ddp"
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "ns_train.cli",
         "train", "--output", str(out), "--labeled", data["labeled"], "--unlabeled", data["unlabeled"], "--model",
         MODEL, "--num-classes", str(CLASSES), "--image-size", "32", "--steps", "4", "--batch-size", "4",
         "--unlabeled-ratio", "2", "--workers", "0", "--no-progress", "--log-every", "2"],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("ns-train: step 4 of 4") == 1
    logged = metrics(out)
    assert [m["step"] for m in logged] == [2, 4]
    assert logged[0]["epoch"] == pytest.approx(2 / 3, abs=1e-3)  # 48 unlabeled records, 2 ranks x 8 a step
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 4 and len(state["processes"]) == 2  # each rank's generator and streams' positions


def test_a_student_smaller_than_its_teacher_is_warned_about(data, tmp_path):
    small = config(data, model="test_resnet", teacher_model="resnet18")
    assert "smaller than its teacher resnet18" in train_mod.check_student_size(small)
    assert train_mod.check_student_size(dataclasses.replace(small, model="resnet18")) is None
    # the teacher `label` recorded travels in the shards' manifest
    manifest = {"stage": "shard", "teacher": {"model": "resnet18"}}
    shards = write_shards(tmp_path / "pseudo", [], count=1)
    (tmp_path / "pseudo" / "manifest.json").write_text(json.dumps(manifest))
    assert "smaller" in train_mod.check_student_size(dataclasses.replace(small, teacher_model=None, unlabeled=shards))
