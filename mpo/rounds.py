"""Iterative MPO: rounds that regenerate their candidates from the current policy (``rounds.count`` >= 1).

::

    mpo run recipes/tiny/sdxl_rounds.yaml                                            # 1 process
    accelerate launch --config_file launch/multi_gpu.yaml -m mpo.cli run RECIPE        # 8 GPUs
    mpo run recipes/sdxl/mpo.yaml rounds.count=3 rounds.prompts=fresh                # any recipe

Offline MPO trains on pairs sampled from the base model; once the policy has moved, those pairs no
longer describe where it is. Round r here samples ``generate.num_candidates`` candidates per prompt
from the policy that round r-1 trained (round 0: the base), scores them, keeps the pairs of the same
dominance rule (``select``, applied per round) and trains ``rounds.steps`` Diffusion-DPO steps on
them. The rounds continue one training run (weights, optimizer, learning-rate schedule over
``train.max_steps``, RNG, checkpoints, eval curve, best checkpoint); each round reads its own pairs
as a stream of its own (noise and timesteps drawn with the round's seed, from position 0)::

    round r:  generate (the policy at step r*K) -> score -> select -> train steps (r*K, (r+1)*K]

This is a loop around the stages themselves, on each round's view of the run directory
(:meth:`mpo.store.RunDir.round_dir`), not a second trainer; ``export`` follows the last round.

Layout::

    rounds/round-<r>/   candidates/, previews/, candidates.parquet, scores.parquet, pairs.parquet,
                        select_stats.json, recipe.yaml (the round's own: its generation seed),
                        policy/ (r >= 1: the weights it sampled from, hard links to the checkpoint's)
                        and trained.json (the round's training is done: its last step, that
                        checkpoint's id, the settings and inputs it was trained with)
    prompts.parquet, checkpoints/, eval.parquet, export/ at the root, as offline

Seeds: round 0 samples with ``generate.seed``, so its candidates are the offline run's for the same
prompts; round r >= 1 with ``candidate_seed(generate.seed, "round", r)``. Candidate (r, p, i) is a
function of (seed, r, prompt_id, i) alone, whatever the number of processes.

Prompts: ``rounds.prompts=same`` runs every round on the same train prompts (``prompts_per_round`` of
them, default all); ``fresh`` takes consecutive slices of one seeded permutation of the train
prompts, cyclically (default: an equal share each, so the rounds together cover the set once).
Held-out prompts get no candidates here: the eval curve (every ``eval.every`` steps and at the end of
every round) measures them.

Reference: ``rounds.reference=base`` (default) keeps the frozen base model, as offline; ``previous``
makes round r's reference the policy the round started from (:mod:`mpo.policy`), a trust region that
moves with the policy, as in iterative DPO. Either works with ``train.reference``: ``live`` runs it
next to the policy (a moving one: a frozen copy holding the round's starting weights);
``precomputed`` computes each round's errors before its first step, over the round's own stream
positions, into ``rounds/round-<r>/reference/`` (with the policy itself where it is the reference;
full fine-tuning with the base past round 0 reads the base denoiser again for that pass).

Resume: a round boundary is an ordinary checkpoint, and every round's training starts by resuming
from it, exactly as a run resumed after a kill does; each stage decides what it has done. A run
killed anywhere (mid-generate of round 3, mid-train of round 2) therefore ends with the candidates,
pairs and weights of an uninterrupted one. A round's shards record the id of the checkpoint they were
sampled from, and its trained.json the content hashes of its pairs and candidates: a round trained
again (``--force``) has every later round generated again.

Models: one sampling model is loaded per command and kept across the rounds for generation; each
round's policy is loaded into it in place (on a GPU it waits in host memory while the round scores
and trains). Scoring loads the VAE alone, as the score stage always does; the trainer builds its own
model per round, as the train stage always does, and resumes into it.

Where we depart from the online trainers (flow_grpo, DanceGRPO, ...): pairs are kept by per-round
dominance on every dimension, not by a scalar best-versus-worst; the update is Diffusion-DPO on
those pairs, not a policy gradient; a round trains many steps on a fixed pair set.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from accelerate import Accelerator

from mpo.backbones.base import Backbone
from mpo.backbones.registry import load_backbone
from mpo.distributed import (
    errors_reach_every_rank,
    is_main,
    main_process_first,
    wait_for_everyone,
    whole_model_loading,
)
from mpo.run import StageReport
from mpo.seeds import candidate_seed
from mpo.store import ROUNDS_DIR, RunDir, StoreError, prepare_prompts, read_parquet, write_text
from mpo.train_state import (
    PROGRESS,
    WEIGHTS,
    CheckpointError,
    checkpoint_dir,
    discard_training,
    is_deepspeed,
    latest_checkpoint,
    read_progress,
    verify_weights,
)

RECORD = "trained.json"
POLICY_DIR = "policy"
POLICY_RECORD = "policy.json"
STATS_NAME = "select_stats.json"


# ---- what a round is ------------------------------------------------------------------------------
def steps_per_round(recipe: Any) -> int:
    r = recipe.rounds
    return int(r.steps) if r.steps is not None else recipe.train.max_steps // r.count


def round_seed(seed: int, index: int) -> int:
    """The generation seed of round ``index``: the recipe's for round 0, a function of (seed, index)
    after it (blake2b, like every seed here: the same in every process and on every restart)."""
    return int(seed) if index == 0 else candidate_seed(seed, "round", index)


def round_recipe(recipe: Any, index: int) -> Any:
    """The recipe the data stages of round ``index`` run with: the run's, with the round's seed."""
    out = copy.deepcopy(recipe)
    out.generate.seed = round_seed(recipe.generate.seed, index)
    return out


def prompts_per_round(recipe: Any, train_prompts: int) -> int:
    r = recipe.rounds
    if r.prompts_per_round is not None:
        n = int(r.prompts_per_round)
    else:
        n = train_prompts if r.prompts == "same" else train_prompts // r.count
    if not 1 <= n <= train_prompts:
        why = (
            f"rounds.prompts=fresh shares {train_prompts} train prompts among {r.count} rounds"
            if r.prompts_per_round is None
            else f"must be in [1, {train_prompts}], the number of train prompts"
        )
        raise StoreError(
            f"rounds.prompts_per_round={r.prompts_per_round}: {why}; set rounds.prompts_per_round"
        )
    return n


def round_prompts(prompts: pd.DataFrame, recipe: Any, index: int) -> pd.DataFrame:
    """The train prompts of round ``index`` (rows of prompts.parquet, by prompt_id): the same ones
    every round, or the round's slice of one seeded permutation, taken cyclically."""
    train = (
        prompts[prompts["split"] == "train"].sort_values("prompt_id", kind="stable").reset_index(drop=True)
    )
    n = prompts_per_round(recipe, len(train))
    order = np.random.default_rng(candidate_seed(recipe.prompts.split_seed, "rounds", 0)).permutation(
        len(train)
    )
    if recipe.rounds.prompts == "fresh":
        picks = order[(index * n + np.arange(n)) % len(train)]
    else:
        picks = order[:n]
    return train.iloc[np.sort(picks)].reset_index(drop=True)


