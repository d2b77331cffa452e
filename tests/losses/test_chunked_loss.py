"""The chunked (memory-flat) Monte Carlo NLL equals the direct form on the same samples, on
images `[H, W]` and volumes `[D, H, W]`."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import benchmarks_common
from tfp_seg import losses
from tfp_seg.layers import CategoricalLogits, HeteroscedasticLogits, LowRankLogits
from tfp_seg.losses import chunked, scorers

B, H, W, C, R, M = 2, 6, 5, 3, 4, 8
VOLUME = (3, 4, 5)  # D, H, W
CW = [0.5, 1.0, 2.0]


def _setup(rng, head, ignore=True, spatial=(H, W)):
    params = tf.constant(rng.normal(size=(B, *spatial, head.params_size)).astype("float32"))
    labels = rng.integers(0, C, size=(B, *spatial))
    if ignore:
        labels[0, 0, :] = 255
    return params, labels


def _value_and_grads(fn, params):
    """Joint, marginal and the gradient of each w.r.t. params (float64 numpy)."""
    out = []
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(params)
        joint, marginal = fn(params)
        sum_joint, sum_marginal = tf.reduce_sum(joint), tf.reduce_sum(marginal)
    for term, total in ((joint, sum_joint), (marginal, sum_marginal)):
        out += [term.numpy(), tape.gradient(total, params).numpy()]
    return out


def _reference(head, labels, noise, antithetic, ignore_label=255, class_weights=CW):
    """The public direct form on the head's own samples from the same noise."""

    def fn(params):
        samples = head.sample_logits(params, M, antithetic=antithetic, noise=noise)
        return (
            losses.mc_categorical_nll(labels, samples, ignore_label, class_weights),
            losses.mc_marginal_nll(labels, samples, ignore_label, class_weights),
        )

    return fn


def _chunked(head, labels, noise=None, seed=None, chunk_size=None, antithetic=True, **kw):
    kw.setdefault("ignore_label", 255)
    kw.setdefault("class_weights", CW)

    def fn(params):
        return chunked.sampled_nll_terms(
            head,
            labels,
            params,
            M,
            chunk_size=chunk_size,
            antithetic=antithetic,
            noise=noise,
            seed=seed,
            **kw,
        )

    return fn


def _assert_close(got, want, tol=1e-5):
    for g, w in zip(got, want, strict=True):
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("antithetic", [True, False])
@pytest.mark.parametrize("chunk_size", [None, 2, 4])
def test_low_rank_fused_and_chunked_match_direct_on_same_noise(rng, antithetic, chunk_size):
    head = LowRankLogits(C, rank=R)
    params, labels = _setup(rng, head)
    n = M // 2 if antithetic else M
    noise = (
        rng.normal(size=(n, B, R)).astype("float32"),
        rng.normal(size=(n, B, H, W, C)).astype("float32"),
    )
    want = _value_and_grads(_reference(head, labels, noise, antithetic), params)
    got = _value_and_grads(
        _chunked(head, labels, noise=noise, chunk_size=chunk_size, antithetic=antithetic), params
    )
    _assert_close(got, want)


