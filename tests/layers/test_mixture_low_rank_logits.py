"""`MixtureLowRankLogits`: layout, densities against SciPy, the sampler, the read-outs.

The dense moments (mean, covariance, sample moments with the mixture's fourth moments) are in
`tests/distributions/test_equivalence.py`; here:

```none
layout        conv channels = the components, the last K = the gate (GAP + dense) at every pixel
log_prob      logsumexp_k(log pi_k + SciPy MVN logpdf) from the documented layout, NumPy only
frequencies   separated components: the share of each is pi_k within 5 binomial standard errors
noise         sample_logits(noise=(u, z, eps)) is the documented formula, computed in NumPy
mean probs    sum_k pi_k E_k[softmax] within 5 standard errors of a NumPy Monte Carlo estimate
```
"""

from __future__ import annotations

import inspect
import typing

import numpy as np
import pytest
import scipy.special
import scipy.stats
import tensorflow as tf

from tfp_seg import protocols
from tfp_seg.distributions import mixture_components
from tfp_seg.layers import LowRankLogits, MixtureLowRankLogits

K_SIGMA = 5.0


def _params(head, shape=(2, 2, 3), seed=0, spread=1.5, gate=None):
    """Random packed params in the documented layout (component blocks, then the gate)."""
    rng = np.random.default_rng(seed)
    c, r, k = head.num_classes, head.rank, head.num_components
    parts = []
    for j in range(k):
        parts += [
            rng.normal(spread * (j - 0.5 * (k - 1)), 1.0, size=shape + (c,)),
            rng.normal(-0.5, 0.5, size=shape + (c,)),
            rng.normal(0.0, 0.5, size=shape + (c * r,)),
        ]
    if gate is None:
        gate = rng.normal(0.0, 1.0, size=(shape[0], k))
    parts.append(np.broadcast_to(np.asarray(gate)[:, None, None, :], shape + (k,)))
    return np.concatenate(parts, -1).astype("float32")


def _components_np(head, params):
    """NumPy from the documented layout: weights [B, K], means [B, K, E], covs [B, K, E, E]."""
    p = params.astype(np.float64)
    c, r, k = head.num_classes, head.rank, head.num_components
    s = c * (2 + r)
    gate = p[..., k * s :].reshape(p.shape[0], -1, k).mean(axis=1)
    weights = scipy.special.softmax(gate, axis=-1)
    means, covs = [], []
    for j in range(k):
        block = p[..., j * s : (j + 1) * s]
        mu, raw, factor = block[..., :c], block[..., c : 2 * c], block[..., 2 * c :]
        diag = np.exp(raw) + head.epsilon
        flat = factor.reshape(p.shape[0], -1, r)
        means.append(mu.reshape(p.shape[0], -1))
        covs.append(
            flat @ flat.transpose(0, 2, 1)
            + np.stack([np.diag(d) for d in diag.reshape(len(p), -1)])
        )
    return weights, np.stack(means, 1), np.stack(covs, 1)


# --- layout --------------------------------------------------------------------------------------
def test_params_are_the_components_then_the_gate_at_every_pixel():
    head = MixtureLowRankLogits(3, num_components=2, rank=2)
    features = np.random.default_rng(0).normal(size=(2, 4, 5, 6)).astype("float32")
    params = np.asarray(head(features))
    assert params.shape == (2, 4, 5, 2 * 3 * (2 + 2) + 2) == (2, 4, 5, head.params_size)
    kernel, bias = (np.asarray(w) for w in head.projection.weights)
    np.testing.assert_allclose(params[..., :-2], features @ kernel[0, 0] + bias, atol=1e-5)
    gate_kernel, gate_bias = (np.asarray(w) for w in head.gate.weights)
    gate = features.mean(axis=(1, 2)) @ gate_kernel + gate_bias  # [B, K]
    np.testing.assert_allclose(
        params[..., -2:], np.broadcast_to(gate[:, None, None], (2, 4, 5, 2)), atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(head.mixture_logits(params)), gate, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(head.mixture_weights(params)), scipy.special.softmax(gate, -1), atol=1e-6
    )
    # component k of image b at row b*K + k, in LowRankLogits' layout; packing inverts it
    component = np.asarray(head.component_params(params))
    assert component.shape == (4, 4, 5, 3 * (2 + 2))
    np.testing.assert_array_equal(component[1 * 2 + 1], params[1, ..., 12:24])
    repacked = head.pack_mixture_params(component, head.mixture_logits(params))
    np.testing.assert_allclose(np.asarray(repacked), params, atol=1e-6)


