"""The Noisy Student training loop: a noised timm student on labeled + pseudo-labeled batches.

Each step takes a labeled batch and an unlabeled batch `unlabeled_ratio` times larger; the loss is the labeled
cross entropy (label smoothing) plus `unlabeled_ratio` times the unlabeled one, against the teacher's soft
targets (or hard labels). The same code runs on CPU, one CUDA GPU, several under torchrun (DDP), and on TPU
through torch_xla when it is installed and `device: xla` is asked for. Outputs, in the run directory:
`config.yaml` (resolved), `checkpoint.pt` (written atomically; a re-run resumes from it, down to the next
batch of each data stream), `metrics.jsonl` (a resume cuts it back to the checkpoint's step: each step is logged
once), and `results.json` (final evaluation), written last: it marks the run finished (the names are
contract.TRAIN_RUN's). A run directory follows the output policy of every ns-data stage (ns_data.outputs): a
re-run with the same config resumes an interrupted run or has nothing to do; another config needs --overwrite.

`train` is a few setup steps (start_process, check_inputs, open_run, create_training, resume, create_loaders),
then the step loop (`train_steps`, which logs, evaluates with `evaluate` and checkpoints as it goes) and
`finish` (the final evaluation and results.json).
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ns_data import fs, outputs
from ns_data.contract import TRAIN_RUN
from ns_data.outputs import COMPLETE, StageOutput
from ns_data.readers import list_shards, shard_manifest
from ns_data.stage import StageError
from ns_train.config import ConfigError, TrainConfig
from ns_train.data import (EvalSet, Normalize, TrainStream, count_records, eval_preprocessing, loader,
                           train_loader)

log = logging.getLogger("ns_train")


# ------------------------------------------------------------------------------------------- losses


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of -sum_c target_c log softmax(logits)_c."""
    return -(target * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def unlabeled_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Soft targets (a float matrix) or hard ones (class indices, with label smoothing)."""
    if target.dtype.is_floating_point:
        return soft_cross_entropy(logits, target)
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def total_loss(cfg: TrainConfig, labeled_logits, labels, unlabeled_logits=None, targets=None) -> dict[str, torch.Tensor]:
    labeled = F.cross_entropy(labeled_logits.float(), labels, label_smoothing=cfg.label_smoothing)
    out = {"labeled": labeled, "total": labeled}
    if unlabeled_logits is not None:
        out["unlabeled"] = unlabeled_loss(unlabeled_logits, targets, cfg.label_smoothing)
        out["total"] = labeled + cfg.unlabeled_ratio * out["unlabeled"]
    return out


# ------------------------------------------------------------------------------------------- schedule


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: float, total_steps: int) -> float:
    """Linear warmup, then the paper's staircase exponential decay, a cosine, or nothing."""
    warmup = cfg.warmup_epochs * steps_per_epoch
    if step < warmup:
        return min(1.0, (step + 1) / warmup)  # a warmup of 2.4 steps: 1/2.4, 2/2.4, then 1
    if cfg.schedule == "exponential":
        return cfg.decay_rate ** math.floor((step - warmup) / max(1.0, cfg.decay_epochs * steps_per_epoch))
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1.0, total_steps - warmup)))
    return 1.0


