"""``mpo calibrate``: the agreement measures, and the command on the tiny SDXL."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from mpo.calibrate import REFERENCE, Row, agreement, parse_setting, recommend
from mpo.cli import main

ROOT = Path(__file__).resolve().parents[1]
SDXL = ROOT / "recipes" / "tiny" / "sdxl.yaml"


def _pairs(rows):
    return pd.DataFrame(rows, columns=["prompt_id", "win", "lose"])


def _scores(totals):
    return pd.DataFrame(
        [(p, i, t) for p, values in enumerate(totals) for i, t in enumerate(values)],
        columns=["prompt_id", "sample_idx", "total"],
    )


def test_agreement_measures():
    ref = (_scores([[1, 2, 3], [3, 2, 1]]), _pairs([(0, 2, 0), (0, 1, 0), (1, 0, 2)]))
    assert agreement(ref, ref) == {"jaccard": 1.0, "kept": 1.0, "spearman": 1.0}
    # One pair flipped (same unordered pair, other winner), one lost, one new.
    other = (_scores([[1, 3, 2], [3, 2, 1]]), _pairs([(0, 0, 2), (1, 0, 2), (1, 0, 1)]))
    got = agreement(ref, other)
    assert got["jaccard"] == pytest.approx(2 / 4)  # {0:(0,2)}, {1:(0,2)} of 4 unordered pairs
    assert got["kept"] == pytest.approx(1 / 3)  # only (1, 0, 2) keeps its winner
    assert got["spearman"] == pytest.approx(
        pd.Series([1, 2, 3, 3, 2, 1]).corr(pd.Series([1, 3, 2, 3, 2, 1]), "spearman")
    )
    nothing = (_scores([[1, 2, 3], [3, 2, 1]]), _pairs([]))
    assert agreement(nothing, nothing)["jaccard"] == 1.0


def test_recommend_takes_the_cheapest_setting_that_agrees():
    table = [
        Row(REFERENCE, 100, 1.0, 10, 1, 1, 1),
        Row("a", 40, 0.5, 10, 0.95, 0.97, 0.9),
        Row("b", 20, 0.2, 30, 0.5, 1.0, 0.9),  # selects far more pairs: kept 1, jaccard low
        Row("c", 30, 0.3, 10, 0.92, 0.91, 0.9),
    ]
    assert recommend(table, 0.9).setting == "c"
    assert recommend(table, 0.95).setting == "a"
    assert recommend(table, 0.99) is None


def test_parse_setting():
    assert parse_setting("scheduler=unipc,num_inference_steps=12") == [
        "generate.scheduler=unipc",
        "generate.num_inference_steps=12",
    ]
    assert parse_setting(
        "generate.scheduler=dpmpp_2m,scheduler_options={use_karras_sigmas: true, solver_order: 2}"
    ) == [
        "generate.scheduler=dpmpp_2m",
        "generate.scheduler_options={use_karras_sigmas: true, solver_order: 2}",
    ]


def test_calibrate_command_on_the_tiny_model(models, tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "table.json"
    common = [
        str(SDXL),
        f"output_dir={tmp_path / 'run'}",
        f"model.path={models / 'sdxl'}",
        "generate.num_candidates=4",
        "--prompts",
        "3",
        "--reference-steps",
        "4",
    ]
    status = main(
        [
            "calibrate",
            *common,
            "--setting",
            "num_inference_steps=4",
            "--setting",
            "scheduler=dpmpp_2m,num_inference_steps=2,batch_size=8",
            "--agreement",
            "0.5",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    printed = capsys.readouterr().out
    assert "jaccard" in printed and "recommended:" in printed
    data = json.loads(out.read_text())
    rows = {r["setting"]: r for r in data["rows"]}
    reference, same, cheap = (
        rows[REFERENCE],
        rows["num_inference_steps=4"],
        rows["scheduler=dpmpp_2m,num_inference_steps=2,batch_size=8"],
    )
    assert reference["pairs"] > 0  # agreement below is about real pairs
    # The candidate setting that equals the reference agrees with it completely.
    assert (same["jaccard"], same["kept"], same["spearman"], same["pairs"]) == (
        1.0,
        1.0,
        1.0,
        reference["pairs"],
    )
    assert (reference["denoiser_calls"], same["denoiser_calls"], cheap["denoiser_calls"]) == (8.0, 8.0, 4.0)
    # The denoiser's work per candidate: the same sampler does the same MACs, half the steps half of them.
    assert reference["gmacs"] > 0 and same["gmacs"] == reference["gmacs"]
    assert cheap["gmacs"] == pytest.approx(reference["gmacs"] / 2, rel=1e-9)
    assert same["block_work"] and set(same["block_work"].values()) == {1.0}
    assert "GMAC/cand" in printed and "work that ran per block" not in printed  # no cache: nothing skipped
    agreeing = [r for r in data["rows"] if r["setting"] != REFERENCE and r["agreement"] >= 0.5]
    assert data["recommended"] == min(agreeing, key=lambda r: (r["denoiser_calls"], r["seconds"]))["setting"]
    assert not (tmp_path / "run").exists()  # calibrate writes nothing into the run directory

    status = main(["calibrate", *common, "--setting", "scheduler=dpm"])
    assert status == 2
    assert "generate.scheduler='dpm'" in capsys.readouterr().err


def test_the_table_shows_where_a_setting_skips_work():
    from mpo.calibrate import format_table

    table = [
        Row(REFERENCE, 100, 1.0, 10, 1, 1, 1, gmacs=8.0, block_work={"b.0": 1.0, "b.1": 1.0, "rest": 1.0}),
        Row("steps=25", 50, 0.5, 10, 1, 1, 1, gmacs=4.0, block_work={"b.0": 0.5, "b.1": 0.5, "rest": 0.5}),
        Row("cache=pab", 100, 0.7, 10, 1, 1, 1, gmacs=6.0, block_work={"b.0": 1.0, "b.1": 0.5, "rest": 1.0}),
    ]
    text = format_table(table, 0.9)
    assert "work that ran per block" in text
    assert "  cache=pab: b0 100 b1 50 rest 100" in text
    assert "steps=25:" not in text  # fewer steps run every block less, evenly: nothing skipped
