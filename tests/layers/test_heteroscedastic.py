import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import expit, logsumexp, softmax
from scipy.stats import multivariate_normal

import tfp_seg
from tests.helpers import run_layer_test
from tfp_seg import losses
from tfp_seg.layers import HeteroscedasticLogits
from tfp_seg.layers.heteroscedastic_logits import LOG_VARIANCE_MAX, LOG_VARIANCE_MIN


def _labels(shape, c, seed=0):
    return np.random.default_rng(seed).integers(0, c, size=shape).astype("int32")


def _params(head, shape, seed=0, log_var=(-1.0, 1.0), loc_scale=1.0):
    """Random packed params with log-variances uniform in `log_var`."""
    rng = np.random.default_rng(seed)
    c, k = head.num_classes, head.low_rank_classes
    loc = rng.normal(size=shape + (c,)) * loc_scale
    raw = rng.uniform(*log_var, size=shape + (c,))
    factor = rng.normal(size=shape + (c * k,)) * 0.7
    return np.concatenate([loc, raw, factor], -1).astype("float32")


# --- layer contract --------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 2])
def test_layer_contract(k):
    head_kwargs = dict(num_classes=3, low_rank_classes=k)
    loss = HeteroscedasticLogits(**head_kwargs).default_loss(num_samples=4)
    assert isinstance(loss, losses.HeteroscedasticNLL)
    run_layer_test(
        HeteroscedasticLogits,
        head_kwargs,
        input_shape=(2, 16, 16, 5),
        expected_output_shape=(2, 16, 16, 3 * (2 + k)),
        loss=loss,
        target=_labels((2, 16, 16), 3),
    )


def test_params_size_and_config():
    assert HeteroscedasticLogits(4).params_size == 8
    assert HeteroscedasticLogits(4, low_rank_classes=3).params_size == 4 * 5
    assert HeteroscedasticLogits.params_size_for(4, 3) == 20
    head = HeteroscedasticLogits(3, low_rank_classes=2, antithetic=True, kernel_size=3)
    config = head.get_config()
    assert config["low_rank_classes"] == 2 and config["antithetic"] is True
    assert config["kernel_size"] == 3
    assert HeteroscedasticLogits.from_config(config).get_config() == config


@pytest.mark.parametrize("k", [0, 2])
def test_bias_initialises_log_variance_to_minus_ten(k):
    head = HeteroscedasticLogits(3, low_rank_classes=k)
    params = head(tf.zeros([1, 4, 4, 6]))  # zero features: params == bias
    bias = head.projection.bias.numpy()
    np.testing.assert_array_equal(bias[:3], 0.0)
    np.testing.assert_array_equal(bias[3:6], -10.0)
    np.testing.assert_array_equal(bias[6:], 0.0)
    _, factor, variance = head.covariance_parts(params)
    np.testing.assert_allclose(variance.numpy(), np.exp(-10.0), rtol=1e-5)
    assert factor.shape == (1, 4, 4, 3, k)


def test_split_and_pack_are_inverse():
    for k in (0, 2):
        head = HeteroscedasticLogits(3, low_rank_classes=k)
        params = _params(head, (2, 3, 4))
        loc, raw, factor = head.split_params(params)
        assert factor.shape == (2, 3, 4, 3, k)
        np.testing.assert_array_equal(head.pack_params(loc, raw, factor).numpy(), params)
        raw_back = head.raw_from_diag(head.diag_from_raw(raw))
        np.testing.assert_allclose(raw_back.numpy(), raw.numpy(), atol=1e-5)


# --- numerical correctness -------------------------------------------------------------------
def test_diagonal_distribution_has_mean_mu_and_variance_sigma2():
    head = HeteroscedasticLogits(3)
    params = _params(head, (2, 3, 3))
    dist = head.distribution(params)
    assert dist.batch_shape == [2] and dist.event_shape == [3, 3, 3]
    np.testing.assert_allclose(dist.mean().numpy(), params[..., :3])
    np.testing.assert_allclose(dist.variance().numpy(), np.exp(params[..., 3:6]), rtol=1e-5)
    np.testing.assert_allclose(head.mean_logits(params).numpy(), params[..., :3])


