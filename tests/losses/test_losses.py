import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy.special import logsumexp, softmax

from tfp_seg import losses
from tfp_seg.layers import CategoricalLogits, LowRankLogits


def _numpy_mc_nll(labels, samples, ignore_label=None, class_weights=None):
    m, b, h, w, c = samples.shape
    out = np.zeros(b)
    for bi in range(b):
        per_sample = []
        for mi in range(m):
            total = 0.0
            for i in range(h):
                for j in range(w):
                    y = labels[bi, i, j]
                    if ignore_label is not None and y == ignore_label:
                        continue
                    wgt = 1.0 if class_weights is None else class_weights[y]
                    total += wgt * np.log(softmax(samples[mi, bi, i, j].astype("float64"))[y])
            per_sample.append(total)
        out[bi] = -(logsumexp(per_sample) - np.log(m))
    return out


def test_mc_nll_matches_numpy_loop(rng):
    samples = rng.normal(size=(5, 2, 3, 4, 3)).astype("float32") * 2
    labels = rng.integers(0, 3, size=(2, 3, 4))
    got = losses.mc_categorical_nll(labels, samples).numpy()
    np.testing.assert_allclose(got, _numpy_mc_nll(labels, samples), rtol=1e-5)


def test_mc_nll_ignore_label_and_class_weights(rng):
    samples = rng.normal(size=(4, 2, 3, 3, 3)).astype("float32")
    labels = rng.integers(0, 3, size=(2, 3, 3))
    labels[0, 0, :] = 255
    cw = [0.5, 1.0, 2.0]
    got = losses.mc_categorical_nll(labels, samples, ignore_label=255, class_weights=cw).numpy()
    np.testing.assert_allclose(got, _numpy_mc_nll(labels, samples, 255, cw), rtol=1e-5)


def test_mc_nll_reduces_to_cross_entropy_without_covariance(rng):
    logits = rng.normal(size=(2, 4, 4, 3)).astype("float32")
    labels = rng.integers(0, 3, size=(2, 4, 4))
    head = LowRankLogits(3, rank=2)
    params = np.concatenate(
        [logits, np.full_like(logits, -60.0), np.zeros((2, 4, 4, 6), "float32")], -1
    )
    samples = head.sample_logits(params, 10, seed=0)
    ce = tf.reduce_sum(
        tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits), [1, 2]
    )
    np.testing.assert_allclose(
        losses.mc_categorical_nll(labels, samples).numpy(), ce.numpy(), rtol=1e-4
    )
    # and the Keras losses agree: the paper's SSN NLL (per pixel) == cross-entropy baseline,
    # and the default composite loss (joint + marginal) == 2 x cross-entropy.
    ssn = losses.StochasticSegmentationNLL(head, num_samples=10, marginal_weight=0.0)
    xent = losses.SegmentationCrossEntropy(num_classes=3)(labels, params)
    np.testing.assert_allclose(ssn(labels, params).numpy(), xent.numpy(), rtol=1e-4)
    both = losses.StochasticSegmentationNLL(head, num_samples=10)(labels, params)
    np.testing.assert_allclose(both.numpy(), 2 * xent.numpy(), rtol=1e-4)
    np.testing.assert_allclose(
        losses.mc_marginal_nll(labels, samples).numpy(), ce.numpy(), rtol=1e-4
    )
    np.testing.assert_allclose(xent.numpy(), ce.numpy().mean() / 16, rtol=1e-5)


def _still_params(logits, rank):
    """Packed SSN params with no covariance to speak of: every sample is the mean."""
    b, h, w, c = logits.shape
    return np.concatenate(
        [logits, np.full_like(logits, -60.0), np.zeros((b, h, w, c * rank), "float32")], -1
    )


