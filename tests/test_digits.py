"""The demo's data: scikit-learn's digits split into labeled, unlabeled (with an answer key) and test sets."""
from __future__ import annotations

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ns_data.readers import ShardDataset
from ns_train import digits


def records(directory) -> list[tuple[bytes, int]]:
    return [(r["image"], r["label"]) for r in ShardDataset(str(directory))]


def test_a_split_is_disjoint_and_complete(tmp_path):
    sizes = digits.write_split(str(tmp_path), seed=3, labeled_per_class=2, test_size=100, size=16)
    labeled, test = records(tmp_path / "labeled"), records(tmp_path / "test")
    key = pq.read_table(tmp_path / "unlabeled-labels.parquet").to_pandas()
    files = sorted(p.name for p in (tmp_path / "unlabeled").iterdir())
    assert sizes == {"labeled": 20, "unlabeled": 1797 - 20 - 100, "test": 100}
    assert sorted(label for _, label in labeled) == sorted(list(range(10)) * 2)
    assert len(test) == 100 and sorted(key.id) == files and len(files) == sizes["unlabeled"]
    images = [image for image, _ in labeled + test] + [(tmp_path / "unlabeled" / f).read_bytes() for f in files]
    assert len(images) == 1797  # every digit once (a few scans are identical, so bytes are not compared)
    assert all(Image.open(io.BytesIO(image)).size == (16, 16) for image in images)  # 8x8 scans, upscaled


def test_an_existing_split_of_other_settings_is_refused(tmp_path, capsys):
    assert digits.main(["--output", str(tmp_path), "--seeds", "0", "--size", "8", "--test-size", "50"]) == 0
    assert digits.main(["--output", str(tmp_path), "--seeds", "0", "--size", "8", "--test-size", "50"]) == 0
    assert "already written" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="holds a split of other settings"):
        digits.main(["--output", str(tmp_path), "--seeds", "0", "--size", "8", "--test-size", "60"])
