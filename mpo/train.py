"""The train stage: Diffusion-DPO on the MPO pairs (VisionReward paper eq. 2 and section 3.3).

::

    mpo train recipes/tiny/sdxl.yaml                                                   # 1 process
    accelerate launch --config_file launch/multi_gpu.yaml -m mpo.cli train RECIPE        # 8 GPUs, DDP
    accelerate launch --config_file launch/deepspeed_zero2.yaml -m mpo.cli train RECIPE  # ZeRO-2
    accelerate launch --config_file launch/cpu_deepspeed_zero2.yaml -m mpo.cli train RECIPE  # 2 CPUs

Each step draws ``train.batch_size`` pairs per process from the cached candidates (no VAE, no text
encoder), noises winner and loser with the same noise and timestep, runs the policy once on the
stacked ``[win; lose]`` batch and the reference once without gradients, and takes the loss of
:mod:`mpo.loss`. The reference is the same network with its LoRA adapters disabled (LoRA) or a frozen
copy of the base denoiser made before training (full fine-tuning; not given to ``prepare``, so under
DeepSpeed ZeRO-3 it stays whole on every GPU, in the compute dtype: use LoRA where that does not fit).

The loop is step, log, eval, checkpoint. A run directory with checkpoints resumes from the latest
complete one (model, optimizer, scheduler, RNG, data position), and gives the weights an uninterrupted
run would have given: pairs, noise and timesteps are functions of the data position
(:mod:`mpo.train_data`). A non-finite loss stops training with an error naming the step and the pair;
the checkpoints already written stay as they are. SIGTERM or SIGINT (SLURM's time limit, Ctrl-C)
stops every process at the end of the current step with a checkpoint there (:mod:`mpo.interrupt`).

A checkpoint records the settings and inputs its weights depend on (:func:`run_settings`: the model,
every ``train`` key that changes the result, eval, the reward, the selection and the content hashes
of pairs, prompts and candidates). A run with other ones is refused, naming each changed key, or
with ``--force`` trains again from step 0.

Where we depart from the paper: the paper trains the policy from the base with a fixed number of
steps and reports the final model; here the held-out reward is measured every ``eval.every`` steps
and the best checkpoint is kept beside the last (``export.which`` picks one). The loss convention
(mean over latent elements, scale beta/2) is the public Diffusion-DPO code's; see mpo/loss.py.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object, set_seed
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from mpo import evaluate as ev
from mpo.backbones.base import Backbone, load_backbone
from mpo.config import resolve_paths
from mpo.distributed import (
    end_session,
    errors_reach_every_rank,
    is_main,
    main_process_first,
    make_training_accelerator,
    wait_for_everyone,
    whole_model_loading,
)
from mpo.interrupt import Interrupted, restore_signals, signal_name, stop_on_signals
from mpo.loss import DPOOutput, diffusion_dpo_loss, split_pairs
from mpo.store import RunDir, candidates_hash, parquet_hash, read_parquet
from mpo.train_data import (
    PairDataset,
    load_train_pairs,
    make_dataloader,
    timestep_bounds,
    verify_candidates,
)
from mpo.train_state import (
    Resumable,
    TrainProgress,
    check_settings,
    checkpoint_dir,
    discard_training,
    is_deepspeed,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    read_best,
    read_progress,
    remove_incomplete,
    save_checkpoint,
    verify_checkpoint,
    write_best,
)
from mpo.weights import adapters_disabled, add_lora, load_weights_into, save_weights


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and the pair."""


@dataclass
class Trainer:
    """Everything the loop needs, built by :func:`setup`."""

    recipe: Any
    acc: Accelerator
    run: RunDir
    backbone: Backbone
    model: nn.Module  # the prepared policy denoiser
    reference: nn.Module | None  # frozen copy (full fine-tuning) or None (LoRA: adapters disabled)
    optimizer: Any
    scheduler: Any
    loader: Iterator[dict[str, Any]]
    progress: TrainProgress
    pairs: int
    eval_inputs: dict[str, Any] | None  # prompts, embeddings, negative, reward; None: no val prompts
    best_total: float = -math.inf
    saved_step: int = -1
    resumed_from: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    resumable: Resumable | None = None  # what a checkpoint saves besides the progress
    until: int | None = None  # the step training stops at (an iterative run's round end; None: max_steps)


