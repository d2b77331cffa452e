"""Sliding-window inference (`tfp_seg.models.sliding`): stitched parameters, and samples of the
stitched distribution with ONE low-rank `z` per volume (issue 17, item 4).

The models here have a backbone of "same" 3x3x3 convolutions (receptive-field radius 2) and
windows overlapping by 4 voxels (owned blocks at least 2 voxels inside their windows), so the
stitched parameters equal one pass over the whole volume and the samples must equal the one-pass
samples for the same seed.
"""

import itertools

import keras
import numpy as np
import pytest

from tfp_seg import distributions as dists
from tfp_seg.evaluation import evaluate_annotations
from tfp_seg.layers import (
    CategoricalLogits,
    HeteroscedasticLogits,
    LowRankLogits,
    MixtureLowRankLogits,
)
from tfp_seg.models import (
    DeepEnsemble,
    ProbabilisticSegmenter,
    ProbabilisticUNet,
    SlidingWindowSampler,
    UNet,
    sliding_window_params,
)
from tfp_seg.models.sliding import _axis_plan

C = 3
WINDOW, OVERLAP = 8, 4

HEADS = {
    "low_rank": lambda dims=3: LowRankLogits(C, rank=4, spatial_dims=dims),
    "heteroscedastic": lambda dims=3: HeteroscedasticLogits(C, spatial_dims=dims),
    "heteroscedastic_classes": lambda dims=3: HeteroscedasticLogits(
        C, low_rank_classes=2, spatial_dims=dims
    ),
    "categorical": lambda dims=3: CategoricalLogits(C, spatial_dims=dims),
}


def _model(head, dims=3, layers=2, kernel=3, channels=1, seed=0):
    """Backbone: `layers` "same" convolutions of size `kernel` (radius layers * (kernel-1)/2),
    built for any spatial size."""
    keras.utils.set_random_seed(seed)
    conv = keras.layers.Conv3D if dims == 3 else keras.layers.Conv2D
    backbone = keras.Sequential(
        [conv(6, kernel, padding="same", activation="tanh") for _ in range(layers)]
    )
    model = ProbabilisticSegmenter(backbone, head)
    model.build((None,) * (dims + 1) + (channels,))
    return model


def _volume(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


# --- the plan ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "size, window, overlap",
    [(s, w, o) for s in (1, 5, 8, 13, 30) for w in (1, 4, 8) for o in range(w)],
)
def test_each_voxel_is_owned_by_the_window_where_it_is_most_central(size, window, overlap):
    plan = _axis_plan(size, window, overlap)
    length = max(size, window)
    starts = [s for s, _, _ in plan]
    assert starts[0] == 0 and starts[-1] == length - window
    assert all(b - a <= window - overlap for a, b in zip(starts, starts[1:], strict=False))
    owned = np.concatenate([np.arange(lo, hi) for _, lo, hi in plan])
    np.testing.assert_array_equal(owned, np.arange(size))  # a partition of the axis, in order
    for j, (start, lo, hi) in enumerate(plan):
        assert start <= lo < hi <= start + window
        if j > 0:  # not the volume's border: at least floor(overlap / 2) window voxels beyond
            assert lo - start >= overlap // 2
        if j < len(plan) - 1:
            assert start + window - hi >= overlap // 2
        for i in range(lo, hi):  # the nearest centre (ties: the lower window)
            distances = [abs(2 * i - (2 * s + window - 1)) for s in starts]
            assert j == int(np.argmin(distances))


# --- stitched = one pass -----------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(HEADS))
def test_sliding_window_sampling_equals_one_pass_sampling(name):
    model = _model(HEADS[name]())
    x = _volume((2, 13, 11, 9, 1))  # no axis a multiple of the stride 4
    full = model(x).numpy()
    params = sliding_window_params(model, x, WINDOW, OVERLAP, batch_size=5)
    assert params.shape == full.shape and params.dtype == np.float32
    np.testing.assert_allclose(params, full, atol=1e-5)

    sampler = SlidingWindowSampler(model, WINDOW, OVERLAP, window_batch_size=5, sample_chunk=8)
    for antithetic in (False, True):
        got = sampler.sample_logits(x, 4, seed=7, batch_size=None, antithetic=antithetic)
        want = model.sample_logits(x, 4, seed=7, batch_size=None, antithetic=antithetic)
        assert got.shape == (4, 2, 13, 11, 9, C)
        np.testing.assert_allclose(got, want, atol=1e-4)
    # per-volume batches: the Sampler base's seeds per batch, the same for both
    np.testing.assert_allclose(
        sampler.probability_samples(x, 4, seed=1, batch_size=1),
        model.probability_samples(x, 4, seed=1, batch_size=1),
        atol=1e-5,
    )
    np.testing.assert_allclose(
        sampler.predict_proba(x, 6, seed=2), model.predict_proba(x, 6, seed=2), atol=1e-5
    )
    labels = sampler.sample(x, 4, seed=3)
    assert labels.shape == (4, 2, 13, 11, 9) and labels.dtype == np.int32
    # the same draws up to float ties of the arg max
    assert np.mean(labels == model.sample(x, 4, seed=3)) > 0.999


