"""`ns-train loop CONFIG.yaml`: Noisy Student's iterations as one command that can be re-run until done.

The config names the data, the teacher (a checkpoint, or trained first on the labeled data), the iterations
(each one's student, and ablations trained on the same pseudo labels), and every stage's options. Each
iteration runs

    ns-data label -> ns-data balance -> ns-data shard -> ns-train train (student, ablations) -> ns-train export

with the teacher of the iteration before. Every step is the command a user would type (it is printed, ready to
copy) and keeps that command's output policy: a step whose output is complete does nothing, an interrupted one
resumes, one of other options stops the loop with the stage's one-line error. So after a crash or a kill the
same command continues where it stopped. Data steps and single-process training run in this process; training
with `launcher.processes` > 1 runs under torchrun.

Layout of OUTPUT (OUTPUT/seed-N/... per seed when `seeds` is given):

    teacher/  teacher.safetensors                    (when the teacher is trained)
    iter-1/labels  iter-1/selection  iter-1/shards
    iter-1/student  iter-1/student.safetensors  iter-1/<ablation>
    ...
    results.json  results.txt  results.png           (OUTPUT: every seed, rewritten after each one)
"""
from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import click
import yaml

from ns_data.cli import main as ns_data_cli
from ns_data.console import own_options
from ns_data.stage import StageError
from ns_train import commands as ns_train_commands
from ns_train.config import FIELDS as TRAIN_FIELDS, ConfigError, load_config

TOP_KEYS = ("output", "seeds", "num_classes", "data", "teacher", "train", "label", "balance", "shard", "launcher",
            "iterations")
DATA_KEYS = ("labeled", "unlabeled", "val", "ground_truth")
ITERATION_KEYS = ("train", "ablations", "label", "balance", "shard")
DATA_STAGES = ("label", "balance", "shard")
# options every step gets from the loop, not from the config
SET_BY_LOOP = {"label": ("output", "teacher", "args", "overwrite"), "balance": ("output", "args", "overwrite"),
               "shard": ("output", "args", "overwrite"),
               "train": ("output", "config_path", "overwrite", "labeled", "unlabeled", "val", "num_classes")}


@dataclass(frozen=True)
class Iteration:
    train: dict[str, Any]  # the student's options, over the config's `train`
    ablations: dict[str, dict[str, Any]]  # name -> options over the student's: trained, reported, not exported
    stages: dict[str, dict[str, Any]]  # label/balance/shard options over the config's


@dataclass(frozen=True)
class LoopConfig:
    path: str
    output: str
    seeds: tuple[int, ...] | None
    num_classes: int
    data: dict[str, Any]  # labeled, unlabeled (a list), val, ground_truth: paths, {seed} and {output} unexpanded
    teacher: dict[str, Any]  # {"train": options} or {"model": NAME_OR_FILE, "checkpoint": FILE, "pretrained": bool}
    train: dict[str, Any]
    stages: dict[str, dict[str, Any]]
    processes: int
    iterations: tuple[Iteration, ...]

    def runs(self) -> list[tuple[int | None, str]]:
        """(seed, run directory) of each whole run."""
        if self.seeds is None:
            return [(None, self.output)]
        return [(seed, os.path.join(self.output, f"seed-{seed}")) for seed in self.seeds]


@dataclass(frozen=True)
class Step:
    """One command of the loop."""

    title: str  # "seed 0 iteration 1: label"
    program: str  # "ns-data label", "ns-train train", ...
    argv: tuple[str, ...]
    output: str
    processes: int = 1

    def display(self) -> str:
        if self.processes > 1:
            return shlex.join(torchrun(self.processes, self.argv))
        return shlex.join([*self.program.split(), *self.argv])


def torchrun(processes: int, argv: Sequence[str], launcher: Sequence[str] = ("torchrun",)) -> list[str]:
    """`ns-train train ARGV` as `processes` DDP processes on this machine: `torchrun ...` as a user types it;
    the loop runs it as `python -m torch.distributed.run ...`, the same launcher from this interpreter."""
    return [*launcher, "--standalone", "--nproc_per_node", str(processes), "-m", "ns_train.cli", "train", *argv]


