"""How well a VLM answers the checklist: against human answers, and against a teacher.

::

    reward eval-answers --checklist image-full --annotations held_out.jsonl --model runs/my-reward/model \
        --out report.json
    reward eval-answers --checklist image-official --teacher teacher_scores.parquet --scores student.parquet \
        --pairs held_out_pairs.jsonl --fit-pairs train_pairs.jsonl --out report.json

- Against annotations: per question, the accuracy of the hard answer (p >= 0.5) and the balanced
  accuracy (mean of the yes and no recalls: a model answering "yes" to a question that is mostly yes
  gets 0.5, not the majority rate); overall, the accuracy over every row and the mean of the balanced
  accuracies.
- Against a teacher (distillation): agreement of the hard answers, and mean |p_student - p_teacher|,
  per question and overall.
- Preference accuracy on held-out pairs (the paper's Table 2 columns: accuracy without ties, accuracy
  and tau with ties), for the student's and the teacher's answers side by side, each scored with
  weights: the checklist's (or ``--weights``), or weights fitted by Algorithm 1 on ``--fit-pairs``
  separately for each (a student whose answers differ can still rank well with its own weights).

Answers come from a scores table (``reward score`` output: ``id``, ``q.<question id>``, ``alignment``)
or from a model run here on the annotated media. A pairs file holds rows ``{"a": id, "b": id, "label":
1 | 0 | 0.5}`` whose ids are the samples' ids (media paths; file names or stems also match).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reward.checklist import Checklist


# ---- agreement ------------------------------------------------------------------------------------
def agreement(
    p: Sequence[float], target: Sequence[float], question: Sequence[int], checklist: Checklist
) -> dict[str, Any]:
    """Rows of (student p(yes), target p(yes), question index) -> per-question and overall agreement.

    Targets of 0 / 1 are human answers; other values are a teacher's probabilities (their hard answer
    is target >= 0.5). NaN predictions (a backend that cannot judge) are left out and counted.
    """
    p_arr = np.asarray(p, dtype=np.float64)
    t_arr = np.asarray(target, dtype=np.float64)
    q_arr = np.asarray(question, dtype=np.int64)
    known = ~np.isnan(p_arr)
    per_question: dict[str, dict[str, float]] = {}
    balanced = []
    for qi in sorted(set(q_arr.tolist())):
        sel = (q_arr == qi) & known
        if not sel.any():
            continue
        pq, tq = p_arr[sel], t_arr[sel]
        right = (pq >= 0.5) == (tq >= 0.5)
        recalls = [float(right[side].mean()) for side in ((tq >= 0.5), (tq < 0.5)) if side.any()]
        bal = float(np.mean(recalls))
        balanced.append(bal)
        per_question[checklist.questions[qi].id] = {
            "rows": int(sel.sum()),
            "accuracy": float(right.mean()),
            "balanced_accuracy": bal,
            "mean_abs_dp": float(np.abs(pq - tq).mean()),
            "yes_rate_target": float((tq >= 0.5).mean()),
        }
    rows = int(known.sum())
    right_all = (p_arr[known] >= 0.5) == (t_arr[known] >= 0.5)
    return {
        "rows": rows,
        "unanswered_rows": int((~known).sum()),
        "accuracy": float(right_all.mean()) if rows else math.nan,
        "balanced_accuracy": float(np.mean(balanced)) if balanced else math.nan,
        "mean_abs_dp": float(np.abs(p_arr[known] - t_arr[known]).mean()) if rows else math.nan,
        "per_question": per_question,
    }


def format_table(title: str, result: dict[str, Any]) -> str:
    """A fixed-width text table of :func:`agreement`'s result."""
    lines = [title, f"{'question':40s} {'rows':>6s} {'acc':>6s} {'bal.acc':>7s} {'|dp|':>6s}"]
    for qid, m in result["per_question"].items():
        lines.append(
            f"{qid[:40]:40s} {m['rows']:6d} {m['accuracy']:6.3f} {m['balanced_accuracy']:7.3f} "
            f"{m['mean_abs_dp']:6.3f}"
        )
    lines.append(
        f"{'overall':40s} {result['rows']:6d} {result['accuracy']:6.3f} {result['balanced_accuracy']:7.3f} "
        f"{result['mean_abs_dp']:6.3f}"
    )
    return "\n".join(lines)


