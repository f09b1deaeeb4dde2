"""The train stage: Diffusion-DPO on the MPO pairs (VisionReward paper eq. 2 and section 3.3).

::

    mpo train recipes/tiny/sdxl.yaml                                                   # 1 process
    accelerate launch --config_file launch/multi_gpu.yaml -m mpo.cli train RECIPE        # 8 GPUs, DDP
    accelerate launch --config_file launch/deepspeed_zero2.yaml -m mpo.cli train RECIPE  # ZeRO-2
    accelerate launch --config_file launch/cpu_deepspeed_zero2.yaml -m mpo.cli train RECIPE  # 2 CPUs

Each step draws ``train.batch_size`` pairs per process from the cached candidates (no VAE, no text
encoder), noises winner and loser with the same noise and timestep, runs the policy once on the
stacked ``[win; lose]`` batch and the reference once without gradients, and takes the loss of
:mod:`mpo.loss` (``train.loss_type``, ``train.sft_weight``, ``train.loss_weighting``). The reference
(:mod:`mpo.reference`) is the same network with its LoRA adapters switched off (LoRA), a frozen copy
of the base denoiser made before training (full fine-tuning; not given to ``prepare``, so under
DeepSpeed ZeRO-3 it stays whole on every GPU), or, with ``train.reference: precomputed``, its errors
computed once before the first step and read back, so that the step runs the policy only.

Precision: what trains is float32 (master weights, whatever ``model.dtype`` says: AdamW's updates at
lr 1e-6 vanish in bf16 weights); the frozen weights (VAE, text encoders, LoRA's base) stay in
``model.dtype``, which the recipe check requires to be the compute dtype for LoRA under mixed
precision; the forward runs under the autocast of ``train.mixed_precision``; the regression target
and the loss are float32. The reference computes the policy's own function at step 0 (loss log 2,
margin 0).

Host cost per micro-step: nothing is read back on the host (no ``.item()``, no finiteness check that
syncs; :mod:`mpo.finite`), the unwrapped policy, its LoRA switch and its trainable parameters are
looked up once, batches come from pinned memory without blocking, and the optimizer is the fused
AdamW kernel where the device has one.

The loop is step, log, eval, checkpoint. A run directory with checkpoints resumes from the latest
complete one (model, optimizer, scheduler, RNG, data position), and gives the weights an uninterrupted
run would have given: pairs, noise and timesteps are functions of the data position
(:mod:`mpo.train_data`). A non-finite loss stops training with an error naming the step and the pair;
the checkpoints already written stay as they are; the weights never take that step's update. SIGTERM or
SIGINT (SLURM's time limit, Ctrl-C) stops every process at the end of the current step with a
checkpoint there (:mod:`mpo.interrupt`).

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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import OmegaConf
from torch import nn
from tqdm.auto import tqdm

from mpo import evaluate as ev
from mpo.backbones.base import Backbone
from mpo.backbones.registry import load_backbone
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
from mpo.finite import FiniteGuard
from mpo.interrupt import Interrupted, restore_signals, signal_name, stop_on_signals
from mpo.loss import DPOOutput, dpo_loss_from_errors, per_sample_mse
from mpo.reference import (
    REFERENCE_DIR,
    LiveReference,
    Plan,
    PrecomputedReference,
    StepInputs,
    fingerprint_of,
    match_dtypes,
    precompute_reference,
)
from mpo.store import RunDir, candidates_hash, parquet_hash, read_parquet
from mpo.train_data import (
    PairDataset,
    load_train_pairs,
    make_dataloader,
    verify_candidates,
)
from mpo.train_options import checkpoint_files, is_own, starting_checkpoint, starts_over
from mpo.train_state import (
    Resumable,
    TrainProgress,
    check_settings,
    checkpoint_dir,
    discard_training,
    fill_deepspeed_config,
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
from mpo.weights import LoraSwitch, add_lora, load_weights_into, save_weights


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. a non-finite loss); the message names the step and the pair."""


