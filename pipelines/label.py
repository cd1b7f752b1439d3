"""Entry point of the label stage: `python -m pipelines.label INPUT... --teacher MODEL --output DIR [beam options]`.

Same arguments as `ns-data label`.
"""
from __future__ import annotations

from pipelines import run_command


def run(argv: list[str] | None = None) -> None:
    run_command("label", argv)


if __name__ == "__main__":
    run()
