"""Stopping on SIGTERM / SIGINT at a step boundary, with a checkpoint to resume from.

SLURM sends SIGTERM before it kills a job at its time limit (``#SBATCH --signal`` says how long
before), and ``accelerate launch`` passes SIGTERM and SIGINT on to every process. During training the
handlers below only note the signal; at the end of the optimizer step the processes agree whether any
of them got one (:func:`mpo.distributed.any_rank`), and if so all of them write a checkpoint at that
step and stop with :class:`Interrupted` (exit status 128 + the signal's number) and a message saying
where the run resumes. A second SIGINT more than a second after the first stops at once (for an
impatient Ctrl-C; the launcher's forwarded copy of the first one arrives within that second).

Outside the training loop the command's own handler (:func:`raise_on_sigterm`) turns SIGTERM into
:class:`Interrupted` right away: every stage's files are written atomically, so what was finished
is kept and a rerun resumes.
"""

from __future__ import annotations

import signal
import threading
import time
from types import FrameType
from typing import Any

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(RuntimeError):
    """The run stopped because of a signal; the message says what was kept and how to resume."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_status = 128 + signum
        self.signum = signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequest:
    """Notes SIGTERM / SIGINT while installed; :meth:`agreed` asks every process at a step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.first_at = 0.0
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        now = time.monotonic()
        if self.signum == signal.SIGINT and signum == signal.SIGINT and now - self.first_at > 1.0:
            raise KeyboardInterrupt  # Ctrl-C twice: stop now, without the checkpoint
        if self.signum is None:
            self.signum, self.first_at = signum, now

    def install(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous.clear()

    def agreed(self) -> int | None:
        """The signal that stops every process now, or None (an exchange when distributed: call it at
        the same point on every process)."""
        from mpo.distributed import gather

        seen = [s for s in gather(None, self.signum) if s is not None]
        return seen[0] if seen else None


_ACTIVE: list[StopRequest] = []


def stop_on_signals() -> StopRequest:
    """Install the training loop's handlers (undone by :func:`restore_signals`)."""
    request = StopRequest().install()
    _ACTIVE.append(request)
    return request


def restore_signals() -> None:
    while _ACTIVE:
        _ACTIVE.pop().uninstall()


def _terminate(signum: int, frame: FrameType | None) -> None:
    error = Interrupted(
        f"stopped by {signal_name(signum)}; everything finished so far is kept (files are written "
        "atomically): run the same command again to resume",
        signum,
    )
    error.mpo_reported = True  # type: ignore[attr-defined]  (the signal reaches every process itself)
    raise error


def raise_on_sigterm() -> None:
    """For a whole command: SIGTERM raises :class:`Interrupted`, so that cleanup (the run lock,
    temporary files) runs before the process ends."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _terminate)
