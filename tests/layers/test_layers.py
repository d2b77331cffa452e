import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import tfp_seg
from tests.helpers import (
    run_fit_step,
    run_layer_test,
    run_model_saving_test,
    run_serialization_test,
)
from tfp_seg.layers import (
    CategoricalLogits,
    HeteroscedasticLogits,
    LowRankLogits,
    MixtureLowRankLogits,
)


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


# --- volumes: S = (D, H, W), one code path with images ------------------------------------------
VOLUME = (2, 3, 4, 5, 6)  # B, D, H, W, F
VOLUME_HEADS = {
    # name: (head factory, default-loss kwargs)
    "categorical": (lambda: CategoricalLogits(3, spatial_dims=3), {}),
    "heteroscedastic": (lambda: HeteroscedasticLogits(3, spatial_dims=3), {"num_samples": 4}),
    "heteroscedastic-class-factor": (
        lambda: HeteroscedasticLogits(3, low_rank_classes=2, spatial_dims=3),
        {"num_samples": 4},
    ),
    "low-rank": (lambda: LowRankLogits(3, rank=4, spatial_dims=3), {"num_samples": 4}),
    "low-rank-chunked": (
        lambda: LowRankLogits(3, rank=4, spatial_dims=3),
        {"num_samples": 4, "chunk_size": 2},
    ),
    "mixture": (
        lambda: MixtureLowRankLogits(3, num_components=2, rank=2, spatial_dims=3),
        {"num_samples": 4},
    ),
}


def _volume_features(seed=0):
    return np.random.default_rng(seed).normal(size=VOLUME).astype("float32")


@pytest.mark.parametrize("name", sorted(VOLUME_HEADS))
def test_heads_on_volumes_have_the_documented_shapes(name):
    head = VOLUME_HEADS[name][0]()
    b, d, h, w, _ = VOLUME
    params = head(_volume_features())
    assert isinstance(head.projection, keras.layers.Conv3D)
    assert tuple(params.shape) == (b, d, h, w, head.params_size)
    assert head.compute_output_shape(VOLUME) == (b, d, h, w, head.params_size)
    dist = head.distribution(params)
    assert tuple(dist.batch_shape) == (b,) and tuple(dist.event_shape) == (d, h, w, 3)
    assert tuple(dist.log_prob(dist.mean()).shape) == (b,)
    assert tuple(head.mean_logits(params).shape) == (b, d, h, w, 3)
    samples = head.sample_logits(params, 4, seed=[1, 2])
    assert tuple(samples.shape) == (4, b, d, h, w, 3)
    maps = head.sample_labels(params, 4, seed=[1, 2]).numpy()
    assert maps.shape == (4, b, d, h, w) and maps.dtype == np.int32
    assert set(np.unique(maps)) <= {0, 1, 2}
    probs = head.mean_probabilities(params, 4, seed=1).numpy()
    assert probs.shape == (b, d, h, w, 3)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(VOLUME_HEADS))
def test_heads_on_volumes_get_gradients_through_the_default_loss(name):
    make, loss_kwargs = VOLUME_HEADS[name]
    head = make()
    loss = head.default_loss(**loss_kwargs)
    labels = _labels(VOLUME[:-1], 3)
    features = tf.constant(_volume_features())
    with tf.GradientTape() as tape:
        value = loss(labels, head(features))
    grads = tape.gradient(value, head.trainable_weights)
    assert np.isfinite(value.numpy()) and len(grads) == len(head.trainable_weights) >= 2
    for weight, grad in zip(head.trainable_weights, grads, strict=True):
        grad = np.asarray(grad)
        assert np.isfinite(grad).all(), weight.path
        assert np.abs(grad).max() > 0, f"no gradient reaches {weight.path}"


@pytest.mark.parametrize("name", sorted(VOLUME_HEADS))
def test_heads_on_volumes_round_trip_config_and_keras_files(name, tmp_path):
    make, loss_kwargs = VOLUME_HEADS[name]
    head = make()
    revived, deserialized = run_serialization_test(head)
    assert revived.spatial_dims == deserialized.spatial_dims == 3
    inputs = keras.Input(VOLUME[1:])
    model = keras.Model(inputs, make()(inputs))
    x = _volume_features(seed=1)
    run_fit_step(model, x, _labels(VOLUME[:-1], 3), loss=head.default_loss(**loss_kwargs))
    loaded = run_model_saving_test(model, x, tmp_path)
    assert isinstance(loaded.layers[-1].projection, keras.layers.Conv3D)