def test_mean_weight_adds_the_mean_cross_entropy_with_label_sets_and_weights(rng):
    """mean_weight w adds w x the deterministic baseline's loss (same labels, ignored pixels,
    class weights, normalisation); with no covariance the SSN terms equal it too."""
    logits = (2 * rng.normal(size=(2, 5, 4, 3))).astype("float32")
    head = LowRankLogits(3, rank=2)
    params = _still_params(logits, 2)
    label_sets = rng.integers(0, 3, size=(2, 3, 5, 4))
    label_sets[0, 1, :2] = 255
    options = {"ignore_label": 255, "class_weights": [0.5, 1.0, 2.0]}
    xent = losses.SegmentationCrossEntropy(num_classes=3, **options)(label_sets, params).numpy()
    for marginal_weight, mean_weight in ((0.0, 0.0), (0.0, 0.7), (1.0, 2.5)):
        loss = losses.StochasticSegmentationNLL(
            head,
            num_samples=4,
            marginal_weight=marginal_weight,
            mean_weight=mean_weight,
            **options,
        )
        np.testing.assert_allclose(
            loss(label_sets, params).numpy(), (1 + marginal_weight + mean_weight) * xent, rtol=1e-5
        )


def test_mean_weight_term_is_the_numpy_cross_entropy_of_the_mean(rng):
    """With a real covariance the added term is exactly w x CE(mu) on a label map: the same
    seeded samples give the SSN terms, so the difference of the two losses is the term."""
    head = LowRankLogits(3, rank=2)
    params = rng.normal(size=(2, 3, 4, head.params_size)).astype("float32")
    labels = rng.integers(0, 3, size=(2, 3, 4))
    mu = params[..., :3].astype("float64")
    log_p = mu - logsumexp(mu, axis=-1, keepdims=True)
    ce = -np.take_along_axis(log_p, labels[..., None], -1).sum((1, 2, 3)) / 12
    values = []
    for mean_weight in (0.0, 1.5):
        loss = losses.StochasticSegmentationNLL(head, num_samples=6, mean_weight=mean_weight)
        tf.random.set_seed(3)
        keras.utils.set_random_seed(3)
        values.append(loss(labels, params).numpy())
    np.testing.assert_allclose(values[1] - values[0], 1.5 * ce.mean(), rtol=1e-4, atol=1e-6)


def test_mean_weight_gradient_reaches_only_the_mean_beyond_the_ssn_terms(rng):
    head = LowRankLogits(3, rank=2, antithetic=False)
    params = tf.Variable(rng.normal(size=(2, 4, 4, head.params_size)).astype("float32"))
    labels = rng.integers(0, 3, size=(2, 4, 4))
    grads = []
    for mean_weight in (0.0, 1.0):
        loss_fn = losses.StochasticSegmentationNLL(head, num_samples=4, mean_weight=mean_weight)
        keras.utils.set_random_seed(5)
        tf.random.set_seed(5)
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, params)
        grads.append(tape.gradient(loss, params).numpy())
    delta = grads[1] - grads[0]
    assert np.isfinite(grads[1]).all()
    assert np.abs(delta[..., :3]).max() > 1e-4
    np.testing.assert_allclose(delta[..., 3:], 0.0, atol=1e-6)


@pytest.mark.parametrize("bad", [-0.5, True, "1", None])
def test_mean_weight_rejects_bad_values_naming_the_argument(bad):
    with pytest.raises(ValueError, match="`mean_weight` must be a float >= 0"):
        losses.StochasticSegmentationNLL(LowRankLogits(3, rank=2), mean_weight=bad)


def test_marginal_nll_matches_numpy_loop(rng):
    samples = rng.normal(size=(6, 2, 3, 3, 3)).astype("float32") * 2
    labels = rng.integers(0, 3, size=(2, 3, 3))
    expected = np.zeros(2)
    for b in range(2):
        for i in range(3):
            for j in range(3):
                p = np.mean([softmax(samples[m, b, i, j].astype("float64")) for m in range(6)], 0)
                expected[b] -= np.log(p[labels[b, i, j]])
    got = losses.mc_marginal_nll(labels, samples).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_mc_nll_is_jensen_bounded(rng):
    """The MC NLL is at most the mean per-sample NLL (log-mean-exp >= mean)."""
    samples = rng.normal(size=(8, 1, 4, 4, 2)).astype("float32") * 3
    labels = rng.integers(0, 2, size=(1, 4, 4))
    per_sample = [losses.mc_categorical_nll(labels, samples[i : i + 1]).numpy() for i in range(8)]
    assert losses.mc_categorical_nll(labels, samples).numpy()[0] <= np.mean(per_sample) + 1e-5


