"""The `ns-data` command line. Each command maps its options one to one onto a typed options dataclass."""
from __future__ import annotations

import sys

import click

from ns_data.console import OneLineErrors, own_options, quiet_logging


def _split_beam_args(args: tuple[str, ...]) -> tuple[list[str], list[str]]:
    """Leading plain words are inputs; from the first unknown --option on, everything goes to Beam, and must be
    an option Beam (or the chosen runner) declares: anything else is an OptionsError, before any work."""
    from ns_data.runner import check_beam_args

    args = list(args)
    first_flag = next((i for i, a in enumerate(args) if a.startswith("-")), len(args))
    ctx = click.get_current_context()
    check_beam_args(args[first_flag:], own_options(ctx.command), ctx.command_path)
    return args[:first_flag], args[first_flag:]


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ns-data")
def main() -> None:
    """Build Noisy Student pseudo-label corpora: label, balance, shard; look at them: inspect, report."""
    quiet_logging()


@main.group()
def synth() -> None:
    """Generate synthetic inputs for demos, tests and benchmarks."""


@synth.command("pseudo-labels")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Directory to write into.")
@click.option("--rows", default=1_000_000, show_default=True, type=click.IntRange(min=0), help="Rows to write.")
@click.option("--classes", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Classes, Zipf-skewed in size.")
@click.option("--files", default=4, show_default=True, type=click.IntRange(min=1),
              help="Parquet files the rows are split over.")
@click.option("--topk", default=5, show_default=True, type=click.IntRange(min=1),
              help="Length of the top-k columns.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Same seed and options, same output.")
@click.option("--invalid-fraction", default=0.0, show_default=True, type=click.FloatRange(0, 1),
              help="Share of rows spoiled (NaN/out-of-range confidence, bad label, repeated id).")
@click.option("--overwrite", is_flag=True, help="Replace an output of other options in --output.")
def synth_pseudo_labels(**kwargs) -> None:
    """Write a synthetic pseudo-label output (skewed classes, tied confidences), as `label` writes one."""
    from ns_data.outputs import already_complete
    from ns_data.synth import SynthOptions, write_pseudo_labels

    paths, wrote = write_pseudo_labels(SynthOptions(**kwargs))
    if not wrote:
        _note(already_complete(kwargs["output"]))
    click.echo(f"{kwargs['output']}: {kwargs['rows']:,} rows in {len(paths)} file(s)")


@synth.command("images")
@click.option("--output", required=True, type=click.Path(file_okay=False), help="Directory to write into.")
@click.option("--count", default=300, show_default=True, type=click.IntRange(min=0), help="Images to write.")
@click.option("--width", default=96, show_default=True, type=click.IntRange(min=1), help="Width in pixels.")
@click.option("--height", default=72, show_default=True, type=click.IntRange(min=1), help="Height in pixels.")
@click.option("--format", "image_format", default="jpg", show_default=True,
              type=click.Choice(["jpg", "png", "webp"]), help="Image file format.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(min=0),
              help="Same seed and options, same output.")
@click.option("--overwrite", is_flag=True, help="Replace images of other options in --output.")
def synth_images(**kwargs) -> None:
    """Write synthetic images (colour fields and shapes) as files, for demos, tests and benchmarks."""
    from ns_data.synth import write_images

    paths = write_images(**kwargs)
    click.echo(f"{kwargs['output']}: {len(paths):,} images")


def _note(message: str) -> None:
    """A note about the run (resumed, already complete) on stderr, apart from the summary on stdout."""
    click.echo(message, err=True)


def _stage_command(function):
    """A stage's command: INPUT... then its options; options it does not declare go on to Beam."""
    function = click.argument("args", nargs=-1, type=click.UNPROCESSED)(function)
    return main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})(function)


_progress_option = click.option("--progress/--no-progress", default=None,
                                help="Progress lines (default: on with the local runner).")