@pytest.mark.parametrize(
    "head",
    [
        CategoricalLogits(3),
        LowRankLogits(3, rank=2),
        HeteroscedasticLogits(3, low_rank_classes=1),
        MixtureLowRankLogits(3, num_components=2, rank=2),
    ],
    ids=lambda head: type(head).__name__,
)
def test_configs_without_spatial_dims_load_as_images(head):
    # Files saved before volumes existed have no "spatial_dims" key: they are 2D heads.
    config = head.get_config()
    assert config.pop("spatial_dims") == 2
    old = type(head).from_config(config)
    assert old.spatial_dims == 2 and isinstance(old.projection, keras.layers.Conv2D)
    assert old.projection.name == "projection"
    assert tuple(old(tf.zeros([1, 4, 4, 2])).shape) == (1, 4, 4, head.params_size)


@pytest.mark.parametrize("spatial_dims", [1, 4, True, "3", 3.0])
def test_bad_spatial_dims_name_the_argument(spatial_dims):
    for make in (CategoricalLogits, LowRankLogits, HeteroscedasticLogits, MixtureLowRankLogits):
        with pytest.raises(ValueError, match=r"`spatial_dims` must be 2 \(images"):
            make(3, spatial_dims=spatial_dims)


@pytest.mark.parametrize("name", sorted(VOLUME_HEADS))
def test_bad_volume_inputs_name_the_argument_and_the_form(name):
    make, loss_kwargs = VOLUME_HEADS[name]
    head = make()
    for shape in ((4, 5, 6), (1, 2, 3, 4, 5, 6)):  # rank 3 and rank 6 features
        match = r"`features` must have rank 5 \(\[B, D, H, W, F\]\) .* got shape " + re.escape(
            str(shape)
        )
        with pytest.raises(ValueError, match=match):
            head(tf.zeros(shape))
    with pytest.raises(ValueError, match="a head for 2D inputs takes spatial_dims=2"):
        head(tf.zeros((2, 4, 5, 6)))
    p = head.params_size
    for params in (tf.zeros((2, 4, 5, p)), tf.zeros((1, 2, 3, 4, 5, p))):
        with pytest.raises(ValueError, match=rf"`params` must have rank 5 \(\[B, D, H, W, {p}\]"):
            head.sample_logits(params, 2)
        with pytest.raises(ValueError, match=r"`params` must have rank 5"):
            head.distribution(params)
    loss = head.default_loss(**loss_kwargs)
    params = head(_volume_features())
    labels = _labels((2, 3, 4, 6), 3)  # W = 6, not 5
    with pytest.raises(ValueError, match=r"`y_true` shape \(2, 3, 4, 6\) must equal the \[B, D"):
        loss(labels, params)
    with pytest.raises(ValueError, match=r"`y_true` .*label set \[B, K, D, H, W\]"):
        loss(_labels((2, 3, 4, 5, 6, 7), 3), params)
    if name != "categorical":  # a head-bound loss checks y_pred against the head's rank
        with pytest.raises(ValueError, match=r"`y_pred` must have rank 5 \(\[B, D, H, W"):
            loss(_labels((2, 4, 5), 3), tf.zeros((2, 4, 5, p)))


@pytest.mark.parametrize("name", ["low-rank", "mixture"])
def test_roi_mask_on_volumes_pins_the_logits_outside(name):
    head = VOLUME_HEADS[name][0]()
    b, d, h, w, _ = VOLUME
    mask = np.zeros((b, d, h, w), "float32")
    mask[:, 1:, 1:3, 2:] = 1.0
    params = head(_volume_features(), roi_mask=mask)
    same = head(_volume_features(), roi_mask=mask[..., None])  # [B, D, H, W, 1]
    np.testing.assert_array_equal(params.numpy(), same.numpy())
    parts = head.mixture_parts(params)[1:] if name == "mixture" else head.covariance_parts(params)
    loc, factor, diag = (np.asarray(t) for t in parts)
    if name == "mixture":  # [B, K, D, H, W, ...] -> component-major
        loc, factor, diag = (np.moveaxis(t, 1, 0) for t in (loc, factor, diag))
    outside = np.broadcast_to(mask == 0, factor.shape[:-2])  # ([K,] B, D, H, W)
    assert outside.any() and (~outside).any()
    assert np.all(factor[outside] == 0.0)
    np.testing.assert_allclose(diag[outside], head.epsilon, rtol=1e-5)
    assert np.all(diag[~outside] > 2 * head.epsilon)
    if name == "low-rank":  # samples outside the ROI stay at the mean (sqrt(epsilon) noise)
        samples = head.sample_logits(params, 8, seed=0).numpy()  # [8, B, D, H, W, C]
        assert np.abs(samples[:, mask == 0] - loc[mask == 0][None]).max() < 0.05
    for bad, match in (
        (mask[:, 0], r"`roi_mask` must have shape \[B, D, H, W\] or \[B, D, H, W, 1\]"),
        (mask[:, :, :, :4], r"`roi_mask` shape \(2, 3, 4, 4\) must equal the \[B, D, H, W\]"),
    ):
        with pytest.raises(ValueError, match=match):
            head(_volume_features(), roi_mask=bad)
