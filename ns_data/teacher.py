"""The teacher: a timm model with weights from a local file, or timm's own weights from the Hugging Face hub
cache (`pretrained`), or a TorchScript file; its eval preprocessing, and `predict`, which turns a batch of images
into soft pseudo labels.

The teacher is never noised: eval mode, inference mode, softmax at temperature 1 (the trainer applies its own
temperature). Everything that can be wrong with it (unknown model, missing file, weights that do not fit) is
found by `check_teacher` on the launching machine, before any image is read.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from ns_data.stage import StageError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TORCHSCRIPT_EXTENSIONS = (".ts", ".torchscript", ".jit", ".pt")


class TeacherError(StageError):
    """The teacher cannot be built as asked: reported before the run."""


@dataclass(frozen=True)
class TeacherSpec:
    model: str  # a timm model name, or the path of a TorchScript file
    checkpoint: str | None = None  # safetensors or a PyTorch state dict (loaded with weights_only=True)
    random_weights: bool = False  # no checkpoint: random weights (demos, benchmarks, tests)
    pretrained: bool = False  # timm's weights for the model (name[.tag]), through the Hugging Face hub cache
    num_classes: int | None = None  # default: from the checkpoint, else the model's default
    device: str = "cpu"
    precision: str = "fp32"
    channels_last: bool = True
    # Overrides of the preprocessing timm resolves for the model (input_size as an int, crop_pct,
    # interpolation, mean, std); a TorchScript teacher has no config of its own and starts from timm's defaults.
    preprocessing: tuple = ()  # ((name, value), ...): hashable, so that a built model can be reused

    @property
    def is_torchscript(self) -> bool:
        return os.path.isfile(self.model) and self.model.endswith(TORCHSCRIPT_EXTENSIONS)


EXPORT_METADATA = "ns_train.teacher"


def exported_teacher(path: str) -> dict[str, Any] | None:
    """The identity a `ns-train export` safetensors file carries (model, num_classes, preprocessing), or None."""
    if not (path.endswith(".safetensors") and os.path.isfile(path)):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, "pt") as f:
            meta = f.metadata() or {}
    except Exception as err:  # noqa: BLE001
        raise TeacherError(f"cannot read {path} as safetensors: {err}") from err
    if EXPORT_METADATA not in meta:
        raise TeacherError(f"{path} does not say which model it holds: pass --teacher MODEL --checkpoint {path}")
    return json.loads(meta[EXPORT_METADATA])


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Weights from safetensors or a torch.save'd state dict (or a checkpoint dict holding one)."""
    if not os.path.isfile(path):
        raise TeacherError(f"checkpoint not found: {path}")
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means an unusable file
        raise TeacherError(f"cannot load checkpoint {path}: {type(err).__name__}: {err}") from err
    for wrapper in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _classes_in(state: dict, model) -> int | None:
    classifier = model.pretrained_cfg.get("classifier")
    weight = state.get(f"{classifier}.weight") if classifier else None
    return int(weight.shape[0]) if weight is not None and weight.ndim >= 1 else None


@dataclass(frozen=True)
class HubWeights:
    """Where `--pretrained` weights came from: the hub repository, the commit and file resolved, the local path
    of that file in the Hugging Face cache."""

    hub_id: str
    revision: str  # the commit of the snapshot the file is in
    filename: str
    path: str
    tag: str | None  # timm's pretrained tag (`ns_jft_in1k`)

    @property
    def uri(self) -> str:
        return f"hf://{self.hub_id}@{self.revision}/{self.filename}"


_BUILT: dict[TeacherSpec, tuple[torch.nn.Module, HubWeights | None]] = {}


def build_model(spec: TeacherSpec) -> torch.nn.Module:
    """The teacher in eval mode on its device, weights loaded and checked; built once per process and spec
    (the launch check and the local runner's label workers share it)."""
    if spec not in _BUILT:
        _BUILT.clear()  # one teacher per process
        _BUILT[spec] = _build(spec)
    return _BUILT[spec][0]


def hub_weights(spec: TeacherSpec) -> HubWeights | None:
    """The hub file a built `pretrained` teacher was loaded from (None for other teachers)."""
    build_model(spec)
    return _BUILT[spec][1]


