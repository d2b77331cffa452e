"""Where the low-rank heads' covariance starts: `factor_init_scale`, `initial_diagonal`."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_seg
from tfp_seg.layers import _init

C, R, F = 3, 2, 5
FEATURES = np.random.default_rng(0).normal(size=(2, 6, 6, F)).astype("float32")


def _glorot():
    return keras.initializers.GlorotUniform(seed=11)


def _low_rank(**kwargs):
    head = tfp_seg.layers.LowRankLogits(C, rank=R, kernel_initializer=_glorot(), **kwargs)
    head(FEATURES)
    return head


def _mixture(**kwargs):
    head = tfp_seg.layers.MixtureLowRankLogits(
        C, num_components=2, rank=R, kernel_initializer=_glorot(), **kwargs
    )
    head(FEATURES)
    return head


def _channels(num_components=1):
    """Boolean masks (mean, raw diagonal, factor) over the projection's output channels."""
    one = np.array([0] * C + [1] * C + [2] * (C * R))
    kinds = np.tile(one, num_components)
    return kinds == 0, kinds == 1, kinds == 2


EARLIER = {"factor_init_scale": 1.0, "initial_diagonal": None}


def test_the_earlier_start_draws_what_the_projection_drew_before():
    # factor_init_scale 1 and initial_diagonal None: glorot's kernel and a zero bias, so
    # runs seeded as in earlier versions start from the same weights.
    head = _low_rank(**EARLIER)
    kernel, bias = (np.asarray(w) for w in head.projection.weights)
    expected = _glorot()(kernel.shape)
    np.testing.assert_array_equal(kernel, np.asarray(expected))
    np.testing.assert_array_equal(bias, np.zeros_like(bias))


def test_the_default_start_is_the_measured_small_one():
    # benchmarks/README.md, "Model quality": a tenth of glorot's factor, D from 0.018.
    head = _low_rank()
    assert (head.factor_init_scale, head.initial_diagonal) == (0.1, 0.018)
    kernel, bias = (np.asarray(w) for w in head.projection.weights)
    glorot = np.asarray(_glorot()(kernel.shape))
    mean, diag, factor = _channels()
    np.testing.assert_array_equal(kernel[..., mean | diag], glorot[..., mean | diag])
    np.testing.assert_allclose(kernel[..., factor], 0.1 * glorot[..., factor], rtol=1e-6)
    np.testing.assert_allclose(bias[diag], math.log(0.018 - 1e-5), rtol=1e-6)
    np.testing.assert_array_equal(bias[mean | factor], 0.0)
    # The mixture keeps glorot's start (the small one measured worse for it).
    mixture = tfp_seg.layers.MixtureLowRankLogits(C, rank=R)
    assert (mixture.factor_init_scale, mixture.initial_diagonal) == (1.0, None)


@pytest.mark.parametrize("scale", [0.0, 0.03, 2.0])
def test_factor_init_scale_scales_only_the_factor_columns(scale):
    plain = np.asarray(_low_rank(**EARLIER).projection.kernel)
    kernel = np.asarray(_low_rank(factor_init_scale=scale).projection.kernel)
    mean, diag, factor = _channels()
    np.testing.assert_array_equal(kernel[..., mean], plain[..., mean])
    np.testing.assert_array_equal(kernel[..., diag], plain[..., diag])
    np.testing.assert_allclose(kernel[..., factor], scale * plain[..., factor], rtol=1e-6)


@pytest.mark.parametrize("transform", ["exp", "softplus"])
@pytest.mark.parametrize("variance", [1e-3, 0.02, 0.5, 30.0])
def test_initial_diagonal_is_the_variance_at_zero_features(transform, variance):
    head = _low_rank(initial_diagonal=variance, diagonal_transform=transform)
    params = head(np.zeros_like(FEATURES))
    loc, factor, diag = (np.asarray(t) for t in head.covariance_parts(params))
    np.testing.assert_allclose(diag, variance, rtol=1e-5)
    np.testing.assert_array_equal(loc, 0.0)
    np.testing.assert_array_equal(factor, 0.0)


@pytest.mark.parametrize("transform", ["exp", "softplus"])
def test_raw_diagonal_inverts_the_transform(transform):
    head = tfp_seg.layers.LowRankLogits(C, diagonal_transform=transform, epsilon=1e-5)
    for variance in (2e-5, 1e-3, 0.7, 50.0):
        raw = _init.raw_diagonal_for(variance, 1e-5, transform)
        assert math.isfinite(raw)
        got = float(head.diag_from_raw(tf.constant(raw, tf.float64)))
        assert got == pytest.approx(variance, rel=1e-9)
    assert _init.raw_diagonal_for(None, 1e-5, transform) == 0.0


