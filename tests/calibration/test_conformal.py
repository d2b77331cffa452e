"""Tests for `tfp_seg.calibration.conformal`: conformal risk control of the false-negative rate
and LAC / APS conformal prediction sets.

The guarantees are checked by Monte Carlo on data with KNOWN probabilities (draw p, then the
labels from p), fresh data and a fresh calibration / test split in each of R = 200 repetitions:
the mean over repetitions of the test risk (coverage) must meet its bound within 3 Monte Carlo
standard errors (std of the per-repetition value / sqrt(R)), with non-trivial thresholds and
sets. The finite-sample rules (the threshold, the quantile, the sets) are checked against loops
of their definitions.
"""

import json
import math

import numpy as np
import pytest

from tfp_seg import calibration
from tfp_seg.calibration import ConformalPredictionSets, ConformalRiskControl

R = 200  # repetitions of the Monte Carlo checks
Z = 3.0  # Monte Carlo standard errors


def _fg_images(rng, n, size=8):
    """Foreground probabilities with a per-image difficulty, labels ~ Bernoulli(p)."""
    mean = rng.normal(-1.0, 1.0, size=(n, 1, 1))
    p = 1.0 / (1.0 + np.exp(-(mean + 1.5 * rng.normal(size=(n, size, size)))))
    return p, (rng.uniform(size=p.shape) < p).astype(np.int64)


def _class_probs(rng, shape, num_classes=5):
    """Class probabilities with a per-item (per-image) concentration, labels ~ Categorical(p)."""
    conc = rng.uniform(0.2, 2.0, size=shape[:1] + (1,) * len(shape))
    g = rng.gamma(np.broadcast_to(conc, shape + (num_classes,)))
    p = g / g.sum(-1, keepdims=True)
    u = rng.uniform(size=shape + (1,))
    y = np.minimum((u > np.cumsum(p, -1)).sum(-1), num_classes - 1)
    return p, y


def _mc_mean(values):
    values = np.asarray(values, np.float64)
    return values.mean(), values.std(ddof=1) / math.sqrt(values.size)


def test_the_package_keeps_every_public_name():
    for name in (
        "TemperatureScaling",
        "scale_class_covariance",
        "with_temperature",
        "ConformalRiskControl",
        "ConformalPredictionSets",
    ):
        assert name in calibration.__all__ and hasattr(calibration, name), name


# ================================================================================================
# Conformal risk control
# ================================================================================================


def ref_crc_threshold(p, y, alpha):
    """Loop: the largest candidate (foreground probabilities and 1) meeting the bound, else 0."""
    n = p.shape[0]
    best = 0.0
    candidates = sorted(set(p[y != 0].tolist()) | {1.0})
    for t in candidates:
        losses = []
        for i in range(n):
            fg = y[i] != 0
            losses.append(0.0 if not fg.any() else float(np.mean(p[i][fg] < t)))
        if n / (n + 1) * np.mean(losses) + 1 / (n + 1) <= alpha:
            best = max(best, t)
    return best


@pytest.mark.parametrize("seed", range(4))
def test_crc_threshold_is_the_largest_that_meets_the_bound(seed):
    rng = np.random.default_rng(seed)
    p, y = _fg_images(rng, 30, size=5)
    p = np.round(p, 2)  # ties
    y[0] = 0  # an image without foreground: loss 0
    alpha = 0.15
    crc = ConformalRiskControl(alpha).fit(p, y)
    assert crc.threshold == ref_crc_threshold(p, y, alpha)
    n = 30
    risk = crc.risk(p, y).mean()
    assert risk == pytest.approx(crc.calibration_risk)
    assert n / (n + 1) * risk + 1 / (n + 1) <= alpha + 1e-12
    # The next larger foreground probability breaks the bound: the threshold is the largest.
    above = np.unique(p[(y != 0) & (p > crc.threshold)])
    if above.size:
        worse = ConformalRiskControl(alpha, threshold=float(above[0])).risk(p, y).mean()
        assert n / (n + 1) * worse + 1 / (n + 1) > alpha
    np.testing.assert_array_equal(crc(p), p >= crc.threshold)


def test_crc_hand_computed_threshold():
    # Two images with foreground probabilities [0.9, 0.5] and [0.8, 0.3, 0.2] (all other
    # pixels background); n = 2 needs 1/3 + 2/3 R <= alpha = 0.5, i.e. R <= 1/4.
    # lambda = 0.3: misses 0.2 in image 2: R = (0 + 1/3) / 2 = 1/6; lambda = 0.5: misses
    # 0.3, 0.2: R = (0 + 2/3) / 2 = 1/3 > 1/4. So lambda_hat = 0.3.
    p = np.array([[0.9, 0.5, 0.1, 0.0], [0.8, 0.3, 0.2, 0.4]])
    y = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    assert ConformalRiskControl(0.5).fit(p, y).threshold == 0.3


