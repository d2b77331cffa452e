"""Tests for `tfp_seg.metrics.selective`: risk-coverage curves, AURC, E-AURC, AUGRC and the
pixel / image level inputs, against deliberately unvectorised loops of the definitions."""

import itertools
import math

import numpy as np
import pytest
import tensorflow as tf

from tests.metrics._references import ref_auroc
from tfp_seg import metrics

# ================================================================================================
# Loop references (the definitions, written out)
# ================================================================================================


def ref_curve(kappa, e):
    """One point per distinct confidence, decreasing: accept kappa >= t."""
    kappa, e = np.ravel(kappa), np.ravel(e)
    n = kappa.size
    points = []
    for t in sorted(set(kappa.tolist()), reverse=True):
        accepted = [i for i in range(n) if kappa[i] >= t]
        loss = sum(e[i] for i in accepted)
        points.append((t, len(accepted) / n, loss / len(accepted), loss / n))
    return points


def ref_aurc(kappa, e):
    """(1 / n) sum_i r(kappa_i): every item holds the risk of the threshold at its confidence."""
    kappa, e = np.ravel(kappa), np.ravel(e)
    total = 0.0
    for i in range(kappa.size):
        accepted = [e[j] for j in range(kappa.size) if kappa[j] >= kappa[i]]
        total += sum(accepted) / len(accepted)
    return total / kappa.size


def ref_optimal_aurc(e):
    e = sorted(np.ravel(e).tolist())
    return float(np.mean([sum(e[:k]) / k for k in range(1, len(e) + 1)]))


def ref_augrc_pairs(kappa, e):
    """(1 / n^2) sum_i sum_j e_i (1{kappa_j < kappa_i} + 1/2 1{kappa_j = kappa_i})."""
    kappa, e = np.ravel(kappa), np.ravel(e)
    n = kappa.size
    total = 0.0
    for i in range(n):
        for j in range(n):
            if kappa[j] < kappa[i]:
                total += e[i]
            elif kappa[j] == kappa[i]:
                total += 0.5 * e[i]
    return total / n**2


def ref_augrc_untied(order_e):
    """Trapezoid from the origin with one point per item, items accepted in the given order."""
    n = len(order_e)
    g_prev, total, loss = 0.0, 0.0, 0.0
    for x in order_e:
        loss += x
        g = loss / n
        total += (1.0 / n) * (g + g_prev) / 2.0
        g_prev = g
    return total


def tied_data(rng, n=60, levels=7):
    kappa = rng.integers(0, levels, size=n).astype(np.float64) / levels  # many ties
    e = np.where(rng.uniform(size=n) < 0.5, rng.uniform(size=n), (rng.uniform(size=n) < 0.3))
    return kappa, e.astype(np.float64)


# ================================================================================================
# The curve and its areas
# ================================================================================================


def test_curve_equals_the_loop_with_ties():
    rng = np.random.default_rng(0)
    kappa, e = tied_data(rng)
    curve = metrics.risk_coverage_curve(kappa.reshape(6, 10), e.reshape(6, 10))
    ref = ref_curve(kappa, e)
    assert len(curve["threshold"]) == len(ref) == len(set(kappa.tolist()))
    for j, (t, c, r, g) in enumerate(ref):
        assert curve["threshold"][j] == t
        assert curve["coverage"][j] == pytest.approx(c, abs=1e-12)
        assert curve["risk"][j] == pytest.approx(r, abs=1e-12)
        assert curve["generalized_risk"][j] == pytest.approx(g, abs=1e-12)
        assert curve["count"][j] == round(c * kappa.size)
    assert curve["coverage"][-1] == 1.0


@pytest.mark.parametrize("seed", range(5))
def test_areas_equal_the_loop_definitions_with_ties(seed):
    rng = np.random.default_rng(seed)
    kappa, e = tied_data(rng, n=40 + 10 * seed, levels=3 + seed)
    assert metrics.aurc(kappa, e) == pytest.approx(ref_aurc(kappa, e), abs=1e-12)
    assert metrics.e_aurc(kappa, e) == pytest.approx(
        ref_aurc(kappa, e) - ref_optimal_aurc(e), abs=1e-12
    )
    assert metrics.augrc(kappa, e) == pytest.approx(ref_augrc_pairs(kappa, e), abs=1e-12)
    scores = metrics.selective_scores(kappa, e)
    assert scores == pytest.approx(
        {
            "aurc": metrics.aurc(kappa, e),
            "e_aurc": metrics.e_aurc(kappa, e),
            "augrc": ref_augrc_pairs(kappa, e),
        },
        abs=1e-12,
    )
    # Ties make E-AURC larger, never negative: a tie group's risk >= the optimum in its slice.
    assert scores["e_aurc"] >= -1e-12