_class_names_option = click.option("--class-names", default=None,
                                   help="File naming the classes (a line per class, a JSON list or {id: name}); "
                                        "default: the names the teacher recorded.")


def _run_stage(args: tuple[str, ...], kwargs: dict, options_type, run, format_summary) -> None:
    """Runs a stage from its command's arguments: the inputs and Beam's options apart, progress lines by default
    on the local runner (where the user watches the terminal), then its summary, or (the job was only launched:
    a dry run, a template) where its output will be."""
    from ns_data.runner import is_local, launched

    inputs, beam_args = _split_beam_args(args)
    if kwargs["progress"] is None:
        kwargs["progress"] = is_local(beam_args)
    opts = options_type(inputs=tuple(inputs), **kwargs)
    marker, _ = run(opts, beam_args, echo=_note)
    click.echo(launched(opts.output) if marker is None else format_summary(marker, opts.output))


def _floats(text: str | None) -> tuple[float, ...] | None:
    return None if text is None else tuple(float(v) for v in text.replace(",", " ").split())


@_stage_command
@click.option("--teacher", required=True,
              help="timm model name (e.g. tf_efficientnet_b0.ns_jft_in1k), a student from `ns-train export` (.safetensors), or a TorchScript file.")
@click.option("--checkpoint", default=None, help="Teacher weights: .safetensors or a PyTorch state dict.")
@click.option("--random-weights", is_flag=True, help="No checkpoint: random weights (demos and benchmarks).")
@click.option("--pretrained", is_flag=True,
              help="timm's weights for --teacher (name or name.tag), through the Hugging Face hub cache "
                   "(HF_HOME / HF_HUB_CACHE; HF_HUB_OFFLINE=1: from the cache only).")
@click.option("--num-classes", default=None, type=int, help="Classes of the teacher (default: from checkpoint).")
@click.option("--class-names", default=None,
              help="File naming the classes, for display: a line per class, a JSON list, or JSON {id: name} "
                   "(default: timm's ImageNet names for an ImageNet head).")
@click.option("--output", required=True, help="Output directory (local or any Beam filesystem).")
@click.option("--input-format", default="auto", show_default=True,
              type=click.Choice(["auto", "files", "tfrecord", "tar", "parquet"]),
              help="auto: by file extension (.jpg/.png/..., .tfrecord, .tar, .parquet).")
@click.option("--image-column", default=None, help="Parquet inputs: the column of image bytes (default: guess).")
@click.option("--id-column", default="id", show_default=True, help="Parquet inputs: the id column, if present.")
@click.option("--max-images", default=None, type=int, help="Label at most this many images (a smoke run).")
@click.option("--batch-size", default=32, show_default=True, type=int,
              help="Images per forward pass of the teacher (256 on a GPU).")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or cuda:N.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="The teacher's arithmetic (bf16/fp16 on a GPU); part of the teacher's identity.")
@click.option("--channels-last/--no-channels-last", default=True, show_default=True,
              help="Images laid out channels-last for the model (faster on most backends).")
@click.option("--topk", default=10, show_default=True, type=int, help="Classes kept per image.")
@click.option("--probs", is_flag=True, help="Also write the full probability vector.")
@click.option("--decode-threads", default=2, show_default=True, type=int,
              help="Threads decoding images ahead of the teacher.")
@click.option("--max-pixels", default=50_000_000, show_default=True, type=int,
              help="Larger images are rejected (decompression bombs).")
@click.option("--fast-decode", is_flag=True,
              help="Decode JPEGs at a reduced scale (1/2, 1/4, 1/8: at least the resize target) before timm's "
                   "transform: 2-4x faster on large photos; approximate (labels change a little), recorded in "
                   "the teacher's identity. Other formats decode exactly.")
