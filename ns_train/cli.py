"""The `ns-train` command line: `train`, `eval` and `export` (ns_train.commands), and `loop` (whole Noisy Student
iterations from one YAML file, ns_train.loop). Every user error (bad config, missing shards, no run, an output in
the way) is one line, `Error: ...`."""
from __future__ import annotations

import sys

import click

from ns_data.console import OneLineErrors, quiet_logging
from ns_train import commands
from ns_train.loop import run_loop


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ns-data")
def main() -> None:
    """Train Noisy Student teachers and students on TFRecord shards (labeled + `ns-data shard` output)."""
    quiet_logging()


main.add_command(commands.train)
main.add_command(commands.eval_command)
main.add_command(commands.export)


@main.command()
@click.argument("config", type=click.Path(dir_okay=False))
@click.option("--output", default=None, type=click.Path(file_okay=False),
              help="Replaces the config's `output` (relative to the working directory).")
def loop(config, output) -> None:
    """Noisy Student's iterations from one YAML file: label -> balance -> shard -> train -> export per
    iteration. Re-run the same command after a crash: complete steps are skipped, an interrupted one resumes."""
    summary = run_loop(config, output, echo=lambda m: click.echo(m, err=True))
    click.echo(summary["table"] + f"\nresults: {', '.join(summary['files'])}")


if __name__ == "__main__":
    sys.exit(main())
