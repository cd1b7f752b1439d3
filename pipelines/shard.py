"""Entry point of the shard stage: `python -m pipelines.shard SELECTION... --output DIR [beam options]`.

Same arguments as `ns-data shard`.
"""
from __future__ import annotations

from pipelines import run_command


def run(argv: list[str] | None = None) -> None:
    run_command("shard", argv)


if __name__ == "__main__":
    run()
