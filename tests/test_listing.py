"""Every input is a row or an error row: links, unreadable and non-regular files, odd names, damaged TFRecords."""
from __future__ import annotations

import glob
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import pyarrow.parquet as pq
import pytest
from PIL import Image

from ns_data import tfrecord
from ns_data.label import LabelOptions, run_label
from ns_data.sources import plan_inputs
from ns_data.sources.listing import match_input
from ns_data.stage import InputError

TEACHER = dict(teacher="test_efficientnet", random_weights=True, num_classes=10, batch_size=4, topk=3)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (24, 16), (seed * 40 % 256, 90, 200)).save(out, "JPEG")
    return out.getvalue()


def write(path, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def outputs(output):
    def table(name):
        files = sorted(glob.glob(os.path.join(str(output), f"{name}-*.parquet")))
        return pq.read_table(files).to_pandas() if files else None

    with open(os.path.join(str(output), "stats.json")) as f:
        stats = json.load(f)
    return stats, table("labels"), table("errors")


def label(inputs, output, **kwargs):
    run_label(LabelOptions(inputs=tuple(str(i) for i in inputs), output=str(output), **TEACHER, **kwargs), [],
              echo=lambda message: None)
    stats, labels, errors = outputs(output)
    labels_n = 0 if labels is None else len(labels)
    errors_n = 0 if errors is None else len(errors)
    assert stats["images_read"] == stats["labeled"] + stats["errors"] == labels_n + errors_n
    return (stats, set() if labels is None else set(labels["id"]),
            {} if errors is None else dict(zip(errors["id"], errors["reason"])))


@pytest.fixture
def links(tmp_path):
    """An input with three images, a link to one of them, a linked directory of two images (outside the input),
    a dangling link, a link that loops to itself and a directory link back to the input."""
    d = tmp_path / "in"
    for i in range(3):
        write(d / f"a{i}.jpg", jpeg(i))
    for i in range(2):
        write(tmp_path / "elsewhere" / f"t{i}.jpg", jpeg(10 + i))
    os.symlink("a0.jpg", d / "link.jpg")
    os.symlink(tmp_path / "elsewhere", d / "linked")
    os.symlink("nowhere.jpg", d / "dangling.jpg")
    os.symlink("self.jpg", d / "self.jpg")
    os.makedirs(d / "sub")
    os.symlink("..", d / "sub" / "up")
    return d


def test_links_are_followed_and_dangling_and_looping_links_are_error_rows(tmp_path, links):
    stats, labeled, errors = label([links], tmp_path / "out")
    assert labeled == {"a0.jpg", "a1.jpg", "a2.jpg", "link.jpg", "linked/t0.jpg", "linked/t1.jpg"}
    assert errors == {"dangling.jpg": "dangling_link", "self.jpg": "symlink_loop", "sub/up": "symlink_loop"}
    assert stats["images_read"] == 9


def test_a_fifo_is_an_error_row_and_never_opened(tmp_path):
    d = tmp_path / "in"
    write(d / "a.jpg", jpeg(1))
    os.mkfifo(d / "pipe.jpg")  # opening it to read would block until a writer comes: the test would hang
    stats, labeled, errors = label([d], tmp_path / "out")
    assert labeled == {"a.jpg"} and errors == {"pipe.jpg": "not_a_regular_file"}


def test_a_name_that_is_not_utf8_is_an_error_row_with_an_escaped_id(tmp_path):
    d = tmp_path / "in"
    write(d / "a.jpg", jpeg(1))
    write(os.path.join(os.fsencode(d), b"caf\xe9.jpg"), jpeg(2))  # Latin-1, not UTF-8
    stats, labeled, errors = label([d], tmp_path / "out")
    assert labeled == {"a.jpg"} and errors == {"caf\\xe9.jpg": "non_utf8_name"}


def test_a_glob_lists_links_and_faults_the_way_a_directory_does(tmp_path, links):
    found = {os.path.relpath(p, links): reason for p, _, reason, _ in match_input(f"{links}/*.jpg")}
    assert found == {"a0.jpg": "", "a1.jpg": "", "a2.jpg": "", "link.jpg": "", "dangling.jpg": "dangling_link",
                     "self.jpg": "symlink_loop"}


def tfrecord_of(images: list[bytes]) -> bytearray:
    return bytearray(b"".join(tfrecord.frame_record(tfrecord.make_example({"image/encoded": im})) for im in images))


def test_a_bad_data_checksum_is_one_error_row_and_the_records_after_it_are_labeled(tmp_path):
    images = [jpeg(i) for i in range(6)]
    data = tfrecord_of(images)
    start = sum(len(tfrecord_of([im])) for im in images[:2])
    data[start + 12 + 5] ^= 0xFF  # in record 2's data: its length still holds
    write(tmp_path / "in" / "six.tfrecord", bytes(data))
    stats, labeled, errors = label([tmp_path / "in"], tmp_path / "out")
    assert labeled == {f"six.tfrecord#{i}" for i in (0, 1, 3, 4, 5)}
    assert errors == {"six.tfrecord#2": "corrupt_record"}


def test_a_bad_length_checksum_makes_the_rest_of_the_file_one_error_row_saying_the_bytes_lost(tmp_path):
    images = [jpeg(i) for i in range(6)]
    data = tfrecord_of(images)
    start = sum(len(tfrecord_of([im])) for im in images[:2])
    data[start] ^= 0xFF  # record 2's length: the framing after it is lost
    write(tmp_path / "in" / "six.tfrecord", bytes(data))
    label([tmp_path / "in"], tmp_path / "out")
    stats, labels, errors = outputs(tmp_path / "out")
    assert set(labels["id"]) == {"six.tfrecord#0", "six.tfrecord#1"}
    assert list(errors["id"]) == ["six.tfrecord#2"] and list(errors["reason"]) == ["corrupt_record"]
    assert f"remaining {len(data) - start} bytes" in errors["detail"][0]


def _as_without_dac_override(command: list[str]) -> list[str] | None:
    """`command` run so that file permissions apply to it: as root without the capabilities that bypass them
    (setpriv), as another user as it is. None when neither can be had."""
    if os.geteuid() != 0:
        return command
    setpriv = shutil.which("setpriv")
    if not setpriv:
        return None
    drop = "-dac_override,-dac_read_search"
    wrapped = [setpriv, f"--bounding-set={drop}", f"--inh-caps={drop}", "--"] + command
    probe = subprocess.run(wrapped[:-len(command)] + ["cat", "/proc/self/status"], capture_output=True, text=True)
    return wrapped if probe.returncode == 0 else None


def test_an_unreadable_directory_and_file_are_error_rows(tmp_path):
    d = tmp_path / "in"
    for i in range(2):
        write(d / f"a{i}.jpg", jpeg(i))
    for i in range(5):
        write(d / "locked" / f"l{i}.jpg", jpeg(10 + i))
    write(d / "secret.jpg", jpeg(20))
    out = tmp_path / "out"
    command = _as_without_dac_override([
        sys.executable, "-m", "ns_data.cli", "label", str(d), "--output", str(out), "--teacher", "test_efficientnet",
        "--random-weights", "--num-classes", "10", "--batch-size", "4"])
    if command is None:
        pytest.skip("running as root without setpriv able to drop CAP_DAC_OVERRIDE: permissions cannot apply")
    os.chmod(d / "locked", 0)
    os.chmod(d / "secret.jpg", 0)
    try:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")]))}
        run = subprocess.run(command, capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=600)
    finally:
        os.chmod(d / "locked", 0o755)
        os.chmod(d / "secret.jpg", 0o644)
    assert run.returncode == 0, run.stderr[-3000:]
    stats, labels, errors = outputs(out)
    assert set(labels["id"]) == {"a0.jpg", "a1.jpg"}
    assert dict(zip(errors["id"], errors["reason"])) == {"locked": "unreadable_directory",
                                                         "secret.jpg": "unreadable_file"}
    assert stats["images_read"] == stats["labeled"] + stats["errors"] == 4


def test_an_input_named_on_the_command_line_that_cannot_be_read_is_a_one_line_error(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    os.symlink("nowhere.jpg", tmp_path / "dangling.jpg")
    with pytest.raises(InputError, match="a FIFO; not opened"):
        plan_inputs([str(tmp_path / "pipe.jpg")])
    with pytest.raises(InputError, match="links to nowhere.jpg, which does not exist"):
        plan_inputs([str(tmp_path / "dangling.jpg")])


def test_a_tar_member_with_an_image_name_that_is_a_link_is_an_error_row(tmp_path):
    os.makedirs(tmp_path / "in")
    with tarfile.open(tmp_path / "in" / "shard.tar", "w") as tar:
        info = tarfile.TarInfo("k0.jpg")
        data = jpeg(1)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("k1.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "k0.jpg"
        tar.addfile(link)
    stats, labeled, errors = label([tmp_path / "in"], tmp_path / "out")
    assert labeled == {"shard.tar/k0.jpg"} and errors == {"shard.tar/k1.jpg": "not_a_regular_file"}


def test_a_glob_walks_no_deeper_than_it_reaches(tmp_path, links):
    write(links / "sub" / "deep.jpg", jpeg(5))
    found = {os.path.relpath(p, links): reason for p, _, reason, _ in match_input(f"{links}/*/*.jpg")}
    # self.jpg loops: whether it would be a file or a directory cannot be known, so it is reported where the
    # pattern would enter a directory; sub/up (a loop found inside sub/) is below where the pattern reaches.
    assert found == {"linked/t0.jpg": "", "linked/t1.jpg": "", "sub/deep.jpg": "", "self.jpg": "symlink_loop"}
    calls = []
    original = os.scandir
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "scandir", lambda path: calls.append(path) or original(path))
        list(match_input(f"{links}/*.jpg"))
    assert calls == [str(links)]


def test_a_file_read_back_that_became_a_fifo_is_an_error_not_a_hang(tmp_path):
    from ns_data.sources import read_back

    os.mkfifo(tmp_path / "was.jpg")
    (data, reason, detail), = read_back(str(tmp_path / "was.jpg"), [None])
    assert data is None and reason == "not_a_regular_file"