def make_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    params = model.parameters()
    if cfg.optimizer == "rmsprop":  # TF-style RMSProp with the paper's decay 0.9, momentum 0.9, eps 1e-3
        from timm.optim import RMSpropTF

        return RMSpropTF(params, lr=cfg.lr, alpha=0.9, eps=1e-3, momentum=cfg.momentum,
                         weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=True,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


# ------------------------------------------------------------------------------------------- model


def create_student(cfg: TrainConfig) -> torch.nn.Module:
    """The timm model with model noise (dropout before the classifier, stochastic depth) when noise is on."""
    import timm

    if not timm.is_model(cfg.model):
        raise ConfigError(f"unknown timm model {cfg.model!r}")
    model = timm.create_model(cfg.model, pretrained=False, num_classes=cfg.num_classes,
                              drop_rate=cfg.dropout if cfg.noise else 0.0,
                              drop_path_rate=cfg.drop_path if cfg.noise else 0.0)
    if cfg.init_checkpoint:
        from ns_data.teacher import load_state_dict

        model.load_state_dict(load_state_dict(cfg.init_checkpoint))
    return model


def parameter_count(name: str, num_classes: int) -> int:
    import timm

    with torch.device("meta"):
        return sum(p.numel() for p in timm.create_model(name, pretrained=False, num_classes=num_classes).parameters())


def teacher_of(cfg: TrainConfig) -> str | None:
    """The teacher's model name: from the config, else as recorded in the pseudo-labeled shards' manifest."""
    if cfg.teacher_model or not cfg.unlabeled:
        return cfg.teacher_model
    return ((shard_manifest(cfg.unlabeled) or {}).get("teacher") or {}).get("model")


def check_student_size(cfg: TrainConfig) -> str | None:
    """A warning when the student is smaller than its teacher (Noisy Student wants equal or larger)."""
    teacher = teacher_of(cfg)
    if not teacher:
        return None
    import timm

    if not timm.is_model(teacher):
        return None
    t, s = parameter_count(teacher, cfg.num_classes), parameter_count(cfg.model, cfg.num_classes)
    if s < t:
        return (f"the student {cfg.model} ({s / 1e6:.2f}M parameters) is smaller than its teacher {teacher} "
                f"({t / 1e6:.2f}M); Noisy Student uses an equal or larger student")
    return None


def pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device == "xla":
        import torch_xla.core.xla_model as xm  # only where torch_xla is installed

        return xm.xla_device()
    if cfg.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(cfg.device)


def _distributed() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


# ------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(model: torch.nn.Module, shards: str, cfg: TrainConfig, device: torch.device,
             batch_size: int = 256) -> dict[str, float]:
    """Top-1, top-5 and mean loss over every record of labeled shards (noise off: eval mode)."""
    was_training = model.training
    model.eval()
    n = correct1 = correct5 = 0
    loss = 0.0
    for images, labels in loader(EvalSet(shards, cfg), batch_size, 0):
        images = images.to(device, memory_format=torch.channels_last if cfg.channels_last else torch.contiguous_format)
        labels = labels.to(device)
        logits = model(images).float()
        loss += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        correct1 += (top[:, 0] == labels).sum().item()
        correct5 += (top == labels[:, None]).any(dim=1).sum().item()
        n += len(labels)
    model.train(was_training)
    return {"top1": correct1 / max(n, 1), "top5": correct5 / max(n, 1), "loss": loss / max(n, 1), "images": n}


# ------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str, state: dict[str, Any], tmp: str) -> None:
    """torch.save under a temporary name, then an atomic rename: a kill never leaves half a checkpoint. A write
    that fails leaves no temporary file; on a disk without room for it (torch says only `unexpected pos`), the
    error is an OSError(ENOSPC) naming the file, with the bytes it needs (`needed`)."""
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        needed = sum(t.numel() * t.element_size() for t in _tensors(state))
        if isinstance(err, OSError) and err.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        if not isinstance(err, OSError) and shutil.disk_usage(os.path.dirname(tmp) or ".").free >= needed:
            raise
        full = OSError(errno.ENOSPC, "No space left on device", tmp)
        full.needed = needed
        raise full from err


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def load_checkpoint(path: str) -> dict[str, Any]:
    """A checkpoint of ours: tensors, numbers, strings and containers only, so no pickled code is run."""
    return torch.load(path, map_location="cpu", weights_only=True)


# ------------------------------------------------------------------------------------------- training