def test_low_rank_class_covariance_matches_dense_reference():
    """K > 0: per-pixel covariance over classes = V V^T + diag(sigma^2); log_prob vs SciPy."""
    head = HeteroscedasticLogits(3, low_rank_classes=2)
    params = _params(head, (2, 2, 3), seed=1)
    dist = head.distribution(params)
    assert dist.batch_shape == [2] and dist.event_shape == [2, 3, 3]
    loc = params[..., :3]
    var = np.exp(params[..., 3:6])
    v = params[..., 6:].reshape(2, 2, 3, 3, 2)
    cov = v @ np.swapaxes(v, -1, -2) + var[..., None] * np.eye(3)
    np.testing.assert_allclose(dist.distribution.covariance().numpy(), cov, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(dist.mean().numpy(), loc, rtol=1e-6)
    x = np.random.default_rng(2).normal(size=loc.shape).astype("float32")
    ref = np.zeros(2)
    for b in range(2):
        for i in range(2):
            for j in range(3):
                ref[b] += multivariate_normal(loc[b, i, j], cov[b, i, j]).logpdf(x[b, i, j])
    np.testing.assert_allclose(dist.log_prob(x).numpy(), ref, rtol=1e-4)


@pytest.mark.parametrize("k", [0, 2])
def test_sample_moments_match_distribution(k):
    """Sample mean/covariance within 5 standard errors (n = 20000, fixed seed)."""
    head = HeteroscedasticLogits(3, low_rank_classes=k)
    params = _params(head, (1, 1, 2), seed=3)
    n = 20000
    s = head.sample_logits(params, n, seed=7).numpy().reshape(n, 2, 3)
    dist = head.distribution(params)
    loc = params[..., :3].reshape(2, 3)
    if k:
        cov = dist.distribution.covariance().numpy().reshape(2, 3, 3)
    else:
        cov = np.stack([np.diag(v) for v in np.exp(params[..., 3:6]).reshape(2, 3)])
    sd = np.sqrt(np.diagonal(cov, axis1=-2, axis2=-1))
    np.testing.assert_array_less(np.abs(s.mean(0) - loc), 5 * sd / np.sqrt(n))
    emp = np.einsum("npi,npj->pij", s - loc, s - loc) / n
    se = np.sqrt((sd[:, :, None] ** 2 * sd[:, None, :] ** 2 + cov**2) / n)
    np.testing.assert_array_less(np.abs(emp - cov), 5 * se)


def test_sample_logits_with_fixed_noise_is_the_formula():
    rng = np.random.default_rng(4)
    head = HeteroscedasticLogits(3, low_rank_classes=2)
    params = _params(head, (2, 2, 2), seed=4)
    z = rng.normal(size=(5, 2, 2, 2, 2)).astype("float32")
    eps = rng.normal(size=(5, 2, 2, 2, 3)).astype("float32")
    got = head.sample_logits(params, 5, noise=(z, eps)).numpy()
    loc, sigma = params[..., :3], np.exp(0.5 * params[..., 3:6])
    v = params[..., 6:].reshape(2, 2, 2, 3, 2)
    want = loc + np.einsum("bhwck,nbhwk->nbhwc", v, z) + sigma * eps
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # antithetic: mirrored pairs about the mean
    anti = head.sample_logits(params, 10, noise=(z, eps), antithetic=True).numpy()
    np.testing.assert_allclose(anti[:5] + anti[5:], 2 * loc[None].repeat(5, 0), atol=1e-5)
    with pytest.raises(ValueError, match="`noise`"):
        head.sample_logits(params, 5, noise=eps)
    diag = HeteroscedasticLogits(3)
    p0 = _params(diag, (2, 2, 2))
    got0 = diag.sample_logits(p0, 5, noise=eps).numpy()
    np.testing.assert_allclose(got0, p0[..., :3] + np.exp(0.5 * p0[..., 3:]) * eps, rtol=1e-5)


def test_seeded_sampling_is_reproducible():
    head = HeteroscedasticLogits(3, low_rank_classes=1)
    params = _params(head, (1, 4, 4))
    a = head.sample_logits(params, 4, seed=3).numpy()
    b = head.sample_logits(params, 4, seed=3).numpy()
    c = head.sample_logits(params, 4, seed=4).numpy()
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


@pytest.mark.parametrize("k", [0, 2])
def test_gradients_reach_mu_log_variance_and_factor(k):
    head = HeteroscedasticLogits(3, low_rank_classes=k)
    params = tf.Variable(_params(head, (2, 4, 4), seed=5))
    labels = _labels((2, 4, 4), 3)
    loss_fn = head.default_loss(num_samples=4)
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, params)
    grad = tape.gradient(loss, params).numpy()
    groups = [("mu", slice(0, 3)), ("log_variance", slice(3, 6))]
    if k:
        groups.append(("factor", slice(6, None)))
    for name, sl in groups:
        assert np.abs(grad[..., sl]).max() > 1e-6, f"no gradient reaches {name}"
    # also through the layer's weights (from the default -10 bias)
    features = tf.random.stateless_normal([2, 4, 4, 5], seed=[0, 1])
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, head(features))
    kernel_grad = tape.gradient(loss, head.projection.kernel).numpy()
    assert np.abs(kernel_grad[..., 3:6]).max() > 0, "no gradient reaches the log-variance kernel"


