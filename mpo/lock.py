"""One writer per run directory: a lock file that names its holder.

``<output_dir>/.mpo.lock`` is created (``O_CREAT | O_EXCL``, so two commands cannot both succeed) by
the main process of every command that writes to the run directory, and removed when it ends,
whatever way it ends short of SIGKILL. It holds JSON: host, pid, the process's start time, the
command, when it started. A second command on the same directory refuses with a message naming the
holder, instead of two writers interleaving shards and checkpoints.

A lock whose holder is gone is stale and is taken over, with a note: on the same host, when no process
with that pid and start time runs; on another host (a shared file system), when the holder stopped
refreshing the file's modification time, which it does every :data:`HEARTBEAT_SECONDS` from a
background thread, for :data:`STALE_AFTER_SECONDS`.

A run directory that cannot be written (a read-only disk) takes no lock: nobody can write there, so
there is nothing to protect, and a finished run must still answer "up to date" from it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_NAME = ".mpo.lock"
HEARTBEAT_SECONDS = 60.0
STALE_AFTER_SECONDS = 15 * 60.0


class RunLockedError(ValueError):
    """Another command holds the run directory (or it cannot be used at all); the message says who."""


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None


def _holder_alive(holder: dict[str, Any], path: Path) -> bool:
    if holder.get("host") == socket.gethostname():
        started = _start_time(int(holder.get("pid", -1)))
        if started is None:
            return False
        recorded = holder.get("process_started")  # a reused pid has another start time
        return recorded is None or abs(started - float(recorded)) < 1.0
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False
    return age < STALE_AFTER_SECONDS


def _check_output_dir(root: Path) -> None:
    for parent in (root, *root.parents):
        if parent.exists():
            if not parent.is_dir():
                where = "is" if parent == root else f"is under {parent}, which is"
                raise RunLockedError(f"output_dir={str(root)!r} {where} a file, not a folder")
            return


class RunLock:
    """The lock of one run directory, held by this process (see the module docstring)."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)
        self.path = self.root / LOCK_NAME
        self.held = False
        self.note: str | None = None  # what happened to a stale lock, for the user
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> RunLock:
        _check_output_dir(self.root)
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM) and self.root.is_dir():
                return self  # read-only: nothing can be written, so nothing to protect
            raise RunLockedError(
                f"output_dir={str(self.root)!r}: cannot be created ({err.strerror})"
            ) from err
        record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "process_started": _start_time(os.getpid()),
            "command": " ".join(sys.argv),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._take_over_if_stale()
                continue
            except OSError as err:
                if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                    return self  # read-only run directory
                raise RunLockedError(f"{self.path}: cannot create the run lock ({err.strerror})") from err
            with os.fdopen(fd, "w") as handle:
                json.dump(record, handle)
            self.held = True
            self._start_heartbeat()
            return self
        raise RunLockedError(f"{self.path}: could not take the run lock (it keeps changing)")

    def _take_over_if_stale(self) -> None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return  # released meanwhile: try again
        except (OSError, ValueError):
            holder = {}
        if holder and _holder_alive(holder, self.path):
            raise RunLockedError(
                f"{self.root} is in use by another mpo command (pid {holder.get('pid')} on "
                f"{holder.get('host')}, since {holder.get('started')}: {holder.get('command')}); wait for it "
                f"to finish, or use another output_dir. If no such command runs, delete {self.path}"
            )
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "an unreadable lock"
        self.note = f"took over the stale run lock of {who}, which no longer runs"

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_SECONDS):
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name="mpo-run-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self.held = False


@contextlib.contextmanager
def run_lock(root: str | os.PathLike, main: bool = True) -> Iterator[RunLock | None]:
    """Hold the lock of run directory ``root`` for the block (only on the main process)."""
    if not main:
        yield None
        return
    lock = RunLock(root).acquire()
    try:
        if lock.note:
            print(f"mpo: {lock.note}", file=sys.stderr)
        yield lock
    finally:
        lock.release()
