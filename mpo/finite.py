"""Non-finite losses and gradients, caught on the device without a host sync per micro-step.

A NaN must never reach the weights, and training must stop naming the pair that produced it. Reading
a flag on the host every micro-step would do both, at the price of a host sync that keeps the host
from queueing the next step's kernels while the GPU runs this one. Instead:

1. every micro-step adds ``~isfinite(per_pair_loss)`` to a counter on the device and keeps the mask
   with the pairs it belongs to (:meth:`FiniteGuard.loss`);
2. at the optimizer step, :meth:`FiniteGuard.found_inf` turns this step's count (and a non-finite
   gradient norm) into a 0/1 device flag, summed over processes (an all-reduce, no host read), and
   the trainer hands it to the fused AdamW kernel as ``found_inf``, the argument ``GradScaler`` uses
   to skip a step on the device: with the flag set, the kernel leaves weights, moments and the step
   count untouched. So the bad update never lands, and every process skips the same steps;
3. at the next log, eval or checkpoint step (which read values on the host anyway) the trainer
   calls :meth:`FiniteGuard.look`: one all-reduced count; if it is not zero, every process raises,
   naming the first step and pairs that went bad. No checkpoint is written after a skipped step.

Where the skip is not ours to make, the same flags are still looked at: under DeepSpeed the engine
steps inside ``backward`` and skips a step whose gradient norm is not finite itself (ZeRO-1/2/3, with
its default ``check_grad_overflow``); under fp16 the ``GradScaler`` sets ``found_inf`` (an overflow
there is routine, so the gradient norm is not ours to judge). An optimizer without a fused kernel
gets a host read per optimizer step instead (never per micro-step).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import gather_object

PAIR_FIELDS = ("prompt_id", "win", "lose")


@dataclass
class Seen:
    step: int
    what: str  # "DPO loss" or "gradient norm"
    pairs: torch.Tensor  # [B, 3] on the host
    bad: torch.Tensor  # [B] (loss) or [1] (gradient norm) bool, on the device


class FiniteGuard:
    """Device-side bookkeeping of non-finite values since the last look."""

    def __init__(self, accelerator: Any, judge_grad_norm: bool = True) -> None:
        self.acc = accelerator
        self.judge_grad_norm = judge_grad_norm
        self.seen: list[Seen] = []
        self._step_bad: torch.Tensor | None = None  # non-finite losses in the current optimizer step

    def loss(self, step: int, pairs: torch.Tensor, per_pair_loss: torch.Tensor) -> None:
        bad = ~torch.isfinite(per_pair_loss.detach())
        self.seen.append(Seen(step, "DPO loss", pairs, bad))
        count = bad.sum()
        self._step_bad = count if self._step_bad is None else self._step_bad + count

    def grad_norm(self, step: int, pairs: torch.Tensor, norm: Any) -> torch.Tensor | None:
        """Record a gradient norm (a device tensor, or a number from DeepSpeed); its bad flag."""
        if norm is None or not self.judge_grad_norm:
            return None
        norm = torch.as_tensor(norm, device=self.acc.device)
        bad = ~torch.isfinite(norm.detach().float().reshape(1))
        self.seen.append(Seen(step, "gradient norm", pairs, bad))
        return bad

    def found_inf(self, step: int, pairs: torch.Tensor, norm: torch.Tensor | None) -> torch.Tensor:
        """1.0 when this optimizer step must leave the weights alone, else 0.0: a float32 scalar on
        the device, the same on every process. Call once per optimizer step, after clipping."""
        bad = torch.zeros((), device=self.acc.device) if self._step_bad is None else self._step_bad.float()
        norm_bad = self.grad_norm(step, pairs, norm)
        if norm_bad is not None:
            bad = bad + norm_bad.float().sum()
        self._step_bad = None
        if self.acc.num_processes > 1:
            bad = self.acc.reduce(bad, reduction="sum")
        return (bad > 0).float()

    def look(self) -> tuple[int, str, list[dict[str, int]]] | None:
        """One host read: None when everything since the last look was finite (on every process);
        otherwise (first bad step, what, the pairs named there on any process). Collective."""
        local = torch.zeros((), device=self.acc.device)
        for entry in self.seen:
            local = local + entry.bad.sum()
        total = self.acc.reduce(local, reduction="sum") if self.acc.num_processes > 1 else local
        if int(total) == 0:
            self.seen = []
            return None
        first: tuple[int, str, list[dict[str, int]]] | None = None
        for entry in self.seen:
            bad = entry.bad.cpu()
            if not bool(bad.any()):
                continue
            rows = entry.pairs[bad] if bad.numel() == len(entry.pairs) else entry.pairs
            named = [dict(zip(PAIR_FIELDS, map(int, row))) for row in rows.tolist()]
            key = (entry.step, 0 if entry.what == "DPO loss" else 1)
            if first is None or key < (first[0], 0 if first[1] == "DPO loss" else 1):
                first = (entry.step, entry.what, named)
            elif key == (first[0], 0 if first[1] == "DPO loss" else 1):
                first[2].extend(named)
        everyone = gather_object([first])
        found = [f for f in everyone if f is not None]
        step = min(f[0] for f in found)
        at_step = [f for f in found if f[0] == step]
        what = "DPO loss" if any(f[1] == "DPO loss" for f in at_step) else "gradient norm"
        pairs = [p for f in at_step if f[1] == what for p in f[2]]
        self.seen = []
        return step, what, pairs
