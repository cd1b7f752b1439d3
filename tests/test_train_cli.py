"""`ns-train` on the command line: every user error is one line without a traceback (exit 1), and a run
directory or an export file follows the output policy of every ns-data command (--overwrite)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from ns_data import contract, outputs
from ns_train.cli import main
from tests.test_train import CLASSES, MODEL, picture, write_shards

TINY = ["--model", MODEL, "--num-classes", str(CLASSES), "--image-size", "32", "--crop-pct", "1.0", "--steps", "2",
        "--batch-size", "4", "--workers", "0", "--no-progress", "--ema-decay", "0"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Labeled shards, a finished 2-step run on them, and an unfinished `ns-data shard` output."""
    root = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    labeled = write_shards(root / "labeled", [{"image/encoded": picture(i % CLASSES, rng), "label": i % CLASSES}
                                              for i in range(8)])
    unfinished = write_shards(root / "unfinished", [{"image/encoded": picture(0, rng), "label": 0, "prob": 0.9}] * 4)
    (root / "unfinished" / contract.SHARDS.tmp_name).mkdir()
    (root / "unfinished" / contract.SHARDS.tmp_name / outputs.PLAN).write_text("{}")
    run = str(root / "run")
    result = CliRunner().invoke(main, ["train", "--output", run, "--labeled", labeled, *TINY])
    assert result.exit_code == 0, result.output
    (root / "bad.yaml").write_text("labeled: x\nlearning_rate: 1\n")
    (root / "broken.yaml").write_text("labeled: [x\n")
    return {"root": root, "labeled": labeled, "unfinished": unfinished, "run": run}


def one_line_error(args: list[str]) -> str:
    result = CliRunner().invoke(main, args)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, result.output
    return lines[0]


