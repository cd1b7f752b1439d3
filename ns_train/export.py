"""A trained student as the next teacher: safetensors weights that carry the model name, class count and eval
preprocessing in their metadata, which `ns-data label --teacher FILE` reads (ns_data.teacher.exported_teacher).

Only a finished run (its `results.json`, written last) is exported or evaluated; an unfinished one (killed,
failed, or still training) is refused in one line unless `allow_unfinished` is given."""
from __future__ import annotations

import json
import os

import torch

from ns_data import fs
from ns_data.contract import TRAIN_RUN
from ns_data.stage import InputError, OutputExists
from ns_data.teacher import EXPORT_METADATA
from ns_train.config import TrainConfig, load_config
from ns_train.train import create_student, load_checkpoint


class UnfinishedRun(InputError):
    """A run without its results.json: killed, failed, or still training."""


def unfinished(run_dir: str, state: dict) -> str | None:
    """What is unfinished about the run ("step 6 of 12"), or None when it finished (its results.json)."""
    if os.path.exists(os.path.join(run_dir, TRAIN_RUN.marker)):
        return None
    return f"step {state['step']} of {state['total_steps']}"


def _checkpoint(run_dir: str, allow_unfinished: bool = False, echo=None) -> dict:
    """The run's checkpoint; an unfinished run's only with `allow_unfinished` (then `echo` says which step)."""
    path = os.path.join(run_dir, TRAIN_RUN.checkpoint)
    if not os.path.exists(path):
        raise InputError(f"{run_dir} has no {TRAIN_RUN.checkpoint}: not a ns-train run directory")
    state = load_checkpoint(path)
    where = unfinished(run_dir, state)
    if where and not allow_unfinished:
        raise UnfinishedRun(f"{run_dir} is an unfinished run (its checkpoint is at {where}, no {TRAIN_RUN.marker}: "
                            f"killed, failed or still training); run its `ns-train train` again to finish it, or "
                            f"pass --allow-unfinished to use {where}")
    if where and echo:
        echo(f"warning: {run_dir} is unfinished: using its checkpoint at {where}")
    return state


def _weights(state: dict, weights: str) -> dict[str, torch.Tensor]:
    return state["ema"] if weights == "ema" and state["ema"] is not None else state["model"]


def load_run_model(run_dir: str, weights: str = "ema", allow_unfinished: bool = False,
                   echo=None) -> tuple[torch.nn.Module, TrainConfig]:
    """The run's model in eval mode (noise off), and its config; an unfinished run's only with `allow_unfinished`."""
    state = _checkpoint(run_dir, allow_unfinished, echo)
    cfg = load_config(os.path.join(run_dir, TRAIN_RUN.config), {})
    model = create_student(cfg)
    model.load_state_dict(_weights(state, weights))
    return model.eval(), cfg


def export_teacher(run_dir: str, output: str, weights: str = "ema", overwrite: bool = False,
                   allow_unfinished: bool = False, echo=None) -> dict:
    """Writes the run's latest checkpoint as `output`, complete or absent (a temporary name, then a rename); an
    existing `output` is replaced only with `overwrite`; an unfinished run is exported only with
    `allow_unfinished` (`echo` says which step)."""
    from safetensors.torch import save

    if fs.exists(output) and not overwrite:
        raise OutputExists(f"{output} already exists; pass --overwrite to replace it")
    state = _checkpoint(run_dir, allow_unfinished, echo)
    identity = {"model": state["model_name"], "num_classes": state["num_classes"],
                "preprocessing": state["preprocessing"], "step": state["step"], "weights": weights}
    tensors = {k: v.contiguous() for k, v in _weights(state, weights).items()}
    fs.write_atomic(output, save(tensors, metadata={EXPORT_METADATA: json.dumps(identity)}))
    return identity
