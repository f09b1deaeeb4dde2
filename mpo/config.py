"""Recipe loading, overrides and validation against the schema of :mod:`mpo.schema`.

A recipe is a YAML file whose keys mirror the schema's dataclasses. ``defaults: [base.yaml]`` (or a single
string) at the top of a recipe extends base recipes (paths relative to the recipe; chains allowed,
cycles refused). ``key=value`` dotlist overrides on the command line come last. Unknown keys, wrong
types and impossible values fail at load, all of them in one :class:`RecipeError` whose lines name the
key, the value, the file (or override) it came from and what is allowed; nothing runs on a recipe that
would fail hours later.

Paths inside a recipe (prompts.file, model.path, reward.weights, reward.checklist files) are relative
to the *current working directory*, not to the recipe file: run ``mpo`` from the repository root.
:func:`save_resolved` records them absolute in the run directory's ``recipe.yaml``.

    recipe = load_recipe("recipes/tiny/sdxl.yaml", ["train.max_steps=10"])
    recipe.train.max_steps  # 10
"""

from __future__ import annotations

import copy
import difflib
import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, get_type_hints

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from mpo.schema import (  # noqa: F401  (re-exported: the schema is part of this module's API)
    ATTENTION,
    CAP_STRATEGIES,
    EXPORT_WHICH,
    FINETUNE_MODES,
    LORA_FORMATS,
    LOSS_TYPES,
    LOSS_WEIGHTINGS,
    LR_SCHEDULES,
    MIXED_PRECISION,
    MODEL_DTYPES,
    OPTIMIZERS,
    REFERENCES,
    ROUND_PROMPTS,
    ROUND_REFERENCES,
    SELECT_LEVELS,
    SELECT_RULES,
    TIMESTEP_SAMPLING,
    TRACKER_MODES,
    TRACKERS,
    EvalConfig,
    ExportConfig,
    GenerateConfig,
    ModelConfig,
    PromptsConfig,
    Recipe,
    RewardConfig,
    RoundsConfig,
    SelectConfig,
    TrackingConfig,
    TrainConfig,
)


class RecipeError(ValueError):
    """A recipe that cannot run: the message names the file, key, value and what is allowed."""


# ---- schema keys ----------------------------------------------------------------------------------
DEFAULTS_KEY = "defaults"
RECIPE_FILE = "recipe.yaml"
DEFAULT_SOURCE = "default"


def _schema(cls: type, prefix: str = "") -> dict[str, bool]:
    """Every dotted key of a dataclass schema -> whether it is a section (a nested dataclass)."""
    keys: dict[str, bool] = {}
    hints = get_type_hints(cls)
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        if is_dataclass(hints[f.name]):
            keys[key] = True
            keys.update(_schema(hints[f.name], key + "."))
        else:
            keys[key] = False
    return keys


SCHEMA = _schema(Recipe)
LEAF_KEYS = tuple(key for key, section in SCHEMA.items() if not section)


