"""The `ns-data` command line and the Beam entry point, as a user runs them."""
import json

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ns_data.cli import main
from ns_data.contract import PSEUDO_LABEL_SCHEMA as SCHEMA
from ns_data.stage import OptionsError
from pipelines import balance as balance_pipeline


def synth(tmp_path, *extra):
    out = tmp_path / "pl"
    result = CliRunner().invoke(main, ["synth", "pseudo-labels", "--rows", "5000", "--classes", "20", "--files",
                                       "3", "--topk", "4", "--output", str(out), *extra])
    assert result.exit_code == 0, result.output
    return out


def read_labels(out):
    return pq.read_table(sorted(out.glob("labels-*.parquet")))


def test_synth_writes_the_documented_schema_with_skew_and_ties(tmp_path):
    out = synth(tmp_path)
    table = read_labels(out)
    assert table.schema.remove_metadata().equals(SCHEMA)
    assert len(list(out.glob("labels-*.parquet"))) == 3 and table.num_rows == 5000
    assert json.loads((out / "stats.json").read_text())["labeled"] == 5000  # a complete label output
    counts = table.column("label").value_counts().field("counts").to_numpy()
    assert counts.max() > 4 * counts.min()  # skewed classes
    conf = table.column("confidence").to_numpy()
    assert (conf == 1.0).sum() > 50 and len(set(conf.tolist())) < 0.95 * len(conf)  # ties
    first = table.slice(0, 1).to_pylist()[0]
    assert first["topk_classes"][0] == first["label"] and first["topk_probs"][0] == first["confidence"]
    assert len(set(first["topk_classes"])) == 4
    assert b"ns_data.teacher" in table.schema.metadata
    again = synth(tmp_path, "--overwrite")
    assert read_labels(again).equals(table)  # seeded: same rows again


def test_synth_refuses_to_overwrite_silently(tmp_path):
    synth(tmp_path)
    result = CliRunner().invoke(main, ["synth", "pseudo-labels", "--rows", "10", "--output", str(tmp_path / "pl")])
    assert result.exit_code == 1 and "--overwrite" in result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output  # one line


def test_balance_command_prints_a_summary_and_passes_beam_options_through(tmp_path):
    pl = synth(tmp_path, "--invalid-fraction", "0.01")
    out = tmp_path / "sel"
    result = CliRunner().invoke(main, ["balance", str(pl), "--output", str(out), "--per-class", "200",
                                       "--no-progress", "--runner", "FnApiRunner", "--job_name", "t"])
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert f"{stats['input_rows']:,} rows read" in result.output
    assert "duplicate_id" in result.output and "per-class balance" in result.output
    assert stats["total_copies"] == 200 * len(stats["classes"])
    assert list(out.glob("errors-*.parquet"))


def test_balance_refuses_the_multi_threaded_local_runner_before_any_work(tmp_path):
    pl = synth(tmp_path)
    out = tmp_path / "sel"
    result = CliRunner().invoke(main, ["balance", str(pl), "--output", str(out), "--no-progress",
                                       "--direct_running_mode", "multi_threading", "--direct_num_workers", "2"])
    assert result.exit_code == 1 and "multi_threading is not supported" in result.output
    assert result.output.count("\n") == 1 and not out.exists()


def test_balance_command_reports_bad_options_and_inputs_clearly(tmp_path):
    pl = synth(tmp_path)
    runner = CliRunner()
    result = runner.invoke(main, ["balance", str(pl), "--output", str(tmp_path / "o"), "--per-class", "0"])
    assert result.exit_code == 1 and result.output == "Error: --per-class must be at least 1, got 0\n"
    result = runner.invoke(main, ["balance", str(tmp_path / "nope"), "--output", str(tmp_path / "o")])
    assert result.exit_code == 1 and result.output == f"Error: input not found or empty: {tmp_path / 'nope'}\n"


def test_pipeline_entry_point_runs_the_same_command(tmp_path):
    pl = synth(tmp_path)
    balance_pipeline.run([str(pl), "--output", str(tmp_path / "sel"), "--per-class", "100", "--no-progress"])
    stats = json.loads((tmp_path / "sel" / "stats.json").read_text())
    assert stats["options"]["per_class"] == 100 and stats["selected_rows"] > 0


