"""`UNet(ensemble="batch" | "packed")` and `EnsembleSegmenter`: members equal explicit
networks, train as one model against the same labels, differ after training, and are the
samples of the model-level sampler."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import helpers
from tfp_seg import protocols
from tfp_seg.layers import (
    BatchEnsembleConv,
    CategoricalLogits,
    HeteroscedasticLogits,
    LowRankLogits,
    PackedConv,
)
from tfp_seg.models import EnsembleSegmenter, UNet

C = 3
B = 2
X = np.random.default_rng(0).normal(size=(B, 16, 16, 1)).astype("float32")
Y = np.random.default_rng(1).integers(0, C, size=(B, 16, 16)).astype("int32")
NEW_UNET_KEYS = ("ensemble", "ensemble_size", "alpha", "gamma")


def _model(ensemble, head=None, m=2, **unet):
    unet = dict(base_filters=4, depth=1) | unet
    backbone = UNet(ensemble=ensemble, ensemble_size=m, **unet)
    return EnsembleSegmenter(backbone, head if head is not None else CategoricalLogits(C))


def _convs_and_others(unet):
    """`(layer of this U-Net's blocks)` in order, for copying weights between U-Nets."""
    return [layer for block in unet.encoder_blocks + unet.decoder_blocks for layer in block.layers]


def _member_logits(model, x):
    """Member j's mean logits `[M, B, H, W, C]`, from the members' parameters."""
    params = model.member_params(x)
    return np.stack([model.member_head.mean_logits(p).numpy() for p in params])


# --- the U-Net ---------------------------------------------------------------------------------
def test_default_unet_is_unchanged_and_old_configs_load():
    unet = UNet(base_filters=4, depth=1)
    config = unet.get_config()
    assert [config[k] for k in NEW_UNET_KEYS] == [None, 1, 2.0, 1]
    assert unet.ensemble_size == 1 and unet.output_channels == 4
    old = UNet.from_config({k: v for k, v in config.items() if k not in NEW_UNET_KEYS})
    unet(X), old(X)
    assert helpers.weight_shapes(old) == helpers.weight_shapes(unet)
    assert all(isinstance(layer, keras.layers.Conv2D) for layer in _convs_and_others(unet)[::3])
    old.set_weights(unet.get_weights())
    np.testing.assert_array_equal(old(X).numpy(), unet(X).numpy())


@pytest.mark.parametrize(
    "kwargs, channels",
    [
        (dict(ensemble="batch", ensemble_size=3), 8),
        (dict(ensemble="packed", ensemble_size=3), 6),  # ceil(2 * 8 / 3)
        (dict(ensemble="packed", ensemble_size=2, alpha=1, gamma=2), 4),
        (dict(ensemble="batch"), 8),  # M = 4 by default
    ],
)
def test_ensemble_unet_returns_every_members_features(kwargs, channels):
    unet = UNet(base_filters=8, depth=2, **kwargs)
    m = unet.ensemble_size
    assert m == kwargs.get("ensemble_size", 4) and unet.output_channels == channels
    out = unet(np.zeros((B, 16, 16, 2), "float32"))
    assert tuple(out.shape) == (m * B, 16, 16, channels)
    assert unet.compute_output_shape((B, 16, 16, 2)) == (m * B, 16, 16, channels)
    assert unet.compute_output_shape((None, 16, 16, 2)) == (None, 16, 16, channels)
    symbolic = unet(keras.Input((None, None, 2)))
    assert tuple(symbolic.shape) == (None, None, None, channels)
    helpers.run_serialization_test(UNet(base_filters=8, depth=2, **kwargs))


def test_batch_unet_member_j_is_the_unet_with_kernels_w_j():
    """Member j of a BatchEnsemble U-Net equals the plain U-Net whose every convolution has
    member j's kernel W * (r_j s_j^T) (normalisation shared)."""
    ens = UNet(base_filters=4, depth=2, ensemble="batch", ensemble_size=3, norm="group")
    out = ens(X).numpy()
    for j in range(3):
        plain = UNet(base_filters=4, depth=2, norm="group")
        plain(X)
        for src, dst in zip(_convs_and_others(ens), _convs_and_others(plain), strict=True):
            if isinstance(src, BatchEnsembleConv):
                dst.set_weights([src.member_kernels().numpy()[j]])
            else:
                dst.set_weights(src.get_weights())
        np.testing.assert_allclose(out[j * B : (j + 1) * B], plain(X).numpy(), atol=1e-4)


