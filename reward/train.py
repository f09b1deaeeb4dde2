"""The reward-training stage: teach a VLM to answer the checklist (paper section 3.2), or distil one.

::

    reward train   recipes/reward/tiny_qa.yaml                                         # 1 process
    reward distill recipes/reward/tiny_distill.yaml
    accelerate launch --config_file launch/multi_gpu.yaml -m reward.cli train RECIPE       # DDP
    accelerate launch --config_file launch/deepspeed_zero2.yaml -m reward.cli train RECIPE # ZeRO-2
    ACCELERATE_USE_CPU=true accelerate launch --config_file launch/cpu_ddp.yaml -m reward.cli train RECIPE

``reward train`` learns from human yes / no answers (``data.annotations``); ``reward distill`` from a
teacher's p(yes) (``data.teacher_scores``, e.g. the official VisionReward checkpoints' scores), so that
a small VLM answers like the large one. Both ask each training sample all of its questions over one
shared prefix, in the scorer's own rendering (:mod:`reward.train_model`), with the loss of
:mod:`reward.train_loss` at the position the scorer reads.

The run directory::

    runs/<name>/
      recipe.yaml           the resolved recipe
      split.parquet         every sample (media, prompt) and its split: what was held out
      checkpoints/step-<n>/ weights/ (the adapter, or the model) + optimizer, scheduler, RNG, data position
      eval.jsonl            step, accuracy, balanced accuracy, mean |dp| on the held-out samples
      eval_answers.json     the last held-out evaluation, per question
      model/                the export: a save_pretrained folder with its processor (reward.model_path)

A killed run resumes from its latest complete checkpoint and gives the weights an uninterrupted run
would have given (the data position is saved; the order is a function of it). A sample whose media
cannot be read stops every process with an error naming the file and the annotation row, after a
checkpoint of the steps already trained, so fixing the file and starting again loses nothing.

Where we depart from the paper: the paper fine-tunes CogVLM2 fully with lr 1e-6 for 1,500 steps of 64
samples' questions; here LoRA is the default (full fine-tuning is ``model.finetune=full``), any VLM
family of the vlm backend can be the base, all questions of a sample share one prefix per step rather
than being separate examples, and a held-out split (by sample) is scored during training.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from mpo.distributed import make_training_accelerator, whole_model_loading
from mpo.store import RunDir, write_parquet, write_text
from mpo.train_state import (
    Resumable,
    TrainProgress,
    check_settings,
    fill_deepspeed_config,
    is_deepspeed,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_progress,
    remove_incomplete,
    save_checkpoint,
)
from reward import answer_eval
from reward import train_data as td
from reward.checklist import load_checklist
from reward.train_loss import answer_loss
from reward.train_model import (
    AnswerModel,
    check_export,
    finetune_mode,
    load_vlm,
    save_processor,
    scorer_for,
    taught_tokens,
)

KINDS = ("train", "distill")
EVAL_FILE = "eval.jsonl"
EVAL_ANSWERS = "eval_answers.json"
SPLIT_FILE = "split.parquet"
EXPORT_DIR = "model"


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss); the message names the step and the samples."""


@dataclass
class RewardTrainer:
    """Everything the loop needs, built by :func:`setup`."""

    recipe: Any
    kind: str
    acc: Accelerator
    run: RunDir
    data: td.QAData
    split: list[str]
    train: td.TrainSet
    model: nn.Module  # the prepared AnswerModel (DDP / DeepSpeed engine)
    answers: AnswerModel  # the same, unwrapped
    mode: Any  # LoraFinetune | FullFinetune
    optimizer: Any
    scheduler: Any
    loader: Any
    progress: TrainProgress
    taught: tuple[int, int]
    resumable: Resumable
    saved_step: int = -1
    resumed_from: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    last_eval: dict[str, Any] | None = None


# ---- setup ----------------------------------------------------------------------------------------
# The reward trainer's Accelerator is the DPO trainer's: mixed precision, accumulation, the recipe's
# tracker, logs under the run directory.
setup_accelerator = make_training_accelerator


