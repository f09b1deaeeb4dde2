"""The recipe schema: typed dataclasses, one per recipe section, and the allowed values of their keys.

Nothing else lives here, so that every part of the project (the backbones, the stages, the reward)
can import the schema without importing the loader: :mod:`mpo.config` reads, merges, overrides and
validates recipes against these classes. Every field carries its help text (unit, meaning, allowed
values) as dataclass field metadata (``opt(default, help)``): ``mpo recipe --help-keys`` prints it,
and OmegaConf, which reads only names, types and defaults, is unaffected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, dataclass, field
from typing import Any

MODEL_DTYPES = ("float32", "float16", "bfloat16")
SELECT_RULES = ("mpo", "dpo")
SELECT_LEVELS = ("dimension", "sub_dimension", "question")
CAP_STRATEGIES = ("largest_margin", "random")
FINETUNE_MODES = ("lora", "full")
# diffusers.optimization.SchedulerType, every one of them (piecewise_constant reads train.lr_step_rules)
LR_SCHEDULES = (
    "constant",
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant_with_warmup",
    "piecewise_constant",
)
OPTIMIZERS = ("adamw", "adamw_8bit")
RESUME_LATEST = "latest"
RESUME_NONE = "none"
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


LORA_FORMATS = ("diffusers", "comfyui")
HELP = "help"
CHOICES = "choices"


def opt(default: Any = MISSING, help: str = "", choices: tuple[str, ...] | None = None) -> Any:
    """A recipe key: its default and its help text (and allowed values, for ``--help-keys``)."""
    metadata = {HELP: help, **({CHOICES: choices} if choices else {})}
    return field(default=default, metadata=metadata)


def opt_list(factory: Callable[[], Any], help: str = "", choices: tuple[str, ...] | None = None) -> Any:
    """A recipe key whose default is mutable (a list): built fresh for every recipe."""
    metadata = {HELP: help, **({CHOICES: choices} if choices else {})}
    return field(default_factory=factory, metadata=metadata)


@dataclass
class ModelConfig:
    """The diffusion model being aligned and how it is fine-tuned."""

    family: str = opt("sdxl", "a registered backbone family (mpo.backbones)")
    path: str = opt("???", "local folder or hub id, loaded with from_pretrained")
    revision: str | None = opt(None, "hub revision (branch, tag or commit) of model.path")
    variant: str | None = opt(None, 'weight-file variant on the hub, e.g. "fp16"')
    dtype: str = opt(
        "float32",
        "dtype of the frozen weights (VAE, text encoders, LoRA's base denoiser) and of sampling; what trains is "
        "float32 whatever this says (LoRA under mixed precision: the compute dtype)",
        MODEL_DTYPES,
    )
    finetune: str = opt(
        "lora", "what trains: LoRA adapters on the denoiser, or all of its weights", FINETUNE_MODES
    )
    lora_rank: int = opt(8, "LoRA rank r")
    lora_alpha: int = opt(8, "LoRA alpha (the adapter's scale is alpha / r)")
    lora_dropout: float = opt(0.0, "dropout on the LoRA branch, in [0, 1)")
    lora_target_modules: list[str] | None = opt(
        None, "module names given LoRA (null: the backbone's attention projections)"
    )
    expert: str | None = opt(None, "two-expert models (Wan 2.2 A14B): which trains, high_noise | low_noise")
    tiny: bool = opt(False, "build the tiny random-initialised variant at `path` if it does not exist")
    vae_path: str | None = opt(
        None, "a VAE folder or hub id that replaces the pipeline's (e.g. an fp16-safe SDXL VAE)"
    )


@dataclass
class PromptsConfig:
    """Where the prompts come from and how they are split into train and held-out prompts."""

    file: str = opt(
        "???",
        "prompts: .txt (one a line), .jsonl / .csv / .parquet, a datasets save_to_disk folder, or a hub dataset id",
    )
    column: str = opt(
        "prompt", "the column (or JSON field) holding the prompt text, for every format but .txt"
    )
    dataset_split: str = opt("train", "the split read from a hub dataset id or a saved DatasetDict")
    val_fraction: float = opt(0.1, "fraction of the prompts held out for the eval curves")
    val_count: int | None = opt(None, "number of held-out prompts (overrides val_fraction when set)")
    limit: int | None = opt(None, "use only the first `limit` prompts")
    split_seed: int = opt(0, "seed of the train / held-out split")


@dataclass
class GenerateConfig:
    """Candidate generation: N samples per prompt, cached as latents."""

    num_candidates: int = opt(4, "N candidates per prompt (>= 2: a pair needs two)")
    num_inference_steps: int = opt(30, "sampler steps per candidate")
    guidance_scale: float = opt(5.0, "classifier-free guidance scale")
    height: int = opt(1024, "pixels")
    width: int = opt(1024, "pixels")
    num_frames: int = opt(49, "video backbones only; must match the VAE's temporal compression")
    fps: int = opt(8, "video backbones only: frames per second of previews and of the reward's frame pick")
    seed: int = opt(0, "with (prompt_id, sample_idx) fixes each candidate's noise")
    prompts_per_shard: int = opt(16, "prompts per safetensors shard (the unit of resume)")
    previews: int = opt(16, "decoded PNG/MP4 previews written (0 = none)")
    # Sampling cost (mpo.sampling; `mpo calibrate` measures what a cheaper setting keeps of the pairs)
    scheduler: str = opt(
        "default",
        "sampler: default (the family's own) | euler | dpmpp_2m | unipc | ddim | a diffusers class name",
    )
    scheduler_options: dict[str, Any] = opt_list(dict, "from_config overrides of that scheduler class")
    cache: str = opt(
        "none", "diffusers cache hook where the family supports it: none | first_block | faster | pab"
    )
    cache_options: dict[str, Any] = opt_list(dict, "fields of the cache config, e.g. threshold")
    compile: str = opt("none", "torch.compile of the denoiser: none | regional (repeated blocks) | full")
    attention: str = opt(
        "default",
        "attention kernel while sampling: default | sdpa_flash | sdpa_efficient | sdpa_cudnn | sdpa_math,"
        " or a diffusers attention backend (flash, _flash_3, sage, ...) where the family dispatches",
    )
    channels_last: bool = opt(False, "convolutional denoisers (SDXL): sample with NHWC activations")
    batch_size: int | str | None = opt(
        None,
        "candidates per denoising batch, whole prompts (null: num_candidates; auto: the largest that fits)",
    )


@dataclass
class RewardConfig:
    """The frozen VisionReward scorer."""

    checklist: str = opt("image-full", "a bundled checklist name or a YAML path")
    weights: str | None = opt(None, "weights file from `reward fit` (replaces the checklist's weights)")
    backend: str = opt(
        "pixel-stats",
        "who answers the questions: vlm | cogvlm2 | pixel-stats (vlm picks cogvlm2 for a CogVLM2 checkpoint)",
    )
    model_path: str | None = opt(None, "VLM path or hub id (backend=vlm / cogvlm2)")
    alignment_model_path: str | None = opt(None, "alignment term: CLIP-FlanT5 (VQAScore) or a VLM (optional)")
    batch_size: int = opt(8, "samples scored per forward")
    dtype: str = opt("bfloat16", "dtype of the reward model", MODEL_DTYPES)
    max_frames: int = opt(24, "video: one frame per second, at most this many")
    question_chunk: int | None = opt(None, "vlm: questions per suffix batch (bounds the KV-cache copies)")


@dataclass
class SelectConfig:
    """Which candidate pairs train (MPO dominance or the DPO margin baseline)."""

    rule: str = opt("mpo", "mpo: dominance + margin; dpo: margin only", SELECT_RULES)
    level: str = opt("dimension", "the level at which dominance is tested", SELECT_LEVELS)
    threshold: float = opt(0.0, "minimum total(win) - total(lose)")
    max_pairs_per_prompt: int | None = opt(None, "cap per prompt (null = keep all)")
    cap_strategy: str = opt("largest_margin", "which pairs survive the cap", CAP_STRATEGIES)
    dimensions: list[str] | None = opt(None, "restrict dominance to these (null = all known)")
    seed: int = opt(0, "seed of cap_strategy=random")


@dataclass
class TrainConfig:
    """Diffusion-DPO training."""

    beta: float = opt(5000.0, "Diffusion-DPO beta (per-sample loss = mean over latent elements)")
    learning_rate: float = opt(1e-8, "peak learning rate (per pair unless scale_lr)")
    scale_lr: bool = opt(False, 'multiply lr by effective batch size (the paper\'s "before scaling")')
    lr_schedule: str = opt("constant", "diffusers' lr schedule after warmup", LR_SCHEDULES)
    warmup_steps: int = opt(0, "optimizer steps of linear warmup")
    max_steps: int = opt(100, "optimizer steps in all")
    batch_size: int = opt(1, "pairs per process per micro-step")
    gradient_accumulation_steps: int = opt(1, "micro-steps per optimizer step")
    max_grad_norm: float = opt(1.0, "gradient clipping norm")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    adam_epsilon: float = opt(1e-8, "AdamW epsilon")
    mixed_precision: str = opt("no", "accelerate's mixed precision", MIXED_PRECISION)
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (less memory, more time)")
    attention: str = opt("sdpa", "attention kernel", ATTENTION)
    checkpoint_every: int = opt(50, "steps between (atomic) checkpoints")
    keep_checkpoints: int = opt(2, "most recent checkpoints kept (the best one is always kept)")
    seed: int = opt(0, "seed of LoRA init, pair order, noise and timesteps")
    num_workers: int = opt(0, "dataloader worker processes reading cached latents")
    timestep_range: list[float] = opt_list(
        lambda: [0.0, 1.0], "[low, high]: the fraction of the schedule timesteps are drawn from"
    )
    timestep_sampling: str = opt(
        "uniform", "uniform | logit_normal | mode (SD3 paper 3.1), over timestep_range", TIMESTEP_SAMPLING
    )
    logit_mean: float = opt(0.0, "logit_normal: mean of the normal whose sigmoid is the timestep fraction")
    logit_std: float = opt(1.0, "logit_normal: its standard deviation")
    mode_scale: float = opt(1.29, "mode: the SD3 paper's s")
    lr_num_cycles: int = opt(1, "cosine_with_restarts: number of hard restarts")
    lr_power: float = opt(1.0, "polynomial: power of the decay")
    lr_step_rules: str | None = opt(
        None, 'piecewise_constant: "multiplier:step,...,last multiplier", e.g. "1:100,0.1:200,0.01"'
    )
    allow_tf32: bool = opt(
        False, "TF32 matmuls and convolutions on Ampere+ GPUs (faster fp32, ~10-bit mantissa)"
    )
    optimizer: str = opt(
        "adamw", "adamw (torch) or adamw_8bit (bitsandbytes: pip install 'mpo-trainer[bnb]')", OPTIMIZERS
    )
    ema: bool = opt(
        False, "keep an exponential moving average of the trainable weights (diffusers' EMAModel)"
    )
    ema_decay: float = opt(0.9999, "EMA decay per optimizer step")
    resume_from: str = opt(
        "latest",
        "latest (the newest checkpoint of this run), none (start from the base model), or a checkpoint folder",
    )
    loss_type: str = opt(
        "sigmoid", "sigmoid (Diffusion-DPO), hinge or ipo (formulas in mpo/loss.py)", LOSS_TYPES
    )
    sft_weight: float = opt(0.0, "weight of the winner's plain denoising loss added to the DPO loss")
    loss_weighting: str = opt(
        "none",
        "per-pair timestep weight of the errors, from the family's schedule: none | min_snr (epsilon / v) | "
        "sigma_sqrt | cosmap (flow matching)",
        LOSS_WEIGHTINGS,
    )
    snr_gamma: float = opt(5.0, "gamma of min_snr")
    reference: str = opt(
        "live", "live (frozen copy / adapters off) or precomputed (one pass before training)", REFERENCES
    )


@dataclass
class EvalConfig:
    """Held-out reward curves and the best-checkpoint pick."""

    every: int = opt(50, "steps between evaluations (0 = only before and after training)")
    num_prompts: int | None = opt(None, "held-out prompts used (null = all)")
    samples_per_prompt: int = opt(1, "samples per held-out prompt at each eval")
    seed: int = opt(1234, "fixes the eval noise (the same at every eval)")
    grid_size: int = opt(4, "validation samples logged to the tracker and saved as pictures")


@dataclass
class TrackingConfig:
    """The experiment tracker (through accelerate)."""

    tracker: str = opt("wandb", "where curves and samples go", TRACKERS)
    project: str = opt("mpo", "tracker project")
    run_name: str | None = opt(None, "tracker run name (null: the recipe's name)")
    log_every: int = opt(1, "optimizer steps between training-curve points")
    mode: str = opt(
        "online", "wandb: online, or offline (log under the run dir, `wandb sync` later)", TRACKER_MODES
    )


@dataclass
class PushToHubConfig:
    """Upload of the export folder to the Hugging Face Hub (token: HF_TOKEN or `hf auth login`)."""

    repo_id: str | None = opt(None, "owner/name of the model repo to upload export/ to (null: no upload)")
    private: bool = opt(True, "create the repo private")
    revision: str | None = opt(None, "branch to upload to (created from main if missing; null: main)")
    commit_message: str | None = opt(None, "commit message (null: names the run and checkpoint)")


@dataclass
class ExportConfig:
    """The aligned checkpoint as files diffusers (and ComfyUI) load."""

    merge_lora: bool = opt(True, "LoRA runs: also write the pipeline with the adapter merged in")
    which: str = opt("best", "which checkpoint is exported", EXPORT_WHICH)
    lora_formats: list[str] = opt_list(
        lambda: ["diffusers"], "LoRA files written: diffusers, and/or comfyui (SDXL, FLUX, Wan)", LORA_FORMATS
    )
    license: str | None = opt(None, "model card license when the base model's is unknown (e.g. openrail++)")
    ema: bool = opt(True, "with train.ema: export the EMA weights (false: the raw trained weights)")
    push_to_hub: PushToHubConfig = field(default_factory=PushToHubConfig)


@dataclass
class RoundsConfig:
    """Iterative MPO (mpo run only): rounds that each sample from the policy the round before trained."""

    count: int = opt(
        0,
        "rounds of generate -> score -> select -> train, each sampling its candidates from the policy the "
        "round before trained (0: offline, one of each over the run)",
    )
    steps: int | None = opt(
        None,
        "optimizer steps per round (null: train.max_steps / count); count x steps must equal train.max_steps",
    )
    prompts: str = opt(
        "same",
        "the train prompts a round generates for: the same ones every round, or a fresh slice of one seeded "
        "permutation each round (cyclically)",
        ROUND_PROMPTS,
    )
    prompts_per_round: int | None = opt(
        None, "train prompts per round (null: all of them with prompts=same, an equal share with fresh)"
    )
    reference: str = opt(
        "base",
        "each round's Diffusion-DPO reference: the frozen base model, or the policy the round started from "
        "(live or precomputed, as train.reference says)",
        ROUND_REFERENCES,
    )
    max_pairs: int | None = opt(
        None, "pairs kept per round in all, chosen by select.cap_strategy (null: every pair the rule keeps)"
    )


@dataclass
class Recipe:
    """One experiment: every stage's settings and the run directory they share."""

    name: str = opt("run", "the run's name (run directory, tracker run, model card title)")
    output_dir: str = opt("runs/${name}", "the run directory every stage reads and writes")
    launch_config: str | None = opt(None, "the launch/ config this recipe is meant for")
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
