"""Training and evaluation streams over TFRecord shards, read with ns_data's PyTorch reader (no TensorFlow).

Labeled shards hold `image/encoded` and `label` (or ImageNet's `image/class/label`, with `label_offset`);
pseudo-labeled shards come from `ns-data shard`. Training streams never end: epoch after epoch, each with a new
shard order, records shuffled again in a buffer inside each worker, so a set smaller than a batch simply cycles.
Images are decoded (by label's decode, `ns_data.images.decode_image`) and transformed in the DataLoader workers;
the unlabeled stream also turns the teacher's top-k into the soft target there. A record that cannot be used is a
BadRecord naming its shard file, index and id, or with `skip_bad_records` a `skipped:` line on stderr.

A stream resumes exactly where it was: torchdata's `StatefulDataLoader` keeps each worker's position (epoch,
records yielded in it) as of the last batch taken, and which worker is next. On resume a worker reads its epoch's
records again up to its position without decoding them, and each record's augmentation draws from a seed of
(seed, stream, epoch, worker, position), so the batches after a resume are those an uninterrupted run sees.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import random
import warnings
from typing import Iterator

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from ns_data import preprocess, tfrecord
from ns_data.images import DecodeError, decode_image
from ns_data.readers import ShardDataset, example_to_record, list_shards, shard_manifest
from ns_data.soft_labels import dense_probabilities, with_temperature
from ns_data.stage import StageError
from ns_train.config import TrainConfig


log = logging.getLogger("ns_train")


class BadRecord(StageError):
    """A record the trainer cannot use (a bad image, an Example that does not parse, a damaged shard): one line
    naming the shard file, the record's index in it and its id."""

    def __init__(self, message: str):
        # A DataLoader worker's exception reaches the main process re-made from "Caught ... Original Traceback
        # ...": its last line ends in this exception's own message, which is all that is kept.
        if "\nOriginal Traceback" in message:
            message = message.rstrip().splitlines()[-1].split(f"{type(self).__name__}: ", 1)[-1]
        super().__init__(message)


def read_record(path: str, index: int, data: bytes) -> tuple[dict, Image.Image]:
    """A serialized record, parsed, and its image decoded; a BadRecord naming it if either fails."""
    try:
        record = example_to_record(tfrecord.parse_example(data))
    except Exception as err:  # noqa: BLE001 - any parser failure is a property of the record
        raise BadRecord(f"{path}: record {index}: corrupt_record ({type(err).__name__}: {err})") from err
    try:
        return record, decode_image(record["image"])  # the teacher's decode, as it saw the image
    except DecodeError as err:
        raise BadRecord(f"{path}: record {index} (id {record.get('id', '?')}): {err}") from err


def skipped(err: StageError) -> None:
    """A bad record that --skip-bad-records skips: one line on stderr, `skipped: <file>: record <i> ...`."""
    log.warning("skipped: %s", err)


def stop(err: StageError) -> None:
    """A damaged shard without --skip-bad-records: training stops, naming the file and the record."""
    raise BadRecord(str(err))


def eval_preprocessing(cfg: TrainConfig) -> dict:
    """The eval data config, in timm's terms; `ns-train export` hands it to `ns-data label` unchanged."""
    return {"input_size": cfg.image_size, "crop_pct": cfg.crop_pct, "interpolation": cfg.interpolation,
            "mean": list(cfg.mean), "std": list(cfg.std)}


def eval_transform(cfg: TrainConfig, uint8: bool = False):
    """The teacher's eval transform (ns_data.preprocess.eval_transform) of the config's preprocessing; with
    uint8, it stops before normalizing (see train_transform)."""
    return preprocess.eval_transform(eval_preprocessing(cfg), uint8)


def train_transform(cfg: TrainConfig):
    """Input noise: timm's RandAugment with random-resized crops and flips, then random erasing (a rectangle
    set to the mean colour, as timm's) if asked for; none (the eval transform) when noise is off, as in the
    paper's ablation. Images leave the workers as uint8 tensors (a quarter of the bytes to pass between
    processes) and are normalized on the batch by `Normalize`."""
    from timm.data import create_transform
    from torchvision import transforms

    if not cfg.noise:
        return eval_transform(cfg, uint8=True)
    randaugment = f"rand-m{cfg.randaugment_magnitude}-n{cfg.randaugment_ops}"
    augment = create_transform((3, cfg.image_size, cfg.image_size), is_training=True, scale=cfg.crop_scale,
                               hflip=cfg.hflip, auto_augment=randaugment, interpolation=cfg.interpolation,
                               mean=cfg.mean, std=cfg.std, use_prefetcher=True)
    if not cfg.random_erasing:
        return augment
    mean = tuple(round(255 * m) for m in cfg.mean)
    return transforms.Compose([augment, transforms.RandomErasing(cfg.random_erasing, value=mean)])


class Normalize:
    """uint8 image batches to normalized float, on the training device: (x - 255 mean) / (255 std)."""

    def __init__(self, cfg: TrainConfig, device: torch.device):
        self.mean = torch.tensor(cfg.mean, device=device).view(1, 3, 1, 1) * 255
        self.std = torch.tensor(cfg.std, device=device).view(1, 3, 1, 1) * 255
        self.device = device

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return (images.to(self.device, non_blocking=True).float() - self.mean) / self.std


