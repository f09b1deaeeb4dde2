"""Pair selection: every rule and level against a brute-force double loop, on scores full of ties,
uneven candidate counts and missing values; the statistics; the files; the errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

import mpo.select as select_module
from mpo.config import Recipe, RecipeError, SelectConfig
from mpo.select import (
    SelectionError,
    SelectionStats,
    select_from_file,
    select_pairs,
    select_stage,
)
from mpo.store import temp_files, write_parquet

PREFIX = {"dimension": "dim.", "sub_dimension": "sub.", "question": "q."}


def make_scores(seed: int = 0, prompts: int = 30, string_ids: bool = False) -> pd.DataFrame:
    """Scores from {0, 1, 2}: equal columns and equal totals are common. N per prompt is 1..6, one
    dimension is all NaN, a few single cells and one total are NaN, rows are shuffled."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 7, size=prompts)
    pid = np.repeat(np.arange(prompts) * 7 + 3, counts)
    rows = len(pid)
    frame = pd.DataFrame(
        {
            "prompt_id": [f"p{p}" for p in pid] if string_ids else pid,
            "sample_idx": np.concatenate([rng.permutation(10)[:c] for c in counts]),
            "split": "train",
        }
    )
    for name in ("a", "b", "c"):
        frame[f"dim.{name}"] = rng.integers(0, 3, rows).astype(float)
    frame["dim.unknown"] = np.nan
    for name in ("s1", "s2", "s3", "s4", "s5"):
        frame[f"sub.{name}"] = rng.integers(0, 2, rows).astype(float)
    for q in range(12):  # mostly "yes", so that dominance over all 12 still happens
        frame[f"q.q{q}"] = (rng.random(rows) < 0.9).astype(float)
    frame["total"] = frame[["dim.a", "dim.b", "dim.c"]].sum(axis=1) + rng.integers(0, 2, rows) * 0.5
    cells = rng.choice(rows, size=3, replace=False)
    frame.loc[cells[0], "dim.b"] = np.nan
    frame.loc[cells[1], "sub.s2"] = np.nan
    frame.loc[cells[2], "q.q5"] = np.nan
    frame.loc[rng.integers(rows), "total"] = np.nan
    return frame.sample(frac=1.0, random_state=seed).reset_index(drop=True)


def brute_force(scores: pd.DataFrame, cfg: SelectConfig) -> tuple[pd.DataFrame, dict[str, int]]:
    """The documented rule, one ordered pair at a time."""
    prefix = PREFIX[cfg.level]
    columns = [c for c in scores.columns if c.startswith(prefix)]
    if cfg.dimensions is not None:
        columns = [prefix + d for d in cfg.dimensions]
    columns = [c for c in columns if not scores[c].isna().all()]
    t = cfg.threshold
    kept, counts = [], {"mpo": 0, "dpo": 0}
    for pid in sorted(scores["prompt_id"].unique()):
        rows = scores[scores["prompt_id"] == pid].to_dict("records")
        found = []
        for a in rows:
            for b in rows:
                if a["sample_idx"] == b["sample_idx"]:
                    continue
                margin = a["total"] - b["total"]
                passes = margin >= t and (margin > 0 or t > 0)
                dominant = all(
                    not math.isnan(a[c]) and not math.isnan(b[c]) and a[c] >= b[c] for c in columns
                )
                counts["dpo"] += passes
                counts["mpo"] += passes and dominant
                if passes and (dominant or cfg.rule == "dpo"):
                    found.append((pid, a["sample_idx"], b["sample_idx"], margin, dominant))
        if cfg.max_pairs_per_prompt is not None:
            found = sorted(found, key=lambda r: (-r[3], r[1], r[2]))[: cfg.max_pairs_per_prompt]
        kept.extend(sorted(found, key=lambda r: (r[1], r[2])))
    frame = pd.DataFrame(kept, columns=["prompt_id", "win", "lose", "margin", "dominant"])
    return frame, counts


def as_rows(pairs: pd.DataFrame) -> list[tuple]:
    cols = ["prompt_id", "win", "lose", "margin", "dominant"]
    return [tuple(r) for r in pairs[cols].itertuples(index=False, name=None)]


