"""ns-data: build Noisy Student pseudo-label corpora at scale (Apache Beam + Arrow)."""
import re

from setuptools import find_packages, setup

# The version is written once, in ns_data/__init__.py.
VERSION = re.search(r'^__version__ = "([^"]+)"$', open("ns_data/__init__.py", encoding="utf-8").read(), re.M).group(1)

setup(
    name="ns-data",
    version=VERSION,
    description="Data engineering for Noisy Student self-training: pseudo labels, balanced selection, shards.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ns_data", "ns_data.*", "ns_train", "ns_train.*", "pipelines", "pipelines.*"]),
    # What `balance` and `synth` need; no torch, no tensorflow.
    install_requires=[
        "apache-beam>=2.77.0,<3",
        "pyarrow>=14",
        "numpy>=1.26",
        "pandas>=2.0",
        "click>=8.1",
        "pillow>=10",
        "google-crc32c>=1.5",
    ],
    extras_require={
        # Dataflow: GCS filesystem and the Dataflow runner client.
        "gcp": ["apache-beam[gcp]>=2.77.0,<3"],
        # Teacher inference (`ns-data label`); no TensorFlow anywhere near it.
        "label": ["torch>=2.1", "torchvision>=0.16", "timm>=1.0", "safetensors>=0.4"],
        # The trainer (`ns-train`): the label extra's stack plus YAML configs, a progress bar, and torchdata's
        # StatefulDataLoader (a resumed run goes on from the next batch).
        "train": ["torch>=2.1", "torchvision>=0.16", "timm>=1.0", "safetensors>=0.4", "pyyaml>=6", "tqdm>=4.60",
                  "torchdata>=0.11"],
        # `make demo`'s real images: scikit-learn ships the handwritten digits dataset.
        "demo": ["scikit-learn>=1.3"],
        # tf.data reader of shards (`ns_data.tf_data`); never imported by label or the PyTorch reader.
        "tf": ["tensorflow-cpu>=2.16"],
        # Tests; Playwright drives the system chromium (tests/browser.py) and never downloads a browser; a local GCS
        # emulator serves tests/test_scale.py's object-store runs.
        "test": ["pytest>=8", "playwright>=1.45", "gcp-storage-emulator>=2026.7"],
        # `ns-data report`: plots of every output in one HTML page.
        "report": ["matplotlib>=3.7"],
        # Benchmarks compare against DuckDB and measure peak memory; the scale rehearsal counts requests to a local
        # GCS emulator.
        "bench": ["duckdb>=1.1", "psutil>=5.9", "gcp-storage-emulator>=2026.7"],
    },
    entry_points={"console_scripts": ["ns-data=ns_data.cli:main", "ns-train=ns_train.cli:main"]},
)