def soft_target(record: dict, cfg: TrainConfig) -> np.ndarray:
    """The teacher's distribution for one record (its dense vector, or rebuilt from the top-k), at the
    configured temperature."""
    if "probabilities" in record and len(record["probabilities"]) == cfg.num_classes:
        probs = record["probabilities"]
    elif "topk_classes" in record:
        probs = dense_probabilities(record["topk_classes"], record["topk_probs"], cfg.num_classes)
    else:
        probs = dense_probabilities([record["label"]], [record.get("prob", 1.0)], cfg.num_classes)
    return with_temperature(np.asarray(probs, dtype=np.float32), cfg.teacher_temperature)


class TrainStream(IterableDataset):
    """Endless (image tensor, target) pairs: target is the class for labeled data, the soft vector (or the
    class, with hard labels) for pseudo-labeled data. `state_dict` is this worker's position, (epoch, records
    yielded in it); `load_state_dict` before iterating resumes there."""

    def __init__(self, shards: str, cfg: TrainConfig, pseudo: bool, start_epoch: int = 0):
        self.shards = list_shards(shards)
        self.cfg = cfg
        self.pseudo = pseudo
        self.position = {"epoch": start_epoch, "record": 0}

    def state_dict(self) -> dict:
        return dict(self.position)

    def load_state_dict(self, state: dict) -> None:
        self.position = dict(state)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, object]]:
        cfg = self.cfg
        transform = train_transform(cfg)
        stream = int(self.pseudo)
        source = ShardDataset(self.shards, seed=cfg.seed * 1000 + 17 * stream)
        if not source.shards_for_this_worker():
            return  # more workers than shards: this one has none (the others carry the stream)
        worker = source.worker_slot()[0]
        epoch, skip = self.position["epoch"], self.position["record"]
        while True:
            source.set_epoch(epoch)
            rng = np.random.default_rng((source.seed, worker, epoch))
            placed = source.placed(on_corrupt=skipped if cfg.skip_bad_records else stop)
            records = _buffer_shuffle(placed, cfg.shuffle_buffer, rng)
            for index, (path, number, data) in enumerate(itertools.islice(records, skip, None), start=skip):
                self.position = {"epoch": epoch, "record": index + 1}
                try:
                    record, image = read_record(path, number, data)
                except BadRecord as err:
                    if not cfg.skip_bad_records:
                        raise
                    skipped(err)
                    continue
                with _seeded((cfg.seed, stream, epoch, worker, index)):
                    image = transform(image)
                if not self.pseudo:
                    yield image, int(record["label"]) + cfg.label_offset
                elif cfg.hard_labels:
                    yield image, int(record["label"])
                else:
                    yield image, torch.from_numpy(soft_target(record, cfg))
            epoch, skip = epoch + 1, 0


@contextlib.contextmanager
def _seeded(key: tuple[int, ...]):
    """Python's, NumPy's and torch's CPU generators seeded from `key` for one record's augmentation (timm's
    RandAugment and crops draw from the first two, flips from the third). Torch's is put back afterwards: with
    no workers, the main process's drives dropout. Nothing else in training draws from the other two, and
    saving NumPy's would cost more than the seeding (0.17 ms a record)."""
    saved = torch.get_rng_state()
    seed = int(np.random.SeedSequence(key).generate_state(1)[0])
    random.seed(seed)
    np.random.seed(seed)
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(saved)


def _buffer_shuffle(records, size: int, rng: np.random.Generator):
    buffer = []
    for record in records:
        if len(buffer) < size:
            buffer.append(record)
            continue
        i = int(rng.integers(len(buffer)))
        yield buffer[i]
        buffer[i] = record
    rng.shuffle(buffer)
    yield from buffer


class EvalSet(IterableDataset):
    """Each labeled record once, in shard order: (image tensor, class)."""

    def __init__(self, shards: str, cfg: TrainConfig):
        self.shards = list_shards(shards)
        self.cfg = cfg

    def __iter__(self):
        transform = eval_transform(self.cfg)
        skip = self.cfg.skip_bad_records
        source = ShardDataset(self.shards, shuffle_shards=False, rank=0, world_size=1)
        for path, number, data in source.placed(on_corrupt=skipped if skip else stop):
            try:
                record, image = read_record(path, number, data)
            except BadRecord as err:
                if not skip:
                    raise
                skipped(err)
                continue
            yield transform(image), int(record["label"]) + self.cfg.label_offset


def loader(dataset: EvalSet, batch_size: int, workers: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, num_workers=workers, persistent_workers=workers > 0,
                      pin_memory=torch.cuda.is_available())


def train_loader(stream: TrainStream, batch_size: int, workers: int, state: dict | None = None):
    """Batches of a training stream from a torchdata StatefulDataLoader: its `state_dict()` is where the stream
    is as of the last batch taken, and `state` (such a dict, from a run with as many workers) resumes there.
    Its own generator draws the workers' base seed, so making it leaves the global one, which drives dropout,
    untouched."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*set_vital.*")  # torchdata 0.11 calls it; torch deprecates it
        batches = StatefulDataLoader(stream, batch_size=batch_size, num_workers=workers, drop_last=True,
                                     persistent_workers=workers > 0, pin_memory=torch.cuda.is_available(),
                                     generator=torch.Generator().manual_seed(stream.cfg.seed))
    if state is not None:
        batches.load_state_dict(state)
    return batches


def count_records(shards: str) -> int:
    """Records in the shards: from ns-data's manifest.json when there is one, else by walking the framing."""
    files = list_shards(shards)  # refuses an unfinished `ns-data shard` output
    manifest = shard_manifest(shards)
    if manifest is not None:
        return int(manifest["records"])
    return sum(tfrecord.count_records(p) for p in files)
