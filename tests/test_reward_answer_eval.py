"""`reward eval-answers`: answer accuracy against annotations, agreement with a teacher, and the
preference accuracy of (fitted) weights on held-out pairs, checked against numbers computed by hand."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reward.answer_eval import agreement
from reward.checklist import load_checklist
from reward.cli import main
from reward.metrics import preference_accuracy
from reward.synthetic import write_shapes


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> dict[str, Path]:
    return write_shapes(tmp_path_factory.mktemp("shapes"), count=8)


def test_agreement_per_question_and_overall(shapes):
    checklist = load_checklist(shapes["checklist"])  # questions: bright, dark, red_square, blue_square
    p = [0.9, 0.8, 0.2, 0.6, 0.4, float("nan"), 0.7]
    t = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.5]  # the last is a teacher's probability
    q = [0, 0, 0, 0, 1, 1, 2]
    result = agreement(p, t, q, checklist)
    bright = result["per_question"]["bright"]
    assert bright["rows"] == 4 and bright["accuracy"] == pytest.approx(
        0.5
    )  # right: 0.9, 0.8; wrong: 0.2, 0.6
    assert bright["balanced_accuracy"] == pytest.approx((2 / 3 + 0) / 2)  # yes recall 2/3, no recall 0
    assert bright["mean_abs_dp"] == pytest.approx((0.1 + 0.2 + 0.8 + 0.6) / 4)
    assert result["per_question"]["red_square"]["accuracy"] == 1.0  # 0.7 and 0.5 are both "yes"
    assert (
        result["rows"] == 6 and result["unanswered_rows"] == 1 and "blue_square" not in result["per_question"]
    )
    assert result["accuracy"] == pytest.approx(4 / 6)


def _scores(path: Path, ids: list[str], p: np.ndarray) -> Path:
    rows = [{"id": i, **{f"q.{q}": float(v) for q, v in zip(("bright", "dark", "red_square", "blue_square"), r)}}
            for i, r in zip(ids, p)]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def test_eval_answers_reports_annotations_teacher_and_preference(shapes, tmp_path):
    checklist = load_checklist(shapes["checklist"])
    images = sorted(shapes["images"].glob("*.png"))
    ids = [str(p) for p in images]
    gen = np.random.default_rng(0)
    teacher_p = gen.uniform(size=(8, 4))
    student_p = np.clip(teacher_p + gen.normal(scale=0.2, size=(8, 4)), 0, 1)
    student = _scores(tmp_path / "student.parquet", [p.name for p in images], student_p)  # names match too
    teacher = _scores(tmp_path / "teacher.parquet", ids, teacher_p)
    pairs = tmp_path / "pairs.jsonl"
    pair_rows = [(0, 1, 1), (2, 3, 0), (4, 5, 1), (6, 7, 0.5), (1, 6, 0)]
    pairs.write_text(
        "\n".join(json.dumps({"a": ids[a], "b": ids[b], "label": y}) for a, b, y in pair_rows) + "\n"
    )
    out = tmp_path / "report.json"
    command = ["eval-answers", "--checklist", str(shapes["checklist"]), "--annotations", str(shapes["annotations"]),
               "--teacher", str(teacher), "--scores", str(student), "--pairs", str(pairs), "--out", str(out)]  # fmt: skip
    assert main(command) == 0
    report = json.loads(out.read_text())
    assert "against the teacher" in out.with_suffix(".txt").read_text()

    # against the annotations: every annotated row, read from the student's table
    rows = [json.loads(line) for line in shapes["annotations"].read_text().splitlines()]
    qid = {q.text: i for i, q in enumerate(checklist.questions)}
    name_row = {p.name: i for i, p in enumerate(images)}
    p = [student_p[name_row[Path(r["image"]).name], qid[r["question"]]] for r in rows]
    t = [1.0 if r["answer"] == "yes" else 0.0 for r in rows]
    assert report["annotations"]["rows"] == len(rows)
    assert report["annotations"]["accuracy"] == pytest.approx(
        np.mean([(a >= 0.5) == (b >= 0.5) for a, b in zip(p, t)])
    )
    # against the teacher: all 32 probabilities
    assert report["teacher"]["rows"] == 32
    assert report["teacher"]["mean_abs_dp"] == pytest.approx(np.abs(student_p - teacher_p).mean())
    # preference: equal weights (the checklist's), totals = row sums; ties dropped for the 'without' column
    w = checklist.weights
    for name, table in (("student", student_p), ("teacher", teacher_p)):
        a = np.array([table[i] @ w for i, _, _ in pair_rows])
        b = np.array([table[j] @ w for _, j, _ in pair_rows])
        y = np.array([y for *_, y in pair_rows], dtype=float)
        expected = preference_accuracy(a, b, y, ties="drop").accuracy
        assert report["preference"][name]["accuracy_without_ties"] == pytest.approx(expected)
        assert report["preference"][name]["pairs"] == 5

    # with --fit-pairs each side gets its own Algorithm 1 weights
    command += ["--fit-pairs", str(pairs)]
    assert main(command) == 0
    assert json.loads(out.read_text())["preference"]["student"]["weights"] == "fitted (Algorithm 1)"


def test_eval_answers_bad_input_exits_2(shapes, tmp_path, capsys):
    base = ["eval-answers", "--checklist", str(shapes["checklist"]), "--out", str(tmp_path / "r.json")]
    assert main([*base, "--annotations", str(shapes["annotations"])]) == 2
    assert "--model PATH" in capsys.readouterr().err
    student = _scores(tmp_path / "s.parquet", ["elsewhere.png"], np.full((1, 4), 0.5))
    assert main([*base, "--annotations", str(shapes["annotations"]), "--scores", str(student)]) == 2
    assert "has no answers in the student's table" in capsys.readouterr().err
