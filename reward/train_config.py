"""Loading and validating reward-training recipes (schema: :mod:`reward.train_schema`).

The layering (``defaults:`` chains), ``key=value`` overrides and the error report are
:func:`mpo.config.load_config`'s; only the value rules and the cross-field checks below are the
reward trainer's. Paths inside a recipe are relative to the current working directory, as for the
``mpo`` recipes; paths inside an annotation file are relative to that file's folder (or to
``data.media_root``), so a dataset folder can move as a whole. Data files are read (and their
absence reported, naming the file) when a run starts, not at load: a recipe validates anywhere.

    recipe = load_train_recipe("recipes/reward/tiny_qa.yaml", ["train.max_steps=10"])
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from mpo import config as mpo_config
from mpo.config import (
    RecipeError,
    _at_least,
    _Checker,
    _fraction,
    _non_empty_list,
    _one_of,
    _positive,
    _Rule,
    _schema,
)
from reward.train_schema import (
    ANSWER_REDUCE,
    ATTENTION,
    BALANCE_MODES,
    FINETUNE_MODES,
    LOSSES,
    LR_SCHEDULES,
    MIXED_PRECISION,
    MODEL_DTYPES,
    RewardTrainRecipe,
)

__all__ = ["RecipeError", "load_train_recipe", "resolve_paths", "save_resolved", "to_yaml"]

SCHEMA = _schema(RewardTrainRecipe)
RULES: tuple[_Rule, ...] = (
    _Rule("name", lambda v: bool(v.strip()), "a non-empty string"),
    _one_of("model.dtype", MODEL_DTYPES),
    _one_of("model.finetune", FINETUNE_MODES),
    _at_least("model.lora_rank", 1),
    _positive("model.lora_alpha"),
    _fraction("model.lora_dropout"),
    _non_empty_list("model.lora_target_modules"),
    _one_of("model.attention", ATTENTION),
    _one_of("model.answer_reduce", ANSWER_REDUCE),
    _Rule("data.annotations", lambda v: v is None or len(v) > 0, "a non-empty list of files or null"),
    _fraction("data.val_fraction"),
    _at_least("data.val_count", 0, optional=True),
    _one_of("data.balance", BALANCE_MODES),
    _at_least("data.max_frames", 1),
    _one_of("train.loss", LOSSES),
    _Rule(
        "train.answer_words",
        lambda v: len(v) == 2 and v[0] != v[1] and all(w and w not in ("True", "False") for w in v),
        "two different words, quoted: ['yes', 'no'] (YAML reads a bare yes / no as a boolean)",
    ),
    _positive("train.learning_rate"),
    _one_of("train.lr_schedule", LR_SCHEDULES),
    _at_least("train.warmup_steps", 0),
    _at_least("train.max_steps", 1),
    _at_least("train.batch_size", 1, why="samples per process per micro-step"),
    _at_least("train.gradient_accumulation_steps", 1),
    _positive("train.max_grad_norm"),
    _at_least("train.weight_decay", 0),
    _fraction("train.adam_beta1"),
    _fraction("train.adam_beta2"),
    _positive("train.adam_epsilon"),
    _one_of("train.mixed_precision", MIXED_PRECISION),
    _at_least("train.checkpoint_every", 0),
    _at_least("train.keep_checkpoints", 1),
    _at_least("train.num_workers", 0),
    _at_least("eval.every", 0, why="0 = only before and after training"),
    _at_least("eval.batch_size", 1),
    _at_least("eval.limit", 1, optional=True),
    _one_of("tracking.tracker", mpo_config.TRACKERS),
    _one_of("tracking.mode", mpo_config.TRACKER_MODES),
    _at_least("tracking.log_every", 1),
)


class TrainRecipeChecker(_Checker):
    """Value rules of the reward recipe, and the checks that need several keys or the file system."""

    rules = RULES
    leaf_keys = tuple(key for key, section in SCHEMA.items() if not section)

    def check_cross_fields(self) -> None:
        c = self.cfg
        if self.wanted("data.checklist"):
            from reward.checklist import ChecklistError, load_checklist

            try:
                load_checklist(c.data.checklist)
            except ChecklistError as err:
                self.add("data.checklist", f"cannot be loaded: {err}")
        if c.data.annotations is None and c.data.teacher_scores is None and self.wanted("data.annotations"):
            self.add(
                "data.annotations",
                "set data.annotations (reward train) or data.teacher_scores (reward distill)",
            )
        if c.train.warmup_steps >= c.train.max_steps and self.wanted("train.warmup_steps"):
            self.add("train.warmup_steps", f"must be < train.max_steps={c.train.max_steps}")
        full_in_half = c.model.finetune == "full" and c.model.dtype != "float32"
        if c.train.mixed_precision != "no" and full_in_half and self.wanted("model.dtype"):
            self.add(
                "model.dtype",
                "full fine-tuning under mixed precision needs float32 master weights: model.dtype=float32",
            )


def load_train_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> DictConfig:
    """Load, extend, override and validate a reward-training recipe (a DictConfig typed by
    :class:`reward.train_schema.RewardTrainRecipe`); raises :class:`RecipeError` listing every problem."""
    return mpo_config.load_config(path, overrides, RewardTrainRecipe, TrainRecipeChecker)


def _absolute(value: str | None) -> str | None:
    return None if value is None else os.path.abspath(Path(value).expanduser())


def resolve_paths(recipe: DictConfig) -> DictConfig:
    """A copy whose local paths are absolute, so that it means the same from any directory."""
    out = copy.deepcopy(recipe)
    data = out.data
    if data.annotations is not None:
        data.annotations = [_absolute(p) for p in data.annotations]
    data.teacher_scores = _absolute(data.teacher_scores)
    data.media_root = _absolute(data.media_root)
    if Path(data.checklist).suffix:
        data.checklist = _absolute(data.checklist)
    out.model.path = mpo_config._local_path(out.model.path, builds_here=out.model.tiny)
    return out


def to_yaml(recipe: DictConfig) -> str:
    return OmegaConf.to_yaml(recipe, resolve=True)


def save_resolved(recipe: DictConfig, folder: str | os.PathLike) -> Path:
    """Write ``recipe.yaml`` (paths absolute, interpolations resolved) atomically into ``folder``."""
    from mpo.store import write_text

    path = Path(folder) / mpo_config.RECIPE_FILE
    header = (
        "# The fully resolved recipe of this reward-training run; `reward recipe <this file>` reloads it.\n"
    )
    write_text(path, header + to_yaml(resolve_paths(recipe)))
    return path
