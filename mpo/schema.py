"""The recipe schema: typed dataclasses, one per recipe section, and the allowed values of their keys.

Nothing else lives here, so that every part of the project (the backbones, the stages, the reward)
can import the schema without importing the loader: :mod:`mpo.config` reads, merges, overrides and
validates recipes against these classes. A comment after each field gives its unit or meaning; they
are what ``mpo recipe`` users read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MODEL_DTYPES = ("float32", "float16", "bfloat16")
SELECT_RULES = ("mpo", "dpo")
SELECT_LEVELS = ("dimension", "sub_dimension", "question")
CAP_STRATEGIES = ("largest_margin", "random")
FINETUNE_MODES = ("lora", "full")
LR_SCHEDULES = ("constant", "linear")
MIXED_PRECISION = ("no", "fp16", "bf16")
ATTENTION = ("sdpa", "xformers")
TRACKERS = ("wandb", "tensorboard", "none")
TRACKER_MODES = ("online", "offline")
EXPORT_WHICH = ("best", "last")
ROUND_PROMPTS = ("same", "fresh")
ROUND_REFERENCES = ("base", "previous")
TIMESTEP_SAMPLING = ("uniform", "logit_normal", "mode")
LOSS_TYPES = ("sigmoid", "hinge", "ipo")  # mpo.loss
# train.loss_weighting: min_snr for DDPM (epsilon / v) schedules, sigma_sqrt / cosmap for flow matching;
# a family's schedule says which it defines (TrainingSchedule.loss_weightings).
LOSS_WEIGHTINGS = ("none", "min_snr", "sigma_sqrt", "cosmap")
REFERENCES = ("live", "precomputed")


@dataclass
class ModelConfig:
    family: str = "sdxl"  # a registered backbone family (mpo.backbones.registry)
    path: str = "???"  # local folder or hub id, loaded with from_pretrained
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weight files on the hub
    # dtype of the frozen weights (VAE, text encoders, LoRA's base denoiser) and of sampling; what
    # trains is float32 whatever this says. LoRA under mixed precision: the compute dtype.
    dtype: str = "float32"
    finetune: str = "lora"  # lora | full
    lora_rank: int = 8
    lora_alpha: int = 8
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # None: the backbone's default attention projections
    expert: str | None = None  # two-expert models (Wan 2.2 A14B): which trains, high_noise | low_noise
    tiny: bool = False  # build the tiny random-initialised variant at `path` if it does not exist


@dataclass
class PromptsConfig:
    file: str = "???"  # text file (one prompt a line), JSONL/parquet with a `prompt` column
    val_fraction: float = 0.1  # held-out prompts for eval curves
    val_count: int | None = None  # overrides val_fraction when set
    limit: int | None = None  # use only the first `limit` prompts
    split_seed: int = 0


@dataclass
class GenerateConfig:
    num_candidates: int = 4  # N candidates per prompt
    num_inference_steps: int = 30
    guidance_scale: float = 5.0
    height: int = 1024  # pixels
    width: int = 1024  # pixels
    num_frames: int = 49  # video backbones only; must match the VAE's temporal compression
    fps: int = 8  # video backbones only
    seed: int = 0
    prompts_per_shard: int = 16  # prompts per safetensors shard (the unit of resume)
    previews: int = 16  # decoded PNG/MP4 previews written (0 = none)


@dataclass
class RewardConfig:
    checklist: str = "image-full"  # a bundled checklist name or a YAML path
    weights: str | None = None  # weights file from `reward fit` (replaces the checklist's weights)
    backend: str = "pixel-stats"  # vlm | cogvlm2 | pixel-stats (vlm picks cogvlm2 for a CogVLM2 checkpoint)
    model_path: str | None = None  # VLM path or hub id (backend=vlm)
    alignment_model_path: str | None = None  # alignment term: CLIP-FlanT5 (VQAScore) or a VLM (optional)
    batch_size: int = 8  # samples scored per forward
    dtype: str = "bfloat16"
    max_frames: int = 24  # video: one frame per second, at most this many
    question_chunk: int | None = None  # vlm: questions per suffix batch (bounds the KV-cache copies)


@dataclass
class SelectConfig:
    rule: str = "mpo"  # mpo: dominance + margin; dpo: margin only
    level: str = "dimension"  # dimension | sub_dimension | question
    threshold: float = 0.0  # minimum total(win) - total(lose)
    max_pairs_per_prompt: int | None = None  # cap per prompt (None = keep all)
    cap_strategy: str = "largest_margin"  # which pairs survive the cap
    dimensions: list[str] | None = None  # restrict dominance to these (None = all known)
    seed: int = 0


@dataclass
class TrainConfig:
    beta: float = 5000.0  # Diffusion-DPO beta (per-sample loss = mean over latent elements)
    learning_rate: float = 1e-8
    scale_lr: bool = False  # multiply lr by effective batch size (the paper's "before scaling")
    lr_schedule: str = "constant"  # constant | linear (decay to 0 after warmup)
    warmup_steps: int = 0
    max_steps: int = 100
    batch_size: int = 1  # pairs per process per micro-step
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    attention: str = "sdpa"  # sdpa | xformers
    checkpoint_every: int = 50  # steps between (atomic) checkpoints
    keep_checkpoints: int = 2  # most recent checkpoints kept (the best one is always kept)
    seed: int = 0
    num_workers: int = 0
    timestep_range: list[float] = field(default_factory=lambda: [0.0, 1.0])  # fraction of the schedule
    timestep_sampling: str = "uniform"  # uniform | logit_normal | mode (SD3 paper 3.1), over timestep_range
    logit_mean: float = 0.0  # logit_normal: mean of the normal whose sigmoid is the timestep fraction
    logit_std: float = 1.0  # logit_normal: its standard deviation
    mode_scale: float = 1.29  # mode: the SD3 paper's s
    loss_type: str = "sigmoid"  # sigmoid (Diffusion-DPO) | hinge | ipo (formulas in mpo/loss.py)
    sft_weight: float = 0.0  # weight of the winner's plain denoising loss added to the DPO loss
    # Per-pair timestep weight of the errors, from the family's schedule: none | min_snr (epsilon / v)
    # | sigma_sqrt | cosmap (flow matching).
    loss_weighting: str = "none"
    snr_gamma: float = 5.0  # gamma of min_snr
    reference: str = "live"  # live (frozen copy / adapters off) | precomputed (one pass before training)


@dataclass
class EvalConfig:
    every: int = 50  # steps between evaluations (0 = only before and after training)
    num_prompts: int | None = None  # held-out prompts used (None = all)
    samples_per_prompt: int = 1
    seed: int = 1234
    grid_size: int = 4  # validation samples logged as an image grid


@dataclass
class TrackingConfig:
    tracker: str = "wandb"  # wandb | tensorboard | none
    project: str = "mpo"
    run_name: str | None = None
    log_every: int = 1
    mode: str = "online"  # online | offline (wandb: log locally under the run dir, `wandb sync` later)


@dataclass
class ExportConfig:
    merge_lora: bool = True  # also write a merged full pipeline for LoRA runs
    which: str = "best"  # best | last (EXPORT_WHICH)


@dataclass
class RoundsConfig:
    """Iterative MPO (``mpo run`` only): each round generates from the policy the previous round
    trained, scores, selects dominant pairs and trains on them. Off (count 0) by default."""

    count: int = 0  # rounds (0: offline, one generate -> score -> select -> train over the run)
    steps: int | None = None  # optimizer steps per round (null: train.max_steps / count; count x steps = max_steps)
    prompts: str = "same"  # same: every round on the same train prompts | fresh: a new slice each round
    prompts_per_round: int | None = None  # train prompts per round (null: all; fresh: an equal share each)
    reference: str = "base"  # base: the frozen base model | previous: the policy the round started from
    max_pairs: int | None = None  # pairs kept per round, by select.cap_strategy (null: all selected)


@dataclass
class Recipe:
    name: str = "run"
    output_dir: str = "runs/${name}"
    launch_config: str | None = None  # the launch/ config this recipe is meant for
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    rounds: RoundsConfig = field(default_factory=RoundsConfig)
