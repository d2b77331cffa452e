"""`ProbabilisticUNet(spatial_dims=3)`: the Probabilistic U-Net on volumes `[B, D, H, W, ch]`,
and that configs without `spatial_dims` stay 2D (issue 17, item 2)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import run_model_saving_test, run_serialization_test
from tfp_seg import protocols
from tfp_seg.models import ProbabilisticUNet, UNet

B, D, H, W, C, L = 2, 8, 8, 8, 3, 2
VOLUME = (D, H, W)


def _model(**kwargs):
    keras.utils.set_random_seed(0)
    kwargs.setdefault("backbone", UNet(base_filters=4, depth=1, spatial_dims=3))
    return ProbabilisticUNet(
        num_classes=C,
        latent_dim=L,
        encoder_filters=(4, 8),
        encoder_convs_per_block=1,
        num_fcomb_convs=1,
        spatial_dims=3,
        **kwargs,
    )


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(B, *VOLUME, 1)).astype("float32")
    # labels that the image predicts (class = sign pattern of the image), learnable in a few steps
    y = (x[..., 0] > 0).astype("int32") + (x[..., 0] > 1).astype("int32")
    return x, y


def test_layers_are_3d():
    model = _model()
    x, _ = _data()
    model(x)
    kinds = {type(layer).__name__ for layer in model._flatten_layers(include_self=False)}
    assert {"Conv3D", "AveragePooling3D"} <= kinds
    assert not kinds & {"Conv2D", "AveragePooling2D"}
    assert model.prior_net.spatial_dims == model.f_comb.spatial_dims == 3
    assert model.posterior_net.spatial_dims == 3


def test_fit_lowers_the_loss_and_every_part_gets_gradients():
    model = _model()
    x, y = _data()
    terms = model.elbo_terms(x, y, training=True, seed=[1, 2])
    with tf.GradientTape() as tape:
        loss = model.elbo_terms(x, y, training=True, seed=[1, 2])["loss"]
    parts = {
        "prior": model.prior_net,
        "posterior": model.posterior_net,
        "unet": model.backbone,
        "f_comb": model.f_comb,
    }
    variables = {name: part.trainable_variables for name, part in parts.items()}
    grads = tape.gradient(loss, variables)
    for name, part_grads in grads.items():
        assert part_grads, name
        norm = sum(float(tf.reduce_sum(tf.abs(g))) for g in part_grads if g is not None)
        assert np.isfinite(norm) and norm > 0, f"no gradient reaches the {name} weights"
    assert float(terms["kl"]) >= 0 and np.isfinite(float(terms["loss"]))

    model.compile(optimizer=keras.optimizers.Adam(1e-2))
    history = model.fit(x, y, epochs=8, batch_size=B, verbose=0).history
    assert all(np.isfinite(history["loss"]))
    assert set(history) == {"loss", "reconstruction", "kl"}
    assert history["reconstruction"][-1] < history["reconstruction"][0]


def test_samples_and_read_outs():
    model = _model()
    x, y = _data()
    assert tuple(model(x).shape) == (B, *VOLUME, C)
    logits = model.sample_logits(x, num_samples=3, seed=1, batch_size=1)
    assert logits.shape == (3, B, *VOLUME, C)
    assert np.abs(logits[0] - logits[1]).max() > 1e-5  # different latents, different logits
    np.testing.assert_array_equal(model.sample_logits(x, 3, seed=1, batch_size=1), logits)
    labels = model.sample(x, num_samples=3, seed=1, batch_size=1)
    np.testing.assert_array_equal(labels, logits.argmax(-1))
    assert model.predict_proba(x, num_samples=2, seed=2).shape == (B, *VOLUME, C)
    assert tuple(model.sample_logits_tensor(tf.constant(x), 2).shape) == (2, B, *VOLUME, C)
    assert tuple(model.reconstruct(x, y).shape) == (B, *VOLUME, C)
    assert model.prior(x).event_shape == [L]
    assert model.posterior(x, y).batch_shape == [B]
    assert isinstance(model, protocols.GraphSampler)


def test_save_and_load(tmp_path):
    model = _model()
    x, y = _data()
    model.compile(optimizer="adam")
    model.fit(x, y, epochs=1, verbose=0)
    loaded = run_model_saving_test(model, x, tmp_path, atol=1e-5)
    assert loaded.spatial_dims == 3
    np.testing.assert_allclose(
        loaded.sample_logits(x, 2, seed=3), model.sample_logits(x, 2, seed=3), atol=1e-5
    )
    run_serialization_test(model, check_dir=False)


def test_the_default_backbone_follows_spatial_dims():
    model = ProbabilisticUNet(num_classes=C, spatial_dims=3)
    assert isinstance(model.backbone, UNet) and model.backbone.spatial_dims == 3


def test_kl_is_the_closed_form_of_the_encoders_latents():
    """`kl` of the ELBO equals the Gaussian KL written out in NumPy on the prior and posterior
    nets' (mu, sigma): KL(q || p) = sum_l log(s_p/s_q) + (s_q^2 + (m_q - m_p)^2)/(2 s_p^2) - 1/2."""
    model = _model()
    x, y = _data(1)
    terms = model.elbo_terms(x, y, seed=[3, 4])
    images = tf.constant(x)
    mp, sp = (
        t.numpy().astype("float64") for t in model.prior_net.loc_and_scale(model.prior_net(images))
    )
    posterior_inputs = model._posterior_inputs(images, y)
    mq, sq = (
        t.numpy().astype("float64")
        for t in model.posterior_net.loc_and_scale(model.posterior_net(posterior_inputs))
    )
    kl = np.sum(np.log(sp / sq) + (sq**2 + (mq - mp) ** 2) / (2 * sp**2) - 0.5, axis=-1)
    assert kl.shape == (B,) and np.all(kl > 0)
    np.testing.assert_allclose(float(terms["kl"]), kl.mean(), rtol=1e-5)