def _build(spec: TeacherSpec) -> tuple[torch.nn.Module, HubWeights | None]:
    from ns_data.memory import keep_freed_memory

    keep_freed_memory()  # the process runs this teacher's forward passes
    if spec.precision not in PRECISIONS:
        raise TeacherError(f"unknown precision {spec.precision!r}; one of {', '.join(PRECISIONS)}")
    if spec.device.startswith("cuda") and not torch.cuda.is_available():
        raise TeacherError(f"--device {spec.device}: CUDA is not available on this machine")
    weights = None
    if spec.is_torchscript:
        if spec.pretrained:
            raise TeacherError(f"--pretrained takes a timm model name, not a TorchScript file ({spec.model})")
        try:
            model = torch.jit.load(spec.model, map_location="cpu")
        except Exception as err:  # noqa: BLE001
            raise TeacherError(f"cannot load TorchScript teacher {spec.model}: {err}") from err
    elif spec.pretrained:
        model, weights = _build_pretrained(spec)
    else:
        model = _build_timm(spec)
    model = model.eval().to(spec.device)
    if spec.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model, weights


def _pretrained_cfg(name: str):
    """timm's pretrained config of `name` (a model, optionally `.tag`); a clear error for an unknown one."""
    import timm
    from timm.models import get_pretrained_cfg

    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:8]
        raise TeacherError(f"unknown model {name!r}" + (f"; similar: {', '.join(close)}" if close else "")
                           + " (or give the path of a TorchScript file)")
    try:
        return get_pretrained_cfg(name)
    except RuntimeError as err:  # a tag the model does not have
        arch = name.split(".")[0]
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise TeacherError(f"unknown pretrained tag in {name!r}"
                           + (f"; {arch} has: {', '.join(tags[:8])}" if tags else f"; {arch} has none")) from err


def _build_timm(spec: TeacherSpec) -> torch.nn.Module:
    import timm

    _pretrained_cfg(spec.model)
    if spec.checkpoint is None and not spec.random_weights:
        raise TeacherError("give --checkpoint FILE with the teacher's weights, or --pretrained for timm's weights "
                           "from the Hugging Face hub (or --random-weights for a demo)")
    state = load_state_dict(spec.checkpoint) if spec.checkpoint else None
    with torch.random.fork_rng():  # random weights are seeded: the same model on every worker and run
        torch.manual_seed(0)
        probe = timm.create_model(spec.model, pretrained=False)
        num_classes = spec.num_classes or (_classes_in(state, probe) if state else None)
        if num_classes and num_classes != probe.num_classes:
            torch.manual_seed(0)
            return _load(spec, timm.create_model(spec.model, pretrained=False, num_classes=num_classes), state)
    return _load(spec, probe, state)


def _hub_files(cfg) -> list[str]:
    """The files timm asks the hub for, in its order: the config's `hf_hub_filename`, else `model.safetensors`
    then `pytorch_model.bin` (timm.models._hub.load_state_dict_from_hf)."""
    filename = cfg.hf_hub_filename or "pytorch_model.bin"
    if filename.endswith(".safetensors"):
        return [filename]
    try:
        from timm.models._hub import _get_safe_alternatives

        safe = list(_get_safe_alternatives(filename))
    except ImportError:
        safe = ["model.safetensors"] if filename == "pytorch_model.bin" else []
    return safe + [filename]


