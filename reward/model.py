"""Answers -> gated features -> per-sub-dimension, per-dimension and total scores (paper eq. 3-6).

Everything is one batched tensor computation, so scoring thousands of samples (or the per-step eval
of a trainer) costs nothing next to the VLM that produced the answers.

    x_i  = a(p_i) * g_i                           (eq. 3, generalised to soft answers and gates)
    R_s  = sum_{i in s} w_i x_i                   (eq. 6, per sub-dimension s; the same for a dimension)
    R    = sum_s R_s + intercept                  (eq. 4)

Answers are *centred*: "yes" counts for a sample, "no" against it, and 0 is neutral.

- ``soft`` (the default): a(p) = 2p - 1, the expected value of the release's ±1 answer when the model
  says "yes" with probability p. Hard 0/1 answers make many different samples score the same, which
  starves pair selection of signal; rounding p gives back the signed rule exactly.
- ``signed``: a = +1 if p >= 0.5 else -1 (the release's rule).
- ``binary``: a = 1[p >= 0.5] (the paper's eq. 3); a gated question's answer is centred to ±1 first.

Presence gates. g_i is 1 for an ungated question; for a gated one it is the presence question's p
(``gates: soft``) or its hard answer (``gates: hard``). Because answers are centred before gating, a
sample without the gated thing (g = 0) scores 0 on those questions: strictly between "present and
wrong" (-w) and "present and right" (+w), the meaning of the release's masks. (Uncentred 0/1 answers
would score "no human in the image" exactly like "a human, completely wrong", and no weight that
``reward fit`` learns could tell the two apart.) Presence questions themselves carry no weight.

``reduction: mean`` divides by the number of features (the released video rule). A question a backend
cannot judge (p = NaN) is left out of every sum; a sub-dimension or dimension with no known feature
scores NaN, never a made-up value. The alignment term is a probability in [0, 1], used as given (the
release prepends its VQAScore unchanged).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reward.checklist import Checklist


@dataclass
class RewardScores:
    """Scores of a batch. Column names follow the scores.parquet convention."""

    total: torch.Tensor  # [B]
    dimensions: torch.Tensor  # [B, D]
    sub_dimensions: torch.Tensor  # [B, S]
    features: torch.Tensor  # [B, F] gated feature values (NaN where unknown)
    p_yes: torch.Tensor  # [B, Q]
    hard: torch.Tensor  # [B, Q] bool: p >= 0.5
    alignment: torch.Tensor | None  # [B]
    dimension_names: list[str]
    sub_dimension_names: list[str]
    question_ids: list[str]
    source: str = ""

    def __len__(self) -> int:
        return self.total.shape[0]

    def dimension(self, name: str) -> torch.Tensor:
        return self.dimensions[:, self.dimension_names.index(name)]

    def to_rows(self) -> list[dict[str, float]]:
        """One flat dict per sample: total, dim.<name>, sub.<name>, q.<id> (p(yes)), alignment."""
        cols: dict[str, torch.Tensor] = {"total": self.total}
        cols.update({f"dim.{n}": self.dimensions[:, i] for i, n in enumerate(self.dimension_names)})
        cols.update({f"sub.{n}": self.sub_dimensions[:, i] for i, n in enumerate(self.sub_dimension_names)})
        cols.update({f"q.{n}": self.p_yes[:, i] for i, n in enumerate(self.question_ids)})
        if self.alignment is not None:
            cols["alignment"] = self.alignment
        table = {k: v.detach().double().cpu().tolist() for k, v in cols.items()}
        return [{k: table[k][b] for k in table} for b in range(len(self))]


class ChecklistScorer(torch.nn.Module):
    """A checklist's scoring rule as a module (weights and index maps are buffers: ``.to(device)``)."""

    def __init__(self, checklist: Checklist) -> None:
        super().__init__()
        self.checklist = checklist
        feats = checklist.features
        dim_index = {d: i for i, d in enumerate(checklist.dimensions)}
        sub_index = {s: i for i, s in enumerate(checklist.sub_dimensions)}
        self.register_buffer(
            "weights", torch.tensor(checklist.weights, dtype=torch.float64), persistent=False
        )
        self.register_buffer("question", torch.tensor([f.question for f in feats]), persistent=False)
        self.register_buffer("gate", torch.tensor([f.gate for f in feats]), persistent=False)
        self.register_buffer(
            "sub", torch.tensor([sub_index[f.sub_dimension] for f in feats]), persistent=False
        )
        self.register_buffer("dim", torch.tensor([dim_index[f.dimension] for f in feats]), persistent=False)
        self.intercept = float(checklist.intercept)
        self.scale = 1.0 / len(feats) if checklist.scoring.reduction == "mean" else 1.0

    def _encode(self, p: torch.Tensor) -> torch.Tensor:
        """p(yes) -> centred answers (module doc); binary answers stay 0/1 here (centred when gated)."""
        mode = self.checklist.scoring.answers
        if mode == "soft":
            return 2 * p - 1
        yes = (p >= 0.5).to(p.dtype)
        return yes if mode == "binary" else 2 * yes - 1

    def features(self, p_yes: torch.Tensor, alignment: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, Q]`` p(yes) (+ ``[B]`` alignment) -> ``[B, F]`` gated features, NaN where unknown."""
        p_yes = p_yes.to(self.weights.device, torch.float64)
        batch = p_yes.shape[0]
        if p_yes.ndim != 2 or p_yes.shape[1] != len(self.checklist.questions):
            raise ValueError(
                f"{self.checklist.name}: expected p_yes [B, {len(self.checklist.questions)}], got {tuple(p_yes.shape)}"
            )
        unknown = torch.isnan(p_yes)
        answers = self._encode(p_yes.nan_to_num(0.0)).masked_fill(unknown, float("nan"))
        is_alignment = self.question < 0
        values = answers[:, self.question.clamp(min=0)]
        if bool(is_alignment.any()):
            align = torch.full((batch,), float("nan"), dtype=torch.float64, device=p_yes.device)
            if alignment is not None:
                align = alignment.to(p_yes.device, torch.float64).reshape(batch)
            values = torch.where(is_alignment, align[:, None], values)
        gated = self.gate >= 0
        if bool(gated.any()):
            if self.checklist.scoring.answers == "binary":
                values = torch.where(gated, 2 * values - 1, values)
            p_gate = p_yes[:, self.gate.clamp(min=0)]
            g = p_gate if self.checklist.scoring.gates == "soft" else (p_gate >= 0.5).to(p_gate.dtype)
            g = g.masked_fill(torch.isnan(p_gate), float("nan"))
            values = torch.where(gated, values * g, values)
        return values

    def forward(
        self, p_yes: torch.Tensor, alignment: torch.Tensor | None = None, source: str = ""
    ) -> RewardScores:
        x = self.features(p_yes, alignment)
        known = ~torch.isnan(x)
        contrib = (x.nan_to_num(0.0) * self.weights) * self.scale
        batch = x.shape[0]

        def group(index: torch.Tensor, size: int) -> torch.Tensor:
            total = torch.zeros(batch, size, dtype=torch.float64, device=x.device).index_add_(
                1, index, contrib
            )
            count = torch.zeros(batch, size, dtype=torch.float64, device=x.device).index_add_(
                1, index, known.double()
            )
            return total.masked_fill(count == 0, float("nan"))

        subs = group(self.sub, len(self.checklist.sub_dimensions))
        dims = group(self.dim, len(self.checklist.dimensions))
        total = contrib.sum(1) + self.intercept
        total = total.masked_fill(~known.any(1), float("nan"))
        p64 = p_yes.to(x.device, torch.float64)
        return RewardScores(
            total=total,
            dimensions=dims,
            sub_dimensions=subs,
            features=x,
            p_yes=p64,
            hard=p64 >= 0.5,
            alignment=None if alignment is None else alignment.to(x.device, torch.float64).reshape(batch),
            dimension_names=list(self.checklist.dimensions),
            sub_dimension_names=list(self.checklist.sub_dimensions),
            question_ids=self.checklist.question_ids,
            source=source,
        )