# ---- answer tables ---------------------------------------------------------------------------------
class AnswerTable:
    """p(yes) per sample id for every checklist question (NaN: not answered), plus alignment."""

    def __init__(self, checklist: Checklist, ids: list[str], p_yes: np.ndarray, alignment: np.ndarray | None):
        self.checklist, self.ids, self.p_yes, self.alignment = checklist, ids, p_yes, alignment
        self._index = _id_index(ids)

    @classmethod
    def from_scores(cls, path: str | Path, checklist: Checklist) -> AnswerTable:
        from reward.answers import read_table
        from reward.train_data import DataError

        table = read_table(path, DataError)
        if not table:
            raise DataError(f"{path}: no rows")
        q_ids = checklist.question_ids
        columns = [c for c in table[0][1] if str(c).startswith("q.")]
        unknown = [c for c in columns if c[2:] not in q_ids]
        if unknown or not columns:
            raise DataError(
                f"{path}: question columns {unknown[:5] or 'missing'} do not fit checklist {checklist.name!r}"
            )
        ids, rows, align = [], [], []
        for where, row in table:
            if "id" not in row:
                raise DataError(f"{where}: no 'id' column")
            ids.append(str(row["id"]))
            rows.append([_float(row.get(f"q.{q}")) for q in q_ids])
            align.append(_float(row.get("alignment")))
        alignment = np.asarray(align) if checklist.alignment_question else None
        return cls(checklist, ids, np.asarray(rows, dtype=np.float64), alignment)

    def row(self, key: str) -> int | None:
        return _lookup(self._index, key)

    def totals(self, weights: np.ndarray, rows: Sequence[int]) -> np.ndarray:
        """Weighted total per row with the given feature weights (unknown features count 0)."""
        from reward.model import ChecklistScorer

        scorer = ChecklistScorer(self.checklist)
        p = torch.as_tensor(self.p_yes[list(rows)])
        a = None if self.alignment is None else torch.as_tensor(self.alignment[list(rows)])
        features = scorer.features(p, a).nan_to_num(0.0).numpy()
        return features @ weights, features


def _float(value: Any) -> float:
    try:
        return float(value) if value is not None else math.nan
    except (TypeError, ValueError):
        return math.nan


def _id_index(ids: Sequence[str]) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, key in enumerate(ids):
        for alias in (key, Path(key).name, Path(key).stem):
            index.setdefault(alias, i)
    return index


def _lookup(index: dict[str, int], key: str) -> int | None:
    for alias in (key, Path(key).name, Path(key).stem):
        if alias in index:
            return index[alias]
    return None


# ---- preference accuracy -------------------------------------------------------------------------
def read_id_pairs(path: str | Path) -> list[tuple[str, str, str, float]]:
    """(where, a id, b id, label) per row of a pairs file over sample ids."""
    from reward.answers import pair_label, read_table
    from reward.train_data import DataError

    out = []
    for where, row in read_table(path, DataError):
        if not all(k in row for k in ("a", "b", "label")):
            raise DataError(f"{where}: needs 'a', 'b' (sample ids) and 'label'")
        out.append((where, str(row["a"]), str(row["b"]), pair_label(row["label"], where, DataError)))
    if not out:
        raise DataError(f"{path}: no pairs")
    return out


def _pair_rows(table: AnswerTable, pairs: list[tuple[str, str, str, float]], name: str):
    from reward.train_data import DataError

    a_rows, b_rows, labels = [], [], []
    for where, a, b, label in pairs:
        ra, rb = table.row(a), table.row(b)
        if ra is None or rb is None:
            raise DataError(f"{where}: sample {a if ra is None else b!r} has no answers from the {name}")
        a_rows.append(ra)
        b_rows.append(rb)
        labels.append(label)
    return a_rows, b_rows, np.asarray(labels)


def preference_report(
    tables: dict[str, AnswerTable],
    pairs: list[tuple[str, str, str, float]],
    weights: np.ndarray,
    fit_pairs: list[tuple[str, str, str, float]] | None = None,
) -> dict[str, Any]:
    """Table 2 columns for each answer source on the held-out ``pairs``."""
    from reward.fit import fit_masked_logistic
    from reward.metrics import preference_accuracy, tau_with_ties

    report: dict[str, Any] = {}
    for name, table in tables.items():
        w = weights
        if fit_pairs is not None:
            fa, fb, fy = _pair_rows(table, fit_pairs, name)
            _, xa = table.totals(weights, fa)
            _, xb = table.totals(weights, fb)
            w = fit_masked_logistic(xa - xb, fy).weights
        a_rows, b_rows, y = _pair_rows(table, pairs, name)
        sa, _ = table.totals(w, a_rows)
        sb, _ = table.totals(w, b_rows)
        entry: dict[str, Any] = {"pairs": len(y), "weights": "fitted (Algorithm 1)" if fit_pairs else "given"}
        if (y != 0.5).any():
            entry["accuracy_without_ties"] = preference_accuracy(sa, sb, y, ties="drop").accuracy
        entry["accuracy_with_ties"] = preference_accuracy(sa, sb, y, ties="calibrate").accuracy
        entry["tau_with_ties"] = tau_with_ties(sa, sb, y).tau
        report[name] = entry
    return report


