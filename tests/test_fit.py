"""Weight fitting (paper Algorithm 1) on synthetic preferences drawn from known non-negative weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reward.fit import FitResult, fit_logistic, fit_masked_logistic, predict_preference

torch.set_num_threads(1)
FEATURES = 30
BLOCKS = 6  # features come in 6 blocks of 5 that share a latent factor, so they are correlated


def _true_weights() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(123)
    weights = rng.uniform(0.5, 1.5, FEATURES)
    zero = np.zeros(FEATURES, dtype=bool)
    zero[::3] = True  # a third of the weights are exactly zero
    weights[zero] = 0.0
    return weights, zero


def _pairs(n: int, seed: int, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Differences of correlated binary answer vectors, and labels drawn from sigmoid(w . dx)."""
    rng = np.random.default_rng(seed)

    def answers(m: int) -> np.ndarray:
        shared = rng.standard_normal((m, BLOCKS)).repeat(FEATURES // BLOCKS, axis=1)
        latent = np.sqrt(0.6) * shared + np.sqrt(0.4) * rng.standard_normal((m, FEATURES))
        return (latent > 0).astype(np.float64)

    delta = answers(n) - answers(n)
    labels = (rng.random(n) < predict_preference(weights, delta)).astype(np.float64)
    return delta, labels


@pytest.fixture(scope="module")
def data():
    weights, zero = _true_weights()
    train = _pairs(8000, 1, weights)
    test = _pairs(20000, 2, weights)
    return weights, zero, train, test


def _accuracy(weights: np.ndarray, delta: np.ndarray, labels: np.ndarray) -> float:
    return float(((delta @ weights > 0) == (labels == 1)).mean())


def test_features_are_correlated(data):
    _, _, (delta, _), _ = data
    corr = np.corrcoef(delta.T)
    assert corr[0, 1] > 0.3  # same block
    assert abs(corr[0, 5]) < 0.1  # different blocks


def test_masked_fit_recovers_the_support_with_non_negative_weights(data):
    weights, zero, (delta, labels), _ = data
    masked = fit_masked_logistic(delta, labels)
    assert isinstance(masked, FitResult) and masked.converged and masked.intercept == 0.0
    assert (masked.weights >= 0).all()
    assert (masked.weights == 0).sum() >= 3  # masked weights are exactly zero, not tiny negatives
    # support recovery: every true-zero weight is below every true-positive one, with a clear gap
    assert masked.weights[zero].max() < 0.2 < 0.4 < masked.weights[~zero].min()
    assert np.abs(masked.weights[~zero] - weights[~zero]).max() < 0.25


def test_plain_logistic_has_negative_weights_where_masking_gives_zeros(data):
    _, zero, (delta, labels), _ = data
    plain = fit_logistic(delta, labels)
    masked = fit_masked_logistic(delta, labels)
    negative = plain.weights < -0.03
    assert negative.sum() >= 2
    assert zero[negative].all()  # the negatives are artefacts on features that do not matter
    assert (masked.weights[negative] == 0).all()


def test_held_out_accuracy_is_within_two_points_of_the_true_weights(data):
    weights, _, (delta, labels), (test_delta, test_labels) = data
    masked = fit_masked_logistic(delta, labels)
    truth = _accuracy(weights, test_delta, test_labels)
    assert _accuracy(masked.weights, test_delta, test_labels) > truth - 0.02


def test_masked_fit_is_the_non_negative_optimum(data):
    """KKT conditions of min loss(w) s.t. w >= 0: zero gradient on the support, >= 0 where w = 0."""
    _, _, (delta, labels), _ = data
    w = fit_masked_logistic(delta, labels, tol=1e-10).weights
    grad = delta.T @ (predict_preference(w, delta) - labels) / len(labels)
    assert np.abs(grad[w > 0]).max() < 1e-5
    assert (grad[w == 0] > -1e-5).all()


def test_history_decreases_and_matches_the_loss(data):
    _, _, (delta, labels), _ = data
    fit = fit_masked_logistic(delta, labels)
    assert fit.n_iter == len(fit.history)
    assert all(b <= a + 1e-12 for a, b in zip(fit.history, fit.history[1:]))
    p = predict_preference(fit.weights, delta)
    loss = -np.mean(labels * np.log(p) + (1 - labels) * np.log(1 - p))
    assert fit.history[-1] == pytest.approx(loss, rel=1e-9)


def test_the_papers_per_sample_loop_reaches_the_same_weights(data):
    _, _, (delta, labels), _ = data
    delta, labels = delta[:800], labels[:800]
    full = fit_masked_logistic(delta, labels)
    loop = fit_masked_logistic(delta, labels, batch_size=1, lr=0.005, max_iter=40, tol=1e-4, seed=3)
    assert (loop.weights >= 0).all()
    assert np.abs(loop.weights - full.weights).max() < 0.25
    assert np.corrcoef(loop.weights, full.weights)[0, 1] > 0.97


def test_ties_are_soft_labels_or_dropped():
    # one feature: where it is +1, "a" wins 3 of 4 strict pairs, and 2 more pairs are ties (mirrored
    # for -1). MLE: dropping ties, sigmoid(w) = 3/4; as soft labels, sigmoid(w) = (3 + 2 * 0.5) / 6.
    delta = np.array([[1.0]] * 6 + [[-1.0]] * 6)
    labels = np.array([1, 1, 1, 0, 0.5, 0.5, 0, 0, 0, 1, 0.5, 0.5])
    dropped = fit_logistic(delta, labels, ties="drop", tol=1e-12)
    soft = fit_logistic(delta, labels, ties="soft", tol=1e-12)
    assert dropped.weights[0] == pytest.approx(np.log(3.0), abs=1e-6)
    assert soft.weights[0] == pytest.approx(np.log(4.0 / 2.0), abs=1e-6)
    only_ties = fit_masked_logistic(delta, np.full(12, 0.5))
    assert only_ties.weights[0] == pytest.approx(0.0, abs=1e-9)


def test_l2_shrinks_weights(data):
    _, _, (delta, labels), _ = data
    free = fit_masked_logistic(delta, labels)
    ridge = fit_masked_logistic(delta, labels, l2=0.05)
    assert np.linalg.norm(ridge.weights) < np.linalg.norm(free.weights)


def test_predict_preference_is_antisymmetric():
    rng = np.random.default_rng(0)
    w, dx = rng.random(5), rng.standard_normal((7, 5))
    np.testing.assert_allclose(predict_preference(w, dx) + predict_preference(w, -dx), 1.0)
    np.testing.assert_allclose(predict_preference(w, dx), 1 / (1 + np.exp(-(dx @ w))))


@pytest.mark.parametrize(
    ("delta", "labels", "message"),
    [
        (np.zeros((3, 2)), np.array([1.0, 0.0]), "3 pairs but y has 2"),
        (np.zeros((2, 2)), np.array([1.0, 2.0]), "label of pair 1"),
        (np.array([[0.0, np.nan]]), np.array([1.0]), "pair 0, feature 1"),
        (np.zeros((2, 2)), np.array([0.5, 0.5]), None),
    ],
)
def test_bad_inputs_name_the_pair(delta, labels, message):
    if message is None:  # all ties dropped: nothing left
        with pytest.raises(ValueError, match="no preference pairs"):
            fit_masked_logistic(delta, labels, ties="drop")
        return
    with pytest.raises(ValueError, match=message):
        fit_masked_logistic(delta, labels)
