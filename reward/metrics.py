"""Preference metrics of the paper's Table 2: accuracy without ties, accuracy and tau with ties.

Every metric compares a reward's scores for the two samples of each pair with a human label:
1 (a is better), 0 (b is better) or 0.5 (a tie). ``diff = score_a - score_b``.

- Accuracy without ties (Table 2's "diff**"): tied labels are dropped; a pair is right when the
  sign of diff agrees with the label. A pair the reward scores exactly equal counts half: a coin flip
  is what a user of the scores would have to do with it, and counting it as right (or wrong) would
  reward (or punish) a reward model for giving many samples the same score.
- Accuracy with ties (Deutsch, Foster & Freitag 2023, "Ties Matter: Meta-Evaluating Modern Metrics with
  Pairwise Accuracy and Tie Calibration"): the reward predicts a tie when |diff| <= epsilon and a
  preference otherwise; a pair is right when the prediction equals the label, ties included. Tie
  calibration picks the epsilon that maximises this accuracy (so a reward that never predicts ties
  is not penalised for the scale of its scores).
- Tau with ties (Table 2's "tau*"): Kendall's tau over the labelled pairs in the form Deutsch et al.
  call tau_eq, with the tie-calibrated epsilon: a pair is concordant when the prediction equals the
  label (a predicted tie on a tied label included), discordant otherwise (opposite preferences, and
  a tie on one side only), and tau = (concordant - discordant) / pairs = 2 * accuracy_with_ties - 1.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np


class PairwiseAccuracy(NamedTuple):
    """accuracy in [0, 1]; epsilon: the tie threshold used (0 without tie calibration); pairs counted."""

    accuracy: float
    epsilon: float
    pairs: int


class TauWithTies(NamedTuple):
    """tau in [-1, 1]; epsilon: the tie threshold used; pairs counted."""

    tau: float
    epsilon: float
    pairs: int


def preference_accuracy(
    score_a: np.ndarray,
    score_b: np.ndarray,
    label: np.ndarray,
    *,
    ties: Literal["drop", "calibrate"] = "drop",
    epsilon: float | None = None,
) -> PairwiseAccuracy:
    """Pairwise preference accuracy (see the module docstring for both modes).

    ties="drop": tied labels are left out; a pair whose scores are equal counts half.
    ties="calibrate": ties are predicted when |diff| <= epsilon; with ``epsilon=None`` the epsilon that
    maximises the accuracy on these pairs (the smallest such, among 0 and the observed |diff|s).
    """
    diff, y = _validate(score_a, score_b, label)
    if ties == "drop":
        keep = y != 0.5
        diff, y = diff[keep], y[keep]
        if diff.size == 0:
            raise ValueError("no pairs with a strict preference label (all labels are ties)")
        right = np.where(diff == 0, 0.5, (np.sign(diff) == np.where(y == 1, 1.0, -1.0)).astype(float))
        return PairwiseAccuracy(float(right.mean()), 0.0, int(diff.size))
    if ties != "calibrate":
        raise ValueError(f"ties must be 'drop' or 'calibrate', got {ties!r}")
    if epsilon is not None:
        return PairwiseAccuracy(_accuracy_at(diff, y, float(epsilon)), float(epsilon), int(diff.size))
    accuracy, eps = _calibrate(diff, y)
    return PairwiseAccuracy(accuracy, eps, int(diff.size))


def tau_with_ties(
    score_a: np.ndarray, score_b: np.ndarray, label: np.ndarray, *, epsilon: float | None = None
) -> TauWithTies:
    """tau_eq = (concordant - discordant) / pairs with tie calibration (module docstring).

    Tie-tie pairs are concordant, a tie on one side only is discordant. ``epsilon=None`` calibrates
    the tie threshold on these pairs; pass one calibrated elsewhere to evaluate held-out pairs with it.
    """
    acc = preference_accuracy(score_a, score_b, label, ties="calibrate", epsilon=epsilon)
    return TauWithTies(2.0 * acc.accuracy - 1.0, acc.epsilon, acc.pairs)


def _validate(score_a: np.ndarray, score_b: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(score_a, dtype=np.float64).reshape(-1)
    b = np.asarray(score_b, dtype=np.float64).reshape(-1)
    y = np.asarray(label, dtype=np.float64).reshape(-1)
    if not a.size == b.size == y.size:
        raise ValueError(f"score_a, score_b and label differ in length: {a.size}, {b.size}, {y.size}")
    if a.size == 0:
        raise ValueError("no pairs to evaluate")
    for name, values in (("score_a", a), ("score_b", b)):
        if not np.isfinite(values).all():
            raise ValueError(f"{name} is not finite at pair {int(np.flatnonzero(~np.isfinite(values))[0])}")
    bad = ~np.isin(y, (0.0, 0.5, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"label of pair {i} is {y[i]}; labels must be 1 (a better), 0 (b better) or 0.5 (tie)"
        )
    return a - b, y


def _accuracy_at(diff: np.ndarray, y: np.ndarray, epsilon: float) -> float:
    predicted = np.where(np.abs(diff) <= epsilon, 0.5, np.where(diff > 0, 1.0, 0.0))
    return float((predicted == y).mean())


def _calibrate(diff: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Best accuracy over epsilon in {0} U {|diff|}, in O(N log N), and the smallest epsilon reaching it.

    Sorting the pairs by |diff|, the pairs predicted as ties for a threshold are a prefix (all of
    them whose |diff| <= epsilon). Right answers = tied labels inside the prefix + strict labels
    outside it whose sign the diff gets right; both are prefix sums.
    """
    mag = np.abs(diff)
    order = np.argsort(mag, kind="stable")
    mag, diff, y = mag[order], diff[order], y[order]
    tie_label = (y == 0.5).astype(np.int64)
    sign_right = ((y != 0.5) & (np.sign(diff) == np.where(y == 1, 1.0, -1.0))).astype(np.int64)
    # candidate thresholds: 0 and each distinct |diff|; the prefix ends after the last equal value
    candidates = np.unique(np.concatenate([[0.0], mag]))
    prefix_len = np.searchsorted(mag, candidates, side="right")
    ties_inside = np.concatenate([[0], np.cumsum(tie_label)])[prefix_len]
    right_inside = np.concatenate([[0], np.cumsum(sign_right)])[prefix_len]
    right = ties_inside + (sign_right.sum() - right_inside)
    best = int(np.argmax(right))  # first maximum = smallest epsilon
    return float(right[best] / diff.size), float(candidates[best])