def init_tracking(recipe: Any, acc: Accelerator, run: RunDir) -> None:
    """The tracker run (wandb under the run directory, online / offline), with the flat recipe."""
    tracker = recipe.tracking.tracker
    if tracker == "none":
        return
    if tracker == "wandb" and acc.is_main_process:
        (run.root / "wandb").mkdir(parents=True, exist_ok=True)
    wandb = {
        "dir": str(run.root),
        "name": recipe.tracking.run_name or recipe.name,
        "mode": recipe.tracking.mode,
    }
    flat = _flat(OmegaConf.to_container(recipe, resolve=True))
    acc.init_trackers(recipe.tracking.project, config=flat, init_kwargs={"wandb": wandb})


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(node, dict):
        return {prefix[:-1]: node if isinstance(node, int | float | str | bool) else str(node)}
    out: dict[str, Any] = {}
    for key, value in node.items():
        out.update(_flat(value, f"{prefix}{key}."))
    return out


def load_data(recipe: Any, kind: str) -> tuple[td.QAData, list[str]]:
    """The annotated (``train``) or teacher-scored (``distill``) samples and their split."""
    cfg = recipe.data
    checklist = load_checklist(cfg.checklist)
    if kind == "train":
        if not cfg.annotations:
            raise td.DataError(
                "reward train needs data.annotations (annotation files); for a teacher's "
                "scores use reward distill with data.teacher_scores"
            )
        data = td.read_annotations(list(cfg.annotations), checklist, cfg.media_root)
    else:
        if not cfg.teacher_scores:
            raise td.DataError("reward distill needs data.teacher_scores (a `reward score` output)")
        data = td.read_teacher_scores(cfg.teacher_scores, checklist, cfg.media_root)
    split = td.split_samples(data.samples, cfg.val_fraction, cfg.val_count, cfg.split_seed)
    return data, split


def check_media_everywhere(acc: Accelerator, data: td.QAData) -> None:
    """Each process checks its share of the media; every process raises the same error if any fails."""
    share = data.samples[acc.process_index :: acc.num_processes]
    problems = td.check_media(share)
    if acc.num_processes > 1:
        problems = sorted(gather_object(problems))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise td.DataError("\n".join(problems[:5]) + more)


def setup_model(recipe: Any, acc: Accelerator) -> tuple[AnswerModel, Any, tuple[int, int]]:
    """Load the base VLM, make it trainable (LoRA or full), and wrap it with the scorer's rendering."""
    with acc.main_process_first(), whole_model_loading():
        vlm, processor = load_vlm(recipe.model, acc.device)
    mode = finetune_mode(recipe.model)
    set_seed(recipe.train.seed)  # LoRA's initial weights, whether or not the tiny model was just built
    vlm = mode.prepare(vlm)
    if acc.mixed_precision != "no":  # fp32 master copies of what trains
        for p in vlm.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    backend = scorer_for(
        vlm, processor, recipe.model, str(recipe.model.path), recipe.data.max_frames, recipe.eval.batch_size
    )
    vlm.train()
    taught = taught_tokens(backend, list(recipe.train.answer_words))
    return AnswerModel(vlm, backend, agree=_together(acc)), mode, taught


def _together(acc: Accelerator) -> Callable[[bool], bool] | None:
    """A yes / no decision every process takes together (yes if any says yes); None on one process."""
    if acc.num_processes == 1:
        return None

    def agree(flag: bool) -> bool:
        votes = acc.reduce(torch.tensor([float(flag)], device=acc.device), reduction="sum")
        return bool(votes.item() > 0)

    return agree


def setup_optimizer(recipe: Any, model: nn.Module) -> torch.optim.Optimizer:
    cfg = recipe.train
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        params,
        lr=cfg.learning_rate,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )


def setup_scheduler(recipe: Any, optimizer: Any) -> Any:
    """transformers' schedules, counted in optimizer steps and stepped by the loop itself."""
    from transformers import get_scheduler

    cfg = recipe.train
    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)


def data_fingerprint(data: td.QAData, split: list[str]) -> str:
    """A digest of what the stream is made of (samples, split, questions, targets): a checkpoint
    means nothing for other data, so a resume on changed data is refused."""
    import hashlib

    digest = hashlib.blake2b(digest_size=12)
    for ref, s in zip(data.samples, split):
        digest.update(f"{ref.portable_key}|{s}\n".encode())
    for row in data.rows:
        digest.update(f"{row.sample}|{row.question}|{row.target:.6g}\n".encode())
    return digest.hexdigest()


