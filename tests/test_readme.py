"""The README's runnable blocks, run as they are written: "Your own images" on the digits written as a user's
corpus, and the Quick start's `make demo-synth`. A README that drifts from the code fails here."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def readme_blocks(section: str) -> list[str]:
    """The ```bash blocks of one `## section` of README.md."""
    text = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    match = re.search(rf"^## {re.escape(section)}\n(.*?)(?=^## |\Z)", text, re.S | re.M)
    assert match, f"README.md has no section '## {section}'"
    return re.findall(r"```bash\n(.*?)```", match.group(1), re.S)


def commands(block: str) -> list[str]:
    """A block's command lines, without comments; continuation lines joined."""
    lines = [line.split(" #")[0].rstrip() for line in block.replace("\\\n", " ").splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def run(command: str, cwd, env) -> subprocess.CompletedProcess:
    done = subprocess.run(command, shell=True, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"{command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def test_the_your_own_images_block_runs_as_written(tmp_path):
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ["PATH"])
    # The user's corpus: labeled TFRecord shards and a folder of unlabeled images (the digits, 2 labeled per class).
    subprocess.run([sys.executable, "-m", "ns_train.digits", "--output", str(tmp_path / "data"), "--seeds", "0",
                    "--labeled-per-class", "2"], check=True, capture_output=True, cwd=ROOT)
    for name in ("labeled", "unlabeled"):
        shutil.move(str(tmp_path / "data" / "seed-0" / name), str(tmp_path / name))
    block = readme_blocks("Your own images")[0]
    printed = {}
    for command in commands(block):
        printed[command.split(" --")[0]] = run(command, tmp_path, env).stdout
    assert (tmp_path / "student.safetensors").is_file()
    label = next(out for cmd, out in printed.items() if cmd.startswith("ns-data label"))
    assert re.search(r"label: 1,277 images read = 1,277 labeled \+ 0 errors", label), label
    manifest = (tmp_path / "work" / "shards" / "manifest.json").read_text()
    assert '"records"' in manifest


def test_the_quick_start_demo_synth_runs(tmp_path):
    quick = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert "`make demo-synth`" in quick and "`make demo`" in quick
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    out = tmp_path / "demo"
    run(f"{make} -s demo-synth BIN={BIN} DEMO_DIR={out}", ROOT, dict(os.environ))
    assert (tmp_path / "demo-synth" / "report.html").is_file()
    assert (tmp_path / "demo-synth" / "shards" / "manifest.json").is_file()
