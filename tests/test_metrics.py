"""Tests for `tfp_seg.metrics`: hand-computed cases, loop references, properties, validation."""

import itertools
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_seg import layers, metrics, models

# ================================================================================================
# Straightforward loop references (deliberately unvectorised)
# ================================================================================================


def ref_iou_distance(a, b, num_classes):
    ious = []
    for c in range(1, num_classes):
        inter = np.logical_and(a == c, b == c).sum()
        union = np.logical_or(a == c, b == c).sum()
        if union > 0:
            ious.append(inter / union)
    return 0.0 if not ious else 1.0 - float(np.mean(ious))


def ref_weighted_mean_distance(x, y, wx, wy, num_classes):
    total = 0.0
    for i in range(len(x)):
        for j in range(len(y)):
            total += wx[i] * wy[j] * ref_iou_distance(x[i], y[j], num_classes)
    return total


def ref_ged(samples, references, num_classes, ws=None, wr=None):
    n, k = len(samples), len(references)
    ws = np.full(n, 1.0 / n) if ws is None else ws
    wr = np.full(k, 1.0 / k) if wr is None else wr
    cross = ref_weighted_mean_distance(samples, references, ws, wr, num_classes)
    ss = ref_weighted_mean_distance(samples, samples, ws, ws, num_classes)
    rr = ref_weighted_mean_distance(references, references, wr, wr, num_classes)
    return 2 * cross - ss - rr