def run_settings(recipe: Any, kind: str, acc: Accelerator, fingerprint: str) -> dict[str, Any]:
    m, t, d = recipe.model, recipe.train, recipe.data
    lora = [m.lora_rank, m.lora_alpha, list(m.lora_target_modules or [])] if m.finetune == "lora" else None
    return {
        "kind": kind,
        "model.path": str(m.path),
        "model.finetune": m.finetune,
        "model.train_vision": m.train_vision,
        "model.lora (rank, alpha, targets)": lora,
        "data (samples, split, rows)": fingerprint,
        "data.balance": d.balance,
        "train.seed": t.seed,
        "train.loss": t.loss,
        "train.answer_words": list(t.answer_words),
        "deepspeed": is_deepspeed(acc),
    }


def setup(recipe: Any, kind: str, acc: Accelerator, run: RunDir) -> RewardTrainer:
    """Data, model, optimizer and loader; resume from the latest checkpoint if any."""
    data, split = load_data(recipe, kind)
    train = td.TrainSet.build(data, split, recipe.data.balance, recipe.train.seed)
    check_media_everywhere(acc, data)
    if acc.is_main_process:
        run.root.mkdir(parents=True, exist_ok=True)
        from reward.train_config import save_resolved

        save_resolved(recipe, run.root)
        write_parquet(_split_table(data, split), run.root / SPLIT_FILE)
    answers, mode, taught = setup_model(recipe, acc)  # seeds the RNG; a resume restores every RNG state
    optimizer = setup_optimizer(recipe, answers)
    fill_deepspeed_config(recipe, acc)
    model, optimizer = acc.prepare(answers, optimizer)
    scheduler = setup_scheduler(recipe, optimizer)
    resumable = Resumable(
        accelerator=acc,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        save_weights=lambda folder, state: mode.save(state, Path(folder)),
        load_weights=lambda folder: mode.load(Path(folder)),
    )
    if acc.is_main_process:
        remove_incomplete(run)
    acc.wait_for_everyone()
    progress = resume(resumable, run, run_settings(recipe, kind, acc, data_fingerprint(data, split)))
    cfg = recipe.train
    loader = td.make_loader(
        train, recipe.data.max_frames, cfg.batch_size, acc.process_index, acc.num_processes,
        progress.pairs_seen, cfg.num_workers,
    )  # fmt: skip
    resumed = progress.step if progress.step > 0 else None
    return RewardTrainer(
        recipe=recipe, kind=kind, acc=acc, run=run, data=data, split=split, train=train, model=model,
        answers=answers, mode=mode, optimizer=optimizer, scheduler=scheduler, loader=iter(loader),
        progress=progress, taught=taught, resumable=resumable, resumed_from=resumed,
        saved_step=resumed if resumed is not None else -1,
    )  # fmt: skip


def _split_table(data: td.QAData, split: list[str]):
    import pandas as pd

    counts = [0] * len(data.samples)
    for row in data.rows:
        counts[row.sample] += 1
    return pd.DataFrame(
        {
            "sample": range(len(data.samples)),
            "media": [str(s.media) for s in data.samples],
            "prompt": [s.prompt for s in data.samples],
            "split": split,
            "rows": counts,
        }
    )


def resume(r: Resumable, run: RunDir, settings: dict[str, Any]) -> TrainProgress:
    """Load the latest complete checkpoint after checking its settings (every file is checked before
    anything loads; nothing is unpickled); ``pairs_seen`` counts the stream positions (samples)
    consumed."""
    progress = TrainProgress(settings=settings)
    latest = latest_checkpoint(run)
    if latest is None:
        return progress
    stored = read_progress(latest[1])
    check_settings(latest[1], stored.settings, settings)
    load_checkpoint(r, latest[1])
    progress.step, progress.pairs_seen = stored.step, stored.pairs_seen
    return progress