def test_two_dimensional_images():
    model = _model(LowRankLogits(C, rank=3), dims=2, channels=2)
    x = _volume((2, 21, 17, 2))
    np.testing.assert_allclose(
        sliding_window_params(model, x, (8, 6), (4, 4)), model(x).numpy(), atol=1e-5
    )
    sampler = SlidingWindowSampler(model, (8, 6), (4, 4))
    np.testing.assert_allclose(
        sampler.sample_logits(x, 4, seed=0), model.sample_logits(x, 4, seed=0), atol=1e-4
    )


def test_roi_mask_is_cut_into_the_windows():
    model = _model(LowRankLogits(C, rank=2, spatial_dims=3))
    images = _volume((2, 13, 9, 10, 1))
    mask = np.zeros(images.shape[:-1], "float32")
    mask[:, 2:11, 1:8, 3:9] = 1.0
    x = {"images": images, "roi_mask": mask}
    params = sliding_window_params(model, x, WINDOW, OVERLAP)
    np.testing.assert_allclose(params, model(x).numpy(), atol=1e-5)
    assert np.abs(params - model(images).numpy()).max() > 1e-3  # the mask made a difference
    sampler = SlidingWindowSampler(model, WINDOW, OVERLAP)
    np.testing.assert_allclose(
        sampler.sample_logits({"images": images, "roi_mask": mask[..., None]}, 2, seed=4),
        model.sample_logits(x, 2, seed=4),
        atol=1e-4,
    )


@pytest.mark.parametrize("pad_mode", ["constant", "edge", "reflect"])
def test_windows_larger_than_the_volume_are_padded(pad_mode):
    # a pointwise model: the padded voxels cannot reach the volume's voxels
    model = _model(LowRankLogits(C, rank=2, spatial_dims=3), layers=1, kernel=1)
    x = _volume((1, 5, 12, 3, 1))  # D and W shorter than the window
    np.testing.assert_allclose(
        sliding_window_params(model, x, WINDOW, 2, pad_mode=pad_mode), model(x).numpy(), atol=1e-5
    )


def test_the_model_sees_windows_of_the_size_it_needs():
    # a U-Net takes sizes divisible by 2 only; the windows (8) are, the volume (5, 7, 6) is not
    keras.utils.set_random_seed(0)
    model = ProbabilisticSegmenter(
        UNet(base_filters=4, depth=1, spatial_dims=3), LowRankLogits(C, rank=2, spatial_dims=3)
    )
    x = _volume((1, 5, 7, 6, 1))
    params = sliding_window_params(model, x, 8)
    assert params.shape == (1, 5, 7, 6, model.head.params_size)
    assert np.all(np.isfinite(params))
    samples = SlidingWindowSampler(model, 8).sample(x, 2, seed=0)
    assert samples.shape == (2, 1, 5, 7, 6)