@click.option("--input-size", default=None, type=int, help="Override the teacher's input size.")
@click.option("--crop-pct", default=None, type=float, help="Override the teacher's crop_pct.")
@click.option("--interpolation", default=None, help="Override the resize interpolation (bicubic, bilinear...).")
@click.option("--mean", default=None, help="Override normalization mean: three numbers.")
@click.option("--std", default=None, help="Override normalization std: three numbers.")
@click.option("--overwrite", is_flag=True, help="Replace labels already in --output.")
@_progress_option
def label(args, **kwargs) -> None:
    """Run the un-noised teacher over unlabeled images; write the pseudo-label table.

    INPUT... are image files, directories or globs of them, TFRecords of tf.Example (image/encoded),
    webdataset-style tar shards, or Parquet files with an image-bytes column. Options this command does not
    know go to Beam (when Beam declares them); put them after the inputs.
    """
    from ns_data.label import LabelOptions, format_summary, run_label

    kwargs["mean"], kwargs["std"] = _floats(kwargs["mean"]), _floats(kwargs["std"])
    _run_stage(args, kwargs, LabelOptions, run_label, format_summary)


@_stage_command
@click.option("--output", required=True, help="Output directory (local or any Beam filesystem, e.g. gs://).")
@click.option("--per-class", default=130_000, show_default=True, type=int,
              help="Rows kept per class (the most confident).")
@click.option("--min-confidence", default=0.3, show_default=True, type=float,
              help="Rows below this confidence are never kept.")
@click.option("--upsample/--no-upsample", default=True, show_default=True,
              help="Duplicate rows of small classes so every non-empty class totals --per-class.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the id hash that breaks ties.")
@click.option("--num-classes", default=None, type=int, help="When given, labels outside [0, N) are invalid.")
@click.option("--overwrite", is_flag=True, help="Replace a selection already in --output.")
@click.option("--batch-rows", default=131_072, show_default=True, type=int, help="Rows per Arrow batch.")
@click.option("--unit-rows", default=262_144, show_default=True, type=int,
              help="Rows per sort unit: bounds a worker's memory for ranking.")
@click.option("--shuffle", default="auto", show_default=True, type=click.Choice(["auto", "beam", "files"]),
              help="How the sort keys reach their sort unit: through Beam's shuffle, or through spill files in the "
                   "output's temp dir with only references shuffled (auto: files on the local runner with a "
                   "local --output, as its shuffle is held in memory; beam elsewhere).")
@_progress_option
def balance(args, **kwargs) -> None:
    """Keep the most confident --per-class rows of each class, exactly and deterministically.

    INPUT... are Parquet files, globs or directories (pseudo-label tables from `ns-data label`).
    Options this command does not know are passed to Beam when Beam declares them (e.g. --runner
    DataflowRunner --project P); put them after the inputs.
    """
    from ns_data.balance import BalanceOptions, run_balance
    from ns_data.stats import format_summary

    _run_stage(args, kwargs, BalanceOptions, run_balance, format_summary)


@_stage_command
@click.option("--output", required=True, help="Output directory (local or any Beam filesystem, e.g. gs://).")
@click.option("--num-shards", default=None, type=int, help="Number of shards.")
@click.option("--records-per-shard", default=None, type=int, help="Or: records per shard.")
@click.option("--max-shard-bytes", default=None,
              help="Or: the largest shard size, e.g. 256MB (the default: 256MiB); bounds a writer's memory.")
@click.option("--num-classes", default=None, type=int,
              help="Length of the dense `probabilities` (default: recorded by label/balance).")
@click.option("--probabilities/--no-probabilities", default=True, show_default=True,
              help="Write the dense soft label `probabilities` that the original Noisy Student code reads.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of shard placement and order.")
@click.option("--shuffle", default="auto", show_default=True, type=click.Choice(["auto", "beam", "files"]),
              help="How image bytes reach their shard: through Beam's shuffle, or through spill files in the "
                   "output's temp dir with only references shuffled (auto: files on the local runner with a "
                   "local --output, as its shuffle is held in memory; beam elsewhere).")