@dataclass(frozen=True)
class StepSettings:
    """What the step reads every micro-step, as plain values: an OmegaConf lookup costs ~50 us."""

    beta: float
    loss_type: str
    sft_weight: float
    loss_weighting: str
    snr_gamma: float
    max_grad_norm: float
    deepspeed: bool  # the engine clips and steps inside backward
    scaler: bool  # fp16's GradScaler decides the skipping

    @classmethod
    def of(cls, recipe: Any, acc: Accelerator) -> StepSettings:
        cfg = recipe.train
        return cls(
            beta=float(cfg.beta),
            loss_type=str(cfg.loss_type),
            sft_weight=float(cfg.sft_weight),
            loss_weighting=str(cfg.loss_weighting),
            snr_gamma=float(cfg.snr_gamma),
            max_grad_norm=float(cfg.max_grad_norm),
            deepspeed=is_deepspeed(acc),
            scaler=getattr(acc, "scaler", None) is not None,
        )


@dataclass
class Trainer:
    """Everything the loop needs, built by :func:`setup`."""

    recipe: Any
    acc: Accelerator
    backbone: Backbone
    model: nn.Module  # the prepared policy denoiser
    reference: LiveReference | PrecomputedReference
    optimizer: Any
    scheduler: Any
    # The run (set by setup; a trainer from prepare_step alone has none).
    run: RunDir | None = None
    loader: Iterator[dict[str, Any]] | None = None
    progress: TrainProgress = field(default_factory=TrainProgress)
    pairs: int = 0
    eval_inputs: dict[str, Any] | None = None  # prompts, embeddings, negative, reward; None: no val prompts
    best_total: float = -math.inf
    saved_step: int = -1
    resumed_from: int | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    # Looked up once: the step reads these every micro-step.
    settings: StepSettings | None = None
    policy: nn.Module | None = None  # the model without its DDP / DeepSpeed wrapper
    switch: LoraSwitch | None = None  # LoRA: turns the policy's adapters off for the reference
    trainable: list[nn.Parameter] = field(default_factory=list)
    input_dtype: torch.dtype = torch.float32  # what the denoiser's inputs are cast to
    guard: FiniteGuard | None = None
    grad_norm: Any = None  # pre-clip norm of the last optimizer step (device tensor), None under DeepSpeed
    lr_used: float = 0.0  # learning rate of the last optimizer step (the scheduler is one ahead)
    aside_seconds: float = 0.0  # eval and checkpoint time inside the loop
    resumable: Resumable | None = None  # what a checkpoint saves besides the progress (set by setup)
    verified: list[str] = field(default_factory=list)  # candidate shards checked by every process
    ema: Any = None  # diffusers EMAModel of the trainable weights (train.ema)
    until: int | None = None  # the step training stops at (an iterative run's round end; None: max_steps)


# ---- setup ----------------------------------------------------------------------------------------
def setup_accelerator(recipe: Any) -> Accelerator:
    """The training Accelerator (mixed precision, accumulation, the recipe's tracker). ``mpo run``
    builds it once for every stage: accelerate's state cannot change mixed precision later."""
    return make_training_accelerator(recipe)


def init_tracking(recipe: Any, acc: Accelerator, run: RunDir) -> None:
    """Start the tracker run (wandb: under the run directory, ``tracking.mode`` online / offline)."""
    tracker = recipe.tracking.tracker
    if tracker == "none" or not acc.is_main_process:
        return  # one tracker run, the main process's (accelerate's wandb tracker starts one per process)
    wandb = {"dir": str(run.root), "name": recipe.tracking.run_name or recipe.name}
    wandb["mode"] = getattr(recipe.tracking, "mode", "online")
    if tracker == "wandb":
        (run.root / "wandb").mkdir(parents=True, exist_ok=True)
        from mpo.tracking import wandb_run_id

        wandb.update(id=wandb_run_id(run), resume="allow")  # a restart continues the same run
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


def setup_model(
    recipe: Any, acc: Accelerator, backbone: Backbone | None = None
) -> tuple[Backbone, nn.Module, nn.Module | None]:
    """Load the backbone (unless given one); make its denoiser trainable (LoRA or full) in float32;
    the frozen copy that serves as the reference of a full fine-tuning run with a live reference
    (else None)."""
    if backbone is None:
        # The first load may build and save a tiny model; ZeRO-3 partitions the denoiser at prepare().
        with main_process_first(acc), whole_model_loading():
            backbone = load_backbone(recipe.model, acc.device)
    backbone.use_generation_settings(recipe.generate)  # e.g. FLUX.1-dev's embedded guidance scale
    backbone.set_attention(recipe.train.attention)
    denoiser = backbone.denoiser
    if recipe.model.finetune == "lora":
        add_lora(denoiser, recipe.model, backbone.lora_target_modules)
    else:
        denoiser.requires_grad_(True)
    # Float32 master weights of what trains, whatever model.dtype is: AMP needs them (fp16 insists),
    # and without mixed precision bf16 weights would round most AdamW updates at lr ~1e-6 away.
    from diffusers.training_utils import cast_training_params

    cast_training_params(denoiser, torch.float32)
    frozen = None
    if recipe.model.finetune == "full" and recipe.train.reference == "live":
        # Made after the cast: the policy's own dtypes, so both compute one function at step 0.
        frozen = copy.deepcopy(denoiser).requires_grad_(False).eval()
    if recipe.train.gradient_checkpointing:
        backbone.enable_gradient_checkpointing()
    denoiser.train()
    return backbone, denoiser, frozen


