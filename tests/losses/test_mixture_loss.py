"""The mixture NLL (`tfp_seg.losses.mixture_nll_terms`, `MixtureNLL`) against NumPy.

```none
value      fixed noise: joint and per-pixel terms equal a float64 NumPy computation of
           -logsumexp_(k,m)(log pi_k + sum_i w_i log softmax(eta_(k,m),i)[y_i]) + log M (and the
           per-pixel form), with and without antithetic pairs, chunks, ignore_label, weights
gradient   the directional derivative equals central differences of the NumPy reference
           (float64, h = 1e-4; rtol 2e-3); the gate's gradient is -(responsibility - pi) / (H W)
K = 1      the SSN loss (`sampled_nll_terms`) on the same noise
training   with two annotation modes of weights 0.3 / 0.7 on one image, gradient descent on
           the loss recovers the weights (the loss is a proper likelihood of the mixture)
```
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import scipy.special
import tensorflow as tf

import tfp_seg
from tfp_seg.layers import LowRankLogits, MixtureLowRankLogits
from tfp_seg.losses import MixtureNLL, chunked, mixture_nll_terms

B, H, W, C, R, K = 2, 3, 4, 3, 2, 3


def _params(head, seed=0):
    rng = np.random.default_rng(seed)
    parts = []
    for k in range(head.num_components):
        parts += [
            rng.normal(0.8 * k, 1.0, size=(B, H, W, C)),
            rng.normal(-0.5, 0.5, size=(B, H, W, C)),
            rng.normal(0.0, 0.5, size=(B, H, W, C * head.rank)),
        ]
    gate = rng.normal(0.0, 1.0, size=(B, 1, 1, head.num_components))
    parts.append(np.broadcast_to(gate, (B, H, W, head.num_components)))
    return np.concatenate(parts, -1).astype("float32")


def _noise(head, num_samples, antithetic, seed=1):
    rng = np.random.default_rng(seed)
    m = num_samples // 2 if antithetic else num_samples
    rows = B * head.num_components
    return (
        rng.normal(size=(m, rows, head.rank)).astype("float32"),
        rng.normal(size=(m, rows, H, W, C)).astype("float32"),
    )


def _labels(seed=2, ignore=None):
    labels = np.random.default_rng(seed).integers(0, C, size=(B, H, W)).astype("int32")
    if ignore is not None:
        labels[:, 0, :2] = ignore
    return labels


def _reference(head, labels, params, noise, antithetic, ignore_label=None, class_weights=None):
    """(joint [B], marginal [B]) in float64 NumPy from the documented layout and noise."""
    p = params.astype(np.float64)
    k_, s = head.num_components, head.component_size
    z, eps = (np.asarray(t, np.float64) for t in noise)
    valid = np.ones(labels.shape, bool) if ignore_label is None else labels != ignore_label
    safe = np.where(valid, labels, 0)
    w = valid * (1.0 if class_weights is None else np.asarray(class_weights)[safe])
    gate = p[..., k_ * s :].reshape(B, -1, k_).mean(axis=1)
    log_pi = gate - scipy.special.logsumexp(gate, axis=-1, keepdims=True)
    joint, marginal = np.empty(B), np.empty(B)
    for b in range(B):
        terms, pixel_terms = [], []
        for k in range(k_):
            block = p[b, ..., k * s : (k + 1) * s]
            mu, raw = block[..., :C], block[..., C : 2 * C]
            factor = block[..., 2 * C :].reshape(H, W, C, head.rank)
            scale = np.sqrt(np.exp(raw) + head.epsilon)
            row = b * k_ + k
            deviations = [factor @ z[m, row] + scale * eps[m, row] for m in range(len(z))]
            etas = [mu + d for d in deviations] + (
                [mu - d for d in deviations] if antithetic else []
            )
            for eta in etas:
                log_soft = eta - scipy.special.logsumexp(eta, axis=-1, keepdims=True)
                lp = np.take_along_axis(log_soft, safe[b][..., None], -1)[..., 0]  # [H, W]
                terms.append(log_pi[b, k] + np.sum(w[b] * lp))
                pixel_terms.append(log_pi[b, k] + lp)
        m = len(terms) // k_
        joint[b] = -(scipy.special.logsumexp(terms) - np.log(m))
        per_pixel = scipy.special.logsumexp(np.stack(pixel_terms), axis=0) - np.log(m)
        marginal[b] = -np.sum(w[b] * per_pixel)
    return joint, marginal


CONFIGS = {
    "independent": dict(antithetic=False, chunk_size=None),
    "antithetic": dict(antithetic=True, chunk_size=None),
    "chunked": dict(antithetic=True, chunk_size=2),
    "chunked-independent": dict(antithetic=False, chunk_size=3),
    "ignore-and-weights": dict(
        antithetic=False, chunk_size=None, ignore_label=7, class_weights=[1.0, 2.5, 0.5]
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_terms_equal_the_numpy_reference(name):
    config = dict(CONFIGS[name])
    head = MixtureLowRankLogits(C, num_components=K, rank=R)
    params = _params(head)
    num_samples = 6
    labels = _labels(ignore=config.get("ignore_label"))
    noise = _noise(head, num_samples, config["antithetic"])
    joint, marginal = mixture_nll_terms(head, labels, params, num_samples, noise=noise, **config)
    config.pop("chunk_size")
    ref_joint, ref_marginal = _reference(head, labels, params, noise, **config)
    np.testing.assert_allclose(np.asarray(joint), ref_joint, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(marginal), ref_marginal, rtol=2e-5)
    assert np.all(np.asarray(joint) > 0) and np.all(np.isfinite(np.asarray(marginal)))


def test_one_component_is_the_ssn_loss():
    head = MixtureLowRankLogits(C, num_components=1, rank=R)
    ssn = LowRankLogits(C, rank=R)
    params = _params(head, seed=4)
    labels = _labels(seed=5)
    noise = _noise(head, 4, True, seed=6)
    got = mixture_nll_terms(head, labels, params, 4, antithetic=True, noise=noise)
    expected = chunked.sampled_nll_terms(
        ssn, labels, params[..., : ssn.params_size], 4, antithetic=True, noise=noise
    )
    for a, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradients_match_central_differences_of_the_reference(chunk_size):
    head = MixtureLowRankLogits(C, num_components=K, rank=R)
    params = _params(head, seed=7)
    labels = _labels(seed=8)
    noise = _noise(head, 4, True, seed=9)

    def objective_np(p):
        joint, marginal = _reference(head, labels, p, noise, antithetic=True)
        return float(np.sum(joint + 0.7 * marginal))

    x = tf.constant(params)
    with tf.GradientTape() as tape:
        tape.watch(x)
        joint, marginal = mixture_nll_terms(
            head, labels, x, 4, antithetic=True, noise=noise, chunk_size=chunk_size
        )
        objective = tf.reduce_sum(joint + 0.7 * marginal)
    grad = np.asarray(tape.gradient(objective, x), np.float64)
    rng = np.random.default_rng(10)
    gate_only = np.zeros(params.shape)
    gate_only[..., -K:] = rng.normal(size=(B, H, W, K))
    for direction in [rng.normal(size=params.shape) for _ in range(3)] + [gate_only]:
        h = 1e-4
        numeric = (
            objective_np(params.astype(np.float64) + h * direction)
            - objective_np(params.astype(np.float64) - h * direction)
        ) / (2 * h)
        np.testing.assert_allclose(np.sum(grad * direction), numeric, rtol=2e-3)


def test_the_gate_gradient_is_responsibility_minus_weight():
    head = MixtureLowRankLogits(C, num_components=K, rank=R)
    params = _params(head, seed=11)
    labels = _labels(seed=12)
    noise = _noise(head, 4, False, seed=13)
    x = tf.constant(params)
    with tf.GradientTape() as tape:
        tape.watch(x)
        joint, _ = mixture_nll_terms(head, labels, x, 4, noise=noise)
        total = tf.reduce_sum(joint)
    grad = np.asarray(tape.gradient(total, x))[..., -K:]  # [B, H, W, K]
    # responsibilities from the per-component Monte Carlo likelihoods
    pi = np.asarray(head.mixture_weights(params), np.float64)
    one = MixtureLowRankLogits(C, num_components=1, rank=R)
    component_params = np.asarray(head.component_params(params))
    z, eps = noise
    log_l = np.empty((B, K))
    for b in range(B):
        for k in range(K):
            row = b * K + k
            single = np.concatenate([component_params[row : row + 1], np.zeros((1, H, W, 1))], -1)
            nll, _ = mixture_nll_terms(
                one,
                labels[b : b + 1],
                single,
                4,
                noise=(z[:, row : row + 1], eps[:, row : row + 1]),
            )
            log_l[b, k] = -float(nll[0])
    resp = scipy.special.softmax(np.log(pi) + log_l, axis=-1)
    expected = -(resp - pi) / (H * W)  # the gate is the mean over pixels of its channels
    np.testing.assert_allclose(
        grad, np.broadcast_to(expected[:, None, None], grad.shape), atol=1e-6
    )


def test_chunks_give_the_same_value_and_gradient():
    head = MixtureLowRankLogits(C, num_components=K, rank=R)
    params = tf.constant(_params(head, seed=14))
    labels = _labels(seed=15)
    noise = _noise(head, 8, True, seed=16)
    out = []
    for chunk_size in (None, 2, 4):
        with tf.GradientTape() as tape:
            tape.watch(params)
            joint, marginal = mixture_nll_terms(
                head, labels, params, 8, antithetic=True, noise=noise, chunk_size=chunk_size
            )
            total = tf.reduce_sum(joint + marginal)
        out.append((float(total), np.asarray(tape.gradient(total, params))))
    for value, grad in out[1:]:
        np.testing.assert_allclose(value, out[0][0], rtol=1e-6)
        np.testing.assert_allclose(grad, out[0][1], rtol=1e-4, atol=1e-6)


# --- the Keras loss ------------------------------------------------------------------------------
def test_the_loss_object_is_the_heads_default_and_combines_the_terms():
    head = MixtureLowRankLogits(C, num_components=K, rank=R)
    assert type(head.default_loss()) is MixtureNLL
    assert type(tfp_seg.losses.default_loss(head)) is MixtureNLL
    params = _params(head, seed=17)
    labels = _labels(seed=18, ignore=255)
    loss = MixtureNLL(head, num_samples=4, ignore_label=255, marginal_weight=0.5, reduction=None)
    tf.random.set_seed(3)
    value = np.asarray(loss(labels, params))
    tf.random.set_seed(3)
    joint, marginal = loss._nll_terms(labels, params)
    valid = (labels != 255).sum(axis=(1, 2))
    np.testing.assert_allclose(
        value, (np.asarray(joint) + 0.5 * np.asarray(marginal)) / valid, rtol=1e-5
    )
    revived = keras.saving.deserialize_keras_object(
        json.loads(json.dumps(keras.saving.serialize_keras_object(loss))), safe_mode=True
    )
    assert type(revived) is MixtureNLL and revived.get_config() == loss.get_config()
    assert isinstance(revived.head, MixtureLowRankLogits) and revived.head.num_components == K


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: MixtureNLL(LowRankLogits(C)), "mixture head"),
        (lambda: MixtureNLL(keras.layers.Dense(C)), "`head`"),
        (lambda: MixtureNLL(MixtureLowRankLogits(C), marginal_weight=-1.0), "marginal_weight"),
        (lambda: MixtureNLL(MixtureLowRankLogits(C), num_samples=5), "even"),
        (lambda: MixtureNLL(MixtureLowRankLogits(C), num_samples=8, chunk_size=3), "chunk_size"),
    ],
)
def test_bad_arguments_are_clear_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_labels_must_match_the_params():
    head = MixtureLowRankLogits(C, num_components=K, rank=R)
    with pytest.raises(ValueError, match="`labels` shape"):
        mixture_nll_terms(head, _labels()[:, :2], _params(head), 4)


def test_the_loss_recovers_the_weights_of_two_annotation_modes():
    """One image, two annotations: A (probability 0.3) and B = 1 - A (0.7). With the
    components' covariances pinned near 0 (only their means and the gate are trained, so no
    component can produce both modes by itself, as a rank-1 SSN component can), the mixture
    likelihood has its unique optimum at one component per mode with weights (0.3, 0.7)."""
    tf.random.set_seed(0)
    head = MixtureLowRankLogits(2, num_components=2, rank=1)
    mode_a = (np.arange(16).reshape(1, 4, 4) % 3 == 0).astype("int32")
    modes = [(mode_a, 0.3), (1 - mode_a, 0.7)]
    rng = np.random.default_rng(0)
    means = tf.Variable(rng.normal(0.0, 0.3, size=(2, 1, 4, 4, 2)).astype("float32"))
    gate = tf.Variable(np.zeros((1, 4, 4, 2), "float32"))
    pinned = [tf.fill([1, 4, 4, 2], -10.0), tf.zeros([1, 4, 4, 2])]  # d_raw, P (rank 1)

    def params():
        return tf.concat([t for k in range(2) for t in [means[k]] + pinned] + [gate], axis=-1)

    loss = MixtureNLL(head, num_samples=4)
    optimizer = keras.optimizers.Adam(0.05)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            value = tf.add_n([w * loss(y, params()) for y, w in modes])
        variables = [means, gate]
        optimizer.apply_gradients(zip(tape.gradient(value, variables), variables, strict=True))
        return value

    values = [float(step()) for _ in range(400)]
    weights = np.asarray(head.mixture_weights(params()))[0]
    maps = np.argmax(np.asarray(means)[:, 0], -1)  # [K, 4, 4]: each component's label map
    mode_of = [
        0 if np.array_equal(m, mode_a[0]) else 1 if np.array_equal(m, 1 - mode_a[0]) else -1
        for m in maps
    ]
    assert sorted(mode_of) == [0, 1], maps  # one component per mode
    np.testing.assert_allclose(weights[np.argsort(mode_of)], [0.3, 0.7], atol=0.03)
    # The optimum (nats per pixel): the joint term is the entropy of the mode, H = 0.611, over
    # 16 pixels; the per-pixel term is H at every pixel (the modes differ at every pixel).
    entropy = -(0.3 * np.log(0.3) + 0.7 * np.log(0.7))
    optimum = entropy / 16 + entropy
    assert values[0] > optimum + 0.3 and abs(np.mean(values[-20:]) - optimum) < 0.02, values[::50]


def test_compile_auto_trains_a_segmenter():
    keras.utils.set_random_seed(0)
    model = tfp_seg.models.ProbabilisticSegmenter(
        tfp_seg.models.UNet(base_filters=4, depth=1),
        MixtureLowRankLogits(2, num_components=2, rank=2),
    )
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="auto")
    assert isinstance(model.loss, MixtureNLL)
    x = np.random.default_rng(0).normal(size=(8, 8, 8, 1)).astype("float32")
    y = (x[..., 0] > 0).astype("int32")
    history = model.fit(x, y, epochs=8, batch_size=4, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.8 * losses[0], losses
