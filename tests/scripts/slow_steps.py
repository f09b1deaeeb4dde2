"""``mpo`` with every training step slowed down, so that a test can signal a job in mid-training.

    accelerate launch --config_file launch/cpu_ddp.yaml tests/scripts/slow_steps.py SECONDS MARKERS mpo-args...

Each process sleeps SECONDS in every micro-step and touches ``MARKERS/rank-<i>-step-<n>`` when it
starts optimizer step n; then the command runs as ``mpo`` would (same exit status).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

import mpo.train
from mpo.cli import main


def slowed(seconds: float, markers: Path):
    original = mpo.train.dpo_step

    def step(t, batch):
        (markers / f"rank-{t.acc.process_index}-step-{t.progress.step + 1}").touch()
        time.sleep(seconds)
        return original(t, batch)

    return step


if __name__ == "__main__":
    torch.set_num_threads(1)
    seconds, markers = float(sys.argv[1]), Path(sys.argv[2])
    markers.mkdir(parents=True, exist_ok=True)
    mpo.train.dpo_step = slowed(seconds, markers)
    sys.exit(main(sys.argv[3:]))