def test_initial_covariance_follows_the_scale():
    # The analytic per-pixel variance diag(P P^T) + D at initialisation: the factor's part
    # scales with factor_init_scale squared; the diagonal's transformed part is the initial
    # one times exp of the (unchanged) kernel term.
    def parts(**kwargs):
        head = _low_rank(**kwargs)
        _, factor, diag = head.covariance_parts(head(FEATURES))
        return np.sum(np.square(factor), -1), np.asarray(diag)

    factor_1, diag_1 = parts(**EARLIER)
    factor_s, diag_s = parts(factor_init_scale=0.1, initial_diagonal=0.02)
    np.testing.assert_allclose(factor_s, 0.01 * factor_1, rtol=1e-4)
    np.testing.assert_allclose(diag_s - 1e-5, (0.02 - 1e-5) * (diag_1 - 1e-5), rtol=1e-4)


def test_mixture_components_start_alike():
    plain = _mixture(**EARLIER)
    head = _mixture(factor_init_scale=0.1, initial_diagonal=0.05)
    mean, diag, factor = _channels(num_components=2)
    k0, k1 = np.asarray(plain.projection.kernel), np.asarray(head.projection.kernel)
    np.testing.assert_array_equal(k1[..., mean | diag], k0[..., mean | diag])
    np.testing.assert_allclose(k1[..., factor], 0.1 * k0[..., factor], rtol=1e-6)
    bias = np.asarray(head.projection.bias)
    np.testing.assert_allclose(bias[diag], math.log(0.05 - 1e-5), rtol=1e-6)
    np.testing.assert_array_equal(bias[mean | factor], 0.0)
    np.testing.assert_array_equal(np.asarray(head.gate.bias), 0.0)


def test_a_zero_factor_start_still_learns_the_factor():
    # P = 0 at the start is not a fixed point of the loss: eta = mu + P z gives P the
    # gradient E[z dL/deta] != 0.
    head = tfp_seg.layers.LowRankLogits(C, rank=R, factor_init_scale=0.0, initial_diagonal=0.02)
    loss = tfp_seg.losses.StochasticSegmentationNLL(head, num_samples=8)
    tf.random.set_seed(3)
    labels = np.random.default_rng(1).integers(0, C, size=(2, 6, 6))
    head(FEATURES)
    with tf.GradientTape() as tape:
        value = loss(labels, head(FEATURES))
    grad = np.asarray(tape.gradient(value, head.projection.kernel))
    _, _, factor = _channels()
    assert np.all(np.isfinite(grad))
    assert np.abs(grad[..., factor]).max() > 1e-4


@pytest.mark.parametrize("cls", [tfp_seg.layers.LowRankLogits, tfp_seg.layers.MixtureLowRankLogits])
def test_config_round_trip_and_configs_of_earlier_versions(cls):
    head = cls(C, rank=R, factor_init_scale=0.25, initial_diagonal=0.1)
    config = head.get_config()
    assert (config["factor_init_scale"], config["initial_diagonal"]) == (0.25, 0.1)
    again = cls.from_config(config)
    assert (again.factor_init_scale, again.initial_diagonal) == (0.25, 0.1)
    earlier = {
        k: v for k, v in config.items() if k not in ("factor_init_scale", "initial_diagonal")
    }
    # A `.keras` file of an earlier version loads its weights as saved; the start it did not
    # record is today's default (it only matters where training starts).
    old = cls.from_config(earlier)
    fresh = cls(C, rank=R)
    assert (old.factor_init_scale, old.initial_diagonal) == (
        fresh.factor_init_scale,
        fresh.initial_diagonal,
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"factor_init_scale": -0.1}, "`factor_init_scale` must be a finite float >= 0"),
        ({"factor_init_scale": float("nan")}, "`factor_init_scale`"),
        ({"factor_init_scale": "small"}, "`factor_init_scale`"),
        ({"initial_diagonal": 0.0}, r"`initial_diagonal` must be None or a finite variance > "),
        ({"initial_diagonal": 1e-6}, r"> epsilon \(1e-05\)"),
        ({"initial_diagonal": float("inf")}, "`initial_diagonal`"),
        ({"initial_diagonal": True}, "`initial_diagonal`"),
    ],
)
@pytest.mark.parametrize("cls", [tfp_seg.layers.LowRankLogits, tfp_seg.layers.MixtureLowRankLogits])
def test_bad_starts_name_the_argument(cls, kwargs, match):
    with pytest.raises(ValueError, match=match):
        cls(C, rank=R, **kwargs)


def test_initializers_check_the_channels():
    with pytest.raises(ValueError, match=r"initialises 24 output channels"):
        _init.LowRankKernelInitializer("glorot_uniform", C, R, 0.5, num_components=2)((1, 1, F, 12))
    with pytest.raises(ValueError, match=r"initialises 12 output channels"):
        _init.LowRankBiasInitializer(C, R, -4.0)((13,))
    with pytest.raises(ValueError, match="builds a vector"):
        _init.LowRankBiasInitializer(C, R, -4.0)((1, 12))
