"""Train a recipe in one process or under ``accelerate launch``, recording what each process did.

    accelerate launch --config_file launch/cpu_deepspeed_zero2.yaml tests/scripts/train_run.py RECIPE key=value ...

Each process writes ``<output_dir>/ranks/rank-<i>.json``: its process index, the number of processes,
the distributed type, the data-stream positions of the pairs it trained on and the logged values.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

import mpo.train
from mpo.config import load_recipe


def main() -> None:
    torch.set_num_threads(1)
    recipe = load_recipe(sys.argv[1], sys.argv[2:])
    positions: list[int] = []
    original = mpo.train.dpo_step

    def recording_step(t, batch):
        positions.extend(int(p) for p in batch["position"])
        return original(t, batch)

    mpo.train.dpo_step = recording_step
    trainers = []
    loop = mpo.train.train_loop

    def keep(t):
        trainers.append(t)
        return loop(t)

    mpo.train.train_loop = keep
    accelerator = mpo.train.setup_accelerator(recipe)
    mpo.train.train_stage(recipe, accelerator)
    record = {
        "process_index": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "distributed_type": accelerator.distributed_type.name
        if hasattr(accelerator.distributed_type, "name")
        else str(accelerator.distributed_type),
        "positions": positions,
        "history": trainers[0].history if trainers else [],
    }
    out = Path(recipe.output_dir) / "ranks" / f"rank-{accelerator.process_index}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record))


if __name__ == "__main__":
    main()
