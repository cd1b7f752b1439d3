"""The `ns-train` commands that run one job: `train` (one option per config field, over an optional YAML
file), `eval` and `export`. `ns_train.cli` puts them in the `ns-train` group beside `loop`, which runs them as
steps (ns_train.loop checks a loop config's options by parsing them with these same commands)."""
from __future__ import annotations

import dataclasses
import json
import os
import typing

import click

from ns_data.contract import TRAIN_RUN
from ns_data.stage import OptionsError
from ns_train.config import FIELDS, TrainConfig, group_of, load_config


def _option_for(field: dataclasses.Field):
    """A click option for a config field: --name-with-dashes, typed, unset (None) unless given."""
    name = "--" + field.name.replace("_", "-")
    hint = typing.get_type_hints(TrainConfig)[field.name]
    args = typing.get_args(hint)
    base = next((a for a in args if a is not type(None)), hint) if args and type(None) in args else hint
    default = field.default if field.default is not dataclasses.MISSING else None
    help_text = f"{field.metadata['help']} (default: {_shown(default)})"
    if base is bool:
        return click.option(f"{name}/--no-{field.name.replace('_', '-')}", field.name, default=None, help=help_text)
    if typing.get_origin(base) is tuple:
        return click.option(name, field.name, default=None, type=float, nargs=len(typing.get_args(base)),
                            help=help_text)
    return click.option(name, field.name, default=None, type=base if base in (int, float, str) else str,
                        help=help_text)


def _shown(default) -> str:
    if isinstance(default, tuple):
        return " ".join(str(v) for v in default)
    return "none" if default in (None, "") else str(default)


class GroupedOptions(click.Command):
    """`--help` lists the config's options under their groups (data, model, noise, optimizer, ...)."""

    def format_options(self, ctx, formatter):
        groups: dict[str, list] = {}
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                name = param.name if param.name in FIELDS else None
                groups.setdefault(group_of(name) if name else "run", []).append(record)
        for group, records in groups.items():
            with formatter.section(f"{group[0].upper()}{group[1:]} options"):
                formatter.write_dl(records)


def config_options(command):
    for field in reversed(dataclasses.fields(TrainConfig)):
        command = _option_for(field)(command)
    return command


@click.command(cls=GroupedOptions)
@click.option("--config", "config_path", default=None, help="YAML file of config fields; options given here "
              "override it.")
@click.option("--output", required=True, type=click.Path(file_okay=False),
              help=f"Run directory: {', '.join(TRAIN_RUN.files)} (written last). Re-run with the same config to "
                   "resume.")
@click.option("--overwrite", is_flag=True, help="Replace a run of another config in --output.")
@config_options
def train(config_path, output, overwrite, **overrides) -> None:
    """Train a (noised) student; without --unlabeled, a teacher on labeled data only."""
    from ns_train.train import train as run

    cfg = load_config(config_path, overrides)
    results = run(cfg, output, echo=lambda m: click.echo(m, err=True), overwrite=overwrite)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one summary
        click.echo(format_results(results, output))


@click.command("eval")
@click.argument("run_dir")
@click.option("--shards", required=True, help="Labeled shards (directory or glob).")
@click.option("--weights", default="ema", show_default=True, type=click.Choice(["ema", "model"]),
              help="The EMA of the weights, or the trained weights themselves.")
@click.option("--label-offset", default=None, type=int, help="Default: the run's.")
@click.option("--allow-unfinished", is_flag=True, help="Evaluate the last checkpoint of a run that did not finish "
              "(killed, failed or still training); refused without it.")
def eval_command(run_dir, shards, weights, label_offset, allow_unfinished) -> None:
    """Top-1 and top-5 of a finished run's model on labeled shards."""
    import torch

    from ns_train.export import load_run_model
    from ns_train.train import evaluate

    model, cfg = load_run_model(run_dir, weights, allow_unfinished, echo=lambda m: click.echo(m, err=True))
    if label_offset is not None:
        cfg = dataclasses.replace(cfg, label_offset=label_offset)
    result = evaluate(model, shards, cfg, torch.device("cpu"))
    click.echo(json.dumps(result))


@click.command()
@click.argument("run_dir")
@click.option("--output", required=True, help="The .safetensors file to write.")
@click.option("--weights", default="ema", show_default=True, type=click.Choice(["ema", "model"]),
              help="The EMA of the weights (when the run kept one) or the raw weights.")
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
@click.option("--allow-unfinished", is_flag=True, help="Export the last checkpoint of a run that did not finish "
              "(killed, failed or still training); refused without it.")
def export(run_dir, output, weights, overwrite, allow_unfinished) -> None:
    """Write a finished run's student as the next teacher: `ns-data label --teacher OUTPUT` loads it as it is."""
    from ns_train.export import export_teacher

    if not output.endswith(".safetensors"):
        raise OptionsError("--output must end in .safetensors")
    identity = export_teacher(run_dir, output, weights, overwrite, allow_unfinished,
                              echo=lambda m: click.echo(m, err=True))
    click.echo(f"exported {identity['model']} ({identity['num_classes']} classes, {weights} weights) to {output}\n"
               f"next: ns-data label IMAGES... --teacher {output} --output LABELS")


def format_results(results: dict, output: str) -> str:
    lines = [f"ns-train: step {results['step']:,} of {results['total_steps']:,}"
             + ("" if results["finished"] else " (stopped early; re-run to resume)")]
    lines.append(f"  {results['epochs']:g} epochs of the {results['epoch_of']} set ({results['epoch_records']:,} "
                 f"records, {results['steps_per_epoch']:g} steps each)")
    for key in ("eval", "eval_ema"):
        if key in results:
            r = results[key]
            lines.append(f"  {key.replace('_', ' ')}: top-1 {r['top1']:.4f}  top-5 {r['top5']:.4f}  "
                         f"loss {r['loss']:.4f}  ({r['images']:,} images)")
    lines.append(f"output: {output} ({', '.join(TRAIN_RUN.files)})")
    return "\n".join(lines)