CASES = {
    "eval of no run": (lambda s: ["eval", str(s["root"]), "--shards", s["labeled"]], "not a ns-train run directory"),
    "export of no run": (lambda s: ["export", str(s["root"]), "--output", str(s["root"] / "t.safetensors")],
                         "not a ns-train run directory"),
    "eval on missing shards": (lambda s: ["eval", s["run"], "--shards", str(s["root"] / "none")], "no shards at"),
    "missing labeled shards": (lambda s: ["train", "--output", str(s["root"] / "r"), "--labeled",
                                          str(s["root"] / "none"), *TINY], "no shards at"),
    "unfinished unlabeled shards": (lambda s: ["train", "--output", str(s["root"] / "r"), "--labeled", s["labeled"],
                                               "--unlabeled", s["unfinished"], *TINY], "unfinished shard run"),
    "option out of range": (lambda s: ["train", "--output", str(s["root"] / "r"), "--labeled", s["labeled"],
                                       *TINY, "--dropout", "1.5"], "out of range: dropout=1.5"),
    "unknown model": (lambda s: ["train", "--output", str(s["root"] / "r"), "--labeled", s["labeled"], *TINY,
                                 "--model", "no_such_model"], "unknown timm model"),
    "unknown config key": (lambda s: ["train", "--output", str(s["root"] / "r"), "--config",
                                      str(s["root"] / "bad.yaml")], "unknown keys"),
    "config not YAML": (lambda s: ["train", "--output", str(s["root"] / "r"), "--config",
                                   str(s["root"] / "broken.yaml")], "not valid YAML"),
    "missing config": (lambda s: ["train", "--output", str(s["root"] / "r"), "--config",
                                  str(s["root"] / "none.yaml")], "No such file"),
    "option spelled with underscores": (lambda s: ["train", "--output", str(s["root"] / "r"), "--labeled",
                                                   s["labeled"], *TINY, "--batch_size", "4"],
                                        "train: no such option --batch_size: did you mean --batch-size?"),
    "misspelled option": (lambda s: ["train", "--output", str(s["root"] / "r"), "--labeled", s["labeled"], *TINY,
                                     "--weight-decy", "0"],
                          "no such option --weight-decy: did you mean --weight-decay?"),
    "another command's option": (lambda s: ["train", "--output", str(s["root"] / "r"), "--labeled", s["labeled"],
                                            "--per_class", "100", *TINY], "train: no such option --per_class"),
    "eval option misspelled": (lambda s: ["eval", s["run"], "--shards", s["labeled"], "--weight", "ema"],
                               "eval: no such option --weight: did you mean --weights?"),
    "missing required option": (lambda s: ["train", "--labeled", s["labeled"]], "Missing option '--output'"),
    "export to another format": (lambda s: ["export", s["run"], "--output", str(s["root"] / "t.pt")],
                                 "must end in .safetensors"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_user_error_is_one_line(setup, case):
    args, expected = CASES[case]
    assert expected in one_line_error(args(setup))
    assert not (setup["root"] / "r").exists()  # refused before the output was touched


def test_the_installed_command_prints_nothing_but_the_error(tmp_path):
    """As a user runs it: nothing logged while importing (Beam's noise), no traceback, one line."""
    ns_train = os.path.join(os.path.dirname(sys.executable), "ns-train")
    done = subprocess.run([ns_train, "eval", str(tmp_path), "--shards", str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [f"Error: {tmp_path} has no checkpoint.pt: not a ns-train run directory"]


def test_a_finished_run_is_not_trained_again_nor_replaced_without_overwrite(setup):
    results = json.loads(open(f"{setup['run']}/results.json").read())
    again = CliRunner().invoke(main, ["train", "--output", setup["run"], "--labeled", setup["labeled"], *TINY,
                                      "--log-every", "7"])  # bookkeeping options may differ
    assert again.exit_code == 0, again.output
    assert outputs.already_complete(setup["run"]) in again.output and "step 2 of 2" in again.output
    assert json.loads(open(f"{setup['run']}/results.json").read()) == results
    error = one_line_error(["train", "--output", setup["run"], "--labeled", setup["labeled"], *TINY, "--lr", "0.5"])
    assert "pass --overwrite" in error


def test_export_replaces_a_file_only_with_overwrite(setup, tmp_path):
    teacher = tmp_path / "teacher.safetensors"
    teacher.write_bytes(b"something else")
    assert "already exists; pass --overwrite" in one_line_error(["export", setup["run"], "--output", str(teacher)])
    assert teacher.read_bytes() == b"something else"
    done = CliRunner().invoke(main, ["export", setup["run"], "--output", str(teacher), "--overwrite"])
    assert done.exit_code == 0, done.output
    from ns_data.teacher import exported_teacher

    assert exported_teacher(str(teacher))["model"] == MODEL
    assert [p.name for p in tmp_path.iterdir()] == ["teacher.safetensors"]  # no temporary file left


def test_train_overwrite_replaces_a_run_of_another_config(setup, tmp_path):
    run = str(tmp_path / "run")
    first = CliRunner().invoke(main, ["train", "--output", run, "--labeled", setup["labeled"], *TINY])
    assert first.exit_code == 0, first.output
    other = CliRunner().invoke(main, ["train", "--output", run, "--labeled", setup["labeled"], *TINY, "--steps", "3",
                                      "--overwrite"])
    assert other.exit_code == 0 and "step 3 of 3" in other.output, other.output


def test_the_epochs_unit_is_in_the_help_and_the_plan_is_printed(setup, tmp_path):
    help_text = " ".join(CliRunner().invoke(main, ["train", "--help"]).output.split())
    assert "--epochs FLOAT Epochs of the unlabeled set when there is one (the labeled set cycles), else of the " \
           "labeled set. (default: 10.0)" in help_text
    assert "--warmup-epochs FLOAT Linear warmup, in epochs (as --epochs)." in help_text
    args = [arg for arg in TINY if arg not in ("--steps", "2")]
    result = CliRunner().invoke(main, ["train", "--output", str(tmp_path / "run"), "--labeled", setup["labeled"],
                                       *args, "--epochs", "1.5", "--batch-size", "3"])  # 8 records, 3 a step
    assert result.exit_code == 0, result.output
    assert "training 4 steps: 1.5 epochs of the labeled set (8 records, 2.66667 steps each)" in result.output
    assert "  1.5 epochs of the labeled set (8 records, 2.66667 steps each)" in result.output


def test_every_option_of_both_command_lines_has_a_help_line_and_train_groups_them():
    import click

    from ns_data.cli import main as ns_data_main
    from ns_train.cli import main as ns_train_main
    from ns_train.config import FIELDS, group_of

    def options(group, prefix):
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                yield from options(command, f"{prefix} {name}")
            else:
                yield from ((f"{prefix} {name}", p) for p in command.params if isinstance(p, click.Option))

    missing = [(cmd, p.opts[0]) for cmd, p in [*options(ns_data_main, "ns-data"), *options(ns_train_main, "ns-train")]
               if not p.help]
    assert missing == []
    text = CliRunner().invoke(ns_train_main, ["train", "--help"]).output
    for section in ("Data options:", "Model options:", "Noise options:", "Optimizer options:", "Schedule options:",
                    "Output options:"):
        assert section in text
    assert text.index("Noise options:") < text.index("--dropout FLOAT") < text.index("Optimizer options:")
    assert {group_of(name) for name in FIELDS} >= {"data", "noise", "optimizer", "schedule", "output"}


@pytest.fixture(scope="module")
def unfinished_run(setup):
    """A run stopped after 1 of 3 steps, as a kill leaves it: a checkpoint, no results.json."""
    from ns_train import train as train_mod
    from ns_train.config import load_config

    params = main.commands["train"].make_context("train", ["--output", "x", "--labeled", setup["labeled"], *TINY,
                                                           "--steps", "3", "--checkpoint-every", "1"]).params
    cfg = load_config(None, {k: v for k, v in params.items() if k not in ("config_path", "output", "overwrite")})
    run = str(setup["root"] / "unfinished-run")
    assert not train_mod.train(cfg, run, echo=lambda m: None, stop_after=1)["finished"]
    return run


def test_export_and_eval_refuse_an_unfinished_run_unless_allowed(setup, unfinished_run, tmp_path):
    teacher = tmp_path / "t.safetensors"
    for args in (["export", unfinished_run, "--output", str(teacher)],
                 ["eval", unfinished_run, "--shards", setup["labeled"]]):
        error = one_line_error(args)
        assert f"{unfinished_run} is an unfinished run (its checkpoint is at step 1 of 3" in error
        assert "--allow-unfinished to use step 1 of 3" in error
    assert not teacher.exists()
    done = CliRunner().invoke(main, ["export", unfinished_run, "--output", str(teacher), "--allow-unfinished"])
    assert done.exit_code == 0, done.output
    assert f"warning: {unfinished_run} is unfinished: using its checkpoint at step 1 of 3" in done.output
    from ns_data.teacher import exported_teacher

    assert exported_teacher(str(teacher))["model"] == MODEL
    done = CliRunner().invoke(main, ["eval", unfinished_run, "--shards", setup["labeled"], "--allow-unfinished"])
    assert done.exit_code == 0 and '"top1"' in done.output, done.output


def test_the_loop_never_exports_an_unfinished_run(unfinished_run, tmp_path):
    from ns_data.stage import StageError
    from ns_train.loop import Step, run_step

    teacher = str(tmp_path / "t.safetensors")
    with pytest.raises(StageError, match="teacher: export: .* is an unfinished run"):
        run_step(Step("teacher: export", "ns-train export", (unfinished_run, "--output", teacher), teacher),
                 echo=lambda m: None)
    assert not os.path.exists(teacher)


def test_a_non_finite_loss_stops_training_in_one_line_naming_the_step_and_the_run_is_not_finished(setup):
    """Poisoned soft labels (NaN top-k probabilities, written past `ns-data shard`'s checks) make the loss NaN
    from the first step: training stops there, exit 1, and no results.json calls the run finished."""
    rng = np.random.default_rng(1)
    poisoned = write_shards(setup["root"] / "poisoned", [
        {"image/encoded": picture(0, rng), "label": 0, "prob": 0.9, "topk_classes": [0, 1],
         "topk_probs": [float("nan"), 0.1]}] * 8)
    out = setup["root"] / "nan-run"
    result = CliRunner().invoke(main, ["train", "--output", str(out), "--labeled", setup["labeled"], "--unlabeled",
                                       poisoned, *TINY, "--steps", "3", "--log-every", "2", "--checkpoint-every", "2"])
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert result.exit_code == 1 and "Traceback" not in result.output and len(errors) == 1, result.output
    assert errors[0].startswith("Error: the loss is not finite (NaN or infinite) at step 1:"), result.output
    assert result.output.rstrip().splitlines()[-1] == errors[0]
    assert not (out / "results.json").exists() and not (out / "checkpoint.pt").exists()  # nothing saved
    assert "loss_total" not in (out / "metrics.jsonl").read_text()


def test_eval_names_a_bad_record_in_one_line(setup):
    rng = np.random.default_rng(2)
    records = [{"image/encoded": picture(i % CLASSES, rng), "label": i % CLASSES, "id": f"v-{i}"} for i in range(4)]
    records[2]["image/encoded"] = b""
    shards = write_shards(setup["root"] / "bad-val", records, count=1)
    error = one_line_error(["eval", setup["run"], "--shards", shards])
    assert error == f"Error: {shards}/train-00000-of-00001.tfrecord: record 2 (id v-2): empty_file", error
