"""Label sets `[B, K, H, W]` and soft labels `[B, H, W, C]` in the losses.

```none
K = 1      a label set [B, 1, H, W] is the label map [B, H, W] exactly (values and gradients on
           the same noise or the same seed), on the fused and the generic path, chunked and
           not, for every loss; both equal the public direct form on the head's samples
K = 3      the terms equal a float64 NumPy computation of the stated form on the SAME samples
           (fixed noise), with ignore_label and class weights:
             joint_b    = (1/K) sum_k [ -logsumexp_m( sum_i w_bki lp_bkmi ) + log M ]
             marginal_b = (1/K) sum_k [ -sum_i w_bki ( logsumexp_m lp_bkmi - log M ) ]
           (rtol 1e-5: float32 sums of ~20 log-probabilities against float64)
gradient   the fused custom VJP and the chunked recomputing gradient equal autodiff of a plain
           TF reference (tf.nn.log_softmax, one-hot pick per rater) on the same noise (1e-5)
sharing    K identical raters = the single-rater loss; K distinct raters = the mean of the
           single-rater losses on the same samples, which independent samples do not give
keras      each loss = the rater means of the terms per scored pixel (the count of one rater
           map averaged over the raters)
errors     bad, mismatched and ambiguous `y_true` raise errors that name `y_true`
soft       one-hot soft labels = hard labels; mixed soft labels = a NumPy reference; the
           raters' fractions as soft labels = the rater mean (per-pixel losses); the joint
           losses reject soft labels
fit        model.fit runs a step on annotation="all" and "marginal" data sets
volumes    the NumPy, autodiff and soft-label checks run on images [H, W] and volumes
           [D, H, W] alike (label sets [B, K, D, H, W], soft labels [B, D, H, W, C])
```
"""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import logsumexp

import tfp_seg
from tfp_seg import _seeds, losses
from tfp_seg.layers import (
    CategoricalLogits,
    HeteroscedasticLogits,
    LowRankLogits,
    MixtureLowRankLogits,
)
from tfp_seg.losses import chunked, mixture_nll_terms

B, H, W, C, R, M, K = 2, 5, 4, 3, 2, 8, 3
SPATIAL = {"image": (H, W), "volume": (2, 3, 4)}  # S = (H, W) or (D, H, W)
IGNORE = 255
CW = [0.5, 1.0, 2.0]
SOFT_REJECTED = "joint likelihood of a soft label map is not defined"


