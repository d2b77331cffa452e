"""Label-map sampling: `distributions.sample_low_rank_labels`, `argmax_classes`, the heads'
`sample_labels` and `standard_normal` (Box-Muller).

The label sampler draws from the C - 1 logit differences instead of arg-maxing full logit
samples, so it is checked statistically against exact label probabilities: closed forms for
two classes (a normal CDF; a bivariate normal orthant for pixel pairs, which tests the low-rank
correlation), 1-D quadrature for independent logits with more classes, and a dense NumPy
multivariate normal for correlated ones. Bounds are 5 standard errors of a frequency. The
closed forms and the head-level contract also run on volumes (`S = (D, H, W)`), with voxel
pairs in different depth slices for the low-rank correlation.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf
from scipy import special, stats

from tfp_seg import distributions as dists
from tfp_seg.layers import (
    CategoricalLogits,
    HeteroscedasticLogits,
    LowRankLogits,
)
from tfp_seg.models import ProbabilisticSegmenter, UNet

N = 40_000


def _params(rng, b=1, h=2, w=3, c=2, r=2, factor_scale=0.6, d=None):
    """Low-rank parameters over `S = (h, w)`, or the volume `(d, h, w)` when `d` is given."""
    spatial = (h, w) if d is None else (d, h, w)
    loc = rng.normal(scale=0.8, size=(b, *spatial, c)).astype("float32")
    factor = (factor_scale * rng.normal(size=(b, *spatial, c, r))).astype("float32")
    diag = rng.uniform(0.2, 1.5, size=(b, *spatial, c)).astype("float32")
    return loc, factor, diag


def _freq(maps, c):
    """Per-pixel frequency of class c over the sample axis (0)."""
    return (maps == c).mean(axis=0)


def _assert_freq(freq, p, n, what):
    se = np.sqrt(np.clip(p * (1 - p), 1e-12, None) / n)
    z = np.abs(freq - p) / se
    assert z.max() < 5, f"{what}: max z = {z.max():.2f}; freq {freq.ravel()} vs {p.ravel()}"


# Pixel pairs for the joint: (0, 1) neighbours, (0, 5) and (2, 4) across rows; on the volume
# [2, 2, 3] (voxel (d, h, w) at 6 d + 3 h + w) pairs across the two depth slices.
SHAPES = {"image": (None, [(0, 1), (0, 5), (2, 4)]), "volume": (2, [(0, 6), (1, 11), (5, 8)])}


@pytest.mark.parametrize("spatial", sorted(SHAPES))
@pytest.mark.parametrize("antithetic", [False, True])
def test_two_classes_match_the_closed_form(rng, antithetic, spatial):
    depth, pairs = SHAPES[spatial]
    loc, factor, diag = _params(rng, d=depth)
    maps = dists.sample_low_rank_labels(
        loc, factor, diag, N, seed=[4, 5], antithetic=antithetic
    ).numpy()
    assert maps.shape == (N,) + loc.shape[:-1] and maps.dtype == np.int32
    assert set(np.unique(maps)) <= {0, 1}
    # delta = eta_1 - eta_0 ~ N(mu_1 - mu_0, |P_1 - P_0|^2 + D_0 + D_1) at each pixel
    d_mean = (loc[..., 1] - loc[..., 0]).ravel().astype("float64")
    d_factor = (factor[..., 1, :] - factor[..., 0, :]).reshape(-1, factor.shape[-1])
    d_cov = d_factor @ d_factor.T + np.diag((diag[..., 0] + diag[..., 1]).ravel())
    p1 = special.ndtr(d_mean / np.sqrt(np.diag(d_cov)))
    # Mirrored pairs are not independent; N/2 pairs bound the standard error from above.
    n_eff = N // 2 if antithetic else N
    _assert_freq(_freq(maps, 1).ravel(), p1, n_eff, "P(label = 1)")
    # The joint of two pixels carries the low-rank correlation: a bivariate orthant.
    flat = maps.reshape(N, -1)
    for i, j in pairs:
        sub = d_cov[np.ix_([i, j], [i, j])]
        p11 = stats.multivariate_normal(mean=[0, 0], cov=sub).cdf(d_mean[[i, j]])
        f11 = ((flat[:, i] == 1) & (flat[:, j] == 1)).mean()
        _assert_freq(np.array([f11]), np.array([p11]), n_eff, f"P(both 1) pixels {i},{j}")


def _independent_class_probs(loc, sd):
    """P(argmax = c) for independent normal logits, by Gauss-Hermite quadrature over eta_c."""
    x, w = np.polynomial.hermite_e.hermegauss(120)
    w = w / w.sum()
    c = loc.shape[-1]
    out = np.empty(loc.shape)
    for k in range(c):
        eta_k = loc[..., k, None] + sd[..., k, None] * x  # [..., nodes]
        prod = np.ones_like(eta_k)
        for j in range(c):
            if j != k:
                prod *= special.ndtr((eta_k - loc[..., j, None]) / sd[..., j, None])
        out[..., k] = (prod * w).sum(-1)
    return out


@pytest.mark.parametrize("num_classes", [3, 5])
def test_independent_logits_match_quadrature(rng, num_classes):
    loc, _, diag = _params(rng, c=num_classes)
    maps = dists.sample_low_rank_labels(loc, None, diag, N, seed=7).numpy()
    probs = _independent_class_probs(loc[0].astype("float64"), np.sqrt(diag[0]).astype("float64"))
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-6)
    for c in range(num_classes):
        _assert_freq(_freq(maps[:, 0], c), probs[..., c], N, f"P(label = {c})")


@pytest.mark.parametrize("antithetic", [False, True])
def test_correlated_classes_match_a_dense_reference(rng, antithetic):
    # Two pixels x three classes with a rank-2 factor: the 9-cell joint of the two labels
    # against arg maxes of a dense multivariate normal drawn by NumPy.
    loc, factor, diag = _params(rng, h=1, w=2, c=3, factor_scale=0.9)
    maps = dists.sample_low_rank_labels(
        loc, factor, diag, N, seed=[1, 9], antithetic=antithetic
    ).numpy()
    p = factor.reshape(-1, factor.shape[-1]).astype("float64")
    cov = p @ p.T + np.diag(diag.ravel())
    ref = np.random.default_rng(0).multivariate_normal(loc.ravel(), cov, size=4 * N)
    ref = ref.reshape(-1, 2, 3).argmax(-1)
    ours = maps.reshape(N, 2)
    n_ours = N // 2 if antithetic else N
    for a in range(3):
        for b in range(3):
            f = ((ours[:, 0] == a) & (ours[:, 1] == b)).mean()
            g = ((ref[:, 0] == a) & (ref[:, 1] == b)).mean()
            se = np.sqrt(g * (1 - g) / n_ours + g * (1 - g) / len(ref)) + 1e-4
            assert abs(f - g) < 5 * se, (a, b, f, g)


@pytest.mark.parametrize(
    "make, spatial",
    [
        (lambda: LowRankLogits(4, rank=3), (2, 2)),
        (lambda: LowRankLogits(4, rank=3, spatial_dims=3), (2, 2, 2)),
        (lambda: HeteroscedasticLogits(3, spatial_dims=3), (2, 2, 3)),
    ],
    ids=["low-rank-image", "low-rank-volume", "heteroscedastic-volume"],
)
def test_same_distribution_as_argmax_of_logit_samples(rng, make, spatial):
    # The head-level contract: maps from `sample_labels` vs arg maxes of `sample_logits`.
    head = make()
    size = (1, *spatial, head.params_size)
    params = tf.constant(0.7 * rng.normal(size=size).astype("float32"))
    n = 20_000
    fast = head.sample_labels(params, n, seed=[2, 3], antithetic=False).numpy()
    slow = dists.argmax_classes(head.sample_logits(params, n, seed=[2, 3], antithetic=False))
    slow = slow.numpy()
    assert fast.shape == slow.shape == (n, 1, *spatial)
    for c in range(head.num_classes):
        f, g = _freq(fast, c), _freq(slow, c)
        se = np.sqrt((f * (1 - f) + g * (1 - g)) / n) + 1e-4
        assert (np.abs(f - g) < 5 * se).all(), (c, f, g)


def test_shapes_seeds_and_validation(rng):
    loc, factor, diag = _params(rng, b=2, h=4, w=5, c=3)
    a = dists.sample_low_rank_labels(loc, factor, diag, 6, seed=[1, 2]).numpy()
    b = dists.sample_low_rank_labels(loc, factor, diag, 6, seed=[1, 2]).numpy()
    c = dists.sample_low_rank_labels(loc, factor, diag, 6, seed=[1, 3]).numpy()
    assert a.shape == (6, 2, 4, 5) and a.dtype == np.int32
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    unseeded = dists.sample_low_rank_labels(loc, factor, diag, 6).numpy()
    assert unseeded.shape == (6, 2, 4, 5)
    assert set(np.unique(a)) <= {0, 1, 2}
    one = dists.sample_low_rank_labels(loc[..., :1], factor[..., :1, :], diag[..., :1], 3)
    np.testing.assert_array_equal(one.numpy(), np.zeros((3, 2, 4, 5)))
    with pytest.raises(ValueError, match="num_samples"):
        dists.sample_low_rank_labels(loc, factor, diag, 3, antithetic=True)
    with pytest.raises(ValueError, match="num_samples"):
        dists.sample_low_rank_labels(loc, factor, diag, 0)


def test_dynamic_shapes_in_a_graph(rng):
    loc, factor, diag = _params(rng, b=2, h=4, w=6, c=3)

    @tf.function(
        input_signature=[
            tf.TensorSpec([None, None, None, 3]),
            tf.TensorSpec([None, None, None, 3, None]),
            tf.TensorSpec([None, None, None, 3]),
        ]
    )
    def fn(loc, factor, diag):
        return dists.sample_low_rank_labels(loc, factor, diag, 4, seed=[0, 1], antithetic=True)

    eager = dists.sample_low_rank_labels(loc, factor, diag, 4, seed=[0, 1], antithetic=True)
    np.testing.assert_array_equal(fn(loc, factor, diag).numpy(), eager.numpy())


def test_extreme_logits_and_tiny_variances_give_the_mean_arg_max(rng):
    loc = rng.choice([-1e4, 0.0, 1e4], size=(2, 3, 3, 4)).astype("float32")
    loc += np.arange(4, dtype="float32") * 1e-3 * (loc == loc.max(-1, keepdims=True))
    factor = np.zeros((2, 3, 3, 4, 2), "float32")
    diag = np.full((2, 3, 3, 4), 1e-6, "float32")
    maps = dists.sample_low_rank_labels(loc, factor, diag, 8, seed=3).numpy()
    # Ties broken by the 1e-3 offsets; noise sd 1e-3 * sqrt(2) cannot reorder gaps >= 1e4 but
    # can reorder the 1e-3 ties, so compare only where the maximum is unique by 1e4.
    top2 = np.sort(loc, -1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 1.0
    expect = np.broadcast_to(loc.argmax(-1), maps.shape)
    np.testing.assert_array_equal(maps[:, clear], expect[:, clear])
    assert clear.any()


def test_roi_masked_pixels_follow_the_mean():
    head = LowRankLogits(3, rank=2)
    params = np.zeros((1, 4, 4, head.params_size), "float32")
    params[..., :3] = [0.0, 0.5, 0.2]  # mean arg max: class 1
    params[..., 3:6] = 3.0  # large variances inside the ROI
    params = tf.constant(params)
    roi = np.zeros((1, 4, 4), "float32")
    roi[:, :2] = 1.0
    masked = head._postprocess(params, tf.constant(roi))
    maps = head.sample_labels(masked, 200, seed=1).numpy()
    assert (maps[:, :, 2:] == 1).all()  # outside the ROI: the mean's arg max, always
    assert len(np.unique(maps[:, :, :2])) == 3  # inside: every class is drawn


@pytest.mark.parametrize("num_classes", [1, 2, 3, 7, 40])
def test_argmax_classes_matches_numpy_including_ties(rng, num_classes):
    logits = rng.integers(0, 3, size=(5, 4, 6, num_classes)).astype("float32")  # many ties
    got = dists.argmax_classes(logits).numpy()
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, logits.argmax(-1))


def test_models_sample_through_the_heads_label_sampler(rng):
    x = rng.normal(size=(2, 16, 16, 1)).astype("float32")
    for head in (LowRankLogits(3, rank=2), HeteroscedasticLogits(3)):
        keras.utils.set_random_seed(0)
        model = ProbabilisticSegmenter(UNet(base_filters=4, depth=1), head)
        maps = model.sample(x, 5, seed=[3, 4])
        params = model(x, training=False)
        np.testing.assert_array_equal(
            maps, head.sample_labels(params, 5, seed=[3, 4], antithetic=False).numpy()
        )
    det = ProbabilisticSegmenter(UNet(base_filters=4, depth=1), CategoricalLogits(3))
    maps = det.sample(x, 4, seed=0)
    assert maps.shape == (4, 2, 16, 16)
    np.testing.assert_array_equal(maps, np.broadcast_to(det(x).numpy().argmax(-1), maps.shape))


def test_heteroscedastic_class_factor_uses_the_generic_path(rng):
    head = HeteroscedasticLogits(3, low_rank_classes=1)
    params = tf.constant(0.5 * rng.normal(size=(1, 2, 2, head.params_size)).astype("float32"))
    maps = head.sample_labels(params, 6, seed=[5, 6], antithetic=False).numpy()
    logits = head.sample_logits(params, 6, seed=[5, 6], antithetic=False).numpy()
    np.testing.assert_array_equal(maps, logits.argmax(-1))


@pytest.mark.parametrize(
    "dtype, seed", [("float32", [1, 2]), ("float32", None), ("float64", 3), ("bfloat16", 4)]
)
def test_standard_normal_moments(dtype, seed):
    n = 200_001  # odd: the Box-Muller pairs are trimmed
    x = dists.standard_normal([n], seed=seed, dtype=dtype)
    assert x.dtype == tf.as_dtype(dtype) and x.shape == (n,)
    x = tf.cast(x, tf.float64).numpy()
    # within 5 standard errors: mean 1/sqrt(n), variance sqrt(2/n), 4th moment sqrt(96/n);
    # bfloat16 rounding (8 bits) adds a variance bias of ~1e-5, far below the bound.
    assert abs(x.mean()) < 5 / np.sqrt(n)
    assert abs(x.var() - 1) < 5 * np.sqrt(2 / n)
    assert abs((x**4).mean() - 3) < 5 * np.sqrt(96 / n)
    if dtype != "bfloat16":  # (bfloat16 values are too coarse for a KS test at this n)
        # Kolmogorov-Smirnov against N(0, 1): p > 1e-4 fails one run in 10,000 by chance.
        assert stats.kstest(x, "norm").pvalue > 1e-4


def test_standard_normal_reproducible_shape_and_pairs():
    a = dists.standard_normal([3, 5, 7], seed=[9, 1]).numpy()
    np.testing.assert_array_equal(a, dists.standard_normal([3, 5, 7], seed=[9, 1]).numpy())
    assert a.shape == (3, 5, 7)
    assert not np.array_equal(a, dists.standard_normal([3, 5, 7], seed=[9, 2]).numpy())
    # The two halves are r cos(t) and r sin(t) of the same uniforms: a Box-Muller pair.
    u = tf.random.stateless_uniform([2, 53], seed=tf.constant([9, 1], tf.int64)).numpy()
    r = np.sqrt(-2 * np.log1p(-u[0].astype("float64")))
    expect = np.concatenate([r * np.cos(2 * np.pi * u[1]), r * np.sin(2 * np.pi * u[1])])[:105]
    np.testing.assert_allclose(a.ravel(), expect, rtol=2e-5, atol=2e-5)


# --- predictive probabilities on class planes ---------------------------------------------------
@pytest.mark.parametrize("spatial", sorted(SHAPES))
def test_mean_probabilities_two_classes_match_quadrature(rng, spatial):
    # E[softmax(eta)_1] = E[sigmoid(delta)], delta ~ N(mu_1 - mu_0, D_0 + D_1 + |P_1 - P_0|^2)
    loc, factor, diag = _params(rng, d=SHAPES[spatial][0])
    n = 20_000
    probs = dists.low_rank_mean_probabilities(loc, factor, diag, n, seed=[3, 3]).numpy()
    assert probs.shape == loc.shape
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
    mean = (loc[..., 1] - loc[..., 0]).astype("float64")
    var = ((factor[..., 1, :] - factor[..., 0, :]) ** 2).sum(-1) + diag[..., 0] + diag[..., 1]
    x, w = np.polynomial.hermite_e.hermegauss(120)
    w = w / w.sum()
    sig = special.expit(mean[..., None] + np.sqrt(var)[..., None] * x)
    expect = (sig * w).sum(-1)
    stderr = np.sqrt(((sig**2) * w).sum(-1) - expect**2) / np.sqrt(n)
    assert (np.abs(probs[..., 1] - expect) < 5 * stderr).all(), (probs[..., 1], expect)


@pytest.mark.parametrize("antithetic", [False, True])
def test_mean_probabilities_match_a_dense_reference(rng, antithetic):
    loc, factor, diag = _params(rng, h=2, w=2, c=4, factor_scale=0.8)
    n = 20_000
    probs = dists.low_rank_mean_probabilities(
        loc, factor, diag, n, seed=[8, 1], antithetic=antithetic
    ).numpy()[0]
    p = factor.reshape(-1, factor.shape[-1]).astype("float64")
    cov = p @ p.T + np.diag(diag.ravel())
    ref = np.random.default_rng(1).multivariate_normal(loc.ravel(), cov, size=4 * n)
    soft = special.softmax(ref.reshape(-1, 2, 2, 4), axis=-1)
    var = soft.var(0)
    # Antithetic pairs have at most the variance of independent samples: the bound holds.
    se = np.sqrt(var / n + var / len(soft)) + 1e-6
    assert (np.abs(probs - soft.mean(0)) < 5 * se).all()


def test_mean_probabilities_edge_cases(rng):
    head = LowRankLogits(3, rank=2)
    params = tf.constant(rng.normal(size=(2, 4, 4, head.params_size)).astype("float32"))
    odd = head.mean_probabilities(params, 3, seed=1).numpy()  # odd N: independent samples
    assert odd.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(odd.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(odd, head.mean_probabilities(params, 3, seed=1).numpy())
    with pytest.raises(ValueError, match="num_samples"):
        head.mean_probabilities(params, 0)
    loc = rng.choice([-1e4, 1e4], size=(1, 3, 3, 3)).astype("float32")
    loc[..., 0] = 2e4  # class 0 wins everywhere by >= 1e4
    probs = dists.low_rank_mean_probabilities(
        loc, np.zeros((1, 3, 3, 3, 2), "float32"), np.full((1, 3, 3, 3), 1e-6, "float32"), 4
    ).numpy()
    assert np.isfinite(probs).all()
    np.testing.assert_allclose(probs[..., 0], 1.0)
    ones = dists.low_rank_mean_probabilities(loc[..., :1], None, np.ones((1, 3, 3, 1)), 2)
    np.testing.assert_array_equal(ones.numpy(), np.ones((1, 3, 3, 1)))


@pytest.mark.parametrize("shape", [(4, 3, 5, 6, 3), (7, 10, 2), (3, 2, 4, 40), (2, 5, 1)])
def test_mean_softmax_matches_numpy(rng, shape):
    logits = (3 * rng.normal(size=shape)).astype("float32")
    logits[0, 0] = 1e4  # extreme, tied logits stay finite
    got = dists.mean_softmax(logits).numpy()
    assert got.shape == shape[1:]
    np.testing.assert_allclose(got, special.softmax(logits, axis=-1).mean(0), atol=1e-6)


@pytest.mark.parametrize("head", [LowRankLogits(12, rank=2), HeteroscedasticLogits(12)])
def test_many_classes_sample_through_the_logits(rng, head):
    # From 12 classes the per-plane samplers are slower (benchmarks/bench_sampling_ops.py), so
    # the heads use their logit samples: the same draws as sample_logits for the same seed.
    assert not dists.prefers_planar_sampling(12) and dists.prefers_planar_sampling(8)
    params = tf.constant(0.5 * rng.normal(size=(2, 3, 4, head.params_size)).astype("float32"))
    maps = head.sample_labels(params, 6, seed=[4, 2], antithetic=False).numpy()
    logits = head.sample_logits(params, 6, seed=[4, 2], antithetic=False).numpy()
    np.testing.assert_array_equal(maps, logits.argmax(-1))
    probs = head.mean_probabilities(params, 6, seed=[4, 2]).numpy()
    pairs = head.sample_logits(params, 6, seed=[4, 2], antithetic=head.antithetic).numpy()
    np.testing.assert_allclose(probs, special.softmax(pairs, -1).mean(0), atol=1e-6)
    odd = head.mean_probabilities(params, 3, seed=1).numpy()  # any N, as on the planar path
    np.testing.assert_allclose(odd.sum(-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("dtype", [tf.int8, tf.int32])
def test_raise_index_is_the_select_it_replaces(dtype):
    # `max(index, label * condition)` equals `where(condition, label, index)` whenever the
    # label is above every index, as in the plane-by-plane arg max and the last class.
    from tfp_seg.distributions.readouts import raise_index

    rng = np.random.default_rng(3)
    index = tf.constant(rng.integers(0, 4, size=(5, 7, 11)), dtype)
    condition = tf.constant(rng.random((5, 7, 11)) < 0.4)
    got = raise_index(index, condition, 4)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, tf.where(condition, tf.constant(4, dtype), index))
    assert set(np.unique(got.numpy())) == {0, 1, 2, 3, 4}  # both branches taken
