"""Tests for `tfp_seg.metrics.calibration`: ECE, reliability diagrams, NLL, Brier."""

import numpy as np
import pytest

from tests.metrics._references import random_probs, ref_ece
from tfp_seg import metrics

# ================================================================================================
# Calibration
# ================================================================================================

# Five pixels, C=2. (probs, label): conf, correct
#   [.9,.1], 0 -> .9 right;  [.8,.2], 1 -> .8 wrong;  [.6,.4], 1 -> .6 wrong;
#   [.3,.7], 1 -> .7 right;  [.5,.5], 1 -> .5 wrong (argmax picks class 0)
HAND_PROBS = np.array([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.5, 0.5]])
HAND_LABELS = np.array([0, 1, 1, 1, 1])


def test_ece_hand_computed():
    # num_bins=2: bin (0,.5] = {.5}: acc 0, conf .5 -> gap .5, weight 1/5
    #             bin (.5,1] = {.9,.8,.6,.7}: acc 2/4, conf .75 -> gap .25, weight 4/5
    # ECE = .5/5 + .25*4/5 = 0.3
    assert metrics.expected_calibration_error(HAND_PROBS, HAND_LABELS, 2) == pytest.approx(0.3)
    # quantile, 2 bins, on conf .6,.7,.8,.9 (edges 0, median .75, 1):
    #   (0,.75] = {.6 right, .7 wrong}: |.5 - .65| = .15; (.75,1] = {.8 right, .9 right}: .15
    # ECE = .5 * .15 + .5 * .15 = .15
    probs = np.array([[0.6, 0.4], [0.7, 0.3], [0.8, 0.2], [0.9, 0.1]])
    labels = np.array([0, 1, 0, 0])
    got = metrics.expected_calibration_error(probs, labels, 2, strategy="quantile")
    assert got == pytest.approx(0.15)


def test_reliability_diagram_hand_computed():
    # num_bins=4: (0,.25] empty; (.25,.5] = {.5 wrong}; (.5,.75] = {.6 wrong, .7 right};
    # (.75,1] = {.9 right, .8 wrong}
    data = metrics.reliability_diagram_data(HAND_PROBS, HAND_LABELS, num_bins=4)
    np.testing.assert_array_equal(data["counts"], [0, 1, 2, 2])
    np.testing.assert_allclose(data["edges"], [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(data["confidence"], [np.nan, 0.5, 0.65, 0.85])
    np.testing.assert_allclose(data["accuracy"], [np.nan, 0.0, 0.5, 0.5])
    # ECE = (1*.5 + 2*.15 + 2*.35) / 5 = 0.3
    assert data["ece"] == pytest.approx(0.3)


def test_ece_soft_hand_computed():
    # [.9,.1] with q=[.7,.3]: conf .9, acc .7;  [.6,.4] with q=[.2,.8]: conf .6, acc .2;
    # [.5,.5] with q=[.5,.5]: conf .5, acc .5.  num_bins=2:
    # (0,.5]: |.5 - .5| = 0;  (.5,1]: conf .75, acc .45 -> .3 with weight 2/3 -> ECE = 0.2
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.5, 0.5]])
    target = np.array([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]])
    assert metrics.expected_calibration_error_soft(probs, target, 2) == pytest.approx(0.2)
    data = metrics.reliability_diagram_data(probs, target, num_bins=2)
    np.testing.assert_allclose(data["accuracy"], [0.5, 0.45])


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_ece_matches_loop_reference(strategy):
    rng = np.random.default_rng(8)
    probs = random_probs(rng, (2, 8, 8), 4)
    labels = rng.integers(0, 4, size=(2, 8, 8))
    conf = probs.reshape(-1, 4).max(-1).astype(np.float64)
    acc = (probs.reshape(-1, 4).argmax(-1) == labels.reshape(-1)).astype(float)
    if strategy == "uniform":
        edges = np.linspace(0, 1, 11)
    else:
        edges = np.quantile(conf, np.linspace(0, 1, 11))
        edges[0], edges[-1] = 0.0, 1.0
    expected = ref_ece(conf, acc, edges)
    got = metrics.expected_calibration_error(probs, labels, 10, strategy=strategy)
    assert got == pytest.approx(expected, abs=1e-12)
    counts = metrics.reliability_diagram_data(probs, labels, 10, strategy)["counts"]
    assert counts.sum() == 128
    if strategy == "quantile":
        assert counts.min() >= 12 and counts.max() <= 14  # equal-mass bins
    # soft targets: loop reference with acc = q[argmax]
    target = random_probs(rng, (2, 8, 8), 4)
    acc_soft = target.reshape(-1, 4)[np.arange(128), probs.reshape(-1, 4).argmax(-1)]
    got_soft = metrics.expected_calibration_error_soft(probs, target, 10, strategy=strategy)
    assert got_soft == pytest.approx(ref_ece(conf, acc_soft, edges), abs=1e-6)


