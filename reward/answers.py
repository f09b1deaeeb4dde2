"""Reading answers that someone already has (human annotations, another model's outputs).

An answers file is JSONL or parquet, one row per sample::

    {"id": "img-7", "prompt": "a red bus", "alignment": 0.83,
     "answers": {"0": true, "symmetrical": 0.71, "Is the image clear?": "yes", ...}}

Keys of ``answers`` may be a question's index, its id, or its text or one of its aliases (the template
with ``[[prompt]]`` or the text with the row's prompt filled in). Values are booleans, "yes"/"no", or probabilities of yes in
[0, 1]; an explicit ``null`` marks a question as deliberately unknown (left out of the sums). Every
question of the checklist must be present: a missing or unknown question is an error that names the
row and the question, so a typo never silently becomes a "no".

A pairs file (for ``reward fit`` / ``reward eval``) holds rows ``{"a": <answers row>, "b": <answers
row>, "label": 1 | 0 | 0.5}`` (1: a preferred, 0: b preferred, 0.5: tie; "a"/"b"/"tie" also accepted).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from reward.checklist import Checklist, ChecklistError
from reward.errors import RewardInputError


def read_table(
    path: str | Path, error: type[RewardInputError] = ChecklistError
) -> list[tuple[str, dict[str, Any]]]:
    """(where, row) for every row of a JSONL / JSON-list / parquet / CSV file; ``where`` is
    ``file:line`` for JSONL and ``file: row n`` otherwise. A file that cannot be read raises ``error``
    (the caller's kind: answers, training data) naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:  # pyarrow raises several types for a damaged file
            raise error(f"{path}: cannot read parquet ({err})") from err
        return [(f"{path}: row {i}", r) for i, r in enumerate(rows)]
    if suffix == ".csv":
        import pandas as pd

        rows = pd.read_csv(path).to_dict("records")
        return [(f"{path}: row {i}", r) for i, r in enumerate(rows)]
    text = path.read_text()
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise error(f"{path}: invalid JSON ({err})") from err
        return [(f"{path}: row {i}", r) for i, r in enumerate(rows)]
    out = []
    for line_no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{line_no}", json.loads(line)))
        except json.JSONDecodeError as err:
            raise error(f"{path}:{line_no}: invalid JSON ({err.msg})") from err
    return out


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """The rows of an answers file (:func:`read_table` without the locations)."""
    return [row for _, row in read_table(path)]


def _probability(value: Any, where: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, str):
        low = value.strip().lower()
        if low in ("yes", "y", "true"):
            return 1.0
        if low in ("no", "n", "false"):
            return 0.0
        raise ChecklistError(f"{where}: answer {value!r} is not yes/no/true/false or a probability")
    try:
        p = float(value)
    except (TypeError, ValueError) as err:
        raise ChecklistError(f"{where}: answer {value!r} is not a boolean or a probability") from err
    if not 0.0 <= p <= 1.0:
        raise ChecklistError(f"{where}: probability {p} outside [0, 1]")
    return p


def parse_answers_row(
    checklist: Checklist, row: dict[str, Any], where: str
) -> tuple[list[float], float | None]:
    """One row -> (p_yes per question in checklist order, alignment or None)."""
    answers = row.get("answers")
    if not isinstance(answers, dict):
        raise ChecklistError(f"{where}: needs an 'answers' mapping")
    prompt = str(row.get("prompt") or "")
    lookup: dict[str, int] = {}
    for i, q in enumerate(checklist.questions):
        for key in (str(i), *q.names(prompt)):
            lookup[key] = i
    p = [math.nan] * len(checklist.questions)
    seen = [False] * len(checklist.questions)
    for key, value in answers.items():
        idx = lookup.get(str(key))
        if idx is None:
            raise ChecklistError(f"{where}: unknown question {key!r} for checklist {checklist.name!r}")
        if seen[idx]:
            raise ChecklistError(f"{where}: question {checklist.questions[idx].id!r} answered twice")
        seen[idx] = True
        p[idx] = _probability(value, f"{where}: question {key!r}")
    missing = [checklist.questions[i].id for i, s in enumerate(seen) if not s]
    if missing:
        raise ChecklistError(
            f"{where}: missing answer(s) for question(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    alignment = None
    if checklist.alignment_question is not None:
        if "alignment" not in row:
            raise ChecklistError(
                f"{where}: checklist {checklist.name!r} has an alignment term: give 'alignment' (a probability, or null)"
            )
        alignment = _probability(row["alignment"], f"{where}: alignment")
    return p, alignment


def answers_to_tensors(
    checklist: Checklist, rows: list[dict[str, Any]], source: str
) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
    """Rows -> (ids, p_yes [N, Q], alignment [N] or None)."""
    ids, ps, aligns = [], [], []
    for n, row in enumerate(rows):
        rid = str(row.get("id", n))
        p, a = parse_answers_row(checklist, row, f"{source}: row {n} (id {rid})")
        ids.append(rid)
        ps.append(p)
        aligns.append(math.nan if a is None else a)
    p_yes = torch.tensor(ps, dtype=torch.float64).reshape(len(rows), len(checklist.questions))
    alignment = torch.tensor(aligns, dtype=torch.float64) if checklist.alignment_question else None
    return ids, p_yes, alignment


_LABELS = {"a": 1.0, "b": 0.0, "tie": 0.5}


def pair_label(value: Any, where: str, error: type[RewardInputError] = ChecklistError) -> float:
    """A pair's preference label: 1 (a better), 0 (b better), 0.5 (a tie); "a" / "b" / "tie" too."""
    label = _LABELS.get(value, value) if isinstance(value, str) else value
    if label not in (0, 1, 0.5):
        raise error(f"{where}: label {value!r} is not 1 (a better), 0 (b better) or 0.5 (tie)")
    return float(label)


def read_pairs(checklist: Checklist, path: str | Path):
    """Pairs file -> (p_a [N,Q], align_a, p_b [N,Q], align_b, labels [N])."""
    rows = read_rows(path)
    if not rows:
        raise ChecklistError(f"{path}: no pairs")
    a_rows, b_rows, labels = [], [], []
    for n, row in enumerate(rows):
        where = f"{path}: pair {n}"
        if "a" not in row or "b" not in row or "label" not in row:
            raise ChecklistError(f"{where}: needs 'a', 'b' and 'label'")
        labels.append(pair_label(row["label"], where))
        a_rows.append(row["a"])
        b_rows.append(row["b"])
    _, p_a, al_a = answers_to_tensors(checklist, a_rows, f"{path} (side a)")
    _, p_b, al_b = answers_to_tensors(checklist, b_rows, f"{path} (side b)")
    return p_a, al_a, p_b, al_b, torch.tensor(labels, dtype=torch.float64)
