"""Beam entry points, one per stage: what a Dataflow launch or a Flex Template calls (`python -m pipelines.balance
...`, `docker/flex/`)."""
from __future__ import annotations

import sys

# A Flex Template passes the inputs as one parameter, `--inputs=A,B` (a template parameter has a name).
INPUTS = "inputs"
TRUE, FALSE = ("true", "yes", "1"), ("false", "no", "0")


def run_command(stage: str, argv: list[str] | None) -> None:
    """Runs `ns-data <stage>` with `argv` (default: this process's arguments): the same parsing as the CLI, so
    the entry points and the commands never drift apart. Arguments spelled as a Flex Template passes them are
    accepted too (`from_template`). Run as the process's entry point (`argv` None), a user's error (a StageError,
    an option neither the command nor Beam declares, a filesystem error, a full disk) is one line, `Error: ...`,
    exit status 1, as `ns-data` prints it (`ns_data.console.one_line`)."""
    import click

    from ns_data import cli
    from ns_data.console import one_line, output_arg

    command = getattr(cli, stage)
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        args = from_template(command, args)
        command.main(args=args, prog_name=f"pipelines.{stage}", standalone_mode=False)
    except Exception as err:
        line = None if argv is not None else one_line(err, output_arg(args))
        if line is None:
            raise
        click.echo(f"Error: {line}", err=True)
        sys.exit(1)


def from_template(command, argv: list[str]) -> list[str]:
    """The command's own spelling of the arguments a Flex Template launch passes.

    The template launcher passes every parameter as `--NAME=VALUE`, with the names the templates' metadata
    (`docker/flex/<stage>-metadata.json`) declares: `inputs` (comma-separated) for the command's INPUT...
    arguments, and each option under its Python name with booleans as true/false (`--per_class=5`,
    `--overwrite=true`, `--upsample=false`). They become `A B --per-class=5 --overwrite --no-upsample`;
    everything else (the command's own spelling, Beam's options) passes unchanged, in order.
    """
    import click

    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    inputs: list[str] = []
    out: list[str] = []
    for arg in argv:
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if eq and name == INPUTS:
            inputs += [v.strip() for v in value.split(",") if v.strip()]
        elif eq and name in options:
            out += _spell(options[name], value)
        else:
            out.append(arg)
    return inputs + out


def _spell(option, value: str) -> list[str]:
    import click

    if not option.is_flag:
        return [f"{option.opts[0]}={value}"]
    word = value.strip().lower()
    if word not in TRUE + FALSE:
        raise click.BadParameter(f"{value!r} is neither true nor false", param_hint=f"--{option.name}")
    if word in TRUE:
        return [option.opts[0]]
    return [option.secondary_opts[0]] if option.secondary_opts else []