def setup_optimizer(
    recipe: Any, denoiser: nn.Module, world_size: int, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW on the trainable parameters (lr times pairs per step when ``train.scale_lr``).

    fused: the one-kernel AdamW (where the parameters' device has it), which also takes the
    ``found_inf`` flag that skips a step on the device (:mod:`mpo.finite`); DeepSpeed brings its own
    step, so it gets the plain one."""
    from mpo.train_options import make_optimizer

    cfg = recipe.train
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.batch_size * cfg.gradient_accumulation_steps * world_size
    return make_optimizer(recipe, [p for p in denoiser.parameters() if p.requires_grad], lr, fused)


def setup_scheduler(recipe: Any, optimizer: torch.optim.Optimizer) -> Any:
    """diffusers' schedule, counted in optimizer steps and stepped by the loop itself (not prepared:
    accelerate would step it once per process). Built on the optimizer object whose ``step`` the
    trainer calls (:func:`stepped_optimizer`), so that torch sees the optimizer step before it."""
    from diffusers.optimization import get_scheduler

    cfg = recipe.train
    name = cfg.lr_schedule
    if name == "constant" and cfg.warmup_steps > 0:
        name = "constant_with_warmup"
    return get_scheduler(
        name,
        optimizer,
        step_rules=cfg.lr_step_rules,
        num_warmup_steps=cfg.warmup_steps,
        num_training_steps=cfg.max_steps,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )


def stepped_optimizer(acc: Accelerator, optimizer: Any) -> Any:
    """What the step calls ``step()`` / ``zero_grad()`` on: the torch optimizer itself where
    accelerate's wrapper would only forward the call (no DeepSpeed, no GradScaler), after a
    file-system lookup for an optional package and a signature inspection on every call (1-2 ms a
    step); the wrapper otherwise."""
    if is_deepspeed(acc) or getattr(acc, "scaler", None) is not None:
        return optimizer
    return getattr(optimizer, "optimizer", optimizer)


# train.* keys that do not change what training produces: how often to save and how many to keep,
# data-loading workers, recomputation to save memory, and the attention kernel.
UNFINGERPRINTED_TRAIN_KEYS = (
    "checkpoint_every",
    "keep_checkpoints",
    "num_workers",
    "gradient_checkpointing",
    "attention",
    "allow_tf32",  # a matmul precision, like the attention kernel: not a different training
    "resume_from",  # where this run starts from; the checkpoint's own settings are checked
)
# The lr schedule's own keys count only for the schedules that read them.
SCHEDULE_KEYS = {"lr_num_cycles": ("cosine_with_restarts",), "lr_power": ("polynomial",)}
SCHEDULE_KEYS["lr_step_rules"] = ("piecewise_constant",)


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
    train = {
        k: v
        for k, v in OmegaConf.to_container(t, resolve=True).items()
        if k not in UNFINGERPRINTED_TRAIN_KEYS
    }
    if t.lr_schedule in ("constant", "constant_with_warmup", "piecewise_constant"):
        train.pop("max_steps")  # a schedule that does not depend on it: training may be extended
    for key, schedules in SCHEDULE_KEYS.items():
        if t.lr_schedule not in schedules:
            train.pop(key, None)
    if not t.ema:
        train.pop("ema_decay", None)
    layout = {
        "processes": acc.num_processes,
        "deepspeed": is_deepspeed(acc),
        "train.batch_size": train.pop("batch_size"),
        "train.gradient_accumulation_steps": train.pop("gradient_accumulation_steps"),
    }
    train["pairs per step"] = t.batch_size * t.gradient_accumulation_steps * acc.num_processes
    lora = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target_modules") if m.finetune == "lora" else ()
    model_keys = ("family", "path", "revision", "variant", "dtype", "finetune", "expert", *lora)
    model_keys += ("vae_path",) if m.vae_path is not None else ()  # it decodes the eval samples
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


def prepare_step(recipe: Any, acc: Accelerator, backbone: Backbone | None = None) -> Trainer:
    """What the step needs, prepared by accelerate: the policy (trainable weights in float32),
    optimizer, lr schedule, live reference and finiteness guard; no run directory, data or eval
    (:func:`setup` adds those). benchmarks/dpo_step.py builds its trainer here, around its own backbone."""
    set_seed(recipe.train.seed)  # LoRA's initial weights; a resume then restores every RNG state
    backbone, denoiser, frozen = setup_model(recipe, acc, backbone)
    optimizer = setup_optimizer(recipe, denoiser, acc.num_processes, fused=not is_deepspeed(acc))
    fill_deepspeed_config(recipe, acc)
    model, optimizer = acc.prepare(denoiser, optimizer)
    scheduler = setup_scheduler(recipe, stepped_optimizer(acc, optimizer))
    policy = acc.unwrap_model(model)
    backbone.set_denoiser(policy)
    if frozen is not None:
        match_dtypes(frozen, policy)  # DeepSpeed bf16 / fp16 casts the prepared module itself
    switch = LoraSwitch(policy) if recipe.model.finetune == "lora" else None
    return Trainer(
        recipe=recipe,
        acc=acc,
        backbone=backbone,
        model=model,
        reference=LiveReference(backbone, frozen if frozen is not None else policy, switch),
        optimizer=optimizer,
        scheduler=scheduler,
        settings=StepSettings.of(recipe, acc),
        policy=policy,
        switch=switch,
        trainable=[p for p in policy.parameters() if p.requires_grad],
        input_dtype=next(p.dtype for p in policy.parameters() if p.is_floating_point()),
        # Under fp16 the GradScaler judges gradient overflow (routine there) and skips the step itself.
        guard=FiniteGuard(acc, judge_grad_norm=getattr(acc, "scaler", None) is None),
    )


def result_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` without its layout: what decides whether finished training is up to date."""
    return {k: v for k, v in settings.items() if k != "layout"}


def setup(
    recipe: Any,
    acc: Accelerator,
    run: RunDir,
    settings: dict[str, Any],
    start: tuple[int, Path] | None = None,
    resumed_settings: dict[str, Any] | None = None,
    train_round: Any = None,
) -> Trainer:
    """Build model, optimizer, data and eval inputs; resume from checkpoint ``start`` if any (which
    must have been made with ``resumed_settings``, by default ``settings``). ``train_round``
    (:class:`mpo.rounds.TrainRound`): the data stream and reference of one round of an iterative run."""
    from mpo import train_options

    pairs = load_train_pairs(run)
    train_options.apply_tf32(recipe)
    verified = verify_candidates(run, acc.process_index, acc.num_processes)  # this rank's share
    wait_for_everyone(acc)  # every share checked: all of them are
    trainer = prepare_step(recipe, acc)
    backbone, model = trainer.backbone, trainer.model
    finetune = recipe.model.finetune
    resumable = Resumable(
        acc,
        model,
        trainer.optimizer,
        trainer.scheduler,
        save_weights=lambda folder, state: save_weights(
            backbone, acc.unwrap_model(model), state, finetune, folder
        ),
        load_weights=lambda folder: load_weights_into(backbone, acc.unwrap_model(model), finetune, folder),
    )
    ema = train_options.make_ema(recipe, acc.unwrap_model(model), _zero_stage(acc))
    if ema is not None:
        resumable.extras.append(train_options.EMACheckpoint(ema, acc, model, resumable.save_weights))
    progress = resume(resumable, settings, start, resumed_settings)
    seed, before = recipe.train.seed, 0  # an iterative run: each round's own stream, from its position 0
    if train_round is not None:
        seed, before = train_round.stream(recipe.train.seed, settings["train"]["pairs per step"])
    loader = make_dataloader(
        PairDataset(run, pairs, seed, backbone.timestep_sampler(recipe.train), verified=verified),
        recipe.train.batch_size,
        acc.process_index,
        acc.num_processes,
        progress.pairs_seen - before,
        recipe.train.num_workers,
        pin_memory=acc.device.type == "cuda",
    )
    resumed = progress.step if progress.step > 0 else None
    trainer.run, trainer.loader, trainer.progress, trainer.pairs = run, iter(loader), progress, len(pairs)
    trainer.eval_inputs = setup_eval(recipe, run, acc.device)
    trainer.resumed_from, trainer.saved_step = resumed, resumed if resumed is not None else -1
    trainer.resumable, trainer.verified = resumable, verified
    trainer.ema = ema
    trainer.best_total = best_so_far(run, progress.step)
    if train_round is not None:  # the round's reference: the base, or the policy the round started from
        trainer.reference = train_round.reference_for(trainer, pairs)
    elif recipe.train.reference == "precomputed":
        trainer.reference = setup_precomputed_reference(trainer, pairs)
    return trainer


def reference_settings(settings: dict[str, Any], backbone: Backbone) -> dict[str, Any]:
    """What the reference's errors depend on, out of the run's :func:`run_settings`: the base model
    (not how it is fine-tuned: the reference is the base either way), the data stream (seed, timestep
    range and density, pairs and candidates), the generation settings the family's training forward
    repeats (FLUX.1: the embedded guidance and the resolution's shift), and the precision (dtype,
    autocast, DeepSpeed's cast)."""
    model = {k: v for k, v in settings["model"].items() if k != "finetune" and not k.startswith("lora_")}
    train = settings["train"]
    stream = ("seed", "timestep_range", "timestep_sampling", "logit_mean", "logit_std", "mode_scale")
    generate = getattr(backbone, "training_generation_keys", ())
    return {
        "model": model,
        "train": {k: train[k] for k in (*stream, "mixed_precision")},
        "generate": {f"generate.{k}": settings["eval sampling"][f"generate.{k}"] for k in generate},
        "deepspeed": settings["layout"]["deepspeed"],
        "inputs": {k: settings["inputs"][k] for k in ("pairs.parquet", "candidates")},
        "num_train_timesteps": backbone.num_train_timesteps,
    }


def setup_precomputed_reference(
    t: Trainer,
    pairs: pd.DataFrame,
    *,
    stream: tuple[int, int, Path] | None = None,
    live: Callable[[], LiveReference | None] | None = None,
    extra: dict[str, Any] | None = None,
) -> PrecomputedReference:
    """``train.reference: precomputed``: the stored reference errors of every planned position, after
    computing those that are missing (:mod:`mpo.reference`) with the policy itself at step 0 (full
    fine-tuning, in eval mode like a frozen copy) or with its adapters off (LoRA).

    A round of an iterative run (:meth:`mpo.rounds.TrainRound.reference_for`) gives its own
    ``stream`` (seed, optimizer steps, folder), the ``live`` reference that computes its errors and
    what they depend on besides the settings (``extra``)."""
    acc, cfg = t.acc, t.recipe.train
    settings = reference_settings(t.progress.settings, t.backbone)
    if extra is not None:
        settings["round"] = extra
    digest, fingerprint = fingerprint_of(settings, pairs)
    seed, steps, folder = (
        stream if stream is not None else (cfg.seed, cfg.max_steps, t.run.root / REFERENCE_DIR)
    )
    plan = Plan(steps * cfg.gradient_accumulation_steps, cfg.batch_size, acc.process_index, acc.num_processes)
    dataset = PairDataset(t.run, pairs, seed, t.backbone.timestep_sampler(cfg), verified=t.verified)

    def batches_from(micro_step: int) -> Iterator[dict[str, Any]]:
        pairs_seen = micro_step * cfg.batch_size * acc.num_processes
        loader = make_dataloader(
            dataset,
            cfg.batch_size,
            acc.process_index,
            acc.num_processes,
            pairs_seen,
            0,
            acc.device.type == "cuda",
        )
        return iter(loader)

    if live is None:
        at_base = t.switch is not None or t.progress.step == 0
        reference = LiveReference(t.backbone, t.policy, t.switch) if at_base else None
    else:
        reference = live()
    bar = tqdm(desc="reference errors", unit="chunk", disable=not acc.is_main_process)

    def advance(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    if reference is not None and reference.module is t.policy and reference.switch is None:
        t.policy.eval()  # the policy itself is the reference: as a frozen copy would be
    try:
        stored = precompute_reference(
            folder,
            digest,
            fingerprint,
            plan,
            batches_from,
            lambda batch: step_inputs(t, batch),
            reference,
            acc.autocast,
            acc,
            advance,
        )
    finally:
        t.policy.train()
        bar.close()
    return stored


def resume(
    r: Resumable,
    settings: dict[str, Any],
    start: tuple[int, Path] | None,
    resumed_settings: dict[str, Any] | None = None,
) -> TrainProgress:
    """Load the checkpoint training starts from (:func:`train_stage` picked it, ``train.resume_from``:
    the latest complete one by default; weights, optimizer, scheduler, RNG, EMA) if there is one,
    after checking that it was made with the settings of this run (or ``resumed_settings``: a round
    of an iterative run starts from the previous round's last checkpoint); returns where training stands."""
    progress = TrainProgress(settings=settings)
    if start is None:
        return progress
    path = start[1]
    stored = read_progress(path)
    check_settings(path, stored.settings, resumed_settings if resumed_settings is not None else settings)
    load_checkpoint(r, path, verified=True)  # train_stage checked every file already
    progress.step, progress.pairs_seen, progress.id = stored.step, stored.pairs_seen, stored.id
    return progress


def _zero_stage(acc: Accelerator) -> int | None:
    return acc.state.deepspeed_plugin.zero_stage if is_deepspeed(acc) else None


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
def step_inputs(t: Trainer, batch: dict[str, Any]) -> StepInputs:
    """The stacked ``[win; lose]`` inputs of a micro-batch: one noise and one timestep per pair, shared
    by winner and loser; noising and target in float32 (a bf16 v-target is off by up to 8e-3)."""
    device, cfg = t.acc.device, t.settings

    def move(x: torch.Tensor) -> torch.Tensor:  # from pinned memory on a GPU: no host sync
        return x.to(device, non_blocking=True)

    latents = torch.cat([move(batch["latents_w"]), move(batch["latents_l"])]).float()
    noise = move(batch["noise"]).float()
    noise = torch.cat([noise, noise])
    timestep = move(batch["timestep"])
    timesteps = torch.cat([timestep, timestep])
    embeds = {k: torch.cat([move(v), move(v)]) for k, v in batch["embeds"].items()}
    noisy = t.backbone.add_noise(latents, noise, timesteps).to(t.input_dtype)
    target = t.backbone.target(latents, noise, timesteps).float()
    weighting = t.backbone.loss_weight(timestep, cfg.loss_weighting, cfg.snr_gamma)  # the schedule's
    return StepInputs(noisy, timesteps, embeds, target, weighting)


def dpo_step(t: Trainer, batch: dict[str, Any]) -> DPOOutput:
    """The loss of one micro-batch of pairs: shared noise and timestep, one stacked policy forward on
    [win; lose], the reference's errors (a forward without gradients, or the stored ones)."""
    cfg = t.settings
    inputs = step_inputs(t, batch)
    with t.acc.autocast():
        ref_w, ref_l = t.reference.errors(batch, inputs)
        pred = t.backbone.predict(t.model, inputs.noisy, inputs.timesteps, inputs.embeds)
    mse_w, mse_l = per_sample_mse(pred, inputs.target).chunk(2)
    return dpo_loss_from_errors(
        mse_w,
        mse_l,
        ref_w,
        ref_l,
        cfg.beta,
        inputs.weighting,
        loss_type=cfg.loss_type,
        sft_weight=cfg.sft_weight,
    )


def micro_step(t: Trainer, batch: dict[str, Any], step: int, step_pairs: list[torch.Tensor]) -> DPOOutput:
    """Forward, backward and, at the last micro-step of an optimizer step, clip and update; nothing
    is read back on the host (the finiteness flags stay on the device: :mod:`mpo.finite`)."""
    acc, cfg = t.acc, t.settings
    with acc.accumulate(t.model):
        out = dpo_step(t, batch)
        t.guard.loss(step, batch["pair"], out.per_pair_loss)
        acc.backward(out.loss)  # under DeepSpeed this also steps, at the last micro-step
        if not acc.sync_gradients:
            return out  # the optimizer acts at the last micro-step only
        optimizer = stepped_optimizer(acc, t.optimizer)
        if not cfg.deepspeed:  # (DeepSpeed clipped and stepped inside backward)
            t.grad_norm = acc.clip_grad_norm_(t.trainable, cfg.max_grad_norm)
            skip = t.guard.found_inf(step, torch.cat(step_pairs), t.grad_norm)
            inner = getattr(t.optimizer, "optimizer", t.optimizer)
            if cfg.scaler:
                pass  # the GradScaler sets found_inf itself
            elif getattr(inner, "_step_supports_amp_scaling", False):
                inner.found_inf = skip  # fused AdamW leaves everything untouched when it is 1
            elif bool(skip):  # no fused kernel: one host read per optimizer step
                inner.zero_grad(set_to_none=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return out


def stop_if_not_finite(t: Trainer) -> None:
    """Raise on every process if any process saw a non-finite value since the last look, naming the
    first step and its pairs. One all-reduce and one host read; called at log, eval and checkpoint
    steps, so a step that went bad (whose update was skipped) is never checkpointed."""
    found = t.guard.look()
    if found is None:
        return
    step, what, pairs = found
    latest = latest_checkpoint(t.run)
    kept = f"the last good checkpoint is {latest[1]}" if latest else "no checkpoint was written yet"
    raise TrainingError(
        f"non-finite {what} at step {step} for pair(s) {pairs[:8]}{' ...' if len(pairs) > 8 else ''} "
        f"(look for NaN/inf in their cached latents, or lower train.learning_rate / beta); the weights "
        f"never took that step's update; training stopped at step {t.progress.step}, {kept}"
    )


# ---- the loop ---------------------------------------------------------------------------------------
def train_loop(t: Trainer) -> dict[str, Any]:
    """Step, log, eval, checkpoint, until ``train.max_steps`` optimizer steps (or ``t.until``)."""
    cfg, acc, progress = t.recipe.train, t.acc, t.progress
    until = t.until if t.until is not None else cfg.max_steps
    pairs_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * acc.num_processes
    if progress.step == 0 and not evaluated(t.run, 0):
        run_eval(t, 0)
    bar = tqdm(total=until, initial=progress.step, desc="train", unit="step", disable=not acc.is_main_process)
    start_step, started, window = progress.step, time.perf_counter(), []
    t.aside_seconds = 0.0
    stop = stop_on_signals()  # undone by train_stage
    while progress.step < until:
        step, step_pairs = progress.step + 1, []
        for _ in range(cfg.gradient_accumulation_steps):
            batch = next(t.loader)
            step_pairs.append(batch["pair"])
            window.append(micro_step(t, batch, step, step_pairs).scalars())
        t.lr_used = t.scheduler.get_last_lr()[0]  # what this step used; the scheduler now moves on
        if t.ema is not None and not acc.optimizer_step_was_skipped:
            t.ema.step(t.trainable)  # once per optimizer step, on the float32 trainable weights
        if not acc.optimizer_step_was_skipped:
            t.scheduler.step()
        progress.step, progress.pairs_seen = step, progress.pairs_seen + pairs_per_step
        bar.update(1)

        logging = step % max(t.recipe.tracking.log_every, 1) == 0 or step == until
        evaluating = (t.recipe.eval.every > 0 and step % t.recipe.eval.every == 0) or step == until
        saving = (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0) or step == until
        if logging:
            log_train(t, window, step, torch.cat(step_pairs))  # raises first if a value went non-finite
            window = []
            logged = t.history[-1]
            bar.set_postfix(loss=f"{logged['train/loss']:.4f}", acc=f"{logged['train/implicit_acc']:.2f}")
        elif evaluating or saving:
            stop_if_not_finite(t)
        aside = time.perf_counter()
        if evaluating:
            run_eval(t, step)
        if saving:
            checkpoint(t)
        if evaluating or saving:
            t.aside_seconds += time.perf_counter() - aside
        if step < until and (signum := stop.agreed()) is not None:
            stop_here(t, signum)
    bar.close()
    seconds = time.perf_counter() - started
    pairs = (progress.step - start_step) * pairs_per_step
    training = seconds - t.aside_seconds
    return {
        "steps trained now": progress.step - start_step,
        "seconds": round(seconds, 2),
        "seconds in eval and checkpoints": round(t.aside_seconds, 2),
        "pairs / s (training steps)": pairs / training if training > 0 else 0.0,
        "pairs / s (with eval and checkpoints)": pairs / seconds if seconds > 0 else 0.0,
    }


def log_train(
    t: Trainer, window: list[dict[str, torch.Tensor]], step: int, step_pairs: torch.Tensor | None = None
) -> None:
    """Means over the steps since the last log and over processes: loss, implicit accuracy, reward
    margin, model / reference error differences; plus the lr and pre-clip gradient norm of the last
    optimizer step. The one host read of the window, after the finiteness check."""
    norm = t.grad_norm
    if is_deepspeed(t.acc):  # the engine's pre-clip norm of its last step, whatever accelerate returns
        norm = t.model.get_global_grad_norm()
        pairs = step_pairs if step_pairs is not None else torch.zeros(0, 3, dtype=torch.long)
        t.guard.grad_norm(step, pairs, norm)
    stop_if_not_finite(t)
    names = list(window[0])
    means = torch.stack([torch.stack([w[n] for w in window]).mean() for n in names]).to(t.acc.device)
    means = t.acc.reduce(means, reduction="mean")
    values = {f"train/{n}": float(v) for n, v in zip(names, means.tolist())}
    values["train/lr"] = float(t.lr_used)
    if norm is not None:
        values["train/grad_norm"] = float(norm)
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
        with sampling_precision(t):
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
        ev.save_samples(t.run, step, result["previews"])
    ev.log(t.acc, step, result)
    if step > 0 and result["total"] > t.best_total:  # NaN never wins
        checkpoint(t)
        if t.acc.is_main_process:
            write_best(t.run, step, result["total"])
        t.best_total = result["total"]
        wait_for_everyone(t.acc)


def sampling_precision(t: Trainer) -> Any:
    """Eval sampling where the policy's dtype is not the pipeline's: float32 master weights among
    ``model.dtype`` parts (embeddings arrive in the text encoders' dtype), or a DeepSpeed bf16 module
    among float32 parts. Autocast to the half type of the two lets them meet."""
    from mpo.backbones.base import torch_dtype

    frozen, policy = torch_dtype(t.recipe.model.dtype), t.input_dtype
    if frozen == policy:
        return contextlib.nullcontext()
    return torch.autocast(t.acc.device.type, dtype=policy if policy != torch.float32 else frozen)


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
    """A signal reached a process: checkpoint this step on every process, then stop all of them (a
    step whose values went non-finite raises instead: it is never checkpointed)."""
    stop_if_not_finite(t)
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
    resume_from = recipe.train.resume_from
    resumed = train_round.resumed_settings(latest, settings) if train_round is not None else settings
    if latest is not None and (
        starts_over(resume_from, latest, force) or not _may_continue(latest, resumed, until, force)
    ):
        if is_main(acc):
            discard_training(run)
        wait_for_everyone(acc)
        latest = None
    latest = starting_checkpoint(run, resume_from, latest, recipe.train.max_steps)
    if latest is not None and not is_own(run, latest[1]):  # another run's, named by train.resume_from
        _may_continue(latest, settings, recipe.train.max_steps, force=False)
    if latest is not None and latest[0] < until:
        verify_checkpoint(latest[1], acc.process_index, is_deepspeed(acc), checkpoint_files(recipe))
        wait_for_everyone(acc)  # every file checked before any model is built
    if latest is not None and latest[0] >= until:
        summary = {"output_dir": str(run.root), "steps": latest[0], "steps trained now": 0, "trained": False}
        _print(acc, "train (up to date)", summary)
        if accelerator is None:
            end_session(acc)
        return summary
    owns_trackers = not acc.trackers  # an iterative run keeps one tracker run across its rounds
    try:
        t = setup(recipe, acc, run, settings, latest, resumed, train_round)
        t.until = until
        if owns_trackers:  # after setup: a stage that fails before training has no tracker run
            init_tracking(recipe, acc, run)
        done = train_loop(t)
    finally:
        restore_signals()
        for tracker in acc.trackers if owns_trackers else ():  # the group lives on: ``mpo run`` exports next
            tracker.finish()
        if owns_trackers:
            acc.trackers = []
    if acc.is_main_process:
        from mpo.report import write_report

        write_report(run, recipe, t.backbone)
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
    from mpo.summary import print_summary

    if is_main(acc):
        print_summary(title, summary)


def eval_history(run: RunDir) -> pd.DataFrame:
    """eval.parquet as a table (empty when nothing was evaluated)."""
    return read_parquet(run.eval_parquet) if run.eval_parquet.exists() else pd.DataFrame()