def test_packed_unet_member_j_is_a_narrow_unet_with_its_weight_blocks():
    """Member j of PE(alpha=2, M=4, gamma=1) on a U-Net of width 8 equals a plain U-Net of
    width 8 * 2 / 4 = 4 whose weights are member j's blocks: skip connections, group
    normalisation and the final rearrangement keep the members apart."""
    m = 4
    ens = UNet(base_filters=8, depth=2, ensemble="packed", ensemble_size=m, alpha=2)
    ens(X)
    # move the normalisation off its identity initialisation, so its blocks matter
    for layer in _convs_and_others(ens):
        if isinstance(layer, keras.layers.GroupNormalization):
            layer.set_weights([w + np.linspace(-0.5, 0.5, w.size) for w in layer.get_weights()])
    out = ens(X).numpy()
    assert out.shape == (m * B, 16, 16, 4)
    for j in range(m):
        plain = UNet(base_filters=4, depth=2)
        plain(X)
        for src, dst in zip(_convs_and_others(ens), _convs_and_others(plain), strict=True):
            if isinstance(src, PackedConv):
                c = src.member_filters
                dst.set_weights([src.kernel.numpy()[..., j * c : (j + 1) * c]])
            elif isinstance(src, keras.layers.GroupNormalization):
                c = src.gamma.shape[0] // m
                dst.set_weights([w[j * c : (j + 1) * c] for w in src.get_weights()])
            else:
                dst.set_weights(src.get_weights())
        np.testing.assert_allclose(out[j * B : (j + 1) * B], plain(X).numpy(), atol=1e-4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(ensemble="deep"), r"`ensemble` must be one of \('batch', 'packed', None\)"),
        (dict(ensemble_size=2), "`ensemble_size` needs an `ensemble`"),
        (dict(ensemble="batch", ensemble_size=0), "`ensemble_size` must be a positive int"),
        (dict(ensemble="batch", alpha=1.0), "apply to ensemble='packed' only"),
        (dict(gamma=2), "apply to ensemble='packed' only"),
        (dict(ensemble="packed", alpha=-1), "`alpha` must be a positive number"),
    ],
)
def test_unet_bad_ensemble_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNet(**kwargs)


# --- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "ensemble, head",
    [
        ("batch", lambda: LowRankLogits(C, rank=2)),
        ("packed", lambda: HeteroscedasticLogits(C)),
        ("packed", lambda: CategoricalLogits(C)),
    ],
    ids=["batch-ssn", "packed-heteroscedastic", "packed-deterministic"],
)
def test_fit_one_step_with_a_head(ensemble, head):
    model = _model(ensemble, head())
    helpers.run_fit_step(model, X, Y, loss="auto")
    samples = model.sample_logits(X, 4, seed=0)
    assert samples.shape == (4, B, 16, 16, C) and np.all(np.isfinite(samples))


@pytest.mark.parametrize("ensemble", ["batch", "packed"])
def test_the_loss_is_the_mean_of_the_members_losses_against_the_same_labels(ensemble):
    model = _model(ensemble, m=3)
    model.compile(loss="auto")
    weights = np.array([1.0, 3.0], "float32")
    loss = float(model.compute_loss(x=X, y=Y, y_pred=model(X), sample_weight=weights))
    member_loss = model.member_head.default_loss()
    params = model.member_params(X)
    expected = np.mean([float(member_loss(Y, p, sample_weight=weights)) for p in params])
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    # and the members' losses differ (they are different networks)
    assert np.ptp([float(member_loss(Y, p)) for p in params]) > 1e-4


@pytest.mark.parametrize("ensemble", ["batch", "packed"])
def test_members_differ_after_training(ensemble):
    """After a few steps on random data the members still predict differently: the spread of
    their logits across members is a sizeable part of the logits' spread."""
    keras.utils.set_random_seed(0)
    model = _model(ensemble, m=3)
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="auto")
    before = _member_logits(model, X)
    history = model.fit(X, Y, epochs=5, batch_size=B, verbose=0)
    assert history.history["loss"][-1] < history.history["loss"][0]
    after = _member_logits(model, X)
    assert np.abs(after - before).max() > 1e-2  # trained
    between = after.std(axis=0).mean()  # across the 3 members, per logit
    assert between > 0.05 * after.std(), (between, after.std())
    for i in range(3):
        for j in range(i):
            assert np.abs(after[i] - after[j]).max() > 1e-2, (i, j)


# --- sampling ----------------------------------------------------------------------------------
def test_members_are_the_samples_of_a_deterministic_head():
    m = 3
    model = _model("batch", m=m)
    assert isinstance(model, protocols.Sampler) and isinstance(model, protocols.GraphSampler)
    members = _member_logits(model, X)  # [M, B, H, W, C]
    samples = model.sample_logits(X, 2 * m, seed=0)
    assert samples.shape == (2 * m, B, 16, 16, C)
    for n in range(2 * m):  # sample n is member n mod M
        np.testing.assert_allclose(samples[n], members[n % m], atol=1e-5)
    assert np.abs(samples[0] - samples[1]).max() > 1e-3  # distinct members, distinct samples
    labels = model.sample(X, m, seed=0)
    np.testing.assert_array_equal(labels, members.argmax(-1))
    probs = model.probability_samples(X, m, seed=0, batch_size=1)
    np.testing.assert_allclose(probs, tf.nn.softmax(members, -1).numpy(), atol=1e-5)
    expected = tf.nn.softmax(members, -1).numpy().mean(0)  # the equal-weight mixture
    np.testing.assert_allclose(model.predict_proba(X, m), expected, atol=1e-5)
    np.testing.assert_allclose(model.predict_proba(X, 4 * m), expected, atol=1e-5)