# ---- one step ---------------------------------------------------------------------------------------
def next_batches(t: RewardTrainer) -> list[list[dict[str, Any]]]:
    """This process's micro-batches of the next optimizer step. A sample that cannot be read stops
    every process (one flag reduced across them), after a checkpoint of the steps already done."""
    batches = [next(t.loader) for _ in range(t.recipe.train.gradient_accumulation_steps)]
    errors = _any_process(t, [item["error"] for batch in batches for item in batch if "error" in item])
    if errors:
        checkpoint(t)
        done = t.progress.step
        kept = (
            f"checkpoint step-{done} holds the {done} steps done" if done else "no step had been trained yet"
        )
        raise td.DataError("\n".join(errors[:5]) + f"\n(training stopped before step {done + 1}; {kept})")
    return batches


def micro_step(
    t: RewardTrainer, items: list[dict[str, Any]], scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, summed weighted loss of these rows) for one micro-batch."""
    samples = [it["sample"] for it in items]
    questions = [it["questions"] for it in items]
    device = t.acc.device
    target = torch.cat([it["target"] for it in items]).to(device)
    weight = torch.cat([it["weight"] for it in items]).to(device)
    backend = t.answers.backend
    with t.acc.autocast():
        logits = t.model(samples, questions)
    per_row = answer_loss(
        t.recipe.train.loss, logits, target, taught=t.taught, yes_ids=backend.yes_ids, no_ids=backend.no_ids,
        reduce=t.recipe.model.answer_reduce,
    )  # fmt: skip
    if not torch.isfinite(per_row).all():
        bad = sorted({str(it["sample"].id) for it in items})
        raise TrainingError(
            f"step {t.progress.step + 1}: non-finite loss on sample(s) {bad[:4]} (lower train.learning_rate, "
            f"or use train.mixed_precision=bf16 rather than fp16); training stopped, the checkpoints are kept"
        )
    summed = (weight * per_row).sum()
    return summed * scale, summed.detach()


def train_loop(t: RewardTrainer) -> dict[str, Any]:
    """Step, log, eval, checkpoint, until ``train.max_steps`` optimizer steps."""
    cfg, acc, progress = t.recipe.train, t.acc, t.progress
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps * acc.num_processes
    if progress.step == 0 and not evaluated(t.run, 0):
        run_eval(t, 0)
    bar = tqdm(total=cfg.max_steps, initial=progress.step, desc=f"reward {t.kind}", unit="step",
               disable=not acc.is_main_process)  # fmt: skip
    start_step, started, window, grad_norm = progress.step, time.perf_counter(), [], None
    while progress.step < cfg.max_steps:
        batches = next_batches(t)
        norm = td.step_weight(t.train, progress.step, per_step)
        # accelerate divides by the accumulation steps, DDP / DeepSpeed average over processes:
        scale = acc.num_processes * cfg.gradient_accumulation_steps / norm
        step_loss = torch.zeros((), device=acc.device)
        for items in batches:
            with acc.accumulate(t.model):
                loss, summed = micro_step(t, items, scale)
                acc.backward(loss)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(t.model.parameters(), cfg.max_grad_norm)
                t.optimizer.step()
                t.optimizer.zero_grad(set_to_none=True)
            step_loss += summed / norm
        if not acc.optimizer_step_was_skipped:
            t.scheduler.step()
        progress.step, progress.pairs_seen = progress.step + 1, progress.pairs_seen + per_step
        bar.update(1)
        window.append(step_loss)
        step = progress.step
        if step % t.recipe.tracking.log_every == 0 or step == cfg.max_steps:
            log_train(t, window, grad_norm, step)
            window = []
        if (t.recipe.eval.every > 0 and step % t.recipe.eval.every == 0) or step == cfg.max_steps:
            run_eval(t, step)
        if (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) or step == cfg.max_steps:
            checkpoint(t)
    bar.close()
    seconds = time.perf_counter() - started
    trained = progress.step - start_step
    return {
        "steps trained now": trained,
        "seconds": round(seconds, 2),
        "samples / s": trained * per_step / seconds if seconds > 0 else 0.0,
    }


def log_train(t: RewardTrainer, window: list[torch.Tensor], grad_norm: Any, step: int) -> None:
    """The weighted mean loss of the steps since the last log (summed over processes), lr, grad norm."""
    loss = t.acc.reduce(torch.stack(window).mean(), reduction="sum")
    values = {"train/loss": float(loss), "train/lr": float(t.scheduler.get_last_lr()[0])}
    if grad_norm is not None:
        values["train/grad_norm"] = float(grad_norm)
    t.history.append({"step": step, **values})
    t.acc.log(values, step=step)


# ---- held-out evaluation -------------------------------------------------------------------------
def evaluated(run: RunDir, step: int) -> bool:
    path = run.root / EVAL_FILE
    if not path.exists():
        return False
    return any(json.loads(line)["step"] == step for line in path.read_text().splitlines() if line.strip())


def _eval_plan(t: RewardTrainer) -> list[list[int | None]]:
    """This process's held-out batches. Every process runs the same forwards (ZeRO-3 gathers weights in
    lockstep, and a sliding-window model may run one pass per sample): each batch has as many samples
    as the first process's, and one that has run out asks stand-in samples (None) and discards them."""
    ids = td.iterate_val(t.data, t.split, t.recipe.eval.limit)
    size, world, rank = t.recipe.eval.batch_size, t.acc.num_processes, t.acc.process_index
    plan: list[list[int | None]] = []
    for start in range(0, len(ids), size * world):
        width = len(ids[start : start + size])  # the first process's batch, the largest of the round
        chunk: list[int | None] = list(ids[start + rank * size : start + (rank + 1) * size])
        plan.append(chunk + [None] * (width - len(chunk)))
    return plan