@pytest.mark.parametrize("level", ["dimension", "sub_dimension", "question"])
@pytest.mark.parametrize("rule", ["mpo", "dpo"])
@pytest.mark.parametrize("threshold", [0.0, 1.0])
@pytest.mark.parametrize("cap", [None, 2])
def test_matches_brute_force(level, rule, threshold, cap):
    scores = make_scores(seed=len(level) * 8 + (rule == "dpo") * 4 + int(threshold) * 2 + (cap is None))
    cfg = SelectConfig(rule=rule, level=level, threshold=threshold, max_pairs_per_prompt=cap)
    pairs, stats = select_pairs(scores, cfg)
    expected, counts = brute_force(scores, cfg)

    assert list(pairs.columns) == list(select_module.PAIR_COLUMNS)
    assert as_rows(pairs) == as_rows(expected)  # same pairs, same order (prompt, win, lose)
    assert (pairs["rule"] == rule).all() and (pairs["level"] == level).all()
    assert stats.pairs_by_rule == counts
    assert stats.threshold_pairs_dominant == counts["mpo"]
    assert stats.threshold_pairs_not_dominant == counts["dpo"] - counts["mpo"]
    assert stats.pairs == len(expected)
    assert stats.removed_by_cap == counts[rule] - len(expected)
    assert stats.kept_dominant == int(expected["dominant"].sum())
    assert stats.candidates == len(scores) and stats.prompts == scores["prompt_id"].nunique()
    per_prompt = expected.groupby("prompt_id").size()
    assert stats.prompts_without_pairs == stats.prompts - len(per_prompt)
    assert stats.pairs_per_prompt_max == (per_prompt.max() if len(per_prompt) else 0)
    if len(expected):
        assert stats.mean_margin == pytest.approx(expected["margin"].mean())
    assert stats.dropped_columns == (["dim.unknown"] if level == "dimension" else [])


def test_brute_force_agreement_is_not_vacuous():
    """The random tables exercise what the rules distinguish: ties, non-dominant threshold pairs."""
    scores = make_scores(seed=1)
    _, stats = select_pairs(scores, SelectConfig(rule="dpo"))
    assert stats.threshold_pairs_dominant > 10 and stats.threshold_pairs_not_dominant > 10
    assert stats.prompts_without_pairs_by_rule["mpo"] > stats.prompts_without_pairs_by_rule["dpo"] > 0
    equal_totals = scores.groupby("prompt_id")["total"].apply(lambda t: t.duplicated().any())
    assert equal_totals.sum() > 3


def test_string_prompt_ids_dimension_subset_and_prompts_without_pairs_by_rule():
    scores = make_scores(seed=2, string_ids=True)
    cfg = SelectConfig(rule="mpo", dimensions=["a", "c"], threshold=0.5)
    pairs, stats = select_pairs(scores, cfg)
    expected, counts = brute_force(scores, cfg)
    assert as_rows(pairs) == as_rows(expected)
    assert stats.columns == ["dim.a", "dim.c"] and stats.pairs_by_rule == counts
    for rule in ("mpo", "dpo"):
        rule_pairs, _ = brute_force(scores, SelectConfig(rule=rule, dimensions=["a", "c"], threshold=0.5))
        n_with = rule_pairs["prompt_id"].nunique()
        assert stats.prompts_without_pairs_by_rule[rule] == stats.prompts - n_with


def test_chunking_does_not_change_the_result(monkeypatch):
    scores = make_scores(seed=3, prompts=40)
    cfg = SelectConfig(rule="dpo", level="question", max_pairs_per_prompt=3)
    whole, stats_whole = select_pairs(scores, cfg)
    monkeypatch.setattr(select_module, "CHUNK_PAIRS", 30)  # one or two prompts per chunk
    chunked, stats_chunked = select_pairs(scores, cfg)
    pd.testing.assert_frame_equal(whole, chunked)
    assert stats_whole == stats_chunked