@click.option("--overwrite", is_flag=True, help="Replace shards of other inputs or options in --output.")
@_progress_option
def shard(args, **kwargs) -> None:
    """Write the selection, copies included, as globally shuffled TFRecord shards of tf.train.Example.

    SELECTION... are the output directory of `ns-data balance` (or its selection-*.parquet files). Each image
    is read from its source once, as `label` read it. Rows that cannot be written become error rows. Re-running
    over a complete output does nothing; over an interrupted one it writes the missing shards. Options this
    command does not know go to Beam (when Beam declares them); put them after the inputs.
    """
    from ns_data.shard import ShardOptions, format_summary, parse_size, run_shard

    if kwargs["max_shard_bytes"] is not None:
        kwargs["max_shard_bytes"] = parse_size(kwargs["max_shard_bytes"])
    _run_stage(args, kwargs, ShardOptions, run_shard, format_summary)


@main.command()
@click.argument("directory")
@click.option("--records", default=3, show_default=True, type=click.IntRange(min=0),
              help="Records to decode and show from the first shard.")
@_class_names_option
def inspect(directory, records, class_names) -> None:
    """Summarize a shard set from its manifest.json and show a few records decoded."""
    from ns_data import class_names as names_of
    from ns_data.contract import SHARDS
    from ns_data.shard import format_summary, inspect_records

    manifest = SHARDS.check_complete(directory)
    names = names_of.read_file(class_names, manifest.get("num_classes")) if class_names else None
    click.echo(format_summary(manifest, directory, names))
    shown = -1  # the first line names the shard; each after it is a record
    try:
        for line in inspect_records(directory, manifest, records, names):
            click.echo(line)
            shown += 1
    except Exception as err:  # noqa: BLE001 - a damaged record or one that does not parse: named, in one line
        from ns_data.fs import join
        from ns_data.stage import InputError

        shard = next(s["name"] for s in manifest["shards"] if s["records"])
        raise InputError(f"{join(directory, shard)}: record {shown}: corrupt_record "
                         f"({type(err).__name__}: {err})") from err


@main.command()
@click.argument("dirs", nargs=-1, required=True, metavar="DIR...")
@click.option("--output", required=True, help="The HTML file to write (local or any Beam filesystem).")
@_class_names_option
@click.option("--ground-truth", default=None,
              help="Parquet with columns id and label: pseudo-label accuracy against confidence.")
@click.option("--sample-classes", default=6, show_default=True, type=click.IntRange(min=0),
              help="Classes in the sample grid, spread from the largest to the smallest.")
@click.option("--samples-per-class", default=3, show_default=True, type=click.IntRange(min=0),
              help="The most confident and as many least confident rows shown per class.")
@click.option("--thumbnail-size", default=96, show_default=True, type=click.IntRange(16, 512),
              help="Largest side of a sample thumbnail, in pixels.")
@click.option("--batch-rows", default=131_072, show_default=True, type=click.IntRange(min=1),
              help="Rows per Arrow batch read from Parquet.")
@click.option("--sample-rows", default=2_000_000, show_default=True, type=click.IntRange(min=1),
              help="A table of more rows is read as a sample of evenly spaced row groups up to this many rows.")
@click.option("--sample-files", default=256, show_default=True, type=click.IntRange(min=1),
              help="The most data files of a table the sample is drawn from (evenly spaced in name order).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress lines on stderr.")
def report(dirs, **kwargs) -> None:
    """Write one self-contained HTML page showing what outputs hold: pseudo labels, selections, shards, runs.

    DIR... are outputs of `ns-data label`, `balance`, `shard` or `ns-train train`, or directories holding them
    (searched two levels down). Needs matplotlib: pip install 'ns-data[report]'.
    """
    from ns_data.report import ReportOptions, write_report

    summary = write_report(ReportOptions(dirs=tuple(dirs), **kwargs), echo=_note)
    for line in summary.lines:
        click.echo(line)
    click.echo(f"report: {summary.path}")


if __name__ == "__main__":
    sys.exit(main())