# --- inputs ----------------------------------------------------------------------------------
def _params(head, batch=B, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    spatial = SPATIAL["volume"] if head.spatial_dims == 3 else (H, W)
    values = scale * rng.normal(size=(batch, *spatial, head.params_size))
    return tf.constant(values.astype("float32"))


def _label_set(k=K, seed=2, ignore=True, spatial=(H, W)):
    """int `[B, k, *S]`; with `ignore`, each rater ignores a different set of pixels."""
    labels = np.random.default_rng(seed).integers(0, C, size=(B, k, *spatial)).astype("int32")
    if ignore:
        for r in range(k):
            labels[(r % B, r) + (r % spatial[0],) + (0,) * (len(spatial) - 2) + (slice(1 + r),)] = (
                IGNORE
            )
    return labels


def _soft_labels(seed=3, spatial=(H, W)):
    q = np.random.default_rng(seed).gamma(0.7, size=(B, *spatial, C))
    return (q / q.sum(-1, keepdims=True)).astype("float32")


def _noise(head, antithetic, rows=B, seed=1):
    """Fixed noise in `head.sample_logits(noise=...)` format for M samples of `rows` images."""
    rng = np.random.default_rng(seed)
    n = M // 2 if antithetic else M
    spatial = SPATIAL["volume"] if head.spatial_dims == 3 else (H, W)
    eps = rng.normal(size=(n, rows, *spatial, C)).astype("float32")
    if isinstance(head, LowRankLogits):
        return rng.normal(size=(n, rows, head.rank)).astype("float32"), eps
    return eps


def _samples(head, params, noise, antithetic):
    """The M samples of fixed noise in float64 NumPy: for `LowRankLogits` from its covariance
    parts (`mu +/- (P z + sqrt(D) eps)`), independent of the fused path; otherwise the head's
    own `sample_logits`."""
    if not isinstance(head, LowRankLogits):
        out = head.sample_logits(params, M, antithetic=antithetic, noise=noise)
        return np.asarray(out, np.float64)
    loc, factor, diag = (np.asarray(t, np.float64) for t in head.covariance_parts(params))
    z, eps = (np.asarray(t, np.float64) for t in noise)
    dev = np.einsum("b...cr,nbr->nb...c", factor, z) + np.sqrt(diag)[None] * eps
    return np.concatenate([loc + dev, loc - dev] if antithetic else [loc + dev])


# --- references ------------------------------------------------------------------------------
def _weights(label_set, ignore_label, class_weights):
    valid = np.ones(label_set.shape, bool) if ignore_label is None else label_set != ignore_label
    safe = np.where(valid, label_set, 0)
    w = valid * (1.0 if class_weights is None else np.asarray(class_weights)[safe])
    return safe, w


def _np_terms(samples, label_set, ignore_label=IGNORE, class_weights=CW):
    """(joint [B], marginal [B]) of the stated form, float64, from samples `[M, B, *S, C]`."""
    log_soft = samples - logsumexp(samples, axis=-1, keepdims=True)
    safe, w = _weights(label_set, ignore_label, class_weights)
    m, k = samples.shape[0], label_set.shape[1]
    joint, marginal = np.zeros(B), np.zeros(B)
    for b in range(B):
        for r in range(k):
            lp = np.take_along_axis(log_soft[:, b], safe[b, r][None, ..., None], -1)[..., 0]
            pixels = tuple(range(1, lp.ndim))
            joint[b] -= (logsumexp((w[b, r] * lp).sum(axis=pixels)) - np.log(m)) / k
            marginal[b] -= (w[b, r] * (logsumexp(lp, axis=0) - np.log(m))).sum() / k
    return joint, marginal


def _np_soft_marginal(samples, q, class_weights=CW):
    """`-sum_i sum_c cw_c q_ic log mean_m softmax(eta^m_i)_c` `[B]`, float64."""
    log_soft = samples - logsumexp(samples, axis=-1, keepdims=True)
    log_mean = logsumexp(log_soft, axis=0) - np.log(samples.shape[0])
    cw = np.ones(C) if class_weights is None else np.asarray(class_weights)
    return -(q * cw * log_mean).sum(axis=tuple(range(1, q.ndim)))


def _tf_reference(head, label_set, noise, antithetic, ignore_label=IGNORE, class_weights=CW):
    """The stated form in plain TF ops on the head's samples (autodiff, no custom gradient)."""
    safe, w = _weights(label_set, ignore_label, class_weights)
    log_m = math.log(M)

    def fn(params):
        samples = head.sample_logits(params, M, antithetic=antithetic, noise=noise)
        log_soft = tf.nn.log_softmax(samples, axis=-1)
        joint, marginal = 0.0, 0.0
        for r in range(label_set.shape[1]):
            lp = tf.reduce_sum(log_soft * tf.one_hot(safe[:, r], C)[tf.newaxis], axis=-1)
            w_r = tf.constant(w[:, r], tf.float32)
            pixels = list(range(1, w_r.shape.rank))  # the spatial axes of [B, *S]
            loglik = tf.reduce_sum(lp * w_r[tf.newaxis], axis=[a + 1 for a in pixels])  # [M, B]
            joint -= tf.reduce_logsumexp(loglik, axis=0) - log_m
            pixel = tf.reduce_logsumexp(lp, axis=0) - log_m
            marginal -= tf.reduce_sum(w_r * pixel, axis=pixels)
        k = label_set.shape[1]
        return joint / k, marginal / k

    return fn


def _value_and_grads(fn, params):
    """Each output of `fn(params)` and the gradient of its sum w.r.t. params (NumPy)."""
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(params)
        outs = fn(params)
        outs = outs if isinstance(outs, (tuple, list)) else (outs,)
        sums = [tf.reduce_sum(o) for o in outs]
    values = [np.asarray(o) for o in outs]
    return values + [tape.gradient(s, params).numpy() for s in sums]


def _assert_close(got, want, tol=1e-5):
    for g, w in zip(got, want, strict=True):
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * scale)