# ---- problems -------------------------------------------------------------------------------------
_NO_VALUE = object()


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a recipe; ``source`` says where the offending value came from."""

    key: str
    message: str
    source: str = DEFAULT_SOURCE
    value: Any = _NO_VALUE

    def line(self) -> str:
        shown = "" if self.value is _NO_VALUE else f"={self.value!r}"
        return f"{self.key}{shown} ({self.source}): {self.message}"


def _report(what: str, problems: list[Problem]) -> RecipeError:
    count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
    return RecipeError(f"{what}: {count}\n" + "\n".join("  " + p.line() for p in problems))


# ---- reading files --------------------------------------------------------------------------------
def _read_yaml(path: Path, included_from: Path | None) -> dict[str, Any]:
    where = f"{path} (in defaults of {included_from})" if included_from else str(path)
    if not path.is_file():
        raise RecipeError(f"{where}: no such recipe file")
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except UnicodeDecodeError as err:
        raise RecipeError(f"{where}: not UTF-8 text (byte {err.start}: {err.reason})") from err
    except (OSError, yaml.YAMLError, OmegaConfBaseException) as err:
        raise RecipeError(f"{where}: not valid YAML: {err}") from err
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: a recipe is a mapping of keys, got {type(data).__name__}")
    return data


def _read_chain(path: Path, stack: tuple[Path, ...] = ()) -> list[tuple[Path, dict[str, Any]]]:
    """The recipe and its ``defaults`` (recursively), base first: later entries win."""
    real = path.resolve()
    if real in stack:
        cycle = " -> ".join(str(p) for p in (*stack[stack.index(real) :], real))
        raise RecipeError(f"{path}: defaults form a cycle: {cycle}")
    data = _read_yaml(path, stack[-1] if stack else None)
    bases = data.pop(DEFAULTS_KEY, [])
    if isinstance(bases, str):
        bases = [bases]
    if not isinstance(bases, list) or not all(isinstance(b, str) for b in bases):
        raise RecipeError(
            f"{path}: {DEFAULTS_KEY}={bases!r}: must be a file name or a list of file names "
            f"(relative to {path.parent})"
        )
    chain: list[tuple[Path, dict[str, Any]]] = []
    for base in bases:
        chain += _read_chain(path.parent / base, (*stack, real))
    chain.append((path, data))
    return chain


# ---- merging ----------------------------------------------------------------------------------------
def _leaves(
    data: dict[Any, Any], prefix: str = "", schema: dict[str, bool] | None = None
) -> Iterator[tuple[str, Any]]:
    """Dotted (key, value) pairs of a nested mapping. It descends into schema sections and unknown
    mappings (reported key by key) but not into leaves, so that a list, or a mapping given to a leaf,
    arrives whole at the key that must accept or refuse it."""
    schema = SCHEMA if schema is None else schema
    for name, value in data.items():
        key = f"{prefix}{name}"
        section = schema.get(key, False)
        if section and (value is None or value == {}):
            continue  # an empty section (every key commented out) changes nothing
        if isinstance(value, dict) and value and (section or key not in schema):
            yield from _leaves(value, key + ".", schema)
        else:
            yield key, value


def _unknown_key(key: str, value: Any, source: str, schema: dict[str, bool] | None = None) -> Problem:
    schema = SCHEMA if schema is None else schema
    close = difflib.get_close_matches(key, list(schema), n=1, cutoff=0.6)
    if close:
        hint = f"did you mean {close[0]}?"
    else:
        section = key.rpartition(".")[0]
        siblings = [k for k in schema if k.rpartition(".")[0] == section] if schema.get(section) else []
        siblings = siblings or [k for k in schema if "." not in k]
        hint = "known keys here: " + ", ".join(siblings)
    return Problem(key, f"unknown key; {hint}", source, value)


class _Builder:
    """Applies layers (files, then overrides) key by key, so that every bad key is reported, and
    remembers which layer set each key (the error names the file a bad value came from)."""

    def __init__(self, schema_class: type = Recipe) -> None:
        self.cfg: DictConfig = OmegaConf.structured(schema_class)
        self.schema = SCHEMA if schema_class is Recipe else _schema(schema_class)
        self.sources: dict[str, str] = {}
        self.unknown: list[Problem] = []
        self.mistyped: dict[str, Problem] = {}  # a later layer that sets the key cleanly clears it

    def apply(self, data: dict[str, Any], source: str) -> None:
        for key, value in _leaves(data, schema=self.schema):
            if key not in self.schema:
                self.unknown.append(_unknown_key(key, value, source, self.schema))
                continue
            if value is False and key in _YAML_NO:
                value = "no"  # YAML 1.1 reads an unquoted `no` (or `off`) as false
            try:
                OmegaConf.update(self.cfg, key, value, merge=False)
            except OmegaConfBaseException as err:
                reason = str(err).splitlines()[0]
                self.mistyped[key] = Problem(key, f"wrong type: {reason}", source, value)
            else:
                self.sources[key] = source
                self.mistyped.pop(key, None)

    def apply_overrides(self, overrides: Iterable[str]) -> None:
        for item in overrides:
            source = f"override {item!r}"
            key, eq, _ = item.partition("=")
            if not eq or not key.strip():
                self.unknown.append(
                    Problem(item, "an override is key=value, e.g. train.max_steps=10", source)
                )
                continue
            try:
                data = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
            except OmegaConfBaseException as err:
                self.unknown.append(Problem(key, f"cannot parse: {str(err).splitlines()[0]}", source))
                continue
            self.apply(data, source)

    def problems(self) -> list[Problem]:
        return self.unknown + list(self.mistyped.values())


# Keys whose allowed values include the word "no", which YAML turns into false when unquoted.
_YAML_NO = frozenset({"train.mixed_precision"})


# ---- value checks -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rule:
    key: str
    ok: Callable[[Any], bool]
    allowed: str


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _one_of(key: str, choices: tuple[str, ...]) -> _Rule:
    return _Rule(key, lambda v: v in choices, f"one of {list(choices)}")


def _at_least(key: str, low: float, optional: bool = False, why: str = "") -> _Rule:
    allowed = f">= {low}" + (" or null" if optional else "") + (f" ({why})" if why else "")
    return _Rule(key, lambda v: (optional and v is None) or (_number(v) and v >= low), allowed)


def _positive(key: str, why: str = "") -> _Rule:
    return _Rule(key, lambda v: _number(v) and v > 0, "> 0" + (f" ({why})" if why else ""))


def _fraction(key: str) -> _Rule:
    return _Rule(key, lambda v: _number(v) and 0 <= v < 1, "in [0, 1)")


def _non_empty_list(key: str) -> _Rule:
    return _Rule(key, lambda v: v is None or len(v) > 0, "a non-empty list or null")


def _repo_id(v: str) -> bool:
    import re

    return re.fullmatch(r"([\w.-]+/)?[\w.-]+", v) is not None and ".." not in v


def _unit_interval(v: Any) -> bool:
    return len(v) == 2 and all(_number(x) for x in v) and 0 <= v[0] < v[1] <= 1


RULES: tuple[_Rule, ...] = (
    _Rule("name", lambda v: bool(v.strip()), "a non-empty string"),
    _one_of("model.dtype", MODEL_DTYPES),
    _one_of("model.finetune", FINETUNE_MODES),
    _at_least("model.lora_rank", 1),
    _positive("model.lora_alpha"),
    _fraction("model.lora_dropout"),
    _non_empty_list("model.lora_target_modules"),
    _fraction("prompts.val_fraction"),
    _at_least("prompts.val_count", 0, optional=True),
    _at_least("prompts.limit", 1, optional=True),
    _at_least("generate.num_candidates", 2, why="a pair needs two candidates of one prompt"),
    _at_least("generate.num_inference_steps", 1),
    _at_least("generate.guidance_scale", 0),
    _at_least("generate.height", 1, why="pixels"),
    _at_least("generate.width", 1, why="pixels"),
    _at_least("generate.num_frames", 1),
    _at_least("generate.fps", 1),
    _at_least("generate.prompts_per_shard", 1),
    _at_least("generate.previews", 0),
    _one_of("reward.dtype", MODEL_DTYPES),
    _at_least("reward.batch_size", 1),
    _at_least("reward.max_frames", 1),
    _one_of("select.rule", SELECT_RULES),
    _one_of("select.level", SELECT_LEVELS),
    _at_least("select.threshold", 0, why="a total-score margin"),
    _at_least("select.max_pairs_per_prompt", 1, optional=True),
    _one_of("select.cap_strategy", CAP_STRATEGIES),
    _non_empty_list("select.dimensions"),
    _positive("train.beta"),
    _positive("train.learning_rate"),
    _one_of("train.lr_schedule", LR_SCHEDULES),
    _at_least("train.warmup_steps", 0),
    _at_least("train.max_steps", 1),
    _at_least("train.batch_size", 1, why="pairs per process per micro-step"),
    _at_least("train.gradient_accumulation_steps", 1),
    _positive("train.max_grad_norm"),
    _at_least("train.weight_decay", 0),
    _fraction("train.adam_beta1"),
    _fraction("train.adam_beta2"),
    _positive("train.adam_epsilon"),
    _one_of("train.mixed_precision", MIXED_PRECISION),
    _one_of("train.attention", ATTENTION),
    _at_least("train.checkpoint_every", 0),
    _at_least("train.keep_checkpoints", 1),
    _at_least("train.num_workers", 0),
    _Rule("train.timestep_range", _unit_interval, "[low, high] with 0 <= low < high <= 1"),
    _one_of("train.timestep_sampling", TIMESTEP_SAMPLING),
    _positive("train.logit_std"),
    _one_of("train.loss_type", LOSS_TYPES),
    _at_least("train.sft_weight", 0),
    _one_of("train.loss_weighting", LOSS_WEIGHTINGS),
    _positive("train.snr_gamma"),
    _one_of("train.reference", REFERENCES),
    _at_least("eval.every", 0, why="0 = only before and after training"),
    _at_least("eval.num_prompts", 1, optional=True),
    _at_least("eval.samples_per_prompt", 1),
    _at_least("eval.grid_size", 0),
    _one_of("tracking.tracker", TRACKERS),
    _one_of("tracking.mode", TRACKER_MODES),
    _at_least("tracking.log_every", 1),
    _one_of("export.which", EXPORT_WHICH),
    _at_least("rounds.count", 0, why="0 = offline: one generate, score, select and train"),
    _at_least("rounds.steps", 1, optional=True),
    _one_of("rounds.prompts", ROUND_PROMPTS),
    _at_least("rounds.prompts_per_round", 1, optional=True),
    _one_of("rounds.reference", ROUND_REFERENCES),
    _at_least("rounds.max_pairs", 1, optional=True),
    _Rule("prompts.column", lambda v: bool(v.strip()), "a non-empty column name"),
    _Rule("prompts.dataset_split", lambda v: bool(v.strip()), "a non-empty split name"),
    _Rule(
        "export.lora_formats",
        lambda v: len(v) > 0 and len(set(v)) == len(v) and all(f in LORA_FORMATS for f in v),
        f"a non-empty list of distinct formats from {list(LORA_FORMATS)}",
    ),
    _Rule(
        "export.push_to_hub.repo_id", lambda v: v is None or _repo_id(v), "a hub repo id, owner/name, or null"
    ),
    _at_least("train.lr_num_cycles", 1),
    _positive("train.lr_power"),
    _one_of("train.optimizer", OPTIMIZERS),
    _Rule("train.ema_decay", lambda v: _number(v) and 0 < v < 1, "in (0, 1)"),
    _Rule("train.resume_from", lambda v: bool(v.strip()), "latest, none or a checkpoint folder"),
)


def _article(word: str) -> str:
    return f"{'an' if word[:1] in 'aeiou' else 'a'} {word}"


class _Checker:
    """Value and cross-field checks on a fully merged config whose types are already right."""

    rules: tuple[_Rule, ...] = RULES
    leaf_keys: tuple[str, ...] = LEAF_KEYS

    def __init__(self, cfg: DictConfig, sources: dict[str, str], skip: set[str], prefix: str = "") -> None:
        self.cfg, self.sources, self.skip, self.prefix = cfg, sources, set(skip), prefix
        self.problems: list[Problem] = []

    def value(self, key: str) -> Any:
        return OmegaConf.select(self.cfg, key)

    def add(self, key: str, message: str, with_value: bool = True) -> None:
        value = self.value(key) if with_value else _NO_VALUE
        self.problems.append(Problem(key, message, self.sources.get(key, DEFAULT_SOURCE), value))
        self.skip.add(key)

    def wanted(self, key: str) -> bool:
        return key.startswith(self.prefix) and key not in self.skip

    def run(self, cross: bool) -> list[Problem]:
        self.check_missing_and_interpolations()
        for rule in self.rules:
            if self.wanted(rule.key) and not rule.ok(self.value(rule.key)):
                self.add(rule.key, f"must be {rule.allowed}")
        if cross:
            self.check_cross_fields()
        return self.problems

    def check_missing_and_interpolations(self) -> None:
        for key in self.leaf_keys:
            if not self.wanted(key):
                continue
            parent, _, name = key.rpartition(".")
            if OmegaConf.is_missing(OmegaConf.select(self.cfg, parent) if parent else self.cfg, name):
                self.add(key, "required: set it in the recipe or as key=value", with_value=False)
                continue
            try:
                OmegaConf.select(self.cfg, key, throw_on_resolution_failure=True)
            except OmegaConfBaseException as err:
                raw = OmegaConf.to_container(self.cfg, resolve=False)
                for part in key.split("."):
                    raw = raw[part]
                self.problems.append(
                    Problem(
                        key,
                        f"cannot resolve: {str(err).splitlines()[0]}",
                        self.sources.get(key, DEFAULT_SOURCE),
                        raw,
                    )
                )
                self.skip.add(key)

    def check_cross_fields(self) -> None:
        c = self.cfg
        if self.wanted("reward.backend"):
            from reward.backends import BACKENDS, MODEL_BACKENDS

            if c.reward.backend not in BACKENDS:
                self.add("reward.backend", f"must be one of {list(BACKENDS)}")
            elif (
                c.reward.backend in MODEL_BACKENDS
                and not c.reward.model_path
                and self.wanted("reward.model_path")
            ):
                self.add(
                    "reward.model_path",
                    f"required when reward.backend={c.reward.backend!r} (a local folder or hub id)",
                )
        if self.wanted("train.attention") and c.train.attention == "xformers":
            import importlib.util

            if importlib.util.find_spec("xformers") is None:
                self.add("train.attention", "needs the xformers package: pip install 'mpo-trainer[xformers]'")
        self.check_rounds()
        backbone = self.check_family()
        self.check_lora_formats(backbone)
        self.check_training_knobs()
        self.check_precision()
        modality = self.check_checklist()
        if backbone is not None and modality is not None and modality != backbone.modality:
            self.add(
                "reward.checklist",
                f"is {_article(modality)} checklist but model.family={c.model.family!r} makes "
                f"{backbone.modality}s; use {_article(backbone.modality)} checklist",
            )

    def check_rounds(self) -> None:
        """Rounds split ``train.max_steps`` (the length the learning-rate schedule spans) evenly, and
        continue their own checkpoints only (round 0 samples the base)."""
        r, steps = self.cfg.rounds, self.cfg.train.max_steps
        if r.count < 1 or not all(
            self.wanted(k) for k in ("rounds.count", "rounds.steps", "train.max_steps")
        ):
            return
        if self.wanted("train.resume_from") and self.cfg.train.resume_from != "latest":
            self.add(
                "train.resume_from",
                f"must be latest with rounds.count={r.count}: the rounds continue their own checkpoints "
                "(round 0 samples the base model; start a run from another's weights without rounds)",
            )
        if r.steps is None and steps % r.count:
            self.add(
                "rounds.count",
                f"must divide train.max_steps={steps} (rounds of equal length), or set rounds.steps and "
                "train.max_steps = rounds.count x rounds.steps",
            )
        elif r.steps is not None and r.steps * r.count != steps:
            self.add(
                "rounds.steps",
                f"x rounds.count = {r.steps} x {r.count} = {r.steps * r.count} steps must equal train.max_steps="
                f"{steps} (the total, which the learning-rate schedule spans): set train.max_steps={r.steps * r.count}",
            )

    def check_training_knobs(self) -> None:
        """Options that need an optional package or a file: refused at load, not after generation."""
        t = self.cfg.train
        if self.wanted("train.optimizer") and t.optimizer == "adamw_8bit":
            import importlib.util

            if importlib.util.find_spec("bitsandbytes") is None:
                self.add(
                    "train.optimizer", "needs bitsandbytes: pip install 'mpo-trainer[bnb]' (or use adamw)"
                )
        if self.wanted("train.lr_schedule") and t.lr_schedule == "piecewise_constant" and not t.lr_step_rules:
            self.add("train.lr_schedule", 'piecewise_constant needs train.lr_step_rules, e.g. "1:100,0.1"')
        resume = t.resume_from
        named = resume not in ("latest", "none")
        if self.wanted("train.resume_from") and named and not (Path(resume) / "progress.json").is_file():
            self.add(
                "train.resume_from", "not latest, none, or a checkpoint folder (one holding progress.json)"
            )

    def check_lora_formats(self, backbone: Any) -> None:
        """A ComfyUI LoRA file needs a LoRA run and a family with a ComfyUI key convention."""
        key = "export.lora_formats"
        if not self.wanted(key) or "comfyui" not in self.cfg.export.lora_formats:
            return
        if self.cfg.model.finetune != "lora":
            self.add(key, f"comfyui is a LoRA file layout, but model.finetune={self.cfg.model.finetune!r}")
        elif backbone is not None and backbone.comfyui_lora is None:
            why = backbone.no_comfyui_lora_reason
            self.add(
                key,
                f"model.family={self.cfg.model.family!r} has no ComfyUI LoRA convention"
                f"{f' ({why})' if why else ''}; use [diffusers]",
            )

    def check_precision(self) -> None:
        """LoRA under mixed precision keeps its frozen base in the compute dtype: in float32 it takes
        twice the memory and autocast re-casts every weight on every forward; in the other half
        type every forward re-rounds it. (Full fine-tuning trains float32 master weights whatever
        model.dtype is, which then only sets the VAE's, the text encoders' and sampling's dtype.)"""
        c = self.cfg
        keys = ("model.dtype", "model.finetune", "train.mixed_precision")
        if not all(self.wanted(k) for k in keys) or c.model.finetune != "lora":
            return
        compute = {"bf16": "bfloat16", "fp16": "float16"}.get(c.train.mixed_precision)
        if compute is not None and c.model.dtype != compute:
            self.add(
                "model.dtype",
                f"with model.finetune='lora' and train.mixed_precision={c.train.mixed_precision!r} the "
                f"frozen base must be stored in the compute dtype: set model.dtype={compute}",
            )

    def check_family(self) -> Any:
        """The backbone class, after its own checks of the generate section (None if unknown)."""
        if not self.wanted("model.family"):
            return None
        from mpo.backbones import registry

        try:
            backbone = registry.get_backbone_class(self.cfg.model.family)
        except ImportError as err:  # an entry point that does not import
            self.add("model.family", f"cannot be imported: {err}")
            return None
        except KeyError:
            self.add("model.family", f"must be a known backbone family: {registry.known_families()}")
            return None
        for section, check in (
            ("model", backbone.check_model_config),
            ("generate", backbone.check_generate_config),
            ("train", backbone.check_train_config),
        ):
            if any(key.startswith(f"{section}.") for key in self.skip):
                continue  # its checks would see a value that was already reported as wrong
            for key, message in check(getattr(self.cfg, section)):
                full = key if key.startswith(f"{section}.") else f"{section}.{key}"
                self.add(full, f"{message} (model.family={self.cfg.model.family!r})")
        return backbone

    def check_checklist(self) -> str | None:
        """The checklist's modality, or None if it cannot be loaded (which is reported). A weights file
        must fit it (one weight per feature): checked here because the score stage that reads it
        runs only after generation."""
        if not self.wanted("reward.checklist"):
            return None
        from reward.checklist import ChecklistError, load_checklist

        try:
            checklist = load_checklist(self.cfg.reward.checklist)
        except ChecklistError as err:
            self.add("reward.checklist", f"cannot be loaded: {err}")
            return None
        weights = self.cfg.reward.weights
        if weights is not None and self.wanted("reward.weights"):
            if not Path(weights).is_file():
                self.add("reward.weights", f"no such file (relative paths start at {os.getcwd()})")
            else:
                try:
                    checklist.with_weights(weights)
                except ChecklistError as err:
                    self.add("reward.weights", f"does not fit reward.checklist: {err}")
        return checklist.modality


# ---- public API -------------------------------------------------------------------------------------
def load_recipe(path: str | os.PathLike, overrides: Iterable[str] = ()) -> DictConfig:
    """Load, extend, override and validate a recipe; a DictConfig typed by :class:`Recipe`.

    Layers, later winning: the dataclass defaults, the recipe's ``defaults`` files (each with its own
    defaults first, paths relative to the file that names them), the recipe file, then ``overrides``
    (``key=value``, values parsed as YAML: ``select.dimensions=[aesthetics,fidelity]``).

    Relative paths *inside* a recipe (prompts.file, model.path, reward.weights, ...) are left as written
    and resolved against the current working directory when used, so run ``mpo`` from the repository
    root; :func:`resolve_paths` makes them absolute (it is what ``recipe.yaml`` in a run dir records).

    Raises :class:`RecipeError` listing every problem found, one line each.
    """
    path = Path(path)
    builder = _Builder()
    for layer_path, data in _read_chain(path):
        builder.apply(data, str(layer_path))
    builder.apply_overrides(overrides)
    problems = builder.problems()
    problems += _Checker(builder.cfg, builder.sources, {p.key for p in problems}).run(cross=True)
    if problems:
        raise _report(str(path), problems)
    return builder.cfg


def load_config(
    path: str | os.PathLike, overrides: Iterable[str], schema_class: type, checker: type[_Checker]
) -> DictConfig:
    """:func:`load_recipe` for another schema (e.g. the reward trainer's): the same layering, override
    syntax and error report. ``checker`` is a :class:`_Checker` subclass whose ``rules`` and
    ``leaf_keys`` describe ``schema_class`` and whose ``check_cross_fields`` holds its own rules."""
    path = Path(path)
    builder = _Builder(schema_class)
    for layer_path, data in _read_chain(path):
        builder.apply(data, str(layer_path))
    builder.apply_overrides(overrides)
    problems = builder.problems()
    problems += checker(builder.cfg, builder.sources, {p.key for p in problems}).run(cross=True)
    if problems:
        raise _report(str(path), problems)
    return builder.cfg


def load_select_config(overrides: Iterable[str] = ()) -> DictConfig:
    """The select section without a recipe: its defaults plus ``select.key=value`` overrides (for
    ``mpo select --scores FILE``), checked like a recipe's."""
    overrides = list(overrides)
    builder = _Builder()
    outside = [o for o in overrides if not o.startswith("select.")]
    builder.apply_overrides(o for o in overrides if o.startswith("select."))
    problems = [
        Problem(o.partition("=")[0], "only select.* keys apply without a recipe", f"override {o!r}")
        for o in outside
    ]
    problems += builder.problems()
    problems += _Checker(builder.cfg, builder.sources, {p.key for p in problems}, "select.").run(cross=False)
    if problems:
        raise _report("select overrides", problems)
    return builder.cfg.select


def _local_path(value: str | None, builds_here: bool = False) -> str | None:
    """Absolute form of a path that is local (exists, is spelled as a path, or will be built there);
    hub ids (``owner/name`` with no such folder) are left alone."""
    if value is None:
        return None
    path = Path(value).expanduser()
    if builds_here or path.exists() or value.startswith(("/", "./", "../", "~")):
        return os.path.abspath(path)
    return value


def resolve_paths(recipe: DictConfig) -> DictConfig:
    """A copy whose local paths are absolute (against the current directory), so that the copy means
    the same thing from anywhere: what a run directory's ``recipe.yaml`` records."""
    out = copy.deepcopy(recipe)
    from mpo.prompts import is_hub_dataset_id

    if not is_hub_dataset_id(out.prompts.file):  # a hub dataset id stays as it is
        out.prompts.file = os.path.abspath(Path(out.prompts.file).expanduser())
    if out.reward.weights is not None:
        out.reward.weights = os.path.abspath(Path(out.reward.weights).expanduser())
    if Path(out.reward.checklist).suffix:  # a file, not a bundled name
        out.reward.checklist = os.path.abspath(Path(out.reward.checklist).expanduser())
    out.model.path = _local_path(out.model.path, builds_here=out.model.tiny)
    out.reward.model_path = _local_path(out.reward.model_path)
    out.reward.alignment_model_path = _local_path(out.reward.alignment_model_path)
    out.model.vae_path = _local_path(out.model.vae_path)
    if out.train.resume_from not in ("latest", "none"):  # a checkpoint folder
        out.train.resume_from = os.path.abspath(Path(out.train.resume_from).expanduser())
    return out


def to_yaml(recipe: DictConfig) -> str:
    """The recipe as YAML with interpolations resolved (``output_dir: runs/my-run``)."""
    return OmegaConf.to_yaml(recipe, resolve=True)


def save_resolved(recipe: DictConfig, run_dir: str | os.PathLike) -> Path:
    """Write ``recipe.yaml`` (paths absolute, interpolations resolved) atomically; returns its path.

    ``run_dir`` is the run directory, or the target file itself when it ends in ``.yaml``. The file
    loads back with :func:`load_recipe` to the same recipe.
    """
    from mpo.store import write_text  # atomic: temporary file beside the target, then rename

    target = Path(run_dir)
    path = target if target.suffix in (".yaml", ".yml") else target / RECIPE_FILE
    header = "# The fully resolved recipe of this run; reload it with `mpo recipe <this file>`.\n"
    write_text(path, header + to_yaml(resolve_paths(recipe)))
    return path
