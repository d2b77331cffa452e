"""`tfp_seg.models.UNet(spatial_dims=3)`: the 3D U-Net over volumes `[B, D, H, W, ch]`, and
that the default (2D) U-Net is unchanged."""

import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests.helpers import run_layer_test
from tfp_seg.models import UNet
from tfp_seg.models.unet import upsample_linear

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "fixtures"


def _volumes(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _layers(model):
    """(name, class) of every named sublayer (not the auto-named model and input layers)."""
    return [
        (layer.name, type(layer).__name__)
        for layer in model._flatten_layers(include_self=False)
        if not isinstance(layer, keras.layers.InputLayer)
    ]


# --- Shapes and errors -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, input_shape, output_shape",
    [
        (dict(base_filters=4, depth=2), (2, 8, 8, 8, 1), (2, 8, 8, 8, 4)),
        (dict(base_filters=4, depth=2), (1, 4, 8, 12, 3), (1, 4, 8, 12, 4)),
        (dict(base_filters=6, depth=1, norm="batch"), (2, 8, 6, 4, 2), (2, 8, 6, 4, 6)),
        (dict(base_filters=4, depth=1, norm=None, convs_per_block=1), (1, 2, 4, 2, 1), None),
        (
            dict(base_filters=4, depth=1, ensemble="batch", ensemble_size=3),
            (2, 4, 4, 4, 1),
            (6, 4, 4, 4, 4),
        ),
        (
            dict(base_filters=4, depth=1, ensemble="packed", ensemble_size=2, alpha=2.0),
            (2, 4, 4, 4, 1),
            (4, 4, 4, 4, 4),
        ),
    ],
)
def test_output_shapes(kwargs, input_shape, output_shape):
    output_shape = output_shape or input_shape[:-1] + (kwargs["base_filters"],)
    net = UNet(spatial_dims=3, **kwargs)
    out = net(tf.constant(_volumes(input_shape)))
    assert tuple(out.shape) == output_shape
    assert np.all(np.isfinite(out.numpy()))
    assert tuple(net.compute_output_shape(input_shape)) == output_shape
    assert net.output_channels == output_shape[-1]
    # Symbolic, with unknown sides.
    symbolic = UNet(spatial_dims=3, **kwargs)(keras.Input((None, None, None, input_shape[-1])))
    assert tuple(symbolic.shape[1:]) == (None, None, None, output_shape[-1])


def _relative(net, weight) -> str:
    """A weight's path below its network (the path may also carry enclosing name scopes)."""
    return weight.path.split(net.name + "/", 1)[1]


def test_3d_layers_and_kernels():
    net = UNet(base_filters=4, depth=2, spatial_dims=3)
    net.build((None, None, None, None, 2))
    kinds = {cls for _, cls in _layers(net)}
    assert {"Conv3D", "MaxPooling3D", "GroupNormalization"} <= kinds
    assert not kinds & {"Conv2D", "MaxPooling2D", "UpSampling2D"}
    kernels = {_relative(net, w): tuple(w.shape) for w in net.weights if "kernel" in w.path}
    assert kernels["enc0/enc0_conv0/kernel"] == (3, 3, 3, 2, 4)
    assert kernels["enc2/enc2_conv1/kernel"] == (3, 3, 3, 16, 16)
    assert kernels["dec0/dec0_conv0/kernel"] == (3, 3, 3, 8 + 4, 4)  # upsampled + skip


