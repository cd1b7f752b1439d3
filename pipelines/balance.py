"""Entry point of the balance stage: `python -m pipelines.balance INPUT... --output DIR [beam options]`.

Same arguments as `ns-data balance`.
"""
from __future__ import annotations

from pipelines import run_command


def run(argv: list[str] | None = None) -> None:
    run_command("balance", argv)


if __name__ == "__main__":
    run()