@pytest.mark.parametrize(
    "head,noise_shapes",
    [
        (HeteroscedasticLogits(C), [(M // 2, B, H, W, C)]),
        (
            HeteroscedasticLogits(C, low_rank_classes=2),
            [(M // 2, B, H, W, 2), (M // 2, B, H, W, C)],
        ),
    ],
    ids=["diagonal", "low_rank_classes"],
)
def test_generic_heads_chunked_match_direct_on_same_noise(rng, head, noise_shapes):
    params, labels = _setup(rng, head)
    arrays = [rng.normal(size=s).astype("float32") for s in noise_shapes]
    noise = arrays[0] if len(arrays) == 1 else tuple(arrays)
    want = _value_and_grads(_reference(head, labels, noise, True), params)
    for chunk_size in (None, 2):
        got = _value_and_grads(_chunked(head, labels, noise=noise, chunk_size=chunk_size), params)
        _assert_close(got, want)


def test_seeded_chunks_are_fold_in_streams_and_reproducible(rng):
    # Generic heads: chunk k draws head.sample_logits(..., seed=fold_in(seed, k)).
    head = HeteroscedasticLogits(C)
    params, labels = _setup(rng, head)
    seed = tf.constant([7, 11], tf.int64)

    def reference(p):
        samples = tf.concat(
            [
                head.sample_logits(
                    p,
                    2,
                    antithetic=True,
                    seed=tf.random.experimental.stateless_fold_in(seed, k),
                )
                for k in range(M // 2)
            ],
            axis=0,
        )
        return (
            losses.mc_categorical_nll(labels, samples, 255, CW),
            losses.mc_marginal_nll(labels, samples, 255, CW),
        )

    want = _value_and_grads(reference, params)
    _assert_close(_value_and_grads(_chunked(head, labels, seed=seed, chunk_size=2), params), want)
    # The fused low-rank path: a fixed seed reproduces, a different one does not.
    head = LowRankLogits(C, rank=R)
    params, labels = _setup(rng, head)
    a = _value_and_grads(_chunked(head, labels, seed=3, chunk_size=4), params)
    b = _value_and_grads(_chunked(head, labels, seed=3, chunk_size=4), params)
    c = _value_and_grads(_chunked(head, labels, seed=4, chunk_size=4), params)
    _assert_close(a, b, tol=0)
    assert np.abs(a[0] - c[0]).max() > 1e-3


def test_chunked_in_tf_function_matches_eager(rng):
    head = LowRankLogits(C, rank=R)
    params, labels = _setup(rng, head)
    noise = (
        rng.normal(size=(M // 2, B, R)).astype("float32"),
        rng.normal(size=(M // 2, B, H, W, C)).astype("float32"),
    )
    fn = _chunked(head, labels, noise=noise, chunk_size=2)
    eager = _value_and_grads(fn, params)
    graph = tf.function(lambda p: [tf.convert_to_tensor(v) for v in _graph_values(fn, p)])
    _assert_close([v.numpy() for v in graph(params)], eager)


def _graph_values(fn, params):
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(params)
        joint, marginal = fn(params)
        sj, sm = tf.reduce_sum(joint), tf.reduce_sum(marginal)
    return [joint, tape.gradient(sj, params), marginal, tape.gradient(sm, params)]


def test_box_muller_noise_is_standard_normal():
    x = scorers.normal(tf.constant([200_001]), tf.constant([1, 2])).numpy()
    n = x.size
    assert x.shape == (200_001,)
    # moments within 5 standard errors: mean 1/sqrt(n), var sqrt(2/n), 4th moment sqrt(96/n)
    assert abs(x.mean()) < 5 / np.sqrt(n)
    assert abs(x.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs((x**4).mean() - 3) < 5 * np.sqrt(96 / n)


def test_fused_low_rank_loss_is_unbiased_against_head_samples(rng):
    # The fused path draws its own noise: its expected loss equals the head-sampled one's.
    head = LowRankLogits(2, rank=2)
    params = tf.constant(0.5 * rng.normal(size=(1, 4, 4, head.params_size)).astype("float32"))
    labels = rng.integers(0, 2, size=(1, 4, 4))

    @tf.function
    def both(seed):
        fused = chunked.sampled_nll_terms(head, labels, params, 2, seed=seed, antithetic=False)
        samples = head.sample_logits(params, 2, seed=seed, antithetic=False)
        return fused[1], losses.mc_marginal_nll(labels, samples)

    pairs = [both(tf.constant([s, 1])) for s in range(300)]
    fused = np.concatenate([f.numpy() for f, _ in pairs])
    direct = np.concatenate([d.numpy() for _, d in pairs])
    stderr = np.sqrt(fused.var() / fused.size + direct.var() / direct.size)
    assert abs(fused.mean() - direct.mean()) < 4 * stderr


def test_loss_option_config_and_validation(rng):
    head = LowRankLogits(C, rank=R)
    loss = losses.StochasticSegmentationNLL(head, num_samples=M, chunk_size=4)
    assert loss.get_config()["chunk_size"] == 4
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert revived.chunk_size == 4 and revived.num_samples == M
    params, labels = _setup(rng, head, ignore=False)
    value = loss(labels, params).numpy()
    assert np.isfinite(value) and value > 0
    with pytest.raises(ValueError, match="divide"):
        losses.StochasticSegmentationNLL(head, num_samples=M, chunk_size=3)
    with pytest.raises(ValueError, match="even"):
        losses.StochasticSegmentationNLL(head, num_samples=6, chunk_size=3)
    with pytest.raises(ValueError, match="positive int"):
        losses.StochasticSegmentationNLL(head, num_samples=M, chunk_size=0)
    # deterministic head: every sample equals the mean, so the loss is the cross-entropy
    det = CategoricalLogits(C)
    logits = tf.constant(rng.normal(size=(B, H, W, C)).astype("float32"))
    chunked_ce = losses.StochasticSegmentationNLL(det, 4, chunk_size=2, marginal_weight=0.0)
    np.testing.assert_allclose(
        chunked_ce(labels, logits).numpy(),
        losses.SegmentationCrossEntropy(C)(labels, logits).numpy(),
        rtol=1e-5,
    )


def _gradient_call(loss, labels, params):
    """A no-argument call of the loss's gradient w.r.t. `params` (one `tf.function`)."""

    @tf.function
    def step(p):
        with tf.GradientTape() as tape:
            tape.watch(p)
            value = loss(labels, p)
        return tape.gradient(value, p)

    return lambda: step(params).numpy()


def flatness_step(num_samples, chunk_size):
    """Forward + backward of the SSN loss at 64x64, B = 4, built in the memory child process of
    `peak_rss_increase_mib`."""
    rng = np.random.default_rng(1234)
    head = LowRankLogits(C, rank=R)
    shape = (4, 64, 64)
    params = tf.constant(rng.normal(size=shape + (head.params_size,)).astype("float32"))
    labels = tf.constant(rng.integers(0, C, size=shape).astype("int32"))
    loss = losses.StochasticSegmentationNLL(head, num_samples, chunk_size=chunk_size)
    return _gradient_call(loss, labels, params)


def test_chunked_peak_memory_is_flat_in_num_samples():
    # Peak RSS of one call above RSS before it, each configuration in a fresh process with
    # oneDNN off and every buffer >= 64 KiB mmapped (benchmarks/_common.py): works with and
    # without oneDNN in this process.
    def peak(num_samples, chunk_size):
        return benchmarks_common().peak_rss_increase_mib(
            __file__, "flatness_step", {"num_samples": num_samples, "chunk_size": chunk_size}
        )

    small, large, direct_large = peak(8, 4), peak(64, 4), peak(64, None)
    assert large < 1.5 * small, (small, large)
    assert direct_large > 3 * large, (direct_large, large)


def test_auto_is_the_default_and_equals_its_explicit_chunk_size(rng):
    head = LowRankLogits(2, rank=R)
    loss = losses.StochasticSegmentationNLL(head, num_samples=40)
    assert loss.chunk_size == "auto" and loss.get_config()["chunk_size"] == "auto"
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert revived.chunk_size == "auto"
    assert losses.StochasticSegmentationNLL(head, 40, chunk_size=None).chunk_size is None
    with pytest.raises(ValueError, match="chunk_size"):
        losses.StochasticSegmentationNLL(head, 40, chunk_size="fast")
    # 64 x 64 images, 3 classes, M = 100: 100 * 3 * 4096 > 2**20 values per image -> chunks
    # of the largest even divisor S of 100 with S * 3 * 4096 <= 2**16: 4
    head3 = LowRankLogits(3, rank=R)
    params = tf.constant(rng.normal(size=(2, 64, 64, head3.params_size)).astype("float32"))
    labels = rng.integers(0, 3, size=(2, 64, 64))
    assert chunked.auto_chunk_size(100, True, 3 * 64 * 64) == 4
    kw = dict(seed=5, antithetic=True)
    fns = {
        cs: (lambda p, cs=cs: chunked.sampled_nll_terms(head3, labels, p, 100, chunk_size=cs, **kw))
        for cs in ("auto", 4, None)
    }
    auto, explicit, direct = (_value_and_grads(fns[cs], params) for cs in ("auto", 4, None))
    for a, b in zip(auto, explicit, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)  # the same chunks, same samples
    assert not np.allclose(auto[0], direct[0])  # direct draws other (equally distributed) ones


def default_path_step(num_samples):
    """The issue-21 shape (B, C, H x W = 8, 2, 128 x 128, rank 10) with the default
    `chunk_size`, forward + backward, built in the memory child process."""
    rng = np.random.default_rng(0)
    head = LowRankLogits(2, rank=10)
    shape = (8, 128, 128)
    params = tf.constant(0.3 * rng.normal(size=shape + (head.params_size,)).astype("float32"))
    labels = tf.constant(rng.integers(0, 2, size=shape).astype("int32"))
    loss = losses.StochasticSegmentationNLL(head, num_samples, normalize="none")
    return _gradient_call(loss, labels, params)


@pytest.mark.slow
def test_default_path_peak_memory_is_flat_from_10_to_100_samples():
    # Issue 21, target 2: without a chosen chunk_size, the peak at M = 100 is at most 1.2x the
    # peak at M = 10 (measured 0.99x), where all samples at once grow it 8.6x.
    def peak(num_samples):
        return benchmarks_common().peak_rss_increase_mib(
            __file__, "default_path_step", {"num_samples": num_samples}
        )

    small, large = peak(10), peak(100)
    assert large <= 1.2 * small, (small, large)


def test_heteroscedastic_loss_chunked_option(rng):
    head = HeteroscedasticLogits(C)
    loss = losses.HeteroscedasticNLL(head, num_samples=M, chunk_size=2)
    assert loss.get_config()["chunk_size"] == 2
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert revived.chunk_size == 2 and revived.num_samples == M
    with pytest.raises(ValueError, match="divide"):
        losses.HeteroscedasticNLL(head, num_samples=M, chunk_size=3)
    labels = rng.integers(0, C, size=(B, H, W))
    # Near-zero variances: every sample is the mean, so the loss is the cross-entropy.
    loc = rng.normal(size=(B, H, W, C)).astype("float32")
    point = tf.constant(np.concatenate([loc, np.full_like(loc, -30.0)], -1))
    np.testing.assert_allclose(
        loss(labels, point).numpy(),
        losses.SegmentationCrossEntropy(C)(labels, loc).numpy(),
        rtol=1e-4,
    )
    # Real variances: the chunked loss has the direct loss's expectation, and a gradient.
    params = tf.constant(np.concatenate([loc, rng.normal(size=loc.shape).astype("float32")], -1))
    direct = losses.HeteroscedasticNLL(head, num_samples=M)
    both = tf.function(lambda: (loss(labels, params), direct(labels, params)))
    values = np.array([[v.numpy() for v in both()] for _ in range(200)])
    stderr = np.sqrt(values.var(0).sum() / len(values))
    assert abs(values[:, 0].mean() - values[:, 1].mean()) < 4 * stderr
    with tf.GradientTape() as tape:
        tape.watch(params)
        value = loss(labels, params)
    grad = tape.gradient(value, params).numpy()
    assert np.isfinite(grad).all() and np.abs(grad[..., C:]).sum() > 0


@pytest.mark.parametrize(
    "head_factory", [lambda: LowRankLogits(C, rank=R), lambda: HeteroscedasticLogits(C)]
)
def test_chunked_graph_with_a_static_batch_of_one(rng, head_factory):
    # Regression: with a static batch of 1, shape inference through the scorer's broadcasting
    # matmuls lost the batch dimension and tf.while_loop refused the loop variables.
    head = head_factory()
    params = tf.constant(rng.normal(size=(1, H, W, head.params_size)).astype("float32"))
    labels = tf.constant(rng.integers(0, C, size=(1, H, W)).astype("int32"))

    @tf.function
    def terms(p, chunk_size):
        with tf.GradientTape() as tape:
            tape.watch(p)
            joint, marginal = chunked.sampled_nll_terms(
                head, labels, p, M, chunk_size=chunk_size, antithetic=True, seed=[3, 1]
            )
            total = tf.reduce_sum(joint + marginal)
        return joint, marginal, tape.gradient(total, p)

    joint, marginal, grad = (t.numpy() for t in terms(params, 2))
    assert joint.shape == (1,) and marginal.shape == (1,)
    assert np.isfinite(joint).all() and np.isfinite(grad).all() and np.abs(grad).sum() > 0
    # the same seed with one chunk of M: same estimator, other draws; both finite and close
    # in scale (per-image NLL of H*W pixels)
    whole = terms(params, None)[1].numpy()
    assert np.isfinite(whole).all() and 0.5 < marginal[0] / whole[0] < 2.0


# --- volumes -------------------------------------------------------------------------------------
VOLUME_CASES = {
    # name: (head, noise shapes for N' = M / 2 antithetic pairs)
    "fused": (LowRankLogits(C, rank=R, spatial_dims=3), [(M // 2, B, R), (M // 2, B, *VOLUME, C)]),
    "generic": (HeteroscedasticLogits(C, spatial_dims=3), [(M // 2, B, *VOLUME, C)]),
    "generic-class-factor": (
        HeteroscedasticLogits(C, low_rank_classes=2, spatial_dims=3),
        [(M // 2, B, *VOLUME, 2), (M // 2, B, *VOLUME, C)],
    ),
}


@pytest.mark.parametrize("chunk_size", [None, 2, 4])
@pytest.mark.parametrize("name", sorted(VOLUME_CASES))
def test_volumes_chunked_and_fused_match_direct_on_same_noise(rng, name, chunk_size):
    # Values and gradients of both terms, with an ignored row of voxels and class weights.
    head, noise_shapes = VOLUME_CASES[name]
    params, labels = _setup(rng, head, spatial=VOLUME)
    arrays = [rng.normal(size=shape).astype("float32") for shape in noise_shapes]
    noise = arrays[0] if len(arrays) == 1 else tuple(arrays)
    want = _value_and_grads(_reference(head, labels, noise, True), params)
    got = _value_and_grads(_chunked(head, labels, noise=noise, chunk_size=chunk_size), params)
    _assert_close(got, want)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_volume_roi_with_ignored_outside_is_the_cropped_volume(rng, chunk_size):
    # With an roi_mask the head pins the logits outside the region; with the voxels outside
    # ignored, the loss is the loss of the region alone: the low-rank normal restricted to the
    # region's voxels has their rows of P and D, scored under the same z and their eps. Its
    # gradient outside the region is zero.
    head = LowRankLogits(C, rank=R, spatial_dims=3)
    roi = np.zeros((B, *VOLUME), "float32")
    crop = (slice(None), slice(1, None), slice(1, 3), slice(2, None))
    roi[crop] = 1.0
    params = head(rng.normal(size=(B, *VOLUME, 4)).astype("float32"), roi_mask=roi)
    labels = rng.integers(0, C, size=(B, *VOLUME))
    labels[roi == 0] = 255
    z = rng.normal(size=(M // 2, B, R)).astype("float32")
    eps = rng.normal(size=(M // 2, B, *VOLUME, C)).astype("float32")
    full = _value_and_grads(_chunked(head, labels, (z, eps), chunk_size=chunk_size), params)
    region = tf.constant(params.numpy()[crop])
    cropped = _value_and_grads(
        _chunked(head, labels[crop], (z, eps[(slice(None),) + crop]), chunk_size=chunk_size),
        region,
    )
    for term in (0, 2):  # joint, marginal
        np.testing.assert_allclose(full[term], cropped[term], rtol=1e-5)
        grad = full[term + 1]
        np.testing.assert_allclose(grad[crop], cropped[term + 1], rtol=1e-4, atol=1e-5)
        assert np.all(grad[roi == 0] == 0.0)
    # The Keras loss normalises by the voxels scored: those of the region.
    loss = losses.StochasticSegmentationNLL(head, M, ignore_label=255, normalize="none")
    tf.random.set_seed(3)
    summed = loss(labels, params).numpy()
    per_voxel = losses.StochasticSegmentationNLL(head, M, ignore_label=255)
    tf.random.set_seed(3)
    np.testing.assert_allclose(per_voxel(labels, params).numpy(), summed / roi[0].sum(), rtol=1e-5)