def resolve_hub_weights(name: str) -> HubWeights:
    """The local file of timm's weights for `name`, from the Hugging Face hub cache (downloaded into it as
    timm does unless HF_HUB_OFFLINE is set; HF_HOME / HF_HUB_CACHE say where the cache is). A clear error when
    the model has no hub weights or they cannot be had."""
    cfg = _pretrained_cfg(name)
    if cfg is None or not cfg.hf_hub_id:
        raise TeacherError(f"--pretrained: timm has no weights on the Hugging Face hub for {name!r}"
                           + (f" (tag {cfg.tag})" if cfg is not None and cfg.tag else "")
                           + "; give --checkpoint FILE")
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    from timm.models._hub import hf_split

    repo, revision = hf_split(cfg.hf_hub_id)
    where = f"{repo}" + (f"@{revision}" if revision else "")
    first_error = None
    for filename in _hub_files(cfg):
        try:
            path = hf_hub_download(repo, filename, revision=revision, library_name="timm")
        except EntryNotFoundError as err:  # this file is not there (in the cache, or on the hub): try the next
            first_error = first_error or err
            continue
        except GatedRepoError as err:
            raise TeacherError(f"--pretrained {name}: {where} is gated on the Hugging Face hub: log in "
                               "(`hf auth login` or HF_TOKEN) with an account that has access") from err
        except RepositoryNotFoundError as err:
            raise TeacherError(f"--pretrained {name}: no repository {repo} on the Hugging Face hub") from err
        except RevisionNotFoundError as err:
            raise TeacherError(f"--pretrained {name}: {repo} has no revision {revision}") from err
        except Exception as err:  # noqa: BLE001 - network, permissions, a broken cache: one line, not a traceback
            detail = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise TeacherError(f"--pretrained {name}: cannot fetch {where}: {type(err).__name__}"
                               + (f": {detail}" if detail else "")) from err
        snapshot = os.path.dirname(path[: len(path) - len(filename)])
        return HubWeights(hub_id=repo, revision=os.path.basename(snapshot) or (revision or ""), filename=filename,
                          path=path, tag=cfg.tag)
    files = " or ".join(_hub_files(cfg))
    if isinstance(first_error, LocalEntryNotFoundError):
        why = ("HF_HUB_OFFLINE is set" if constants.is_offline_mode()
               else "the hub cannot be reached")
        raise TeacherError(f"--pretrained {name}: the weights ({where}, {files}) are not in the Hugging Face cache "
                           f"{constants.HF_HUB_CACHE} and {why}") from first_error
    raise TeacherError(f"--pretrained {name}: {where} on the Hugging Face hub has no {files}") from first_error


def _build_pretrained(spec: TeacherSpec) -> tuple[torch.nn.Module, HubWeights]:
    """timm's model with its pretrained weights, loaded by timm (its checkpoint filter, its config) from the
    very file `resolve_hub_weights` found, so the digest recorded is the digest of the weights used."""
    import timm

    if spec.checkpoint is not None or spec.random_weights:
        raise TeacherError("--pretrained cannot be combined with --checkpoint or --random-weights")
    weights = resolve_hub_weights(spec.model)
    cfg = _pretrained_cfg(spec.model)
    if spec.num_classes and cfg.num_classes and spec.num_classes != cfg.num_classes:
        raise TeacherError(f"--num-classes {spec.num_classes}: the pretrained {spec.model} has {cfg.num_classes} "
                           "classes (a new head would be random)")
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = timm.create_model(spec.model, pretrained=True, pretrained_cfg_overlay={"file": weights.path})
    except Exception as err:  # noqa: BLE001 - a damaged or foreign file in the cache
        detail = " ".join(str(err).strip().splitlines()[:2])
        raise TeacherError(f"--pretrained {spec.model}: cannot load {weights.path}: {type(err).__name__}: "
                           f"{detail}") from err
    return model, weights


def check_same_weights(spec: TeacherSpec, teacher: dict[str, Any]) -> None:
    """On a worker: the hub weights it resolved are those the run was launched with (the identity recorded).
    The same snapshot is the same file; another one (the hub moved on) is hashed and compared."""
    weights = hub_weights(spec)
    recorded = teacher.get("pretrained") or {}
    if weights is None or (weights.revision, weights.filename) == (recorded.get("revision"), recorded.get("file")):
        return
    if file_sha256(weights.path) != teacher.get("checkpoint_sha256"):
        raise TeacherError(f"the weights of {spec.model} resolved here ({weights.uri}) are not those the run was "
                           f"launched with ({recorded.get('revision')}): run the command again")


def _load(spec: TeacherSpec, model: torch.nn.Module, state: dict | None) -> torch.nn.Module:
    if state is not None:
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shapes that do not match
            first = str(err).strip().splitlines()[1:3]
            raise TeacherError(f"checkpoint {spec.checkpoint} does not fit {spec.model}: "
                               + " ".join(line.strip() for line in first)) from err
        if result.missing_keys or result.unexpected_keys:
            raise TeacherError(
                f"checkpoint {spec.checkpoint} does not fit {spec.model}: "
                f"{len(result.missing_keys)} missing keys (e.g. {result.missing_keys[:3]}), "
                f"{len(result.unexpected_keys)} unexpected keys (e.g. {result.unexpected_keys[:3]})")
    return model