@dataclass
class Plan:
    """Every step of every run, and what the results table reads back."""

    config: LoopConfig
    steps: dict[int | None, list[Step]] = field(default_factory=dict)
    models: dict[int | None, dict[str, str]] = field(default_factory=dict)  # name -> run directory
    labels: dict[int | None, dict[str, str]] = field(default_factory=dict)  # iteration -> labels directory
    ground_truth: dict[int | None, str | None] = field(default_factory=dict)  # Parquet of id, label
    # (model, baseline) pairs the table compares: each student with its teacher, with its ablations
    comparisons: list[tuple[str, str]] = field(default_factory=list)


# ------------------------------------------------------------------------------------------- reading the config


def _mapping(value: Any, where: str, allowed: tuple[str, ...] | None = None) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
    if allowed is not None:
        unknown = sorted(set(map(str, value)) - set(allowed))
        if unknown:
            raise ConfigError(f"{where}: unknown keys {unknown}; known: {', '.join(allowed)}")
    return value


def read_config(path: str, output: str | None = None) -> LoopConfig:
    """The config file, checked for its shape (the steps' options are checked by `plan`); relative paths are
    relative to the file's directory, `output` (from the command line) to the working directory."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from err
    raw = _mapping(raw, path, TOP_KEYS)
    base = os.path.dirname(os.path.abspath(path))
    for key in ("output", "num_classes", "data", "iterations")[bool(output):]:
        if key not in raw:
            raise ConfigError(f"{path}: missing key '{key}'")
    data = {k: v for k, v in _mapping(raw["data"], f"{path}: data", DATA_KEYS).items() if v is not None}
    if not data.get("labeled") or not data.get("unlabeled"):
        raise ConfigError(f"{path}: data needs 'labeled' (TFRecord shards) and 'unlabeled' (images)")
    unlabeled = data["unlabeled"] if isinstance(data["unlabeled"], list) else [data["unlabeled"]]
    data = {**data, "unlabeled": [str(u) for u in unlabeled]}
    teacher = _mapping(raw.get("teacher"), f"{path}: teacher", ("train", "model", "checkpoint", "pretrained"))
    if ("train" in teacher) == ("model" in teacher):
        raise ConfigError(f"{path}: teacher needs either 'train' (options to train it) or 'model' (a timm name or "
                          "an exported .safetensors file, with 'checkpoint' or 'pretrained' when a name)")
    seeds = raw.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds or
                              not all(isinstance(s, int) and s >= 0 for s in seeds) or len(set(seeds)) < len(seeds)):
        raise ConfigError(f"{path}: seeds must be a list of distinct non-negative integers")
    if not isinstance(raw["num_classes"], int) or raw["num_classes"] < 1:
        raise ConfigError(f"{path}: num_classes must be a positive integer")
    launcher = _mapping(raw.get("launcher"), f"{path}: launcher", ("processes",))
    processes = launcher.get("processes", 1)
    if not isinstance(processes, int) or processes < 1:
        raise ConfigError(f"{path}: launcher.processes must be a positive integer")
    iterations = raw["iterations"]
    if not isinstance(iterations, list) or not iterations:
        raise ConfigError(f"{path}: iterations must be a list of at least one iteration")
    parsed = []
    for i, item in enumerate(iterations, 1):
        item = _mapping(item, f"{path}: iteration {i}", ITERATION_KEYS)
        ablations = _mapping(item.get("ablations"), f"{path}: iteration {i}: ablations")
        for name in ablations:
            if not str(name).replace("-", "").replace("_", "").isalnum() or name == "student":
                raise ConfigError(f"{path}: iteration {i}: ablation name {name!r}: use letters, digits, - and _ "
                                  "(and not 'student')")
        parsed.append(Iteration(
            train=_mapping(item.get("train"), f"{path}: iteration {i}: train"),
            ablations={str(k): _mapping(v, f"{path}: iteration {i}: ablation {k}") for k, v in ablations.items()},
            stages={s: _mapping(item.get(s), f"{path}: iteration {i}: {s}") for s in DATA_STAGES}))
    return LoopConfig(
        path=path, output=os.path.abspath(output) if output else os.path.join(base, str(raw["output"])),
        seeds=tuple(seeds) if seeds is not None else None, num_classes=raw["num_classes"],
        data={k: _resolve_later(v, base) for k, v in data.items()},
        teacher=_teacher_paths(teacher, base),
        train=_mapping(raw.get("train"), f"{path}: train"),
        stages={s: _mapping(raw.get(s), f"{path}: {s}") for s in DATA_STAGES},
        processes=processes, iterations=tuple(parsed))


def _teacher_paths(teacher: dict, base: str) -> dict:
    """The teacher's files relative to the config's directory; a timm model name stays a name."""
    teacher = dict(teacher)
    if "checkpoint" in teacher:
        teacher["checkpoint"] = _resolve_later(teacher["checkpoint"], base)
    if str(teacher.get("model", "")).endswith(".safetensors"):
        teacher["model"] = _resolve_later(teacher["model"], base)
    return teacher


def _resolve_later(value: Any, base: str) -> Any:
    """A path relative to the config's directory (placeholders are expanded per run)."""
    if isinstance(value, list):
        return [_resolve_later(v, base) for v in value]
    value = str(value)
    return value if value.startswith("{output}") or "://" in value else os.path.normpath(os.path.join(base, value))