def round_settings(recipe: Any, index: int, prompts: int) -> dict[str, Any]:
    """What a round's weights depend on beyond the offline settings (train settings' ``rounds``).
    ``rounds.count`` is not among them: a run with a constant schedule may be given more rounds."""
    r = recipe.rounds
    return {
        "round": index,
        "steps": steps_per_round(recipe),
        "prompts": r.prompts,
        "prompts_per_round": prompts,
        "reference": r.reference,
        "max_pairs": r.max_pairs,
    }


@dataclass
class TrainRound:
    """One round as the train stage sees it (:func:`mpo.train.train_stage`'s ``train_round``)."""

    index: int
    run: RunDir  # the round's pairs and candidates; checkpoints and eval at the run's root
    start: int  # the step the round starts from: the previous round's last checkpoint
    until: int  # the step it trains to
    settings: dict[str, Any]  # round_settings(): recorded in the checkpoints under "rounds"
    start_settings: dict[str, Any] | None = None  # what the checkpoint at `start` was trained with
    reference: Path | None = None  # weights of the reference (rounds.reference=previous), None: the base

    def resumed_settings(self, latest: tuple[int, Path] | None, settings: dict[str, Any]) -> dict[str, Any]:
        """The settings the latest checkpoint must have been trained with: this round's, or at the
        round's start the previous round's (in this command's layout, which a resume must keep)."""
        step = latest[0] if latest is not None else 0
        if self.start > 0 and step < self.start:
            found = f" (the latest is step {step})" if latest is not None else ""
            raise CheckpointError(
                f"{checkpoint_dir(self.run, self.start)}: missing{found}; round {self.index} starts from the "
                f"checkpoint round {self.index - 1} ended on. Use a new output_dir, or delete "
                f"{self.run.root / ROUNDS_DIR} and {self.run.checkpoints} to run every round again"
            )
        if step > self.until:
            raise CheckpointError(f"{latest[1]}: past the end of round {self.index} (step {self.until})")
        if step == self.start and self.start_settings is not None:
            return {**self.start_settings, "layout": settings["layout"]}
        return settings

    def stream(self, seed: int, pairs_per_step: int) -> tuple[int, int]:
        """(seed, pairs seen before the round) of the round's data stream: its own noise and timestep
        draws (the round's seed), from its position 0 at the round's first step."""
        return round_seed(seed, self.index), self.start * pairs_per_step

    def reference_for(self, t: Any, pairs: pd.DataFrame) -> Any:
        """The round's reference, once the trainer is built and resumed (:func:`mpo.train.setup`).

        Live (``train.reference=live``): the trainer's own (the base: a frozen copy, or adapters
        off), or with ``rounds.reference=previous`` a frozen model of the weights the round started
        from (:func:`mpo.policy.reference_from_weights`). Precomputed: the errors of the round's own
        stream positions, computed by that same reference at the round's first step: the policy
        itself where it is the reference (round 0, or a moving reference), adapters off (LoRA), or
        for full fine-tuning past round 0 the base denoiser read from disk again for the pass."""
        from mpo.reference import REFERENCE_DIR, LiveReference

        recipe = t.recipe
        moving = self.reference is not None
        if recipe.train.reference != "precomputed":
            if not moving:
                return t.reference
            from mpo.policy import reference_from_weights

            frozen = t.reference.module if recipe.model.finetune == "full" else None
            module = reference_from_weights(
                t.backbone, t.policy, frozen, recipe.model.finetune, self.reference
            )
            return LiveReference(t.backbone, module)
        from mpo.train import setup_precomputed_reference

        seed, _ = self.stream(recipe.train.seed, 0)
        extra = {"round": self.index, "stream seed": seed, "reference": "previous" if moving else "base"}
        if moving:
            extra["policy"] = json.loads((self.reference.parent / POLICY_RECORD).read_text())["checkpoint id"]

        def live() -> Any:
            if t.progress.step != self.start:
                return None  # the round has trained: its errors are stored (or the pass says what is missing)
            if moving or (self.index == 0 and t.switch is None):
                return LiveReference(t.backbone, t.policy)
            if t.switch is not None:
                return LiveReference(t.backbone, t.policy, t.switch)
            return LiveReference(t.backbone, base_denoiser(recipe, t))

        stream = (seed, self.until - self.start, self.run.folder / REFERENCE_DIR)
        return setup_precomputed_reference(t, pairs, stream=stream, live=live, extra=extra)