def test_indivisible_sides_and_wrong_rank_raise():
    net = UNet(base_filters=4, depth=2, spatial_dims=3)
    with pytest.raises(ValueError, match=r"`inputs` depth \(6\) must be divisible by 2\*\*depth"):
        net(tf.zeros([1, 6, 8, 8, 1]))
    with pytest.raises(ValueError, match=r"`inputs` width \(10\) must be divisible by 2\*\*depth"):
        UNet(base_filters=4, depth=2, spatial_dims=3)(tf.zeros([1, 8, 8, 10, 1]))
    with pytest.raises(ValueError, match=r"`inputs` height \(2\) must be divisible by 2\*\*depth"):
        UNet(base_filters=4, depth=2, spatial_dims=3).build((None, 4, 2, 4, 1))
    with pytest.raises(ValueError, match=r"rank 5 \(\[B, D, H, W, channels\]"):
        UNet(base_filters=4, depth=1, spatial_dims=3)(tf.zeros([1, 8, 8, 1]))
    with pytest.raises(ValueError, match=r"rank 4 \(\[B, H, W, channels\]"):
        UNet(base_filters=4, depth=1)(tf.zeros([1, 8, 8, 8, 1]))
    for bad in (1, 4, "3", 3.0, True, None):
        with pytest.raises(ValueError, match="`spatial_dims` must be 2 .* or 3"):
            UNet(spatial_dims=bad)


# --- Training and saving -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(base_filters=4, depth=2),
        dict(base_filters=4, depth=1, norm="batch", dropout=0.1),
        dict(base_filters=4, depth=1, ensemble="batch", ensemble_size=2),
        dict(base_filters=4, depth=1, ensemble="packed", ensemble_size=2, gamma=2),
    ],
    ids=["group", "batch-norm", "batch-ensemble", "packed-ensemble"],
)
def test_one_fit_step_moves_every_weight(kwargs):
    keras.utils.set_random_seed(0)
    x = _volumes((2, 8, 8, 8, 1))
    net = UNet(spatial_dims=3, **kwargs)
    members, channels = net.ensemble_size, net.output_channels
    target = _volumes((2, members, 8, 8, 8, channels), seed=1)
    inputs = keras.Input((8, 8, 8, 1))
    features = net(inputs)  # [M*B, D, H, W, c], member-major -> [B, M, D, H, W, c]
    features = keras.ops.reshape(features, (members, -1, 8, 8, 8, channels))
    model = keras.Model(inputs, keras.ops.transpose(features, (1, 0, 2, 3, 4, 5)))
    model.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    before = [w.numpy().copy() for w in model.trainable_weights]
    assert len(before) > 0
    history = model.fit(x, target, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [w.numpy() for w in model.trainable_weights]
    still = [
        w.path for w, a, b in zip(model.trainable_weights, after, before, strict=True)
        if np.array_equal(a, b)
    ]  # fmt: skip
    assert not still, f"no gradient reached {still}"


def test_layer_contract_in_3d():
    # Config round trip, symbolic + eager calls, a fit step, `.keras` and SavedModel.
    run_layer_test(
        UNet,
        dict(base_filters=4, depth=1, spatial_dims=3),
        input_shape=(2, 4, 4, 4, 2),
        expected_output_shape=(2, 4, 4, 4, 4),
        atol=1e-5,
    )


def test_config_round_trip_and_keras_file(tmp_path):
    net = UNet(
        base_filters=4, depth=1, filters_multiplier=3, norm="batch", activation="elu",
        dropout=0.1, spatial_dims=3, name="unet3d",
    )  # fmt: skip
    config = net.get_config()
    assert config["spatial_dims"] == 3
    clone = UNet.from_config(config)
    assert clone.get_config() == config and clone.spatial_dims == 3
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(net))
    assert type(revived) is UNet and revived.get_config() == config

    x = _volumes((2, 4, 4, 4, 1))
    inputs = keras.Input((4, 4, 4, 1))
    model = keras.Model(inputs, net(inputs))
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, _volumes((2, 4, 4, 4, 4), 2), epochs=1, verbose=0)
    expected = np.asarray(model(x))
    path = tmp_path / "unet3d.keras"
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    np.testing.assert_allclose(np.asarray(loaded(x)), expected, rtol=1e-6, atol=1e-6)
    assert loaded.get_layer("unet3d").spatial_dims == 3


