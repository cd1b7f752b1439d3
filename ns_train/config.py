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

from ns_data.stage import StageError


class ConfigError(StageError):
    """A config value out of its range, or an unknown key: reported before training starts, as one line."""


@dataclass(frozen=True)
class TrainConfig:
    # data
    labeled: str = ""  # TFRecord shards of tf.Example: image/encoded + label (or image/class/label)
    unlabeled: str | None = None  # shards from `ns-data shard`; none: labeled-only training (the first teacher)
    val: str | None = None  # labeled shards for evaluation
    label_offset: int = 0  # added to labeled labels (-1 for ImageNet's 1-based image/class/label)
    num_classes: int = 1000
    image_size: int = 224
    crop_pct: float = 0.875  # eval: resize to image_size / crop_pct, centre crop
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    hflip: float = 0.5  # training flip probability (0 for digits and text)
    crop_scale: tuple[float, float] = (0.08, 1.0)  # training random-resized-crop scale range
    shuffle_buffer: int = 2048  # records shuffled within a worker on top of the shards' global shuffle
    workers: int = 2  # DataLoader workers per stream
    # model
    model: str = "resnet50"  # any timm model name: the student
    init_checkpoint: str | None = None  # start from these weights (safetensors or state dict)
    teacher_model: str | None = None  # for the size check (default: the teacher recorded in the shards)
    # Noisy Student
    batch_size: int = 64  # labeled images per step
    unlabeled_ratio: float = 3.0  # unlabeled batch = ratio x batch_size; loss = labeled + ratio x unlabeled
    teacher_temperature: float = 1.0  # soft targets p^(1/T), renormalized: T < 1 sharpens, T > 1 flattens
    hard_labels: bool = False  # one-hot teacher labels (with label_smoothing) instead of soft ones
    label_smoothing: float = 0.1
    noise: bool = True  # RandAugment, dropout, stochastic depth on the student; False for ablations
    randaugment_ops: int = 2
    randaugment_magnitude: int = 9  # timm's scale, 0..10 (the paper's 27 on a 0..30 scale is 9 here)
    dropout: float = 0.5  # before the classifier
    drop_path: float = 0.2  # stochastic depth (timm drop_path_rate)
    random_erasing: float = 0.0  # probability of erasing a random rectangle of a training image (cutout)
    # optimization
    optimizer: str = "rmsprop"  # rmsprop (TF-style, the paper's), sgd (nesterov), adamw
    lr: float = 0.016  # peak learning rate
    momentum: float = 0.9
    weight_decay: float = 1e-5
    schedule: str = "exponential"  # exponential (the paper's: decay_rate every decay_epochs), cosine, constant
    warmup_epochs: float = field(default=0.0, metadata={"help": "Linear warmup, in epochs (as --epochs)."})
    decay_epochs: float = field(default=2.4, metadata={"help": "The exponential schedule decays every this many "
                                                                "epochs (as --epochs)."})
    decay_rate: float = 0.97
    epochs: float = field(default=10.0, metadata={"help": "Epochs of the unlabeled set when there is one (the "
                                                          "labeled set cycles), else of the labeled set."})
    steps: int | None = field(default=None, metadata={"help": "Train this many steps; overrides --epochs."})
    # 0 disables the exponential moving average of weights. timm's warm-up applies: the decay at step s is
    # min(ema_decay, 1 - s^(-2/3)) (0.9 at step 30, 0.97 at 200, 0.99 at 1,000), so a short run's EMA averages
    # its last steps, not its initial weights
    ema_decay: float = 0.9998
    amp: bool = True  # mixed precision (bf16 autocast) on CUDA; ignored on CPU
    channels_last: bool = True
    device: str = "auto"  # auto: cuda if available (xla when torch_xla is installed and asked for), else cpu
    seed: int = 0
    # bookkeeping
    log_every: int = 20  # steps
    eval_every: int = 0  # steps; 0: only at the end
    checkpoint_every: int = 200  # steps
    progress: bool = True
    skip_bad_records: bool = field(default=False, metadata={"help": "Skip (and report on stderr, one line each) "
                                   "records whose image does not decode or that do not parse, and the rest of a "
                                   "damaged shard, instead of stopping at the first with a one-line error."})

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