def truncate_metrics(path: str, step: int) -> None:
    """Keeps the records of steps up to `step` (a resumed run's checkpoint): the steps done after it, which the
    resumed run does again, and a line cut short by a kill are dropped, so the log holds each step once."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, "rb") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:  # the last line, cut short
                continue
            if line.endswith(b"\n") and record["step"] <= step:
                kept.append(line)
    fs.write_atomic(path, b"".join(kept))


class _Metrics:
    def __init__(self, path: str | None):
        self.file = open(path, "a") if path else None

    def write(self, record: dict) -> None:
        if self.file:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file:
            self.file.close()


@dataclass(frozen=True)
class Plan:
    """A run's length: `total_steps`, in epochs of the `epoch_of` set (`records[epoch_of]` records), each
    `steps_per_epoch` steps: records / images per step, not rounded, as the streams run on across epochs."""
    total_steps: int
    steps_per_epoch: float
    epoch_of: str  # "unlabeled" or "labeled"
    records: dict[str, int]  # per stream

    def describe(self, cfg: TrainConfig) -> str:
        epochs = cfg.epochs if cfg.steps is None else self.total_steps / self.steps_per_epoch
        return (f"{self.total_steps:,} steps: {epochs:g} epochs of the {self.epoch_of} set "
                f"({self.records[self.epoch_of]:,} records, {self.steps_per_epoch:g} steps each)")


def plan_steps(cfg: TrainConfig, world: int = 1) -> Plan:
    """Epochs count the unlabeled set when a step takes unlabeled images (the labeled set cycles, however small),
    else the labeled set; `steps` overrides them. Each set needs a record, and a shard per process."""
    records = {}
    for name, shards, batch in (("labeled", cfg.labeled, cfg.batch_size),
                                ("unlabeled", cfg.unlabeled, cfg.unlabeled_batch_size)):
        if not shards or not batch:
            continue
        count = len(list_shards(shards))
        if count < world:
            raise ConfigError(f"the {name} set has {count} shards, fewer than the {world} processes that each "
                              "read whole shards")
        records[name] = count_records(shards)
        if not records[name]:
            raise ConfigError(f"the {name} set has no records")
    epoch_of = "unlabeled" if "unlabeled" in records else "labeled"
    batch = cfg.unlabeled_batch_size if epoch_of == "unlabeled" else cfg.batch_size
    per_epoch = records[epoch_of] / (batch * world)
    total = cfg.steps or max(1, math.ceil(round(cfg.epochs * per_epoch, 6)))  # round: 0.7 x 30 is 21.000000000000004
    return Plan(total, per_epoch, epoch_of, records)


# ------------------------------------------------------------------------------------------- setup


@dataclass(frozen=True)
class Process:
    """This process's place in the run: its rank among `world` processes (0 writes the run directory) and its
    device."""
    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def start_process(cfg: TrainConfig) -> Process:
    """Joins the process group (under torchrun), seeds this process's generators, picks its device."""
    rank, world = _distributed()
    torch.manual_seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)  # augmentation seeds its own generators, record by record (ns_train.data)
    return Process(rank, world, pick_device(cfg))


def check_inputs(cfg: TrainConfig, world: int) -> Plan:
    """The run's plan, with every input set listed: a missing or empty one is an error before any output."""
    plan = plan_steps(cfg, world)
    for shards in (cfg.unlabeled, cfg.val):
        if shards:
            list_shards(shards)
    return plan


def run_output(cfg: TrainConfig, output: str) -> StageOutput:
    """The run directory as a stage output: results.json its marker, the comparable config its fingerprint."""
    return StageOutput(output, TRAIN_RUN.stage, TRAIN_RUN.marker, (TRAIN_RUN.checkpoint, TRAIN_RUN.config,
                       TRAIN_RUN.metrics), fs.fingerprint([], _comparable(cfg)))


def open_run(run: StageOutput, overwrite: bool, process: Process) -> tuple[str, dict]:
    """Rank 0 applies the output policy to the run directory (it alone writes there) and tells every rank the
    outcome, (NEW, RESUME or COMPLETE, a complete run's results), or the error, which all of them raise."""
    outcome: list = [None]
    if process.main:
        try:
            status = run.begin(overwrite)
            outcome = [(status, run.read_marker() if status == COMPLETE else {})]
        except (StageError, OSError) as err:
            outcome = [err]
    if process.world > 1:
        device = process.device
        torch.distributed.broadcast_object_list(outcome, src=0, device=device if device.type == "cuda" else None)
    if isinstance(outcome[0], Exception):
        raise outcome[0]
    return outcome[0]