def test_aurc_without_ties_is_the_mean_selective_risk_over_k_over_n():
    rng = np.random.default_rng(1)
    kappa = rng.permutation(30).astype(np.float64)
    e = rng.uniform(size=30)
    order = np.argsort(-kappa)
    classic = np.mean([e[order[:k]].mean() for k in range(1, 31)])
    assert metrics.aurc(kappa, e) == pytest.approx(classic, abs=1e-12)


def test_augrc_is_the_mean_over_tie_breaks_of_the_untied_area():
    # Exact enumeration of every order of the tied items (3! * 2! * 3! = 72 orders).
    kappa = np.array([0.9, 0.9, 0.9, 0.5, 0.5, 0.1, 0.1, 0.1])
    e = np.array([1.0, 0.0, 0.25, 1.0, 0.5, 0.0, 1.0, 0.75])
    groups = [np.flatnonzero(kappa == t) for t in (0.9, 0.5, 0.1)]
    areas = []
    for perms in itertools.product(*(itertools.permutations(g) for g in groups)):
        order = [i for p in perms for i in p]
        areas.append(ref_augrc_untied(e[order]))
    assert len(areas) == 72
    assert metrics.augrc(kappa, e) == pytest.approx(np.mean(areas), abs=1e-12)


def test_augrc_closed_form_for_binary_errors():
    # Traub et al. 2024: AUGRC = (1 - AUROC_f) r (1 - r) + r^2 / 2, ties counted 1/2.
    rng = np.random.default_rng(2)
    kappa = np.round(rng.normal(size=200), 1)
    failed = rng.uniform(size=200) < 1 / (1 + np.exp(2 * kappa))
    r = failed.mean()
    auroc = ref_auroc(kappa[~failed], kappa[failed])  # confidence: correct above failed
    expected = (1 - auroc) * r * (1 - r) + r**2 / 2
    assert metrics.augrc(kappa, failed) == pytest.approx(expected, abs=1e-12)


def test_hand_computed_values():
    # kappa 3, 2, 2, 1 with errors 0, 1, 0, 1: points (c, r, g) = (1/4, 0, 0), (3/4, 1/3, 1/4),
    # (1, 1/2, 1/2).
    kappa, e = [3, 2, 2, 1], [0, 1, 0, 1]
    assert metrics.aurc(kappa, e) == pytest.approx(0.25 * 0 + 0.5 * (1 / 3) + 0.25 * 0.5)
    # optimal: errors 0, 0, 1, 1 -> risks 0, 0, 1/3, 1/2
    assert metrics.e_aurc(kappa, e) == pytest.approx(
        0.5 / 3 + 0.125 - (1 / 3 + 1 / 2) / 4, abs=1e-12
    )
    augrc = 0.25 * (0 + 0) / 2 + 0.5 * (0 + 0.25) / 2 + 0.25 * (0.25 + 0.5) / 2
    assert metrics.augrc(kappa, e) == pytest.approx(augrc)
    assert metrics.risk_at_coverage(kappa, e, 0.25) == 0.0
    assert metrics.risk_at_coverage(kappa, e, 0.5) == pytest.approx(1 / 3)  # ties: 3/4 reached
    assert metrics.risk_at_coverage(kappa, e, 1.0) == 0.5
    assert metrics.coverage_at_risk(kappa, e, 0.0) == 0.25
    assert metrics.coverage_at_risk(kappa, e, 0.4) == 0.75
    assert metrics.coverage_at_risk(kappa, e, 0.5) == 1.0
    assert metrics.coverage_at_risk([1, 1], [1, 1], 0.5) == 0.0


def test_optimal_and_perfect_rankings():
    rng = np.random.default_rng(3)
    e = rng.uniform(size=50)
    assert metrics.e_aurc(-e, e) == pytest.approx(0.0, abs=1e-12)  # ranked by the loss itself
    assert metrics.aurc(-e, e) == pytest.approx(ref_optimal_aurc(e), abs=1e-12)
    # 0/1 errors, F failures after S successes: AURC* = (1/n) sum_{k > S} (k - S) / k.
    failed = np.r_[np.zeros(30), np.ones(10)]
    closed = sum((k - 30) / k for k in range(31, 41)) / 40
    distinct = -failed - 1e-3 * np.arange(40)  # successes first, every item its own confidence
    assert metrics.aurc(distinct, failed) == pytest.approx(closed, abs=1e-12)
    assert metrics.e_aurc(distinct, failed) == pytest.approx(0.0, abs=1e-12)
    # Tied failures are accepted together: the last slice holds their joint risk 10/40.
    assert metrics.aurc(-failed, failed) == pytest.approx(10 / 40 * 10 / 40, abs=1e-12)
    assert metrics.e_aurc(-failed, failed) == pytest.approx(1 / 16 - closed, abs=1e-12)
    assert metrics.augrc(-failed, failed) == pytest.approx(0.5 * 0.25**2, abs=1e-12)
    # The worst ranking: failures first.
    assert metrics.augrc(failed, failed) == pytest.approx(0.25 * 0.75 + 0.5 * 0.25**2)


