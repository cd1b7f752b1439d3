"""Entry point of the label stage: `python -m pipelines.label INPUT... --teacher MODEL --output DIR [beam options]`.

Same arguments as `ns-data label`; parsed by the same command so the two never drift apart.
"""
from __future__ import annotations

import sys


def run(argv: list[str] | None = None) -> None:
    from ns_data.cli import label

    label.main(args=list(sys.argv[1:] if argv is None else argv), prog_name="pipelines.label", standalone_mode=False)


if __name__ == "__main__":
    run()