# ---- the command ---------------------------------------------------------------------------------
def score_samples(
    checklist: Checklist, backend: Any, refs: Sequence[Any], max_frames: int, batch: int
) -> AnswerTable:
    """Every checklist question (and the alignment term) asked of every sample by ``backend``."""
    from reward.train_data import load_sample
    from reward.visionreward import VisionReward

    reward = VisionReward(checklist, backend, batch_size=batch)
    ids, p_parts, a_parts = [], [], []
    for start in range(0, len(refs), batch):
        chunk = refs[start : start + batch]
        scores = reward.score([load_sample(ref, max_frames) for ref in chunk])
        ids += [str(ref.media) for ref in chunk]
        p_parts.append(scores.p_yes.numpy())
        if scores.alignment is not None:
            a_parts.append(scores.alignment.numpy())
    alignment = np.concatenate(a_parts) if a_parts else None
    return AnswerTable(checklist, ids, np.concatenate(p_parts), alignment)


def compare(table: AnswerTable, data: Any, name: str) -> dict[str, Any]:
    """:func:`agreement` of the table's answers with the targets of ``data`` (a QAData)."""
    from reward.train_data import DataError

    p, target, question = [], [], []
    for row in data.rows:
        ref = data.samples[row.sample]
        index = table.row(str(ref.media))
        if index is None:
            raise DataError(f"{row.where}: {ref.media} has no answers in the {name}'s table")
        p.append(float(table.p_yes[index, row.question]))
        target.append(row.target)
        question.append(row.question)
    return agreement(p, target, question, data.checklist)


def evaluate_answers(
    checklist: Checklist,
    *,
    student: AnswerTable | None = None,
    student_model: Any = None,
    annotations: Sequence[str] = (),
    teacher: str | None = None,
    pairs: str | None = None,
    fit_pairs: str | None = None,
    media_root: str | None = None,
    max_frames: int = 24,
    batch_size: int = 8,
) -> dict[str, Any]:
    """What ``reward eval-answers`` reports (module docstring), as a dict."""
    from reward.train_data import DataError, read_annotations, read_teacher_scores

    human = read_annotations(list(annotations), checklist, media_root) if annotations else None
    taught = read_teacher_scores(teacher, checklist, media_root) if teacher else None
    if human is None and taught is None:
        raise DataError("give --annotations (human answers) and/or --teacher (a teacher's scores)")
    if student is None:
        refs, seen = [], set()
        for data in (human, taught):
            for ref in data.samples if data is not None else []:
                if str(ref.media) not in seen:
                    seen.add(str(ref.media))
                    refs.append(ref)
        student = score_samples(checklist, student_model, refs, max_frames, batch_size)
    report: dict[str, Any] = {"checklist": checklist.name}
    if human is not None:
        report["annotations"] = compare(student, human, "student")
    teacher_table = AnswerTable.from_scores(teacher, checklist) if teacher else None
    if taught is not None:
        report["teacher"] = compare(student, taught, "student")
    if pairs:
        tables = {"student": student} | ({"teacher": teacher_table} if teacher_table is not None else {})
        report["preference"] = preference_report(
            tables, read_id_pairs(pairs), checklist.weights, read_id_pairs(fit_pairs) if fit_pairs else None
        )
    return report


def report_text(report: dict[str, Any]) -> str:
    parts = []
    if "annotations" in report:
        parts.append(format_table("against the annotations", report["annotations"]))
    if "teacher" in report:
        parts.append(format_table("against the teacher", report["teacher"]))
    for name, entry in report.get("preference", {}).items():
        cols = ", ".join(f"{k} {v:.4f}" for k, v in entry.items() if isinstance(v, float))
        parts.append(f"preference ({name}, {entry['pairs']} pairs, {entry['weights']} weights): {cols}")
    return "\n\n".join(parts)