def _terms(head, labels, noise, chunk_size, antithetic, **kw):
    kw.setdefault("ignore_label", IGNORE)
    kw.setdefault("class_weights", CW)

    def fn(params):
        return chunked.sampled_nll_terms(
            head, labels, params, M, chunk_size=chunk_size, antithetic=antithetic, noise=noise, **kw
        )

    return fn


HEADS = {
    "fused": lambda spatial_dims=2: LowRankLogits(C, rank=R, spatial_dims=spatial_dims),
    "generic": lambda spatial_dims=2: HeteroscedasticLogits(C, spatial_dims=spatial_dims),
}
PATHS = [
    pytest.param(name, chunk, anti, id=f"{name}-chunk{chunk}-{'anti' if anti else 'indep'}")
    for name in HEADS
    for chunk, anti in ((None, True), (2, True), (None, False), (4, False))
]


# --- (a) K = 1 is the label map exactly --------------------------------------------------------
@pytest.mark.parametrize("name,chunk_size,antithetic", PATHS)
def test_one_rater_label_set_is_the_label_map_exactly(name, chunk_size, antithetic):
    head = HEADS[name]()
    params = _params(head)
    labels = _label_set(k=1)
    noise = _noise(head, antithetic)
    as_map = _value_and_grads(_terms(head, labels[:, 0], noise, chunk_size, antithetic), params)
    as_set = _value_and_grads(_terms(head, labels, noise, chunk_size, antithetic), params)
    for got, want in zip(as_set, as_map, strict=True):
        np.testing.assert_array_equal(got, want)

    def direct(p):  # the public direct form on the head's own samples from the same noise
        samples = head.sample_logits(p, M, antithetic=antithetic, noise=noise)
        return (
            losses.mc_categorical_nll(labels[:, 0], samples, IGNORE, CW),
            losses.mc_marginal_nll(labels[:, 0], samples, IGNORE, CW),
        )

    _assert_close(as_set, _value_and_grads(direct, params))


KERAS_LOSSES = {
    "ssn": lambda: losses.StochasticSegmentationNLL(LowRankLogits(C, rank=R), M, **_LOSS_KW),
    "ssn-chunked": lambda: losses.StochasticSegmentationNLL(
        LowRankLogits(C, rank=R), M, chunk_size=2, **_LOSS_KW
    ),
    "ssn-generic": lambda: losses.StochasticSegmentationNLL(
        HeteroscedasticLogits(C), M, **_LOSS_KW
    ),
    "heteroscedastic": lambda: losses.HeteroscedasticNLL(HeteroscedasticLogits(C), M, **_LOSS_KW),
    "heteroscedastic-chunked": lambda: losses.HeteroscedasticNLL(
        HeteroscedasticLogits(C), M, chunk_size=2, **_LOSS_KW
    ),
    "mixture": lambda: losses.MixtureNLL(
        MixtureLowRankLogits(C, num_components=2, rank=R), 4, **_LOSS_KW
    ),
    "mixture-chunked": lambda: losses.MixtureNLL(
        MixtureLowRankLogits(C, num_components=2, rank=R), 4, chunk_size=2, **_LOSS_KW
    ),
    "cross-entropy": lambda: losses.SegmentationCrossEntropy(C, **_LOSS_KW),
}
_LOSS_KW = dict(ignore_label=IGNORE, class_weights=CW)


def _seeded(loss, y_true, seed=7):
    """`loss(y_true, .)` with the stateful RNG reset first: the same samples at every call."""

    def fn(params):
        tf.random.set_seed(seed)
        return loss(tf.constant(y_true, tf.float32), params)

    return fn


