"""`LatentEncoder` / `LatentInjection` over volumes (`spatial_dims=3`): Conv3D blocks, the
global mean over D, H and W, z broadcast over every voxel; and 2D configs without the key.

(The 2D behaviour of these layers is tested with the Probabilistic U-Net in
tests/models/test_prob_unet.py.)"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import run_layer_test, run_serialization_test
from tfp_seg.layers import LatentEncoder, LatentInjection
from tfp_seg.layers.latent import one_hot_labels

B, L, C = 2, 3, 4


def _volume(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def test_the_3d_encoder_is_a_keras_layer():
    run_layer_test(
        LatentEncoder,
        dict(latent_dim=L, filters=(4, 6), convs_per_block=1, spatial_dims=3),
        input_shape=(B, 4, 6, 4, 2),
        expected_output_shape=(B, 2 * L),
        atol=1e-5,
    )


def test_the_3d_encoder_pools_over_depth_height_and_width():
    encoder = LatentEncoder(latent_dim=L, filters=(4, 6), convs_per_block=1, spatial_dims=3)
    x = _volume((B, 4, 6, 8, 2))
    params = encoder(x).numpy()
    kinds = {type(layer).__name__ for layer in encoder._flatten_layers(include_self=False)}
    assert kinds == {"Conv3D", "AveragePooling3D", "Dense"}
    # by hand: conv -> pool 2x2x2 -> conv -> mean over (D, H, W) -> dense
    h = encoder.convs[0][0](x)
    h = encoder.convs[1][0](encoder.pools[0](h))
    assert tuple(h.shape) == (B, 2, 3, 4, 6)
    expected = encoder.projection(np.asarray(h).mean(axis=(1, 2, 3))).numpy()
    np.testing.assert_allclose(params, expected, rtol=1e-5, atol=1e-6)
    # a volume of other sides gives the same kind of output (any size works)
    assert tuple(encoder(_volume((1, 3, 5, 7, 2))).shape) == (1, 2 * L)
    z = encoder.sample(params, 5, seed=1)
    assert tuple(z.shape) == (5, B, L)


def test_the_3d_injection_broadcasts_z_over_every_voxel():
    f_comb = LatentInjection(C, filters=5, num_convs=2, spatial_dims=3)
    features = _volume((B, 3, 4, 5, 6))
    z = _volume((B, L), seed=1)
    logits = f_comb(features, z).numpy()
    assert logits.shape == (B, 3, 4, 5, C)
    kinds = {type(layer).__name__ for layer in f_comb._flatten_layers(include_self=False)}
    assert kinds == {"Conv3D"}
    # by hand: the 1x1x1 convolutions on concat([features, z at every voxel])
    tiled = np.broadcast_to(z[:, None, None, None, :], (B, 3, 4, 5, L))
    h = np.concatenate([features, tiled], axis=-1)
    for conv in f_comb.convs:
        h = conv(h)
    np.testing.assert_allclose(logits, f_comb.logits(h).numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("num_convs", [0, 1, 3])
def test_sample_logits_equals_one_call_per_latent(num_convs):
    f_comb = LatentInjection(C, filters=5, num_convs=num_convs, spatial_dims=3)
    features = _volume((B, 2, 4, 3, 6))
    z_samples = _volume((4, B, L), seed=2)
    samples = f_comb.sample_logits(features, z_samples).numpy()
    assert samples.shape == (4, B, 2, 4, 3, C)
    for n in range(4):
        np.testing.assert_allclose(
            samples[n], f_comb(features, z_samples[n]).numpy(), rtol=1e-5, atol=1e-5
        )


@pytest.mark.parametrize("dims", [2, 3])
def test_configs_round_trip(dims):
    encoder = LatentEncoder(latent_dim=L, filters=(4,), spatial_dims=dims)
    injection = LatentInjection(C, filters=4, spatial_dims=dims)
    for layer in (encoder, injection):
        assert layer.get_config()["spatial_dims"] == dims
        revived, _ = run_serialization_test(layer)
        assert revived.spatial_dims == dims


def _config_without_spatial_dims(layer):
    config = layer.get_config()
    config.pop("spatial_dims")
    return config


def test_configs_without_spatial_dims_load_as_2d():
    """Configs saved before volumes existed have no `spatial_dims`: they build 2D layers."""
    encoder = LatentEncoder.from_config(_config_without_spatial_dims(LatentEncoder(L, (4,))))
    injection = LatentInjection.from_config(_config_without_spatial_dims(LatentInjection(C, 4)))
    assert encoder.spatial_dims == injection.spatial_dims == 2
    assert tuple(encoder(_volume((1, 4, 4, 2))).shape) == (1, 2 * L)
    assert type(encoder.convs[0][0]) is keras.layers.Conv2D
    assert type(injection.logits) is keras.layers.Conv2D


def test_one_hot_labels_of_volumes():
    labels = np.array([[[[0, 1], [2, 255]]]], "int32")  # [1, 1, 2, 2]
    onehot = one_hot_labels(labels, 3, ignore_label=255, spatial_dims=3).numpy()
    assert onehot.shape == (1, 1, 2, 2, 3)
    np.testing.assert_array_equal(onehot[0, 0, 0, 1], [0, 1, 0])
    np.testing.assert_array_equal(onehot[0, 0, 1, 1], [0, 0, 0])  # ignored: all zeros
    with pytest.raises(ValueError, match=r"`labels` must have rank 4 \(\[B, D, H, W\]"):
        one_hot_labels(labels[0], 3, spatial_dims=3)


def test_rank_errors_name_the_layout():
    with pytest.raises(ValueError, match=r"rank 5 \(\[B, D, H, W, channels\], spatial_dims=3\)"):
        LatentEncoder(latent_dim=L, filters=(4,), spatial_dims=3)(_volume((B, 4, 4, 1)))
    with pytest.raises(ValueError, match=r"`features` must have rank 4 \(\[B, H, W, F\]"):
        LatentInjection(C, filters=4)(_volume((B, 2, 2, 2, 3)), _volume((B, L)))
    with pytest.raises(ValueError, match=r"`features` must have rank 5 \(\[B, D, H, W, F\]"):
        LatentInjection(C, spatial_dims=3).sample_logits(
            tf.zeros((B, 2, 2, 3)), tf.zeros((1, B, L))
        )
    with pytest.raises(ValueError, match="`spatial_dims` must be 2"):
        LatentEncoder(spatial_dims=1)
    with pytest.raises(ValueError, match="`spatial_dims` must be 2"):
        LatentInjection(C, spatial_dims="3")