# --- the shared z ------------------------------------------------------------------------------
def test_far_apart_voxels_in_different_windows_covary_as_the_stitched_distribution():
    head = LowRankLogits(2, rank=2, spatial_dims=3)
    model = _model(head, layers=1)
    x = _volume((1, 16, 8, 8, 1))
    # factor ~ 1 and diagonal ~ e^-4 at every voxel: strong long-range correlation
    c, r = 2, 2
    bias = np.concatenate([np.zeros(c), np.full(c, -4.0), np.ones(c * r)]).astype("float32")
    head.projection.bias.assign(bias)
    head.projection.kernel.assign(0.1 * head.projection.kernel.numpy())
    sampler = SlidingWindowSampler(model, WINDOW, OVERLAP, sample_chunk=500)
    n = 4000
    samples = sampler.sample_logits(x, n, seed=11)  # 8 chunks of 500
    loc, factor, diag = (t.numpy()[0] for t in head.covariance_parts(sampler.params(x)))
    u, v = (0, 0, 0, 0), (15, 7, 7, 1)  # windows 0 and 2 along D (starts 0, 4, 8), class 0 / 1
    assert u[0] < 6 and v[0] >= 10  # owned by different windows
    cov = float(factor[u] @ factor[v])  # P_u P_v^T
    var_u = float(diag[u] + factor[u] @ factor[u])
    var_v = float(diag[v] + factor[v] @ factor[v])
    a, b = samples[(slice(None), 0) + u], samples[(slice(None), 0) + v]
    # sample covariance: standard error sqrt(var_u var_v + cov^2) / sqrt(n); 5 sigma
    bound = 5.0 * np.sqrt(var_u * var_v + cov**2) / np.sqrt(n)
    assert abs(np.cov(a, b)[0, 1] - cov) < bound
    # a z per window has covariance 0 there: its estimate would miss `cov` by > 2 bounds
    assert abs(cov) > 3 * bound
    assert abs(a.mean() - loc[u]) < 5.0 * np.sqrt(var_u / n)
    assert abs(a.var() - var_u) < 5.0 * np.sqrt(2.0) * var_u / np.sqrt(n)


def test_sample_chunks_are_seeded_and_distinct():
    model = _model(LowRankLogits(C, rank=2, spatial_dims=3), layers=1)
    x = _volume((1, 12, 8, 8, 1))
    sampler = SlidingWindowSampler(model, WINDOW, OVERLAP, sample_chunk=2)
    first = sampler.sample_logits(x, 6, seed=5)
    np.testing.assert_array_equal(first, sampler.sample_logits(x, 6, seed=5))
    # chunk 0 is the one-pass draw of 2 samples with the seed itself
    head_draw = model.head.sample_logits(sampler.params(x), 2, seed=5, antithetic=False)
    np.testing.assert_allclose(first[:2], head_draw.numpy(), atol=1e-5)
    for i, j in itertools.combinations(range(6), 2):
        assert np.abs(first[i] - first[j]).max() > 1e-2
    assert np.abs(first - sampler.sample_logits(x, 6, seed=6)).max() > 1e-2
    pairs = sampler.sample_logits(x, 6, seed=5, antithetic=True)  # mirrored within each chunk
    mean = model.head.mean_logits(sampler.params(x)).numpy()[None]
    np.testing.assert_allclose(pairs[0::2] + pairs[1::2], 2 * np.repeat(mean, 3, 0), atol=1e-4)


def test_mixture_draws_one_component_per_volume():
    k = 3
    head = MixtureLowRankLogits(2, num_components=k, rank=2, spatial_dims=3)
    model = _model(head, layers=1)
    x = _volume((1, 12, 8, 8, 1))
    # well separated component means (class-0 logit 4 k), tiny noise
    q = head.component_size
    bias = np.zeros(k * q, "float32")
    for j in range(k):
        bias[j * q] = 4.0 * j
        bias[j * q + 2 : j * q + 4] = -8.0
    head.projection.bias.assign(bias)
    head.projection.kernel.assign(0.01 * head.projection.kernel.numpy())
    full = model(x).numpy()
    params = sliding_window_params(model, x, WINDOW, OVERLAP)
    np.testing.assert_allclose(
        head.component_params(params).numpy(), head.component_params(full).numpy(), atol=1e-5
    )
    # windows at D = 0 and 4 own 6 voxels each: the volume's gate is the mean of theirs
    gates = [model(x[:, s : s + WINDOW]).numpy()[0, 0, 0, 0, -k:] for s in (0, 4)]
    np.testing.assert_allclose(
        params[..., -k:], np.broadcast_to(np.mean(gates, 0), (1, 12, 8, 8, k)), atol=1e-5
    )
    samples = SlidingWindowSampler(model, WINDOW, OVERLAP, sample_chunk=64).sample_logits(
        x, 600, seed=3
    )
    component = np.rint(samples[..., 0] / 4.0).astype(int)  # [N, 1, D, H, W]
    assert np.all(component == component[:, :, :1, :1, :1])  # one k for every voxel
    weights = head.mixture_weights(params).numpy()[0]
    freq = np.bincount(component[:, 0, 0, 0, 0], minlength=k) / 600
    assert np.all(np.abs(freq - weights) < 5 * np.sqrt(weights * (1 - weights) / 600) + 1e-9)