def test_the_mixture_head_declares_its_capabilities():
    head = MixtureLowRankLogits(3, num_components=2, rank=2)
    assert isinstance(head, protocols.Head) and isinstance(head, protocols.MixtureHead)
    # It is not a single Gaussian: neither the covariance outputs nor the fused SSN loss apply.
    assert not isinstance(head, protocols.CovarianceHead)
    assert not isinstance(head, protocols.PlanarLowRankLogits)
    assert isinstance(head.component_head, LowRankLogits)
    assert head.component_head.get_config()["rank"] == 2
    for protocol in (protocols.Head, protocols.MixtureHead):
        for name in typing._get_protocol_attrs(protocol):
            stated = next((k.__dict__[name] for k in protocol.__mro__ if name in k.__dict__), None)
            if not inspect.isfunction(stated):
                continue
            offered = inspect.signature(getattr(MixtureLowRankLogits, name)).parameters
            for p in inspect.signature(stated).parameters.values():
                assert p.name in offered, f"{name}({p.name}) missing"
                if p.default is not inspect.Parameter.empty:
                    assert offered[p.name].default is not inspect.Parameter.empty, name


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_components": 0}, "num_components"),
        ({"num_components": 2.0}, "num_components"),
        ({"rank": 0}, "rank"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"diagonal_transform": "relu"}, "diagonal_transform"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureLowRankLogits(3, **kwargs)


def test_bad_params_name_the_argument():
    head = MixtureLowRankLogits(3, num_components=2, rank=2)
    params = _params(head)
    with pytest.raises(ValueError, match=rf"`params` must have {head.params_size} channels"):
        head.distribution(params[..., :-1])
    with pytest.raises(ValueError, match="`params` must have rank 4"):
        head.sample_logits(params[0], 2)
    with pytest.raises(ValueError, match="`mixture_logits`"):
        head.pack_mixture_params(head.component_params(params), np.zeros((2, 3), "float32"))
    with pytest.raises(ValueError, match="`features` must have rank 4"):
        head(np.zeros((2, 4, 4), "float32"))


# --- densities -----------------------------------------------------------------------------------
@pytest.mark.parametrize("num_components", [1, 3])
def test_log_prob_is_a_dense_mixture_of_scipy_normals(num_components):
    head = MixtureLowRankLogits(2, num_components=num_components, rank=2)
    params = _params(head, seed=num_components)
    weights, means, covs = _components_np(head, params)
    dist = head.distribution(params)
    assert tuple(dist.batch_shape) == (2,) and tuple(dist.event_shape) == (2, 3, 2)
    rng = np.random.default_rng(7)
    points = np.stack(
        [means[:, 0]]
        + [means[:, j % num_components] + rng.normal(0, 1.0, means[:, 0].shape) for j in range(4)]
    ).astype("float32")  # [5, B, E]
    expected = np.empty(points.shape[:2])
    for b in range(2):
        terms = [
            np.log(w) + scipy.stats.multivariate_normal(m, c).logpdf(points[:, b])
            for w, m, c in zip(weights[b], means[b], covs[b], strict=True)
        ]
        expected[:, b] = scipy.special.logsumexp(terms, axis=0)
    got = np.asarray(dist.log_prob(points.reshape((5, 2, 2, 3, 2))), np.float64)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    if num_components == 1:  # one component: the SSN head's density
        ssn = LowRankLogits(2, rank=2)
        single = ssn.distribution(params[..., : ssn.params_size])
        np.testing.assert_allclose(
            got, np.asarray(single.log_prob(points.reshape((5, 2, 2, 3, 2)))), rtol=1e-5
        )


def test_mean_logits_is_the_mixture_mean():
    head = MixtureLowRankLogits(3, num_components=3, rank=2)
    params = _params(head, seed=3)
    weights, means, _ = _components_np(head, params)
    expected = np.einsum("bk,bke->be", weights, means).reshape(2, 2, 3, 3)
    np.testing.assert_allclose(np.asarray(head.mean_logits(params)), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(head.distribution(params).mean()), expected, atol=1e-5)