# ---- setup ----------------------------------------------------------------------------------------
def setup_accelerator(recipe: Any) -> Accelerator:
    """The training Accelerator (mixed precision, accumulation, the recipe's tracker). ``mpo run``
    builds it once for every stage: accelerate's state cannot change mixed precision later."""
    return make_training_accelerator(recipe)


def init_tracking(recipe: Any, acc: Accelerator, run: RunDir) -> None:
    """Start the tracker run (wandb: under the run directory, ``tracking.mode`` online / offline)."""
    tracker = recipe.tracking.tracker
    if tracker == "none":
        return
    wandb = {"dir": str(run.root), "name": recipe.tracking.run_name or recipe.name}
    wandb["mode"] = getattr(recipe.tracking, "mode", "online")
    if tracker == "wandb" and acc.is_main_process:
        (run.root / "wandb").mkdir(parents=True, exist_ok=True)
    acc.init_trackers(
        recipe.tracking.project, config=flat_config(recipe, tracker), init_kwargs={"wandb": wandb}
    )


def flat_config(recipe: Any, tracker: str) -> dict[str, Any]:
    """The recipe for the tracker's run page (tensorboard's hparams take flat scalars only)."""
    data = OmegaConf.to_container(OmegaConf.create(recipe), resolve=True)
    if tracker == "wandb":
        return data
    flat: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}{key}.", value)
        else:
            flat[prefix[:-1]] = node if isinstance(node, (int, float, str, bool)) else str(node)

    walk("", data)
    return flat


def setup_model(recipe: Any, acc: Accelerator) -> tuple[Backbone, nn.Module, nn.Module | None]:
    """Load the backbone; make its denoiser trainable (LoRA or full); build the reference."""
    # The first load may build and save a tiny model; ZeRO-3 partitions the denoiser at prepare().
    with main_process_first(acc), whole_model_loading():
        backbone = load_backbone(recipe.model, acc.device)
    backbone.set_attention(recipe.train.attention)
    denoiser = backbone.denoiser
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.train.mixed_precision)
    reference = None
    if recipe.model.finetune == "lora":
        add_lora(denoiser, recipe.model, backbone.lora_target_modules)
    else:
        reference = copy.deepcopy(denoiser).requires_grad_(False).eval()
        if compute is not None:
            reference.to(compute)  # it only runs forwards in the compute dtype: half the memory
        denoiser.requires_grad_(True)
    if compute is not None:  # fp32 master weights of what trains (AMP needs them; fp16 insists)
        from diffusers.training_utils import cast_training_params

        cast_training_params(denoiser, torch.float32)
    if recipe.train.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    denoiser.train()
    return backbone, denoiser, reference