def _loss_head(loss):
    head = getattr(loss, "head", None)
    return CategoricalLogits(C) if head is None else head


def _loss_params(loss):
    return _params(_loss_head(loss), scale=0.5)


@pytest.mark.parametrize("name", sorted(KERAS_LOSSES))
def test_one_rater_label_set_is_the_label_map_exactly_in_every_loss(name):
    loss = KERAS_LOSSES[name]()
    params = _loss_params(loss)
    labels = _label_set(k=1)
    want = _value_and_grads(_seeded(loss, labels[:, 0]), params)
    assert np.isfinite(want[0]).all()
    for form in (labels, labels[:, 0, ..., None]):  # [B, 1, H, W] and [B, H, W, 1]
        got = _value_and_grads(_seeded(loss, form), params)
        for g, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(g, w)


# --- (b), (c) K = 3 against NumPy and against autodiff of a plain reference --------------------
@pytest.mark.parametrize("spatial", sorted(SPATIAL))
@pytest.mark.parametrize("name,chunk_size,antithetic", PATHS)
def test_label_set_terms_equal_numpy_on_the_same_samples(name, chunk_size, antithetic, spatial):
    head = HEADS[name](len(SPATIAL[spatial]))
    params = _params(head)
    labels = _label_set(spatial=SPATIAL[spatial])
    noise = _noise(head, antithetic)
    joint, marginal = _terms(head, labels, noise, chunk_size, antithetic)(params)
    ref_joint, ref_marginal = _np_terms(_samples(head, params, noise, antithetic), labels)
    np.testing.assert_allclose(joint.numpy(), ref_joint, rtol=1e-5)
    np.testing.assert_allclose(marginal.numpy(), ref_marginal, rtol=1e-5)
    # the per-pixel driver of the heteroscedastic loss gives the same marginal term
    alone = chunked.sampled_marginal_nll(
        head, labels, params, M, chunk_size, antithetic, IGNORE, CW, noise=noise
    )
    np.testing.assert_allclose(alone.numpy(), marginal.numpy(), rtol=1e-6)


@pytest.mark.parametrize("spatial", sorted(SPATIAL))
@pytest.mark.parametrize("name,chunk_size,antithetic", PATHS)
def test_label_set_gradients_equal_autodiff_of_a_plain_reference(
    name, chunk_size, antithetic, spatial
):
    head = HEADS[name](len(SPATIAL[spatial]))
    params = _params(head)
    labels = _label_set(spatial=SPATIAL[spatial])
    noise = _noise(head, antithetic)
    want = _value_and_grads(_tf_reference(head, labels, noise, antithetic), params)
    got = _value_and_grads(_terms(head, labels, noise, chunk_size, antithetic), params)
    _assert_close(got, want)
    if chunk_size is not None:  # chunked and unchunked agree on the same noise
        whole = _value_and_grads(_terms(head, labels, noise, None, antithetic), params)
        _assert_close(got, whole)


def _mixture_setup(antithetic, seed=0, spatial_dims=2):
    head = MixtureLowRankLogits(C, num_components=2, rank=R, spatial_dims=spatial_dims)
    params = _params(head, seed=seed, scale=0.7)
    noise = _noise(head.component_head, antithetic, rows=B * head.num_components, seed=seed + 1)
    return head, params, noise


