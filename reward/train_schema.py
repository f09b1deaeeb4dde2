"""The recipe schema of the reward trainer (``reward train`` / ``reward distill``): typed dataclasses.

Loaded, overridden and validated by the same machinery as the diffusion recipes (:mod:`mpo.config`,
through :mod:`reward.train_config`), so a reward recipe has the same ``defaults:`` chains, the same
``key=value`` overrides and the same one-line-per-problem errors. A comment after each field gives its
unit or meaning; they are what ``reward recipe`` users read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mpo.schema import MIXED_PRECISION, MODEL_DTYPES, TrackingConfig  # noqa: F401  (shared vocabulary)

FINETUNE_MODES = ("lora", "full")
LOSSES = ("token_ce", "binary")
BALANCE_MODES = ("downsample", "weight", "none")
LR_SCHEDULES = ("constant", "linear", "cosine")
ANSWER_REDUCE = ("max", "logsumexp")
ATTENTION = ("sdpa", "eager", "flash_attention_2")


@dataclass
class VLMConfig:
    path: str = "???"  # base VLM: local save_pretrained folder or hub id (any family the vlm backend loads)
    tiny: bool = False  # build the tiny random-initialised Qwen2-VL at `path` if it does not exist
    dtype: str = "float32"  # dtype the VLM is loaded in (bfloat16 for LoRA on GPUs: the frozen base)
    finetune: str = "lora"  # lora | full
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: list[str] | None = None  # None: every linear layer of the language model
    train_vision: bool = False  # also train the vision tower (full) / put adapters on it (lora)
    attention: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs the flash-attn package)
    answer_reduce: str = "max"  # how p(yes) pools the yes/no spellings: the scorer's reward.answer_reduce


@dataclass
class DataConfig:
    checklist: str = "image-full"  # bundled checklist name or YAML path: the questions that may be asked
    annotations: list[str] | None = None  # JSONL / parquet annotation files (`reward train`)
    teacher_scores: str | None = None  # a teacher's scores file, q.<id> = p(yes) (`reward distill`)
    media_root: str | None = None  # where relative media paths start (default: an annotation file's
    # own folder; for teacher_scores, the current directory, as `reward score` wrote them)
    val_fraction: float = 0.1  # held-out samples (a sample: one image/video with its prompt)
    val_count: int | None = None  # overrides val_fraction when set
    split_seed: int = 0
    balance: str = "downsample"  # per question, yes vs no: downsample (the paper) | weight | none
    max_frames: int = 24  # video: one frame per second, at most this many


@dataclass
class RewardTrainConfig:
    loss: str = "token_ce"  # token_ce: CE of the answer token | binary: CE of the scorer's p(yes)
    answer_words: list[str] = field(default_factory=lambda: ["yes", "no"])  # the tokens taught
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"  # constant | linear | cosine (after warmup)
    warmup_steps: int = 0
    max_steps: int = 1000  # optimizer steps
    batch_size: int = 8  # samples per process per micro-step (each with all its questions)
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    mixed_precision: str = "no"  # no | fp16 | bf16 (trainable weights stay float32)
    checkpoint_every: int = 100  # steps between (atomic) checkpoints
    keep_checkpoints: int = 2
    seed: int = 0
    num_workers: int = 0  # dataloader workers decoding media


@dataclass
class AnswerEvalConfig:
    every: int = 0  # steps between held-out evaluations (0 = only before and after training)
    batch_size: int = 8  # held-out samples per scoring forward
    limit: int | None = None  # held-out samples evaluated (None = all)


@dataclass
class RewardExportConfig:
    merge_lora: bool = True  # LoRA runs: write merged full weights (else the adapter + the base's path)


@dataclass
class RewardTrainRecipe:
    name: str = "reward"
    output_dir: str = "runs/${name}"
    launch_config: str | None = None  # the launch/ config this recipe is meant for
    model: VLMConfig = field(default_factory=VLMConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: RewardTrainConfig = field(default_factory=RewardTrainConfig)
    eval: AnswerEvalConfig = field(default_factory=AnswerEvalConfig)
    tracking: TrackingConfig = field(default_factory=lambda: TrackingConfig(project="reward"))
    export: RewardExportConfig = field(default_factory=RewardExportConfig)
