"""Preference accuracy with and without ties, and tau with ties, against brute-force computations."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from reward.metrics import preference_accuracy, tau_with_ties


def _random_case(seed: int, n: int = 40) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Scores on a coarse grid (so that equal scores and equal |diff|s occur) and labels with ties."""
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 6, n) / 2.0
    b = rng.integers(0, 6, n) / 2.0
    label = rng.choice([0.0, 0.5, 1.0], n, p=[0.4, 0.2, 0.4])
    return a, b, label


def _brute_drop(a, b, label) -> float:
    total, right = 0, 0.0
    for sa, sb, y in zip(a, b, label):
        if y == 0.5:
            continue
        total += 1
        if sa == sb:
            right += 0.5
        elif (sa > sb) == (y == 1.0):
            right += 1
    return right / total


def _brute_outcomes(a, b, label, eps):
    """(concordant, discordant) with ties predicted when |a - b| <= eps; tie-tie is concordant."""
    con = dis = 0
    for sa, sb, y in zip(a, b, label):
        pred = 0.5 if abs(sa - sb) <= eps else (1.0 if sa > sb else 0.0)
        if pred == y:
            con += 1
        else:
            dis += 1
    return con, dis


def _brute_calibrated(a, b, label):
    candidates = sorted({0.0} | {abs(x - y) for x, y in zip(a, b)})
    best, best_eps = -1.0, None
    for eps in candidates:  # ascending: the first maximum is the smallest epsilon
        con, dis = _brute_outcomes(a, b, label, eps)
        if con / (con + dis) > best:
            best, best_eps = con / (con + dis), eps
    return best, best_eps


@pytest.mark.parametrize("seed", range(8))
def test_accuracy_without_ties_matches_brute_force(seed):
    a, b, label = _random_case(seed)
    result = preference_accuracy(a, b, label, ties="drop")
    assert result.accuracy == pytest.approx(_brute_drop(a, b, label))
    assert result.pairs == int((label != 0.5).sum())


@pytest.mark.parametrize("seed", range(8))
def test_calibrated_accuracy_matches_brute_force(seed):
    a, b, label = _random_case(seed)
    result = preference_accuracy(a, b, label, ties="calibrate")
    accuracy, eps = _brute_calibrated(a, b, label)
    assert result.accuracy == pytest.approx(accuracy)
    assert result.epsilon == pytest.approx(eps)
    assert result.pairs == len(label)


@pytest.mark.parametrize("seed", range(8))
def test_tau_with_ties_matches_brute_force(seed):
    a, b, label = _random_case(seed)
    _, eps = _brute_calibrated(a, b, label)
    con, dis = _brute_outcomes(a, b, label, eps)
    result = tau_with_ties(a, b, label)
    assert result.tau == pytest.approx((con - dis) / len(label))
    assert result.epsilon == pytest.approx(eps)


def test_continuous_scores_match_brute_force():
    rng = np.random.default_rng(11)
    a, b = rng.normal(size=30), rng.normal(size=30)
    label = np.where(np.abs(a - b) < 0.3, 0.5, (a > b).astype(float))
    flip = rng.random(30) < 0.2
    label[flip] = rng.choice([0.0, 0.5, 1.0], flip.sum())
    result = preference_accuracy(a, b, label, ties="calibrate")
    accuracy, eps = _brute_calibrated(a, b, label)
    assert result.accuracy == pytest.approx(accuracy) and result.epsilon == pytest.approx(eps)
    assert 0.0 < result.epsilon < 1.0  # ties were worth predicting here


def test_hand_computed_example():
    a = np.array([3.0, 1.0, 2.0, 2.0, 5.0])
    b = np.array([1.0, 1.0, 2.5, 4.0, 4.9])
    label = np.array([1.0, 1.0, 0.5, 0.0, 0.5])
    # drop: pairs 0 (right), 1 (scored equal: half), 3 (right) -> 2.5 / 3
    assert preference_accuracy(a, b, label).accuracy == pytest.approx(2.5 / 3)
    # calibrate: |diff| = 2, 0, 0.5, 2, 0.1. eps = 0.5 predicts ties for pairs 1, 2, 4: right on 2 and 4
    # and pairs 0 and 3 keep their right signs -> 4 / 5, better than eps = 0 (3/5) or 0.1 (3/5)
    calibrated = preference_accuracy(a, b, label, ties="calibrate")
    assert calibrated == (pytest.approx(0.8), pytest.approx(0.5), 5)
    assert tau_with_ties(a, b, label).tau == pytest.approx(2 * 0.8 - 1)


def test_a_fixed_epsilon_is_used_as_given():
    a, b, label = _random_case(3)
    for eps in (0.0, 0.5, 1.0, 10.0):
        con, dis = _brute_outcomes(a, b, label, eps)
        result = preference_accuracy(a, b, label, ties="calibrate", epsilon=eps)
        assert result.accuracy == pytest.approx(con / (con + dis)) and result.epsilon == eps
        assert tau_with_ties(a, b, label, epsilon=eps).tau == pytest.approx((con - dis) / (con + dis))


def test_perfect_and_reversed_scores():
    a, b = np.array([2.0, 0.0, 1.0]), np.array([1.0, 1.0, 1.0])
    label = np.array([1.0, 0.0, 0.5])
    assert tau_with_ties(a, b, label).tau == pytest.approx(1.0)
    assert preference_accuracy(b, a, label, ties="drop").accuracy == 0.0


def test_brute_force_over_all_small_labelings():
    a, b = np.array([0.0, 1.0, 2.0, 2.0]), np.array([1.0, 1.0, 0.5, 3.0])
    for label in itertools.product([0.0, 0.5, 1.0], repeat=4):
        label = np.array(label)
        accuracy, eps = _brute_calibrated(a, b, label)
        result = preference_accuracy(a, b, label, ties="calibrate")
        assert (result.accuracy, result.epsilon) == (pytest.approx(accuracy), pytest.approx(eps))


@pytest.mark.parametrize(
    ("a", "b", "label", "message"),
    [
        ([1.0, 2.0], [1.0], [1.0, 0.0], "differ in length"),
        ([1.0, np.nan], [1.0, 0.0], [1.0, 0.0], "score_a is not finite at pair 1"),
        ([1.0, 2.0], [1.0, 0.0], [1.0, 0.7], "label of pair 1"),
        ([1.0], [0.0], [0.5], "all labels are ties"),
    ],
)
def test_bad_inputs_are_named(a, b, label, message):
    with pytest.raises(ValueError, match=message):
        preference_accuracy(np.array(a), np.array(b), np.array(label), ties="drop")
