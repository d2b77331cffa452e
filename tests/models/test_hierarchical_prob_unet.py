"""Hierarchical Probabilistic U-Net: the latent hierarchy, its KL, sampling, training, saving."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tfp_seg.layers import HierarchicalLatent, SpatialLatentInjection
from tfp_seg.losses import ELBO
from tfp_seg.models import HierarchicalProbabilisticUNet, ProbabilisticUNet, UNet


def _np_scale(raw, eps):
    return np.logaddexp(0.0, raw.astype(np.float64) + np.log(np.expm1(1.0))) + eps


def _np_kl(mu_q, s_q, mu_p, s_p):
    """Closed-form KL of diagonal Gaussians, summed over every axis but the first."""
    terms = (s_q / s_p) ** 2 + ((mu_p - mu_q) / s_p) ** 2 - 1.0 + 2.0 * np.log(s_p / s_q)
    return 0.5 * terms.reshape(len(terms), -1).sum(-1)


def _small_model(**kwargs):
    kwargs.setdefault("latent_dim", 2)
    kwargs.setdefault("encoder_convs_per_block", 1)
    keras.utils.set_random_seed(kwargs.pop("init_seed", 3))
    return HierarchicalProbabilisticUNet(
        num_classes=3, backbone=UNet(base_filters=8, depth=2, norm="group"), **kwargs
    )


def _images(n=3, size=16, seed=0):
    return np.random.default_rng(seed).normal(size=(n, size, size, 1)).astype("float32")


# --- the latent hierarchy ----------------------------------------------------------------------
def test_levels_have_the_grids_of_the_coarsest_decoder_levels():
    layer = HierarchicalLatent(latent_dim=2, filters=(4, 8, 8, 8), latent_levels=3)
    x = _images(2, 16)
    params, z, features = layer.decode(layer.encode(x), seed=1)
    assert [tuple(p.shape) for p in params] == [(2, 2, 2, 4), (2, 4, 4, 4), (2, 8, 8, 4)]
    assert [tuple(t.shape) for t in z] == [(2, 2, 2, 2), (2, 4, 4, 2), (2, 8, 8, 2)]
    assert tuple(features.shape) == (2, 16, 16, 4) == layer.compute_output_shape(x.shape)
    assert layer.distribution(params).event_shape == [2 * (4 + 16 + 64)]
    # The posterior form stops at its finest latent level: h (8 channels) + z.
    posterior = HierarchicalLatent(2, (4, 8, 8, 8), 3, decode_to_full=False)
    out = posterior.decode(posterior.encode(x), mean=True)[2]
    assert tuple(out.shape) == (2, 8, 8, 10) == posterior.compute_output_shape(x.shape)


def test_a_level_is_conditioned_on_the_coarser_draws_only():
    """Teacher forcing: changing z_0 moves the parameters of levels 1 and 2, not of level 0;
    changing z_2 (the finest) moves no level's parameters, only the decoder's output."""
    layer = HierarchicalLatent(latent_dim=1, filters=(4, 8, 8, 8), latent_levels=3)
    levels = layer.encode(_images(2, 16))
    params, z, out = layer.decode(levels, seed=0)
    z0 = [z[0] + 1.0, z[1], z[2]]
    moved, _, _ = layer.decode(levels, z=z0)
    np.testing.assert_allclose(moved[0], params[0], atol=1e-6)
    assert np.abs(moved[1] - params[1]).max() > 1e-4
    assert np.abs(moved[2] - params[2]).max() > 1e-4
    finest = [z[0], z[1], z[2] + 1.0]
    same, _, other_out = layer.decode(levels, z=finest)
    for a, b in zip(same, params, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6)
    assert np.abs(other_out - out).max() > 1e-4
    # Feeding back the drawn latents reproduces the draw exactly.
    again, _, again_out = layer.decode(levels, z=z)
    np.testing.assert_allclose(again_out, out, atol=1e-6)


def test_draws_have_the_levels_moments_and_antithetic_pairs_mirror():
    """z_0 = mu_0 + sigma_0 eps over 4000 rows: sample mean within 4 standard errors of mu_0 and
    sample std within 5 % of sigma_0 (the std of a sample std is sigma / sqrt(2 n) = 1.1 %)."""
    layer = HierarchicalLatent(latent_dim=2, filters=(4, 8), latent_levels=2)
    levels = layer.encode(_images(1, 4, seed=2))
    n = 4000
    tiled = [tf.tile(t, [n, 1, 1, 1]) for t in levels]
    params, z, _ = layer.decode(tiled, seed=5)
    loc, scale = (np.asarray(t)[0] for t in layer.loc_and_scale(params[0]))
    draws = np.asarray(z[0])
    assert np.all(np.abs(draws.mean(0) - loc) <= 4 * scale / np.sqrt(n))
    np.testing.assert_allclose(draws.std(0), scale, rtol=0.05)
    # Level 1 given level 0: standardised residuals are N(0, 1).
    loc1, scale1 = (np.asarray(t) for t in layer.loc_and_scale(params[1]))
    residual = (np.asarray(z[1]) - loc1) / scale1
    assert abs(residual.mean()) < 4 / np.sqrt(residual.size)
    assert abs(residual.std() - 1.0) < 0.02
    # Antithetic: row n + N/2 draws the negated noise of row n at every level.
    params, z, _ = layer.decode([t[:8] for t in tiled], seed=1, antithetic=True)
    loc0, scale0 = layer.loc_and_scale(params[0])
    eps = (np.asarray(z[0]) - np.asarray(loc0)) / np.asarray(scale0)
    np.testing.assert_allclose(eps[:4], -eps[4:], atol=1e-5)
    loc1, scale1 = layer.loc_and_scale(params[1])
    eps1 = (np.asarray(z[1]) - np.asarray(loc1)) / np.asarray(scale1)
    np.testing.assert_allclose(eps1[:4], -eps1[4:], atol=1e-4)


def test_the_kl_is_the_sum_of_the_levels_closed_forms(rng):
    layer = HierarchicalLatent(latent_dim=3, filters=(4, 8, 8), latent_levels=2, epsilon=1e-3)
    q = [rng.normal(scale=2.0, size=(2, 2, 2, 6)), rng.normal(scale=2.0, size=(2, 4, 4, 6))]
    p = [rng.normal(scale=2.0, size=s.shape) for s in q]
    q, p = ([a.astype("float32") for a in t] for t in (q, p))
    kl = ELBO.kl_divergence(layer.distribution(q), layer.distribution(p)).numpy()
    expected = sum(
        _np_kl(a[..., :3], _np_scale(a[..., 3:], 1e-3), b[..., :3], _np_scale(b[..., 3:], 1e-3))
        for a, b in zip(q, p, strict=True)
    )
    np.testing.assert_allclose(kl, expected, rtol=1e-4)
    # Extreme parameters stay finite.
    big = [np.full_like(a, 1e4) * np.sign(rng.normal(size=a.shape)) for a in q]
    assert np.all(np.isfinite(ELBO.kl_divergence(layer.distribution(big), layer.distribution(p))))


def test_layer_arguments_and_input_errors_are_named():
    with pytest.raises(ValueError, match="latent_levels"):
        HierarchicalLatent(latent_levels=4, filters=(4, 8, 8))
    with pytest.raises(ValueError, match="filters"):
        HierarchicalLatent(filters=())
    with pytest.raises(ValueError, match="epsilon"):
        HierarchicalLatent(epsilon=0.0)
    layer = HierarchicalLatent(filters=(4, 8, 8))
    with pytest.raises(ValueError, match=r"height \(6\) must be divisible by .* 4"):
        layer.encode(_images(1, 6))
    with pytest.raises(ValueError, match="one latent per level"):
        layer.decode(layer.encode(_images(1, 8)), z=[tf.zeros((1, 2, 2, 2))])
    revived = HierarchicalLatent.from_config(layer.get_config())
    assert revived.get_config() == layer.get_config()


def test_spatial_injection_split_first_layer_equals_a_loop(rng):
    f_comb = SpatialLatentInjection(3, filters=5, num_convs=2)
    features = rng.normal(size=(2, 4, 4, 6)).astype("float32")
    g = rng.normal(size=(3 * 2, 4, 4, 7)).astype("float32")  # rows n * B + b
    f_comb(features, g[:2])
    got = f_comb.sample_logits(features, g).numpy()
    for n in range(3):
        np.testing.assert_allclose(got[n], f_comb(features, g[2 * n : 2 * n + 2]), atol=1e-5)


# --- the model ---------------------------------------------------------------------------------
def test_default_encoder_is_the_backbones_levels_and_one_coarser():
    model = _small_model()
    assert model.encoder_filters == [8, 16, 32, 32]
    assert model.prior_net.latent_levels == 3 and model.posterior_net.decode_to_full is False
    assert isinstance(model, ProbabilisticUNet)
    with pytest.raises(ValueError, match="latent_levels"):
        _small_model(latent_levels=5)


def test_elbo_terms_are_the_posterior_draw_scored_by_the_prior_decoder():
    """The model's ELBO equals its pieces recomputed: the posterior's draw (same seed), the
    prior decoder fed that draw, f_comb, the cross-entropy and the levels' closed-form KL."""
    model = _small_model()
    x = _images(2)
    y = np.random.default_rng(1).integers(0, 3, size=(2, 16, 16)).astype("int32")
    terms = model.elbo_terms(x, y, seed=4)
    onehot = tf.one_hot(y, 3)
    posterior_levels = model.posterior_net.encode(tf.concat([x, onehot], -1))
    q_params, z, _ = model.posterior_net.decode(posterior_levels, seed=4)
    p_params, _, g = model.prior_net.decode(model.prior_net.encode(x), z=z)
    logits = np.asarray(model.f_comb(model.backbone(x), g), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    rec = -np.take_along_axis(logp, y[..., None], -1)[..., 0].sum((1, 2))
    kl = 0.0
    for a, b in zip(q_params, p_params, strict=True):
        mq, sq = (np.asarray(t, np.float64) for t in model.posterior_net.loc_and_scale(a))
        mp, sp = (np.asarray(t, np.float64) for t in model.prior_net.loc_and_scale(b))
        kl = kl + _np_kl(mq, sq, mp, sp)
    np.testing.assert_allclose(terms["reconstruction"], rec.mean(), rtol=1e-4)
    np.testing.assert_allclose(terms["kl"], kl.mean(), rtol=1e-4)
    np.testing.assert_allclose(terms["loss"], rec.mean() + kl.mean(), rtol=1e-4)


def test_label_sets_are_every_image_rater_pair():
    model = _small_model()
    x = _images(2)
    labels = np.random.default_rng(2).integers(0, 3, size=(2, 3, 16, 16)).astype("int32")
    got = model.elbo_terms(x, labels, seed=11)
    pairs = model.elbo_terms(np.repeat(x, 3, axis=0), labels.reshape(-1, 16, 16), seed=11)
    for key in ("loss", "reconstruction", "kl"):
        np.testing.assert_allclose(got[key], pairs[key], rtol=1e-5)


def test_readouts_shapes_seeds_and_one_backbone_pass():
    model = _small_model()
    x = _images(3)
    assert model(x).shape == (3, 16, 16, 3)
    s = model.sample_logits(x, 4, seed=7)
    assert s.shape == (4, 3, 16, 16, 3)
    np.testing.assert_array_equal(s, model.sample_logits(x, 4, seed=7))
    assert np.abs(s[0] - s[1]).max() > 1e-4
    assert model.sample(x, 4, seed=0).shape == (4, 3, 16, 16)
    probs = model.predict_proba(x, 4, seed=0)
    np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
    y = np.zeros((3, 16, 16), "int32")
    assert model.prior(x).event_shape == [2 * (4 + 16 + 64)]
    assert model.posterior(x, y).batch_shape == [3]
    assert model.reconstruct(x, y).shape == (3, 16, 16, 3)
    calls = []
    original = model.backbone.call
    model.backbone.call = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        model.sample_logits(x, 8, batch_size=None)
    finally:
        model.backbone.call = original
    assert len(calls) == 1
    with pytest.raises(ValueError, match="divisible"):
        model(_images(1, 12))


def test_fit_moves_every_weight_and_lowers_the_loss():
    model = _small_model()
    x = _images(8, seed=3)
    y = (x[..., 0] > 0).astype("int32")  # a learnable target: the sign of the image
    model(x[:1])
    model.compile(optimizer=keras.optimizers.Adam(3e-3))
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, y, batch_size=4, epochs=8, verbose=0).history
    assert history["loss"][-1] < history["loss"][0]
    assert all(np.isfinite(history["kl"])) and min(history["kl"]) >= 0
    unmoved = [
        w.path
        for a, w in zip(before, model.trainable_weights, strict=True)
        if np.array_equal(a, w.numpy())
    ]
    assert not unmoved, unmoved