def _np_mixture_terms(head, params, labels, noise, antithetic):
    """The mixture terms per rater (rows of component c of image b: b*K_c + c), then the
    mean over raters, float64."""
    kc = head.num_components
    comp = head.component_params(params)
    samples = _samples(head.component_head, comp, noise, antithetic)  # [M, B*K_c, *S, C]
    samples = samples.reshape(M, B, kc, *labels.shape[2:], C)
    log_pi = np.asarray(tf.nn.log_softmax(head.mixture_logits(params)), np.float64)
    log_soft = samples - logsumexp(samples, axis=-1, keepdims=True)
    safe, w = _weights(labels, IGNORE, CW)
    joint, marginal = np.zeros(B), np.zeros(B)
    for b in range(B):
        for r in range(labels.shape[1]):
            pick = safe[b, r][None, None, ..., None]
            lp = np.take_along_axis(log_soft[:, b], pick, -1)[..., 0]  # [M, K_c, *S]
            terms = log_pi[b][None] + (w[b, r] * lp).sum(axis=tuple(range(2, lp.ndim)))
            joint[b] -= (logsumexp(terms) - np.log(M)) / labels.shape[1]  # terms [M, K_c]
            log_pi_b = log_pi[b].reshape((1, -1) + (1,) * (lp.ndim - 2))
            pixel = logsumexp(log_pi_b + lp, axis=(0, 1)) - np.log(M)
            marginal[b] -= (w[b, r] * pixel).sum() / labels.shape[1]
    return joint, marginal


@pytest.mark.parametrize("spatial", sorted(SPATIAL))
@pytest.mark.parametrize("chunk_size", [None, 2])
def test_mixture_label_set_equals_numpy_and_autodiff(chunk_size, spatial):
    antithetic = True
    shape = SPATIAL[spatial]
    head, params, noise = _mixture_setup(antithetic, spatial_dims=len(shape))
    labels = _label_set(spatial=shape)
    s = len(shape)

    def fn(p):
        return mixture_nll_terms(
            head, labels, p, M, chunk_size, antithetic, IGNORE, CW, noise=noise
        )

    got = _value_and_grads(fn, params)
    ref = _np_mixture_terms(head, params, labels, noise, antithetic)
    np.testing.assert_allclose(got[0], ref[0], rtol=1e-5)
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5)

    def plain(p):  # the same form in plain TF ops (autodiff) on the component head's samples
        kc = head.num_components
        samples = head.component_head.sample_logits(
            head.component_params(p), M, antithetic=antithetic, noise=noise
        )
        log_soft = tf.reshape(tf.nn.log_softmax(samples), [M, B, kc, *shape, C])
        log_pi = tf.nn.log_softmax(head.mixture_logits(p))  # [B, K_c]
        safe, w = _weights(labels, IGNORE, CW)
        joint = marginal = 0.0
        for r in range(K):
            onehot = tf.one_hot(safe[:, r], C)[tf.newaxis, :, tf.newaxis]
            lp = tf.reduce_sum(log_soft * onehot, axis=-1)  # [M, B, K_c, *S]
            w_r = tf.constant(w[:, r], tf.float32)[:, tf.newaxis]
            terms = log_pi + tf.reduce_sum(lp * w_r, axis=list(range(3, 3 + s)))
            joint -= tf.reduce_logsumexp(terms, axis=[0, 2]) - math.log(M)
            log_pi_s = tf.reshape(log_pi, [B, kc] + [1] * s)
            pixel = tf.reduce_logsumexp(log_pi_s + lp, axis=[0, 2])
            marginal -= tf.reduce_sum(w_r[:, 0] * (pixel - math.log(M)), axis=list(range(1, 1 + s)))
        return joint / K, marginal / K

    _assert_close(got, _value_and_grads(plain, params))


# --- (d) the raters share one set of samples --------------------------------------------------
@pytest.mark.parametrize("name,chunk_size,antithetic", PATHS[:2] + PATHS[4:6])
def test_raters_share_one_set_of_samples(name, chunk_size, antithetic):
    head = HEADS[name]()
    params = _params(head)
    labels = _label_set()
    noise = _noise(head, antithetic)
    single = _value_and_grads(_terms(head, labels[:, 0], noise, chunk_size, antithetic), params)
    copies = np.repeat(labels[:, :1], K, axis=1)
    same = _value_and_grads(_terms(head, copies, noise, chunk_size, antithetic), params)
    _assert_close(same, single, tol=1e-6)
    # distinct raters: the mean of the single-rater terms on the SAME samples ...
    per_rater = [
        _value_and_grads(_terms(head, labels[:, r], noise, chunk_size, antithetic), params)
        for r in range(K)
    ]
    mean = [np.mean([p[j] for p in per_rater], axis=0) for j in range(4)]
    _assert_close(
        _value_and_grads(_terms(head, labels, noise, chunk_size, antithetic), params), mean
    )
    # ... which K independent sets of samples do not give: the joint term of K copies of one
    # map scored each under its own noise differs from the shared-sample value
    independent = [
        _terms(head, labels[:, 0], _noise(head, antithetic, seed=10 + r), chunk_size, antithetic)(
            params
        )[0].numpy()
        for r in range(K)
    ]
    assert np.abs(np.mean(independent, axis=0) - single[0]).max() > 1e-2


