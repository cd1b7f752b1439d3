"""Class names: what a class number means to a person. The data keeps class ids; names are for display.

Names come from a file the user gives (`--class-names`): plain text with one name per line (line N is class N),
a JSON list, or a JSON object {"id": "name"} (ids without a name stay unnamed; Keras' `imagenet_class_index.json`,
{"0": ["n01440764", "tench"], ...}, works as it is); or else from the teacher when timm knows them (timm's
ImageNet class info for a head of an ImageNet subset). `label` records them in the teacher's identity
(`class_names`, and where they came from in `class_names_from`), which every output's marker holds once (label's
and balance's stats.json, the shard manifest); data files hold no names.
"""
from __future__ import annotations

import json

from ns_data import fs
from ns_data.stage import InputError


def from_timm(model) -> list[str] | None:
    """The short names of the ImageNet subset a timm model's head predicts (`tench`, `Samoyed`), or None when
    the head is not an ImageNet one (a fine-tuned or student head of other classes). timm guesses the subset
    from the class count (`timm_subset`), as its own tools do."""
    from timm.data import ImageNetInfo

    subset = timm_subset(model)
    if subset is None:
        return None
    info = ImageNetInfo(subset)
    if info.num_classes() != getattr(model, "num_classes", None):
        return None
    return [text.split(",")[0].strip() for text in info.label_descriptions()]


def timm_subset(model) -> str | None:
    """The ImageNet subset timm takes a model's head to predict (`imagenet-1k`), or None."""
    from timm.data import infer_imagenet_subset

    return infer_imagenet_subset(model)


def _read(path: str) -> tuple[list[str], bool]:
    """(names, whether the file gives every class: False for a JSON object, whose missing ids are unnamed)."""
    if not fs.exists(path):
        raise InputError(f"--class-names: file not found: {path}")
    with fs.open_read(path) as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"--class-names {path}: not UTF-8 text ({err.reason} at byte {err.start})") from err
    if path.endswith(".json"):
        try:
            value = json.loads(text)
        except json.JSONDecodeError as err:
            raise InputError(f"--class-names {path}: not valid JSON ({err})") from err
        if isinstance(value, dict):
            try:
                by_id = {int(k): _name(v) for k, v in value.items()}
            except ValueError as err:
                raise InputError(f"--class-names {path}: keys must be class ids (integers)") from err
            if min(by_id, default=0) < 0:
                raise InputError(f"--class-names {path}: class ids must be >= 0")
            return [by_id.get(i, "") for i in range(max(by_id, default=-1) + 1)], False
        if isinstance(value, list):
            return [_name(v) for v in value], True
        raise InputError(f"--class-names {path}: expected a JSON list or object of names")
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:  # a trailing blank line is not a class
        lines.pop()
    return lines, True


def _name(value) -> str:
    """A name as JSON gives it: a string, or a list whose last item is the name (["n01440764", "tench"])."""
    if isinstance(value, list) and value:
        value = value[-1]
    return str(value).strip()


def read_file(path: str, num_classes: int | None = None) -> list[str]:
    """Names from a --class-names file (text, a line per class; a JSON list; or a JSON {id: name} object),
    checked against the class count when it is given (a JSON object may leave classes unnamed)."""
    names, complete = _read(path)
    if num_classes is not None:
        if complete:
            check_count(names, num_classes, path)
        elif len(names) > num_classes:
            raise InputError(f"--class-names {path}: names class {len(names) - 1:,}, but the teacher has "
                             f"{num_classes:,} classes")
        else:
            names = names + [""] * (num_classes - len(names))
    return names


def check_count(names: list[str], num_classes: int, source: str) -> None:
    if len(names) != num_classes:
        raise InputError(f"--class-names {source}: {len(names):,} names for a teacher of {num_classes:,} classes")


def of_teacher(teacher: dict | None) -> list[str] | None:
    """The names recorded in a teacher identity (stats.json, Parquet metadata, shard manifest), or None."""
    return (teacher or {}).get("class_names") or None


def display(label: int, names: list[str] | None) -> str:
    """`258 Samoyed` when the class has a name, else `258`."""
    label = int(label)
    name = names[label] if names is not None and 0 <= label < len(names) else ""
    return f"{label} {name}" if name else str(label)
