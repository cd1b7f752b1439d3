"""Entry point of the shard stage: `python -m pipelines.shard SELECTION... --output DIR [beam options]`.

Same arguments as `ns-data shard`; parsed by the same command so the two never drift apart.
"""
from __future__ import annotations

import sys


def run(argv: list[str] | None = None) -> None:
    from ns_data.cli import shard

    shard.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="pipelines.shard",
               standalone_mode=False)


if __name__ == "__main__":
    run()