def setup_optimizer(recipe: Any, denoiser: nn.Module, world_size: int) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters (lr times pairs per step when ``train.scale_lr``)."""
    cfg = recipe.train
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    return torch.optim.AdamW(
        [p for p in denoiser.parameters() if p.requires_grad],
        lr=lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_epsilon,
        weight_decay=cfg.weight_decay,
    )


def setup_scheduler(recipe: Any, optimizer: torch.optim.Optimizer) -> Any:
    """diffusers' schedule, counted in optimizer steps and stepped by the loop itself (not prepared:
    accelerate would step it once per process). Built on the prepared optimizer, whose ``step``
    accelerate has already wrapped."""
    from diffusers.optimization import get_scheduler

    cfg = recipe.train
    name = cfg.lr_schedule
    if name == "constant" and cfg.warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.max_steps)


def fill_deepspeed_config(recipe: Any, acc: Accelerator) -> None:
    """Give DeepSpeed the micro batch and clipping of the recipe (the JSONs say "auto"): the pairs
    come from our own sampler, not from a dataloader that ``prepare`` could read them from."""
    if not is_deepspeed(acc):
        return
    config = acc.state.deepspeed_plugin.deepspeed_config
    for key, value in (
        ("train_micro_batch_size_per_gpu", recipe.train.batch_size),
        ("gradient_clipping", recipe.train.max_grad_norm),
    ):
        if config.get(key, "auto") == "auto":
            config[key] = value


# train.* keys that do not change what training produces: how often to save and how many to keep,
# data-loading workers, recomputation to save memory, and the attention kernel.
UNFINGERPRINTED_TRAIN_KEYS = ("checkpoint_every", "keep_checkpoints", "num_workers", "gradient_checkpointing", "attention")


def run_settings(recipe: Any, acc: Accelerator, run: RunDir) -> dict[str, Any]:
    """What a checkpoint's weights (and the eval curve that picks the best one) depend on, and under
    ``layout`` how its state is laid out (processes, DeepSpeed, the split of a step's pairs into
    per-process micro-batches: the result depends only on the pairs per step). Another result is
    refused, naming the key; another layout only when resuming. Paths are resolved once
    (:func:`resolve_paths`), so the run directory's own recipe.yaml resumes it from anywhere."""
    from mpo.score import reward_fingerprint
    from mpo.select import config_dict

    r = resolve_paths(recipe)
    m, t, g = r.model, r.train, r.generate
    train = {k: v for k, v in OmegaConf.to_container(t, resolve=True).items() if k not in UNFINGERPRINTED_TRAIN_KEYS}
    if t.lr_schedule == "constant":
        train.pop("max_steps")  # a constant schedule does not depend on it: training may be extended
    layout = {
        "processes": acc.num_processes,
        "deepspeed": is_deepspeed(acc),
        "train.batch_size": train.pop("batch_size"),
        "train.gradient_accumulation_steps": train.pop("gradient_accumulation_steps"),
    }
    train["pairs per step"] = t.batch_size * t.gradient_accumulation_steps * acc.num_processes
    lora = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules") if m.finetune == "lora" else ()
    model_keys = ("family", "path", "revision", "variant", "dtype", "finetune", *lora)
    sampling = ("num_inference_steps", "guidance_scale", "height", "width", "num_frames", "fps")
    model = OmegaConf.to_container(m, resolve=True)
    return {
        "model": {k: model[k] for k in model_keys},
        "train": train,
        "eval": {k: r.eval[k] for k in ("every", "num_prompts", "samples_per_prompt", "seed")},
        "eval sampling": {f"generate.{k}": g[k] for k in sampling},
        "reward": reward_fingerprint(r),
        "select": config_dict(r.select),
        "inputs": {
            "prompts.parquet": parquet_hash(run.prompts_parquet),
            "pairs.parquet": parquet_hash(run.pairs_parquet),
            "candidates": candidates_hash(run),
        },
        "layout": layout,
    }