def resolve_preprocessing(spec: TeacherSpec, model: torch.nn.Module) -> dict[str, Any]:
    """timm's eval data config for the model (input size, crop_pct, interpolation, mean, std), with overrides."""
    from timm.data import resolve_data_config

    overrides = {k: (tuple(v) if isinstance(v, list) else v) for k, v in spec.preprocessing}
    if "input_size" in overrides and isinstance(overrides["input_size"], int):
        overrides["input_size"] = (3, overrides["input_size"], overrides["input_size"])
    config = resolve_data_config(overrides, model=None if spec.is_torchscript else model)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.items()}


def check_teacher(spec: TeacherSpec, class_names_file: str | None = None) -> dict[str, Any]:
    """Builds the teacher once and runs it on one blank image; returns its identity (recorded in outputs), with
    the class names from `class_names_file` (checked against the class count), else timm's ImageNet names
    when the head is an ImageNet one, else none."""
    from ns_data import class_names

    model = build_model(spec)
    config = resolve_preprocessing(spec, model)
    size = config["input_size"]
    try:
        with torch.inference_mode():
            out = model(torch.zeros(1, *size, device=spec.device))
    except Exception as err:  # noqa: BLE001
        raise TeacherError(f"the teacher fails on a {size} input: {type(err).__name__}: {err}") from err
    if out.ndim != 2:
        raise TeacherError(f"the teacher returns shape {tuple(out.shape)}; expected (batch, classes) logits")
    num_classes = int(out.shape[1])
    weights = hub_weights(spec)
    checkpoint = spec.checkpoint or (spec.model if spec.is_torchscript else None)
    names, names_from = None, None
    if class_names_file:
        names, names_from = class_names.read_file(class_names_file, num_classes), class_names_file
    elif not spec.is_torchscript and (names := class_names.from_timm(model)) is not None:
        names_from = f"timm {class_names.timm_subset(model)}"
    identity = {
        "model": spec.model,
        "checkpoint": weights.uri if weights else checkpoint,
        "checkpoint_sha256": file_sha256(weights.path if weights else checkpoint) if weights or checkpoint else None,
        "random_weights": spec.random_weights and checkpoint is None and weights is None,  # seeded with 0
        "num_classes": num_classes,
        "preprocessing": config,
        "precision": spec.precision,
        "softmax_temperature": 1.0,
        "torch": torch.__version__,
        "class_names": names,
        "class_names_from": names_from,
    }
    if weights:
        identity["pretrained"] = {"hub_id": weights.hub_id, "revision": weights.revision, "file": weights.filename,
                                  "tag": weights.tag}
    return identity


def predict(model: torch.nn.Module, images: torch.Tensor, spec: TeacherSpec, topk: int, with_probs: bool
            ) -> dict[str, np.ndarray]:
    """Soft labels for a batch: argmax label, its probability, top-k, entropy, optionally all probabilities."""
    fmt = torch.channels_last if spec.channels_last else torch.contiguous_format
    images = images.to(spec.device, non_blocking=True).contiguous(memory_format=fmt)
    dtype = PRECISIONS[spec.precision]
    with torch.inference_mode(), torch.autocast(device_type=images.device.type, dtype=dtype,
                                                enabled=dtype != torch.float32):
        logits = model(images)
    probs = torch.softmax(logits.float(), dim=1)
    top_p, top_c = probs.topk(min(topk, probs.shape[1]), dim=1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-30))).sum(dim=1)
    out = {
        "label": top_c[:, 0].int().cpu().numpy(),
        "confidence": top_p[:, 0].cpu().numpy(),
        "topk_classes": top_c.int().cpu().numpy(),
        "topk_probs": top_p.cpu().numpy(),
        "entropy": entropy.cpu().numpy(),
    }
    if with_probs:
        out["probs"] = probs.cpu().numpy()
    return out