@dataclass
class Training:
    """What the steps update: the student, its optimizer, the learning-rate schedule and the EMA of its weights
    (None without one); `net` is the student as the steps call it (wrapped in DDP across several processes)."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    ema: Any
    net: torch.nn.Module

    def distribute(self, process: Process) -> None:
        if process.world > 1 and process.device.type != "xla":
            device = process.device
            self.net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None)


def create_training(cfg: TrainConfig, model: torch.nn.Module, plan: Plan) -> Training:
    """The student in its memory format, the optimizer, the schedule over the plan's steps, the EMA."""
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = make_optimizer(cfg, model)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg, plan.steps_per_epoch, plan.total_steps))
    ema = None
    if cfg.ema_decay > 0:
        from timm.utils import ModelEmaV3

        ema = ModelEmaV3(model, decay=cfg.ema_decay, use_warmup=True)
    return Training(model, optimizer, schedule, ema, model)


def resume(path: str, training: Training, cfg: TrainConfig, process: Process, echo) -> tuple[int, dict | None]:
    """Loads the run's checkpoint into `training` and this process's generator: (its step, this process's data
    streams' positions, None when the run read its data with other workers or processes, which then start
    again at their epoch's start)."""
    state = load_checkpoint(path)
    training.model.load_state_dict(state["model"])
    training.optimizer.load_state_dict(state["optimizer"])
    training.schedule.load_state_dict(state["schedule"])
    if training.ema is not None:
        training.ema.module.load_state_dict(state["ema"])
    processes = state["processes"]  # each rank's generator (dropout) and data streams' positions
    if process.rank < len(processes):
        torch.set_rng_state(processes[process.rank]["rng"])
    if (state["workers"], len(processes)) == (cfg.workers, process.world):
        return state["step"], processes[process.rank]["data"]
    if process.main:
        echo(f"warning: this run read its data with {state['workers']} workers in {len(processes)} processes; "
             f"with {cfg.workers} in {process.world}, its streams start again at their epoch's start")
    return state["step"], None