# --- the sampler ---------------------------------------------------------------------------------
def _separated(head, gate, shape=(2, 2, 2)):
    """Params whose components are apart (mean 20 k) and almost deterministic."""
    c, r, k = head.num_classes, head.rank, head.num_components
    parts = []
    for j in range(k):
        parts += [
            np.full(shape + (c,), 20.0 * j),
            np.full(shape + (c,), -30.0),
            np.zeros(shape + (c * r,)),
        ]
    parts.append(np.broadcast_to(np.asarray(gate, np.float64)[:, None, None, :], shape + (k,)))
    return np.concatenate(parts, -1).astype("float32")


@pytest.mark.parametrize("antithetic", [False, True])
def test_component_frequencies_match_the_weights(antithetic):
    head = MixtureLowRankLogits(2, num_components=3, rank=1)
    gate = np.array([[0.5, -1.0, 1.2], [2.0, 0.0, -2.0]])
    pi = scipy.special.softmax(gate, -1)
    params = _separated(head, gate)
    n = 20000
    samples = np.asarray(head.sample_logits(params, n, seed=11, antithetic=antithetic))
    drawn = np.rint(samples[:, :, 0, 0, 0] / 20.0).astype(int)  # [N, B]: the component
    # every pixel and class of a sample comes from the same (image-level) component
    np.testing.assert_allclose(
        samples, np.broadcast_to(20.0 * drawn[:, :, None, None, None], samples.shape), atol=0.1
    )
    n_eff = n // 2 if antithetic else n  # a pair shares its component
    freq = np.stack([(drawn == k).mean(axis=0) for k in range(3)], -1)  # [B, K]
    bound = K_SIGMA * np.sqrt(pi * (1 - pi) / n_eff)
    assert np.all(np.abs(freq - pi) <= bound), (freq, pi)
    if not antithetic:  # the same draw as `mixture_components` for the same seed
        np.testing.assert_array_equal(
            np.asarray(mixture_components(head.mixture_logits(params), n, seed=11)), drawn
        )
    # and the label sampler: component k's mean favours class k mod 2 everywhere
    labelled = params.copy()
    s = head.component_size
    for k in range(3):
        labelled[..., k * s : k * s + 2] = np.where(np.arange(2) == (k % 2), 5.0, -5.0)
    labels = np.asarray(head.sample_labels(labelled, n, seed=5, antithetic=antithetic))
    share_1 = (labels[:, :, 0, 0] == 1).mean(axis=0)  # components 1 -> class 1, 0 and 2 -> 0
    bound_1 = K_SIGMA * np.sqrt(pi[:, 1] * (1 - pi[:, 1]) / n_eff)
    assert np.all(np.abs(share_1 - pi[:, 1]) <= bound_1), (share_1, pi[:, 1])


@pytest.mark.parametrize("antithetic", [False, True])
def test_fixed_noise_gives_the_documented_sample(antithetic):
    head = MixtureLowRankLogits(3, num_components=3, rank=2, diagonal_transform="exp")
    params = _params(head, seed=5)
    n, b = 6, 2
    m = n // 2 if antithetic else n
    rng = np.random.default_rng(2)
    u = rng.uniform(size=(m, b))
    z = rng.normal(size=(m, b, 2))
    eps = rng.normal(size=(m, b, 2, 3, 3))
    got = np.asarray(head.sample_logits(params, n, antithetic=antithetic, noise=(u, z, eps)))
    weights, means, _ = _components_np(head, params)
    cdf = np.cumsum(weights, -1)
    p = params.astype(np.float64)
    s = head.component_size
    expected = np.empty((n, b, 2, 3, 3))
    for i in range(m):
        for j in range(b):
            k = int(np.sum(u[i, j] >= cdf[j, :-1]))
            block = p[j, ..., k * s : (k + 1) * s]
            mu, raw, factor = block[..., :3], block[..., 3:6], block[..., 6:].reshape(2, 3, 3, 2)
            deviation = factor @ z[i, j] + np.sqrt(np.exp(raw) + head.epsilon) * eps[i, j]
            expected[i, j] = mu + deviation
            if antithetic:
                expected[m + i, j] = mu - deviation
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_sampling_is_seeded_and_traces_in_export_form():
    head = MixtureLowRankLogits(3, num_components=2, rank=2)
    params = _params(head, seed=6)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, 2, 3, head.params_size], tf.float32),
            tf.TensorSpec([2], tf.int64),
        ],
        autograph=False,
    )
    def draw(p, seed):
        return head.sample_logits(p, 4, seed=seed, antithetic=False)

    seed = tf.constant([3, 4], tf.int64)
    first = np.asarray(draw(params, seed))
    np.testing.assert_array_equal(first, np.asarray(draw(params, seed)))
    np.testing.assert_array_equal(
        first, np.asarray(head.sample_logits(params, 4, seed=[3, 4], antithetic=False))
    )
    assert np.abs(first - np.asarray(draw(params, tf.constant([3, 5], tf.int64)))).max() > 0.1
    unseeded = [np.asarray(head.sample_logits(params, 4)) for _ in range(2)]
    assert np.abs(unseeded[0] - unseeded[1]).max() > 0.1
    np.testing.assert_array_equal(
        np.asarray(head.sample_logits(params, 4, seed=9)),
        np.asarray(head.sample_logits(params, 4, seed=[9, 0])),
    )