def test_ece_ignore_label_and_soft_onehot_equivalence():
    rng = np.random.default_rng(9)
    probs = random_probs(rng, (40,), 3)
    labels = rng.integers(0, 3, size=40)
    masked = labels.copy()
    masked[::4] = 255
    keep = masked != 255
    got = metrics.expected_calibration_error(probs, masked, 5, ignore_label=255)
    assert got == pytest.approx(metrics.expected_calibration_error(probs[keep], labels[keep], 5))
    onehot = np.eye(3)[labels]
    assert metrics.expected_calibration_error_soft(probs, onehot, 5) == pytest.approx(
        metrics.expected_calibration_error(probs, labels, 5)
    )


@pytest.mark.parametrize("strategy", ["uniform", "quantile"])
def test_ece_calibrated_predictor_is_near_zero(strategy):
    # Draw confidence p, then make the predicted class right with probability p.
    rng = np.random.default_rng(10)
    n = 60_000
    p = rng.uniform(0.5, 1.0, size=n)
    pred = rng.integers(0, 2, size=n)
    probs = np.where(pred[:, None] == 0, np.stack([p, 1 - p], -1), np.stack([1 - p, p], -1))
    correct = rng.uniform(size=n) < p
    labels = np.where(correct, pred, 1 - pred)
    ece = metrics.expected_calibration_error(probs, labels, 10, strategy=strategy)
    assert 0.0 <= ece < 0.02
    # overconfident by 0.2: the same test must detect it
    overconfident = rng.uniform(size=n) < p - 0.2
    labels_bad = np.where(overconfident, pred, 1 - pred)
    ece_bad = metrics.expected_calibration_error(probs, labels_bad, 10, strategy=strategy)
    assert 0.15 < ece_bad <= 1.0


def test_ece_in_unit_interval_for_random_inputs():
    rng = np.random.default_rng(11)
    for scale in (0.1, 1.0, 10.0):
        probs = random_probs(rng, (100,), 5, scale=scale)
        labels = rng.integers(0, 5, size=100)
        assert 0.0 <= metrics.expected_calibration_error(probs, labels) <= 1.0


# ================================================================================================
# NLL and Brier
# ================================================================================================


def test_nll_and_brier_hand_computed():
    probs = np.array([[0.5, 0.5], [0.25, 0.75]])
    labels = np.array([0, 1])
    # NLL = (-ln .5 - ln .75) / 2 = (0.693147 + 0.287682) / 2
    assert metrics.negative_log_likelihood(probs, labels) == pytest.approx(0.4904146, abs=1e-6)
    # Brier = ((.5-1)^2 + .5^2 + .25^2 + (.75-1)^2) / 2 = (.5 + .125) / 2
    assert metrics.brier_score(probs, labels) == pytest.approx(0.3125)
    # soft targets q = [[1,0],[.25,.75]]:
    # NLL = (ln 2 + (.25 ln 4 + .75 ln(4/3))) / 2 = (0.693147 + 0.562335) / 2
    soft = np.array([[1.0, 0.0], [0.25, 0.75]])
    assert metrics.negative_log_likelihood(probs, soft) == pytest.approx(0.6277411, abs=1e-6)
    # Brier = (.5 + 0) / 2 (the second pixel matches its target exactly)
    assert metrics.brier_score(probs, soft) == pytest.approx(0.25)
    # ignoring the second pixel leaves NLL ln 2 and Brier .5
    assert metrics.negative_log_likelihood(probs, [0, 9], ignore_label=9) == pytest.approx(
        np.log(2)
    )
    assert metrics.brier_score(probs, [0, 9], ignore_label=9) == pytest.approx(0.5)
    # eps clips p=0 to eps: -ln(1e-12)
    assert metrics.negative_log_likelihood([[1.0, 0.0]], [1]) == pytest.approx(-np.log(1e-12))


def test_nll_and_brier_match_loop_reference():
    rng = np.random.default_rng(12)
    probs = random_probs(rng, (2, 4, 4), 3)
    labels = rng.integers(0, 3, size=(2, 4, 4))
    target = random_probs(rng, (2, 4, 4), 3)
    nll, brier, nll_soft, brier_soft = [], [], [], []
    for idx in np.ndindex(2, 4, 4):
        p, y, q = probs[idx].astype(float), labels[idx], target[idx].astype(float)
        nll.append(-np.log(p[y]))
        brier.append(sum((p[c] - (c == y)) ** 2 for c in range(3)))
        nll_soft.append(-sum(q[c] * np.log(p[c]) for c in range(3)))
        brier_soft.append(sum((p[c] - q[c]) ** 2 for c in range(3)))
    assert metrics.negative_log_likelihood(probs, labels) == pytest.approx(np.mean(nll))
    assert metrics.brier_score(probs, labels) == pytest.approx(np.mean(brier))
    assert metrics.negative_log_likelihood(probs, target) == pytest.approx(np.mean(nll_soft))
    assert metrics.brier_score(probs, target) == pytest.approx(np.mean(brier_soft))