def create_loaders(cfg: TrainConfig, plan: Plan, step: int, world: int, data: dict | None) -> dict:
    """The training streams' batches, each from its position in `data`, or (None) from the start of the epoch
    that `step` is in."""
    loaders = {}
    for name, batch in (("labeled", cfg.batch_size), ("unlabeled", cfg.unlabeled_batch_size)):
        if name in plan.records:
            stream = TrainStream(getattr(cfg, name), cfg, pseudo=name == "unlabeled",
                                 start_epoch=step * batch * world // plan.records[name])
            loaders[name] = train_loader(stream, batch, cfg.workers, data[name] if data else None)
    return loaders


def save_run_checkpoint(run: StageOutput, cfg: TrainConfig, plan: Plan, process: Process, training: Training,
                        loaders: dict, step: int) -> None:
    """checkpoint.pt at `step`: the weights, EMA, optimizer and schedule, and every rank's generator and data
    streams' positions (gathered into rank 0's checkpoint), so that a resume continues with the next batch."""
    mine = {"rng": torch.get_rng_state(), "data": {name: b.state_dict() for name, b in loaders.items()}}
    processes = [mine]
    if process.world > 1:
        processes = [None] * process.world
        with torch.cuda.device(process.device) if process.device.type == "cuda" else contextlib.nullcontext():
            torch.distributed.all_gather_object(processes, mine)
    if process.main:
        ema = training.ema
        save_checkpoint(run.final(TRAIN_RUN.checkpoint), {
            "model": training.model.state_dict(), "ema": ema.module.state_dict() if ema is not None else None,
            "optimizer": training.optimizer.state_dict(), "schedule": training.schedule.state_dict(), "step": step,
            "total_steps": plan.total_steps, "model_name": cfg.model, "num_classes": cfg.num_classes,
            "preprocessing": eval_preprocessing(cfg), "workers": cfg.workers, "processes": processes},
            run.tmp(TRAIN_RUN.checkpoint))


# ------------------------------------------------------------------------------------------- training


def train(cfg: TrainConfig, output: str, echo=print, stop_after: int | None = None,
          overwrite: bool = False) -> dict[str, Any]:
    """Trains (or resumes) into `output`; returns the final results. A finished run of the same config is left
    as it is (its results are returned); `overwrite` replaces a run of another config. `stop_after` ends the run
    early after that many steps of this call, as a kill would (used by tests)."""
    process = start_process(cfg)
    plan = check_inputs(cfg, process.world)  # every input and the model checked before the output
    model = create_student(cfg).to(process.device)
    run = run_output(cfg, output)
    status, complete_results = open_run(run, overwrite, process)
    if status == COMPLETE:
        if process.main:
            echo(outputs.already_complete(output))
        return complete_results
    warning = check_student_size(cfg)
    if warning and process.main:
        echo(f"warning: {warning}")

    training = create_training(cfg, model, plan)
    step, data = 0, None
    checkpoint = run.final(TRAIN_RUN.checkpoint)
    if os.path.exists(checkpoint):  # only when resuming: a new run starts from an empty directory
        step, data = resume(checkpoint, training, cfg, process, echo)
        if process.main:
            truncate_metrics(run.final(TRAIN_RUN.metrics), step)
            echo(f"resuming {output} at step {step} of {plan.total_steps}")
    elif process.main:
        echo(f"training {plan.describe(cfg)}")
    if process.main:
        fs.write_atomic(run.final(TRAIN_RUN.config), cfg.to_yaml().encode())
    training.distribute(process)
    loaders = create_loaders(cfg, plan, step, process.world, data)
    metrics = _Metrics(run.final(TRAIN_RUN.metrics) if process.main else None)
    step = train_steps(cfg, plan, process, training, loaders, step, metrics, stop_after,
                       checkpoint=lambda at: save_run_checkpoint(run, cfg, plan, process, training, loaders, at))
    results = finish(cfg, plan, process, training, run, step, metrics)
    metrics.close()
    return results


def train_steps(cfg: TrainConfig, plan: Plan, process: Process, training: Training, loaders: dict, step: int,
                metrics: _Metrics, stop_after: int | None, checkpoint: Callable[[int], None]) -> int:
    """The steps from `step` to the plan's last (or `stop_after` of them): each a labeled batch and an unlabeled
    one through the student, the loss, the optimizer, the schedule and the EMA; a metrics line every
    `log_every` steps, an evaluation every `eval_every`, a checkpoint every `checkpoint_every` and at the last
    step. Returns the step reached."""
    device, total_steps = process.device, plan.total_steps
    labeled = iter(loaders["labeled"])
    unlabeled = iter(loaders["unlabeled"]) if "unlabeled" in loaders else None
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if cfg.amp and device.type == "cuda"
                else contextlib.nullcontext())
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    normalize = Normalize(cfg, device)
    bar = None
    if cfg.progress and process.main:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)
    training.model.train()
    started, window_images, window_start = step, 0, time.perf_counter()
    finite = FiniteLoss(device, process.world)
    while step < total_steps:
        images, labels = next(labeled)
        batch = [normalize(images)]
        if unlabeled is not None:
            u_images, targets = next(unlabeled)
            batch.append(normalize(u_images))
        with autocast:
            logits = training.net(torch.cat(batch).contiguous(memory_format=fmt))
        losses = total_loss(cfg, logits[: len(labels)], labels.to(device),
                            logits[len(labels):] if unlabeled is not None else None,
                            targets.to(device) if unlabeled is not None else None)
        finite.watch(losses["total"], step + 1)
        training.optimizer.zero_grad(set_to_none=True)
        losses["total"].backward()
        if device.type == "xla":
            import torch_xla.core.xla_model as xm

            xm.optimizer_step(training.optimizer)
        else:
            training.optimizer.step()
        training.schedule.step()
        step += 1
        if training.ema is not None:
            training.ema.update(training.model, step=step)
        window_images += sum(len(b) for b in batch)
        if bar is not None:
            bar.update(1)
        evaluate_now = bool(cfg.val and cfg.eval_every and step % cfg.eval_every == 0)
        stopping = stop_after is not None and step - started >= stop_after
        if step % cfg.log_every == 0 or step % cfg.checkpoint_every == 0 or step == total_steps or evaluate_now \
                or stopping:
            finite.check(metrics)  # before anything of this step is logged or saved
        if step % cfg.log_every == 0 or step == total_steps:
            now = time.perf_counter()
            record = {"step": step, "epoch": round(step / plan.steps_per_epoch, 3),
                      "lr": training.optimizer.param_groups[0]["lr"],
                      "images_per_s": round(window_images * process.world / (now - window_start), 1)}
            record |= {f"loss_{k}": round(v.item(), 5) for k, v in losses.items()}
            metrics.write(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['loss_total']:.3f}", lr=f"{record['lr']:.2e}")
            window_images, window_start = 0, now
        if evaluate_now and process.main:
            metrics.write({"step": step, "eval": evaluate(training.model, cfg.val, cfg, device)})
        if step % cfg.checkpoint_every == 0 or step == total_steps:
            checkpoint(step)
        if stopping:
            break
    if bar is not None:
        bar.close()
    return step


