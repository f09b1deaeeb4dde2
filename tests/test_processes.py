"""The test helper that starts launches: a timeout stops the launcher's workers too."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from tests.scripts.processes import run_launch

# A "launcher" that starts a worker and waits: the worker writes its pid, then sleeps.
LAUNCHER = """
import subprocess, sys
worker = subprocess.Popen([sys.executable, "-c", "import os, time; print(os.getpid(), flush=True); time.sleep(60)"],
                          stdout=sys.stdout)
worker.wait()
"""


def test_a_timeout_kills_the_workers_of_the_launch():
    started = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired) as caught:
        run_launch([sys.executable, "-c", LAUNCHER], timeout=3, capture_output=True, text=True)
    assert time.monotonic() - started < 30
    worker = int(caught.value.stdout.split()[0])
    time.sleep(0.2)
    assert not _running(worker)  # gone with its launcher


def _running(pid: int) -> bool:
    """Alive and not a zombie (a killed orphan stays a zombie until something reaps it)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def test_it_returns_what_subprocess_run_returns():
    done = run_launch(
        [sys.executable, "-c", "import sys; print('out'); sys.exit(3)"],
        timeout=30,
        capture_output=True,
        text=True,
    )
    assert (done.returncode, done.stdout) == (3, "out\n")
    with pytest.raises(subprocess.CalledProcessError):
        run_launch([sys.executable, "-c", "raise SystemExit(1)"], timeout=30, check=True)