def test_keras_loss_with_identical_raters_is_the_single_rater_loss():
    loss = KERAS_LOSSES["ssn"]()
    params = _loss_params(loss)
    labels = _label_set(k=1)
    single = _value_and_grads(_seeded(loss, labels[:, 0]), params)
    copies = _value_and_grads(_seeded(loss, np.repeat(labels, K, axis=1)), params)
    _assert_close(copies, single, tol=1e-6)


# --- the Keras losses: rater means per scored pixel ---------------------------------------------
def _count(labels):
    """Non-ignored pixels of one rater map, averaged over the raters: `[B]`."""
    return (labels != IGNORE).sum(axis=(2, 3)).mean(axis=1)


@pytest.mark.parametrize("name", ["ssn", "ssn-chunked", "mixture"])
def test_joint_keras_losses_are_rater_means_per_scored_pixel(name):
    loss = KERAS_LOSSES[name]()
    params = _loss_params(loss)
    labels = _label_set()
    terms = mixture_nll_terms if name == "mixture" else chunked.sampled_nll_terms
    tf.random.set_seed(5)
    seed = _seeds.draw_seed()  # the seed the loss draws first from the same RNG state
    joint, marginal = terms(
        loss.head,
        labels,
        params,
        loss.num_samples,
        loss.chunk_size,
        loss.antithetic,
        IGNORE,
        CW,
        seed=seed,
    )
    want = np.mean((joint.numpy() + marginal.numpy()) / _count(labels))
    got = _seeded(loss, labels, seed=5)(params).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-6)
    none = type(loss).from_config({**loss.get_config(), "normalize": "none"})
    summed = _seeded(none, labels, seed=5)(params).numpy()
    np.testing.assert_allclose(summed, np.mean(joint.numpy() + marginal.numpy()), rtol=1e-6)


def test_heteroscedastic_and_cross_entropy_label_sets_equal_numpy():
    head = HeteroscedasticLogits(C)
    loss = losses.HeteroscedasticNLL(head, M, **_LOSS_KW)
    params = _params(head, scale=0.5)
    labels = _label_set()
    tf.random.set_seed(9)
    samples = np.asarray(head.sample_logits(params, M, antithetic=loss.antithetic), np.float64)
    want = np.mean(_np_terms(samples, labels)[1] / _count(labels))
    np.testing.assert_allclose(_seeded(loss, labels, seed=9)(params).numpy(), want, rtol=1e-5)
    logits = params[..., :C]
    ce = losses.SegmentationCrossEntropy(C, **_LOSS_KW)(tf.constant(labels, tf.float32), logits)
    ref = _np_terms(np.asarray(logits, np.float64)[None], labels)[0]  # M = 1: the joint term
    np.testing.assert_allclose(ce.numpy(), np.mean(ref / _count(labels)), rtol=1e-5)


# --- (e) shapes ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,match",
    [
        ((B, K, H, W, 1), "`y_true` must be one label map"),
        ((B, H), "`y_true` must be one label map"),
        ((B, K, H + 1, W), "`y_true` shape"),
        ((B, H, W + 1), r"`y_true` shape .* must equal the \[B, H, W\]"),
        ((B + 1, K, H, W), "`y_true` shape .* batch size"),
        ((B, 0, H, W), "`y_true` is an empty label set"),
        ((B, H, W, C + 1), "`y_true` shape"),
    ],
)
@pytest.mark.parametrize("name", ["ssn", "heteroscedastic", "mixture", "cross-entropy"])
def test_bad_label_shapes_name_y_true(name, shape, match):
    loss = KERAS_LOSSES[name]()
    with pytest.raises(ValueError, match=match):
        loss(np.zeros(shape, "float32"), _loss_params(loss))