def test_a_random_score_has_mean_aurc_equal_to_the_error_rate():
    # For a confidence independent of the errors every selective risk has expectation r, so
    # E[AURC] = r; 400 repetitions, within 3 standard errors of the mean.
    rng = np.random.default_rng(4)
    r, n = 0.3, 50
    values = []
    for _ in range(400):
        e = (rng.uniform(size=n) < r).astype(float)
        values.append(metrics.aurc(rng.uniform(size=n), e) - e.mean())
    values = np.asarray(values)
    assert abs(values.mean()) <= 3 * values.std(ddof=1) / math.sqrt(values.size)
    assert values.std() > 0  # the test has power: the statistic varies


def test_order_and_monotone_transforms_do_not_matter():
    rng = np.random.default_rng(5)
    kappa, e = tied_data(rng)
    perm = rng.permutation(kappa.size)
    for fn in (metrics.aurc, metrics.e_aurc, metrics.augrc):
        base = fn(kappa, e)
        assert fn(kappa[perm], e[perm]) == pytest.approx(base, abs=1e-12)
        assert fn(np.exp(3 * kappa), e) == pytest.approx(base, abs=1e-12)
        assert fn(tf.constant(kappa), tf.constant(e)) == pytest.approx(base, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_risk_at_coverage_and_coverage_at_risk_equal_the_loop(seed):
    rng = np.random.default_rng(10 + seed)
    kappa, e = tied_data(rng, n=50, levels=6)
    ref = ref_curve(kappa, e)
    for target in rng.uniform(0.01, 1.0, size=20).tolist() + [1.0]:
        expected = next(r for _, c, r, _ in ref if c >= target)
        assert metrics.risk_at_coverage(kappa, e, target) == pytest.approx(expected, abs=1e-12)
    for target in rng.uniform(0.0, 1.0, size=20).tolist() + [0.0, 1.0]:
        covered = [c for _, c, r, _ in ref if r <= target]
        expected = max(covered) if covered else 0.0
        assert metrics.coverage_at_risk(kappa, e, target) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(
    "args, match",
    [
        (([0.1, 0.2], [0.0]), "`errors` must have the same shape"),
        (([0.1, np.nan], [0.0, 1.0]), "`confidence` contains NaN"),
        (([0.1, 0.2], [0.0, 1.5]), r"`errors` must hold per-item losses in \[0, 1\]"),
        (([0.1, 0.2], [0.0, -0.1]), r"`errors` must hold per-item losses in \[0, 1\]"),
        (([], []), "`confidence` must not be empty"),
        ((["a", "b"], [0, 1]), "`confidence` must be a real array"),
    ],
)
def test_bad_inputs_name_the_argument(args, match):
    for fn in (metrics.aurc, metrics.e_aurc, metrics.augrc, metrics.risk_coverage_curve):
        with pytest.raises(ValueError, match=match):
            fn(*args)


@pytest.mark.parametrize("value", [0.0, 1.5, float("nan"), True, "0.5"])
def test_bad_targets_name_the_argument(value):
    with pytest.raises(ValueError, match=r"`coverage` must be a float in \(0, 1\]"):
        metrics.risk_at_coverage([1, 2], [0, 1], value)
    if value != 0.0:
        with pytest.raises(ValueError, match=r"`risk` must be a float in \[0, 1\]"):
            metrics.coverage_at_risk([1, 2], [0, 1], value)


# ================================================================================================
# Pixel and image level inputs
# ================================================================================================


def test_pixel_confidence_errors():
    rng = np.random.default_rng(6)
    probs = rng.dirichlet(np.ones(3), size=(2, 4, 5))
    labels = rng.integers(0, 3, size=(2, 4, 5))
    labels[0, 0, :] = 255
    conf, err = metrics.pixel_confidence_errors(probs, labels, ignore_label=255)
    keep = labels != 255
    assert conf.shape == err.shape == (int(keep.sum()),)
    np.testing.assert_allclose(conf, probs.max(-1)[keep])
    np.testing.assert_array_equal(err, (probs.argmax(-1) != labels)[keep].astype(float))
    # error rate at full coverage = 1 - pixel accuracy
    assert metrics.risk_at_coverage(conf, err, 1.0) == pytest.approx(
        1 - metrics.pixel_accuracy(probs.argmax(-1), labels, ignore_label=255)
    )
    with pytest.raises(ValueError, match="`labels` must have shape probs.shape"):
        metrics.pixel_confidence_errors(probs, labels[..., :3])
    with pytest.raises(ValueError, match="no valid pixels"):
        metrics.pixel_confidence_errors(probs, np.full_like(labels, 255), ignore_label=255)


def ref_dice_risk(pred, label, num_classes):
    dice = []
    for c in range(1, num_classes):
        a, b = pred == c, label == c
        if a.sum() + b.sum():
            dice.append(2 * (a & b).sum() / (a.sum() + b.sum()))
    return 1 - np.mean(dice) if dice else 0.0


def test_image_confidence_risks_against_the_loop():
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.ones(3) * 0.5, size=(4, 6, 6))
    labels = rng.integers(0, 3, size=(4, 2, 6, 6))  # K = 2 annotations
    pred = probs.argmax(-1)
    labels[1] = 0
    probs[1] = np.array([0.9, 0.05, 0.05])  # no foreground anywhere: risk 0
    pred = probs.argmax(-1)
    conf, risks = metrics.image_confidence_risks(probs, labels)
    entropy = -(probs * np.log(probs)).sum(-1).reshape(4, -1).mean(1)
    np.testing.assert_allclose(conf, -entropy)
    expected = [np.mean([ref_dice_risk(pred[b], y, 3) for y in labels[b]]) for b in range(4)]
    np.testing.assert_allclose(risks, expected, atol=1e-12)
    assert risks[1] == 0.0
    # One label map per image, a given uncertainty map, a given score.
    _, single = metrics.image_confidence_risks(probs, labels[:, 0])
    np.testing.assert_allclose(single, [ref_dice_risk(pred[b], labels[b, 0], 3) for b in range(4)])
    u = rng.uniform(size=(4, 6, 6))
    conf_u, _ = metrics.image_confidence_risks(probs, labels, uncertainty=u)
    np.testing.assert_allclose(conf_u, -u.reshape(4, -1).mean(1))
    score = np.array([3.0, 1.0, 2.0, 0.0])
    conf_s, _ = metrics.image_confidence_risks(probs, labels, confidence=score)
    np.testing.assert_array_equal(conf_s, score)
    # Ignored pixels leave Dice: a perfect prediction outside them has risk 0.
    perfect = np.eye(3)[labels[:, 0]] * 0.98 + 0.02 / 3
    ignored = labels[:, 0].copy()
    ignored[:, :2] = 255
    perfect[:, :2] = np.array([0.02 / 3, 0.98 + 0.02 / 3, 0.02 / 3])
    _, r = metrics.image_confidence_risks(perfect, ignored, ignore_label=255)
    np.testing.assert_allclose(r, 0.0, atol=1e-12)


