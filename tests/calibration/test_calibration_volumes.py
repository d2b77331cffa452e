"""Calibration on volumes `S = (D, H, W)`: one code path with images.

Temperature scaling and the conformal tools pool the voxels of their inputs (an image or a
volume is one item of `[N, *S]`), so a `[N, D, H, W]` volume gives what the `[N, D*H, W]`
image gives; the SSN sample controls act per voxel, so the controlled params of a 3D head are
the 2D head's controlled params of the reshaped volume (whose semantics the 2D tests check on
the dense covariances).
"""

import numpy as np
import pytest
import tensorflow as tf
from scipy.special import softmax

from tfp_seg.calibration import (
    ConformalPredictionSets,
    ConformalRiskControl,
    TemperatureScaling,
    scale_class_covariance,
    with_temperature,
)
from tfp_seg.layers import HeteroscedasticLogits, LowRankLogits, MixtureLowRankLogits

N, D, H, W, C = 4, 3, 4, 5, 3


def _tall(x, lead=1):
    """`[*lead, D, H, W, ...]` -> `[*lead, D*H, W, ...]`."""
    s = x.shape
    return x.reshape(s[:lead] + (s[lead] * s[lead + 1],) + s[lead + 2 :])


def test_temperature_scaling_of_volumes(rng):
    logits = 3.0 * rng.normal(size=(N, D, H, W, C))
    labels = rng.integers(0, C, size=(N, D, H, W))
    labels[0, 0] = 255
    volume = TemperatureScaling().fit(logits, labels, ignore_label=255)
    image = TemperatureScaling().fit(_tall(logits), _tall(labels), ignore_label=255)
    assert volume.temperature == pytest.approx(image.temperature, rel=1e-9)
    assert volume.temperature > 1.5  # over-confident logits of random labels
    samples = logits[None] + rng.normal(size=(5, N, D, H, W, C))
    volume = TemperatureScaling().fit_samples(samples, labels, ignore_label=255)
    image = TemperatureScaling().fit_samples(_tall(samples, 2), _tall(labels), ignore_label=255)
    assert volume.temperature == pytest.approx(image.temperature, rel=1e-9)
    with pytest.raises(ValueError, match=r"`labels` must have shape \(4, 3, 4, 5\)"):
        TemperatureScaling().fit_samples(samples, labels[:, 0])


def test_conformal_risk_control_of_volumes(rng):
    """Volumes are the exchangeable items; foreground vs class probabilities are told by the
    rank of `labels`."""
    probs = softmax(2.0 * rng.normal(size=(12, D, H, W, C)), axis=-1)
    labels = rng.integers(0, C, size=(12, D, H, W))
    labels[3] = 0  # a volume without foreground: loss 0
    volume = ConformalRiskControl(alpha=0.2).fit(probs, labels)
    image = ConformalRiskControl(alpha=0.2).fit(_tall(probs), _tall(labels))
    assert volume.threshold == image.threshold
    foreground = ConformalRiskControl(alpha=0.2).fit(1.0 - probs[..., 0], labels)
    assert foreground.threshold == volume.threshold
    # The loss of each volume against a loop over its voxels.
    risk = volume.risk(probs, labels)
    fg_prob = 1.0 - probs[..., 0]
    for i in (0, 3, 7):
        fg = labels[i] != 0
        expected = 0.0 if not fg.any() else np.mean(fg_prob[i][fg] < volume.threshold)
        assert risk[i] == pytest.approx(expected)
    assert volume(fg_prob).shape == (12, D, H, W)
    with pytest.raises(ValueError, match="`labels` must have shape"):
        ConformalRiskControl(alpha=0.2).fit(probs, labels[:, 0])


@pytest.mark.parametrize("method, pixels", [("lac", None), ("aps", 1), ("aps", 3)])
def test_conformal_prediction_sets_of_volumes(rng, method, pixels):
    probs = softmax(2.0 * rng.normal(size=(20, D, H, W, C)), axis=-1)
    labels = rng.integers(0, C, size=(20, D, H, W))
    kwargs = dict(alpha=0.1, method=method, pixels_per_image=pixels, seed=5)
    volume = ConformalPredictionSets(**kwargs).fit(probs, labels)
    image = ConformalPredictionSets(**kwargs).fit(_tall(probs), _tall(labels))
    assert volume.quantile == image.quantile  # same voxels drawn in the same order
    assert volume.num_calibration == (20 * D * H * W if pixels is None else 20 * pixels)
    assert volume(probs).shape == (20, D, H, W, C)


def _params(head, rng, gate=0):
    params = rng.normal(size=(2, D, H, W, head.params_size)).astype(np.float32)
    if gate:  # the mixture gate: the same values at every voxel of a volume
        params[..., -gate:] = params[:, :1, :1, :1, -gate:]
    return params


@pytest.mark.parametrize(
    "make_head, gate",
    [
        (lambda dims: LowRankLogits(C, rank=2, spatial_dims=dims), 0),
        (lambda dims: HeteroscedasticLogits(C, spatial_dims=dims), 0),
        (lambda dims: MixtureLowRankLogits(C, num_components=2, rank=2, spatial_dims=dims), 2),
    ],
    ids=["low_rank", "heteroscedastic", "mixture"],
)
def test_sample_controls_of_3d_heads_act_per_voxel(rng, make_head, gate):
    head3, head2 = make_head(3), make_head(2)
    params = _params(head3, rng, gate)
    tall = _tall(params)
    scales = [0.5, 1.0, 3.0] if gate == 0 else [[0.5, 1.0, 3.0], [2.0, 0.25, 1.0]]
    t = 2.0 if gate == 0 else [0.5, 3.0]
    ts = TemperatureScaling()
    ts._temperature = 1.7  # a fitted temperature
    for control in (
        lambda p, h: scale_class_covariance(p, h, scales),
        lambda p, h: with_temperature(p, h, t),
        lambda p, h: ts.scale_params(p, h),
    ):
        volume = np.asarray(control(params, head3))
        assert volume.shape == params.shape
        np.testing.assert_allclose(
            _tall(volume), np.asarray(control(tall, head2)), rtol=1e-6, atol=1e-6
        )
        assert np.abs(volume - params).max() > 1e-2  # the control changed something
    # The mean logits are unchanged by the covariance controls.
    np.testing.assert_allclose(
        np.asarray(head3.mean_logits(tf.constant(with_temperature(params, head3, t)))),
        np.asarray(head3.mean_logits(tf.constant(params))),
        rtol=1e-5,
        atol=1e-5,
    )