# --- the Sampler contract ----------------------------------------------------------------------
def test_evaluate_annotations_accepts_it_and_scores_the_one_pass_samples():
    model = _model(LowRankLogits(C, rank=2, spatial_dims=3), layers=1)
    x = _volume((2, 12, 8, 8, 1))
    annotations = np.random.default_rng(1).integers(0, C, size=(2, 2, 12, 8, 8))
    sampler = SlidingWindowSampler(model, WINDOW, OVERLAP)
    kwargs = dict(num_samples=4, seed=0, batch_size=1, sample_counts=(4,))
    report = evaluate_annotations(sampler, x, annotations, **kwargs)
    reference = evaluate_annotations(model, x, annotations, **kwargs)
    for key in ("ged", "hm_iou", "nll", "ece", "miou"):
        assert np.isfinite(report[key])
        assert report[key] == pytest.approx(reference[key], abs=1e-4), key


def test_distribution_of_the_stitched_parameters():
    model = _model(LowRankLogits(C, rank=2, spatial_dims=3), layers=1)
    x = _volume((1, 12, 8, 8, 1))
    sampler = SlidingWindowSampler(model, WINDOW, OVERLAP)
    dist = sampler.distribution(x)
    assert tuple(dist.event_shape) == (12, 8, 8, C)
    np.testing.assert_allclose(dist.mean().numpy(), model.distribution(x).mean().numpy(), atol=1e-5)
    assert sampler.num_classes == C and sampler.spatial_dims == 3
    assert dists.argmax_classes(sampler.sample_logits(x, 1, seed=0)).shape == (1, 1, 12, 8, 8)


# --- bad arguments -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(window=0), "window"),
        (dict(window=-4), "window"),
        (dict(window=(8, 8)), "window"),
        (dict(window=(8, 8, 8, 8)), "window"),
        (dict(window=8.0), "window"),
        (dict(window=True), "window"),
        (dict(window="8"), "window"),
        (dict(window=8, overlap=8), "overlap"),
        (dict(window=(8, 8, 4), overlap=4), "overlap"),
        (dict(window=8, overlap=-1), "overlap"),
        (dict(window=8, overlap=(2, 2)), "overlap"),
        (dict(window=8, window_batch_size=0), "window_batch_size"),
        (dict(window=8, sample_chunk=0), "sample_chunk"),
        (dict(window=8, pad_mode="wrap"), "pad_mode"),
    ],
)
def test_bad_window_arguments_name_the_argument(kwargs, name):
    model = _model(CategoricalLogits(C, spatial_dims=3), layers=1)
    with pytest.raises(ValueError, match=f"`{name}`"):
        SlidingWindowSampler(model, **kwargs)


def test_bad_volumes_and_models():
    model = _model(CategoricalLogits(C, spatial_dims=3), layers=1)
    with pytest.raises(ValueError, match="`volume` must have rank 5"):
        sliding_window_params(model, np.zeros((1, 8, 8, 1), "float32"), 8)
    with pytest.raises(ValueError, match="`batch_size`"):
        sliding_window_params(model, np.zeros((1, 8, 8, 8, 1), "float32"), 8, batch_size=0)
    with pytest.raises(ValueError, match="`x` must have rank 5"):
        SlidingWindowSampler(model, 8).sample(np.zeros((1, 8, 8, 1), "float32"), 2)
    with pytest.raises(ValueError, match="roi_mask"):
        sliding_window_params(
            model, {"images": np.zeros((1, 8, 8, 8, 1)), "roi_mask": np.zeros((1, 8, 8))}, 8
        )
    prob_unet = ProbabilisticUNet(
        2, latent_dim=2, backbone=UNet(base_filters=4, depth=1, spatial_dims=3), spatial_dims=3
    )
    with pytest.raises(ValueError, match="ProbabilisticUNet: its latent z comes from a prior"):
        SlidingWindowSampler(prob_unet, 8)
    with pytest.raises(ValueError, match="`model` must be a tfp_seg.models.ProbabilisticSeg"):
        SlidingWindowSampler(DeepEnsemble([model, _model(CategoricalLogits(C, spatial_dims=3))]), 8)