def test_image_confidence_risks_volumes_and_errors():
    rng = np.random.default_rng(8)
    probs = rng.dirichlet(np.ones(2), size=(3, 2, 4, 4))  # [B, D, H, W, C]
    labels = rng.integers(0, 2, size=(3, 2, 4, 4))
    conf, risks = metrics.image_confidence_risks(probs, labels)
    pred = probs.argmax(-1)
    np.testing.assert_allclose(risks, [ref_dice_risk(pred[b], labels[b], 2) for b in range(3)])
    assert conf.shape == (3,)
    with pytest.raises(ValueError, match="`labels` must have shape"):
        metrics.image_confidence_risks(probs, labels[:, :1])
    with pytest.raises(ValueError, match="at most one of `uncertainty` and `confidence`"):
        metrics.image_confidence_risks(probs, labels, uncertainty=conf, confidence=conf)
    with pytest.raises(ValueError, match=r"`confidence` must be a per-image score \[B\]"):
        metrics.image_confidence_risks(probs, labels, confidence=np.ones(4))
    with pytest.raises(ValueError, match="`uncertainty` must be per pixel"):
        metrics.image_confidence_risks(probs, labels, uncertainty=np.ones((3, 4)))
    with pytest.raises(ValueError, match="`probs` must have rank >= 3"):
        metrics.image_confidence_risks(probs[:, 0, 0, 0], labels[:, 0, 0, 0])