# --- 2D is unchanged ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(base_filters=4, depth=2, norm="batch", dropout=0.1),
        dict(base_filters=4, depth=2, ensemble="batch", ensemble_size=2),
        dict(base_filters=4, depth=2, ensemble="packed", ensemble_size=2, alpha=1.5, gamma=2),
    ],
    ids=["default", "batch-norm", "batch-ensemble", "packed-ensemble"],
)
def test_2d_builds_the_same_network(kwargs):
    x = _volumes((2, 16, 16, 3))
    default, explicit = UNet(**kwargs), UNet(spatial_dims=2, **kwargs)
    default.build(x.shape)
    explicit.build(x.shape)
    assert _layers(default) == _layers(explicit)
    kinds = {cls for _, cls in _layers(default)}
    assert not kinds & {"Conv3D", "MaxPooling3D"} and "MaxPooling2D" in kinds
    if not kwargs.get("ensemble"):
        assert "Conv2D" in kinds
    ups = [layer for layer in default._flatten_layers() if type(layer).__name__ == "UpSampling2D"]
    assert len(ups) == default.depth and all(u.interpolation == "bilinear" for u in ups)
    relative = [(_relative(default, w), tuple(w.shape)) for w in default.weights]
    assert relative == [(_relative(explicit, w), tuple(w.shape)) for w in explicit.weights]
    explicit.set_weights(default.get_weights())
    np.testing.assert_array_equal(np.asarray(explicit(x)), np.asarray(default(x)))
    config = {k: v for k, v in default.get_config().items() if k != "name"}
    assert config == {k: v for k, v in explicit.get_config().items() if k != "name"}
    assert config["spatial_dims"] == 2


def test_configs_saved_without_spatial_dims_load_as_2d():
    config = UNet(base_filters=4, depth=1).get_config()
    del config["spatial_dims"]  # a config of an earlier version
    assert UNet.from_config(config).spatial_dims == 2
    # And a `.keras` file saved by tfp_seg 0.1.0 predicts what it did then.
    path = FIXTURES / "keras_v0_1_0" / "deterministic.keras"
    model = keras.models.load_model(path, safe_mode=True)
    x = np.load(path.parent / "input.npy")
    assert model.backbone.spatial_dims == 2
    expected = np.load(path.parent / "deterministic_output.npy")
    np.testing.assert_allclose(np.asarray(model(x)), expected, rtol=1e-5, atol=1e-5)


# --- Trilinear upsampling ----------------------------------------------------------------------


def test_linear_upsampling_is_the_bilinear_resize_per_axis():
    # Along two axes it is keras' bilinear UpSampling2D (tf.image.resize, half-pixel centres).
    x = _volumes((2, 4, 6, 3))
    ref = np.asarray(keras.layers.UpSampling2D(2, interpolation="bilinear")(x))
    got = upsample_linear(upsample_linear(tf.constant(x), 1), 2).numpy()
    np.testing.assert_allclose(got, ref, atol=1e-6)
    # Along three axes: the separable trilinear resize (bilinear in (H, W), then in (D, W')).
    v = _volumes((2, 4, 6, 8, 3), 1)
    hw = tf.reshape(tf.image.resize(tf.reshape(v, (8, 6, 8, 3)), (12, 16)), (2, 4, 12, 16, 3))
    dw = tf.reshape(tf.transpose(hw, (0, 2, 1, 3, 4)), (24, 4, 16, 3))
    ref3 = tf.reshape(tf.image.resize(dw, (8, 16)), (2, 12, 8, 16, 3))
    ref3 = tf.transpose(ref3, (0, 2, 1, 3, 4)).numpy()
    got3 = v
    for axis in (1, 2, 3):
        got3 = upsample_linear(tf.constant(got3), axis).numpy()
    assert got3.shape == (2, 8, 12, 16, 3)
    np.testing.assert_allclose(got3, ref3, atol=1e-6)
    # Means are kept exactly: along an axis the outputs sum to 2 sum_i x_i (the clamped
    # neighbours add x_0 - x_{n-1} and x_{n-1} - x_0, which cancel).
    np.testing.assert_allclose(got3.mean(axis=(1, 2, 3)), v.mean(axis=(1, 2, 3)), atol=1e-5)
