"""The reward trainer's loss: cross-entropy of the answer at the answer position.

Per question row i with target t_i (1 / 0 for a human answer, the teacher's p(yes) for distillation)
and weight w_i (balancing), over the logits z_i at the position where the scorer reads p(yes):

``token_ce`` (default) — the answer token's cross-entropy over the whole vocabulary, with the
target spread over the two taught tokens (``train.answer_words``, e.g. "yes" / "no")::

    l_i = -[ t_i log softmax(z_i)[yes] + (1 - t_i) log softmax(z_i)[no] ]

For t in {0, 1} this is exactly next-token cross-entropy on the answer "yes" or "no" (what the release
trains on). For a soft t it is the soft cross-entropy to the teacher; it splits as
``BCE(t, q) - log(P[yes] + P[no])`` with q = P[yes] / (P[yes] + P[no]): the binary cross-entropy of
the two-way answer plus a term that moves the probability mass onto the two answers, so its minimum
is q = t with nothing left on other tokens (= KL(t || q) + H(t) at that point).

``binary`` — the binary cross-entropy of the scorer's own p(yes), read from the candidate logits exactly
as :class:`reward.backends.vlm.VLMBackend` reads it (best yes-spelling against best no-spelling, or
their logsumexps)::

    l_i = -[ t_i log p_i + (1 - t_i) log(1 - p_i) ],   p_i = sigmoid(y_i - n_i)

The batch loss is ``sum_i w_i l_i / W``, where W is the summed weight of every row of the optimizer
step on all processes (so the gradient is the weighted mean over the step whatever its split into
processes and micro-steps; the caller scales for accelerate's and DDP's averaging).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reward.backends.yes_no import pool_answer_logits

LOSSES = ("token_ce", "binary")


def token_ce(logits: torch.Tensor, target: torch.Tensor, yes_id: int, no_id: int) -> torch.Tensor:
    """``[N, V]`` answer-position logits, ``[N]`` targets in [0, 1] -> ``[N]`` soft token CE."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    t = target.float()
    return -(t * logp[:, yes_id] + (1 - t) * logp[:, no_id])


def binary_ce(yes_logit: torch.Tensor, no_logit: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``[N]`` pooled yes / no logits (as the scorer pools them), ``[N]`` targets -> ``[N]`` BCE of
    p(yes) = sigmoid(yes - no)."""
    return F.binary_cross_entropy_with_logits(
        (yes_logit - no_logit).float(), target.float(), reduction="none"
    )


def pooled_answer_logits(
    logits: torch.Tensor, yes_ids: list[int], no_ids: list[int], reduce: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """The scorer's pooling of the spellings: ``max`` (greedy-compatible) or ``logsumexp``."""
    return pool_answer_logits(logits[:, yes_ids], logits[:, no_ids], reduce)


def answer_loss(
    kind: str,
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    taught: tuple[int, int],
    yes_ids: list[int],
    no_ids: list[int],
    reduce: str = "max",
) -> torch.Tensor:
    """Per-row loss of ``kind`` (module docstring) -> ``[N]``."""
    if kind == "token_ce":
        return token_ce(logits, target, *taught)
    if kind == "binary":
        return binary_ce(*pooled_answer_logits(logits, yes_ids, no_ids, reduce), target)
    raise ValueError(f"train.loss={kind!r}: expected one of {list(LOSSES)}")
