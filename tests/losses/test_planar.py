"""The fused class-planar kernels: the 2-class logit-difference path (`planar.binary_*`)
against plain autodiff, against the C-class kernels on matched noise, and its Monte Carlo
estimates against closed forms."""

import numpy as np
import pytest
import tensorflow as tf

from tfp_seg import losses
from tfp_seg.layers import LowRankLogits
from tfp_seg.losses import chunked, planar, scorers

B, R, X = 2, 3, 7


def _parts(rng, classes=2):
    loc = tf.constant(rng.normal(size=(B, classes, 1, X)).astype("float32"))
    factor = tf.constant(0.7 * rng.normal(size=(B, classes, R, X)).astype("float32"))
    scale = tf.constant(rng.uniform(0.2, 1.5, size=(B, classes, 1, X)).astype("float32"))
    return [loc, factor, scale]


def _mask(rng, k):
    labels = rng.integers(0, 2, size=(B, k, X))
    return tf.one_hot(labels, 2, on_value=True, off_value=False, axis=2)  # [B, K, 2, X]


def _reference_reductions(theta, z, eps, signs, weights, antithetic):
    """The same computation in plain TensorFlow ops (autodiff gradient)."""
    loc, factor, scale = theta
    dev = tf.matmul(z, factor) + scale * eps
    d = tf.concat([loc + dev, loc - dev], axis=2) if antithetic else loc + dev
    lp = tf.math.log_sigmoid(signs * d)  # [B, K, M, X]
    lp = tf.reshape(lp, [B * signs.shape[1], -1, X])
    loglik = tf.reduce_sum(lp * weights[:, tf.newaxis], axis=2)
    return loglik, tf.reduce_logsumexp(lp, axis=1)


def _grads(fn, theta, seed_grads):
    g_loglik, g_lse = seed_grads
    with tf.GradientTape() as tape:
        tape.watch(theta)
        loglik, lse = fn(theta)
        total = tf.reduce_sum(loglik * g_loglik) + tf.reduce_sum(lse * g_lse)
    return loglik, lse, tape.gradient(total, theta)


@pytest.mark.parametrize("antithetic", [False, True])
@pytest.mark.parametrize("raters", [1, 3])
def test_binary_reductions_match_autodiff(rng, antithetic, raters):
    theta = planar.binary_parts(_parts(rng))
    m_half = 4
    z = tf.constant(rng.normal(size=(B, 1, m_half, R)).astype("float32"))
    eps = tf.constant(rng.normal(size=(B, 1, m_half, X)).astype("float32"))
    signs = planar.binary_signs(_mask(rng, raters))
    weights = tf.constant(rng.uniform(0, 2, size=(B * raters, X)).astype("float32"))
    m = 2 * m_half if antithetic else m_half
    seed_grads = (
        tf.constant(rng.normal(size=(B * raters, m)).astype("float32")),
        tf.constant(rng.normal(size=(B * raters, X)).astype("float32")),
    )
    fused = _grads(
        lambda t: planar.binary_reductions(t, z, eps, signs, weights, antithetic), theta, seed_grads
    )
    ref = _grads(
        lambda t: _reference_reductions(t, z, eps, signs, weights, antithetic), theta, seed_grads
    )
    for a, b in zip(fused[:2], ref[:2], strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-5)
    for a, b in zip(fused[2], ref[2], strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)
    # the chunk scorer (log_probs) is the same function with the same gradient
    g_lp = tf.constant(rng.normal(size=(B * raters, m, X)).astype("float32"))
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(theta)
        lp = planar.binary_log_probs(*theta, z, eps, signs, antithetic)
        loc, factor, scale = theta
        dev = tf.matmul(z, factor) + scale * eps
        d = tf.concat([loc + dev, loc - dev], axis=2) if antithetic else loc + dev
        lp_ref = tf.reshape(tf.math.log_sigmoid(signs * d), [B * raters, m, X])
        totals = tf.reduce_sum(lp * g_lp), tf.reduce_sum(lp_ref * g_lp)
    np.testing.assert_allclose(lp.numpy(), lp_ref.numpy(), rtol=1e-5, atol=1e-6)
    for a, b in zip(tape.gradient(totals[0], theta), tape.gradient(totals[1], theta), strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("antithetic", [False, True])
def test_binary_path_equals_two_class_kernels_on_matched_noise(rng, antithetic):
    # eps' = (s1 eps1 - s0 eps0) / sqrt(s0^2 + s1^2) makes the difference of the two-class
    # samples exactly the binary path's: the same label log-probabilities.
    theta = _parts(rng)
    z = tf.constant(rng.normal(size=(B, 1, 5, R)).astype("float32"))
    eps = tf.constant(rng.normal(size=(B, 2, 5, X)).astype("float32"))
    mask = _mask(rng, 2)
    weights = tf.constant(rng.uniform(0, 1, size=(B * 2, X)).astype("float32"))
    scale = theta[2]
    mixed = (scale[:, 1:2] * eps[:, 1:2] - scale[:, 0:1] * eps[:, 0:1]) / tf.sqrt(
        scale[:, 0:1] ** 2 + scale[:, 1:2] ** 2
    )
    general = planar.reductions(theta, z, eps, mask, weights, antithetic)
    binary = planar.binary_reductions(
        planar.binary_parts(theta), z, mixed, planar.binary_signs(mask), weights, antithetic
    )
    for a, b in zip(general, binary, strict=True):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=2e-5)


