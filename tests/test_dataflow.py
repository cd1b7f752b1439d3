"""Dataflow launches, checked without a cloud or a network.

Every pipeline under pipelines/ is built for the DataflowRunner with Beam's `--dry_run`: DataflowRunner
translates the pipeline into a Dataflow job (pickling every DoFn, checking the options Dataflow needs, putting
each step in the worker image's environment) and stops before it would create an API client or stage a file.
The job it kept is checked here, and its DoFns are unpickled again in a fresh interpreter, as a worker would.
Then the Flex Templates' metadata (docker/flex/) is checked against the options each `run(argv)` accepts, and
the images against constraints.txt. Needs apache-beam[gcp] (setup.py's `gcp` extra, which `make test` installs).
"""
from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import apache_beam as beam
import click
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from apache_beam.options.pipeline_options import DebugOptions, GoogleCloudOptions, WorkerOptions
from apache_beam.portability import common_urns
from apache_beam.portability.api import beam_runner_api_pb2
from apache_beam.runners.dataflow.dataflow_runner import DataflowRunner
from apache_beam.runners.dataflow.internal import apiclient
from apache_beam.runners.runner import PipelineState
from google.cloud.dataflow_v1beta3.types import ParameterType, TemplateMetadata
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from ns_data import cli, contract
from ns_data.synth import write_images
from pipelines import from_template
from tests.conftest import random_table, write_parts

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("label", "balance", "shard")
WORKER_IMAGE = f"us-central1-docker.pkg.dev/ns-data-ci/ns-data/ns-data-worker:{importlib.metadata.version('ns-data')}"
# What a launch gives Beam, spelled as the Flex Template launcher spells it; the project, bucket and image are
# fake: nothing is contacted.
DATAFLOW = ["--runner=DataflowRunner", "--project=ns-data-ci", "--region=us-central1", "--job_name=ns-data-dry-run",
            "--temp_location=gs://ns-data-ci/tmp", f"--sdk_container_image={WORKER_IMAGE}",
            "--experiments=use_runner_v2"]
DRY_RUN = "--dry_run=True"  # TestOptions.dry_run: a string option, any non-empty value is true
# The leaf transforms Dataflow's runner v2 executes; composites (Create, Reshuffle, CombinePerKey...) are
# expanded into these. Anything else (TestStream, a cross-language transform, a runner-specific primitive) is a
# step Dataflow cannot run.
DATAFLOW_LEAVES = {common_urns.primitives.PAR_DO.urn, common_urns.primitives.GROUP_BY_KEY.urn,
                   common_urns.primitives.IMPULSE.urn, common_urns.primitives.FLATTEN.urn,
                   common_urns.primitives.ASSIGN_WINDOWS.urn}


# ----------------------------------------------------------------------------------------------- inputs


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Small local inputs of every stage: images for label, pseudo labels for balance, a selection of the
    images for shard."""
    root = tmp_path_factory.mktemp("dataflow")
    images = write_images(str(root / "images"), 8, width=32, height=24)
    write_parts(random_table(np.random.default_rng(3), 300, 10), root / "labels", files=2, row_group_rows=100)
    n = len(images)
    selection = pa.table({
        "id": [os.path.basename(p) for p in images], "source": images,
        "offset": pa.array([None] * n, pa.int64()), "label": pa.array(np.arange(n) % 10, pa.int32()),
        "confidence": pa.array(np.linspace(0.5, 0.9, n), pa.float32()),
        "rank": pa.array(np.zeros(n), pa.int32()), "copies": pa.array(np.ones(n) + np.arange(n) % 2, pa.int32()),
    })
    os.makedirs(root / "selection")
    pq.write_table(selection, root / "selection" / contract.SELECTION.data_name(0))
    (root / "selection" / contract.SELECTION.marker).write_text(json.dumps({"stage": "balance"}))
    return root


def template_argv(stage: str, root: Path, out: Path) -> list[str]:
    """The stage's arguments as its Flex Template launch passes them (`--NAME=VALUE`, docker/flex/)."""
    return {
        "label": [f"--inputs={root / 'images'}", f"--output={out}", "--teacher=test_efficientnet",
                  "--random_weights=true", "--num_classes=10", "--batch_size=4"],
        "balance": [f"--inputs={root / 'labels'}", f"--output={out}", "--per_class=20", "--num_classes=10",
                    "--upsample=false"],
        "shard": [f"--inputs={root / 'selection'}", f"--output={out}", "--num_shards=2", "--num_classes=10"],
    }[stage]


