"""`reward score | fit | eval` from the command line, on answers files, media files and pairs."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from reward.checklist import load_checklist
from reward.cli import main
from reward.model import ChecklistScorer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _answers_row(checklist, rng: np.random.Generator, rid: str, by: str = "id") -> dict:
    answers = {}
    for i, q in enumerate(checklist.questions):
        key = {"id": q.id, "index": str(i), "text": q.text}[by]
        answers[key] = bool(rng.random() < 0.5) if i % 2 else float(rng.random())
    row = {"id": rid, "prompt": "a red bus", "answers": answers}
    if checklist.alignment_question:
        row["alignment"] = float(rng.random())
    return row


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


@pytest.mark.parametrize("key_style", ["id", "index", "text"])
def test_score_answers_file_matches_scorer(tmp_path, key_style):
    checklist = load_checklist("image-official")
    rng = np.random.default_rng(0)
    rows = [_answers_row(checklist, rng, f"s{i}", by=key_style) for i in range(6)]
    src = _write_jsonl(tmp_path / "answers.jsonl", rows)
    out = tmp_path / "scores.parquet"
    assert main(["score", "--checklist", "image-official", "--answers", str(src), "--out", str(out)]) == 0
    frame = pd.read_parquet(out)
    assert list(frame["id"]) == [f"s{i}" for i in range(6)]
    assert {f"dim.{d}" for d in checklist.dimensions} <= set(frame.columns)
    assert {f"sub.{s}" for s in checklist.sub_dimensions} <= set(frame.columns)
    # recompute independently of the CLI's parsing (answers were written in checklist order)
    p = torch.tensor([[float(v) for v in r["answers"].values()] for r in rows], dtype=torch.float64)
    expected = ChecklistScorer(checklist)(
        p, torch.tensor([r["alignment"] for r in rows], dtype=torch.float64)
    )
    np.testing.assert_allclose(frame["total"].to_numpy(), expected.total.numpy(), atol=1e-12)


def test_score_answers_with_prompt_filled_video_questions(tmp_path):
    checklist = load_checklist("video-official")
    rng = np.random.default_rng(1)
    row = _answers_row(checklist, rng, "v0")
    row["answers"] = {
        q.render("a cat surfing"): v for q, v in zip(checklist.questions, row["answers"].values())
    }
    row["prompt"] = "a cat surfing"
    src = _write_jsonl(tmp_path / "a.jsonl", [row])
    out = tmp_path / "s.jsonl"
    assert main(["score", "--checklist", "video-official", "--answers", str(src), "--out", str(out)]) == 0
    assert len(pd.read_json(out, lines=True)) == 1


def test_missing_and_unknown_questions_name_row_and_question(tmp_path, capsys):
    checklist = load_checklist("image-official")
    rng = np.random.default_rng(2)
    rows = [_answers_row(checklist, rng, "ok"), _answers_row(checklist, rng, "broken")]
    del rows[1]["answers"]["very_clear"]
    src = _write_jsonl(tmp_path / "a.jsonl", rows)
    score_answers = [
        "score",
        "--checklist",
        "image-official",
        "--answers",
        str(src),
        "--out",
        str(tmp_path / "o.parquet"),
    ]
    assert main(score_answers) == 2
    err = capsys.readouterr().err
    assert "row 1 (id broken)" in err and "very_clear" in err
    rows[1]["answers"]["very_clear"] = True
    rows[1]["answers"]["Is the image pretty?"] = True
    _write_jsonl(src, rows)
    assert main(score_answers) == 2
    assert "unknown question 'Is the image pretty?'" in capsys.readouterr().err
    assert not (tmp_path / "o.parquet").exists()


def test_explicit_null_is_unknown_not_no(tmp_path):
    checklist = load_checklist("image-full")
    rng = np.random.default_rng(3)
    row = _answers_row(checklist, rng, "x")
    row["answers"]["colors_bright"] = None
    src = _write_jsonl(tmp_path / "a.jsonl", [row])
    out = tmp_path / "o.parquet"
    assert main(["score", "--checklist", "image-full", "--answers", str(src), "--out", str(out)]) == 0
    frame = pd.read_parquet(out)
    assert math.isnan(frame["q.colors_bright"][0])
    assert not math.isnan(frame["sub.color_brightness"][0])  # the other brightness question still counts


def test_score_media_with_pixel_stats_skips_corrupt_files(tmp_path, capsys):
    media = tmp_path / "media"
    shutil.copytree(EXAMPLES, media)
    (media / "corrupt.png").write_bytes(b"not a png")
    prompts = json.loads((media / "prompts.json").read_text())
    (media / "prompts.json").write_text(json.dumps({**prompts, "corrupt.png": "anything"}))
    images = sorted(str(p) for p in media.glob("*.png"))
    out = tmp_path / "scores.parquet"
    code = main(
        ["score", "--checklist", "image-full", "--backend", "pixel-stats", "--images", *images,
         "--prompts", str(media / "prompts.json"), "--out", str(out), "--batch-size", "2"]
    )  # fmt: skip
    assert code == 0
    captured = capsys.readouterr()
    assert "corrupt.png" in captured.err
    frame = pd.read_parquet(out).set_index("id")
    assert len(frame) == len(images) - 1
    bright = frame.loc[str(media / "bright_beach.png"), "sub.color_brightness"]
    dark = frame.loc[str(media / "dark_cave.png"), "sub.color_brightness"]
    assert bright > dark
    assert frame["source"].str.startswith("pixel-stats").all()


def test_score_videos_with_pixel_stats(tmp_path):
    videos = [str(EXAMPLES / "moving_ball.mp4"), str(EXAMPLES / "static_ball.mp4")]
    out = tmp_path / "v.parquet"
    assert main(["score", "--checklist", "video-full", "--backend", "pixel-stats", "--videos", *videos,
                 "--prompts", str(EXAMPLES / "prompts.json"), "--out", str(out)]) == 0  # fmt: skip
    frame = pd.read_parquet(out).set_index("id")
    assert (
        frame.loc[videos[0], "sub.object_motion_dynamic"] > frame.loc[videos[1], "sub.object_motion_dynamic"]
    )


def _pairs_from_weights(checklist, true_w: np.ndarray, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    scorer = ChecklistScorer(checklist)
    rows = []
    for _ in range(n):
        a = _answers_row(checklist, rng, "a")
        b = _answers_row(checklist, rng, "b")
        a["answers"] = {k: bool(rng.random() < 0.5) for k in a["answers"]}
        b["answers"] = {k: bool(rng.random() < 0.5) for k in b["answers"]}
        fa, fb = (
            scorer.features(
                torch.tensor([[float(v) for v in r["answers"].values()]]),
                torch.tensor([r["alignment"]]) if "alignment" in r else None,
            )
            for r in (a, b)
        )
        margin = float(((fa - fb).nan_to_num(0.0).numpy() @ true_w)[0])
        rows.append({"a": a, "b": b, "label": int(rng.random() < 1 / (1 + math.exp(-margin)))})
    return rows


SOFT_GATED = """\
name: soft-gated
modality: video
scoring: {answers: soft, gates: soft}
dimensions:
  - {name: quality, sub_dimensions: [clarity, color]}
  - {name: fidelity, sub_dimensions: [letters, motion]}