def test_mean_probabilities_is_the_weighted_component_mean():
    head = MixtureLowRankLogits(3, num_components=3, rank=2)
    # Almost deterministic components: sum_k pi_k softmax(mu_k) exactly.
    gate = np.array([[0.3, -0.7, 1.0], [1.5, 0.2, -0.4]])
    params = _params(head, seed=8, gate=gate)
    s = head.component_size
    pinned = params.copy()
    for k in range(3):
        pinned[..., k * s + 3 : k * s + 6] = -30.0
        pinned[..., k * s + 6 : (k + 1) * s] = 0.0
    weights, means, _ = _components_np(head, pinned)
    soft = scipy.special.softmax(means.reshape(2, 3, 2, 3, 3), -1)
    exact = np.einsum("bk,bkhwc->bhwc", weights, soft)
    np.testing.assert_allclose(
        np.asarray(head.mean_probabilities(pinned, 6, seed=1)), exact, atol=1e-4
    )
    # With noise: against a NumPy Monte Carlo estimate of the same expectation.
    n = 6000  # 2000 per component, antithetic pairs
    got = np.asarray(head.mean_probabilities(params, n, seed=2), np.float64)
    weights, means, covs = _components_np(head, params)
    rng = np.random.default_rng(3)
    ref_n = 20000
    ref, var = np.zeros_like(got), np.zeros_like(got)
    for k in range(3):
        for b in range(2):
            draws = rng.multivariate_normal(means[b, k], covs[b, k], size=ref_n, method="eigh")
            probs = scipy.special.softmax(draws.reshape(ref_n, 2, 3, 3), -1)
            ref[b] += weights[b, k] * probs.mean(0)
            var[b] += weights[b, k] ** 2 * probs.var(0)
    # n / K per component in n / (2K) antithetic pairs (a pair's mean varies at most as one draw)
    se = np.sqrt(var / (n / 3 / 2) + var / ref_n)
    assert np.all(np.abs(got - ref) <= K_SIGMA * se + 1e-6), np.max(np.abs(got - ref) / se)
    np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-5)


def test_roi_mask_pins_every_component_outside_the_region():
    head = MixtureLowRankLogits(2, num_components=2, rank=2)
    features = np.random.default_rng(1).normal(size=(1, 4, 4, 3)).astype("float32")
    head(features)  # build
    roi = np.zeros((1, 4, 4), "float32")
    roi[:, :2] = 1.0
    params = head(features, roi_mask=roi)
    _, loc, factor, diag = (np.asarray(t) for t in head.mixture_parts(params))
    assert np.all(factor[:, :, 2:] == 0.0) and np.all(factor[:, :, :2] != 0.0)
    np.testing.assert_allclose(diag[:, :, 2:], head.epsilon, rtol=1e-5)
    assert np.all(diag[:, :, :2] > 10 * head.epsilon)
    # the means and the gate are untouched
    unmasked = np.asarray(head(features))
    np.testing.assert_array_equal(
        np.asarray(head.mean_logits(params)), np.asarray(head.mean_logits(unmasked))
    )
    with pytest.raises(ValueError, match="roi_mask"):
        head(features, roi_mask=np.ones((1, 4, 4, 2), "float32"))