def ref_hungarian(samples, references, num_classes):
    # Both sets replicated to lcm(N, K), then brute force over all one-to-one matchings.
    size = math.lcm(len(samples), len(references))
    s = [samples[i // (size // len(samples))] for i in range(size)]
    r = [references[i // (size // len(references))] for i in range(size)]
    best = -1.0
    for perm in itertools.permutations(range(size)):
        iou = np.mean([1 - ref_iou_distance(s[i], r[perm[i]], num_classes) for i in range(size)])
        best = max(best, iou)
    return best


def ref_ece(conf, acc, edges):
    total = 0.0
    for b in range(len(edges) - 1):
        lo, hi = edges[b], edges[b + 1]
        in_bin = [(c > lo or (b == 0 and c == lo)) and c <= hi for c in conf]
        idx = [i for i, flag in enumerate(in_bin) if flag]
        if idx:
            total += len(idx) / len(conf) * abs(np.mean(acc[idx]) - np.mean(conf[idx]))
    return total


def ref_auroc(u_ood, u_id):
    score = 0.0
    for a in u_ood:
        for b in u_id:
            score += 1.0 if a > b else (0.5 if a == b else 0.0)
    return score / (len(u_ood) * len(u_id))


def ref_aupr_fpr95(u, y):
    thresholds = sorted(set(u.tolist()), reverse=True)
    ap, prev_recall, fpr95 = 0.0, 0.0, None
    for t in thresholds:
        flagged = u >= t
        tp = np.sum(flagged & y)
        fp = np.sum(flagged & ~y)
        recall = tp / y.sum()
        ap += (recall - prev_recall) * tp / (tp + fp)
        prev_recall = recall
        if fpr95 is None and recall >= 0.95:
            fpr95 = fp / (~y).sum()
    return ap, fpr95


def softmax(z):
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def random_probs(rng, shape, num_classes, scale=2.0):
    return softmax(scale * rng.normal(size=(*shape, num_classes))).astype(np.float32)


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


# ================================================================================================
# mIoU and pixel accuracy
# ================================================================================================


def test_mean_iou_and_pixel_accuracy_hand_computed():
    pred = np.array([0, 1, 1, 2])
    labels = np.array([0, 1, 2, 2])
    # class 0: I=1, U=1 -> 1; class 1: pred {1,2}, label {1} -> 1/2;
    # class 2: pred {3}, label {2,3} -> 1/2; class 3 absent -> mIoU = 2/3
    miou, per_class = metrics.mean_iou(pred, labels, 4, return_per_class=True)
    assert miou == pytest.approx(2 / 3)
    np.testing.assert_allclose(per_class, [1.0, 0.5, 0.5, np.nan])
    assert metrics.pixel_accuracy(pred, labels) == pytest.approx(0.75)
    cm = metrics.confusion_matrix(pred, labels, 4)
    expected_cm = np.zeros((4, 4), int)
    expected_cm[0, 0] = expected_cm[1, 1] = expected_cm[2, 1] = expected_cm[2, 2] = 1
    np.testing.assert_array_equal(cm, expected_cm)
    # ignoring label 2 drops pixels 2 and 3: perfect on classes 0 and 1
    assert metrics.mean_iou(pred, labels, 4, ignore_label=2) == pytest.approx(1.0)
    assert metrics.pixel_accuracy(pred, labels, ignore_label=2) == pytest.approx(1.0)


def test_mean_iou_matches_loop_reference():
    rng = np.random.default_rng(13)
    pred = rng.integers(0, 5, size=(3, 8, 8))
    labels = rng.integers(0, 4, size=(3, 8, 8))  # class 4 only predicted
    labels[0, :2] = 255
    valid = labels != 255
    ious = []
    for c in range(5):
        p, y = (pred == c) & valid, (labels == c) & valid
        union = (p | y).sum()
        if union:
            ious.append((p & y).sum() / union)
    got = metrics.mean_iou(tf.constant(pred), labels, 5, ignore_label=255)
    assert got == pytest.approx(np.mean(ious))
    assert metrics.pixel_accuracy(pred, labels, ignore_label=255) == pytest.approx(
        np.mean(pred[valid] == labels[valid])
    )


# ================================================================================================
# OOD scores
# ================================================================================================


def test_ood_scores_hand_computed():
    # OOD u = 1..20, ID u = [.5, 1.5, 2.5, 10.5, 30].
    # TPR >= .95 needs 19 of 20 OOD flagged -> largest threshold t = 2;
    # ID with u >= 2: {2.5, 10.5, 30} -> FPR95 = 3/5.
    # AUROC: OOD above each ID value: 20 + 19 + 18 + 10 + 0 = 67 of 100 pairs.
    u = np.r_[np.arange(1, 21), [0.5, 1.5, 2.5, 10.5, 30.0]]
    is_ood = np.r_[np.ones(20, bool), np.zeros(5, bool)]
    scores = metrics.ood_scores(u, is_ood)
    assert scores["fpr95"] == pytest.approx(0.6)
    assert scores["auroc"] == pytest.approx(0.67)
    # ties: OOD [1,2], ID [1,0]: pairs (1,1) 1/2, (1,0) 1, (2,1) 1, (2,0) 1 -> 3.5/4
    assert metrics.ood_scores([1, 2, 1, 0], [1, 1, 0, 0])["auroc"] == pytest.approx(0.875)
    # AP: scores 3 (ood), 2 (id), 1 (ood): (R,P) = (.5,1), (.5,.5), (1,2/3)
    # AP = .5*1 + 0*.5 + .5*2/3 = 5/6
    assert metrics.ood_scores([3, 2, 1], [True, False, True])["aupr"] == pytest.approx(5 / 6)


def test_ood_scores_perfect_separation():
    rng = np.random.default_rng(14)
    u = np.r_[rng.uniform(2, 3, 30), rng.uniform(0, 1, 50)]
    is_ood = np.r_[np.ones(30, bool), np.zeros(50, bool)]
    scores = metrics.ood_scores(u, is_ood)
    assert scores == {"auroc": 1.0, "aupr": 1.0, "fpr95": 0.0}
    reversed_scores = metrics.ood_scores(-u, is_ood)
    assert reversed_scores["auroc"] == 0.0
    assert reversed_scores["fpr95"] == 1.0


def test_ood_scores_match_brute_force():
    rng = np.random.default_rng(15)
    u = np.round(rng.normal(size=(6, 10)), 1)  # rounding creates ties
    is_ood = rng.uniform(size=(6, 10)) < 0.4
    is_ood[0, 0], is_ood[0, 1] = True, False
    scores = metrics.ood_scores(tf.constant(u), is_ood)
    assert scores["auroc"] == pytest.approx(ref_auroc(u[is_ood], u[~is_ood]), abs=1e-12)
    ap, fpr95 = ref_aupr_fpr95(u.reshape(-1), is_ood.reshape(-1))
    assert scores["aupr"] == pytest.approx(ap, abs=1e-12)
    assert scores["fpr95"] == pytest.approx(fpr95, abs=1e-12)


# ================================================================================================
# Streaming Keras metrics
# ================================================================================================

C = 3


def _packed_batches(rng, from_logits, num_batches=3):
    """Three (labels [2,6,6], y_pred [2,6,6,C+2]) batches; extra channels are junk params."""
    batches = []
    for _ in range(num_batches):
        logits = 2.0 * rng.normal(size=(2, 6, 6, C)).astype(np.float32)
        head = logits if from_logits else softmax(logits).astype(np.float32)
        junk = rng.normal(size=(2, 6, 6, 2)).astype(np.float32) + 5.0
        labels = rng.integers(0, C, size=(2, 6, 6))
        labels[:, 0, :2] = 255
        batches.append((labels, np.concatenate([head, junk], axis=-1)))
    return batches


def _batch_reference(batches, from_logits):
    labels = np.concatenate([b[0] for b in batches])
    head = np.concatenate([b[1][..., :C] for b in batches])
    probs = softmax(head.astype(np.float64)) if from_logits else head
    return labels, probs


@pytest.mark.parametrize("from_logits", [False, True])
def test_streaming_metrics_match_batch_functions(from_logits):
    rng = np.random.default_rng(16)
    batches = _packed_batches(rng, from_logits)
    labels, probs = _batch_reference(batches, from_logits)
    pred = probs.argmax(-1)
    kw = {"from_logits": from_logits, "ignore_label": 255}
    streaming = {
        "miou": metrics.StreamingMeanIoU(C, **kw),
        "ece": metrics.StreamingECE(C, num_bins=15, **kw),
        "nll": metrics.StreamingNLL(C, **kw),
        "brier": metrics.StreamingBrier(C, **kw),
    }
    expected = {
        "miou": metrics.mean_iou(pred, labels, C, ignore_label=255),
        "ece": metrics.expected_calibration_error(probs, labels, 15, ignore_label=255),
        "nll": metrics.negative_log_likelihood(probs, labels, ignore_label=255),
        "brier": metrics.brier_score(probs, labels, ignore_label=255),
    }
    for y_true, y_pred in batches:
        for m in streaming.values():
            m.update_state(tf.constant(y_true), tf.constant(y_pred))
    tol = 1e-5 if from_logits else 1e-6
    for key, m in streaming.items():
        assert float(m.result()) == pytest.approx(expected[key], abs=tol), key
    np.testing.assert_array_equal(
        streaming["miou"].confusion_matrix(),
        metrics.confusion_matrix(pred, labels, C, ignore_label=255),
    )
    # a single batch differs from the concatenation, so accumulation is really tested
    first = metrics.brier_score(
        _batch_reference(batches[:1], from_logits)[1], batches[0][0], ignore_label=255
    )
    assert abs(first - expected["brier"]) > 1e-4
    for m in streaming.values():
        m.reset_state()
        assert float(m.result()) == 0.0


def test_streaming_sample_weight_and_label_channel():
    rng = np.random.default_rng(17)
    ((labels, y_pred),) = _packed_batches(rng, from_logits=False, num_batches=1)
    labels = np.where(labels == 255, 0, labels)
    weights = np.zeros((2, 6, 6), np.float32)
    weights[:, 3:] = 1.0
    m = metrics.StreamingNLL(C)
    m.update_state(labels[..., None], y_pred, sample_weight=weights)
    expected = metrics.negative_log_likelihood(y_pred[:, 3:, :, :C], labels[:, 3:])
    assert float(m.result()) == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize(
    "cls,kwargs",
    [
        (metrics.StreamingMeanIoU, {"ignore_label": 255, "from_logits": True}),
        (metrics.StreamingECE, {"num_bins": 7, "from_logits": True, "ignore_label": 4}),
        (metrics.StreamingNLL, {"from_logits": True, "eps": 1e-6}),
        (metrics.StreamingBrier, {"ignore_label": 0}),
    ],
)
def test_streaming_config_round_trip(cls, kwargs):
    m = cls(C, name="custom", **kwargs)
    config = m.get_config()
    assert config["num_classes"] == C and config["name"] == "custom"
    for key, value in kwargs.items():
        assert config[key] == value
    clone = cls.from_config(config)
    assert clone.get_config() == config
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(m))
    assert type(restored) is cls and restored.get_config() == config
    rng = np.random.default_rng(18)
    labels = rng.integers(1, C, size=(2, 4, 4))
    y_pred = rng.normal(size=(2, 4, 4, C + 1)).astype(np.float32)
    if not kwargs.get("from_logits", False):
        y_pred[..., :C] = softmax(y_pred[..., :C])
    m.update_state(labels, y_pred)
    restored.update_state(labels, y_pred)
    assert float(restored.result()) == pytest.approx(float(m.result()))


def test_streaming_metrics_in_compile_and_evaluate():
    rng = np.random.default_rng(19)
    x = rng.normal(size=(12, 6, 6, 2)).astype(np.float32)
    y = rng.integers(0, C, size=(12, 6, 6))
    model = keras.Sequential([keras.Input((6, 6, 2)), keras.layers.Conv2D(C + 2, 1)])
    model.compile(
        optimizer="sgd",
        loss=lambda y_true, y_pred: keras.ops.mean(keras.ops.square(y_pred)),
        metrics=[
            metrics.StreamingMeanIoU(C, from_logits=True),
            metrics.StreamingECE(C, from_logits=True),
            metrics.StreamingNLL(C, from_logits=True),
            metrics.StreamingBrier(C, from_logits=True),
        ],
    )
    model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    logs = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    probs = softmax(model.predict(x, batch_size=4, verbose=0)[..., :C].astype(np.float64))
    assert logs["mean_iou"] == pytest.approx(metrics.mean_iou(probs.argmax(-1), y, C), abs=1e-5)
    assert logs["ece"] == pytest.approx(metrics.expected_calibration_error(probs, y, 15), abs=1e-5)
    assert logs["nll"] == pytest.approx(metrics.negative_log_likelihood(probs, y), abs=1e-5)
    assert logs["brier"] == pytest.approx(metrics.brier_score(probs, y), abs=1e-5)


def _head_batches(rng, head, num_batches=3):
    """(labels [2,6,6], packed params) batches of `head` with large logit variances."""
    batches = []
    for _ in range(num_batches):
        loc = 2.0 * rng.normal(size=(2, 6, 6, C))
        raw_variance = rng.uniform(1.0, 3.0, size=(2, 6, 6, C))  # log sigma^2: sigma ~ 1.6-4.5
        extra = rng.normal(size=(2, 6, 6, head.params_size - 2 * C))  # low-rank factors
        params = np.concatenate([loc, raw_variance, extra], axis=-1).astype(np.float32)
        batches.append((rng.integers(0, C, size=(2, 6, 6)), params))
    return batches


def _reference_scores(probs, labels):
    return {
        "miou": metrics.mean_iou(probs.argmax(-1), labels, C),
        "ece": metrics.expected_calibration_error(probs, labels, 15),
        "nll": metrics.negative_log_likelihood(probs, labels),
        "brier": metrics.brier_score(probs, labels),
    }


def _streaming_set(**kwargs):
    return {
        "miou": metrics.StreamingMeanIoU(C, **kwargs),
        "ece": metrics.StreamingECE(C, num_bins=15, **kwargs),
        "nll": metrics.StreamingNLL(C, **kwargs),
        "brier": metrics.StreamingBrier(C, **kwargs),
    }


HEADS = {
    "heteroscedastic": lambda: layers.HeteroscedasticLogits(C),
    "ssn": lambda: layers.LowRankLogits(C, rank=2),
}


@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_streaming_metrics_with_head_score_the_predictive_distribution(head_name):
    head = HEADS[head_name]()
    batches = _head_batches(np.random.default_rng(20), head)
    labels = np.concatenate([b[0] for b in batches])
    # predict_proba's estimator, batch by batch, with the metrics' (stateless) seed
    probs = np.concatenate(
        [head.mean_probabilities(b[1], num_samples=32, seed=7).numpy() for b in batches]
    ).astype(np.float64)
    mean_logit_probs = softmax(np.concatenate([b[1][..., :C] for b in batches]).astype(np.float64))
    expected = _reference_scores(probs, labels)
    of_mean_logits = _reference_scores(mean_logit_probs, labels)
    streaming = _streaming_set(head=head, num_samples=32, seed=7)
    for y_true, y_pred in batches:
        for m in streaming.values():
            m.update_state(tf.constant(y_true), tf.constant(y_pred))
    for key, m in streaming.items():
        assert float(m.result()) == pytest.approx(expected[key], abs=1e-5), key
    np.testing.assert_array_equal(
        streaming["miou"].confusion_matrix(), metrics.confusion_matrix(probs.argmax(-1), labels, C)
    )
    # ... which is clearly not softmax of the mean logits (the first C channels)
    for key in ("ece", "nll", "brier"):
        assert abs(expected[key] - of_mean_logits[key]) > 0.1, key
    assert np.mean(probs.argmax(-1) != mean_logit_probs.argmax(-1)) > 0.03

    # Fresh noise every batch (seed=None) and many samples: the predictive probabilities
    # within Monte Carlo error (|error of p| ~ 0.5 / sqrt(2000) ~ 0.01 per pixel), far from the
    # mean-logit scores.
    nll = metrics.StreamingNLL(C, head=head, num_samples=2000)
    brier = metrics.StreamingBrier(C, head=head, num_samples=2000)
    for y_true, y_pred in batches:
        nll.update_state(y_true, y_pred)
        brier.update_state(y_true, y_pred)
    assert float(nll.result()) == pytest.approx(expected["nll"], abs=0.03)
    assert float(brier.result()) == pytest.approx(expected["brier"], abs=0.02)


def test_streaming_metrics_without_head_or_not_predictive_score_first_channels():
    head = HEADS["heteroscedastic"]()
    ((labels, params),) = _head_batches(np.random.default_rng(21), head, num_batches=1)
    probs = softmax(params[..., :C].astype(np.float64))
    for kwargs in ({}, {"predictive": False}):
        m = metrics.StreamingNLL(C, from_logits=True, **kwargs)
        m.update_state(labels, params)
        assert m.head is None
        assert float(m.result()) == pytest.approx(
            metrics.negative_log_likelihood(probs, labels), abs=1e-5
        )
    m = metrics.StreamingNLL(C, from_logits=True, predictive=False)
    assert metrics.bind_head([m], head) == [] and m.head is None
    with pytest.raises(ValueError, match="predictive=False"):
        metrics.StreamingNLL(C, head=head, predictive=False)
    with pytest.raises(ValueError, match="num_classes"):
        metrics.StreamingECE(2, head=head)
    with pytest.raises(ValueError, match="head"):
        metrics.StreamingECE(C, head="heteroscedastic")
    with pytest.raises(ValueError, match="seed"):
        metrics.StreamingBrier(C, head=head, seed=1.5)
    with pytest.raises(ValueError, match="packed parameters"):
        metrics.StreamingBrier(C, head=head).update_state(labels, params[..., :C])


def test_bind_head_walks_nested_metrics_and_keeps_a_weightless_copy():
    head = HEADS["ssn"]()
    head.build((None, 4, 4, 5))
    a, b = metrics.StreamingECE(C), metrics.StreamingBrier(C)
    given = metrics.StreamingNLL(C, head=layers.HeteroscedasticLogits(C))
    bound = metrics.bind_head({"out": [a, ("accuracy", b)], "other": given}, head)
    assert {id(m) for m in bound} == {id(a), id(b)}
    assert isinstance(given.head, layers.HeteroscedasticLogits)  # an own head is kept
    for m in (a, b):
        assert m.head is not head and not m.head.weights  # a copy, without the model's weights
        assert m.head.get_config() == head.get_config()


@pytest.mark.parametrize(
    "cls",
    [metrics.StreamingMeanIoU, metrics.StreamingECE, metrics.StreamingNLL, metrics.StreamingBrier],
)
def test_streaming_config_round_trip_with_head(cls):
    m = cls(C, head=HEADS["ssn"](), num_samples=6, seed=5, name="custom")
    config = m.get_config()
    assert config["num_samples"] == 6 and config["seed"] == 5 and config["predictive"] is True
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(m))
    assert type(restored) is cls and restored.get_config() == config
    assert isinstance(restored.head, layers.LowRankLogits) and restored.head.rank == 2
    batches = _head_batches(np.random.default_rng(22), m.head, num_batches=1)
    m.update_state(*batches[0])
    restored.update_state(*batches[0])
    assert float(restored.result()) == pytest.approx(float(m.result()), abs=1e-6)


def test_segmenter_compile_binds_head_and_round_trips(tmp_path):
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(23)
    x = rng.normal(size=(12, 8, 8, 1)).astype(np.float32)
    y = rng.integers(0, C, size=(12, 8, 8))
    model = models.ProbabilisticSegmenter(
        models.UNet(base_filters=4, depth=1), layers.HeteroscedasticLogits(C)
    )
    model.build((None, 8, 8, 1))
    bias = np.zeros(2 * C, np.float32)
    bias[0] = 2.0  # mean logits favour class 0: softmax ~0.8 ...
    bias[C:] = 2.5  # ... but log sigma^2 = 2.5 (sigma ~ 3.5) makes the predictive much flatter
    model.head.projection.bias.assign(bias)
    streaming = _streaming_set(from_logits=True, num_samples=8, seed=3)
    mean_logit_nll = metrics.StreamingNLL(
        C, from_logits=True, predictive=False, name="nll_of_mean_logits"
    )
    model.compile(optimizer="sgd", loss="auto", metrics=[*streaming.values(), mean_logit_nll])
    assert all(isinstance(m.head, layers.HeteroscedasticLogits) for m in streaming.values())
    assert mean_logit_nll.head is None

    logs = model.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    # A seeded streaming metric draws with `seed` in every update (it cannot know the batch
    # index), while predict_proba(batch_size=4) folds the batch index into the seed: the
    # reference is therefore predict_proba batch by batch with the metric's seed.
    probs = np.concatenate(
        [model.predict_proba(x[i : i + 4], num_samples=8, seed=3) for i in range(0, 12, 4)]
    ).astype(np.float64)
    expected = _reference_scores(probs, y)
    names = {"miou": "mean_iou", "ece": "ece", "nll": "nll", "brier": "brier"}
    for key, name in names.items():
        assert logs[name] == pytest.approx(expected[key], abs=1e-5), key
    mean_logit_probs = softmax(model.predict(x, batch_size=4, verbose=0)[..., :C].astype(float))
    assert logs["nll_of_mean_logits"] == pytest.approx(
        metrics.negative_log_likelihood(mean_logit_probs, y), abs=1e-5
    )
    assert abs(logs["nll_of_mean_logits"] - logs["nll"]) > 0.1

    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    loaded_logs = loaded.evaluate(x, y, batch_size=4, verbose=0, return_dict=True)
    for name in [*names.values(), "nll_of_mean_logits"]:
        assert loaded_logs[name] == pytest.approx(logs[name], abs=1e-5), name


# ================================================================================================
# Input validation
# ================================================================================================

_S = np.zeros((2, 3, 3), int)
_P = np.full((4, 2), 0.5)
_Y = np.zeros(4, int)

BAD_INPUTS = [
    (metrics.generalized_energy_distance, (_S.astype(float), _S, 2), {}, "samples"),
    (metrics.generalized_energy_distance, (_S[0], _S, 2), {}, "samples"),
    (metrics.generalized_energy_distance, (_S, _S + 2, 2), {}, "references"),
    (metrics.generalized_energy_distance, (_S, _S[:, :2], 2), {}, "references"),
    (metrics.generalized_energy_distance, (_S[:0], _S, 2), {}, "samples"),
    (metrics.generalized_energy_distance, (_S, _S, 0), {}, "num_classes"),
    (
        metrics.generalized_energy_distance,
        (_S, _S, 2),
        {"reference_weights": [0.5, 0.6]},
        "reference_weights",
    ),
    (
        metrics.generalized_energy_distance,
        (_S, _S, 2),
        {"reference_weights": [1.5, -0.5]},
        "reference_weights",
    ),
    (
        metrics.generalized_energy_distance,
        (_S, _S, 2),
        {"reference_weights": [1.0]},
        "reference_weights",
    ),
    (
        metrics.generalized_energy_distance,
        (_S, _S, 2),
        {"sample_weights": [[0.5, 0.5]]},
        "sample_weights",
    ),
    (metrics.diversity, (_S[0, 0], 2), {}, "samples"),
    (metrics.hungarian_matched_iou, (_S, -_S - 1, 2), {}, "references"),
    (metrics.iou_distance, (_S[0], _S[0, :2], 2), {}, "`a` and `b`"),
    (metrics.pairwise_iou_distance, (_S[0, 0], _S, 2), {}, "`x`"),
    (metrics.expected_calibration_error, (np.full((4, 2), np.nan), _Y), {}, "probs"),
    (metrics.expected_calibration_error, (_P, _Y[:3]), {}, "labels"),
    (metrics.expected_calibration_error, (_P, _Y.astype(float)), {}, "labels"),
    (metrics.expected_calibration_error, (_P, _Y + 2), {}, "labels"),
    (metrics.expected_calibration_error, (_P, _Y), {"strategy": "equal"}, "strategy"),
    (metrics.expected_calibration_error, (_P, _Y), {"num_bins": 0}, "num_bins"),
    (metrics.expected_calibration_error, (_P, _Y + 7), {"ignore_label": 7}, "labels"),
    (metrics.expected_calibration_error, (_P, _P), {}, "labels"),
    (metrics.expected_calibration_error_soft, (_P, _P[:2]), {}, "target_probs"),
    (metrics.negative_log_likelihood, (_P * 3, _Y), {}, "probs"),
    (metrics.negative_log_likelihood, (_P, _Y), {"eps": 0.0}, "eps"),
    (metrics.brier_score, (_P, _P * 2), {}, "labels"),
    (metrics.brier_score, (_P, _P), {"ignore_label": 0}, "ignore_label"),
    (metrics.mean_iou, (_Y + 5, _Y, 3), {}, "pred"),
    (metrics.mean_iou, (_Y, _Y[:2], 3), {}, "labels"),
    (metrics.pixel_accuracy, (_Y.astype(float), _Y), {}, "pred"),
    (metrics.ood_scores, ([1.0, 2.0], [False, False]), {}, "is_ood"),
    (metrics.ood_scores, ([1.0, np.inf], [True, False]), {}, "uncertainty"),
    (metrics.ood_scores, ([1.0, 2.0], [True, False, True]), {}, "is_ood"),
    (metrics.StreamingECE, (C,), {"num_bins": 0}, "num_bins"),
]


@pytest.mark.parametrize(
    "fn,args,kwargs,name",
    BAD_INPUTS,
    ids=[f"{b[0].__name__}-{b[3]}-{i}" for i, b in enumerate(BAD_INPUTS)],
)
def test_bad_inputs_raise_value_error_naming_argument(fn, args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        fn(*args, **kwargs)


def test_error_message_shows_received_shape_and_dtype():
    with pytest.raises(ValueError, match=r"shape \(2, 3\), dtype float64"):
        metrics.generalized_energy_distance(np.zeros((2, 3)), _S, 2)


def test_streaming_rejects_too_few_channels():
    m = metrics.StreamingMeanIoU(4)
    with pytest.raises(ValueError, match="y_pred"):
        m.update_state(np.zeros((1, 2, 2), int), np.zeros((1, 2, 2, 3), np.float32))
