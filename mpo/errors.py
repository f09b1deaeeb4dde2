"""How an error ends a command: its exit status and its one-line message.

- 2: bad input (command line, recipe, files, checklist, run directory: the project's ``ValueError``
  subclasses) and a file system that refuses a write or a read (disk full, read-only, no
  permission, a file where a folder should be): the message names the file, key or value.
- 1: a run that cannot go on (the project's ``RuntimeError`` subclasses, e.g. a non-finite loss).
- 128 + N: stopped by signal N after saving what it could (SIGTERM 143, SIGINT 130).
- None: anything else is a bug and keeps its traceback.

An exception may also carry its own ``exit_status`` (errors agreed across processes do).
"""

from __future__ import annotations

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

# What a user fixes outside the program (free space, permissions, mounts, a wrong path type).
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EFBIG,
}
# How libraries that do not raise OSError (safetensors, torch.save) say the same thing.
ENVIRONMENT_TEXTS = (
    "No space left on device",
    "StorageFull",
    "Disk quota exceeded",
    "Read-only file system",
    "ReadOnlyFilesystem",
    "Permission denied",
    "PermissionDenied",
)


def is_environment_error(err: BaseException) -> bool:
    """A write or read the file system refused (disk full, read-only, no permission, ...)."""
    if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
        return True
    text = str(err)
    return any(t in text for t in ENVIRONMENT_TEXTS)


def exit_status(err: BaseException) -> int | None:
    """The exit status ``err`` ends a command with, or None for a bug (which keeps its traceback)."""
    status = getattr(err, "exit_status", None)
    if isinstance(status, int):
        return status
    if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS:
        return 2
    if type(err).__module__.split(".")[0] not in ("mpo", "reward"):
        return None
    if isinstance(err, ValueError):
        return 2
    if isinstance(err, RuntimeError):
        return 1
    return None


def print_line(line: str) -> None:
    """Write a message and its newline to stderr in a single system call. Under a launcher every rank
    shares one pipe; ``print`` writes the text and its newline separately, so two ranks' lines can
    run together into one. A single write of up to PIPE_BUF bytes (4096 on Linux) reaches the pipe
    whole (a recipe error listing several problems keeps its lines together too)."""
    sys.stderr.flush()
    data = (line + "\n").encode("utf-8", "replace")
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # a stream without a descriptor (a test's capture)
        sys.stderr.write(data.decode("utf-8"))
        sys.stderr.flush()
        return
    while data:
        data = data[os.write(fd, data) :]


def message(err: BaseException) -> str:
    """One line for the user: an OSError names its file and the reason, without the errno noise."""
    if isinstance(err, OSError) and err.errno in ENVIRONMENT_ERRNOS and err.filename:
        target = f"{err.filename} -> {err.filename2}" if err.filename2 else str(err.filename)
        return f"{target}: {err.strerror}"
    return str(err)


def errors_reach_every_rank(stage: Callable[..., T]) -> Callable[..., T]:
    """Decorator for a stage function: under ``accelerate launch``, an exception on one process is
    sent to every process (at their next exchange, :func:`mpo.distributed.report_failure`) before it
    ends this one, so all of them stop with its message. Nested stages (``mpo run``) report it once.
    Costs nothing until an error happens (the distributed machinery is imported only then)."""

    @functools.wraps(stage)
    def guarded(*args: Any, **kwargs: Any) -> T:
        try:
            return stage(*args, **kwargs)
        except Exception as err:
            from mpo.distributed import report_failure

            report_failure(err)
            raise

    return guarded
