"""ns-data: build Noisy Student pseudo-label corpora at scale."""
__version__ = "0.1.0"
