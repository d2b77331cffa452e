"""The softmax temperature of `HeteroscedasticLogits` (Collier et al., 2021): the head's logits
are `u / tau`, so every softmax of its samples is `softmax(u / tau)`. Checked against closed
forms at the limits (tau -> 0: the one-hot arg max of u; tau -> inf: uniform 1 / C; zero
variance: softmax(mu / tau)), and tau = 1 against today's formulas, bit for bit."""

import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import softmax
from scipy.stats import norm

from tfp_seg import distributions as dists
from tfp_seg import losses
from tfp_seg.layers import HeteroscedasticLogits, LowRankLogits
from tfp_seg.layers.heteroscedastic_logits import LOG_VARIANCE_MIN

FIXTURES = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "keras_v0_1_0")


def _params(c, k, shape=(2, 4, 4), seed=0, log_var=(-1.0, 1.0)):
    rng = np.random.default_rng(seed)
    loc = rng.normal(size=shape + (c,))
    raw = rng.uniform(*log_var, size=shape + (c,))
    factor = rng.normal(size=shape + (c * k,)) * 0.7
    return np.concatenate([loc, raw, factor], -1).astype("float32")


def _labels(shape, c, seed=1):
    return np.random.default_rng(seed).integers(0, c, size=shape).astype("int32")


# --- argument ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), True, "1", None])
def test_temperature_must_be_a_positive_finite_float(bad):
    with pytest.raises(ValueError, match="`temperature` must be a finite float > 0"):
        HeteroscedasticLogits(3, temperature=bad)


def test_temperature_is_in_the_config_and_defaults_to_one():
    head = HeteroscedasticLogits(3, temperature=0.25)
    assert head.get_config()["temperature"] == 0.25
    assert HeteroscedasticLogits.from_config(head.get_config()).temperature == 0.25
    config = HeteroscedasticLogits(3).get_config()
    assert config["temperature"] == 1.0
    del config["temperature"]  # a config written before the temperature existed
    assert HeteroscedasticLogits.from_config(config).temperature == 1.0


def test_old_keras_file_loads_with_the_default_temperature():
    model = keras.models.load_model(os.path.join(FIXTURES, "heteroscedastic.keras"), safe_mode=True)
    x = np.load(os.path.join(FIXTURES, "input.npy"))
    expected = np.load(os.path.join(FIXTURES, "heteroscedastic_output.npy"))
    assert model.head.temperature == 1.0
    assert model.loss.head.temperature == 1.0 and model.loss.temperature is None
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-5, atol=1e-5)


# --- tau = 1: today's numbers, bit for bit -----------------------------------------------------
@pytest.mark.parametrize("k", [0, 2])
def test_unit_temperature_reproduces_the_untempered_formulas_exactly(k):
    head = HeteroscedasticLogits(3, low_rank_classes=k)
    explicit = HeteroscedasticLogits(3, low_rank_classes=k, temperature=1.0)
    params = tf.constant(_params(3, k))
    loc, raw, factor = head.split_params(params)
    scale = tf.exp(0.5 * tf.clip_by_value(raw, -20.0, 20.0))
    rng = np.random.default_rng(2)
    eps = tf.constant(rng.normal(size=(5,) + tuple(loc.shape)), tf.float32)
    if k:
        z = tf.constant(rng.normal(size=(5, 2, 4, 4, k)), tf.float32)
        noise = (z, eps)
        today = loc[None] + (tf.einsum("bhwck,nbhwk->nbhwc", factor, z) + scale[None] * eps)
        today_probs = dists.mean_softmax(head.sample_logits(params, 6, seed=3))
    else:
        noise = eps
        today = loc[None] + scale[None] * eps
        today_probs = dists.low_rank_mean_probabilities(
            loc, None, head.diag_from_raw(raw), 6, seed=3
        )
    for h in (head, explicit):
        np.testing.assert_array_equal(h.sample_logits(params, 5, noise=noise), today)
        np.testing.assert_array_equal(h.mean_probabilities(params, 6, seed=3), today_probs)
        np.testing.assert_array_equal(h.mean_logits(params), loc)
        parts = h.covariance_parts(params)
        for got, want in zip(parts, (loc, factor, head.diag_from_raw(raw)), strict=True):
            np.testing.assert_array_equal(got, want)