# ---------------------------------------------------------------------------------------------- dry runs


class Translated(Exception):
    """Raised once DataflowRunner has translated the job, so that the stage stops there (a dry run starts no
    job, so the stage's marker never appears)."""


@pytest.fixture
def offline(monkeypatch):
    """No connection, name lookup or credentials: a dry run that reached for any fails loudly."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"a Dataflow dry run reached for the network or credentials: {args[1:]!r}")

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    import google.auth
    from apache_beam.internal.gcp import auth

    monkeypatch.setattr(google.auth, "default", refuse)
    monkeypatch.setattr(auth, "get_service_credentials", refuse)
    monkeypatch.setattr(apiclient, "get_service_credentials", refuse)


@pytest.fixture
def dry_run(offline, monkeypatch):
    """`dry_run(run, argv)` calls the entry point `run(argv + Beam's Dataflow options + --dry_run)` and returns
    the job DataflowRunner translated (an `apiclient.Job`: its options and its portable pipeline proto)."""
    results = []
    translate = DataflowRunner.run_pipeline

    def translate_only(runner, pipeline, options, pipeline_proto=None):
        results.append(translate(runner, pipeline, options, pipeline_proto))
        raise Translated

    monkeypatch.setattr(DataflowRunner, "run_pipeline", translate_only)

    def run(entry, argv: list[str]) -> apiclient.Job:
        with pytest.raises(Translated):
            entry(argv + DATAFLOW + [DRY_RUN])
        (result,) = results
        results.clear()  # the next call's job
        assert result.state == PipelineState.DONE  # the dry run's result: nothing was submitted
        return result.job

    return run


def leaves(proto: beam_runner_api_pb2.Pipeline) -> dict[str, beam_runner_api_pb2.PTransform]:
    return {tid: t for tid, t in proto.components.transforms.items() if not t.subtransforms}


def check_job(job: apiclient.Job, stage: str, tmp_path: Path) -> None:
    """What Dataflow would be given: a batch job whose every step runs in the worker image, made of steps it can
    run, whose DoFns are this package's and load in a fresh interpreter."""
    proto = job.proto_pipeline
    assert job.proto.type_.name == "JOB_TYPE_BATCH"  # an unbounded source would have made it streaming
    assert job.options.view_as(WorkerOptions).sdk_container_image == WORKER_IMAGE
    assert "use_runner_v2" in job.options.view_as(DebugOptions).experiments
    assert job.options.view_as(GoogleCloudOptions).project == "ns-data-ci"
    assert job.proto.name == "ns-data-dry-run"
    assert job.options.view_as(GoogleCloudOptions).temp_location.startswith("gs://ns-data-ci/tmp/")

    environments = proto.components.environments
    assert environments
    for env in environments.values():  # Dataflow runs Docker environments only, here the worker image
        assert env.urn == common_urns.environments.DOCKER.urn
        assert beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image == WORKER_IMAGE

    steps = leaves(proto)
    assert {t.spec.urn for t in steps.values()} <= DATAFLOW_LEAVES, "a step Dataflow cannot run"
    pardos = {t.unique_name: t for t in steps.values() if t.spec.urn == common_urns.primitives.PAR_DO.urn}
    assert all(t.environment_id in environments for t in pardos.values())
    roots = {t.unique_name for t in proto.components.transforms.values() if "/" not in t.unique_name}
    name = stage.capitalize()
    assert {"WorkUnits", "SpreadUnits", name} <= roots
    assert any(n.startswith(f"{name}/") for n in pardos)

    # A worker gets the pipeline proto and unpickles each DoFn and CombineFn with the packages of its image: do
    # the same in a new interpreter outside the repository (the tests and the launcher's state are not there).
    path = tmp_path / f"{stage}.pb"
    path.write_bytes(proto.SerializeToString())
    blocked = json.dumps(sorted(not_in_worker_image()))
    out = subprocess.run([sys.executable, "-c", UNPICKLE, str(path), blocked], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr[-3000:]
    loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert loaded["dofns"] == len(pardos)
    assert all(urn.startswith("beam:dofn:python_") for urn in loaded["builtin"]), loaded["builtin"]
    assert any(cls.startswith(f"ns_data.{stage}") for cls in loaded["classes"]), loaded["classes"]


def not_in_worker_image() -> set[str]:
    """Packages this environment has but the worker image does not: this repository's packages that
    docker/worker/Dockerfile does not copy (ns_train), and TensorFlow (the `tf` extra, for the tf.data reader)."""
    dockerfile = (ROOT / "docker" / "worker" / "Dockerfile").read_text()
    ours = {"ns_data", "ns_train", "pipelines"}
    return {p for p in ours if f"COPY {p} " not in dockerfile} | {"tensorflow"}


UNPICKLE = r"""
import json, sys


class NotInTheImage:  # imports of what the worker image lacks fail, as they would on a worker
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r} in the worker image", name=name)


BLOCKED = set(json.loads(sys.argv[2]))
sys.meta_path.insert(0, NotInTheImage())
from apache_beam.internal import pickler
from apache_beam.portability import common_urns, python_urns
from apache_beam.portability.api import beam_runner_api_pb2 as api

proto = api.Pipeline.FromString(open(sys.argv[1], "rb").read())
classes, builtin, dofns = set(), set(), 0
for t in proto.components.transforms.values():
    if t.spec.urn == common_urns.primitives.PAR_DO.urn:
        spec = api.ParDoPayload.FromString(t.spec.payload).do_fn
        if spec.urn != python_urns.PICKLED_DOFN_INFO:  # one of the Python SDK's own DoFns (KeyWithVoid...)
            builtin.add(spec.urn)
            dofns += not t.subtransforms
            continue
        fn = pickler.loads(spec.payload)[0]
        dofns += not t.subtransforms
    elif t.spec.urn == common_urns.composites.COMBINE_PER_KEY.urn:
        fn = pickler.loads(api.CombinePayload.FromString(t.spec.payload).combine_fn.payload)
    else:
        continue
    classes.add(type(fn).__module__ + "." + type(fn).__qualname__)
print(json.dumps({"dofns": dofns, "classes": sorted(classes), "builtin": sorted(builtin)}))
"""


@pytest.mark.parametrize("stage", STAGES)
def test_each_pipeline_translates_to_a_dataflow_job_on_the_worker_image(stage, inputs, dry_run, tmp_path):
    """The entry point a Flex Template runs (`pipelines.<stage>.run`), with the template's spelling of the
    arguments and the options a Dataflow launch gives."""
    entry = importlib.import_module(f"pipelines.{stage}").run
    job = dry_run(entry, template_argv(stage, inputs, tmp_path / "out"))
    check_job(job, stage, tmp_path)


def test_the_label_job_does_not_grow_with_the_input_files(dry_run, tmp_path):
    """The launcher lists no input file and the job carries none (no file or unit list in a Create, a DoFn or
    the options): 2,000 input files translate to the job of 50, byte for byte but for the folder's name."""
    from pipelines import label

    one = tmp_path / "one.jpg"
    write_images(str(tmp_path / "synth"), 1, width=8, height=8)
    one.write_bytes((tmp_path / "synth" / "img-000000.jpg").read_bytes())
    sizes = {}
    for n in (50, 2000):
        folder = tmp_path / f"in-{n:05d}"  # names of the same length in both jobs
        for i in range(n):
            sub = folder / f"{i // 500:02d}"
            sub.mkdir(parents=True, exist_ok=True)
            os.link(one, sub / f"img-{i:05d}.jpg")
        argv = [f"--inputs={folder}", f"--output={tmp_path / f'out-{n:05d}'}", "--teacher=test_efficientnet",
                "--random_weights=true", "--num_classes=10"]
        sizes[n] = len(dry_run(label.run, argv).proto_pipeline.SerializeToString())
    assert abs(sizes[2000] - sizes[50]) <= 200, sizes


def test_the_command_line_launch_translates_too(inputs, dry_run, tmp_path):
    """`ns-data balance INPUT --output DIR ... --runner DataflowRunner ...` (docs/dataflow.md), the CLI's own
    spelling."""
    def entry(argv):
        cli.main.main(args=argv, prog_name="ns-data", standalone_mode=False)

    job = dry_run(entry, ["balance", str(inputs / "labels"), "--output", str(tmp_path / "out"), "--per-class",
                          "20", "--num-classes", "10", "--no-progress"])
    check_job(job, "balance", tmp_path)


@pytest.mark.parametrize("missing, error, message", [
    ("--project", ValueError, "Missing required option: project"),
    ("--region", ValueError, "Missing required option: region"),
    # Without a temp_location (nor a staging_location) Beam goes to create a default bucket in the project,
    # dry run or not: here the offline guard stops it.
    ("--temp_location", AssertionError, "reached for the network or credentials"),
])
def test_a_launch_without_an_option_dataflow_needs_fails_before_any_job(missing, error, message, inputs, dry_run,
                                                                        tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "DATAFLOW", [a for a in DATAFLOW if not a.startswith(missing)])
    entry = importlib.import_module("pipelines.balance").run
    with pytest.raises(error, match=message):
        dry_run(entry, template_argv("balance", inputs, tmp_path / "out"))


def stage_outputs(root: Path, files: int, images: list[str]) -> tuple[Path, Path]:
    """A complete label output and a complete balance output of `files` data files each (markers with totals)."""
    labels, selection = root / "labels", root / "selection"
    os.makedirs(labels)
    os.makedirs(selection)
    table = random_table(np.random.default_rng(5), 3 * files, 10)
    for i in range(files):
        pq.write_table(table.slice(3 * i, 3), labels / contract.LABELS.data_name(i))
        image = images[i % len(images)]
        pq.write_table(pa.table({
            "id": [f"{i:05d}"], "source": [image], "offset": pa.array([None], pa.int64()),
            "label": pa.array([i % 10], pa.int32()), "confidence": pa.array([0.5], pa.float32()),
            "rank": pa.array([0], pa.int32()), "copies": pa.array([1], pa.int32())}),
            selection / contract.SELECTION.data_name(i))
    (labels / contract.LABELS.marker).write_text(json.dumps({"stage": "label", "labeled": 3 * files}))
    (selection / contract.SELECTION.marker).write_text(json.dumps(
        {"stage": "balance", "selected_rows": files, "total_copies": files}))
    return labels, selection


@pytest.mark.parametrize("stage", ("balance", "shard"))
def test_the_job_graph_does_not_grow_with_the_input_files(stage, dry_run, tmp_path):
    """balance and shard over 30 and 600 input files: the job carries the inputs as given, never a list of
    files or work units (the pipeline lists them and reads their footers), so both jobs are the same size
    (with a unit list in the job, 600 files made balance's 12% and shard's 23% larger)."""
    images = write_images(str(tmp_path / "images"), 4, width=32, height=24)
    entry = importlib.import_module(f"pipelines.{stage}").run
    sizes = []
    for files in (30, 600):
        root = tmp_path / f"n{files:04d}"
        labels, selection = stage_outputs(root, files, images)
        argv = {"balance": [f"--inputs={labels}", f"--output={root / 'out'}", "--per_class=20", "--num_classes=10"],
                "shard": [f"--inputs={selection}", f"--output={root / 'out'}", "--num_classes=10"]}[stage]
        job = dry_run(entry, argv)
        sizes.append(len(job.proto_pipeline.SerializeToString()))
    assert sizes[1] <= sizes[0] * 1.01, sizes


def test_a_launch_that_only_builds_the_job_returns_without_waiting(inputs, offline, tmp_path, capsys):
    """A dry run (as a Flex Template launcher's build) returns once the job is built and says where the output
    will be, instead of reading a marker that only the job writes."""
    from pipelines import balance

    balance.run(template_argv("balance", inputs, tmp_path / "out") + DATAFLOW + [DRY_RUN])
    assert "job launched" in capsys.readouterr().out
    assert not (tmp_path / "out" / "stats.json").exists()


# ---------------------------------------------------------------------------------- Flex Template metadata

FLEX = ROOT / "docker" / "flex"
# Options of the commands that a template leaves out, and why.
NOT_IN_TEMPLATES = {
    "label": {"progress"},
    "balance": {"progress", "shuffle"},
    "shard": {"progress", "shuffle"},
}
WHY_NOT = {"progress": "progress lines are for a terminal; a Dataflow launch has none",
           "shuffle": "on Dataflow `auto` is Beam's shuffle, and `files` needs a local --output"}
TEXT_SAMPLES = {"inputs": "gs://b/in-1,gs://b/in-2", "output": "gs://b/out",
                "teacher": "tf_efficientnet_b0.ns_jft_in1k",
                "checkpoint": "/models/teacher.safetensors", "class_names": "gs://b/classes.txt",
                "image_column": "jpeg", "id_column": "key", "device": "cuda:1", "interpolation": "bilinear",
                "mean": "0.485 0.456 0.406", "std": "0.229,0.224,0.225", "max_shard_bytes": "512MiB"}
REQUIRED = {"label": ["--inputs=gs://b/in", "--output=gs://b/out", "--teacher=m"],
            "balance": ["--inputs=gs://b/in", "--output=gs://b/out"],
            "shard": ["--inputs=gs://b/in", "--output=gs://b/out"]}


def metadata(stage: str) -> TemplateMetadata:
    """The stage's template metadata, read as Dataflow's own type: an unknown or misspelled field fails."""
    return TemplateMetadata.from_json((FLEX / f"{stage}-metadata.json").read_text())


def samples(option: click.Option | None, param) -> list[tuple[str, object]]:
    """(value as the template passes it, the value the command must get) for one parameter."""
    if option is None:  # inputs
        return [(TEXT_SAMPLES["inputs"], ("gs://b/in-1", "gs://b/in-2"))]
    if option.is_flag:
        return [("true", True), ("false", False)]
    if isinstance(option.type, click.Choice):
        return [(c, c) for c in option.type.choices]
    if isinstance(option.type, click.types.IntParamType):
        return [("7", 7)]
    if isinstance(option.type, click.types.FloatParamType):
        return [("0.25", 0.25)]
    return [(TEXT_SAMPLES.get(param.name, "x"), TEXT_SAMPLES.get(param.name, "x"))]


def parse(stage: str, argv: list[str]) -> dict:
    """The command's parameters for `argv` spelled as a template launch spells them, as `run(argv)` gets them."""
    command = getattr(cli, stage)
    with command.make_context(f"pipelines.{stage}", from_template(command, argv)) as ctx:
        return dict(ctx.params)


@pytest.mark.parametrize("stage", STAGES)
def test_template_parameters_are_the_options_run_accepts(stage):
    command = getattr(cli, stage)
    options = {p.name: p for p in command.params if isinstance(p, click.Option)}
    meta = metadata(stage)
    assert meta.name and meta.description and not meta.streaming
    names = [p.name for p in meta.parameters]
    assert len(names) == len(set(names))
    assert NOT_IN_TEMPLATES[stage] <= set(options), "a left-out option the command no longer has"
    assert set(names) == {"inputs"} | (set(options) - NOT_IN_TEMPLATES[stage]), \
        f"template parameters vs options of `ns-data {stage}` (left out: {WHY_NOT})"
    for param in meta.parameters:
        option = options.get(param.name)
        assert param.label and param.help_text, param.name
        assert param.is_optional == (option is not None and not option.required), param.name
        for value, expected in samples(option, param):
            assert all(re.search(rx, value) for rx in param.regexes), (param.name, value, list(param.regexes))
            got = parse(stage, [a for a in REQUIRED[stage] if not a.startswith(f"--{param.name}=")]
                        + [f"--{param.name}={value}"])
            if option is None:
                assert got["args"] == expected, param.name
            else:  # the command took the parameter: nothing is left over for Beam
                assert got[option.name] == expected and got["args"] == ("gs://b/in",), (param.name, got)


@pytest.mark.parametrize("stage", STAGES)
def test_template_parameter_types_and_defaults_follow_the_options(stage):
    options = {p.name: p for p in getattr(cli, stage).params if isinstance(p, click.Option)}
    for param in metadata(stage).parameters:
        option = options.get(param.name)
        if option is None:
            continue
        kind = (ParameterType.BOOLEAN if option.is_flag else ParameterType.ENUM
                if isinstance(option.type, click.Choice) else ParameterType.NUMBER
                if isinstance(option.type, (click.types.IntParamType, click.types.FloatParamType)) else None)
        if kind is None:
            assert param.param_type in (ParameterType.TEXT, ParameterType.GCS_READ_FILE,
                                        ParameterType.GCS_WRITE_FOLDER), param.name
        else:
            assert param.param_type == kind, param.name
        if kind == ParameterType.ENUM:
            assert [o.value for o in param.enum_options] == list(option.type.choices), param.name
        if kind == ParameterType.NUMBER:
            assert not any(re.search(rx, "ten") for rx in param.regexes), param.name
        if kind == ParameterType.BOOLEAN:
            assert not any(re.search(rx, "maybe") for rx in param.regexes), param.name
        default = option.default if option.default not in (None, click.core.UNSET) else None
        if option.is_flag:
            default = "true" if default is True else "false"
        assert param.default_value == ("" if default is None else str(default)), param.name


def test_a_template_boolean_must_be_true_or_false():
    with pytest.raises(click.BadParameter) as err:
        from_template(cli.balance, ["--overwrite=perhaps"])
    assert "--overwrite" in err.value.format_message() and "perhaps" in err.value.format_message()


# ------------------------------------------------------------------------------------------------- images


def constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", line
            pins[canonicalize_name(req.name)] = spec.version
    return pins


def requirement_names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            assert not req.specifier, f"{path}: {line}: versions come from constraints.txt"
            names.add(canonicalize_name(req.name))
    return names


def extra_names(*extras: str) -> set[str]:
    """ns-data's install_requires plus the named extras, as installed (setup.py)."""
    names = set()
    for text in importlib.metadata.requires("ns-data"):
        req = Requirement(text)
        if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in extras):
            names.add(canonicalize_name(req.name))
    return names


