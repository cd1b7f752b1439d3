"""`label --pretrained` (timm's weights through the Hugging Face hub cache, nothing downloaded: the cache is
built here, offline) and class names (timm's ImageNet names, `--class-names`) through label, balance, shard and
inspect."""
from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import timm
import torch
from click.testing import CliRunner

from ns_data import teacher as teacher_mod
from ns_data.contract import footer_teacher, teacher_digest
from ns_data.cli import main
from ns_data.label import LabelOptions, format_summary, prepare, run_label
from ns_data.stage import OutputExists
from ns_data.teacher import TeacherError, TeacherSpec
from tests.test_label import encode, photo, write_dir

MODEL = "test_efficientnet"
HUB_NAME = "test_efficientnet.r160_in1k"  # timm's pretrained_cfg: hf_hub_id timm/test_efficientnet.r160_in1k
REPO_DIR = "models--timm--test_efficientnet.r160_in1k"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_snapshot(cache, commit: str, seed: int) -> str:
    """A snapshot of the repository in a Hugging Face hub cache, laid out as huggingface_hub writes it (refs/main
    names the commit; snapshots/<commit>/model.safetensors, the file timm asks for first), with weights of our
    own: a 1000-class test_efficientnet, seeded, with a sharpened head so that labels differ between images."""
    from safetensors.torch import save_file

    repo = cache / REPO_DIR
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "snapshots" / commit).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = timm.create_model(MODEL, pretrained=False).eval()
    with torch.no_grad():
        model.get_classifier().weight.mul_(40)
    path = repo / "snapshots" / commit / "model.safetensors"
    save_file(model.state_dict(), str(path))
    (repo / "refs" / "main").write_text(commit)
    return str(path)


@pytest.fixture
def hub_cache(tmp_path):
    cache = tmp_path / "hf" / "hub"
    return cache, save_snapshot(cache, COMMIT, seed=1)