@pytest.mark.parametrize("name", ["ssn", "heteroscedastic", "cross-entropy"])
def test_ambiguous_label_set_or_soft_labels_is_an_error(name):
    # H == W == C == K: [B, 3, 3, 3] reads as a label set and as soft labels
    loss = KERAS_LOSSES[name]()
    params = tf.zeros((1, C, C, _loss_head(loss).params_size))
    with pytest.raises(ValueError, match="`y_true` of shape .* is ambiguous"):
        loss(np.zeros((1, C, C, C), "float32"), params)


def test_label_set_values_are_checked_and_name_y_true():
    loss = KERAS_LOSSES["ssn"]()
    labels = _label_set(ignore=False)
    labels[1, 2, 0, 0] = C
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"`y_true` has values outside"):
        loss(labels.astype("float32"), _loss_params(loss))
    with pytest.raises(tf.errors.InvalidArgumentError, match="`y_true` must hold integer"):
        loss(_label_set(ignore=False) + 0.5, _loss_params(loss))


@pytest.mark.parametrize("name", ["heteroscedastic", "heteroscedastic-chunked", "cross-entropy"])
def test_soft_labels_are_checked_and_name_y_true(name):
    loss = KERAS_LOSSES[name]()
    params = _loss_params(loss)
    q = _soft_labels()
    negative = q.copy()
    negative[0, 0, 0] = [1.5, -0.5, 0.0]
    with pytest.raises(tf.errors.InvalidArgumentError, match="`y_true` .*negative"):
        loss(negative, params)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`y_true` .*must sum to 1"):
        loss(q * 1.01, params)
    loss(q + 5e-5 / C, params)  # within the tolerance (1e-4) of the sum


# --- (f) soft labels -------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["heteroscedastic", "heteroscedastic-chunked", "cross-entropy"])
def test_one_hot_soft_labels_are_the_hard_labels(name):
    loss = KERAS_LOSSES[name]()
    params = _loss_params(loss)
    labels = _label_set(k=1, ignore=False)[:, 0]
    hard = _value_and_grads(_seeded(loss, labels), params)
    soft = _value_and_grads(_seeded(loss, np.eye(C, dtype="float32")[labels]), params)
    _assert_close(soft, hard, tol=1e-6)


@pytest.mark.parametrize("name", ["heteroscedastic", "heteroscedastic-chunked", "cross-entropy"])
def test_raters_fractions_as_soft_labels_are_the_rater_mean(name):
    # a per-pixel likelihood: the mean over K raters = the soft label of their fractions
    loss = KERAS_LOSSES[name]()
    params = _loss_params(loss)
    labels = _label_set(ignore=False)
    fractions = np.eye(C, dtype="float32")[labels].mean(axis=1)  # [B, H, W, C]
    _assert_close(
        _value_and_grads(_seeded(loss, fractions), params),
        _value_and_grads(_seeded(loss, labels), params),
        tol=1e-5,
    )


@pytest.mark.parametrize("spatial", sorted(SPATIAL))
def test_soft_labels_equal_numpy(spatial):
    shape = SPATIAL[spatial]
    q = _soft_labels(spatial=shape)
    head = HeteroscedasticLogits(C, spatial_dims=len(shape))
    params = _params(head, scale=0.5)
    loss = losses.HeteroscedasticNLL(head, M, class_weights=CW)
    tf.random.set_seed(4)
    samples = np.asarray(head.sample_logits(params, M, antithetic=loss.antithetic), np.float64)
    pixels = np.prod(shape)  # the count of normalize="pixels": every pixel (voxel)
    want = np.mean(_np_soft_marginal(samples, q) / pixels)
    np.testing.assert_allclose(_seeded(loss, q, seed=4)(params).numpy(), want, rtol=1e-5)
    logits = params[..., :C]
    ce = losses.SegmentationCrossEntropy(C, class_weights=CW)(q, logits).numpy()
    ref = _np_soft_marginal(np.asarray(logits, np.float64)[None], q)
    np.testing.assert_allclose(ce, np.mean(ref / pixels), rtol=1e-5)