def _any_process(t: RewardTrainer, errors: list[str]) -> list[str]:
    """The errors of every process (the same list everywhere), so that all of them stop together."""
    if t.acc.num_processes == 1:
        return errors
    flag = torch.tensor([float(len(errors))], device=t.acc.device)
    if int(t.acc.reduce(flag, reduction="sum").item()) == 0:
        return []
    return sorted(set(gather_object(errors)))


@torch.no_grad()
def held_out_answers(t: RewardTrainer) -> list[tuple[int, int, float]]:
    """(sample, question, p(yes)) for every held-out row, read as the scorer reads it (p_yes of the
    answer-position logits), through the prepared model so that ZeRO-3 gathers its weights."""
    rows_of: dict[int, list[td.QARow]] = {}
    for row in t.data.rows:
        if t.split[row.sample] == "val":
            rows_of.setdefault(row.sample, []).append(row)
    checklist, backend = t.data.checklist, t.answers.backend
    fallback = td.iterate_val(t.data, t.split, 1)[0]
    found: list[tuple[int, int, float]] = []
    for batch in _eval_plan(t):
        ids = [fallback if i is None else i for i in batch]
        samples, errors = [], []
        for i in ids:
            try:
                samples.append(td.load_sample(t.data.samples[i], t.recipe.data.max_frames))
            except td.DataError as err:
                errors.append(str(err))
        errors = _any_process(t, errors)
        if errors:
            raise td.DataError("\n".join(errors[:5]) + "\n(held-out evaluation; no training step was lost)")
        questions = [
            [checklist.questions[r.question].render(t.data.samples[i].prompt) for r in rows_of[i]]
            for i in ids
        ]
        with t.acc.autocast():
            p = backend.p_yes(t.model(samples, questions)).float().cpu().tolist()
        k = 0
        for real, i in zip(batch, ids):
            for r in rows_of[i]:
                if real is not None:
                    found.append((i, r.question, p[k]))
                k += 1
    if t.acc.num_processes > 1:
        found = gather_object(found)
    return found


def run_eval(t: RewardTrainer, step: int) -> None:
    """Held-out agreement now: recorded in eval.jsonl, logged, kept for the summary."""
    if not td.iterate_val(t.data, t.split, 1):
        return
    model = t.answers.vlm
    model.eval()
    try:
        found = held_out_answers(t)
    finally:
        model.train()
    targets = {(r.sample, r.question): r.target for r in t.data.rows if t.split[r.sample] == "val"}
    found = sorted(set(found))
    result = answer_eval.agreement(
        [p for _, _, p in found],
        [targets[(s, q)] for s, q, _ in found],
        [q for _, q, _ in found],
        t.data.checklist,
    )
    t.last_eval = {"step": step, **result}
    if t.acc.is_main_process:
        record = {k: result[k] for k in ("rows", "accuracy", "balanced_accuracy", "mean_abs_dp")}
        path = t.run.root / EVAL_FILE
        previous = path.read_text() if path.exists() else ""
        kept = [line for line in previous.splitlines() if line.strip() and json.loads(line)["step"] != step]
        write_text(path, "\n".join([*kept, json.dumps({"step": step, **record})]) + "\n")
        write_text(t.run.root / EVAL_ANSWERS, json.dumps(t.last_eval, indent=2))
    values = {f"eval/{k}": result[k] for k in ("accuracy", "balanced_accuracy", "mean_abs_dp")}
    values.update({f"eval/accuracy.{q}": m["accuracy"] for q, m in result["per_question"].items()})
    t.acc.log(values, step=step)


