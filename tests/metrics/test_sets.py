"""Tests for `tfp_seg.metrics.sets`: IoU distance, GED, diversity, Hungarian-matched IoU."""

import numpy as np
import pytest
import tensorflow as tf

from tests.metrics._references import (
    ref_ged,
    ref_hungarian,
    ref_iou_distance,
    ref_weighted_mean_distance,
)
from tfp_seg import metrics

# ================================================================================================
# IoU distance
# ================================================================================================


def test_iou_distance_hand_computed():
    a = np.array([[0, 1, 1], [2, 2, 0]])
    b = np.array([[0, 1, 0], [2, 2, 2]])
    # class 1: a={(0,1),(0,2)}, b={(0,1)} -> I=1, U=2, IoU 1/2
    # class 2: a={(1,0),(1,1)}, b={(1,0),(1,1),(1,2)} -> I=2, U=3, IoU 2/3
    # d = 1 - (1/2 + 2/3) / 2 = 5/12
    assert metrics.iou_distance(a, b, 3) == pytest.approx(5 / 12)
    # class 1 identical (IoU 1); class 2 only in a (IoU 0) -> d = 1 - 1/2
    assert metrics.iou_distance(np.array([[1, 2]]), np.array([[1, 0]]), 3) == pytest.approx(0.5)
    # class 1 only in a; class 2 absent from both and not averaged -> d = 1
    assert metrics.iou_distance(np.array([[1, 0]]), np.array([[0, 0]]), 3) == pytest.approx(1.0)
    # no foreground in either mask -> d = 0 by convention
    assert metrics.iou_distance(np.zeros((2, 2), int), np.zeros((2, 2), int), 3) == 0.0


def test_pairwise_iou_distance_matches_loop_and_accepts_tensors():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 4, size=(5, 6, 7))
    y = rng.integers(0, 4, size=(3, 6, 7))
    x[0] = 0  # an all-background mask
    y[1] = 0
    y[2] = np.where(y[2] == 3, 0, y[2])  # a class missing from one mask
    expected = np.array([[ref_iou_distance(a, b, 4) for b in y] for a in x])
    got = metrics.pairwise_iou_distance(x, y, 4)
    assert got.shape == (5, 3)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert got[0, 1] == 0.0
    got_tf = metrics.pairwise_iou_distance(tf.constant(x), tf.constant(y), 4)
    np.testing.assert_allclose(got_tf, expected, atol=1e-12)
    assert metrics.iou_distance(x[2], y[0], 4) == pytest.approx(expected[2, 0])
    self_d = metrics.pairwise_iou_distance(x, x, 4)
    np.testing.assert_allclose(self_d, self_d.T, atol=1e-12)
    np.testing.assert_allclose(np.diag(self_d), 0.0, atol=1e-12)


# ================================================================================================
# GED and diversity
# ================================================================================================


def test_ged_hand_computed():
    # 1x2 images, C=2. S1=[1,0], S2=[1,1], Y1=[1,0].
    # d(S1,Y1)=0; d(S2,Y1)=1-1/2=1/2 -> cross = (0 + 1/2)/2 = 1/4
    # D_SS = [[0, 1/2], [1/2, 0]] -> sample diversity = 1/4; reference diversity = 0
    # GED = 2 * 1/4 - 1/4 - 0 = 1/4
    s = np.array([[[1, 0]], [[1, 1]]])
    y = np.array([[[1, 0]]])
    terms = metrics.generalized_energy_distance(s, y, 2, return_terms=True)
    assert terms["ged"] == pytest.approx(0.25)
    assert terms["cross"] == pytest.approx(0.25)
    assert terms["sample_diversity"] == pytest.approx(0.25)
    assert terms["reference_diversity"] == 0.0
    assert metrics.generalized_energy_distance(s, y, 2) == pytest.approx(0.25)
    assert metrics.diversity(s, 2) == pytest.approx(0.25)


def test_ged_weighted_hand_computed():
    # S1=[1,0]; references Y1=[1,0] (w=3/4), Y2=[0,0] (w=1/4); C=2.
    # d(S1,Y1)=0, d(S1,Y2)=1 (class 1 only in S1) -> cross = 1/4
    # D_YY = [[0,1],[1,0]] (two empty masks: 0) -> w^T D w = 2 * 3/4 * 1/4 = 3/8
    # GED = 2 * 1/4 - 0 - 3/8 = 1/8
    s = np.array([[[1, 0]]])
    y = np.array([[[1, 0]], [[0, 0]]])
    terms = metrics.generalized_energy_distance(
        s, y, 2, reference_weights=[0.75, 0.25], return_terms=True
    )
    assert terms["cross"] == pytest.approx(0.25)
    assert terms["reference_diversity"] == pytest.approx(0.375)
    assert terms["sample_diversity"] == 0.0
    assert terms["ged"] == pytest.approx(0.125)


def test_ged_matches_loop_reference():
    rng = np.random.default_rng(1)
    s = rng.integers(0, 3, size=(4, 5, 5))
    y = rng.integers(0, 3, size=(3, 5, 5))
    s[1] = 0
    expected = ref_ged(s, y, 3)
    assert metrics.generalized_energy_distance(s, y, 3) == pytest.approx(expected, abs=1e-12)