def finish(cfg: TrainConfig, plan: Plan, process: Process, training: Training, run: StageOutput, step: int,
           metrics: _Metrics) -> dict[str, Any]:
    """The run's results at `step`; at the last step, rank 0 evaluates the student (and its EMA) on the val
    shards and publishes results.json, which marks the run finished (the last step wrote the last checkpoint)."""
    results: dict[str, Any] = {"step": step, "total_steps": plan.total_steps, "finished": step >= plan.total_steps,
                               "epoch_of": plan.epoch_of, "epoch_records": plan.records[plan.epoch_of],
                               "steps_per_epoch": plan.steps_per_epoch,
                               "epochs": round(step / plan.steps_per_epoch, 3)}
    if step >= plan.total_steps and process.main:
        if cfg.val:
            results["eval"] = evaluate(training.model, cfg.val, cfg, process.device)
            if training.ema is not None:
                results["eval_ema"] = evaluate(training.ema.module, cfg.val, cfg, process.device)
            metrics.write({"step": step} | {k: v for k, v in results.items() if k.startswith("eval")})
        run.publish([], results)
    return results


class FiniteLoss:
    """The first step whose loss is NaN or infinite, kept on the device (no wait for the GPU each step) and read
    before the step's results are logged or saved: training stops there with a StageError naming the step, and
    the run is not finished (its last checkpoint, if any, is of a step before)."""

    NONE = 2**62

    def __init__(self, device: torch.device, world: int):
        self.first = torch.full((), self.NONE, dtype=torch.int64, device=device)
        self.world = world

    def watch(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first = torch.where(bad & (self.first == self.NONE), torch.full_like(self.first, step), self.first)

    def check(self, metrics) -> None:
        first = self.first.clone()
        if self.world > 1:  # every process stops at the same step
            torch.distributed.all_reduce(first, op=torch.distributed.ReduceOp.MIN)
        if int(first) != self.NONE:
            metrics.close()
            raise StageError(f"the loss is not finite (NaN or infinite) at step {int(first)}: training stopped, "
                             "the run is not finished and nothing of that step or after was saved; check the "
                             "inputs' probabilities and the learning rate")


def _comparable(cfg: TrainConfig) -> dict:
    """The config a run's fingerprint is made of. A run and its resume may differ in the fields left out: the
    bookkeeping (progress, logging, evaluation and checkpoint intervals, workers, the val shards), and
    skip_bad_records, so that a run stopped by a bad record resumes with --skip-bad-records."""
    skip = {"progress", "log_every", "eval_every", "checkpoint_every", "workers", "val", "skip_bad_records"}
    return {k: v for k, v in asdict(cfg).items() if k not in skip}
