"""Tests for `ControlledSampler` (a model's samples from its controlled distribution) and
`CovarianceTemperature` (the covariance temperature chosen on annotated images by GED)."""

import keras
import numpy as np
import pytest

from tfp_seg import layers, models, protocols
from tfp_seg.calibration import (
    ControlledSampler,
    CovarianceTemperature,
    scale_class_covariance,
    with_temperature,
)
from tfp_seg.calibration.controlled import unbiased_ged
from tfp_seg.evaluation import evaluate_ambiguous
from tfp_seg.metrics import generalized_energy_distance


def _model(head, size=8, seed=0):
    keras.utils.set_random_seed(seed)
    model = models.ProbabilisticSegmenter(models.UNet(base_filters=4, depth=1), head)
    model.build((None, size, size, 1))
    return model


def _images(n=3, size=8, seed=0):
    return np.random.default_rng(seed).uniform(size=(n, size, size, 1)).astype(np.float32)


def test_temperature_one_draws_exactly_the_models_samples():
    model = _model(layers.LowRankLogits(2, rank=2))
    x = _images()
    sampler = ControlledSampler(model)
    np.testing.assert_array_equal(
        sampler.sample_logits(x, 4, seed=3, batch_size=2),
        model.sample_logits(x, 4, seed=3, batch_size=2),
    )
    np.testing.assert_array_equal(sampler.sample(x, 4, seed=3), model.sample(x, 4, seed=3))
    np.testing.assert_allclose(
        sampler.predict_proba(x, 8, seed=1), model.predict_proba(x, 8, seed=1), atol=1e-6
    )
    assert sampler.default_num_samples == model.default_num_samples
    assert sampler.input_spatial_dims == 2
    assert isinstance(sampler, protocols.Sampler)  # what evaluation, plots and the CLI take


def test_read_outs_draw_from_the_controlled_params():
    """Every read-out equals the head's draw from `with_temperature(scale_class_covariance(..))`
    of the model's params, for the same seed (the mean stays the model's)."""
    head = layers.LowRankLogits(3, rank=2)
    model = _model(head)
    x = _images(n=2)
    sampler = ControlledSampler(model, temperature=2.5, class_scales={1: 0.5})
    params = with_temperature(
        scale_class_covariance(model(x, training=False), head, {1: 0.5}), head, 2.5
    )
    np.testing.assert_allclose(
        sampler.sample_logits(x, 4, seed=5, batch_size=None),
        head.sample_logits(params, 4, seed=5, antithetic=False).numpy(),
        atol=1e-5,
    )
    np.testing.assert_array_equal(
        sampler.sample(x, 4, seed=5, batch_size=None),
        head.sample_labels(params, 4, seed=5, antithetic=False).numpy(),
    )
    np.testing.assert_allclose(
        head.mean_logits(sampler.control(model(x, training=False))).numpy(),
        head.mean_logits(model(x, training=False)).numpy(),
    )
    # and the control is not the identity
    assert not np.allclose(
        sampler.sample_logits(x, 4, seed=5), model.sample_logits(x, 4, seed=5), atol=1e-3
    )


