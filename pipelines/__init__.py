"""Beam entry points, one per stage: what a Dataflow launch calls (`python -m pipelines.balance ...`)."""