@pytest.mark.parametrize("alpha", [0.1, 0.2])
def test_crc_mean_test_false_negative_rate_is_at_most_alpha(alpha):
    # E[L_{n+1}(lambda_hat)] <= alpha (Angelopoulos et al., 2022); n = 100 calibration and 100
    # test images per repetition.
    rng = np.random.default_rng(100)
    n = 100
    risks, thresholds = [], []
    for _ in range(R):
        p, y = _fg_images(rng, 2 * n)
        crc = ConformalRiskControl(alpha).fit(p[:n], y[:n])
        risks.append(crc.risk(p[n:], y[n:]).mean())
        thresholds.append(crc.threshold)
    mean, se = _mc_mean(risks)
    assert mean <= alpha + Z * se, (mean, se)
    assert 0.0 < min(thresholds) and max(thresholds) < 1.0  # non-trivial thresholds
    # Not conservative either: the CRC lower bound alpha - 2B / (n + 1), proven for losses
    # without jumps (ours jump by 1 / |F_i|), holds here too.
    assert mean >= alpha - 2 / (n + 1) - Z * se, (mean, se)


def test_crc_class_probabilities_ignore_label_and_fallback():
    rng = np.random.default_rng(3)
    p, y = _fg_images(rng, 40)
    probs = np.stack([1 - p, 0.5 * p, 0.5 * p], -1)  # foreground = classes 1 and 2
    labels = y * rng.integers(1, 3, size=y.shape)
    a = ConformalRiskControl(0.1).fit(probs, labels)
    b = ConformalRiskControl(0.1).fit(p, y)
    assert a.threshold == pytest.approx(b.threshold, abs=1e-12)
    # Ignored pixels are not foreground: labelling them foreground or 255 differs.
    ignored = y.copy()
    ignored[:, :2] = 255
    c = ConformalRiskControl(0.1).fit(p, ignored, ignore_label=255)
    keep = y.copy()
    keep[:, :2] = 0
    assert c.threshold == ConformalRiskControl(0.1).fit(p, keep).threshold
    # Too few images for the bound (1 / (n + 1) > alpha): the mask of everything, risk 0.
    few = ConformalRiskControl(0.1).fit(p[:5], y[:5])
    assert few.threshold == 0.0 and few(p).all() and np.all(few.risk(p, y) == 0)


def test_crc_config_round_trip_and_errors():
    rng = np.random.default_rng(4)
    p, y = _fg_images(rng, 30)
    crc = ConformalRiskControl(0.2).fit(p, y)
    config = json.loads(json.dumps(crc.get_config()))
    revived = ConformalRiskControl.from_config(config)
    assert revived.get_config() == crc.get_config() and revived.threshold == crc.threshold
    np.testing.assert_array_equal(revived(p), crc(p))
    assert ConformalRiskControl.from_config(ConformalRiskControl(0.3).get_config()).alpha == 0.3
    with pytest.raises(ValueError, match="not fitted"):
        ConformalRiskControl(0.1)(p)
    for bad in (0.0, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match=r"`alpha` must be a float in \(0, 1\)"):
            ConformalRiskControl(bad)
    with pytest.raises(ValueError, match=r"`threshold` must be None or a float in \[0, 1\]"):
        ConformalRiskControl(0.1, threshold=1.5)
    with pytest.raises(ValueError, match="`labels` must have shape"):
        ConformalRiskControl(0.1).fit(p, y[:, :4])
    with pytest.raises(ValueError, match=r"`probabilities` must hold probabilities in \[0, 1\]"):
        ConformalRiskControl(0.1).fit(p + 1.0, y)
    with pytest.raises(ValueError, match="`labels` must hold integer"):
        ConformalRiskControl(0.1).fit(p, y.astype(float))


# ================================================================================================
# Conformal prediction sets
# ================================================================================================


def ref_aps_score(p, y, u):
    return sum(p[c] for c in range(p.size) if p[c] > p[y]) + u * p[y]


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_quantile_and_sets_equal_the_loop_definitions(method):
    rng = np.random.default_rng(5)
    p, y = _class_probs(rng, (57,), num_classes=4)
    p = np.round(p, 2)
    p = p / p.sum(-1, keepdims=True)  # ties among classes
    sets = ConformalPredictionSets(0.2, method, randomized=False).fit(p, y)
    scores = [
        1 - p[i, y[i]] if method == "lac" else ref_aps_score(p[i], y[i], 1.0) for i in range(57)
    ]
    k = math.ceil(58 * 0.8)  # = 47
    q = min(s for s in scores if sum(t <= s for t in scores) >= k)
    assert sets.quantile == pytest.approx(q, abs=1e-12)
    masks = sets(p)
    for i in range(57):
        for c in range(4):
            s = 1 - p[i, c] if method == "lac" else ref_aps_score(p[i], c, 1.0)
            if abs(s - sets.quantile) > 1e-12:  # away from float round-off at the boundary
                assert masks[i, c] == (s < sets.quantile), (i, c, s)
    # Randomized APS scores with given uniforms.
    u = rng.uniform(size=57)
    aps = ConformalPredictionSets(0.2, "aps", randomized=True)
    got = aps.scores(p, uniforms=u)
    for i in range(5):
        for c in range(4):
            assert got[i, c] == pytest.approx(ref_aps_score(p[i], c, u[i]), abs=1e-12)