def test_save_and_load_give_the_same_outputs_and_samples(tmp_path):
    model = _small_model(latent_levels=2, beta=0.5)
    x = _images(2)
    model.compile(optimizer="adam")
    model.fit(x, np.zeros((2, 16, 16), "int32"), epochs=1, verbose=0)
    path = str(tmp_path / "hpu.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded, HierarchicalProbabilisticUNet)
    assert loaded.latent_levels == 2 and loaded.beta == 0.5
    np.testing.assert_allclose(loaded(x), model(x), atol=1e-5)
    np.testing.assert_allclose(
        loaded.sample_logits(x, 3, seed=2), model.sample_logits(x, 3, seed=2), atol=1e-5
    )


def test_volumes():
    keras.utils.set_random_seed(1)
    model = HierarchicalProbabilisticUNet(
        2,
        latent_levels=2,
        backbone=UNet(base_filters=4, depth=1, spatial_dims=3),
        encoder_convs_per_block=1,
        spatial_dims=3,
    )
    x = np.random.default_rng(0).normal(size=(2, 8, 8, 8, 1)).astype("float32")
    y = (x[..., 0] > 0).astype("int32")
    model.compile(optimizer="adam")
    history = model.fit(x, y, epochs=2, verbose=0).history
    assert np.all(np.isfinite(history["loss"]))
    assert model.sample_logits(x, 3, seed=0).shape == (3, 2, 8, 8, 8, 2)
    assert model.prior_net.encoder_blocks[0][0].kernel.shape == (3, 3, 3, 1, 4)
