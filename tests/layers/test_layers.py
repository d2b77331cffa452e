import numpy as np
import pytest
import tensorflow as tf

import tfp_seg
from tests.helpers import run_layer_test
from tfp_seg.layers import CategoricalLogits, LowRankLogits


def _labels(shape, c, seed=0):
    return np.random.default_rng(seed).integers(0, c, size=shape).astype("int32")


def test_low_rank_layer_contract():
    head_kwargs = dict(num_classes=3, rank=4)
    loss = LowRankLogits(**head_kwargs).default_loss(num_samples=4)
    run_layer_test(
        LowRankLogits,
        head_kwargs,
        input_shape=(2, 16, 16, 5),
        expected_output_shape=(2, 16, 16, 3 * (2 + 4)),
        loss=loss,
        target=_labels((2, 16, 16), 3),
    )


def test_categorical_layer_contract():
    head = CategoricalLogits(3)
    run_layer_test(
        CategoricalLogits,
        {"num_classes": 3},
        input_shape=(2, 16, 16, 5),
        expected_output_shape=(2, 16, 16, 3),
        loss=head.default_loss(),
        target=_labels((2, 16, 16), 3),
    )


def test_params_size():
    assert LowRankLogits(4, rank=10).params_size == 4 * 12
    assert LowRankLogits.params_size_for(4, 10) == 48
    assert CategoricalLogits(4).params_size == 4


def test_low_rank_distribution_is_the_packed_formula():
    """Numerical correctness: dense covariance equals P P^T + diag(exp(raw) + eps)."""
    head = LowRankLogits(2, rank=3, epsilon=1e-5)
    params = np.random.default_rng(0).normal(size=(1, 2, 2, head.params_size)).astype("float32")
    dist = head.distribution(params)
    loc = params[..., :2]
    raw = params[..., 2:4]
    p = params[..., 4:].reshape(1, 2, 2, 2, 3).reshape(1, -1, 3)
    cov = p[0] @ p[0].T + np.diag(np.exp(raw).reshape(-1) + 1e-5)
    np.testing.assert_allclose(dist.covariance().numpy()[0], cov, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dist.mean().numpy(), loc)
    np.testing.assert_allclose(head.mean_logits(params).numpy(), loc)
    # pack/split are inverse
    parts = head.split_params(params)
    np.testing.assert_allclose(head.pack_params(*parts).numpy(), params)


def test_softplus_diagonal_and_inverse():
    head = LowRankLogits(2, rank=1, diagonal_transform="softplus", epsilon=1e-3)
    raw = tf.constant([[-3.0, 0.0, 4.0]])
    d = head.diag_from_raw(raw)
    np.testing.assert_allclose(d.numpy(), np.log1p(np.exp(raw.numpy())) + 1e-3, rtol=1e-6)
    np.testing.assert_allclose(head.raw_from_diag(d).numpy(), raw.numpy(), atol=1e-4)


def test_roi_mask_zeroes_covariance_outside():
    head = LowRankLogits(2, rank=2)
    features = np.random.default_rng(1).normal(size=(1, 4, 4, 3)).astype("float32")
    mask = np.zeros((1, 4, 4), "float32")
    mask[:, 1:3, 1:3] = 1.0
    params = head(features, roi_mask=mask)
    loc, factor, diag = head.covariance_parts(params)
    outside = mask[0] == 0
    assert np.all(factor.numpy()[0][outside] == 0.0)
    np.testing.assert_allclose(diag.numpy()[0][outside], head.epsilon, rtol=1e-6)
    assert np.all(diag.numpy()[0][~outside] > 2 * head.epsilon)
    # Samples outside the ROI stay at the mean (up to sqrt(epsilon) noise).
    s = head.sample_logits(params, 8, seed=0).numpy()
    assert np.abs(s[:, 0][:, outside] - loc.numpy()[0][outside]).max() < 0.05


def test_gradients_reach_every_parameter_group():
    head = LowRankLogits(3, rank=2, antithetic=False)
    features = tf.random.stateless_normal([2, 8, 8, 4], seed=[0, 1])
    labels = _labels((2, 8, 8), 3)
    loss_fn = head.default_loss(num_samples=4)
    with tf.GradientTape() as tape:
        params = head(features)
        tape.watch(params)
        loss = loss_fn(labels, params)
    grad = tape.gradient(loss, params).numpy()
    for name, sl in (("loc", slice(0, 3)), ("diag", slice(3, 6)), ("factor", slice(6, None))):
        assert np.abs(grad[..., sl]).max() > 0, f"no gradient reaches {name}"


def test_sample_logits_shapes_and_defaults():
    head = LowRankLogits(3, rank=2)
    params = tf.zeros([2, 4, 4, head.params_size])
    assert head.sample_logits(params, 6).shape == (6, 2, 4, 4, 3)
    with pytest.raises(ValueError, match="even"):
        head.sample_logits(params, 5)  # antithetic by default
    assert head.sample_logits(params, 5, antithetic=False).shape == (5, 2, 4, 4, 3)
    cat = CategoricalLogits(3)
    s = cat.sample_logits(tf.ones([1, 2, 2, 3]), 3)
    assert s.shape == (3, 1, 2, 2, 3)
    assert cat.distribution(tf.ones([1, 2, 2, 3])).event_shape == [2, 2, 3]


def test_params_are_float32_under_mixed_precision():
    import keras

    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        head = LowRankLogits(2, rank=2)
        out = head(tf.ones([1, 4, 4, 3], tf.float16))
        assert out.dtype == tf.float32
    finally:
        keras.config.set_dtype_policy(policy)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=1), "num_classes"),
        (dict(num_classes=3, rank=0), "rank"),
        (dict(num_classes=3, diagonal_transform="relu"), "diagonal_transform"),
        (dict(num_classes=3, epsilon=0.0), "epsilon"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LowRankLogits(**kwargs)


def test_bad_params_and_features():
    head = LowRankLogits(3, rank=2)
    with pytest.raises(ValueError, match="`params`"):
        head.distribution(tf.zeros([1, 4, 4, 7]))
    with pytest.raises(ValueError, match="`params`"):
        head.sample_logits(tf.zeros([4, 4, head.params_size]), 2)
    with pytest.raises(ValueError, match="`features`"):
        head(tf.zeros([4, 4, 3]))
    with pytest.raises(ValueError, match="`rank`"):
        LowRankLogits(2, rank=50).distribution(tf.zeros([1, 2, 2, 2 * 52]))
    bad = np.zeros([1, 2, 2, head.params_size], "float32")
    bad[0, 0, 0, 0] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match="`params`"):
        head.sample_logits(bad, 2)


def test_public_names():
    assert tfp_seg.layers.LowRankLogits is LowRankLogits
    assert "LowRankLogits" in tfp_seg.layers.__all__