def test_quantile_rule_at_the_edges():
    p = np.tile([0.7, 0.2, 0.1], (9, 1))
    y = np.zeros(9, np.int64)
    # n = 9, alpha = 0.05: ceil(10 * 0.95) = 10 > 9, every set is all classes.
    trivial = ConformalPredictionSets(0.05).fit(p, y)
    assert trivial.quantile == math.inf and trivial(p).all()
    # n = 9, alpha = 0.1: ceil(10 * 0.9) = 9 exactly (no float round-up to 10).
    assert ConformalPredictionSets(0.1).fit(p, y).quantile == pytest.approx(0.3)


@pytest.mark.parametrize("method, randomized", [("lac", False), ("aps", True), ("aps", False)])
def test_sets_cover_the_true_class_of_exchangeable_items(method, randomized):
    # P(y in set) >= 1 - alpha; <= 1 - alpha + 1 / (n + 1) without ties in the scores (LAC,
    # randomized APS). n = 200 calibration and 500 test items, C = 5.
    rng = np.random.default_rng(6)
    alpha, n, c = 0.1, 200, 5
    coverage, size = [], []
    for rep in range(R):
        p, y = _class_probs(rng, (n + 500,), c)
        sets = ConformalPredictionSets(alpha, method, randomized=randomized, seed=rep)
        masks = sets.fit(p[:n], y[:n])(p[n:])
        coverage.append(masks[np.arange(500), y[n:]].mean())
        size.append(masks.sum(-1).mean())
    mean, se = _mc_mean(coverage)
    assert mean >= 1 - alpha - Z * se, (mean, se)
    if method == "lac" or randomized:
        assert mean <= 1 - alpha + 1 / (n + 1) + Z * se, (mean, se)
    assert 1.0 < np.mean(size) < c - 1  # informative sets, not all classes


@pytest.mark.parametrize("method", ["lac", "aps"])
def test_sets_cover_a_random_pixel_of_a_new_image(method):
    # Images [N, 4, 4, C] with a per-image concentration (pixels of an image are alike), one
    # calibration pixel per image: the expected per-image fraction of covered pixels is >= 1 -
    # alpha (and <= 1 - alpha + 1 / (n + 1): continuous scores). n = 200 images.
    rng = np.random.default_rng(7)
    alpha, n, c = 0.1, 200, 5
    coverage, size = [], []
    for rep in range(R):
        p, y = _class_probs(rng, (2 * n, 4, 4), c)
        sets = ConformalPredictionSets(alpha, method, seed=rep).fit(p[:n], y[:n])
        assert sets.num_calibration == n
        masks = sets(p[n:])
        coverage.append(np.take_along_axis(masks, y[n:, ..., None], -1).mean())
        size.append(masks.sum(-1).mean())
    mean, se = _mc_mean(coverage)
    assert 1 - alpha - Z * se <= mean <= 1 - alpha + 1 / (n + 1) + Z * se, (mean, se)
    assert 1.0 < np.mean(size) < c - 1


def test_sets_pixels_ignore_label_seed_and_config():
    rng = np.random.default_rng(8)
    p, y = _class_probs(rng, (20, 4, 4), 3)
    y[:, 0] = 255
    every = ConformalPredictionSets(0.2, pixels_per_image=None).fit(p, y, ignore_label=255)
    assert every.num_calibration == 20 * 12  # every valid pixel
    three = ConformalPredictionSets(0.2, pixels_per_image=3, seed=1).fit(p, y, ignore_label=255)
    assert three.num_calibration == 60
    again = ConformalPredictionSets(0.2, pixels_per_image=3, seed=1).fit(p, y, ignore_label=255)
    assert again.quantile == three.quantile  # seeded draws
    aps = ConformalPredictionSets(0.2, "aps", seed=2).fit(p, y, ignore_label=255)
    config = json.loads(json.dumps(aps.get_config()))
    revived = ConformalPredictionSets.from_config(config)
    assert revived.get_config() == aps.get_config() and revived.quantile == aps.quantile
    np.testing.assert_array_equal(
        ConformalPredictionSets.from_config(config)(p),
        ConformalPredictionSets.from_config(config)(p),
    )
    assert aps(p).shape == p.shape and aps(p).dtype == bool
    with pytest.raises(ValueError, match="not fitted"):
        ConformalPredictionSets(0.1)(p)
    with pytest.raises(ValueError, match="`method` must be one of"):
        ConformalPredictionSets(0.1, method="raps")
    with pytest.raises(ValueError, match="`pixels_per_image` must be None or a positive int"):
        ConformalPredictionSets(0.1, pixels_per_image=0)
    with pytest.raises(ValueError, match="`seed` must be None or an int"):
        ConformalPredictionSets(0.1, seed=1.5)
    with pytest.raises(ValueError, match=r"`labels` must hold labels in \[0, 3\)"):
        ConformalPredictionSets(0.1).fit(p, y)
    with pytest.raises(ValueError, match="`labels` must have shape"):
        ConformalPredictionSets(0.1).fit(p, y[:, :2])