def _expand(value: Any, cfg: LoopConfig, seed: int | None, where: str) -> Any:
    if isinstance(value, list):
        return [_expand(v, cfg, seed, where) for v in value]
    try:
        return str(value).format_map({"output": cfg.output, **({"seed": seed} if seed is not None else {})})
    except (KeyError, ValueError, IndexError) as err:
        hint = " ({seed} needs `seeds`)" if "seed" in str(err) else ""
        raise ConfigError(f"{cfg.path}: {where}: cannot expand {value!r}{hint}") from err


# ------------------------------------------------------------------------------------------- options to argv


# The command each step runs, by stage: its options are checked by parsing them with the command itself.
COMMANDS: dict[str, click.Command] = {
    "label": ns_data_cli.commands["label"], "balance": ns_data_cli.commands["balance"],
    "shard": ns_data_cli.commands["shard"], "train": ns_train_commands.train, "export": ns_train_commands.export}


def option_args(command: click.Command, stage: str, options: dict[str, Any], where: str) -> tuple[list[str], list[str]]:
    """A stage's options as its command-line arguments (`per_class: 100` is `--per-class 100`; true and false
    are `--flag` and `--no-flag`; a list is the option's values), and its `beam_args`, passed on to Beam."""
    params = {p.name: p for p in command.params if isinstance(p, click.Option)}
    args, beam_args = [], []
    for key, value in options.items():
        if key == "beam_args" and stage in DATA_STAGES:
            if not isinstance(value, list) or not all(isinstance(a, str) and a.startswith("--") for a in value):
                raise ConfigError(f"{where}: beam_args must be a list of --option=value strings")
            beam_args = list(value)
            continue
        if key in SET_BY_LOOP[stage]:
            raise ConfigError(f"{where}: '{key}' is set by the loop, not in the config")
        param = params.get(key)
        if param is None:
            known = sorted(n for n in params if n not in SET_BY_LOOP[stage])
            extra = ", beam_args" if stage in DATA_STAGES else ""
            raise ConfigError(f"{where}: unknown option '{key}'; known: {', '.join(known)}{extra}")
        flag = param.opts[0]
        if param.is_flag:
            if not isinstance(value, bool):
                raise ConfigError(f"{where}: {key} must be true or false")
            if value:
                args.append(flag)
            elif param.secondary_opts:
                args.append(param.secondary_opts[0])
        elif param.nargs > 1:
            values = value if isinstance(value, list) else [value]
            args += [flag, *map(str, values)]
        else:
            args += [flag, " ".join(map(str, value)) if isinstance(value, list) else str(value)]
    return args, beam_args


