"""Learning the checklist's linear weights from preference pairs (paper Algorithm 1).

The reward is linear in the features, so a preference between samples i and j depends only on the
feature difference: P(i preferred) = sigmoid(w . (x_i - x_j)). There is no intercept: it would cancel in
the difference (and swapping a pair must flip the probability).

Algorithm 1 of the paper ("iterative regression with weight masking") runs passes of per-sample
gradient steps on the logistic loss and, after each pass, sets negative weights to zero
(w <- w * (w > 0)), until a pass changes w by less than eps. Every feature is oriented so that "yes"
should never lower the reward, so a negative weight is read as an artefact of correlated features.

What this module does
    A pass is one full-batch gradient step on the mean logistic loss followed by the masking, i.e.
    projected gradient descent onto w >= 0, accelerated with Nesterov momentum (FISTA, restarted when
    the loss goes up) and with the step 1/L, L = lambda_max(X^T X) / (4 N) + l2, the loss's smoothness
    constant, so no learning rate needs tuning. It stops when a pass moves w by less than ``tol``.
    Its fixed point is the same as the paper's loop: the non-negative logistic regression optimum
    (a weight is 0 exactly when the loss would still like to push it below 0). The per-sample loop is
    available as ``batch_size=1`` with a fixed ``lr`` (``batch_size=k`` for mini-batches): one pass is
    then one epoch over a seeded shuffle, masked at its end, which is the paper's reference semantics;
    it is slower and only reaches the optimum to within its SGD noise. Everything runs in torch float64.

Ties
    Labels are 1 (the first sample is preferred), 0 (the second) or 0.5 (a tie). ``ties="soft"`` keeps
    a tie as a soft target of 0.5 (cross-entropy with y = 0.5 pulls w . dx towards 0: "these two are
    equally good"); ``ties="drop"`` leaves tied pairs out. Any y in [0, 1] is accepted as a soft label.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

Ties = Literal["soft", "drop"]


@dataclass
class FitResult:
    """Learned weights (one per feature, float64), always with intercept 0 (a difference model).

    n_iter: passes run. history: the mean logistic loss (plus the l2 term) after each pass.
    converged: whether the last pass moved the weights by less than ``tol``.
    """

    weights: np.ndarray
    intercept: float = 0.0
    n_iter: int = 0
    converged: bool = False
    history: list[float] = field(default_factory=list)
    method: str = ""


def predict_preference(weights: np.ndarray, delta_x: np.ndarray) -> np.ndarray:
    """P(first sample preferred) = sigmoid(delta_x @ weights) for each pair, ``[N]``."""
    margin = np.asarray(delta_x, dtype=np.float64) @ np.asarray(weights, dtype=np.float64)
    return 1.0 / (1.0 + np.exp(-np.clip(margin, -500, 500)))


def fit_masked_logistic(
    delta_x: np.ndarray,
    y: np.ndarray,
    *,
    lr: float | None = None,
    max_iter: int = 20_000,
    tol: float = 1e-8,
    l2: float = 0.0,
    batch_size: int | None = None,
    seed: int = 0,
    ties: Ties = "soft",
) -> FitResult:
    """Paper Algorithm 1: logistic regression on feature differences, negative weights masked to 0.

    delta_x: ``[N, F]`` feature differences x_a - x_b; y: ``[N]`` labels (1: a preferred, 0: b, 0.5: tie).
    lr: step size (default 1/L for full batch; required for ``batch_size``). max_iter: most passes.
    tol: stop when a pass moves w by less than this (Euclidean norm). l2: ridge penalty (l2/2 |w|^2).
    batch_size: None for full-batch passes, k for passes of k-sample steps (1 = the paper's loop).
    seed: the shuffle of mini-batch passes. The result has exact zeros where the mask holds.
    """
    return _fit(delta_x, y, project=True, lr=lr, max_iter=max_iter, tol=tol, l2=l2,
                batch_size=batch_size, seed=seed, ties=ties)  # fmt: skip


def fit_logistic(
    delta_x: np.ndarray,
    y: np.ndarray,
    *,
    lr: float | None = None,
    max_iter: int = 20_000,
    tol: float = 1e-8,
    l2: float = 0.0,
    batch_size: int | None = None,
    seed: int = 0,
    ties: Ties = "soft",
) -> FitResult:
    """Plain logistic regression on feature differences (no masking), for comparison.

    Same arguments as :func:`fit_masked_logistic`. Without ``l2`` on separable data the weights grow
    until ``max_iter``: there is no finite optimum.
    """
    return _fit(delta_x, y, project=False, lr=lr, max_iter=max_iter, tol=tol, l2=l2,
                batch_size=batch_size, seed=seed, ties=ties)  # fmt: skip


def _prepare(delta_x: np.ndarray, y: np.ndarray, ties: Ties) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.asarray(delta_x, dtype=np.float64)
    t = np.asarray(y, dtype=np.float64).reshape(-1)
    if x.ndim != 2:
        raise ValueError(f"delta_x must be [N, F], got shape {x.shape}")
    if x.shape[0] != t.shape[0]:
        raise ValueError(f"delta_x has {x.shape[0]} pairs but y has {t.shape[0]} labels")
    if not np.isfinite(x).all():
        bad = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"delta_x is not finite at pair {bad[0]}, feature {bad[1]} (fill unknowns first)")
    if not np.isfinite(t).all() or (t < 0).any() or (t > 1).any():
        bad = int(np.flatnonzero(~np.isfinite(t) | (t < 0) | (t > 1))[0])
        raise ValueError(
            f"label of pair {bad} is {t[bad]}; labels must be in [0, 1] (1, 0, or 0.5 for a tie)"
        )
    if ties == "drop":
        keep = t != 0.5
        x, t = x[keep], t[keep]
    elif ties != "soft":
        raise ValueError(f"ties must be 'soft' or 'drop', got {ties!r}")
    if x.shape[0] == 0:
        raise ValueError("no preference pairs to fit (after dropping ties)")
    return torch.from_numpy(x), torch.from_numpy(t)


def _loss(x: torch.Tensor, t: torch.Tensor, w: torch.Tensor, l2: float) -> float:
    """Mean binary cross-entropy with logits x @ w, plus l2/2 |w|^2."""
    z = x @ w
    bce = torch.nn.functional.binary_cross_entropy_with_logits(z, t)
    return float(bce + 0.5 * l2 * (w @ w))


def _nonnegative(w: torch.Tensor) -> torch.Tensor:
    """The paper's mask w * (w > 0), written so that masked weights are exactly +0.0."""
    return torch.where(w > 0, w, torch.zeros_like(w))


def _identity(w: torch.Tensor) -> torch.Tensor:
    return w


def _grad(x: torch.Tensor, t: torch.Tensor, w: torch.Tensor, l2: float) -> torch.Tensor:
    return x.T @ (torch.sigmoid(x @ w) - t) / x.shape[0] + l2 * w


def _fit(
    delta_x: np.ndarray,
    y: np.ndarray,
    *,
    project: bool,
    lr: float | None,
    max_iter: int,
    tol: float,
    l2: float,
    batch_size: int | None,
    seed: int,
    ties: Ties,
) -> FitResult:
    x, t = _prepare(delta_x, y, ties)
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    mask: Mask = _nonnegative if project else _identity
    method = "masked-logistic" if project else "logistic"
    if batch_size is None:
        return _fit_full_batch(x, t, mask, lr, max_iter, tol, l2, method)
    if lr is None:
        raise ValueError("mini-batch passes need an explicit lr (the paper's loop uses a fixed step)")
    return _fit_minibatch(x, t, mask, lr, max_iter, tol, l2, batch_size, seed, method)


Mask = Callable[[torch.Tensor], torch.Tensor]


def _fit_full_batch(
    x: torch.Tensor,
    t: torch.Tensor,
    mask: Mask,
    lr: float | None,
    max_iter: int,
    tol: float,
    l2: float,
    method: str,
) -> FitResult:
    """Projected gradient with Nesterov momentum (FISTA) and function-value restart."""
    n, f = x.shape
    if lr is None:
        top = float(torch.linalg.eigvalsh(x.T @ x / n)[-1]) if f else 0.0
        lr = 1.0 / (0.25 * top + l2 + 1e-12)
    w = torch.zeros(f, dtype=torch.float64)
    anchor, momentum = w.clone(), 1.0
    history: list[float] = []
    loss = _loss(x, t, w, l2)
    converged = False
    for _ in range(max_iter):
        w_old = w
        w = mask(anchor - lr * _grad(x, t, anchor, l2))
        new_loss = _loss(x, t, w, l2)
        if new_loss > loss:  # momentum overshot: restart from a plain projected step
            momentum = 1.0
            w = mask(w_old - lr * _grad(x, t, w_old, l2))
            new_loss = _loss(x, t, w, l2)
        history.append(new_loss)
        loss = new_loss
        next_momentum = 0.5 * (1 + math.sqrt(1 + 4 * momentum * momentum))
        anchor = w + ((momentum - 1) / next_momentum) * (w - w_old)
        momentum = next_momentum
        if float(torch.linalg.vector_norm(w - w_old)) < tol:
            converged = True
            break
    return FitResult(w.numpy().copy(), 0.0, len(history), converged, history, method)


def _fit_minibatch(
    x: torch.Tensor,
    t: torch.Tensor,
    mask: Mask,
    lr: float,
    max_iter: int,
    tol: float,
    l2: float,
    batch_size: int,
    seed: int,
    method: str,
) -> FitResult:
    """The paper's loop: an epoch of (mini-batch) gradient steps in a seeded order, then the mask."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, f = x.shape
    gen = torch.Generator().manual_seed(seed)
    w = torch.zeros(f, dtype=torch.float64)
    history: list[float] = []
    converged = False
    for _ in range(max_iter):
        w_old = w.clone()
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            w = w - lr * _grad(x[idx], t[idx], w, l2)
        w = mask(w)
        history.append(_loss(x, t, w, l2))
        if float(torch.linalg.vector_norm(w - w_old)) < tol:
            converged = True
            break
    return FitResult(w.numpy().copy(), 0.0, len(history), converged, history, method)
