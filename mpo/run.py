"""``mpo run``: every stage in order on one run directory, each skipped when its work is done.

::

    mpo run recipes/tiny/sdxl.yaml                                                   # 1 process
    accelerate launch --config_file launch/multi_gpu.yaml -m mpo.cli run RECIPE        # 8 GPUs

generate -> score -> select -> train (with eval) -> export; with ``rounds`` in the recipe, rounds of
generate -> score -> select -> train from the current policy, then export (:mod:`mpo.rounds`).
Each stage decides for itself what is already done (complete shards, score files, an up-to-date
pairs file, a checkpoint at
``train.max_steps``, an export of the chosen checkpoint), so a rerun after a kill picks up where the
job stopped and a rerun of a finished run does nothing. A stage whose finished work was made with other
settings refuses, naming the key; ``force`` redoes it and, through the content hashes each later stage
checks, everything after it.

One Accelerator serves every stage: accelerate cannot change mixed precision once set, and training
needs the recipe's. Its process group lives for the whole command and is torn down once, at the end
(:func:`mpo.distributed.end_session`), so that under ``accelerate launch`` the export after training
and the closing tables run on a live group and every rank exits 0.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from accelerate import Accelerator

from mpo.distributed import end_session, errors_reach_every_rank, is_main
from mpo.store import RunDir


@dataclass
class StageReport:
    name: str
    did_work: bool  # as the main process saw it
    seconds: float
    summary: Any


def _generate(recipe: Any, acc: Accelerator, force: bool) -> tuple[bool, Any]:
    from mpo.generate import generate_stage

    summary = generate_stage(recipe, acc, force=force)
    return summary.get("shards generated now", 0) > 0, summary


def _score(recipe: Any, acc: Accelerator, force: bool) -> tuple[bool, Any]:
    from mpo.score import score_stage

    summary = score_stage(recipe, acc, force=force)
    return summary.get("shards scored now", 0) > 0, summary


def _select(recipe: Any, acc: Accelerator, force: bool) -> tuple[bool, Any]:
    from mpo.select import select_stage

    pairs = RunDir.from_recipe(recipe).pairs_parquet
    before = pairs.stat().st_mtime_ns if pairs.exists() else None
    stats = select_stage(recipe, acc, force=force)
    return pairs.stat().st_mtime_ns != before, stats


def _train(recipe: Any, acc: Accelerator, force: bool) -> tuple[bool, Any]:
    from mpo.train import train_stage

    summary = train_stage(recipe, acc, force=force)
    return summary.get("steps trained now", 0) > 0, summary


def _export(recipe: Any, acc: Accelerator, force: bool) -> tuple[bool, Any]:
    from mpo.export import export_stage

    summary = export_stage(recipe, acc, force=force)
    return bool(summary.get("exported")), summary


STAGES: list[tuple[str, Callable[[Any, Accelerator, bool], tuple[bool, Any]]]] = [
    ("generate", _generate),
    ("score", _score),
    ("select", _select),
    ("train", _train),
    ("export", _export),
]


@errors_reach_every_rank
def run_all(recipe: Any, accelerator: Accelerator | None = None, force: bool = False) -> list[StageReport]:
    """Run (or finish) every stage; returns what each did and how long it took. With ``force``, a
    stage made with other settings is redone (and so is everything after it) instead of refused."""
    from mpo.train import setup_accelerator

    acc = accelerator if accelerator is not None else setup_accelerator(recipe)
    reports, stages = [], STAGES
    if recipe.rounds.count:  # iterative MPO: rounds of generate, score, select and train, then export
        from mpo.rounds import run_rounds

        reports, stages = run_rounds(recipe, acc, force), [s for s in STAGES if s[0] == "export"]
    for name, stage in stages:
        started = time.perf_counter()
        did_work, summary = stage(recipe, acc, force)
        reports.append(StageReport(name, did_work, round(time.perf_counter() - started, 2), summary))
    if is_main(acc):
        print_run_summary(RunDir.from_recipe(recipe), reports, recipe)
    if accelerator is None:  # built here: the session ends here, once, after every stage
        end_session(acc)
    return reports


def print_run_summary(run: RunDir, reports: list[StageReport], recipe: Any = None) -> None:
    """The closing tables: what each stage did, each round's numbers (iterative runs), and the
    held-out reward before and after training."""
    from rich.console import Console
    from rich.table import Table

    from mpo.export import before_after, fmt

    stages = Table(title=f"mpo run -> {run.root}")
    for column in ("stage", "work", "seconds"):
        stages.add_column(column)
    for r in reports:
        stages.add_row(r.name, "done now" if r.did_work else "skipped (up to date)", f"{r.seconds:.1f}")
    console = Console()
    console.print(stages)
    if recipe is not None and recipe.rounds.count:
        from mpo.rounds import print_rounds_table

        print_rounds_table(run, recipe)
    scores = before_after(run, _exported_step(reports))
    if scores.empty:
        return
    table = Table(title=f"held-out reward: step 0 -> step {scores.attrs['step']}")
    for column in ("metric", "before", "after", "change"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for r in scores.itertuples():
        table.add_row(r.metric, fmt(r.before), fmt(r.after), fmt(r.change, "+"))
    console.print(table)


def _exported_step(reports: list[StageReport]) -> int | None:
    for r in reports:
        if r.name == "export" and isinstance(r.summary, dict):
            return r.summary.get("step")
    return None