# --- the tempered softmax ----------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 2])
@pytest.mark.parametrize("tau", [0.3, 2.5])
def test_samples_are_the_untempered_samples_over_tau(k, tau):
    params = tf.constant(_params(3, k))
    plain = HeteroscedasticLogits(3, low_rank_classes=k)
    hot = HeteroscedasticLogits(3, low_rank_classes=k, temperature=tau)
    u = plain.sample_logits(params, 8, seed=4)
    np.testing.assert_allclose(hot.sample_logits(params, 8, seed=4), u / tau, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(hot.mean_logits(params), plain.mean_logits(params) / tau, rtol=1e-6)
    # The distribution is that of u / tau: its log-density at the samples, by change of variables.
    log_p_u = plain.distribution(params).log_prob(u)
    event = 4 * 4 * 3
    np.testing.assert_allclose(
        hot.distribution(params).log_prob(u / tau),
        log_p_u + event * math.log(tau),
        rtol=1e-5,
    )
    # Label maps are the arg max of u: the same for every temperature.
    np.testing.assert_array_equal(
        hot.sample_labels(params, 8, seed=5), plain.sample_labels(params, 8, seed=5)
    )


@pytest.mark.parametrize("k", [0, 1])
@pytest.mark.parametrize("tau", [0.2, 1.0, 3.0])
def test_zero_variance_gives_softmax_of_mu_over_tau(k, tau):
    # Log-variance at its floor (sigma = e^-10) and no class factor: the logits are mu / tau up
    # to sigma / tau <= 2.3e-4, so the probabilities are softmax(mu / tau) within 2.3e-4
    # (softmax is 1-Lipschitz in the max norm); with zero noise exactly.
    c = 3
    params = _params(c, k, log_var=(LOG_VARIANCE_MIN, LOG_VARIANCE_MIN))
    params[..., 2 * c :] = 0.0
    head = HeteroscedasticLogits(c, low_rank_classes=k, temperature=tau)
    mu = params[..., :c]
    expected = softmax(mu / tau, axis=-1)
    bound = math.exp(0.5 * LOG_VARIANCE_MIN) / tau * 5.0  # 5 sigma of the noise
    np.testing.assert_allclose(head.mean_probabilities(params, 16, seed=6), expected, atol=bound)
    zeros = np.zeros((2,) + mu.shape, "float32")
    noise = (np.zeros((2,) + mu.shape[:-1] + (k,), "float32"), zeros) if k else zeros
    exact = softmax(np.asarray(head.sample_logits(params, 2, noise=noise), np.float64), axis=-1)
    np.testing.assert_allclose(exact, np.broadcast_to(expected, exact.shape), rtol=1e-6)


@pytest.mark.parametrize("k", [0, 2])
def test_small_temperature_gives_the_one_hot_arg_max_of_the_samples(k):
    # softmax(u / tau)_c <= exp(-gap / tau) off the arg max, gap = top-1 minus top-2 logit of u.
    tau = 1e-3
    params = tf.constant(_params(3, k))
    u = np.asarray(HeteroscedasticLogits(3, low_rank_classes=k).sample_logits(params, 6, seed=7))
    eta = HeteroscedasticLogits(3, low_rank_classes=k, temperature=tau).sample_logits(
        params, 6, seed=7
    )
    probs = softmax(np.asarray(eta, np.float64), axis=-1)
    top2 = np.sort(u, axis=-1)[..., -2:]
    gap = top2[..., 1] - top2[..., 0]
    one_hot = np.eye(3)[u.argmax(-1)]
    bound = 2.0 * np.exp(-gap / tau)[..., None] + 1e-6  # C - 1 = 2 classes off the arg max
    assert np.all(np.abs(probs - one_hot) <= bound)
    assert np.mean(gap > 0.05) > 0.9  # most pixels are decided far inside the bound


def test_small_temperature_mean_probabilities_are_the_arg_max_probabilities():
    # C = 2, no class factor: P(argmax u = 1) = Phi((mu_1 - mu_0) / sqrt(s_0^2 + s_1^2)), the
    # limit of E[softmax(u / tau)] as tau -> 0. N = 4000 samples per pixel; every pixel within
    # 5 binomial standard errors (plus the bias bound of a finite tau, below 1e-3 here).
    n = 4000
    params = _params(2, 0, shape=(1, 4, 4))
    head = HeteroscedasticLogits(2, temperature=1e-3)
    mu, raw = params[..., :2], params[..., 2:4]
    var = np.exp(raw.astype(np.float64))
    p1 = norm.cdf((mu[..., 1] - mu[..., 0]) / np.sqrt(var.sum(-1)))
    probs = np.asarray(head.mean_probabilities(params, n, seed=8), np.float64)
    se = np.sqrt(p1 * (1 - p1) / n)
    assert np.all(np.abs(probs[..., 1] - p1) <= 5 * se + 1e-3)
    # tau = 1 is a different (smoother) functional of the same u: the test can tell them apart.
    smooth = np.asarray(HeteroscedasticLogits(2).mean_probabilities(params, n, seed=8))
    assert np.max(np.abs(smooth[..., 1] - p1) / (se + 1e-3)) > 5


@pytest.mark.parametrize("k", [0, 2])
def test_large_temperature_gives_uniform_probabilities(k):
    # |softmax(x)_c - 1/C| <= (exp(2 max|x|) - 1) / C for x = u / tau.
    tau = 1e4
    c = 3
    params = tf.constant(_params(c, k))
    head = HeteroscedasticLogits(c, low_rank_classes=k, temperature=tau)
    eta = np.asarray(head.sample_logits(params, 16, seed=9), np.float64)
    bound = (math.exp(2 * np.abs(eta).max()) - 1) / c
    assert bound < 1e-2  # the limit is reached, not trivially satisfied
    np.testing.assert_allclose(softmax(eta, axis=-1), 1 / c, atol=bound)
    np.testing.assert_allclose(head.mean_probabilities(params, 16, seed=9), 1 / c, atol=bound)
    # ... and the NLL of any labels is log C nats per pixel: |log(C p) | <= C |p - 1/C| / (1 - C b).
    labels = _labels((2, 4, 4), c)
    nll = losses.HeteroscedasticNLL(head, num_samples=4)(labels, params)
    assert abs(float(nll) - math.log(c)) <= c * bound / (1 - c * bound)


# --- the loss ----------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_nll_scores_the_tempered_softmax(chunk_size):
    tau = 0.4
    params = tf.constant(_params(3, 0))
    labels = _labels((2, 4, 4), 3)
    plain = HeteroscedasticLogits(3)
    hot = HeteroscedasticLogits(3, temperature=tau)
    kwargs = dict(num_samples=4, normalize="none", chunk_size=chunk_size)

    def seeded(fn):
        keras.utils.set_random_seed(11)  # the loss draws unseeded samples
        return np.asarray(fn())

    by_head = seeded(lambda: losses.HeteroscedasticNLL(hot, **kwargs)(labels, params))
    by_loss = seeded(
        lambda: losses.HeteroscedasticNLL(plain, temperature=tau, **kwargs)(labels, params)
    )
    assert by_head == pytest.approx(by_loss, rel=1e-6)
    if chunk_size is None:  # the MC NLL of softmax(u / tau) from the same draws
        u = seeded(lambda: plain.sample_logits(params, 4))
        manual = float(np.mean(losses.mc_marginal_nll(labels, u / tau)))
        assert by_head == pytest.approx(manual, rel=1e-5)
    untempered = seeded(lambda: losses.HeteroscedasticNLL(plain, **kwargs)(labels, params))
    assert abs(by_head - untempered) > 1e-3


def test_loss_temperature_is_in_its_config_and_checked():
    loss = losses.HeteroscedasticNLL(HeteroscedasticLogits(3), temperature=2.0)
    config = loss.get_config()
    assert config["temperature"] == 2.0 and loss.head.temperature == 2.0
    revived = losses.HeteroscedasticNLL.from_config(config)
    assert revived.temperature == 2.0 and revived.head.temperature == 2.0
    default = losses.HeteroscedasticNLL(HeteroscedasticLogits(3, temperature=0.5))
    assert default.temperature is None and default.head.temperature == 0.5
    with pytest.raises(ValueError, match="`temperature` must be None or a finite float > 0"):
        losses.HeteroscedasticNLL(HeteroscedasticLogits(3), temperature=-1.0)
    with pytest.raises(ValueError, match="only supported for heads with a softmax temperature"):
        losses.HeteroscedasticNLL(LowRankLogits(3, rank=2), temperature=2.0)
