"""Run stages of a recipe (generate, score, select, train) in one process or under a launcher.

    python tests/scripts/run_stage.py generate,score RECIPE key=value ...
    ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 tests/scripts/run_stage.py ...

``--sleep-after-shard S`` pauses S seconds after each shard is written, which gives a test a window in
which one shard is complete and the next one is in progress (to kill the job there).
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

import mpo.generate
from mpo.config import load_recipe
from mpo.distributed import end_session, make_accelerator
from mpo.generate import generate_stage
from mpo.score import score_stage
from mpo.select import select_stage
from mpo.train import setup_accelerator, train_stage


def _slow_down_shard_writes(seconds: float) -> None:
    original = mpo.generate.write_shard

    @functools.wraps(original)
    def write_then_sleep(*args, **kwargs):
        original(*args, **kwargs)
        time.sleep(seconds)

    mpo.generate.write_shard = write_then_sleep


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("stages", help="comma-separated, in order: generate, score, select, train")
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--sleep-after-shard", type=float, default=0.0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.sleep_after_shard:
        _slow_down_shard_writes(args.sleep_after_shard)
    recipe = load_recipe(args.recipe, args.overrides)
    names = args.stages.split(",")
    # One Accelerator for every stage, as `mpo run` builds it: training needs the recipe's settings.
    accelerator = setup_accelerator(recipe) if "train" in names else make_accelerator(recipe)
    stages = {"generate": generate_stage, "score": score_stage, "select": select_stage, "train": train_stage}
    for name in names:
        stages[name](recipe, accelerator)
    # As `mpo` does: the process group ends here, not at interpreter exit (where tearing it down can
    # abort a process: "terminate called without an active exception").
    end_session(accelerator)


if __name__ == "__main__":
    main()