# ---- checkpoints and export -----------------------------------------------------------------------
def checkpoint(t: RewardTrainer) -> None:
    """Save ``step-<n>`` (once per step) and prune old ones."""
    if t.saved_step == t.progress.step or t.progress.step == 0:
        return

    save_checkpoint(t.resumable, t.run, t.progress)
    t.saved_step = t.progress.step
    if t.acc.is_main_process:
        prune_checkpoints(t.run, t.recipe.train.keep_checkpoints, None)
    t.acc.wait_for_everyone()


def export(recipe: Any, run: RunDir, processor: Any, mode: Any) -> Path:
    """``model/``: the last checkpoint's weights as a save_pretrained folder with the processor
    (merged LoRA, or adapter + base path), written beside and renamed into place. Main process."""
    latest = latest_checkpoint(run)
    if latest is None:
        raise td.DataError(f"{run.checkpoints}: no complete checkpoint to export")
    out = run.root / EXPORT_DIR
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    base_path = str(recipe.model.path)

    # On the main process alone: a ZeRO-3 launch must not partition this load (a collective that the
    # other processes, waiting at the barrier after the export, would never join).
    with whole_model_loading():
        mode.export(
            latest[1] / "weights",
            tmp,
            recipe.export.merge_lora,
            base_path,
            lambda: load_vlm(recipe.model, "cpu")[0],
        )
    save_processor(processor, base_path, tmp)
    write_text(tmp / "training.json", json.dumps({"step": latest[0], "checkpoint": latest[1].name}, indent=2))
    check_export(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


# ---- the stage ---------------------------------------------------------------------------------------
def train_stage(recipe: Any, kind: str = "train", accelerator: Accelerator | None = None) -> dict[str, Any]:
    """Train (or finish training) and export; skipped when the export of ``train.max_steps`` exists."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    run = RunDir(recipe.output_dir)
    started = time.perf_counter()
    done = _exported_step(run)
    if done is not None and done >= recipe.train.max_steps:
        summary = {
            "output_dir": str(run.root),
            "steps": done,
            "model": str(run.root / EXPORT_DIR),
            "trained": False,
        }
        _print(accelerator, f"reward {kind} (up to date)", summary)
        return summary
    acc = accelerator if accelerator is not None else setup_accelerator(recipe)
    init_tracking(recipe, acc, run)
    try:
        t = setup(recipe, kind, acc, run)
        loop = train_loop(t)
        if acc.is_main_process:
            export(recipe, run, t.answers.backend.processor, t.mode)
        acc.wait_for_everyone()
    finally:
        acc.end_training()
    result = t.last_eval or {}
    summary = {
        "output_dir": str(run.root),
        **td.describe(t.data, t.split, t.train),
        "processes": acc.num_processes,
        "resumed from step": t.resumed_from if t.resumed_from is not None else "-",
        "steps": t.progress.step,
        **loop,
        "final loss": t.history[-1]["train/loss"] if t.history else math.nan,
        "held-out accuracy": result.get("accuracy", math.nan),
        "held-out balanced accuracy": result.get("balanced_accuracy", math.nan),
        "held-out mean |dp|": result.get("mean_abs_dp", math.nan),
        "model": str(run.root / EXPORT_DIR),
        "seconds (with setup)": round(time.perf_counter() - started, 2),
        "trained": True,
    }
    _print(acc, f"reward {kind}", summary)
    return summary


def _exported_step(run: RunDir) -> int | None:
    info = run.root / EXPORT_DIR / "training.json"
    return int(json.loads(info.read_text())["step"]) if info.exists() else None


def _print(acc: Accelerator | None, title: str, summary: dict[str, Any]) -> None:
    from mpo.distributed import is_main
    from mpo.summary import print_summary

    if is_main(acc):
        print_summary(title, summary)