def test_the_tests_ran_with_the_pinned_versions():
    """The images install constraints.txt; these tests ran with the same versions, so the images have what
    was tested (a changed pin reinstalls .venv: the Makefile's install step depends on constraints.txt)."""
    for name, version in constraints().items():
        assert importlib.metadata.version(name) == version, name


@pytest.mark.parametrize("image, extras", [("worker", ("label", "gcp")), ("trainer", ("train",))])
def test_images_install_the_pinned_versions(image, extras):
    dockerfile = (ROOT / "docker" / image / "Dockerfile").read_text()
    assert "COPY constraints.txt /tmp/ns-data/constraints.txt" in dockerfile
    assert "pip install --no-cache-dir -c /tmp/ns-data/constraints.txt -r /tmp/ns-data/requirements.txt" in dockerfile
    assert "pip install --no-cache-dir --no-deps /src/ns-data" in dockerfile
    names = requirement_names(ROOT / "docker" / image / "requirements.txt")
    assert names <= set(constraints()), "every package of the image is pinned in constraints.txt"
    assert names == extra_names(*extras) - {"ns-data"}


def test_the_version_is_written_once():
    """The package's version (the worker image's tag, `ns-data --version`) is `ns_data.__version__`: setup.py
    reads it from there and spells no version of its own."""
    import ns_data

    built = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                           check=True, timeout=120)
    assert built.stdout.split()[-1] == ns_data.__version__
    assert ns_data.__version__ not in (ROOT / "setup.py").read_text()


def test_the_worker_runs_the_python_and_beam_that_launch():
    """DoFns pickled at launch are unpickled by the workers: the same Python minor version and Beam version."""
    dockerfile = (ROOT / "docker" / "worker" / "Dockerfile").read_text()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    assert f"FROM apache/beam_python{python}_sdk:{beam.__version__}\n" in dockerfile
    assert constraints()["apache-beam"] == beam.__version__
    for stage in STAGES:  # the Flex Template launcher's FLEX_TEMPLATE_PYTHON_PY_FILE, inside the worker image
        assert (ROOT / "pipelines" / f"{stage}.py").is_file()
    flex = (FLEX / "Dockerfile").read_text()
    assert "FROM ${WORKER_IMAGE}" in flex and f"python{python.replace('.', '')}-template-launcher-base" in flex
    assert "ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/src/ns-data/pipelines/${STAGE}.py" in flex
    assert "COPY pipelines /src/ns-data/pipelines" in dockerfile
