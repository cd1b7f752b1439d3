"""What both command lines (`ns-data`, `ns-train`) do at the terminal: logging cut to warnings and errors, a
user's error or a full disk printed as one line (`OneLineErrors`, `disk_full`), and leaving once the command is
done (`leave`). No Beam and no torch here: the trainer imports it too.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import sys

import click

from ns_data.stage import StageError, no_such_option


class _DropNoise(logging.Filter):
    """Beam warns about optional GCP client libraries on import, and its local worker processes about a staging
    directory they do not need; neither concerns the user."""

    NOISE = ("apitools not found", "No semi_persistent_directory found")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.NOISE)


_STEP = re.compile(r" \[while running '[^']*'\]")  # what Beam appends to the message of a step's error
_RAISED = re.compile(r"((?:ns_data|ns_train)(?:\.\w+)+)\.(\w+): ")  # "module.Class: " of a traceback's last line


def _is_stage_error(module: str, name: str) -> bool:
    """Whether `module.name` is a StageError class, looked up among the modules this process has imported (a
    worker raises only what the launcher's modules define)."""
    cls = getattr(sys.modules.get(module), name, None)
    return isinstance(cls, type) and issubclass(cls, StageError)


def worker_stage_error(text: str) -> str | None:
    """The message of a StageError that a Beam worker process raised, from the text of the error the runner
    raises in its stead (the worker's traceback); None when the text holds none."""
    for found in _RAISED.finditer(text):
        if _is_stage_error(found.group(1), found.group(2)) and text[:found.start()].endswith("\n"):
            message = text[found.end():].split("\n\n", 1)[0]
            return _STEP.sub("", message).strip()
    return None


class _DropReported(logging.Filter):
    """Beam logs a step's error with its traceback before raising it; a full disk or a user's error (a
    StageError, raised in this process or in a worker) is then reported by the error printer in one line, so
    Beam's record of it is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.ERROR or not record.name.startswith("apache_beam"):
            return True
        if record.exc_info and isinstance(record.exc_info[1], StageError):
            return False
        text = record.getMessage() + (logging.Formatter().formatException(record.exc_info) if record.exc_info else "")
        if any(_is_stage_error(*found.groups()) for found in _RAISED.finditer(text)):
            return False
        return "No space left on device" not in text and "Disk quota exceeded" not in text


def quiet_logging() -> None:
    """Warnings and errors only, without the import-time noise of optional libraries."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(_DropNoise())
        handler.addFilter(_DropReported())


class OneLineErrors(click.Group):
    """A user's error (a StageError: bad option, missing input, output in the way), a filesystem error, a full
    disk met anywhere in the command (disk_full) or a command line click cannot parse (an unknown option: the
    closest one named) is printed as one line, `Error: ...`, exit status 1; no traceback."""

    def __call__(self, *args, **kwargs):
        """The program, `ns-data` or `ns-train` (the console script calls the group; tests and `ns-train loop` call
        `main`)."""
        try:
            return self.main(*args, **kwargs)
        except SystemExit as done:
            leave(done)

    def invoke(self, ctx):
        typed = list(ctx.args)  # the command's arguments (click empties ctx.args when it invokes the command)
        try:
            return super().invoke(ctx)
        except click.NoSuchOption as err:
            command = err.ctx.command if err.ctx else self
            where = err.ctx.command_path if err.ctx else ctx.command_path
            raise click.ClickException(str(no_such_option(err.option_name, own_options(command), where))) from err
        except Exception as err:
            line = one_line(err, output_arg(typed))
            if line is None:
                raise
            raise click.ClickException(line) from err


def one_line(err: BaseException, output: str | None = None) -> str | None:
    """The line a user's error is printed as (after `Error: `): a command line click cannot parse, a full disk
    met anywhere in the command (disk_full; `output`: the command's --output), a StageError (in this process, or
    in a Beam worker: worker_stage_error) or a filesystem error; None for anything else, a bug, whose traceback
    is shown."""
    if isinstance(err, click.ClickException):
        return err.format_message()
    full = disk_full(err, output)
    if full:
        return full
    if isinstance(err, StageError):
        return _STEP.sub("", str(err))
    if isinstance(err, OSError):
        return str(err)
    return worker_stage_error(str(err))


_NO_SPACE = re.compile(r"\[Errno (?:28|122)\] (?:No space left on device|Disk quota exceeded)(?:: '([^']+)')?")


def output_arg(args: list[str]) -> str | None:
    """The command's --output, from its arguments as typed."""
    for i, arg in enumerate(args):
        if arg == "--output" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--output="):
            return arg.split("=", 1)[1]
    return None


def disk_full(err: BaseException, output: str | None = None) -> str | None:
    """One line for a full disk met anywhere in the command: in this process (an OSError, ENOSPC or EDQUOT, in
    the exception or what caused it) or in a Beam worker (its error's text). It names the file (when the error
    does; else the command's `output`) and, when the error says (a `needed` attribute: the trainer's
    checkpoint), the space needed and the space free."""
    path = needed = None
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            path, needed = err.filename, getattr(err, "needed", None)
            break
        found = _NO_SPACE.search(str(err))
        if found:
            path = found.group(1)
            break
        err = err.__cause__ or err.__context__
    else:
        return None
    message = ("no space left on device" + (f" writing {path}" if path else f" writing into {output}" if output
                                            else ""))
    if needed:
        free = _free_bytes(path)
        message += f": it needs about {needed / 1e6:,.1f} MB" + (f", {free / 1e6:,.1f} MB free" if free is not None
                                                                 else "")
    return message + "; free some space and run the same command again (it resumes)"


def _free_bytes(path: str | None) -> int | None:
    directory = os.path.dirname(str(path))
    while directory and not os.path.isdir(directory):
        directory = os.path.dirname(directory)
    try:
        return shutil.disk_usage(directory or ".").free
    except OSError:
        return None


def leave(done: SystemExit) -> None:
    """Ends the program once its command is done, without tearing the interpreter down.

    Python's finalization frees every module and object one by one: with torch, timm and Beam loaded that is
    about 1.3 s on 2 cores, longer than labeling 50 images takes. What it would do that matters is done here:
    non-daemon threads are joined (threading's own shutdown), the atexit functions run (logging's flush among
    them), stdout and stderr are flushed; then the process exits with the command's status. A program without
    torch loaded exits as usual."""
    import atexit
    import threading

    code = done.code
    status_is_a_number = code is None or isinstance(code, int)
    if "torch" not in sys.modules or not status_is_a_number or not hasattr(threading, "_shutdown"):
        raise done
    threading._shutdown()  # joins non-daemon threads, as the interpreter does first when it exits
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more to say
            pass
    os._exit(code or 0)


def own_options(command: click.Command) -> list[str]:
    """Every spelling of the command's options (--per-class, --no-upsample, -h...)."""
    return [o for p in command.get_params(click.Context(command)) for o in (*p.opts, *p.secondary_opts)
            if o.startswith("-")]
