"""Beam entry points, one per stage: what a Dataflow launch calls (`python -m pipelines.balance ...`)."""
from __future__ import annotations

import sys


def run_command(stage: str, argv: list[str] | None) -> None:
    """Runs `ns-data <stage>` with `argv` (default: this process's arguments): the same parsing as the CLI, so
    the entry points and the commands never drift apart."""
    from ns_data import cli

    command = getattr(cli, stage)
    command.main(args=list(sys.argv[1:] if argv is None else argv), prog_name=f"pipelines.{stage}",
                 standalone_mode=False)