def _checked(command: click.Command, program: str, argv: list[str], where: str) -> dict[str, Any]:
    """Parses `argv` as the command would (no work is done): a bad value is a config error now, not later."""
    try:
        with command.make_context(program, list(argv)) as ctx:
            return dict(ctx.params)
    except click.ClickException as err:
        raise ConfigError(f"{where}: {err.format_message()}") from err


def _checked_beam_args(command: click.Command, program: str, beam_args: list[str], where: str) -> None:
    """`beam_args` are options Beam declares (as the command checks them when it runs): a config error now."""
    from ns_data.runner import check_beam_args  # Beam: loaded to plan a loop, not by every ns-train command

    try:
        check_beam_args(beam_args, own_options(command), program)
    except StageError as err:
        raise ConfigError(f"{where}: {err}") from err


# ------------------------------------------------------------------------------------------- the plan


def plan(cfg: LoopConfig) -> Plan:
    """Every step of every run, each parsed and checked as its command would: a config error is found before
    any work starts."""
    result = Plan(cfg)
    for seed, root in cfg.runs():
        prefix = f"seed {seed} " if seed is not None else ""
        data = {k: _expand(v, cfg, seed, f"data.{k}") for k, v in cfg.data.items()}
        for key in ("labeled", "val", "ground_truth"):
            if data.get(key) and "://" not in data[key] and not os.path.exists(data[key]):
                raise ConfigError(f"{cfg.path}: data.{key}: not found: {data[key]}")
        steps, models, labels = [], {}, {}

        def train_step(name: str, title: str, options: dict, unlabeled: str | None) -> None:
            where = f"{cfg.path}: {title}"
            options = ({"seed": seed} if seed is not None else {}) | options
            args, _ = option_args(COMMANDS["train"], "train", options, where)
            run_dir = os.path.join(root, name)
            argv = ["--output", run_dir, "--labeled", data["labeled"], "--num-classes", str(cfg.num_classes),
                    *(["--val", data["val"]] if data.get("val") else []),
                    *(["--unlabeled", unlabeled] if unlabeled else []), *args]
            params = _checked(COMMANDS["train"], "ns-train train", argv, where)
            try:
                load_config(None, {k: v for k, v in params.items() if k in TRAIN_FIELDS})
            except ConfigError as err:
                raise ConfigError(f"{where}: {err}") from err
            steps.append(Step(f"{prefix}{title}", "ns-train train", tuple(argv), run_dir, cfg.processes))
            models[name] = run_dir

        def export_step(name: str, title: str) -> str:
            teacher = os.path.join(root, f"{name}.safetensors")
            steps.append(Step(f"{prefix}{title}", "ns-train export", (os.path.join(root, name), "--output", teacher),
                              teacher))
            return teacher

        def data_step(stage: str, title: str, inputs: list[str], output: str, options: dict) -> None:
            where = f"{cfg.path}: {title}"
            args, beam_args = option_args(COMMANDS[stage], stage, options, where)
            argv = [*inputs, "--output", output, *args, *beam_args]
            _checked(COMMANDS[stage], f"ns-data {stage}", [a for a in argv if a not in beam_args], where)
            _checked_beam_args(COMMANDS[stage], f"ns-data {stage}", beam_args, where)
            steps.append(Step(f"{prefix}{title}", f"ns-data {stage}", tuple(argv), output))

        if "train" in cfg.teacher:
            train_step("teacher", "teacher: train", cfg.train | _mapping(cfg.teacher["train"], "teacher.train"), None)
            teacher_args = ["--teacher", export_step("teacher", "teacher: export")]
        else:
            model = _expand(cfg.teacher["model"], cfg, seed, "teacher.model")
            teacher_args = ["--teacher", model]
            if "checkpoint" in cfg.teacher:
                teacher_args += ["--checkpoint", _expand(cfg.teacher["checkpoint"], cfg, seed, "teacher.checkpoint")]
            if cfg.teacher.get("pretrained"):
                teacher_args.append("--pretrained")
        for i, iteration in enumerate(cfg.iterations, 1):
            it = f"iter-{i}"
            out = {kind: os.path.join(root, it, kind) for kind in ("labels", "selection", "shards")}
            options = {s: cfg.stages[s] | iteration.stages[s] for s in DATA_STAGES}
            data_step("label", f"iteration {i}: label", [*data["unlabeled"], *teacher_args], out["labels"],
                      options["label"])
            data_step("balance", f"iteration {i}: balance", [out["labels"]], out["selection"],
                      {"num_classes": cfg.num_classes} | options["balance"])
            data_step("shard", f"iteration {i}: shard", [out["selection"]], out["shards"], options["shard"])
            labels[it] = out["labels"]
            student = cfg.train | iteration.train
            train_step(f"{it}/student", f"iteration {i}: train student", student, out["shards"])
            for name, ablation in iteration.ablations.items():
                train_step(f"{it}/{name}", f"iteration {i}: train ablation {name}", student | ablation, out["shards"])
            teacher_args = ["--teacher", export_step(f"{it}/student", f"iteration {i}: export")]
        result.steps[seed], result.models[seed], result.labels[seed] = steps, models, labels
        result.ground_truth[seed] = data.get("ground_truth")
    result.comparisons = comparisons(cfg)
    return result


