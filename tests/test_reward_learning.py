"""The reward trainer learns: a tiny VLM goes from chance to >= 90% held-out accuracy on questions the
pixels decide, and a differently sized student distilled from a teacher's p(yes) answers like it."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from reward.backends.tiny_vlm import build_tiny_qwen2_vl
from reward.cli import main
from reward.synthetic import write_shapes
from reward.train import train_stage
from reward.train_config import load_train_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY_QA = ROOT / "recipes" / "reward" / "tiny_qa.yaml"


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    torch.set_num_threads(1)
    return write_shapes(tmp_path_factory.mktemp("shapes"), count=160)


def _curve(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]


@pytest.mark.slow  # ~20-40 s on 2 cores
def test_held_out_accuracy_goes_from_chance_to_above_90_percent(shapes, tmp_path):
    run = tmp_path / "qa"
    recipe = load_train_recipe(
        TINY_QA,
        [
            f"output_dir={run}",
            f"model.path={tmp_path / 'tiny'}",  # built here on first use (model.tiny)
            f"data.checklist={shapes['checklist']}",
            f"data.annotations=[{shapes['annotations']}]",
            "model.finetune=full",
            "model.train_vision=true",
            "train.learning_rate=1e-3",
            "train.lr_schedule=constant",
            "train.warmup_steps=0",
            "train.max_steps=100",
            "train.checkpoint_every=0",
            "eval.every=0",
        ],
    )
    summary = train_stage(recipe)
    before, after = _curve(run)[0], _curve(run)[-1]
    assert before["step"] == 0 and after["step"] == 100 and before["rows"] == after["rows"] > 100
    # Chance before: each property is asked both ways round, so an untrained model that leans with
    # the pixels is right on one question of a pair and wrong on the other.
    assert 0.3 < before["accuracy"] < 0.7 and before["balanced_accuracy"] < 0.7
    per_question = json.loads((run / "eval_answers.json").read_text())["per_question"]
    assert set(per_question) == {"bright", "dark", "red_square", "blue_square"}
    assert after["accuracy"] >= 0.9 and all(m["accuracy"] >= 0.9 for m in per_question.values()), per_question
    assert summary["held-out accuracy"] == pytest.approx(after["accuracy"])

    # The export answers held-out images the same way through `reward eval-answers` (the scorer's path).
    split = pd.read_parquet(run / "split.parquet")
    held_out = set(split.loc[split["split"] == "val", "media"])
    rows = [json.loads(line) for line in shapes["annotations"].read_text().splitlines()]
    val_file = tmp_path / "held_out.jsonl"
    base = shapes["annotations"].parent
    val_file.write_text("\n".join(json.dumps(r) for r in rows if str(base / r["image"]) in held_out) + "\n")
    out = tmp_path / "report.json"
    command = ["eval-answers", "--checklist", str(shapes["checklist"]), "--annotations", str(val_file),
               "--media-root", str(base), "--model", str(run / "model"), "--dtype", "float32", "--device", "cpu",
               "--out", str(out)]  # fmt: skip
    assert main(command) == 0
    report = json.loads(out.read_text())["annotations"]
    assert report["rows"] == after["rows"]
    assert report["accuracy"] == pytest.approx(after["accuracy"])
    assert report["mean_abs_dp"] == pytest.approx(after["mean_abs_dp"], abs=1e-5)


def _resized_tiny(path: Path, hidden: int, layers: int) -> Path:
    """The tiny Qwen2-VL with another width and depth (same tokenizer and processors), random weights."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    build_tiny_qwen2_vl(path, seed=1)
    config = Qwen2VLConfig.from_pretrained(path)
    text = config.text_config
    text.hidden_size = config.vision_config.hidden_size = hidden
    text.num_attention_heads, text.num_key_value_heads = hidden // 16, max(1, hidden // 32)  # head_dim 16
    text.intermediate_size = 2 * hidden
    text.num_hidden_layers = layers
    text.layer_types = ["full_attention"] * layers
    torch.manual_seed(1)
    Qwen2VLForConditionalGeneration(config).save_pretrained(path)
    return path


@pytest.mark.slow  # ~30-50 s on 2 cores
def test_a_distilled_student_answers_like_its_teacher(shapes, tmp_path, monkeypatch):
    # The teacher: the pixel-statistics backend on the full image checklist (it answers 17 of its
    # questions, with soft p(yes); the rest are unknown and left out), through `reward score`. The
    # media paths are relative (data.media_root), so the held-out split, which hashes the paths as
    # written, is the same in every run wherever pytest puts its temporary folders.
    folder = shapes["images"]
    monkeypatch.chdir(folder)
    images = sorted(p.name for p in folder.glob("*.png"))
    teacher = tmp_path / "teacher.parquet"
    assert main(["score", "--checklist", "image-full", "--backend", "pixel-stats", "--images", *images,
                 "--out", str(teacher)]) == 0  # fmt: skip
    monkeypatch.chdir(tmp_path)
    student = _resized_tiny(tmp_path / "student", hidden=32, layers=3)  # the teacher-free tiny is 64 x 2
    run = tmp_path / "distill"
    recipe = load_train_recipe(
        TINY_QA,
        [
            f"output_dir={run}",
            f"model.path={student}",
            "data.checklist=image-full",
            f"data.teacher_scores={teacher}",
            f"data.media_root={folder}",
            "data.balance=none",
            "model.finetune=full",
            "model.train_vision=true",
            "train.learning_rate=1e-3",
            "train.lr_schedule=constant",
            "train.warmup_steps=0",
            "train.max_steps=80",
            "train.checkpoint_every=0",
        ],
    )
    train_stage(recipe, kind="distill")
    before, after = _curve(run)[0], _curve(run)[-1]
    # A baseline that ignores the image: each question's mean teacher p(yes) over the training samples.
    table = pd.read_parquet(teacher)
    split = pd.read_parquet(run / "split.parquet").set_index("media")["split"]
    side = table["id"].map(lambda name: str(folder / name)).map(split)
    assert side.notna().all()
    q = [c for c in table.columns if c.startswith("q.") and table[c].notna().all()]
    constant = (table.loc[side == "val", q] - table.loc[side == "train", q].mean()).abs().to_numpy().mean()
    assert before["mean_abs_dp"] > 0.25
    assert after["mean_abs_dp"] < 0.5 * before["mean_abs_dp"], (before, after)
    assert after["mean_abs_dp"] < 0.8 * constant, (
        f"student {after['mean_abs_dp']:.4f} vs image-blind {constant:.4f}"
    )
    assert after["accuracy"] > 0.85  # hard answers agree with the teacher's