# --- the loss ----------------------------------------------------------------------------------
def _numpy_marginal_nll(labels, samples, ignore_label=None, class_weights=None):
    t, b, h, w, c = samples.shape
    out = np.zeros(b)
    for bi in range(b):
        for i in range(h):
            for j in range(w):
                y = labels[bi, i, j]
                if ignore_label is not None and y == ignore_label:
                    continue
                wgt = 1.0 if class_weights is None else class_weights[y]
                probs = softmax(samples[:, bi, i, j].astype("float64"), axis=-1)
                log_p = np.log(probs[:, y])
                out[bi] -= wgt * (logsumexp(log_p) - np.log(t))
    return out


def test_marginal_mc_nll_matches_numpy_loop(rng):
    samples = (rng.normal(size=(5, 2, 3, 4, 3)) * 2).astype("float32")
    labels = rng.integers(0, 3, size=(2, 3, 4))
    got = losses.mc_marginal_nll(labels, samples).numpy()
    np.testing.assert_allclose(got, _numpy_marginal_nll(labels, samples), rtol=1e-5)
    labels[0, 0, :] = 255
    cw = [0.5, 1.0, 2.0]
    got = losses.mc_marginal_nll(labels, samples, ignore_label=255, class_weights=cw).numpy()
    np.testing.assert_allclose(got, _numpy_marginal_nll(labels, samples, 255, cw), rtol=1e-5)


def test_pixelwise_nll_is_between_ssn_nll_and_mean_cross_entropy(rng):
    """Per-pixel integration >= whole-map integration, and <= the mean per-sample NLL."""
    samples = (rng.normal(size=(6, 2, 4, 4, 3)) * 2).astype("float32")
    labels = rng.integers(0, 3, size=(2, 4, 4))
    pixelwise = losses.mc_marginal_nll(labels, samples).numpy()
    joint = losses.mc_categorical_nll(labels, samples).numpy()
    per_sample = np.mean(
        [losses.mc_categorical_nll(labels, samples[i : i + 1]).numpy() for i in range(6)], 0
    )
    assert np.all(joint >= pixelwise - 1e-4)
    assert np.all(pixelwise <= per_sample + 1e-4)
    assert np.all(pixelwise < per_sample - 1e-2)  # strictly, for spread-out samples


@pytest.mark.parametrize("k", [0, 2])
def test_nll_equals_cross_entropy_as_sigma_goes_to_zero(k):
    head = HeteroscedasticLogits(3, low_rank_classes=k)
    params = _params(head, (2, 4, 4), seed=6, log_var=(-200.0, -200.0))
    params[..., 6:] = 0.0
    labels = _labels((2, 4, 4), 3, seed=6)
    nll = losses.HeteroscedasticNLL(head, num_samples=8)(labels, params).numpy()
    xent = losses.SegmentationCrossEntropy(num_classes=3)(labels, params).numpy()
    # sigma is clamped to exp(-10): logits move by < 1e-4, so the losses agree to ~1e-4
    np.testing.assert_allclose(nll, xent, rtol=1e-4)


@pytest.mark.parametrize("k", [0, 1])
def test_mc_estimate_matches_gauss_hermite_reference(k):
    """C = 2: softmax(u)[y] = sigmoid(d), d = u_y - u_other ~ N(m, v) -> 1-D quadrature.

    Tolerance: the per-pixel estimate -log p_hat has standard deviation ~ s_i / (p_i sqrt(T))
    (delta method, s_i the std of sigmoid(d)) and bias ~ s_i^2 / (2 T p_i^2); the mean over
    n pixels, less that bias, must match within 4 standard errors (plus 25% of the bias for
    the error of its second-order approximation).
    """
    head = HeteroscedasticLogits(2, low_rank_classes=k)
    shape = (1, 32, 32)
    params = _params(head, shape, seed=8, log_var=(-1.0, 2.0))
    labels = _labels(shape, 2, seed=8)
    t = 20
    nll = losses.HeteroscedasticNLL(head, num_samples=t, normalize="none")(labels, params)
    got = float(nll.numpy()) / labels.size

    loc = params[..., :2].astype("float64")
    var = np.exp(params[..., 2:4].astype("float64"))
    v = params[..., 4:].reshape(shape + (2, k)).astype("float64")
    cov = v @ np.swapaxes(v, -1, -2) + var[..., None] * np.eye(2)
    sign = np.where(labels == 0, 1.0, -1.0)  # d = u_y - u_other
    m = sign * (loc[..., 0] - loc[..., 1])
    dvar = cov[..., 0, 0] + cov[..., 1, 1] - 2 * cov[..., 0, 1]
    x, w = np.polynomial.hermite.hermgauss(80)
    vals = expit(m[..., None] + np.sqrt(2 * dvar)[..., None] * x)
    p = (vals * w).sum(-1) / np.sqrt(np.pi)
    p2 = (vals**2 * w).sum(-1) / np.sqrt(np.pi)
    s2 = np.maximum(p2 - p**2, 0)
    ref = np.mean(-np.log(p))
    n = labels.size
    se = np.sqrt(np.sum(s2 / (t * p**2))) / n
    bias = np.sum(s2 / (2 * t * p**2)) / n
    tol = 4 * se + 0.25 * bias
    assert abs(got - bias - ref) < tol, (got, ref, se, bias)
    # and the test can fail: the deterministic cross-entropy of the mean is far off
    xent = float(losses.SegmentationCrossEntropy(num_classes=2)(labels, params).numpy())
    assert abs(xent - bias - ref) > 3 * tol