def test_ssn_draws_of_each_member_are_centred_on_that_members_mean():
    """Sample n = a head draw of member n mod M: the mean of member j's k draws is its mean
    logits within 5 standard errors sqrt(var / k), var = cov_diag + sum_r cov_factor^2 (the
    head's analytic logit variance), and the members' means are far apart in those units."""
    m, k = 2, 400
    model = _model("packed", LowRankLogits(C, rank=2), m=m)
    x = X[:1, :8, :8]
    samples = model.sample_logits(x, m * k, seed=3).reshape(k, m, 1, 8, 8, C)
    params = model.member_params(x)
    for j in range(m):
        loc, factor, diag = (t.numpy() for t in model.member_head.covariance_parts(params[j]))
        se = np.sqrt((diag + (factor**2).sum(-1)) / k)
        z = (samples[:, j].mean(0) - loc) / se
        assert np.abs(z).max() < 5, np.abs(z).max()
    locs = [model.member_head.mean_logits(p).numpy() for p in params]
    assert np.abs((locs[0] - locs[1]) / se).max() > 20


def test_num_samples_must_be_a_multiple_of_the_members():
    model = _model("batch", m=3)
    assert model.default_num_samples == 18 and _model("packed").default_num_samples == 16
    assert model.sample_logits(X).shape[0] == 18
    for read in (model.sample_logits, model.sample, model.predict_proba):
        with pytest.raises(ValueError, match="multiple of ensemble_size = 3.*got 4"):
            read(X, 4)
    with pytest.raises(ValueError, match="antithetic=True` is not supported"):
        model.sample_logits(X, 6, antithetic=True)


def test_seeded_sampling_and_the_graph_sampler():
    model = _model("batch", LowRankLogits(C, rank=2))
    first = model.sample_logits(X, 4, seed=7)
    np.testing.assert_array_equal(model.sample_logits(X, 4, seed=7), first)
    assert np.abs(model.sample_logits(X, 4, seed=8) - first).max() > 1e-3
    seed = tf.constant([7, 0], tf.int64)
    graph = model.sample_logits_tensor(tf.constant(X), 4, seed=seed).numpy()
    np.testing.assert_allclose(graph, first, atol=1e-6)
    # any N in the graph (the exporters' chunks): ceil(N / M) draws per member, first N kept
    three = model.sample_logits_tensor(tf.constant(X), 3, seed=seed).numpy()
    np.testing.assert_allclose(three, first[:3], atol=1e-6)
    mean = model.mean_logits_tensor(tf.constant(X)).numpy()
    np.testing.assert_allclose(mean, _member_logits(model, X).mean(0), atol=1e-5)
    params = model.params_tensors(tf.constant(X))
    assert params["member_params"].shape == (B, 2, 16, 16, model.member_head.params_size)
    np.testing.assert_allclose(params["mean_logits"], mean, atol=1e-6)


@pytest.mark.parametrize("ensemble", ["batch", "packed"])
def test_save_and_load_give_the_same_outputs_and_samples(ensemble, tmp_path):
    model = _model(ensemble, LowRankLogits(C, rank=2))
    model.compile(loss="auto")
    loaded = helpers.run_model_saving_test(model, X, tmp_path)
    assert loaded.ensemble_size == 2 and loaded.backbone.ensemble == ensemble
    np.testing.assert_allclose(
        loaded.sample_logits(X, 4, seed=1), model.sample_logits(X, 4, seed=1), atol=1e-6
    )
    helpers.run_serialization_test(_model(ensemble, LowRankLogits(C, rank=2)))


def test_bad_segmenter_arguments():
    with pytest.raises(ValueError, match="`head` must be a distribution head"):
        EnsembleSegmenter(UNet(ensemble="batch"), keras.layers.Conv2D(3, 1))
    plain = keras.Sequential([keras.layers.Conv2D(4, 3, padding="same")])
    with pytest.raises(ValueError, match="`backbone` must be an ensemble backbone"):
        EnsembleSegmenter(plain, CategoricalLogits(C))
    # a backbone that does not return M*B feature maps is caught when called
    plain.ensemble_size = 2
    with pytest.raises(ValueError, match=r"features of its 2 members, \[M\*B, H, W, F\]"):
        EnsembleSegmenter(plain, CategoricalLogits(C))(X)


@pytest.mark.parametrize("ensemble", ["batch", "packed"])
def test_a_plain_segmenter_refuses_an_ensemble_backbone(ensemble):
    from tfp_seg.models import ProbabilisticSegmenter

    backbone = UNet(base_filters=4, depth=1, ensemble=ensemble, ensemble_size=2)
    with pytest.raises(ValueError, match="EnsembleSegmenter") as info:
        ProbabilisticSegmenter(backbone, CategoricalLogits(2))
    assert f"ensemble={ensemble!r}" in str(info.value)