def comparisons(cfg: LoopConfig) -> list[tuple[str, str]]:
    """Each student against the model that taught it (when the loop trained it) and against its ablations."""
    pairs, teacher = [], "teacher" if "train" in cfg.teacher else None
    for i, iteration in enumerate(cfg.iterations, 1):
        student = f"iter-{i}/student"
        pairs += ([(student, teacher)] if teacher else []) + [(student, f"iter-{i}/{n}") for n in iteration.ablations]
        teacher = student
    return pairs


# ------------------------------------------------------------------------------------------- running


def run_step(step: Step, echo: Callable[[str], None]) -> None:
    """Runs one step as its command: in this process, or under torchrun for several training processes."""
    echo(f"\n== {step.title}\n$ {step.display()}")
    started = time.monotonic()
    _run_command(step, echo)
    echo(f"-- {step.title}: {time.monotonic() - started:,.1f} s")


def _run_command(step: Step, echo: Callable[[str], None]) -> None:
    if step.program == "ns-train export" and os.path.exists(step.output):
        echo(f"{step.output} exists; nothing to do")  # export writes its file complete or not at all
        return
    if step.processes > 1:
        launcher = (sys.executable, "-m", "torch.distributed.run")
        code = subprocess.run(torchrun(step.processes, step.argv, launcher)).returncode
        if code:
            raise StageError(f"{step.title}: torchrun exited with status {code}; re-run the loop to resume")
        return
    command = COMMANDS[step.program.split()[1]]
    try:
        command.main(list(step.argv), prog_name=step.program, standalone_mode=False)
    except StageError as err:
        raise type(err)(f"{step.title}: {err}") from err
    except click.ClickException as err:
        raise StageError(f"{step.title}: {err.format_message()}") from err


def run_loop(config_path: str, output: str | None = None, echo: Callable[[str], None] = print) -> dict:
    """Runs (or continues) every step of every run; writes the results table after each run."""
    from ns_train import results as loop_results  # Beam's filesystems (ns_data.fs): loaded when a loop runs

    cfg = read_config(config_path, output)
    the_plan = plan(cfg)
    os.makedirs(cfg.output, exist_ok=True)
    total = sum(len(s) for s in the_plan.steps.values())
    echo(f"ns-train loop: {len(cfg.runs())} run(s), {len(cfg.iterations)} iteration(s) each, {total} steps; "
         f"output {cfg.output}")
    done = {}
    for seed, _root in cfg.runs():
        for step in the_plan.steps[seed]:
            run_step(step, echo)
        done[seed] = loop_results.collect(the_plan, seed)
        summary = loop_results.write(the_plan, done, cfg.output)
    return summary