def test_exact_ties_are_never_kept_in_either_order():
    twins = pd.DataFrame(
        {
            "prompt_id": [0, 0, 0],
            "sample_idx": [0, 1, 2],
            "dim.a": [1.0, 1.0, 0.0],
            "dim.b": [2.0, 2.0, 0.0],
            "total": [3.0, 3.0, 0.0],
        }
    )
    for rule in ("mpo", "dpo"):
        pairs, _ = select_pairs(twins, SelectConfig(rule=rule))
        assert sorted(zip(pairs["win"], pairs["lose"])) == [(0, 2), (1, 2)]


def test_nan_cell_cannot_dominate_or_be_dominated():
    scores = pd.DataFrame(
        {
            "prompt_id": [5, 5, 5],
            "sample_idx": [0, 1, 2],
            "dim.a": [3.0, 2.0, 1.0],
            "dim.b": [3.0, np.nan, 1.0],
            "total": [6.0, 4.0, 2.0],
        }
    )
    mpo, stats = select_pairs(scores, SelectConfig(rule="mpo"))
    assert list(zip(mpo["win"], mpo["lose"])) == [(0, 2)]
    assert stats.rows_with_nan == 1
    dpo, _ = select_pairs(scores, SelectConfig(rule="dpo"))
    dominant = {(w, lo): d for w, lo, d in zip(dpo["win"], dpo["lose"], dpo["dominant"])}
    assert dominant == {(0, 1): False, (0, 2): True, (1, 2): False}


def test_random_cap_is_a_seeded_subset_independent_of_order_and_other_prompts():
    scores = make_scores(seed=4, prompts=40)
    full, _ = select_pairs(scores, SelectConfig(rule="dpo"))
    cfg = SelectConfig(rule="dpo", max_pairs_per_prompt=2, cap_strategy="random", seed=7)
    capped, stats = select_pairs(scores, cfg)
    assert set(as_rows(capped)) <= set(as_rows(full))
    sizes = full.groupby("prompt_id").size().clip(upper=2)
    pd.testing.assert_series_equal(capped.groupby("prompt_id").size(), sizes)
    assert stats.removed_by_cap == len(full) - len(capped)

    some = scores["prompt_id"].unique()[::3]
    subset = scores[scores["prompt_id"].isin(some)].iloc[::-1]
    again, _ = select_pairs(subset, cfg)
    assert as_rows(again) == as_rows(capped[capped["prompt_id"].isin(some)])

    other_seeds = [select_pairs(scores, SelectConfig(**{**vars(cfg), "seed": s}))[0] for s in (8, 9)]
    assert any(as_rows(o) != as_rows(capped) for o in other_seeds)
    largest, _ = select_pairs(scores, SelectConfig(rule="dpo", max_pairs_per_prompt=2))
    assert as_rows(largest) != as_rows(capped)


def test_from_file_round_trip(tmp_path):
    scores = make_scores(seed=5)
    scores_path = tmp_path / "scores.parquet"
    write_parquet(scores, scores_path)
    cfg = SelectConfig(rule="mpo", max_pairs_per_prompt=3)
    stats = select_from_file(scores_path, tmp_path / "pairs.parquet", cfg, show=False)
    pairs = pd.read_parquet(tmp_path / "pairs.parquet")
    expected, _ = select_pairs(scores, cfg)
    pd.testing.assert_frame_equal(pairs, expected, check_dtype=False)
    stored = json.loads((tmp_path / "pairs_stats.json").read_text())
    assert stored == stats.to_dict()
    assert SelectionStats.from_dict(stored) == stats
    assert stored["config"]["max_pairs_per_prompt"] == 3 and stored["source"]["path"] == str(scores_path)
    assert temp_files(tmp_path) == []


def _stage_recipe(tmp_path, **select):
    recipe = OmegaConf.structured(Recipe)
    recipe.output_dir = str(tmp_path / "run")
    for key, value in select.items():
        recipe.select[key] = value
    return recipe


