"""``mpo`` with shard writes and training steps slowed down, so that a test can kill an iterative run
in the middle of a round's generation or training.

    python tests/scripts/slow_rounds.py SECONDS MARKERS mpo-args...

After writing a shard, a process touches ``MARKERS/<round folder>-<shard file>`` and sleeps SECONDS;
when it starts optimizer step n it touches ``MARKERS/step-<n>`` and sleeps SECONDS. Then the command
runs as ``mpo`` would (same exit status).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import mpo.generate
import mpo.train
from mpo.cli import main


def slowed(seconds: float, markers: Path) -> None:
    write, step = mpo.generate.write_shard, mpo.train.dpo_step

    def write_then_sleep(path, *args, **kwargs):
        write(path, *args, **kwargs)
        (markers / f"{Path(path).parent.parent.name}-{Path(path).name}").touch()
        time.sleep(seconds)

    def sleep_then_step(t, batch):
        (markers / f"step-{t.progress.step + 1}").touch()
        time.sleep(seconds)
        return step(t, batch)

    mpo.generate.write_shard = write_then_sleep
    mpo.train.dpo_step = sleep_then_step


if __name__ == "__main__":
    torch.set_num_threads(1)
    seconds, markers = float(sys.argv[1]), Path(sys.argv[2])
    markers.mkdir(parents=True, exist_ok=True)
    slowed(seconds, markers)
    sys.exit(main(sys.argv[3:]))