def test_rank_errors():
    with pytest.raises(
        ValueError, match="ProbabilisticUNet has spatial_dims=3 .*UNet has spatial_dims=2"
    ):
        _model(backbone=UNet(base_filters=4, depth=1))
    with pytest.raises(ValueError, match="ProbabilisticUNet has spatial_dims=2 .*spatial_dims=3"):
        ProbabilisticUNet(C, backbone=UNet(base_filters=4, depth=1, spatial_dims=3))
    with pytest.raises(ValueError, match="`spatial_dims` must be 2"):
        ProbabilisticUNet(C, spatial_dims=4)
    model = _model()
    x, y = _data()
    with pytest.raises(ValueError, match=r"`x` must have rank 5 \(\[B, D, H, W, channels\]"):
        model.sample(x[:, 0], 2)
    with pytest.raises(ValueError, match=r"`labels` must have rank 4 \(\[B, D, H, W\]"):
        model.posterior(x, y[:, 0])
    with pytest.raises(ValueError, match=r"`labels` shape \(2, 8, 8, 4\) must equal"):
        model.posterior(x, y[..., :4])


def test_a_config_without_spatial_dims_is_2d():
    model = ProbabilisticUNet(
        num_classes=C,
        latent_dim=L,
        backbone=UNet(base_filters=4, depth=1),
        encoder_filters=(4, 8),
        encoder_convs_per_block=1,
        num_fcomb_convs=1,
    )
    config = model.get_config()
    assert config["spatial_dims"] == 2
    config.pop("spatial_dims")
    revived = ProbabilisticUNet.from_config(config)
    assert revived.spatial_dims == 2 and revived.prior_net.spatial_dims == 2
    assert tuple(revived(np.zeros((1, 8, 8, 1), "float32")).shape) == (1, 8, 8, C)
