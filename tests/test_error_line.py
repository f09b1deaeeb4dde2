"""The final error line reaches a shared stderr pipe whole, even when two ranks write at once."""

from __future__ import annotations

import os
import subprocess
import sys

from mpo.errors import print_line

WRITER = """
import sys
from mpo.errors import print_line
for i in range(300):
    print_line(f"rank {sys.argv[1]} line {i} " + "x" * 300)
"""


def test_the_line_and_its_newline_go_out_in_one_write(monkeypatch, tmp_path):
    writes: list[bytes] = []
    with (tmp_path / "stderr").open("w") as stream:
        monkeypatch.setattr(sys, "stderr", stream)
        monkeypatch.setattr(os, "write", lambda fd, data: writes.append(bytes(data)) or len(data))
        print_line("mpo run: recipe.yaml: 2 problems\n  generate.seed ...\n  train.beta ...")
    assert writes == [b"mpo run: recipe.yaml: 2 problems\n  generate.seed ...\n  train.beta ...\n"]


def test_two_processes_sharing_one_pipe_never_run_their_lines_together():
    read, write = os.pipe()
    workers = [subprocess.Popen([sys.executable, "-c", WRITER, str(rank)], stderr=write) for rank in (0, 1)]
    os.close(write)
    with os.fdopen(read, encoding="utf-8") as shared:
        lines = shared.read().splitlines()
    assert [worker.wait(timeout=120) for worker in workers] == [0, 0]
    assert len(lines) == 600
    assert all(
        line.startswith("rank ") and line.count("rank") == 1 and line.endswith("x" * 300) for line in lines
    )