def test_ssn_loss_gradients_reach_loc_factor_and_diag(rng):
    head = LowRankLogits(3, rank=2, antithetic=True)
    params = tf.Variable(rng.normal(size=(2, 4, 4, head.params_size)).astype("float32"))
    labels = rng.integers(0, 3, size=(2, 4, 4))
    loss_fn = losses.StochasticSegmentationNLL(head, num_samples=6)
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, params)
    g = tape.gradient(loss, params).numpy()
    assert np.isfinite(g).all()
    assert np.abs(g[..., :3]).max() > 0
    assert np.abs(g[..., 3:6]).max() > 0
    assert np.abs(g[..., 6:]).max() > 0


def test_all_pixels_ignored_is_defined_with_finite_gradient(rng):
    head = LowRankLogits(2, rank=1)
    params = tf.Variable(rng.normal(size=(1, 2, 2, head.params_size)).astype("float32"))
    labels = np.full((1, 2, 2), 255)
    loss_fn = losses.StochasticSegmentationNLL(head, num_samples=2, ignore_label=255)
    with tf.GradientTape() as tape:
        loss = loss_fn(labels, params)
    assert loss.numpy() == 0.0
    g = tape.gradient(loss, params)
    assert g is None or np.isfinite(g.numpy()).all()


def test_losses_serialise():
    head = LowRankLogits(3, rank=4)
    loss = losses.StochasticSegmentationNLL(
        head, num_samples=8, ignore_label=255, class_weights=[1, 2, 3]
    )
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(revived, losses.StochasticSegmentationNLL)
    assert revived.get_config() == loss.get_config()
    assert revived.head.rank == 4 and revived.num_samples == 8
    xe = losses.SegmentationCrossEntropy(num_classes=3, ignore_label=0)
    assert losses.SegmentationCrossEntropy.from_config(xe.get_config()).get_config() == (
        xe.get_config()
    )
    assert isinstance(CategoricalLogits(3).default_loss(), losses.SegmentationCrossEntropy)


@pytest.mark.parametrize(
    "labels, samples, match",
    [
        (np.zeros((2, 3)), np.zeros((1, 2, 3, 3, 2)), "`labels`"),
        (np.zeros((2, 3, 3)), np.zeros((2, 3, 3, 2)), "`logit_samples`"),
        (np.full((1, 3, 3), 0.5), np.zeros((1, 1, 3, 3, 2)), "`labels`"),
        (np.zeros((1, 3, 4)), np.zeros((1, 1, 3, 3, 2)), "`labels`"),
    ],
)
def test_bad_input_names_the_argument(labels, samples, match):
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError), match=match):
        losses.mc_categorical_nll(labels, samples.astype("float32"))


def test_out_of_range_labels_fail_loudly():
    samples = np.zeros((1, 1, 2, 2, 3), "float32")
    msg = r"`labels` has values outside \[0, 3\)"
    with pytest.raises(tf.errors.InvalidArgumentError, match=msg):
        losses.mc_categorical_nll(np.array([[[0, 1], [2, 3]]]), samples)
    with pytest.raises(tf.errors.InvalidArgumentError, match="`labels`"):
        losses.mc_categorical_nll(np.array([[[0, 1], [2, -1]]]), samples)
    with pytest.raises(ValueError, match="class_weights"):
        losses.StochasticSegmentationNLL(LowRankLogits(3), class_weights=[1.0, 2.0])


def test_extreme_logits_stay_finite():
    samples = np.array([1e4, -1e4, 0.0], "float32").reshape(1, 1, 1, 1, 3).repeat(2, 0)
    nll = losses.mc_categorical_nll(np.array([[[1]]]), samples).numpy()
    assert np.isfinite(nll).all() and nll[0] == pytest.approx(2e4, rel=1e-6)