def test_stage_uses_train_split_skips_when_up_to_date_and_refuses_other_settings(tmp_path, capsys):
    scores = make_scores(seed=6)
    val = scores["prompt_id"].isin(scores["prompt_id"].unique()[:5])
    scores.loc[val, "split"] = "val"
    (tmp_path / "run").mkdir()
    write_parquet(scores, tmp_path / "run" / "scores.parquet")

    stats = select_stage(_stage_recipe(tmp_path))
    pairs_path = tmp_path / "run" / "pairs.parquet"
    pairs = pd.read_parquet(pairs_path)
    expected, _ = brute_force(scores[~val], SelectConfig())
    assert as_rows(pairs) == as_rows(expected)
    assert stats.excluded_candidates == int(val.sum()) and stats.candidates == int((~val).sum())
    assert json.loads((tmp_path / "run" / "select_stats.json").read_text()) == stats.to_dict()

    written = pairs_path.stat().st_mtime_ns
    assert select_stage(_stage_recipe(tmp_path)) == stats
    assert pairs_path.stat().st_mtime_ns == written
    assert "up to date" in capsys.readouterr().out

    with pytest.raises(SelectionError, match=r"select\.rule: 'mpo' -> 'dpo'.*--force"):
        select_stage(_stage_recipe(tmp_path, rule="dpo"))  # finished pairs are never silently replaced
    assert pairs_path.stat().st_mtime_ns == written
    changed = select_stage(_stage_recipe(tmp_path, rule="dpo"), force=True)
    assert changed.rule == "dpo" and pd.read_parquet(pairs_path)["rule"].eq("dpo").all()

    rescored = scores[~val].iloc[: len(scores) // 2]  # a new scores file: the pairs must follow it
    write_parquet(rescored, tmp_path / "run" / "scores.parquet")
    again = select_stage(_stage_recipe(tmp_path, rule="dpo"))
    assert again.candidates == len(rescored)
    expected, _ = brute_force(rescored, SelectConfig(rule="dpo"))
    assert as_rows(pd.read_parquet(pairs_path)) == as_rows(expected)


def test_errors_name_the_file_and_the_column(tmp_path):
    scores = make_scores(seed=7)
    path = tmp_path / "scores.parquet"
    write_parquet(scores.drop(columns=["total"]), path)
    with pytest.raises(SelectionError, match=r"scores\.parquet.*'total'"):
        select_from_file(path, tmp_path / "pairs.parquet", SelectConfig(), show=False)
    write_parquet(scores.drop(columns=[c for c in scores.columns if c.startswith("dim.")]), path)
    with pytest.raises(SelectionError, match=r"scores\.parquet.*no dim\.\* columns"):
        select_from_file(path, tmp_path / "pairs.parquet", SelectConfig(), show=False)
    with pytest.raises(SelectionError, match=r"not found"):
        select_from_file(tmp_path / "none.parquet", tmp_path / "pairs.parquet", SelectConfig(), show=False)
    assert not (tmp_path / "pairs.parquet").exists()

    with pytest.raises(SelectionError, match=r"select\.dimensions.*'dim\.nope'.*available"):
        select_pairs(scores, SelectConfig(dimensions=["nope"]))
    with pytest.raises(SelectionError, match=r"every dim\.\* column.*NaN"):
        select_pairs(scores, SelectConfig(dimensions=["unknown"]))
    with pytest.raises(SelectionError, match=r"no rows"):
        select_pairs(scores.iloc[:0], SelectConfig())
    duplicated = pd.concat([scores, scores.iloc[[0]]])
    with pytest.raises(SelectionError, match=r"sample_idx .* more than once"):
        select_pairs(duplicated, SelectConfig())
    for bad, match in (
        ({"rule": "best"}, r"select\.rule='best'.*mpo"),
        ({"level": "pixel"}, r"select\.level"),
        ({"threshold": -1.0}, r"select\.threshold"),
        ({"max_pairs_per_prompt": 0}, r"select\.max_pairs_per_prompt"),
        ({"cap_strategy": "first"}, r"select\.cap_strategy"),
    ):
        with pytest.raises(RecipeError, match=match):
            select_pairs(scores, SelectConfig(**bad))
    with pytest.raises(SelectionError, match="run the score stage first"):
        select_stage(_stage_recipe(tmp_path / "empty"))