def result_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without its layout: what decides whether finished training is up to date."""
    return {k: v for k, v in settings.items() if k != "layout"}


def setup(
    recipe: Any,
    acc: Accelerator,
    run: RunDir,
    settings: dict[str, Any],
    resumed_settings: dict[str, Any] | None = None,
    train_round: Any = None,
) -> Trainer:
    """Build model, optimizer, data and eval inputs; resume from the latest checkpoint if any (which
    must have been made with ``resumed_settings``, by default ``settings``). ``train_round``
    (:class:`mpo.rounds.TrainRound`): the data stream of one round of an iterative run."""
    pairs = load_train_pairs(run)
    verified = verify_candidates(run, acc.process_index, acc.num_processes)  # this rank's share
    wait_for_everyone(acc)  # every share checked: all of them are
    set_seed(recipe.train.seed)  # LoRA's initial weights; a resume then restores every RNG state
    backbone, denoiser, reference = setup_model(recipe, acc)
    optimizer = setup_optimizer(recipe, denoiser, acc.num_processes)
    fill_deepspeed_config(recipe, acc)
    model, optimizer = acc.prepare(denoiser, optimizer)
    scheduler = setup_scheduler(recipe, optimizer)
    backbone.set_denoiser(acc.unwrap_model(model))
    finetune = recipe.model.finetune
    resumable = Resumable(
        acc,
        model,
        optimizer,
        scheduler,
        save_weights=lambda folder, state: save_weights(backbone, acc.unwrap_model(model), state, finetune, folder),
        load_weights=lambda folder: load_weights_into(backbone, acc.unwrap_model(model), finetune, folder),
    )
    progress = resume(resumable, run, settings, resumed_settings)
    bounds = timestep_bounds(recipe.train.timestep_range, backbone.num_train_timesteps)
    seed, before = recipe.train.seed, 0  # an iterative run: each round's own stream, from its position 0
    if train_round is not None:
        seed, before = train_round.stream(recipe.train.seed, settings["train"]["pairs per step"])
    loader = make_dataloader(
        PairDataset(run, pairs, seed, bounds, verified=verified),
        recipe.train.batch_size,
        acc.process_index,
        acc.num_processes,
        progress.pairs_seen - before,
        recipe.train.num_workers,
    )
    resumed = progress.step if progress.step > 0 else None
    trainer = Trainer(
        recipe=recipe,
        acc=acc,
        run=run,
        backbone=backbone,
        model=model,
        reference=reference,
        optimizer=optimizer,
        scheduler=scheduler,
        loader=iter(loader),
        progress=progress,
        pairs=len(pairs),
        eval_inputs=setup_eval(recipe, run, acc.device),
        resumed_from=resumed,
        saved_step=resumed if resumed is not None else -1,
        resumable=resumable,
    )
    trainer.best_total = best_so_far(run, progress.step)
    return trainer


def resume(
    r: Resumable, run: RunDir, settings: dict[str, Any], resumed_settings: dict[str, Any] | None = None
) -> TrainProgress:
    """Load the latest complete checkpoint (weights, optimizer, scheduler, RNG) if there is one, after
    checking that it was made with the settings of this run (or ``resumed_settings``: a round of an
    iterative run starts from the previous round's last checkpoint); returns where training stands."""
    progress = TrainProgress(settings=settings)
    latest = latest_checkpoint(run)
    if latest is None:
        return progress
    path = latest[1]
    stored = read_progress(path)
    check_settings(path, stored.settings, resumed_settings if resumed_settings is not None else settings)
    load_checkpoint(r, path, verified=True)  # train_stage checked every file already
    progress.step, progress.pairs_seen, progress.id = stored.step, stored.pairs_seen, stored.id
    return progress


def setup_eval(recipe: Any, run: RunDir, device: torch.device) -> dict[str, Any] | None:
    """The held-out prompts, their cached embeddings and the reward (None when nothing is held out)."""
    from reward.visionreward import VisionReward

    prompts = read_parquet(run.prompts_parquet)
    if not (prompts["split"] == "val").any():
        return None
    prompts = ev.eval_prompts(run, recipe)
    cached = ev.cached_embeddings(run, prompts)
    embeddings, negative = cached if cached is not None else (None, None)
    reward = VisionReward.from_config(recipe.reward, device=device)
    return {"prompts": prompts, "embeddings": embeddings, "negative": negative, "reward": reward}


def best_so_far(run: RunDir, step: int) -> float:
    """The best validated total among checkpoints up to ``step`` (rows past it are from a run that
    was killed before its next checkpoint, and will be recomputed)."""
    best = read_best(run)
    if best is None or best["step"] > step or not checkpoint_dir(run, best["step"]).exists():
        return -math.inf
    return float(best["total"])


# ---- one step ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def reference_model(t: Trainer) -> Iterator[nn.Module]:
    """The frozen copy, or the policy itself with its adapters off for the duration (LoRA)."""
    if t.reference is not None:
        yield t.reference
        return
    with adapters_disabled(t.acc.unwrap_model(t.model)) as base:
        yield base


def dpo_step(t: Trainer, batch: dict[str, Any]) -> DPOOutput:
    """The loss of one micro-batch of pairs: shared noise and timestep, one stacked policy forward on
    [win; lose], one reference forward without gradients."""
    device = t.acc.device
    dtype = next(t.acc.unwrap_model(t.model).parameters()).dtype  # DeepSpeed bf16 does not autocast
    latents = torch.cat([batch["latents_w"], batch["latents_l"]]).to(device, dtype)
    noise = torch.cat([batch["noise"], batch["noise"]]).to(device, dtype)
    timesteps = torch.cat([batch["timestep"], batch["timestep"]]).to(device)
    embeds = {k: torch.cat([v, v]).to(device) for k, v in batch["embeds"].items()}
    noisy = t.backbone.add_noise(latents, noise, timesteps)
    target = t.backbone.target(latents, noise, timesteps)
    with t.acc.autocast():
        with torch.no_grad(), reference_model(t) as reference:
            ref_pred = t.backbone.predict(reference, noisy.to(_dtype_of(reference)), timesteps, embeds)
        pred = t.backbone.predict(t.model, noisy, timesteps, embeds)
    return diffusion_dpo_loss(
        *split_pairs(pred), *split_pairs(ref_pred), *split_pairs(target), t.recipe.train.beta
    )


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


def stop_if_not_finite(t: Trainer, values: torch.Tensor, pairs: torch.Tensor, step: int, what: str) -> None:
    """Raise on every process if any process saw a non-finite value, naming the pairs it came from.

    Checked before ``backward``, so a NaN never reaches the weights or the optimizer state; the cost is
    one tiny all-reduce and host sync per micro-step."""
    bad = ~torch.isfinite(values.detach().float())
    count = t.acc.reduce(bad.sum().to(t.acc.device), reduction="sum")
    if int(count) == 0:
        return
    rows = pairs[bad.cpu()] if bad.numel() == len(pairs) > 1 else pairs  # per pair, or all of them
    named = [dict(zip(("prompt_id", "win", "lose"), map(int, row))) for row in rows.tolist()]
    found = [p for part in gather_object([named]) for p in part]
    latest = latest_checkpoint(t.run)
    kept = f"the last good checkpoint is {latest[1]}" if latest else "no checkpoint was written yet"
    raise TrainingError(
        f"non-finite {what} at step {step} for pair(s) {found[:8]}{' ...' if len(found) > 8 else ''} "
        f"(look for NaN/inf in their cached latents, or lower train.learning_rate / beta); training "
        f"stopped, {kept}"
    )


# ---- the loop ---------------------------------------------------------------------------------------
def train_loop(t: Trainer) -> dict[str, Any]:
    """Step, log, eval, checkpoint, until ``train.max_steps`` optimizer steps (or ``t.until``)."""
    cfg, acc, progress = t.recipe.train, t.acc, t.progress
    until = t.until if t.until is not None else cfg.max_steps
    pairs_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * acc.num_processes
    if progress.step == 0 and not evaluated(t.run, 0):
        run_eval(t, 0)
    bar = tqdm(
        total=until, initial=progress.step, desc="train", unit="step", disable=not acc.is_main_process
    )
    start_step, started, window, grad_norm = progress.step, time.perf_counter(), [], None
    stop = stop_on_signals()  # undone by train_stage
    while progress.step < until:
        step, step_pairs = progress.step + 1, []
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(t.loader)
            step_pairs.append(batch["pair"])
            with acc.accumulate(t.model):
                out = dpo_step(t, batch)
                stop_if_not_finite(t, out.per_pair_loss, batch["pair"], step, "DPO loss")
                acc.backward(out.loss)
                if acc.sync_gradients:
                    grad_norm = acc.clip_grad_norm_(t.model.parameters(), cfg.max_grad_norm)
                    if grad_norm is not None and not is_deepspeed(acc):
                        stop_if_not_finite(
                            t, grad_norm.reshape(1), torch.cat(step_pairs), step, "gradient norm"
                        )
                t.optimizer.step()
                t.optimizer.zero_grad(set_to_none=True)
            window.append(out.scalars())
        if not acc.optimizer_step_was_skipped:
            t.scheduler.step()
        progress.step, progress.pairs_seen = step, progress.pairs_seen + pairs_per_step
        bar.update(1)

        if step % max(t.recipe.tracking.log_every, 1) == 0 or step == until:
            log_train(t, window, grad_norm, step)
            window = []
        if (t.recipe.eval.every > 0 and step % t.recipe.eval.every == 0) or step == until:
            run_eval(t, step)
        if (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) or step == until:
            checkpoint(t)
        if step < until and (signum := stop.agreed()) is not None:
            stop_here(t, signum)
    bar.close()
    seconds = time.perf_counter() - started
    return {
        "steps trained now": progress.step - start_step,
        "seconds": round(seconds, 2),
        "pairs / s": (progress.step - start_step) * pairs_per_step / seconds if seconds > 0 else 0.0,
    }


def log_train(t: Trainer, window: list[dict[str, torch.Tensor]], grad_norm: Any, step: int) -> None:
    """Means over the steps since the last log and over processes: loss, implicit accuracy, reward
    margin, model / reference error differences; plus lr and gradient norm."""
    names = list(window[0])
    means = torch.stack([torch.stack([w[n] for w in window]).mean() for n in names]).to(t.acc.device)
    means = t.acc.reduce(means, reduction="mean")
    values = {f"train/{n}": float(v) for n, v in zip(names, means.tolist())}
    values["train/lr"] = float(t.scheduler.get_last_lr()[0])
    if grad_norm is not None:
        values["train/grad_norm"] = float(grad_norm)
    t.history.append({"step": step, **values})
    t.acc.log(values, step=step)


def evaluated(run: RunDir, step: int) -> bool:
    return run.eval_parquet.exists() and bool((read_parquet(run.eval_parquet)["step"] == step).any())


def run_eval(t: Trainer, step: int) -> None:
    """Held-out reward now; record it, log it, and keep a checkpoint of a new best."""
    if t.eval_inputs is None:
        return
    model = t.acc.unwrap_model(t.model)
    model.eval()
    try:
        inputs = t.eval_inputs
        result = ev.evaluate(
            t.backbone,
            inputs["reward"],
            inputs["prompts"],
            t.recipe,
            accelerator=t.acc,
            embeddings=inputs["embeddings"],
            negative=inputs["negative"],
        )
    finally:
        model.train()
    if t.acc.is_main_process:
        ev.record(t.run, step, result)
        if result["grid"] is not None:
            ev.save_grid(t.run, step, result["grid"])
    ev.log(t.acc, step, result)
    if step > 0 and result["total"] > t.best_total:  # NaN never wins
        checkpoint(t)
        if t.acc.is_main_process:
            write_best(t.run, step, result["total"])
        t.best_total = result["total"]
        wait_for_everyone(t.acc)


def checkpoint(t: Trainer) -> None:
    """Save ``step-<n>`` (once per step) and prune old ones, never the best."""
    if t.saved_step == t.progress.step:
        return
    save_checkpoint(t.resumable, t.run, t.progress)
    t.saved_step = t.progress.step
    if t.acc.is_main_process:
        best = read_best(t.run)
        prune_checkpoints(t.run, t.recipe.train.keep_checkpoints, best["step"] if best else None)
    wait_for_everyone(t.acc)


def stop_here(t: Trainer, signum: int) -> None:
    """A signal reached a process: checkpoint this step on every process, then stop all of them."""
    checkpoint(t)
    step = t.progress.step
    error = Interrupted(
        f"stopped by {signal_name(signum)} after step {step} of {t.recipe.train.max_steps}: checkpoint "
        f"{checkpoint_dir(t.run, step)} is written; run the same command again to resume from step {step}",
        signum,
    )
    error.mpo_reported = True  # every process stops here with the same message
    raise error


# ---- the stage ---------------------------------------------------------------------------------------
@errors_reach_every_rank
def train_stage(
    recipe: Any, accelerator: Accelerator | None = None, force: bool = False, *, train_round: Any = None
) -> dict[str, Any]:
    """Train (or finish training) the run; skipped when a checkpoint at ``train.max_steps`` made with
    this run's settings exists. Checkpoints made with other settings are refused, or with ``force``
    discarded (with eval.parquet) and training starts again.

    ``train_round`` (:class:`mpo.rounds.TrainRound`): one round of an iterative run, trained on the
    round's pairs up to the round's last step, from the previous round's last checkpoint."""
    run = train_round.run if train_round is not None else RunDir.from_recipe(recipe)
    until = train_round.until if train_round is not None else recipe.train.max_steps
    started = time.perf_counter()
    load_train_pairs(run)  # the inputs exist, or an error says which stage to run
    acc = accelerator if accelerator is not None else setup_accelerator(recipe)
    settings = run_settings(recipe, acc, run)
    if train_round is not None:
        settings["rounds"] = train_round.settings
    if is_main(acc):
        remove_incomplete(run)  # of a killed run: nobody writes checkpoints before the exchange below
    wait_for_everyone(acc)
    latest = latest_checkpoint(run)
    resumed = train_round.resumed_settings(latest, settings) if train_round is not None else settings
    if latest is not None and not _may_continue(latest, resumed, until, force):
        if is_main(acc):
            discard_training(run)
        wait_for_everyone(acc)
        latest = None
    if latest is not None and latest[0] < until:
        verify_checkpoint(latest[1], acc.process_index, is_deepspeed(acc))  # before any model is built
        wait_for_everyone(acc)
    if latest is not None and latest[0] >= until:
        summary = {"output_dir": str(run.root), "steps": latest[0], "steps trained now": 0, "trained": False}
        _print(acc, "train (up to date)", summary)
        if accelerator is None:
            end_session(acc)
        return summary
    owns_trackers = not acc.trackers  # an iterative run keeps one tracker run across its rounds
    if owns_trackers:
        init_tracking(recipe, acc, run)
    try:
        t = setup(recipe, acc, run, settings, resumed, train_round)
        t.until = until
        if train_round is not None:
            train_round.prepare(t)  # e.g. the reference: the policy the round started from
        done = train_loop(t)
    finally:
        restore_signals()
        for tracker in acc.trackers if owns_trackers else ():  # the group lives on: ``mpo run`` exports next
            tracker.finish()
        if owns_trackers:
            acc.trackers = []
    best = read_best(run)
    summary = {
        "output_dir": str(run.root),
        "pairs (train split)": t.pairs,
        "processes": acc.num_processes,
        "resumed from step": t.resumed_from if t.resumed_from is not None else "-",
        "steps": t.progress.step,
        **done,
        "final loss": t.history[-1]["train/loss"] if t.history else float("nan"),
        "best step": best["step"] if best else "-",
        "best eval total": best["total"] if best else float("nan"),
        "seconds (with setup)": round(time.perf_counter() - started, 2),
        "trained": True,
    }
    _print(acc, "train", summary)
    if accelerator is None:  # this stage built the Accelerator: it ends the session too
        end_session(acc)
    return summary


def _may_continue(latest: tuple[int, Any], settings: dict[str, Any], max_steps: int, force: bool) -> bool:
    """Whether the latest checkpoint's training stands: its result settings are this run's (else
    refused, or with ``force`` False: start over); to be resumed, its layout must be too."""
    path, stored = latest[1], read_progress(latest[1]).settings
    if not check_settings(path, result_settings(stored), result_settings(settings), force):
        return False
    return latest[0] >= max_steps or check_settings(path, stored, settings, force)


def _print(acc: Accelerator | None, title: str, summary: dict[str, Any]) -> None:
    from mpo.generate import print_summary

    if is_main(acc):
        print_summary(title, summary)


def eval_history(run: RunDir) -> pd.DataFrame:
    """eval.parquet as a table (empty when nothing was evaluated)."""
    return read_parquet(run.eval_parquet) if run.eval_parquet.exists() else pd.DataFrame()
