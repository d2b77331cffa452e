"""Tests for the SSN sample controls `scale_class_covariance` and `with_temperature`."""

import numpy as np
import pytest

from tfp_seg.calibration import scale_class_covariance, with_temperature
from tfp_seg.layers import CategoricalLogits, HeteroscedasticLogits, LowRankLogits


# --- SSN sample control ------------------------------------------------------------------------
def _low_rank_params(head, shape=(1, 2, 2), seed=0):
    rng = np.random.default_rng(seed)
    c, r = head.num_classes, head.rank
    loc = rng.normal(size=shape + (c,))
    raw = rng.uniform(-1, 1, size=shape + (c,))  # D ~ 0.4..2.7 >> epsilon
    factor = rng.normal(size=shape + (c * r,))
    return np.concatenate([loc, raw, factor], -1).astype("float32")


def _dense_cov(head, params):
    return head.distribution(params).covariance().numpy()[0]


def test_scale_class_covariance_scales_only_that_class_blocks():
    head = LowRankLogits(3, rank=2)
    params = _low_rank_params(head)
    cov = _dense_cov(head, params)
    s = 2.5
    new = scale_class_covariance(params, head, {1: s})
    cov_new = _dense_cov(head, new)
    cls = np.arange(cov.shape[0]) % 3  # flattened [H, W, C]: class of each index
    is1 = cls == 1
    np.testing.assert_allclose(cov_new[np.ix_(is1, is1)], s**2 * cov[np.ix_(is1, is1)], rtol=1e-4)
    np.testing.assert_allclose(cov_new[np.ix_(is1, ~is1)], s * cov[np.ix_(is1, ~is1)], rtol=1e-4)
    np.testing.assert_allclose(
        cov_new[np.ix_(~is1, ~is1)], cov[np.ix_(~is1, ~is1)], rtol=1e-4, atol=1e-6
    )
    np.testing.assert_array_equal(head.mean_logits(new).numpy(), params[..., :3])
    # general form: Sigma' = S Sigma S with a vector of scales
    scales = np.array([0.5, 1.0, 3.0])
    cov_vec = _dense_cov(head, scale_class_covariance(params, head, scales))
    np.testing.assert_allclose(cov_vec, np.outer(scales[cls], scales[cls]) * cov, rtol=1e-4)
    # and the test can fail: the new covariance is not the old one
    assert np.abs(cov_new - cov).max() > 0.1


def test_scale_class_covariance_for_heteroscedastic_low_rank_head():
    head = HeteroscedasticLogits(3, low_rank_classes=2)
    params = _low_rank_params(head)
    scales = np.array([1.0, 2.0, 0.5])
    before = head.distribution(params).distribution.covariance().numpy()
    after = head.distribution(scale_class_covariance(params, head, scales))
    after = after.distribution.covariance().numpy()
    np.testing.assert_allclose(after, np.outer(scales, scales) * before, rtol=1e-4)


def test_class_scale_moves_mean_sampled_area_monotonically():
    """Class-1 area grows with its scale where class 1 is not the mean's argmax.

    Common random numbers (the same seed for every scale); each step's mean increase must
    exceed 4 standard errors of the paired per-sample differences (N = 64 samples).
    """
    head = LowRankLogits(3, rank=4, antithetic=False)
    rng = np.random.default_rng(0)
    shape = (4, 16, 16)
    loc = np.zeros(shape + (3,))
    loc[..., 0] = 1.0
    loc[:, 4:8, 4:8, 1] = 2.0  # a confident class-1 square
    raw = np.full(shape + (3,), np.log(0.5))
    factor = rng.normal(size=shape + (12,)) * 0.15
    params = np.concatenate([loc, raw, factor], -1).astype("float32")
    areas = []
    for s in (0.25, 0.5, 1.0, 2.0, 4.0):
        samples = head.sample_logits(scale_class_covariance(params, head, {1: s}), 64, seed=0)
        areas.append((np.argmax(samples.numpy(), -1) == 1).mean(axis=(1, 2, 3)))
    areas = np.array(areas)  # [scales, N]
    diffs = np.diff(areas, axis=0)
    se = diffs.std(axis=1, ddof=1) / np.sqrt(diffs.shape[1])
    assert np.all(diffs.mean(1) > 4 * se), (areas.mean(1), se)


def test_with_temperature_scales_whole_covariance():
    head = LowRankLogits(3, rank=2)
    params = _low_rank_params(head, seed=1)
    cov = _dense_cov(head, params)
    for t in (0.5, 3.0):
        new = with_temperature(params, head, t)
        np.testing.assert_allclose(_dense_cov(head, new), t * cov, rtol=1e-4, atol=1e-6)
        np.testing.assert_array_equal(head.mean_logits(new).numpy(), params[..., :3])
    # heteroscedastic, diagonal: variance * t
    het = HeteroscedasticLogits(3)
    p = _low_rank_params(het)
    var = het.distribution(with_temperature(p, het, 2.0)).variance().numpy()
    np.testing.assert_allclose(var, 2.0 * np.exp(p[..., 3:]), rtol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p, h: scale_class_covariance(p, h, [1.0, 2.0]), "class_scales"),
        (lambda p, h: scale_class_covariance(p, h, [1.0, -1.0, 1.0]), "class_scales"),
        (lambda p, h: scale_class_covariance(p, h, {5: 2.0}), "class_scales"),
        (lambda p, h: scale_class_covariance(p, h, "big"), "class_scales"),
        (lambda p, h: with_temperature(p, h, 0.0), "`t`"),
        (lambda p, h: with_temperature(p, h, float("inf")), "`t`"),
        (lambda p, h: with_temperature(p, h, "hot"), "`t`"),
        (lambda p, h: with_temperature(p[..., :5], h, 1.0), "`params`"),
        (lambda p, h: with_temperature(p[..., :3], CategoricalLogits(3), 1.0), "`head`"),
    ],
)
def test_sample_control_validates(call, match):
    head = LowRankLogits(3, rank=2)
    with pytest.raises(ValueError, match=match):
        call(_low_rank_params(head), head)
