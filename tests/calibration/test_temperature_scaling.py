"""Tests for `tfp_seg.calibration.TemperatureScaling`."""

import numpy as np
import pytest
import tensorflow as tf
from scipy.special import softmax

from tfp_seg.calibration import TemperatureScaling
from tfp_seg.layers import CategoricalLogits, LowRankLogits


# --- temperature scaling -----------------------------------------------------------------------
def _ece(probs, labels, num_bins=10):
    """Reference ECE: equal-width confidence bins, |accuracy - confidence| weighted by counts."""
    conf = probs.max(-1)
    correct = probs.argmax(-1) == labels
    edges = np.linspace(0, 1, num_bins + 1)
    total = 0.0
    for lo, hi in zip(edges[:-1], edges[1:], strict=True):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return total


def _overconfident(n=20000, c=5, t_true=2.0, seed=0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, c)) * 1.5
    p = softmax(z, axis=-1)
    labels = (p.cumsum(-1) > rng.uniform(size=(n, 1))).argmax(-1)
    return (z * t_true).astype("float32"), labels


def test_temperature_scaling_recovers_known_temperature_and_lowers_ece():
    logits, labels = _overconfident(t_true=2.0)
    ts = TemperatureScaling().fit(logits, labels)
    assert ts.fitted
    assert abs(ts.temperature - 2.0) / 2.0 < 0.05, ts.temperature
    assert ts.nll_after < ts.nll_before
    ece_before = _ece(softmax(logits, -1), labels)
    ece_after = _ece(ts.predict_proba(logits), labels)
    assert ece_before > 0.05 and ece_after < ece_before / 3, (ece_before, ece_after)
    # [B, H, W, C] layout and an ignore label give the same fit
    img_logits = logits.reshape(20, 10, 100, 5)
    img_labels = labels.reshape(20, 10, 100).copy()
    t_img = TemperatureScaling().fit(img_logits, img_labels).temperature
    np.testing.assert_allclose(t_img, ts.temperature, rtol=1e-4)
    img_labels[0] = 255
    t_ign = TemperatureScaling().fit(img_logits, img_labels, ignore_label=255).temperature
    assert abs(t_ign - 2.0) / 2.0 < 0.05
    # an under-confident model gets T < 1
    t_under = TemperatureScaling().fit(logits / 4.0, labels).temperature
    assert abs(t_under - 0.5) / 0.5 < 0.05


def test_temperature_scaling_call_and_repr():
    ts = TemperatureScaling()
    assert ts.temperature == 1.0 and not ts.fitted
    ts._temperature = 2.0
    x = np.array([[2.0, 4.0]], "float32")
    np.testing.assert_allclose(ts(x), [[1.0, 2.0]])
    out = ts(tf.constant(x))
    assert isinstance(out, tf.Tensor)
    np.testing.assert_allclose(out.numpy(), [[1.0, 2.0]])
    assert "2" in repr(ts)


def test_temperature_scaling_on_mc_samples_and_head_params():
    logits, labels = _overconfident(n=6000, t_true=2.0, seed=1)
    # S identical samples: the MC fit equals the plain fit
    t_plain = TemperatureScaling().fit(logits, labels).temperature
    t_mc = TemperatureScaling().fit_samples(np.stack([logits] * 3), labels).temperature
    np.testing.assert_allclose(t_mc, t_plain, rtol=1e-4)
    # scale_params: samples of the scaled params = original samples / T (same noise)
    head = LowRankLogits(3, rank=2, antithetic=False)
    rng = np.random.default_rng(0)
    params = rng.normal(size=(1, 2, 2, head.params_size)).astype("float32")
    z = rng.normal(size=(4, 1, 2)).astype("float32")
    eps = rng.normal(size=(4, 1, 2, 2, 3)).astype("float32")
    ts = TemperatureScaling()
    ts._temperature = 1.5
    scaled = ts.scale_params(params, head)
    np.testing.assert_allclose(
        head.sample_logits(scaled, 4, noise=(z, eps)).numpy(),
        head.sample_logits(params, 4, noise=(z, eps)).numpy() / 1.5,
        rtol=1e-4,
        atol=1e-4,
    )
    cat = CategoricalLogits(3)
    np.testing.assert_allclose(ts.scale_params(params[..., :3], cat).numpy(), params[..., :3] / 1.5)


def test_temperature_scaling_validates():
    logits, labels = _overconfident(n=100)
    with pytest.raises(ValueError, match="`labels`"):
        TemperatureScaling().fit(logits, labels[:50])
    with pytest.raises(ValueError, match="`labels`"):
        TemperatureScaling().fit(logits, labels + 10)
    with pytest.raises(ValueError, match="`logits`"):
        TemperatureScaling().fit(logits[0], labels[0])
    with pytest.raises(ValueError, match="`bounds`"):
        TemperatureScaling(bounds=(2.0, 1.0))
    with pytest.raises(ValueError, match="`labels`"):
        TemperatureScaling().fit(logits, np.full(100, 255), ignore_label=255)