def test_ged_identical_sets_is_zero():
    rng = np.random.default_rng(2)
    s = rng.integers(0, 4, size=(2, 5, 6, 6))  # batched: B=2, N=K=5
    terms = metrics.generalized_energy_distance(s, s, 4, return_terms=True)
    assert terms["ged"] == pytest.approx(0.0, abs=1e-12)
    assert terms["sample_diversity"] > 0.1  # the sets are diverse, so 0 is not trivial
    w = np.array([0.1, 0.2, 0.3, 0.15, 0.25])
    assert metrics.generalized_energy_distance(
        s, s, 4, reference_weights=w, sample_weights=w
    ) == pytest.approx(0.0, abs=1e-12)
    assert metrics.generalized_energy_distance(s, s[:, :2], 4) > 0.01


def test_ged_weighted_matches_explicit_weighted_pairs():
    rng = np.random.default_rng(3)
    s = rng.integers(0, 3, size=(4, 5, 5))
    y = rng.integers(0, 3, size=(3, 5, 5))
    wr = np.array([0.5, 0.3, 0.2])
    ws = np.array([0.1, 0.2, 0.3, 0.4])
    expected = ref_ged(s, y, 3, ws=ws, wr=wr)
    got = metrics.generalized_energy_distance(s, y, 3, reference_weights=wr, sample_weights=ws)
    assert got == pytest.approx(expected, abs=1e-12)
    # uniform weights must differ here, so the weighting is really applied
    assert abs(metrics.generalized_energy_distance(s, y, 3) - expected) > 1e-4


def test_ged_integer_weights_equal_repeated_references():
    rng = np.random.default_rng(4)
    s = rng.integers(0, 3, size=(4, 6, 6))
    y = rng.integers(0, 3, size=(3, 6, 6))
    counts = np.array([1, 2, 3])
    repeated = np.repeat(y, counts, axis=0)
    weighted = metrics.generalized_energy_distance(
        s, y, 3, reference_weights=counts / counts.sum(), return_terms=True
    )
    unweighted = metrics.generalized_energy_distance(s, repeated, 3, return_terms=True)
    for key in weighted:
        assert weighted[key] == pytest.approx(unweighted[key], abs=1e-12)


def test_ged_permutation_symmetry_and_batch_average():
    rng = np.random.default_rng(5)
    s = rng.integers(0, 3, size=(2, 4, 5, 5))
    y = rng.integers(0, 3, size=(2, 3, 5, 5))
    w = np.array([[0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    base = metrics.generalized_energy_distance(s, y, 3, reference_weights=w)
    ps, py = rng.permutation(4), rng.permutation(3)
    permuted = metrics.generalized_energy_distance(
        s[:, ps], y[:, py], 3, reference_weights=w[:, py]
    )
    assert permuted == pytest.approx(base, abs=1e-12)
    per_image = [
        metrics.generalized_energy_distance(s[b], y[b], 3, reference_weights=w[b]) for b in range(2)
    ]
    assert base == pytest.approx(np.mean(per_image), abs=1e-12)
    expected = np.mean([ref_ged(s[b], y[b], 3, wr=w[b]) for b in range(2)])
    assert base == pytest.approx(expected, abs=1e-12)


def test_diversity_matches_loop_and_ged_term():
    rng = np.random.default_rng(6)
    s = rng.integers(0, 3, size=(2, 4, 5, 5))
    expected = np.mean(
        [ref_weighted_mean_distance(x, x, np.full(4, 0.25), np.full(4, 0.25), 3) for x in s]
    )
    assert metrics.diversity(s, 3) == pytest.approx(expected, abs=1e-12)
    terms = metrics.generalized_energy_distance(s, s[:, :1], 3, return_terms=True)
    assert terms["sample_diversity"] == pytest.approx(expected, abs=1e-12)


# ================================================================================================
# Hungarian-matched IoU
# ================================================================================================


def test_hungarian_matched_iou_hand_computed():
    # 1x2 images, C=2. References Y1=[1,0], Y2=[0,1], tiled to [Y1,Y2,Y1,Y2].
    # Samples S1=S2=[1,0], S3=[1,1], S4=[0,1]; IoU(S1,Y1)=1, IoU(S1,Y2)=0, IoU(S3,Y*)=1/2,
    # IoU(S4,Y1)=0, IoU(S4,Y2)=1. Best: S1,S2->Y1 copies, S3,S4->Y2 copies:
    # (1 + 1 + 1/2 + 1) / 4 = 0.875 (putting S3 on Y1 forces an IoU-0 match: 2.5/4).
    s = np.array([[[1, 0]], [[1, 0]], [[1, 1]], [[0, 1]]])
    y = np.array([[[1, 0]], [[0, 1]]])
    assert metrics.hungarian_matched_iou(s, y, 2) == pytest.approx(0.875)
    assert metrics.hungarian_matched_iou(y, s, 2) == pytest.approx(0.875)  # smaller set tiled
    assert metrics.hungarian_matched_iou(s, s, 2) == pytest.approx(1.0)


@pytest.mark.parametrize("n,k", [(3, 2), (2, 4), (3, 3)])
def test_hungarian_matched_iou_matches_brute_force(n, k):
    rng = np.random.default_rng(7 + n + k)
    s = rng.integers(0, 3, size=(2, n, 5, 5))
    y = rng.integers(0, 3, size=(2, k, 5, 5))
    expected = np.mean([ref_hungarian(s[b], y[b], 3) for b in range(2)])
    assert metrics.hungarian_matched_iou(s, y, 3) == pytest.approx(expected, abs=1e-12)
