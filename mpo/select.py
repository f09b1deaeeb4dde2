"""The select stage: turn scored candidates into (win, lose) preference pairs, MPO or plain DPO.

::

    mpo select recipes/tiny/sdxl.yaml                     # reads scores.parquet, writes pairs.parquet

For the N scored candidates of one prompt, the ordered pair (win=i, lose=j), i != j, with total
margin ``m = total_i - total_j`` and threshold ``t`` (``select.threshold``, >= 0):

* ``dpo`` keeps it when ``m >= t``, and ``m > 0`` when ``t == 0``: the total reward alone decides.
* ``mpo`` (paper section 3.3) also needs ``i`` to *dominate* ``j``: ``score_i >= score_j`` on every
  column of the chosen level (``dim.*``, ``sub.*`` or ``q.*``; ``select.dimensions`` restricts them).

Exact ties: two candidates with equal totals never form a pair when ``t == 0`` (``m > 0`` is needed),
so identical twins, which dominate each other, are never kept, let alone in both orders. Because
``m_ij = -m_ji``, at most one order of any two candidates is ever kept.

Missing values: a column that is NaN for every candidate (a backend that cannot judge it) is dropped
from the dominance test and named in the statistics. A NaN in a single row on a used column makes that
row unable to dominate or be dominated (its pairs are not dominant, so ``mpo`` drops them and ``dpo``
keeps them with ``dominant = False``); a NaN total takes the row out of every pair.

Cap (``select.max_pairs_per_prompt``): ``largest_margin`` keeps the pairs with the largest total
margin, ties broken by (win, lose) sample index; ``random`` keeps a uniformly random subset, drawn by
sorting the pairs on a hash of (``select.seed``, prompt_id, win, lose): the same prompt gets the same
pairs whatever else is in the table and in whatever order it is processed.

Where we depart from the paper: nothing in the rule; the paper does not say how it handles ties or
unknown answers, so the choices above are ours. The statistics give the paper's Table 5 view: among
the pairs that pass the total threshold, how many are dominant (#Dom) and how many are not (#Not-Dom).

The test is vectorised: prompts are grouped by their number of candidates N into dense [P, N, D]
arrays (no padding, so uneven N costs nothing extra), the [P, N, N] dominance and margin masks are
built by broadcasting one column at a time, in chunks of prompts that bound memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from mpo.config import RecipeError
from mpo.errors import errors_reach_every_rank
from mpo.schema import CAP_STRATEGIES, SELECT_LEVELS, SELECT_RULES, SelectConfig
from mpo.store import (
    RunDir,
    StoreError,
    describe_changes,
    parquet_hash,
    read_parquet,
    write_parquet,
    write_text,
)

LEVEL_PREFIX = {"dimension": "dim.", "sub_dimension": "sub.", "question": "q."}
REQUIRED_COLUMNS = ("prompt_id", "sample_idx", "total")
PAIR_COLUMNS = ("prompt_id", "win", "lose", "margin", "rule", "level", "dominant")
STATS_NAME = "select_stats.json"
# Pairs (P * N * N) handled per chunk: bounds the float64 margin array at 64 MiB.
CHUNK_PAIRS = 1 << 23


class SelectionError(ValueError):
    """A scores table that cannot be selected from; the message names the file and the column."""


@dataclass
class SelectionStats:
    """What selection kept and why; ``to_dict`` is the JSON written beside pairs.parquet.

    Counts "before cap" are over all ordered pairs that pass a rule; ``pairs`` is what was written.
    """

    rule: str
    level: str
    candidates: int  # scored rows used
    prompts: int
    columns: list[str]  # the dominance columns used
    dropped_columns: list[str]  # all-NaN columns left out of the dominance test
    rows_with_nan: int  # candidates with a NaN in a used column or in total (cannot dominate)
    pairs: int  # written, after the cap
    pairs_by_rule: dict[str, int]  # before the cap, both rules whatever rule is chosen
    prompts_without_pairs: int  # for the chosen rule
    prompts_without_pairs_by_rule: dict[str, int]
    threshold_pairs_dominant: int  # the paper's #Dom: pairs passing the total threshold that dominate
    threshold_pairs_not_dominant: int  # the paper's #Not-Dom
    kept_dominant: int  # written pairs that are dominant (all of them for mpo)
    removed_by_cap: int
    pairs_per_prompt_mean: float  # written pairs over all prompts
    pairs_per_prompt_max: int
    mean_margin: float | None  # over written pairs (None when there are none)
    excluded_candidates: int = 0  # rows left out before selection (other splits)
    notes: list[str] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)  # the scores file this was computed from

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SelectionStats:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ---- configuration ------------------------------------------------------------------------------
def config_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict of a SelectConfig, whether a dataclass, an OmegaConf node or a mapping."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        data = dataclasses.asdict(cfg)
    elif isinstance(cfg, Mapping):
        data = dict(cfg)
    else:
        from omegaconf import OmegaConf

        data = OmegaConf.to_container(cfg, resolve=True)
    known = {f.name for f in dataclasses.fields(SelectConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise RecipeError(f"select: unknown keys {unknown}; allowed: {sorted(known)}")
    data = {**dataclasses.asdict(SelectConfig()), **data}
    if data["dimensions"] is not None:
        data["dimensions"] = [str(d) for d in data["dimensions"]]
    data["threshold"] = float(data["threshold"])
    return data


def _checked_config(cfg: Any) -> SelectConfig:
    c = SelectConfig(**config_dict(cfg))
    for key, value, allowed in (
        ("rule", c.rule, SELECT_RULES),
        ("level", c.level, SELECT_LEVELS),
        ("cap_strategy", c.cap_strategy, CAP_STRATEGIES),
    ):
        if value not in allowed:
            raise RecipeError(f"select.{key}={value!r}: must be one of {list(allowed)}")
    if not np.isfinite(c.threshold) or c.threshold < 0:
        raise RecipeError(f"select.threshold={c.threshold}: must be a finite number >= 0")
    if c.max_pairs_per_prompt is not None and c.max_pairs_per_prompt < 1:
        raise RecipeError(f"select.max_pairs_per_prompt={c.max_pairs_per_prompt}: must be >= 1 or null")
    return c


# ---- columns ------------------------------------------------------------------------------------
def _dominance_columns(scores: pd.DataFrame, cfg: SelectConfig, source: str) -> tuple[list[str], list[str]]:
    """(columns used, all-NaN columns dropped) at the configured level."""
    missing = [c for c in REQUIRED_COLUMNS if c not in scores.columns]
    if missing:
        raise SelectionError(f"{source}: missing column(s) {missing} (columns: {list(scores.columns)[:12]})")
    if len(scores) == 0:
        raise SelectionError(f"{source}: no rows (no candidate was scored)")
    prefix = LEVEL_PREFIX[cfg.level]
    available = [c for c in scores.columns if isinstance(c, str) and c.startswith(prefix)]
    if not available:
        raise SelectionError(
            f"{source}: no {prefix}* columns, needed for select.level={cfg.level!r} "
            f"(columns: {list(scores.columns)[:12]})"
        )
    if cfg.dimensions is None:
        wanted = available
    else:
        wanted = [d if d.startswith(prefix) else prefix + d for d in cfg.dimensions]
        unknown = [w for w in wanted if w not in available]
        if unknown:
            names = [a[len(prefix) :] for a in available]
            raise SelectionError(
                f"{source}: select.dimensions names {unknown}, not {prefix}* columns at level "
                f"{cfg.level!r}; available: {names}"
            )
    dropped = [c for c in wanted if scores[c].isna().all()]
    used = [c for c in wanted if c not in dropped]
    if not used:
        raise SelectionError(
            f"{source}: every {prefix}* column for the dominance test is NaN ({dropped}); "
            "the reward backend could not judge this level"
        )
    return used, dropped


def _float_columns(scores: pd.DataFrame, columns: list[str], source: str) -> np.ndarray:
    """[D, R] float64, one contiguous row per column (what the column-at-a-time test reads)."""
    out = np.empty((len(columns), len(scores)), dtype=np.float64)
    for d, name in enumerate(columns):
        try:
            out[d] = scores[name].to_numpy(dtype=np.float64, na_value=np.nan)
        except (TypeError, ValueError) as err:
            raise SelectionError(f"{source}: column {name!r} must be numeric ({err})") from err
    return out


# ---- grouping -----------------------------------------------------------------------------------
@dataclass
class _Grouped:
    """The table's rows by prompt: prompt p (in sorted prompt_id order) owns the rows
    ``order[start[p] : start[p] + count[p]]``, by ascending sample_idx. Columns stay in table order
    (sorting a copy of every column would double the peak memory at question level)."""

    prompt_ids: np.ndarray  # [P] the prompt_id values, sorted
    order: np.ndarray  # [R] row indices sorted by (prompt, sample_idx)
    sample_idx: np.ndarray  # [R]
    values: np.ndarray  # [D, R]
    total: np.ndarray  # [R]
    start: np.ndarray  # [P]
    count: np.ndarray  # [P]


def _group(scores: pd.DataFrame, columns: list[str], source: str) -> _Grouped:
    codes, uniques = pd.factorize(scores["prompt_id"], sort=True)
    if (codes < 0).any():
        raise SelectionError(f"{source}: column 'prompt_id' has missing values")
    try:
        sample_idx = scores["sample_idx"].to_numpy(dtype=np.int64)
    except (TypeError, ValueError) as err:
        raise SelectionError(f"{source}: column 'sample_idx' must hold integers ({err})") from err
    order = np.lexsort((sample_idx, codes))
    sorted_codes, sorted_idx = codes[order], sample_idx[order]
    same = (sorted_codes[1:] == sorted_codes[:-1]) & (sorted_idx[1:] == sorted_idx[:-1])
    if same.any():
        k = int(np.argmax(same))
        raise SelectionError(
            f"{source}: prompt_id {uniques[sorted_codes[k]]!r}, sample_idx {sorted_idx[k]} "
            "appears more than once"
        )
    count = np.bincount(codes, minlength=len(uniques)).astype(np.int64)
    start = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    return _Grouped(
        prompt_ids=np.asarray(uniques),
        order=order,
        sample_idx=sample_idx,
        values=_float_columns(scores, columns, source),
        total=_float_columns(scores, ["total"], source)[0],
        start=start,
        count=count,
    )


def _chunks(grouped: _Grouped) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(prompt codes [Pc], table rows [Pc, n]) for prompts with the same n >= 2, in bounded chunks."""
    for n in np.unique(grouped.count):
        if n < 2:
            continue
        prompts = np.flatnonzero(grouped.count == n)
        step = max(1, CHUNK_PAIRS // int(n * n))
        for lo in range(0, len(prompts), step):
            chunk = prompts[lo : lo + step]
            yield chunk, grouped.order[grouped.start[chunk][:, None] + np.arange(n)]


# ---- the rule -----------------------------------------------------------------------------------
def _masks(
    values: np.ndarray, total: np.ndarray, rows: np.ndarray, threshold: float
) -> tuple[np.ndarray, ...]:
    """values [D, R], total [R], rows [P, n] -> (dominant, passes threshold, margin), each [P, n, n].

    One column at a time keeps the peak at a few [P, n, n] arrays instead of [P, n, n, D], and stops
    early once no pair of the chunk can dominate (common with 60 questions). NaN compares False,
    which is exactly the documented rule for missing values.
    """
    n = rows.shape[1]
    dominant = np.ones((*rows.shape, n), dtype=bool)
    dominant[:, np.arange(n), np.arange(n)] = False  # i != j; lets the early stop below see "none left"
    for d in range(values.shape[0]):
        column = values[d][rows]
        dominant &= column[:, :, None] >= column[:, None, :]
        if d % 8 == 7 and not dominant.any():
            break
    chunk_total = total[rows]
    margin = chunk_total[:, :, None] - chunk_total[:, None, :]
    passes = margin >= threshold if threshold > 0 else margin > 0
    return dominant, passes, margin


def _prompt_seeds(seed: int, prompt_ids: np.ndarray) -> np.ndarray:
    """A stable 64-bit seed per prompt (blake2b: Python's hash changes between interpreter runs)."""
    digests = [
        hashlib.blake2b(f"select|{int(seed)}|{pid}".encode(), digest_size=8).digest() for pid in prompt_ids
    ]
    return np.frombuffer(b"".join(digests), dtype=">u8").astype(np.uint64)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijective, well-mixed hash of uint64 values (wrap-around intended)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _cap(pairs: dict[str, np.ndarray], cfg: SelectConfig, prompt_ids: np.ndarray) -> np.ndarray:
    """Indices (ascending) of the pairs that survive ``max_pairs_per_prompt``."""
    code, win, lose = pairs["code"], pairs["win"], pairs["lose"]
    if cfg.max_pairs_per_prompt is None or len(code) == 0:
        return np.arange(len(code))
    if cfg.cap_strategy == "largest_margin":
        order = np.lexsort((lose, win, -pairs["margin"], code))
    else:
        seeds = _prompt_seeds(cfg.seed, prompt_ids)
        with np.errstate(over="ignore"):
            key = _mix64(
                seeds[code] ^ _mix64(win.astype(np.uint64) * np.uint64(1 << 32) + lose.astype(np.uint64))
            )
        order = np.lexsort((lose, win, key, code))
    ordered_code = code[order]
    first = np.searchsorted(ordered_code, ordered_code, side="left")
    rank = np.arange(len(order)) - first
    return np.sort(order[rank < cfg.max_pairs_per_prompt])


# ---- selection ----------------------------------------------------------------------------------
def select_pairs(
    scores: pd.DataFrame, cfg: SelectConfig, *, source: str = "scores"
) -> tuple[pd.DataFrame, SelectionStats]:
    """Pairs kept by ``cfg`` from a scores table, and the statistics of both rules.

    scores: one row per candidate: prompt_id, sample_idx, total and the level's columns (``dim.*``,
        ``sub.*`` or ``q.*``; higher is better); other columns are ignored.
    source: how errors name the table (the file it came from).
    Returns the pairs (``PAIR_COLUMNS``, sorted by prompt_id, win, lose) and the statistics.
    """
    cfg = _checked_config(cfg)
    columns, dropped = _dominance_columns(scores, cfg, source)
    grouped = _group(scores, columns, source)
    n_prompts = len(grouped.prompt_ids)
    per_prompt = {rule: np.zeros(n_prompts, dtype=np.int64) for rule in SELECT_RULES}
    parts: list[dict[str, np.ndarray]] = []
    for codes, rows in _chunks(grouped):
        dominant, passes, margin = _masks(grouped.values, grouped.total, rows, cfg.threshold)
        mpo = dominant & passes
        per_prompt["mpo"][codes] = mpo.sum(axis=(1, 2))
        per_prompt["dpo"][codes] = passes.sum(axis=(1, 2))
        p, i, j = np.nonzero(mpo if cfg.rule == "mpo" else passes)
        parts.append(
            {
                "code": codes[p],
                "win": grouped.sample_idx[rows[p, i]],
                "lose": grouped.sample_idx[rows[p, j]],
                "margin": margin[p, i, j],
                "dominant": dominant[p, i, j],
            }
        )
    pairs = _concatenate(parts)
    order = np.lexsort((pairs["lose"], pairs["win"], pairs["code"]))
    pairs = {k: v[order] for k, v in pairs.items()}
    keep = _cap(pairs, cfg, grouped.prompt_ids)
    pairs = {k: v[keep] for k, v in pairs.items()}

    n = len(keep)
    frame = pd.DataFrame(
        {
            "prompt_id": grouped.prompt_ids[pairs["code"]],
            "win": pairs["win"],
            "lose": pairs["lose"],
            "margin": pairs["margin"],
            "rule": _constant_category(n, cfg.rule, SELECT_RULES),
            "level": _constant_category(n, cfg.level, SELECT_LEVELS),
            "dominant": pairs["dominant"],
        }
    )
    kept_per_prompt = np.bincount(pairs["code"], minlength=n_prompts)
    nan_rows = int((np.isnan(grouped.values).any(axis=0) | np.isnan(grouped.total)).sum())
    stats = SelectionStats(
        rule=cfg.rule,
        level=cfg.level,
        candidates=len(grouped.sample_idx),
        prompts=n_prompts,
        columns=columns,
        dropped_columns=dropped,
        rows_with_nan=nan_rows,
        pairs=n,
        pairs_by_rule={r: int(c.sum()) for r, c in per_prompt.items()},
        prompts_without_pairs=int((kept_per_prompt == 0).sum()),
        prompts_without_pairs_by_rule={r: int((c == 0).sum()) for r, c in per_prompt.items()},
        threshold_pairs_dominant=int(per_prompt["mpo"].sum()),
        threshold_pairs_not_dominant=int(per_prompt["dpo"].sum() - per_prompt["mpo"].sum()),
        kept_dominant=int(pairs["dominant"].sum()),
        removed_by_cap=int(per_prompt[cfg.rule].sum()) - n,
        pairs_per_prompt_mean=float(kept_per_prompt.mean()) if n_prompts else 0.0,
        pairs_per_prompt_max=int(kept_per_prompt.max()) if n_prompts else 0,
        mean_margin=float(pairs["margin"].mean()) if n else None,
        notes=_notes(dropped, nan_rows, grouped, n),
        config=dataclasses.asdict(cfg),
    )
    return frame, stats


def _constant_category(n: int, value: str, categories: tuple[str, ...]) -> pd.Categorical:
    """A column holding one string: a categorical (dictionary-encoded in parquet) costs 1 byte a row
    where millions of Python strings would cost seconds; every allowed value is a category, so the
    columns of two pair files concatenate without turning into objects."""
    return pd.Categorical.from_codes(
        np.full(n, categories.index(value), dtype=np.int8), categories=categories
    )


def _concatenate(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    empty = {
        "code": np.zeros(0, np.int64),
        "win": np.zeros(0, np.int64),
        "lose": np.zeros(0, np.int64),
        "margin": np.zeros(0, np.float64),
        "dominant": np.zeros(0, bool),
    }
    return {k: np.concatenate([v, *(p[k] for p in parts)]) for k, v in empty.items()}


def _notes(dropped: list[str], nan_rows: int, grouped: _Grouped, kept: int) -> list[str]:
    notes = []
    if dropped:
        notes.append(f"all-NaN column(s) left out of the dominance test: {', '.join(dropped)}")
    if nan_rows:
        notes.append(f"{nan_rows} candidate(s) with a NaN score can neither dominate nor be dominated")
    single = int((grouped.count < 2).sum())
    if single:
        notes.append(f"{single} prompt(s) with fewer than 2 candidates give no pair")
    if kept == 0:
        notes.append("no pair was kept: lower select.threshold, or try rule=dpo / a coarser level")
    return notes


# ---- files --------------------------------------------------------------------------------------
def default_stats_path(out_path: str | os.PathLike) -> Path:
    """``pairs.parquet`` -> ``pairs_stats.json`` beside it."""
    out_path = Path(out_path)
    return out_path.with_name(f"{out_path.stem}_stats.json")


def file_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """Identifies the scores file a selection was computed from by its content (a rescored run has a
    new one): the content hash the project's parquet files carry, else the file's sha256."""
    stored = parquet_hash(path)
    if stored is None:
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
        stored = f"sha256:{digest.hexdigest()}"
    return {"path": str(Path(path).resolve()), "content_hash": stored}


def cap_total(pairs: pd.DataFrame, stats: SelectionStats, max_pairs: int, cfg: SelectConfig) -> pd.DataFrame:
    """At most ``max_pairs`` pairs in all (an iterative run's ``rounds.max_pairs``), chosen the way
    the per-prompt cap chooses (``select.cap_strategy``); ``stats`` is updated to what is kept."""
    cfg = _checked_config(cfg)
    if len(pairs) > max_pairs:
        pid, win, lose = (pairs[c].to_numpy(dtype=np.int64) for c in ("prompt_id", "win", "lose"))
        if cfg.cap_strategy == "largest_margin":
            order = np.lexsort((lose, win, pid, -pairs["margin"].to_numpy()))
        else:
            seeds = _prompt_seeds(cfg.seed, pid)
            with np.errstate(over="ignore"):
                key = _mix64(
                    seeds ^ _mix64(win.astype(np.uint64) * np.uint64(1 << 32) + lose.astype(np.uint64))
                )
            order = np.lexsort((lose, win, pid, key))
        pairs = pairs.iloc[np.sort(order[:max_pairs])].reset_index(drop=True)
        stats.removed_by_cap += stats.pairs - len(pairs)
    per_prompt = pairs["prompt_id"].value_counts()
    stats.pairs = len(pairs)
    stats.kept_dominant = int(pairs["dominant"].sum())
    stats.prompts_without_pairs = stats.prompts - len(per_prompt)
    stats.pairs_per_prompt_mean = len(pairs) / stats.prompts if stats.prompts else 0.0
    stats.pairs_per_prompt_max = int(per_prompt.max()) if len(per_prompt) else 0
    stats.mean_margin = float(pairs["margin"].mean()) if len(pairs) else None
    stats.config["max_pairs"] = int(max_pairs)
    return pairs


def select_from_file(
    scores_path: str | os.PathLike,
    out_path: str | os.PathLike,
    cfg: SelectConfig,
    *,
    stats_path: str | os.PathLike | None = None,
    split: str | None = None,
    show: bool = True,
    max_pairs: int | None = None,
) -> SelectionStats:
    """Select from a scores parquet file; write the pairs and the statistics JSON, both atomically.

    stats_path: defaults to ``<out stem>_stats.json`` beside ``out_path``.
    split: keep only rows whose ``split`` column equals this (e.g. "train"; ignored without the column).
    max_pairs: keep at most this many pairs in all (:func:`cap_total`).
    """
    scores_path = Path(scores_path)
    try:
        scores = read_parquet(scores_path)
    except StoreError as err:
        raise SelectionError(str(err)) from err
    excluded = 0
    if split is not None and "split" in scores.columns:
        keep = (scores["split"] == split).to_numpy()
        excluded = int((~keep).sum())
        scores = scores.loc[keep]
    pairs, stats = select_pairs(scores, cfg, source=str(scores_path))
    if max_pairs is not None:
        pairs = cap_total(pairs, stats, max_pairs, cfg)
    stats.excluded_candidates = excluded
    if excluded:
        stats.notes.append(f"{excluded} candidate(s) outside split {split!r} were left out")
    stats.source = file_fingerprint(scores_path)
    write_parquet(pairs, out_path, {"select": json.dumps(stats.config)})
    write_text(stats_path if stats_path is not None else default_stats_path(out_path), stats.to_json() + "\n")
    if show:
        print_stats(stats, title=f"select -> {out_path}")
    return stats


def print_stats(stats: SelectionStats, title: str = "select") -> None:
    """The end-of-stage summary table."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    table.add_column("")
    for rule in SELECT_RULES:
        table.add_column(f"{rule}{' (chosen)' if rule == stats.rule else ''}", justify="right")
    table.add_row("pairs before cap", *(str(stats.pairs_by_rule[r]) for r in SELECT_RULES))
    table.add_row(
        "prompts without pair", *(str(stats.prompts_without_pairs_by_rule[r]) for r in SELECT_RULES)
    )
    rows = {
        "candidates / prompts": f"{stats.candidates} / {stats.prompts}",
        f"level ({len(stats.columns)} columns)": stats.level,
        "#Dom / #Not-Dom (threshold pairs)": (
            f"{stats.threshold_pairs_dominant} / {stats.threshold_pairs_not_dominant}"
        ),
        "pairs written": str(stats.pairs),
        "removed by cap": str(stats.removed_by_cap),
        "pairs per prompt (mean / max)": f"{stats.pairs_per_prompt_mean:.3g} / {stats.pairs_per_prompt_max}",
        "mean margin": "-" if stats.mean_margin is None else f"{stats.mean_margin:.4g}",
    }
    for key, value in rows.items():
        table.add_row(key, *([value, ""] if stats.rule == "mpo" else ["", value]))
    console = Console()
    console.print(table)
    for note in stats.notes:
        console.print(f"note: {note}")


# ---- the stage ----------------------------------------------------------------------------------
def _up_to_date(
    run: RunDir, stats_path: Path, cfg: SelectConfig, force: bool, max_pairs: int | None = None
) -> SelectionStats | None:
    """The stored statistics when pairs.parquet was made from this scores file with this config; None
    when it must be made (again): missing, or new scores. Made with another config: refused, naming
    the keys, unless ``force``."""
    if not (run.pairs_parquet.exists() and stats_path.exists()):
        return None
    try:
        stored = json.loads(stats_path.read_text())
    except (OSError, ValueError):
        return None  # a damaged statistics file: the pairs are made again
    config = dict(stored.get("config") or {})
    changes = describe_changes(
        {"max_pairs": config.pop("max_pairs", None)}, {"max_pairs": max_pairs}, "rounds."
    )
    changes += describe_changes(config, dataclasses.asdict(cfg), "select.")
    if changes and not force:
        raise SelectionError(
            f"{run.pairs_parquet} was selected with other settings ({'; '.join(changes)}); restore "
            "them, use a new output_dir, or add --force to select again (training then starts over)"
        )
    same_scores = (stored.get("source") or {}).get("content_hash") == file_fingerprint(run.scores_parquet)[
        "content_hash"
    ]
    return SelectionStats.from_dict(stored) if not changes and same_scores else None


@errors_reach_every_rank
def select_stage(
    recipe: Any,
    accelerator: Any = None,
    force: bool = False,
    *,
    run: RunDir | None = None,
    max_pairs: int | None = None,
) -> SelectionStats:
    """Select pairs for the run: ``<output_dir>/scores.parquet`` -> ``pairs.parquet`` and
    ``select_stats.json``, from the train split only (held-out prompts feed eval, not training).

    Skipped (the stored statistics are returned) when both files exist and were made from the same
    scores (by content) with the same ``select`` config; made again from new scores; refused when made
    with another config, unless ``force``. Under ``accelerate launch`` the main process selects and
    the others wait and read its statistics. An iterative run gives a round's ``run`` directory and
    the round's cap on pairs in all (``max_pairs``).
    """
    from mpo.distributed import is_main, wait_for_everyone

    run = run if run is not None else RunDir.from_recipe(recipe)
    cfg = _checked_config(recipe.select)
    stats_path = run.pairs_parquet.with_name(STATS_NAME)
    if not run.scores_parquet.exists():
        raise SelectionError(f"{run.scores_parquet}: missing; run the score stage first")
    if is_main(accelerator):
        stats = _up_to_date(run, stats_path, cfg, force, max_pairs)
        if stats is not None:
            print_stats(stats, title=f"select (up to date) -> {run.pairs_parquet}")
        else:
            select_from_file(
                run.scores_parquet,
                run.pairs_parquet,
                cfg,
                stats_path=stats_path,
                split="train",
                max_pairs=max_pairs,
            )
    wait_for_everyone(accelerator)
    return SelectionStats.from_dict(json.loads(stats_path.read_text()))