def base_denoiser(recipe: Any, t: Any) -> Any:
    """The base model's denoiser, read from disk, frozen, in the dtypes of the trainer's policy."""
    from mpo.reference import match_dtypes

    with whole_model_loading():
        denoiser = load_backbone(recipe.model, t.acc.device).denoiser
    match_dtypes(denoiser, t.policy)
    return denoiser.requires_grad_(False).eval()


@dataclass(frozen=True)
class Policy:
    """The weights a round samples from: ``folder``/weights, and which checkpoint they are."""

    folder: Path
    record: dict[str, Any]  # {"step", "checkpoint", "checkpoint id"}: joins every shard's fingerprint


# ---- the models kept across rounds ------------------------------------------------------------------
class SamplingModel:
    """The model that generates in every round of one command: loaded once, then given each
    round's policy in place (:func:`mpo.policy.load_policy`)."""

    def __init__(self, recipe: Any, acc: Accelerator) -> None:
        self.recipe, self.acc = recipe, acc
        self.backbone: Backbone | None = None
        self.policy_id: str | None = None  # the checkpoint id of the weights in it; None: the base
        self.parked = False

    def with_policy(self, policy: Policy | None) -> Backbone:
        """The model holding ``policy`` (None: the base). Every process calls it at once."""
        from mpo.policy import load_policy

        want = policy.record["checkpoint id"] if policy is not None else None
        if self.backbone is not None and want is None and self.policy_id is not None:
            self.backbone = None  # the base after a policy: read it again (rounds never go back)
        if self.backbone is None:
            with main_process_first(self.acc), whole_model_loading():
                self.backbone = load_backbone(self.recipe.model, self.acc.device)
            self.policy_id, self.parked = None, False
        if self.parked:
            self.backbone.pipeline().to(self.acc.device)
            self.parked = False
        if policy is not None and want != self.policy_id:
            load_policy(self.backbone, self.recipe.model, self.recipe.model.finetune, policy.folder / WEIGHTS)
            self.policy_id = want
        return self.backbone

    def park(self) -> None:
        """Out of accelerator memory while a round trains (host memory; nothing to do on a CPU)."""
        if self.backbone is not None and not self.parked and self.acc.device.type != "cpu":
            import torch

            self.backbone.pipeline().to("cpu")
            self.parked = True
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