def test_label_command_and_entry_point(tmp_path):
    from pipelines import label as label_pipeline

    images = tmp_path / "imgs"
    result = CliRunner().invoke(main, ["synth", "images", "--count", "12", "--output", str(images)])
    assert result.exit_code == 0, result.output
    result = CliRunner().invoke(main, ["label", str(images), "--teacher", "test_efficientnet", "--random-weights",
                                       "--num-classes", "5", "--output", str(tmp_path / "l"), "--batch-size", "4",
                                       "--no-progress", "--runner", "FnApiRunner"])
    assert result.exit_code == 0, result.output
    assert "12 images read = 12 labeled + 0 errors" in result.output
    stats = json.loads((tmp_path / "l" / "stats.json").read_text())
    assert stats["teacher"]["num_classes"] == 5 and stats["teacher"]["random_weights"]
    result = CliRunner().invoke(main, ["label", str(images), "--teacher", "test_efficientnet",
                                       "--output", str(tmp_path / "l2")])
    assert result.exit_code == 1 and "--checkpoint" in result.output and result.output.count("\n") == 1
    (tmp_path / "names.txt").write_text("zero\none\ntwo\n")
    label_pipeline.run([str(images), "--teacher", "test_efficientnet", "--random-weights", "--output",
                        str(tmp_path / "l3"), "--max-images", "5", "--no-progress", "--num-classes", "3",
                        "--class-names", str(tmp_path / "names.txt")])
    stats = json.loads((tmp_path / "l3" / "stats.json").read_text())
    assert stats["labeled"] == 5 and stats["teacher"]["class_names"] == ["zero", "one", "two"]
    result = CliRunner().invoke(main, ["label", str(images), "--teacher", "test_efficientnet", "--random-weights",
                                       "--output", str(tmp_path / "l4"), "--fast-decode", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "decode: fast, approximate (--fast-decode" in result.output
    stats = json.loads((tmp_path / "l4" / "stats.json").read_text())
    assert stats["options"]["fast_decode"] and stats["teacher"]["decode"]["method"] == "jpeg_dct_scaling"
    usage = CliRunner().invoke(main, ["label", "--help"]).output
    assert "--pretrained" in usage and "--class-names" in usage and "--fast-decode" in usage
    assert "--class-names" in CliRunner().invoke(main, ["inspect", "--help"]).output


def test_the_program_leaves_with_its_status_its_output_and_its_atexit_functions(tmp_path):
    """`ns-data` skips the interpreter's teardown once torch is loaded (console.leave), and loses nothing by it."""
    import subprocess
    import sys

    program = ("import atexit, sys, torch; from ns_data.cli import main; "
               "atexit.register(lambda: print('atexit ran', flush=True)); sys.argv[0] = 'ns-data'; main()")
    done = subprocess.run([sys.executable, "-c", program, "--version"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "version" in done.stdout and "atexit ran" in done.stdout
    failed = subprocess.run([sys.executable, "-c", program, "label", str(tmp_path / "nowhere"), "--teacher",
                             "no_such_model_xyz", "--random-weights", "--output", str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert failed.returncode == 1 and "Error: unknown model 'no_such_model_xyz'" in failed.stderr
    assert "atexit ran" in failed.stdout


MISSPELLED = [(["--per_class", "100"], "--per-class"), (["--per-clas", "100"], "--per-class"),
              (["--min_confidence", "0.9"], "--min-confidence")]


@pytest.mark.parametrize("stage", ["label", "balance", "shard"])
@pytest.mark.parametrize("typo, meant", MISSPELLED)
def test_an_option_neither_the_command_nor_beam_declares_is_one_line_naming_the_closest(stage, typo, meant,
                                                                                         tmp_path):
    """Unknown options are not handed to Beam to keep or drop: each stage refuses them before any output."""
    pl = synth(tmp_path)
    out = tmp_path / "out"
    teacher = ["--teacher", "test_efficientnet", "--random-weights"] if stage == "label" else []
    result = CliRunner().invoke(main, [stage, str(pl), "--output", str(out), *teacher, "--no-progress", *typo])
    assert result.exit_code == 1 and result.output.count("\n") == 1, result.output
    assert f" {stage}: no such option {typo[0]} (neither its own nor Beam's)" in result.output
    if stage == "balance":
        assert result.output.rstrip().endswith(f"did you mean {meant}?"), result.output
    assert not out.exists()


def test_beam_options_misspelled_or_out_of_place_are_refused_too(tmp_path):
    pl = synth(tmp_path)
    out = tmp_path / "out"
    base = ["balance", str(pl), "--output", str(out), "--no-progress"]
    cases = {("--direct-num-workers", "2"): "did you mean --direct_num_workers?",
             ("--runner", "FnApiRunner", "--job-nam", "t"): "did you mean --job_name?",
             ("--direct_num_workers", "two"): "invalid int value: 'two'",
             ("--runner", "FnApiRunner", str(pl)): f"unexpected argument '{pl}'"}
    for args, message in cases.items():
        result = CliRunner().invoke(main, [*base, *args])
        assert result.exit_code == 1 and result.output.count("\n") == 1 and message in result.output, result.output
    assert not out.exists()


@pytest.mark.parametrize("typo, meant", MISSPELLED)
def test_the_entry_points_refuse_unknown_options_in_one_line(typo, meant, tmp_path, monkeypatch, capsys):
    """`python -m pipelines.balance` (as a Flex Template runs it): one line, exit 1, nothing written; called with
    arguments, the error is raised."""
    pl = synth(tmp_path)
    out = tmp_path / "out"
    argv = [str(pl), "--output", str(out), "--no-progress", *typo]
    monkeypatch.setattr("sys.argv", ["pipelines/balance.py", *argv])
    with pytest.raises(SystemExit) as done:
        balance_pipeline.run()
    err = capsys.readouterr().err
    assert done.value.code == 1 and err.count("\n") == 1 and err.rstrip().endswith(f"did you mean {meant}?"), err
    with pytest.raises(OptionsError, match=f"did you mean {meant}"):
        balance_pipeline.run(argv)
    assert not out.exists()


def test_the_entry_points_print_a_filesystem_error_in_one_line(tmp_path, monkeypatch, capsys):
    """`python -m pipelines.balance` prints what `ns-data balance` prints for an output it cannot create (its
    parent is a file): one line, exit 1 (ns_data.console.one_line)."""
    pl = synth(tmp_path)
    (tmp_path / "afile").write_text("")
    argv = [str(pl), "--output", str(tmp_path / "afile" / "sel"), "--per-class", "5", "--no-progress"]
    cli = CliRunner().invoke(main, ["balance", *argv])
    assert cli.exit_code == 1 and "Error: [Errno 20] Not a directory" in cli.output, cli.output
    monkeypatch.setattr("sys.argv", ["pipelines/balance.py", *argv])
    with pytest.raises(SystemExit) as done:
        balance_pipeline.run()
    err = capsys.readouterr().err
    assert done.value.code == 1 and err.count("\n") == 1 and "Error: [Errno 20] Not a directory" in err, err
    with pytest.raises(NotADirectoryError):
        balance_pipeline.run(argv)


def test_a_users_error_met_inside_the_pipeline_is_one_error_without_beams_traceback(tmp_path):
    """An input checked inside the pipeline (here a schema that differs from the first file's) stops the run as a
    StageError: `ns-data` prints its message after `Error: `, without Beam's logged traceback or step name."""
    import subprocess
    import sys

    import pyarrow as pa

    (tmp_path / "in").mkdir()
    table = read_labels(synth(tmp_path)).slice(0, 200)
    pq.write_table(table, tmp_path / "in" / "a.parquet")
    pq.write_table(table.cast(table.schema.set(table.schema.get_field_index("confidence"),
                                               pa.field("confidence", pa.float64()))), tmp_path / "in" / "b.parquet")
    done = subprocess.run([sys.executable, "-m", "ns_data.cli", "balance", str(tmp_path / "in"), "--output",
                           str(tmp_path / "sel"), "--per-class", "5", "--no-progress", "--direct_num_workers", "1"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stderr
    assert "Error: " + str(tmp_path / "in" / "b.parquet") + ": schema differs from" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "while running" not in done.stderr, done.stderr


def test_the_error_printer_finds_a_users_error_in_a_workers_traceback():
    """A Beam worker process's StageError reaches the launcher as a RuntimeError holding the worker's traceback:
    its message is what is printed; any other error in a worker is a bug, shown with its traceback (None)."""
    from ns_data.console import one_line

    worker = ("Traceback (most recent call last):\n  File \"reading.py\", line 194, in check_footer\n"
              "ns_data.stage.InputError: b.parquet: schema differs from a.parquet:\nid: string\nvs\nid: int64"
              "\n\nDuring handling of the above exception, another exception occurred:\n\nTraceback ...\n"
              "ns_data.stage.InputError: b.parquet: schema differs [while running 'WorkUnits/ReadFooters']\n")
    assert one_line(RuntimeError(worker)) == "b.parquet: schema differs from a.parquet:\nid: string\nvs\nid: int64"
    assert one_line(RuntimeError("Traceback (most recent call last):\nZeroDivisionError: division by zero\n")) is None
    assert one_line(RuntimeError("Traceback:\nns_data.stage.NoSuchThing: x\n")) is None


def test_a_template_launch_with_an_unknown_parameter_fails_before_any_output(tmp_path):
    pl = synth(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(OptionsError, match="no such option --per_clss .*did you mean --per-class"):
        balance_pipeline.run([f"--inputs={pl}", f"--output={out}", "--per_clss=5", "--progress=false"])
    assert not out.exists()


def test_the_error_printer_imports_neither_beam_nor_torch():
    """Both command lines print errors through ns_data.console; ns-train imports it before any model, and Beam's
    import would log before quiet_logging is set."""
    import subprocess
    import sys

    program = ("import sys, ns_data.console; "
               "print(sorted(m for m in ('apache_beam', 'torch', 'tensorflow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "[]"