def _pixel_marginal_nll(mean, var, label, nodes=96):
    """`-log E[sigmoid(s d)]`, `d ~ N(mean, var)`, by Gauss-Hermite quadrature (differentiable)."""
    t, w = np.polynomial.hermite.hermgauss(nodes)
    t = tf.constant(t * np.sqrt(2.0), tf.float64)
    w = tf.constant(w / np.sqrt(np.pi), tf.float64)
    s = tf.cast(2 * label - 1, tf.float64)[..., tf.newaxis]
    d = mean[..., tf.newaxis] + tf.sqrt(var)[..., tf.newaxis] * t
    return -tf.math.log(tf.reduce_sum(w * tf.sigmoid(s * d), axis=-1))


def test_binary_marginal_and_its_gradient_match_quadrature(rng):
    # The per-pixel (marginal) NLL of a 2-class head at M = 40000 samples against the closed
    # form -log E[sigmoid(s d)], d ~ N(mu_1 - mu_0, |P_1 - P_0|^2 + D_0 + D_1), by quadrature;
    # the gradient w.r.t. the head's params against the quadrature's autodiff gradient.
    # Bounds: the Monte Carlo error of a mean of M sigmoids (std <= 0.5 / sqrt(M) per pixel,
    # relative to E[sigmoid] >= 0.1 here: <= 0.025 in log) plus the O(1/M) bias of the log.
    head = LowRankLogits(2, rank=2)
    size = (1, 2, 3)
    params = tf.constant(0.6 * rng.normal(size=(*size, head.params_size)).astype("float32"))
    labels = rng.integers(0, 2, size=size)
    m = 40_000

    with tf.GradientTape() as tape:
        tape.watch(params)
        _, marginal = chunked.sampled_nll_terms(head, labels, params, m, seed=7, antithetic=True)
    g_mc = tape.gradient(marginal, params).numpy()

    with tf.GradientTape() as tape:
        tape.watch(params)
        loc, factor, diag = head.covariance_parts(params)  # [1,2,3,C], [..,C,R], [..,C]
        mean = loc[..., 1] - loc[..., 0]
        var = tf.reduce_sum((factor[..., 1, :] - factor[..., 0, :]) ** 2, axis=-1)
        var = tf.cast(var + diag[..., 0] + diag[..., 1], tf.float64)
        pixel_nll = _pixel_marginal_nll(tf.cast(mean, tf.float64), var, tf.constant(labels))
        exact = tf.reduce_sum(pixel_nll)
    g_exact = tape.gradient(exact, params).numpy()

    p_min = np.exp(-pixel_nll.numpy().max())
    assert p_min > 0.1
    pixels = labels.size
    assert abs(marginal.numpy()[0] - exact.numpy()) < pixels * (4 * 0.5 / np.sqrt(m) / p_min)
    np.testing.assert_allclose(g_mc, g_exact, atol=0.02)
    assert np.abs(g_exact).max() > 0.05  # the check compares gradients of a real size


@pytest.mark.parametrize("antithetic", [False, True])
def test_binary_joint_loss_is_unbiased_against_head_samples(rng, antithetic):
    # The joint term (the paper's estimator) and its gradient at M = 2, averaged over 400
    # seeds, against the head's own two-class samples (sample_logits) drawn the same way
    # (independent or one antithetic pair: the log of a 2-sample mean has a bias that depends
    # on it): the same expectation within 4 standard errors.
    head = LowRankLogits(2, rank=2)
    params = tf.constant(0.5 * rng.normal(size=(1, 3, 3, head.params_size)).astype("float32"))
    labels = rng.integers(0, 2, size=(1, 3, 3))

    @tf.function
    def both(seed):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(params)
            fused = chunked.sampled_nll_terms(
                head, labels, params, 2, seed=seed, antithetic=antithetic
            )[0]
            samples = head.sample_logits(params, 2, seed=seed, antithetic=antithetic)
            direct = losses.mc_categorical_nll(labels, samples)
        grads = [tape.gradient(t, params)[0, 1, 1] for t in (fused, direct)]
        return fused[0], direct[0], grads[0], grads[1]

    runs = [both(tf.constant([s, 3])) for s in range(400)]
    fused, direct, g_fused, g_direct = (np.stack([r[i].numpy() for r in runs]) for i in range(4))
    for a, b in ((fused, direct), (g_fused, g_direct)):
        stderr = np.sqrt(a.var(axis=0) / len(a) + b.var(axis=0) / len(b))
        assert np.all(np.abs(a.mean(axis=0) - b.mean(axis=0)) < 4 * stderr + 1e-6)


def test_fixed_noise_keeps_the_two_class_kernels(rng):
    # Fixed noise is given per class (the head's sample_logits format): it keeps the C-class
    # path, so the fused loss reproduces the head's samples exactly.
    head = LowRankLogits(2, rank=2)
    assert scorers.uses_logit_difference(head, None)
    assert not scorers.uses_logit_difference(head, (tf.zeros([1]), tf.zeros([1])))
    assert not scorers.uses_logit_difference(LowRankLogits(3, rank=2), None)