# ---- round files ------------------------------------------------------------------------------------
def read_record(view: RunDir) -> dict[str, Any] | None:
    """A round's trained.json, or None (missing, or damaged: the round's training is then checked
    against the checkpoints again)."""
    path = view.folder / RECORD
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_record(
    view: RunDir, index: int, step: int, settings: dict[str, Any], acc: Accelerator
) -> dict[str, Any]:
    """Record that round ``index`` trained to ``step`` (main process writes; every process reads)."""
    if is_main(acc):
        checkpoint = checkpoint_dir(view, step)
        record = {
            "round": index,
            "step": step,
            "checkpoint": checkpoint.name,
            "checkpoint id": read_progress(checkpoint).id,
            "settings": settings,
        }
        write_text(view.folder / RECORD, json.dumps(record, indent=2))
    wait_for_everyone(acc)
    record = read_record(view)
    if record is None:
        raise StoreError(f"{view.folder / RECORD}: not readable right after it was written")
    return record


def discard_rounds_training(root: RunDir, count: int) -> None:
    """``--force``: every checkpoint, eval.parquet and every round's trained.json (main process)."""
    discard_training(root)
    for index in range(count):
        (root.round_dir(index).folder / RECORD).unlink(missing_ok=True)


def round_policy(view: RunDir, index: int, start: int, previous: dict[str, Any], acc: Accelerator) -> Policy:
    """Round ``index``'s policy folder: hard links to the weights of the checkpoint the previous round
    ended on (``previous``: its trained.json), made once and kept with the round (a later pruning of
    the checkpoint does not take them away)."""
    folder = view.folder / POLICY_DIR
    want = {"step": start, "checkpoint": previous["checkpoint"], "checkpoint id": previous["checkpoint id"]}
    if is_main(acc):
        for leftover in view.folder.glob(f".{POLICY_DIR}.tmp-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        try:
            have = json.loads((folder / POLICY_RECORD).read_text())
        except (OSError, ValueError):
            have = None
        if have != want:
            source = checkpoint_dir(view, start)
            found = read_progress(source).id if (source / PROGRESS).exists() else None
            if found != want["checkpoint id"]:
                raise CheckpointError(
                    f"{source}: the checkpoint round {index - 1} ended on (id {want['checkpoint id']}) is "
                    f"{'replaced' if found else 'gone'}, and {folder} does not hold its weights; add --force "
                    "to train every round again from step 0, or use a new output_dir"
                )
            tmp = view.folder / f".{POLICY_DIR}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                from mpo.policy import link_tree

                link_tree(source / WEIGHTS, tmp / WEIGHTS)
                write_text(tmp / POLICY_RECORD, json.dumps(want, indent=2))
                if folder.exists():
                    shutil.rmtree(folder)
                os.replace(tmp, folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        verify_weights(folder, f"delete {folder} to take it from {checkpoint_dir(view, start)} again")
    wait_for_everyone(acc)
    return Policy(folder, want)


# ---- the loop ---------------------------------------------------------------------------------------
def _timed(
    name: str, did_work: Callable[[Any], bool], stage: Callable[..., Any], *args: Any, **kwargs: Any
) -> StageReport:
    started = time.perf_counter()
    summary = stage(*args, **kwargs)
    return StageReport(name, bool(did_work(summary)), round(time.perf_counter() - started, 2), summary)


def check_rounds_launch(recipe: Any, acc: Accelerator) -> None:
    """What a round cannot do under this launch, refused before anything runs."""
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if (
        recipe.rounds.reference == "previous"
        and recipe.model.finetune == "lora"
        and recipe.train.reference == "live"
        and is_deepspeed(acc)
        and plugin is not None
        and plugin.zero_stage == 3
    ):
        from mpo.config import RecipeError

        raise RecipeError(
            "rounds.reference='previous' with model.finetune='lora' under DeepSpeed ZeRO-3: the live reference "
            "copies the sharded policy, which ZeRO-3 does not allow; use train.reference=precomputed, ZeRO-2 / "
            "DDP, full fine-tuning, or rounds.reference=base"
        )


@errors_reach_every_rank
def run_rounds(recipe: Any, acc: Accelerator, force: bool = False) -> list[StageReport]:
    """Every round of an iterative run, in order, each stage skipped where its work is done; returns
    what each stage of each round did. The caller exports afterwards."""
    check_rounds_launch(recipe, acc)
    root = RunDir.from_recipe(recipe)
    if is_main(acc):
        from mpo.generate import save_recipe

        root.root.mkdir(parents=True, exist_ok=True)
        save_recipe(recipe, root, force)
    prompts = prepare_prompts(recipe, write=is_main(acc), force=force)
    wait_for_everyone(acc)
    prompts = prepare_prompts(recipe, write=False)
    model = SamplingModel(recipe, acc)
    tracking = _Tracking(recipe, acc, root)
    try:
        for _ in range(2):  # a forced restart from round 0 happens at most once
            reports: list[StageReport] = []
            if _all_rounds(recipe, acc, force, root, prompts, model, tracking, reports):
                return reports
        raise CheckpointError(f"{root.root}: the rounds could not be brought up to date")  # not reached
    finally:
        tracking.finish()


def _all_rounds(
    recipe: Any,
    acc: Accelerator,
    force: bool,
    root: RunDir,
    prompts: pd.DataFrame,
    model: SamplingModel,
    tracking: _Tracking,
    reports: list[StageReport],
) -> bool:
    """One pass over the rounds; False when ``force`` threw the training away past round 0 (the
    caller starts again from round 0)."""
    from mpo.generate import generate_stage
    from mpo.score import score_stage
    from mpo.select import select_stage
    from mpo.train import result_settings, run_settings, train_stage

    steps, count = steps_per_round(recipe), recipe.rounds.count
    previous: dict[str, Any] | None = None
    for index in range(count):
        view, start, until = root.round_dir(index), index * steps, (index + 1) * steps
        if is_main(acc):
            _announce(index, count, start, until)
        data_recipe = round_recipe(recipe, index)
        chosen = round_prompts(prompts, recipe, index)
        policy = round_policy(view, index, start, previous, acc) if previous is not None else None
        name = f"round {index}: "
        reports.append(
            _timed(
                name + "generate",
                lambda s: s.get("shards generated now", 0) > 0,
                generate_stage,
                data_recipe,
                acc,
                force,
                run=view,
                prompts=chosen,
                load_model=_bound(model.with_policy, policy),
                policy=policy.record if policy is not None else None,
            )
        )
        model.park()  # scoring loads the VAE alone (and the reward): the accelerator's memory is theirs
        reports.append(
            _timed(
                name + "score",
                lambda s: s.get("shards scored now", 0) > 0,
                score_stage,
                data_recipe,
                acc,
                force,
                run=view,
            )
        )
        before = _mtime(view.pairs_parquet)
        reports.append(
            _timed(
                name + "select",
                lambda _, path=view.pairs_parquet, before=before: _mtime(path) != before,
                select_stage,
                data_recipe,
                acc,
                force,
                run=view,
                max_pairs=recipe.rounds.max_pairs,
            )
        )
        settings = run_settings(recipe, acc, view)
        settings["rounds"] = round_settings(recipe, index, len(chosen))
        record = read_record(view)
        if record is not None and result_settings(record["settings"]) == result_settings(settings):
            reports.append(StageReport(name + "train", False, 0.0, {"steps": until, "trained": False}))
            previous = record
            continue
        train = TrainRound(
            index=index,
            run=view,
            start=start,
            until=until,
            settings=settings["rounds"],
            start_settings=previous["settings"] if previous is not None else None,
            reference=policy.folder / WEIGHTS
            if policy is not None and recipe.rounds.reference == "previous"
            else None,
        )
        if not _training_fits(train, record, settings, force, acc, root, count) and index > 0:
            return False
        tracking.start()
        tracking.log_round(index, start)
        reports.append(
            _timed(
                name + "train",
                lambda s: s.get("steps trained now", 0) > 0,
                train_stage,
                recipe,
                acc,
                force,
                train_round=train,
            )
        )
        acc.free_memory()  # the round's prepared model and optimizer; the next round builds its own
        previous = write_record(view, index, until, settings, acc)
    return True


def _bound(call: Callable[[Any], Any], argument: Any) -> Callable[[], Any]:
    return lambda: call(argument)


def _training_fits(
    train: TrainRound,
    record: dict[str, Any] | None,
    settings: dict[str, Any],
    force: bool,
    acc: Accelerator,
    root: RunDir,
    count: int,
) -> bool:
    """Whether the latest checkpoint is one this round can train from: in the round's span and made
    with its settings (at its start: the previous round's). Otherwise refused naming what changed,
    or with ``force`` every round's training is thrown away (False: it was)."""
    from mpo.train import result_settings
    from mpo.train_state import check_settings

    latest = latest_checkpoint(root)
    if latest is None or latest[0] < train.start:
        return True  # nothing to check (or the train stage says what is missing)
    path = latest[1]
    if latest[0] > train.until:
        stored = result_settings(record["settings"]) if record is not None else None
        if stored is None:
            if not force:
                raise CheckpointError(
                    f"{path}: training went past the end of round {train.index} (step {train.until}) but "
                    f"{train.run.folder / RECORD} is missing: this run directory holds another training; "
                    "use a new output_dir, or add --force to train every round again from step 0"
                )
            fits = False
        else:
            fits = check_settings(train.run.folder / RECORD, stored, result_settings(settings), force)
    else:
        stored = read_progress(path).settings
        expected = train.resumed_settings(latest, settings)
        fits = check_settings(path, result_settings(stored), result_settings(expected), force)
    if not fits:
        if is_main(acc):
            discard_rounds_training(root, count)
        wait_for_everyone(acc)
    return fits


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def _announce(index: int, count: int, start: int, until: int) -> None:
    from rich.console import Console

    Console().rule(f"round {index} of {count}: steps {start} -> {until}")


# ---- curves and the summary table -------------------------------------------------------------------
def round_row(
    root: RunDir, recipe: Any, index: int, eval_table: pd.DataFrame | None = None
) -> dict[str, Any] | None:
    """One round's numbers: its prompts and candidates, the mean reward of its candidates (the
    policy it started from, on its train prompts), #Dom / #Not-Dom, the pairs kept, and the held-out
    reward at its last step (NaN before it is measured). None before the round selected its pairs."""
    view = root.round_dir(index)
    stats_path = view.pairs_parquet.with_name(STATS_NAME)
    if not (stats_path.exists() and view.scores_parquet.exists()):
        return None
    stats = json.loads(stats_path.read_text())
    scores = read_parquet(view.scores_parquet)
    steps = steps_per_round(recipe)
    until = (index + 1) * steps
    row: dict[str, Any] = {
        "round": index,
        "steps": f"{index * steps}-{until}",
        "prompts": int(stats["prompts"]),
        "candidates": int(stats["candidates"]),
        "candidate total": float(scores["total"].mean()),
        "#Dom": int(stats["threshold_pairs_dominant"]),
        "#Not-Dom": int(stats["threshold_pairs_not_dominant"]),
        "pairs": int(stats["pairs"]),
        "pairs / prompt": float(stats["pairs_per_prompt_mean"]),
    }
    for column in (c for c in scores.columns if c.startswith("dim.")):
        row[f"candidate {column}"] = float(scores[column].mean())
    if eval_table is None and root.eval_parquet.exists():
        eval_table = read_parquet(root.eval_parquet)
    at_end = (
        eval_table[eval_table["step"] == until] if eval_table is not None and not eval_table.empty else None
    )
    row["eval total"] = float(at_end["total"].iloc[0]) if at_end is not None and len(at_end) else float("nan")
    return row


def rounds_table(root: RunDir, recipe: Any) -> pd.DataFrame:
    """:func:`round_row` of every round that got as far as selecting its pairs."""
    table = read_parquet(root.eval_parquet) if root.eval_parquet.exists() else None
    rows = [round_row(root, recipe, i, table) for i in range(recipe.rounds.count)]
    return pd.DataFrame([r for r in rows if r is not None])


SHOWN = (
    "round",
    "steps",
    "prompts",
    "candidates",
    "candidate total",
    "#Dom",
    "#Not-Dom",
    "pairs",
    "pairs / prompt",
    "eval total",
)


def print_rounds_table(root: RunDir, recipe: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    frame = rounds_table(root, recipe)
    if frame.empty:
        return
    table = Table(
        title="rounds (candidate total: the round's samples; eval total: held-out, at the round's end)"
    )
    for column in SHOWN:
        table.add_column(column, justify="left" if column == "steps" else "right")
    for row in frame.to_dict("records"):
        table.add_row(*(_cell(row[c]) for c in SHOWN))
    Console().print(table)


def rounds_markdown(root: RunDir, recipe: Any) -> list[str]:
    """The table for the model card."""
    frame = rounds_table(root, recipe)
    if frame.empty:
        return ["No round selected its pairs yet."]
    lines = ["| " + " | ".join(SHOWN) + " |", "|" + "---|" * len(SHOWN)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in SHOWN) + " |" for row in frame.to_dict("records")]
    return lines


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.4g}"
    return str(value)


class _Tracking:
    """One tracker run across the rounds, started when the first round trains (a finished run
    starts none); the rounds' pair statistics go on the training's step axis, at each round's start."""

    def __init__(self, recipe: Any, acc: Accelerator, root: RunDir) -> None:
        self.recipe, self.acc, self.root, self.started = recipe, acc, root, False

    def start(self) -> None:
        if not self.started:
            from mpo.train import init_tracking

            init_tracking(self.recipe, self.acc, self.root)
            self.started = True

    def log_round(self, index: int, step: int) -> None:
        row = round_row(self.root, self.recipe, index)
        if row is None:
            return
        values = {
            f"rounds/{k}": v for k, v in row.items() if isinstance(v, int | float) and k != "eval total"
        }
        self.acc.log(values, step=step)

    def finish(self) -> None:
        if self.started:
            for tracker in self.acc.trackers:
                tracker.finish()
            self.acc.trackers = []
            self.started = False