@pytest.fixture
def offline(hub_cache, monkeypatch):
    """The hub cache of `hub_cache`, offline, for calls in this process (huggingface_hub read its environment
    variables when it was imported: its constants are patched instead)."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache[0]))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    teacher_mod._BUILT.clear()
    yield hub_cache
    teacher_mod._BUILT.clear()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    return write_dir(d, {f"img{i}.jpg": encode(photo(i, (64 + 8 * i, 48))) for i in range(6)})


def cli(args, cache, tmp_path):
    """`ns-data ARGS` in a child process, as a user runs it: HF_HUB_CACHE and HF_HUB_OFFLINE in its
    environment."""
    env = dict(os.environ, HF_HUB_CACHE=str(cache), HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=ROOT)
    env.pop("HF_TOKEN", None)
    return subprocess.run([sys.executable, "-m", "ns_data.cli", *args], env=env, capture_output=True, text=True,
                          cwd=str(tmp_path), timeout=600)


def read_labels(output):
    table = pq.read_table(sorted(glob.glob(os.path.join(str(output), "labels-*.parquet"))))
    return table.to_pandas().sort_values("id").reset_index(drop=True)


def test_pretrained_teacher_loads_from_the_hub_cache_like_the_same_file_as_checkpoint(tmp_path, hub_cache,
                                                                                      image_dir):
    cache, weights = hub_cache
    result = cli(["label", image_dir, "--teacher", HUB_NAME, "--pretrained", "--output", str(tmp_path / "hub"),
                  "--batch-size", "4", "--topk", "3", "--no-progress"], cache, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "names from timm imagenet-1k" in result.stdout
    assert f"weights: hf://timm/{HUB_NAME}@{COMMIT}/model.safetensors" in result.stdout
    stats, _ = run_label(LabelOptions(inputs=(image_dir,), output=str(tmp_path / "file"), teacher=MODEL,
                                      checkpoint=weights, batch_size=4, topk=3), [], echo=lambda m: None)
    hub, local = read_labels(tmp_path / "hub"), read_labels(tmp_path / "file")
    assert hub["id"].tolist() == local["id"].tolist() and len(hub) == 6
    assert hub["label"].tolist() == local["label"].tolist()
    assert len(set(hub["label"])) > 1  # the sharpened head tells the images apart
    np.testing.assert_allclose(hub["confidence"], local["confidence"], rtol=1e-5)
    assert hub["topk_classes"].map(list).tolist() == local["topk_classes"].map(list).tolist()

    recorded = json.loads((tmp_path / "hub" / "stats.json").read_text())["teacher"]
    meta = json.loads(pq.read_schema(glob.glob(str(tmp_path / "hub" / "labels-*.parquet"))[0])
                      .metadata[b"ns_data.teacher"])
    assert meta == footer_teacher(recorded)
    assert recorded["model"] == HUB_NAME and not recorded["random_weights"]
    assert recorded["pretrained"] == {"hub_id": f"timm/{HUB_NAME}", "revision": COMMIT, "file": "model.safetensors",
                                      "tag": "r160_in1k"}
    assert recorded["checkpoint"] == f"hf://timm/{HUB_NAME}@{COMMIT}/model.safetensors"
    assert recorded["checkpoint_sha256"] == stats["teacher"]["checkpoint_sha256"]  # the digest of the same file
    assert recorded["preprocessing"] == stats["teacher"]["preprocessing"]
    assert recorded["class_names"][258] == "Samoyed" and recorded["class_names_from"] == "timm imagenet-1k"


def test_pretrained_weights_not_in_the_cache_are_one_clean_error(tmp_path, hub_cache, image_dir):
    cache, _ = hub_cache
    result = cli(["label", image_dir, "--teacher", "test_resnet.r160_in1k", "--pretrained", "--output",
                  str(tmp_path / "out"), "--no-progress"], cache, tmp_path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"Error: --pretrained test_resnet.r160_in1k: the weights (timm/test_resnet.r160_in1k, "
                     f"model.safetensors or pytorch_model.bin) are not in the Hugging Face cache {cache} and "
                     "HF_HUB_OFFLINE is set"], result.stderr
    assert "Traceback" not in result.stderr + result.stdout and not (tmp_path / "out").exists()


@pytest.mark.parametrize("args,message", [
    (["--teacher", HUB_NAME, "--pretrained", "--checkpoint", "w.safetensors"], "--pretrained and --checkpoint"),
    (["--teacher", HUB_NAME, "--pretrained", "--random-weights"], "--pretrained and --random-weights"),
    (["--teacher", "beit3_giant_patch14_224", "--pretrained"], "timm has no weights on the Hugging Face hub"),
    (["--teacher", "test_efficientnet.no_such_tag", "--pretrained"], "unknown pretrained tag"),
    (["--teacher", HUB_NAME, "--pretrained", "--num-classes", "10"], "has 1000 classes"),
])
def test_pretrained_option_errors_are_one_line(tmp_path, offline, image_dir, args, message):
    result = CliRunner().invoke(main, ["label", image_dir, *args, "--output", str(tmp_path / "out"),
                                       "--no-progress"])
    assert result.exit_code == 1 and message in result.output, result.output
    assert result.output.count("\n") == 1 and result.output.startswith("Error: ")


def test_new_weights_change_the_fingerprint_and_workers_check_them(tmp_path, offline, image_dir):
    cache, _ = offline
    opts = LabelOptions(inputs=(image_dir,), output=str(tmp_path / "out"), teacher=HUB_NAME, pretrained=True,
                        batch_size=4, max_images=2)
    first, wrote = run_label(opts, [], echo=lambda m: None)
    assert wrote and prepare(opts) is None  # the same command again: already complete
    spec = opts.teacher_spec()

    # The hub moves on to a commit with the same file: same weights, nothing to do, and a worker accepts it.
    other = "f" * 40
    (cache / REPO_DIR / "snapshots" / other).mkdir()
    (cache / REPO_DIR / "snapshots" / other / "model.safetensors").write_bytes(
        (cache / REPO_DIR / "snapshots" / COMMIT / "model.safetensors").read_bytes())
    (cache / REPO_DIR / "refs" / "main").write_text(other)
    teacher_mod._BUILT.clear()
    teacher_mod.check_same_weights(spec, first["teacher"])

    # Then to new weights: another fingerprint, and a worker that resolves them refuses to label.
    save_snapshot(cache, "e" * 40, seed=2)
    teacher_mod._BUILT.clear()
    with pytest.raises(TeacherError, match="not those the run was launched with"):
        teacher_mod.check_same_weights(spec, first["teacher"])
    with pytest.raises(OutputExists, match="other inputs or options"):
        prepare(opts)


# ------------------------------------------------------------------------------------------- class names


def test_an_imagenet_head_records_imagenet_names_and_another_none(tmp_path, image_dir):
    imagenet = teacher_mod.check_teacher(TeacherSpec(model=MODEL, random_weights=True))
    assert imagenet["num_classes"] == 1000 and len(imagenet["class_names"]) == 1000
    assert imagenet["class_names"][258] == "Samoyed" and imagenet["class_names"][0] == "tench"
    assert imagenet["class_names_from"] == "timm imagenet-1k"
    ten = teacher_mod.check_teacher(TeacherSpec(model=MODEL, random_weights=True, num_classes=10))
    assert ten["class_names"] is None and ten["class_names_from"] is None
    stats, _ = run_label(LabelOptions(inputs=(image_dir,), output=str(tmp_path / "l"), teacher=MODEL,
                                      random_weights=True, batch_size=4, max_images=2), [], echo=lambda m: None)
    assert stats["teacher"]["class_names"][258] == "Samoyed"
    assert "names from timm imagenet-1k" in format_summary(stats, "l")


NAMES = ["cat", "dog", "bird", "fish", "horse", "frog", "deer", "ship", "truck", "plane"]


def test_class_names_file_travels_to_balance_shard_and_inspect(tmp_path, image_dir):
    (tmp_path / "names.txt").write_text("\n".join(NAMES) + "\n\n")  # a trailing blank line is no class
    runner = CliRunner()
    result = runner.invoke(main, ["label", image_dir, "--teacher", MODEL, "--random-weights", "--num-classes",
                                  "10", "--class-names", str(tmp_path / "names.txt"), "--output",
                                  str(tmp_path / "l"), "--batch-size", "4", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"names from {tmp_path / 'names.txt'}" in result.output
    labels = json.loads((tmp_path / "l" / "stats.json").read_text())
    assert labels["teacher"]["class_names"] == NAMES

    result = runner.invoke(main, ["balance", str(tmp_path / "l"), "--output", str(tmp_path / "s"), "--per-class",
                                  "2", "--min-confidence", "0", "--no-progress"])
    assert result.exit_code == 0, result.output
    selection = json.loads((tmp_path / "s" / "stats.json").read_text())
    assert selection["teacher"] == labels["teacher"]  # recorded once, from the input's stats.json
    smallest = re.findall(r"(\d+) (\w+) \(\d+ rows\)", result.output.split("smallest classes: ")[1].splitlines()[0])
    assert smallest and all(NAMES[int(label)] == name for label, name in smallest)
    for data in glob.glob(str(tmp_path / "l" / "labels-*.parquet")) + glob.glob(str(tmp_path / "s" / "*.parquet")):
        meta = json.loads(pq.read_schema(data).metadata[b"ns_data.teacher"])  # in brief: no names in a footer
        assert meta == {"model": MODEL, "num_classes": 10, "identity_sha256": teacher_digest(labels["teacher"])}

    result = runner.invoke(main, ["shard", str(tmp_path / "s"), "--output", str(tmp_path / "sh"), "--num-shards",
                                  "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "sh" / "manifest.json").read_text())
    assert manifest["teacher"]["class_names"] == NAMES
    assert "records per class: min" in result.output and any(f" {n})" in result.output for n in NAMES)

    result = runner.invoke(main, ["inspect", str(tmp_path / "sh"), "--records", "2"])
    assert result.exit_code == 0, result.output
    records = [line for line in result.output.splitlines() if "#" in line and "label" in line]
    assert len(records) == 2
    for line in records:
        label = int(line.split("label ")[1].split()[0])
        assert f"label {label} {NAMES[label]}  prob" in line
        assert f"top {label} {NAMES[label]}:" in line

    upper = tmp_path / "upper.json"  # --class-names overrides the recorded names (a JSON object this time)
    upper.write_text(json.dumps({str(i): n.upper() for i, n in enumerate(NAMES)}))
    result = runner.invoke(main, ["inspect", str(tmp_path / "sh"), "--records", "1", "--class-names", str(upper)])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if "#" in line and "label" in line)
    label = int(line.split("label ")[1].split()[0])
    assert f"label {label} {NAMES[label].upper()}  prob" in line

    upper.write_text(json.dumps(NAMES[:3]))
    result = runner.invoke(main, ["inspect", str(tmp_path / "sh"), "--class-names", str(upper)])
    assert result.exit_code == 1
    assert result.output == f"Error: --class-names {upper}: 3 names for a teacher of 10 classes\n"


def test_a_class_names_file_of_the_wrong_count_is_one_line_before_any_work(tmp_path, image_dir):
    (tmp_path / "names.txt").write_text("\n".join(NAMES[:7]))
    result = CliRunner().invoke(main, ["label", image_dir, "--teacher", MODEL, "--random-weights", "--num-classes",
                                       "10", "--class-names", str(tmp_path / "names.txt"), "--output",
                                       str(tmp_path / "l"), "--no-progress"])
    assert result.exit_code == 1, result.output
    assert result.output == f"Error: --class-names {tmp_path / 'names.txt'}: 7 names for a teacher of 10 classes\n"
    assert not (tmp_path / "l").exists()
    result = CliRunner().invoke(main, ["label", image_dir, "--teacher", MODEL, "--random-weights", "--class-names",
                                       str(tmp_path / "missing.txt"), "--output", str(tmp_path / "l")])
    assert result.exit_code == 1 and result.output.count("\n") == 1 and "file not found" in result.output


def test_class_names_files_of_every_form(tmp_path):
    from ns_data import class_names

    (tmp_path / "a.txt").write_text("\ufefftench\ngoldfish\n")
    assert class_names.read_file(str(tmp_path / "a.txt"), 2) == ["tench", "goldfish"]
    (tmp_path / "b.json").write_text(json.dumps({"0": ["n01440764", "tench"], "2": "shark"}))  # Keras' form
    assert class_names.read_file(str(tmp_path / "b.json"), 4) == ["tench", "", "shark", ""]
    with pytest.raises(ValueError, match="names class 2, but the teacher has 2 classes"):
        class_names.read_file(str(tmp_path / "b.json"), 2)
    (tmp_path / "c.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not valid JSON"):
        class_names.read_file(str(tmp_path / "c.json"))
    assert class_names.display(2, ["a", "", "c"]) == "2 c" and class_names.display(1, ["a", "", "c"]) == "1"
    assert class_names.display(7, None) == "7" and class_names.display(np.int64(0), ["a"]) == "0 a"