questions:
  - {id: clear, text: "Is it clear?", sub_dimension: clarity}
  - {id: very_clear, text: "Is it very clear?", sub_dimension: clarity}
  - {id: colorful, text: "Is it colorful?", sub_dimension: color}
  - {id: letters_present, text: "Are there any letters present?", sub_dimension: letters, presence: true}
  - {id: letters_correct, text: "Are all the letters correct?", sub_dimension: letters, gate: letters_present}
  - {id: letters_ok, text: "Do the letters have no obvious errors?", sub_dimension: letters, gate: letters_present}
  - {id: smooth, text: "Is the motion smooth?", sub_dimension: motion}
"""


@pytest.mark.parametrize("name", ["image-official", "soft-gated"])  # signed answers; soft with a gate
def test_fit_then_eval_round_trip(tmp_path, capsys, name):
    if name == "soft-gated":
        (tmp_path / "soft-gated.yaml").write_text(SOFT_GATED)
        name = str(tmp_path / "soft-gated.yaml")
    checklist = load_checklist(name)
    true_w = np.where(np.arange(len(checklist.features)) % 3 == 0, 0.0, 1.5)
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", _pairs_from_weights(checklist, true_w, 600, seed=4))
    weights = tmp_path / "weights.json"
    assert main(["fit", "--checklist", name, "--pairs", str(pairs), "--out", str(weights)]) == 0
    fitted = load_checklist(name, weights=weights)
    assert (fitted.weights >= 0).all()
    assert np.corrcoef(fitted.weights, true_w)[0, 1] > 0.8
    capsys.readouterr()
    assert main(["eval", "--pairs", str(pairs), "--weights", str(weights)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pairs"] == 600
    assert 0.6 < report["accuracy_without_ties"] <= 1.0
    assert -1.0 <= report["tau_with_ties"] <= 1.0


def test_answers_named_by_the_releases_wording_are_read_as_aliases(tmp_path):
    """The release's full video list words three questions differently from the paper's tables."""
    checklist = load_checklist("video-full")
    rng = np.random.default_rng(5)
    row = _answers_row(checklist, rng, "v", by="text")
    renamed = {
        "Are the details refined?": "Are the details relatively refined?",
        "Is the smoothness of the object's movement good?": "Is the smoothness of the object's movement very good?",
        "Is the camera stable?": "Is the camera very stable?",
    }
    release_row = {**row, "answers": {renamed.get(k, k): v for k, v in row["answers"].items()}}
    out = {}
    for name, r in (("paper", row), ("release", release_row)):
        src = _write_jsonl(tmp_path / f"{name}.jsonl", [r])
        out[name] = tmp_path / f"{name}.parquet"
        assert (
            main(["score", "--checklist", "video-full", "--answers", str(src), "--out", str(out[name])]) == 0
        )
    frames = {k: pd.read_parquet(v).drop(columns="source") for k, v in out.items()}
    pd.testing.assert_frame_equal(frames["paper"], frames["release"])


def _one_line_error(capsys, argv: list[str], *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)


def test_cli_errors_are_one_line_naming_the_file(tmp_path, capsys):
    image = str(EXAMPLES / "dark_cave.png")
    out = str(tmp_path / "o.parquet")
    missing = str(tmp_path / "missing.txt")
    _one_line_error(
        capsys,
        ["score", "--checklist", "image-full", "--images", image, "--prompts", missing, "--out", out],
        missing, "--prompts",
    )  # fmt: skip
    _one_line_error(
        capsys,
        ["score", "--checklist", "image-full", "--images", image, "--out", str(tmp_path / "o.txt")],
        "o.txt",
    )
    _one_line_error(capsys, ["score", "--checklist", "image-full", "--backend", "vlm", "--images", image,
                             "--out", out], "--model")  # fmt: skip
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", _pairs_from_weights(load_checklist("image-official"),
                                                                     np.ones(28), 4, seed=0))  # fmt: skip
    _one_line_error(capsys, ["eval", "--pairs", str(pairs), "--weights", missing], missing, "--weights")
    _one_line_error(capsys, ["eval", "--pairs", str(tmp_path / "nope.jsonl"), "--weights",
                             "image-full.release-weights"], "nope.jsonl")  # fmt: skip
    assert not Path(out).exists()


def test_fit_and_eval_with_a_checklist_given_as_a_yaml_path(tmp_path, capsys):
    custom = tmp_path / "my-list.yaml"
    custom.write_text(SOFT_GATED.replace("name: soft-gated", "name: my-list"))
    checklist = load_checklist(custom)
    weights_true = np.ones(len(checklist.features))
    pairs = _write_jsonl(tmp_path / "pairs.jsonl", _pairs_from_weights(checklist, weights_true, 80, seed=1))
    weights = tmp_path / "w.json"
    assert main(["fit", "--checklist", str(custom), "--pairs", str(pairs), "--out", str(weights)]) == 0
    capsys.readouterr()
    for extra in ([], ["--checklist", str(custom)]):
        assert main(["eval", "--pairs", str(pairs), "--weights", str(weights), *extra]) == 0
        assert json.loads(capsys.readouterr().out)["pairs"] == 80


def test_every_reward_input_error_is_the_one_the_cli_ends_with_exit_2():
    """The reward's bad-input errors derive from the one base the CLIs catch (exit 2, one line): no
    class of the package derives from ValueError itself but that base, so none reaches the user as
    a traceback."""
    import ast

    from reward.backends import BackendError
    from reward.checklist import ChecklistError
    from reward.errors import RewardInputError
    from reward.media import MediaError

    package = Path(__file__).resolve().parents[1] / "reward"
    direct = sorted(
        f"{path.relative_to(package)}:{node.name}"
        for path in package.rglob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and any(getattr(b, "id", None) == "ValueError" for b in node.bases)
    )
    assert direct == ["errors.py:RewardInputError"]
    assert all(issubclass(e, RewardInputError) for e in (BackendError, ChecklistError, MediaError))


def test_fit_and_eval_refuse_pairs_that_are_all_ties(tmp_path, capsys):
    checklist = load_checklist("image-full")
    rows = _pairs_from_weights(checklist, np.ones(len(checklist.features)), 8, seed=1)
    for row in rows:
        row["label"] = 0.5
    pairs = _write_jsonl(tmp_path / "ties.jsonl", rows)
    weights = tmp_path / "weights.json"
    assert main(["fit", "--checklist", "image-full", "--pairs", str(pairs), "--out", str(weights)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(pairs) in err and "ties" in err
    assert not weights.exists()
    assert main(["eval", "--pairs", str(pairs), "--weights", "image-full.release-weights"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(pairs) in err


def test_a_training_stop_is_one_line_and_status_1(monkeypatch, capsys):
    import reward.cli as cli
    from reward.train import TrainingError

    def stop(_args):
        raise TrainingError("loss is not finite at step 3 (samples a, b)")

    monkeypatch.setattr(cli, "cmd_checklists", stop)
    assert main(["checklists"]) == 1
    assert capsys.readouterr().err.strip() == "error: loss is not finite at step 3 (samples a, b)"
