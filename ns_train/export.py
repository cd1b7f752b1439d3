"""A trained student as the next teacher: safetensors weights that carry the model name, class count and eval
preprocessing in their metadata, which `ns-data label --teacher FILE` reads (ns_data.teacher.exported_teacher)."""
from __future__ import annotations

import json
import os

import torch

from ns_data import fs
from ns_data.stage import InputError, OutputExists
from ns_data.teacher import EXPORT_METADATA
from ns_train.config import TrainConfig, load_config
from ns_train.train import CHECKPOINT, CONFIG, create_student, load_checkpoint


def _checkpoint(run_dir: str) -> dict:
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(path):
        raise InputError(f"{run_dir} has no {CHECKPOINT}: not a ns-train run directory")
    return load_checkpoint(path)


def _weights(state: dict, weights: str) -> dict[str, torch.Tensor]:
    return state["ema"] if weights == "ema" and state.get("ema") is not None else state["model"]


def load_run_model(run_dir: str, weights: str = "ema") -> tuple[torch.nn.Module, TrainConfig]:
    """The run's model in eval mode (noise off), and its config."""
    state = _checkpoint(run_dir)
    cfg = load_config(os.path.join(run_dir, CONFIG), {})
    model = create_student(cfg)
    model.load_state_dict(_weights(state, weights))
    return model.eval(), cfg


def export_teacher(run_dir: str, output: str, weights: str = "ema", overwrite: bool = False) -> dict:
    """Writes the run's latest checkpoint as `output`, complete or absent (a temporary name, then a rename); an
    existing `output` is replaced only with `overwrite`."""
    from safetensors.torch import save

    if fs.exists(output) and not overwrite:
        raise OutputExists(f"{output} already exists; pass --overwrite to replace it")
    state = _checkpoint(run_dir)
    identity = {"model": state["model_name"], "num_classes": state["num_classes"],
                "preprocessing": state["preprocessing"], "step": state["step"], "weights": weights}
    tensors = {k: v.contiguous() for k, v in _weights(state, weights).items()}
    fs.write_atomic(output, save(tensors, metadata={EXPORT_METADATA: json.dumps(identity)}))
    return identity
