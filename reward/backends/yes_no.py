"""Asking a language model yes / no questions: what every model backend and the reward trainer share.

- Answer spellings. "yes" and "no" have several spellings in a vocabulary ("yes", "Yes", " yes", ...);
  every spelling that is a single token is a candidate (:func:`answer_token_ids`).
- The read-out. Each side's candidate logits are pooled, ``max`` (the best spelling: ``p >= 0.5`` is
  then exactly "greedy decoding restricted to the candidates starts with a yes") or ``logsumexp`` (the
  total chance of that answer in any spelling), and p(yes) = sigmoid(yes - no) = softmax([yes, no])[0]
  (:func:`pool_answer_logits`, :func:`p_yes_of`). The scorers read p(yes) this way and the trainer's
  ``binary`` loss trains exactly that number.
- A batch's question lists: one per sample, all of the same length (:func:`check_question_lists`).
- A sample's question rows share a token prefix (system turn, visual tokens, the text before the
  question): :func:`shared_prefix_length` is how much of it the fast paths run once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch

from reward.types import Sample

YES_SPELLINGS = ("yes", "Yes", "YES", " yes", " Yes", " YES")
NO_SPELLINGS = ("no", "No", "NO", " no", " No", " NO")
AnswerReduce = Literal["max", "logsumexp"]


def answer_token_ids(tokenizer: Any, spellings: Sequence[str]) -> list[int]:
    """Ids of the spellings that are one token in this vocabulary (order kept, duplicates dropped)."""
    ids: list[int] = []
    for word in spellings:
        encoded = tokenizer.encode(word, add_special_tokens=False)
        if len(encoded) == 1 and encoded[0] not in ids:
            ids.append(encoded[0])
    return ids


def pool_answer_logits(yes: torch.Tensor, no: torch.Tensor, reduce: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, yes spellings]`` and ``[N, no spellings]`` logits -> ``[N]`` pooled yes and no logits
    (float32): the best spelling (``max``) or all of them (``logsumexp``)."""
    yes, no = yes.float(), no.float()
    if reduce == "max":
        return yes.max(-1).values, no.max(-1).values
    return yes.logsumexp(-1), no.logsumexp(-1)


def p_yes_of(yes: torch.Tensor, no: torch.Tensor, reduce: str) -> torch.Tensor:
    """``[N, yes spellings]`` and ``[N, no spellings]`` logits -> ``[N]`` p(yes) = sigmoid(yes - no)."""
    y, n = pool_answer_logits(yes, no, reduce)
    return torch.sigmoid(y - n)


def check_question_lists(
    samples: Sequence[Sample],
    questions: Sequence[Sequence[str]],
    alignment_questions: Sequence[str] | None,
    error: type[Exception],
) -> int:
    """Number of questions per sample, after checking that the lists line up (``error`` otherwise)."""
    if len(questions) != len(samples):
        raise error(f"{len(samples)} samples but {len(questions)} question lists")
    if alignment_questions is not None and len(alignment_questions) != len(samples):
        raise error(f"{len(samples)} samples but {len(alignment_questions)} alignment questions")
    counts = {len(q) for q in questions}
    if len(counts) > 1:
        bad = next(
            s.id or str(i) for i, (s, q) in enumerate(zip(samples, questions)) if len(q) != len(questions[0])
        )
        raise error(f"sample {bad}: every sample must get the same number of questions, got {sorted(counts)}")
    return counts.pop() if counts else 0


def shared_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token run that every row starts with, leaving at least one token to each
    row (its last token is where the answer is read)."""
    shared = min(len(r) for r in rows) - 1
    first = rows[0]
    for row in rows[1:]:
        k = 0
        while k < shared and row[k] == first[k]:
            k += 1
        shared = k
    return shared