def test_sample_moments_match_the_scaled_analytic_covariance():
    """N = 6000 logit samples of one 4x4 image (32 logits): the sample covariance is
    `t S Sigma S` of the model's analytic Sigma, every entry within 5 standard errors
    (se_ij = sqrt((Sigma_ii Sigma_jj + Sigma_ij^2) / N) for Gaussian samples), and the mean is
    the model's within 5 standard errors; the unscaled Sigma is rejected by the same test."""
    head = layers.LowRankLogits(2, rank=2, antithetic=False)
    model = _model(head, size=4)
    x = _images(n=1, size=4, seed=2)
    t, scales = 2.5, np.array([1.0, 0.5])
    n = 6000
    samples = ControlledSampler(model, temperature=t, class_scales=scales).sample_logits(
        x, n, seed=11
    )
    flat = samples.reshape(n, -1).astype(np.float64)  # [N, H*W*C], class fastest
    params = model(x, training=False)
    sigma = head.distribution(params).covariance().numpy()[0].astype(np.float64)
    s = np.tile(scales, flat.shape[1] // 2)
    expected = t * np.outer(s, s) * sigma
    emp = np.cov(flat, rowvar=False)

    def z_max(target):
        se = np.sqrt((np.outer(np.diag(target), np.diag(target)) + target**2) / n)
        return np.max(np.abs(emp - target) / se)

    assert z_max(expected) < 5.0
    assert z_max(sigma) > 10.0  # the test can fail: the model's own covariance is rejected
    mean = head.mean_logits(params).numpy().reshape(-1)
    se_mean = np.sqrt(np.diag(expected) / n)
    assert np.max(np.abs(flat.mean(0) - mean) / se_mean) < 5.0


def test_mixture_temperatures_per_component():
    head = layers.MixtureLowRankLogits(2, num_components=2, rank=2)
    model = _model(head)
    x = _images(n=2)
    sampler = ControlledSampler(model, temperature=(0.5, 2.0))
    assert sampler.temperature == (0.5, 2.0)
    params = with_temperature(model(x, training=False), head, (0.5, 2.0))
    np.testing.assert_allclose(
        sampler.sample_logits(x, 3, seed=2, batch_size=None),
        head.sample_logits(params, 3, seed=2, antithetic=False).numpy(),
        atol=1e-5,
    )


def test_unbiased_ged_is_the_u_statistic():
    rng = np.random.default_rng(0)
    samples = rng.integers(0, 2, size=(2, 5, 6, 6))
    refs = rng.integers(0, 2, size=(2, 3, 6, 6))
    got = unbiased_ged(samples, refs, 2)
    v = generalized_energy_distance(samples, refs, 2, return_terms=True)
    # direct U-statistic over distinct pairs
    from tfp_seg.metrics import pairwise_iou_distance

    u = np.mean(
        [
            (lambda d: (d.sum() - np.trace(d)) / (5 * 4))(
                pairwise_iou_distance(samples[i], samples[i], 2)
            )
            for i in range(2)
        ]
    )
    np.testing.assert_allclose(got["sample_diversity"], u, rtol=1e-12)
    np.testing.assert_allclose(
        got["ged"], 2 * v["cross"] - u - v["reference_diversity"], rtol=1e-12
    )
    assert got["ged"] < v["ged"]  # V's self-pairs bias the diversity low, the GED high
    with pytest.raises(ValueError, match="N >= 2"):
        unbiased_ged(samples[:, :1], refs, 2)


def test_fit_recovers_the_temperature_of_the_annotations():
    """Annotations drawn from the model itself at t0 = 2 (32 'raters' per image, another
    seed): the GED over the grid is lowest at 2, and ordered around it."""
    model = _model(layers.LowRankLogits(2, rank=3), size=8, seed=4)
    x = _images(n=6, seed=5)
    raters = ControlledSampler(model, temperature=2.0).sample(x, 32, seed=99)
    fitted = CovarianceTemperature(temperatures=(0.5, 2.0, 8.0), num_samples=32, seed=1).fit(
        model, x, np.moveaxis(raters, 0, 1)
    )
    assert fitted.temperatures == (0.5, 1.0, 2.0, 8.0)  # 1.0 added
    g = fitted.ged_by_temperature
    assert fitted.temperature == 2.0, g
    assert g[0.5] > g[1.0] > g[2.0] < g[8.0], g
    assert fitted.ged_before == g[1.0] and fitted.ged_after == g[2.0]
    assert set(fitted.terms_by_temperature[2.0]) == {
        "ged",
        "cross",
        "sample_diversity",
        "reference_diversity",
    }
    # the fitted sampler samples at t*
    wrapped = fitted.wrap(model)
    assert isinstance(wrapped, ControlledSampler) and wrapped.temperature == 2.0
    params = model(x[:1], training=False)
    np.testing.assert_allclose(
        fitted.scale_params(params, model.head).numpy(),
        with_temperature(params, model.head, 2.0).numpy(),
    )


def test_fit_takes_weighted_exact_modes_and_the_wrapper_evaluates(shapes):
    """On the built-in benchmark (exact modes with weights): fit runs, and `evaluate_ambiguous`
    scores a `ControlledSampler` at t = 1 exactly as it scores the model."""
    model = _model(layers.LowRankLogits(shapes.num_classes, rank=2), size=16)
    fitted = CovarianceTemperature(temperatures=(0.5, 2.0), num_samples=4, seed=0).fit(
        model, shapes.images, shapes.modes, reference_weights=shapes.mode_weights
    )
    assert all(np.isfinite(v) for v in fitted.ged_by_temperature.values())
    assert fitted.temperature in (0.5, 1.0, 2.0)
    ours = evaluate_ambiguous(ControlledSampler(model), shapes, num_samples=4, seed=2)
    theirs = evaluate_ambiguous(model, shapes, num_samples=4, seed=2)
    assert ours == theirs


def test_bad_arguments_name_what_is_wrong():
    cat = _model(layers.CategoricalLogits(2))
    with pytest.raises(ValueError, match="`model`'s head.*covariance head"):
        ControlledSampler(cat)
    with pytest.raises(ValueError, match="`model` must be a trained tfp_seg model"):
        ControlledSampler(object())
    ssn = _model(layers.LowRankLogits(2, rank=2))
    with pytest.raises(ValueError, match="`t` must be finite and > 0"):
        ControlledSampler(ssn, temperature=0.0)
    with pytest.raises(ValueError, match="`class_scales` must have one entry per class"):
        ControlledSampler(ssn, class_scales=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="`temperatures` must be a non-empty"):
        CovarianceTemperature(temperatures=(1.0, -2.0))
    with pytest.raises(ValueError, match="`temperatures` must not repeat"):
        CovarianceTemperature(temperatures=(2.0, 2))
    with pytest.raises(ValueError, match="`num_samples` must be >= 2"):
        CovarianceTemperature(num_samples=1)
    with pytest.raises(ValueError, match="`seed` must be an int or a pair"):
        CovarianceTemperature(seed=None)
    x = _images(n=3)
    with pytest.raises(ValueError, match=r"`annotations` must have shape \[B, K, \*S\] with B = 3"):
        CovarianceTemperature(num_samples=2).fit(ssn, x, np.zeros((2, 4, 8, 8), int))


def test_an_unbuilt_model_builds_eagerly_and_the_control_is_read_only():
    keras.utils.set_random_seed(0)
    model = models.ProbabilisticSegmenter(
        models.UNet(base_filters=4, depth=1), layers.LowRankLogits(2, rank=2)
    )
    sampler = ControlledSampler(model, temperature=0.5, class_scales=[1.0, 2.0])
    assert not sampler.built
    x = _images(n=2)
    first = sampler.sample_logits(x, 2, seed=0)  # builds the model, eagerly
    assert sampler.built and first.shape == (2, 2, 8, 8, 2)
    np.testing.assert_allclose(sampler.sample_logits(x, 2, seed=0), first, atol=1e-5)
    with pytest.raises(AttributeError):
        sampler.temperature = 2.0
    sampler.class_scales[1] = 5.0  # a copy: the control is unchanged
    np.testing.assert_array_equal(sampler.class_scales, [1.0, 2.0])


def test_fit_draws_are_the_wrapped_samplers_draws():
    """`fit` runs the model once per batch for the whole grid, yet each temperature's GED is
    the GED of `wrap(model).sample(images, N, seed, batch_size)` (the same batch seeds), with
    uneven batches and per-image reference weights; class scales carry over to the wrapper."""
    head = layers.LowRankLogits(3, rank=2)
    model = _model(head, seed=7)
    x = _images(n=5, seed=8)
    rng = np.random.default_rng(9)
    refs = rng.integers(0, 3, size=(5, 3, 8, 8))
    weights = rng.dirichlet(np.ones(3), size=5)
    fitted = CovarianceTemperature(temperatures=(0.5, 3.0), num_samples=6, seed=4, batch_size=2)
    fitted.fit(model, x, refs, reference_weights=weights, class_scales={2: 2.0})
    wrapped = fitted.wrap(model)
    np.testing.assert_array_equal(wrapped.class_scales, [1.0, 1.0, 2.0])
    labels = wrapped.sample(x, 6, seed=4, batch_size=2)
    direct = unbiased_ged(np.moveaxis(labels, 0, 1), refs, 3, reference_weights=weights)
    np.testing.assert_allclose(fitted.ged_after, direct["ged"], rtol=1e-9)
    np.testing.assert_allclose(
        fitted.terms_by_temperature[fitted.temperature]["cross"], direct["cross"], rtol=1e-9
    )
    params = model(x[:1], training=False)
    np.testing.assert_allclose(
        fitted.scale_params(params, head).numpy(), wrapped.control(params).numpy()
    )