@pytest.mark.parametrize("spatial", sorted(SPATIAL))
@pytest.mark.parametrize("name,chunk_size,antithetic", PATHS)
def test_soft_marginal_driver_equals_numpy_and_autodiff(name, chunk_size, antithetic, spatial):
    # `sampled_marginal_nll` scores soft labels as C constant maps weighted by q
    head = HEADS[name](len(SPATIAL[spatial]))
    params = _params(head)
    q = _soft_labels(spatial=SPATIAL[spatial])
    noise = _noise(head, antithetic)

    def fn(p):
        return chunked.sampled_marginal_nll(
            head, q, p, M, chunk_size, antithetic, class_weights=CW, noise=noise
        )

    got = _value_and_grads(fn, params)
    ref = _np_soft_marginal(_samples(head, params, noise, antithetic), q)
    np.testing.assert_allclose(got[0], ref, rtol=1e-5)

    def plain(p):
        samples = head.sample_logits(p, M, antithetic=antithetic, noise=noise)
        log_mean = tf.reduce_logsumexp(tf.nn.log_softmax(samples), axis=0) - math.log(M)
        return -tf.reduce_sum(log_mean * q * tf.constant(CW), axis=list(range(1, q.ndim)))

    _assert_close(got, _value_and_grads(plain, params))


@pytest.mark.parametrize("name", ["ssn", "ssn-chunked", "ssn-generic", "mixture"])
def test_joint_losses_reject_soft_labels(name):
    loss = KERAS_LOSSES[name]()
    with pytest.raises(ValueError, match=SOFT_REJECTED) as error:
        loss(_soft_labels(), _loss_params(loss))
    assert "`y_true`" in str(error.value) and "annotation='all'" in str(error.value)


def test_joint_drivers_reject_soft_labels():
    head = LowRankLogits(C, rank=R)
    with pytest.raises(ValueError, match=f"`labels` holds soft labels.*{SOFT_REJECTED}"):
        chunked.sampled_nll_terms(head, _soft_labels(), _params(head), M)
    mixture = MixtureLowRankLogits(C, num_components=2, rank=R)
    with pytest.raises(ValueError, match=SOFT_REJECTED):
        mixture_nll_terms(mixture, _soft_labels(), _params(mixture), M)


# --- (g) model.fit on annotation="all" / "marginal" -------------------------------------------
@pytest.mark.parametrize(
    "make_head,annotation",
    [
        (lambda: LowRankLogits(3, rank=2), "all"),
        (lambda: MixtureLowRankLogits(3, num_components=2, rank=1), "all"),
        (lambda: HeteroscedasticLogits(3), "marginal"),
        (lambda: CategoricalLogits(3), "marginal"),
    ],
    ids=["ssn-all", "mixture-all", "heteroscedastic-marginal", "categorical-marginal"],
)
def test_fit_one_step_on_label_sets_and_soft_labels(make_head, annotation):
    data = tfp_seg.data.ambiguous_shapes(num_images=4, image_size=16, num_annotations=3, seed=0)
    ds = data.to_dataset(batch_size=2, annotation=annotation)
    label_spec = ds.element_spec[1]
    assert label_spec.shape[1:] == ((3, 16, 16) if annotation == "all" else (16, 16, 3))
    keras.utils.set_random_seed(0)
    model = tfp_seg.models.ProbabilisticSegmenter(
        tfp_seg.models.UNet(base_filters=4, depth=1), make_head()
    )
    model.compile(optimizer="adam", loss="auto")
    history = model.fit(ds, epochs=1, steps_per_epoch=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