@pytest.mark.parametrize("k", [0, 2])
def test_finite_for_extreme_logits_and_variances(k):
    head = HeteroscedasticLogits(3, low_rank_classes=k)
    params = _params(head, (2, 4, 4), seed=9)
    params[..., :3] = np.where(params[..., :3] > 0, 1e4, -1e4)
    params[0, ..., 3:6] = -1e4  # tiny variances
    params[1, ..., 3:6] = 1e4  # huge variances (clamped)
    labels = _labels((2, 4, 4), 3, seed=9)
    variable = tf.Variable(params)
    with tf.GradientTape() as tape:
        loss = losses.HeteroscedasticNLL(head, num_samples=4)(labels, variable)
    grad = tape.gradient(loss, variable)
    assert np.isfinite(loss.numpy())
    assert np.all(np.isfinite(grad.numpy()))
    assert np.all(np.isfinite(head.sample_logits(params, 4).numpy()))
    assert np.all(np.isfinite(head.distribution(params).log_prob(params[..., :3]).numpy()))
    variance = head.covariance_parts(params)[2].numpy()
    np.testing.assert_allclose(variance[0], np.exp(LOG_VARIANCE_MIN), rtol=1e-5)
    np.testing.assert_allclose(variance[1], np.exp(LOG_VARIANCE_MAX), rtol=1e-5)


def test_loss_config_round_trip_and_head_copy():
    head = HeteroscedasticLogits(3, low_rank_classes=1)
    loss = losses.HeteroscedasticNLL(
        head, num_samples=6, ignore_label=255, class_weights=[1, 2, 3], normalize="none"
    )
    assert loss.head is not head and not loss.head.built  # weightless copy
    config = loss.get_config()
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(revived, losses.HeteroscedasticNLL)
    assert revived.get_config() == config
    assert revived.head.low_rank_classes == 1 and revived.num_samples == 6
    with pytest.raises(ValueError, match="num_samples"):
        losses.HeteroscedasticNLL(head, num_samples=0)
    with pytest.raises(ValueError, match="even"):
        losses.HeteroscedasticNLL(head, num_samples=3, antithetic=True)
    with pytest.raises(ValueError, match="`head`"):
        losses.HeteroscedasticNLL("not a head")
    with pytest.raises(ValueError, match="class_weights"):
        losses.HeteroscedasticNLL(head, class_weights=[1.0, 2.0])


def test_segmenter_with_heteroscedastic_head_fits_and_round_trips(tmp_path):
    model = tfp_seg.models.ProbabilisticSegmenter(
        tfp_seg.models.UNet(base_filters=4, depth=1), HeteroscedasticLogits(3)
    )
    x = np.random.default_rng(0).normal(size=(2, 16, 16, 1)).astype("float32")
    y = _labels((2, 16, 16), 3)
    model.compile(optimizer="adam", loss="auto")
    history = model.fit(x, y, epochs=1, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert model.sample(x, 3, seed=0).shape == (3, 2, 16, 16)
    probs = model.predict_proba(x, 4, seed=0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    np.testing.assert_allclose(loaded(x).numpy(), model(x).numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_classes=1), "num_classes"),
        (dict(num_classes=3, low_rank_classes=-1), "low_rank_classes"),
        (dict(num_classes=3, low_rank_classes=1.5), "low_rank_classes"),
        (dict(num_classes=3, low_rank_classes=True), "low_rank_classes"),
    ],
)
def test_bad_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HeteroscedasticLogits(**kwargs)


def test_bad_params():
    head = HeteroscedasticLogits(3)
    with pytest.raises(ValueError, match="`params`"):
        head.distribution(tf.zeros([1, 4, 4, 7]))
    with pytest.raises(ValueError, match="`params`"):
        head.sample_logits(tf.zeros([4, 4, 6]), 2)
    bad = np.zeros([1, 2, 2, 6], "float32")
    bad[0, 0, 0, 4] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="`params`"):
        head.sample_logits(bad, 2)


def test_public_names():
    assert tfp_seg.layers.HeteroscedasticLogits is HeteroscedasticLogits
    assert "HeteroscedasticLogits" in tfp_seg.layers.__all__
    assert "HeteroscedasticNLL" in tfp_seg.losses.__all__
