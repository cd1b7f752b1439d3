"""The trainer's options: one typed dataclass, read from YAML, overridden from the command line, validated once.

Every field is a `ns-train train` option of the same name (`teacher_temperature` is `--teacher-temperature`);
a YAML file (`--config`) sets any of them, and options given on the command line win. The resolved config is
saved beside the outputs as `config.yaml`.

Training length is counted in epochs of the unlabeled set when there is one (the paper trains the student for
epochs of its unlabeled data, the labeled set cycling as often as it takes), of the labeled set otherwise;
`warmup_epochs` and `decay_epochs` share that unit, and `steps` overrides `epochs`. An epoch is records /
(batch x processes) steps, not rounded: the streams run on across epochs, so no record is dropped.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from ns_data.contract import TRAIN_RUN
from ns_data.stage import StageError


class ConfigError(StageError):
    """A config value out of its range, or an unknown key: reported before training starts, as one line."""


def option(default, help: str):
    """A config field with its help line (shown by `ns-train train --help`)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    # data
    labeled: str = option("", "Labeled shards (directory, glob or files): TFRecords of tf.Example with "
                              "image/encoded and label (or image/class/label).")
    unlabeled: str | None = option(None, "Pseudo-labeled shards written by `ns-data shard`; without them the run "
                                         "trains on labeled data only (the first teacher).")
    val: str | None = option(None, "Labeled shards to evaluate on (top-1/top-5 every --eval-every steps and at "
                                   "the end).")
    label_offset: int = option(0, "Added to every labeled label: -1 for ImageNet's 1-based image/class/label.")
    num_classes: int = option(1000, "Classes of the model's head.")
    skip_bad_records: bool = option(False, "Skip (and report on stderr, one line each) records whose image does "
                                           "not decode or that do not parse, and the rest of a damaged shard, "
                                           "instead of stopping at the first with a one-line error.")
    # preprocessing
    image_size: int = option(224, "Training and evaluation image size, in pixels.")
    crop_pct: float = option(0.875, "Evaluation: resize to image-size / crop-pct, then centre crop.")
    interpolation: str = option("bicubic", "Resize interpolation: bicubic, bilinear or nearest.")
    mean: tuple[float, float, float] = option((0.485, 0.456, 0.406), "Per-channel mean subtracted (R G B).")
    std: tuple[float, float, float] = option((0.229, 0.224, 0.225), "Per-channel standard deviation divided by.")
    hflip: float = option(0.5, "Training flip probability (0 for digits and text).")
    crop_scale: tuple[float, float] = option((0.08, 1.0), "Training random-resized-crop scale range (min max).")
    shuffle_buffer: int = option(2048, "Records shuffled within a worker, on top of the shards' global shuffle.")
    workers: int = option(2, "DataLoader worker processes per stream (0: load in the training process).")
    # model
    model: str = option("resnet50", "The student: any timm model name.")
    init_checkpoint: str | None = option(None, "Start from these weights (safetensors or a state dict).")
    teacher_model: str | None = option(None, "The teacher's timm name, for the student-size check; none: the "
                                             "teacher recorded in the shards' manifest.")
    # Noisy Student
    batch_size: int = option(64, "Labeled images per step (per process).")
    unlabeled_ratio: float = option(3.0, "Unlabeled batch = ratio x batch-size; loss = labeled + ratio x "
                                         "unlabeled.")
    teacher_temperature: float = option(1.0, "Soft targets p^(1/T), renormalized: T < 1 sharpens, T > 1 "
                                             "flattens.")
    hard_labels: bool = option(False, "Train on the teacher's one-hot labels (with --label-smoothing) instead of "
                                      "its soft ones.")
    label_smoothing: float = option(0.1, "Label smoothing of the labeled (and hard pseudo-labeled) targets.")
    # noise
    noise: bool = option(True, "RandAugment, dropout and stochastic depth on the student; --no-noise turns them "
                               "all off (the ablation).")
    randaugment_ops: int = option(2, "RandAugment operations per image.")
    randaugment_magnitude: int = option(9, "RandAugment magnitude on timm's 0-10 scale (the paper's 27 of 30 is "
                                           "9 here).")
    dropout: float = option(0.5, "Dropout before the classifier.")
    drop_path: float = option(0.2, "Stochastic depth rate (timm's drop_path_rate).")
    random_erasing: float = option(0.0, "Probability of erasing a random rectangle of a training image (cutout).")
    # optimizer
    optimizer: str = option("rmsprop", "rmsprop (TF-style, the paper's), sgd (Nesterov) or adamw.")
    lr: float = option(0.016, "Peak learning rate.")
    momentum: float = option(0.9, "Momentum of rmsprop and sgd.")
    weight_decay: float = option(1e-5, "Weight decay.")
    # 0 disables the exponential moving average of weights. timm's warm-up applies: the decay at step s is
    # min(ema_decay, 1 - s^(-2/3)) (0.9 at step 30, 0.97 at 200, 0.99 at 1,000), so a short run's EMA averages
    # its last steps, not its initial weights
    ema_decay: float = option(0.9998, "Exponential moving average of the weights (0: off); warms up as "
                                      "min(decay, 1 - step^(-2/3)).")
    # schedule
    schedule: str = option("exponential", "exponential (the paper's: x decay-rate every decay-epochs), cosine or "
                                          "constant.")
    warmup_epochs: float = option(0.0, "Linear warmup, in epochs (as --epochs).")
    decay_epochs: float = option(2.4, "The exponential schedule decays every this many epochs (as --epochs).")
    decay_rate: float = option(0.97, "The exponential schedule's factor at each decay.")
    epochs: float = option(10.0, "Epochs of the unlabeled set when there is one (the labeled set cycles), else of "
                                 "the labeled set.")
    steps: int | None = option(None, "Train this many steps; overrides --epochs.")
    # device
    amp: bool = option(True, "Mixed precision (bf16 autocast) on CUDA; ignored on CPU.")
    channels_last: bool = option(True, "Channels-last memory layout.")
    device: str = option("auto", "auto (CUDA when present, else CPU), cpu, cuda, cuda:N or xla (torch_xla).")
    seed: int = option(0, "Seed of initialization, data order and augmentation.")
    # output
    log_every: int = option(20, f"Write a {TRAIN_RUN.metrics} line every this many steps.")
    eval_every: int = option(0, "Evaluate on --val every this many steps (0: only at the end).")
    checkpoint_every: int = option(200, f"Write {TRAIN_RUN.checkpoint} every this many steps (the run resumes "
                                        "from it).")
    progress: bool = option(True, "A progress bar on the terminal.")

    def validate(self) -> "TrainConfig":
        if not self.labeled:
            raise ConfigError("give labeled shards (--labeled)")
        checks = {
            "num_classes": self.num_classes >= 1, "image_size": self.image_size >= 8, "batch_size": self.batch_size >= 1,
            "unlabeled_ratio": self.unlabeled_ratio >= 0, "teacher_temperature": self.teacher_temperature > 0,
            "label_smoothing": 0 <= self.label_smoothing < 1, "dropout": 0 <= self.dropout < 1,
            "drop_path": 0 <= self.drop_path < 1, "random_erasing": 0 <= self.random_erasing <= 1,
            "lr": self.lr > 0, "epochs": self.epochs > 0,
            "warmup_epochs": self.warmup_epochs >= 0, "decay_epochs": self.decay_epochs > 0,
            "ema_decay": 0 <= self.ema_decay < 1, "crop_pct": 0 < self.crop_pct <= 1,
            "randaugment_magnitude": 0 <= self.randaugment_magnitude <= 30, "workers": self.workers >= 0,
            "log_every": self.log_every >= 1, "checkpoint_every": self.checkpoint_every >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError("out of range: " + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))
        if self.steps is not None and self.steps < 1:
            raise ConfigError("steps must be at least 1")
        for name, allowed in (("optimizer", ("rmsprop", "sgd", "adamw")),
                              ("schedule", ("exponential", "cosine", "constant"))):
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        return self

    @property
    def unlabeled_batch_size(self) -> int:
        return round(self.batch_size * self.unlabeled_ratio) if self.unlabeled else 0

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(dataclasses.asdict(self)), sort_keys=False)


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
# How `ns-train train --help` groups the options: each group's first field, in field order.
GROUPS = {"labeled": "data", "image_size": "preprocessing", "model": "model", "batch_size": "Noisy Student",
          "noise": "noise", "optimizer": "optimizer", "schedule": "schedule", "amp": "device", "log_every": "output"}


def group_of(name: str) -> str:
    group = "data"
    for f in dataclasses.fields(TrainConfig):
        group = GROUPS.get(f.name, group)
        if f.name == name:
            return group
    raise KeyError(name)


def load_config(path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """The YAML file's values, then the overrides (None means not given), as a validated TrainConfig."""
    values: dict[str, Any] = {}
    if path:
        with open(path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as err:
                raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from err
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value")
        unknown = sorted(set(values) - set(FIELDS))
        if unknown:
            raise ConfigError(f"{path}: unknown keys {unknown}; known: {', '.join(FIELDS)}")
    values |= {k: v for k, v in overrides.items() if v is not None}
    for name in ("mean", "std", "crop_scale"):
        if name in values:
            values[name] = tuple(float(v) for v in values[name])
    try:
        return TrainConfig(**values).validate()
    except TypeError as err:
        raise ConfigError(str(err)) from err
