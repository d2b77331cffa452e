"""keras-hub / keras-cv backbones with distribution heads (tfp_seg.models.backbones).

Everything is built from config; nothing is downloaded (the preset test cuts the network off
itself). Default suite: the ResNet-FPN family with each head, serialisation, presets/weights,
and the resolution claims; the heavier families are marked slow.
"""

from __future__ import annotations

import builtins
import os
import socket

import keras
import keras_hub
import numpy as np
import pytest

import tfp_seg
from tfp_seg.layers import CategoricalLogits, HeteroscedasticLogits, LowRankLogits
from tfp_seg.models import backbones
from tfp_seg.models.backbones import (
    BACKBONE_NAMES,
    BackboneAdapter,
    PresetUnavailableError,
    PyramidEncoder,
    ResizeToReference,
    build_backbone,
    from_keras_hub,
)

SIZE = 64
NUM_CLASSES = 3
HEADS = {
    "categorical": lambda: CategoricalLogits(NUM_CLASSES),
    "heteroscedastic": lambda: HeteroscedasticLogits(NUM_CLASSES),
    "low_rank": lambda: LowRankLogits(NUM_CLASSES, rank=4),
}
SLOW_FAMILIES = (
    "deeplabv3plus_resnet",
    "deeplabv3_mobilenetv3",
    "segformer_mit_b0",
    "keras_cv_deeplabv3plus_resnet",
    "keras_cv_segformer_mit_b0",
)


def _data(channels=1, batch=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, SIZE, SIZE, channels)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=(batch, SIZE, SIZE)).astype("int32")
    return x, y


def _fit_one_step(name, head_name):
    """Build `name` + head from config, check the output shape, take one fit step."""
    backbone = build_backbone(name, num_channels=1, input_shape=(SIZE, SIZE, 1))
    head = HEADS[head_name]()
    model = tfp_seg.models.ProbabilisticSegmenter(backbone, head)
    x, y = _data()
    params = model(x)
    assert tuple(params.shape) == (2, SIZE, SIZE, head.params_size)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="auto", jit_compile=False)
    before = [w.numpy().copy() for w in model.trainable_weights]
    history = model.fit(x, y, epochs=1, batch_size=2, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    after = [w.numpy() for w in model.trainable_weights]
    moved = [not np.array_equal(a, b) for a, b in zip(after, before, strict=True)]
    # The head and the hub encoder both learn.
    head_ids = {id(w) for w in model.head.trainable_weights}
    assert all(m for w, m in zip(model.trainable_weights, moved, strict=True) if id(w) in head_ids)
    assert sum(moved) > len(head_ids) + 5, f"only {sum(moved)} weights moved"
    return model


# --- each family x each head: builds, params at input size, one fit step -------------------
@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_resnet_fpn_with_each_head_fits(head_name):
    _fit_one_step("resnet_fpn", head_name)


@pytest.mark.slow
@pytest.mark.parametrize("head_name", sorted(HEADS))
@pytest.mark.parametrize("name", SLOW_FAMILIES)
def test_family_with_each_head_fits(name, head_name):
    _fit_one_step(name, head_name)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, min_ratio",
    # MiT-B0 is the encoder in both sizes; "full" widens only the SegFormer decoder (64 -> 256).
    [("deeplabv3plus_resnet", 10.0), ("segformer_mit_b0", 1.05), ("resnet_fpn", 10.0)],
)
def test_full_size_configs_build(name, min_ratio):
    small = build_backbone(name, input_shape=(SIZE, SIZE, 3))
    full = build_backbone(name, input_shape=(SIZE, SIZE, 3), size="full")
    out = full(np.zeros((1, SIZE, SIZE, 3), "float32"))
    assert tuple(out.shape[:3]) == (1, SIZE, SIZE)
    assert full.count_params() > min_ratio * small.count_params()


def test_unet_name_builds_the_builtin_unet():
    backbone = build_backbone("unet", num_channels=1, base_filters=8, depth=2)
    assert isinstance(backbone, tfp_seg.models.UNet)
    assert (backbone.base_filters, backbone.depth) == (8, 2)
    out = backbone(np.zeros((1, 16, 16, 1), "float32"))
    assert tuple(out.shape) == (1, 16, 16, 8)


def test_backbone_names_and_argument_errors():
    assert "unet" in BACKBONE_NAMES and "resnet_fpn" in BACKBONE_NAMES
    with pytest.raises(ValueError, match="`name` must be one of"):
        build_backbone("vgg")
    with pytest.raises(ValueError, match="`size` must be one of"):
        build_backbone("resnet_fpn", size="huge")
    with pytest.raises(ValueError, match="needs a static input size"):
        build_backbone("segformer_mit_b0", num_channels=1)
    with pytest.raises(ValueError, match="disagree"):
        build_backbone("resnet_fpn", num_channels=1, input_shape=(SIZE, SIZE, 3))
    with pytest.raises(ValueError, match=r"\.weights\.h5"):
        build_backbone("resnet_fpn", weights="model.h5")


# --- the adapter ----------------------------------------------------------------------------
def test_adapter_repeats_grey_images_to_the_encoders_rgb():
    grey = build_backbone("resnet_fpn", num_channels=1)
    rgb = BackboneAdapter(grey.encoder, grey.feature_level, fusion_filters=32)
    rgb.set_weights(grey.get_weights())
    x, _ = _data(channels=1, batch=1)
    out = np.asarray(grey(x))
    assert out.shape == (1, SIZE, SIZE, 32)
    np.testing.assert_allclose(out, np.asarray(rgb(np.repeat(x, 3, axis=-1))), atol=1e-5)
    # Any input size divisible by 32, not only the one it was first called with.
    assert tuple(grey(np.zeros((1, 96, 32, 1), "float32")).shape) == (1, 96, 32, 32)


def test_adapter_levels_and_errors():
    resnet = build_backbone("resnet_fpn").encoder
    assert BackboneAdapter(resnet, "auto").feature_level == ["P2", "P3", "P4", "P5"]
    single = BackboneAdapter(resnet, "P3", upsample=None)
    assert tuple(single(np.zeros((1, SIZE, SIZE, 3), "float32")).shape[1:3]) == (8, 8)
    with pytest.raises(ValueError, match=r"levels \['P9'\].*P2"):
        BackboneAdapter(resnet, ["P2", "P9"])
    with pytest.raises(ValueError, match="`upsample` must be one of"):
        BackboneAdapter(resnet, "auto", upsample="cubic")
    with pytest.raises(ValueError, match="DistributionHead"):
        from_keras_hub(resnet, keras.layers.Dense(3))


def test_segmenter_rejects_features_below_input_resolution():
    resnet = build_backbone("resnet_fpn").encoder
    model = from_keras_hub(resnet, CategoricalLogits(NUM_CLASSES), upsample=None)
    with pytest.raises(ValueError, match="input resolution"):
        model(np.zeros((1, SIZE, SIZE, 3), "float32"))


def test_pyramid_encoder_detects_stages_of_a_plain_cnn():
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="stem")(inputs)
    x = keras.layers.Conv2D(4, 3, padding="same", name="s2_conv")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="s4_conv")(x)
    x = keras.layers.ReLU(name="s4_relu")(x)
    x = keras.layers.Conv2D(8, 3, strides=2, padding="same", name="s8_conv")(x)
    cnn = keras.Model(inputs, x)
    encoder = PyramidEncoder(cnn)
    names = {k: cnn.layers[i].name for k, i in encoder.pyramid_layers.items()}
    assert names == {"P1": "s2_conv", "P2": "s4_relu", "P3": "s8_conv"}
    revived = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(encoder))
    assert revived.pyramid_layers == encoder.pyramid_layers
    # A pyramid-less CNN passed to from_keras_hub gets an FPN over these stages.
    model = from_keras_hub(cnn, CategoricalLogits(NUM_CLASSES))
    assert model.backbone.feature_level == ["P2", "P3"]
    assert tuple(model(np.zeros((1, 32, 32, 3), "float32")).shape) == (1, 32, 32, NUM_CLASSES)


# --- serialisation ----------------------------------------------------------------------------
def _round_trip(model, x, tmp_path):
    expected = np.asarray(model(x))
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded = keras.models.load_model(path, safe_mode=True)
    assert isinstance(loaded.backbone, BackboneAdapter)
    np.testing.assert_array_equal(np.asarray(loaded(x)), expected)
    return loaded


def test_keras_round_trip_of_a_keras_hub_backed_model(tmp_path):
    model = tfp_seg.models.ProbabilisticSegmenter(
        build_backbone("resnet_fpn", num_channels=1), LowRankLogits(NUM_CLASSES, rank=4)
    )
    x, _ = _data()
    model(x, training=True)  # moves the BatchNorm statistics away from their initial values
    loaded = _round_trip(model, x, tmp_path)
    assert isinstance(loaded.backbone.encoder, keras_hub.models.ResNetBackbone)
    assert loaded.count_params() == model.count_params()


@pytest.mark.slow
@pytest.mark.parametrize("name", SLOW_FAMILIES)
def test_keras_round_trip_of_each_family(name, tmp_path):
    model = tfp_seg.models.ProbabilisticSegmenter(
        build_backbone(name, num_channels=1, input_shape=(SIZE, SIZE, 1)),
        HeteroscedasticLogits(NUM_CLASSES),
    )
    _round_trip(model, _data()[0], tmp_path)


@pytest.mark.slow
def test_from_keras_hub_takes_an_image_segmenter_task():
    deeplab = build_backbone("deeplabv3plus_resnet").encoder
    task = keras_hub.models.DeepLabV3ImageSegmenter(backbone=deeplab, num_classes=NUM_CLASSES)
    model = from_keras_hub(task, LowRankLogits(NUM_CLASSES, rank=4))
    assert model.backbone.encoder is deeplab
    out = model(np.zeros((1, SIZE, SIZE, 3), "float32"))
    assert tuple(out.shape) == (1, SIZE, SIZE, LowRankLogits.params_size_for(NUM_CLASSES, 4))


# --- presets and local weights ----------------------------------------------------------------
@pytest.fixture
def no_network(monkeypatch):
    """Make every DNS lookup and connection fail, whatever the machine's network."""

    def refuse(*args, **kwargs):
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _assert_clear_offline_message(message, preset):
    assert repr(preset) in message
    assert "build_backbone" in message  # how to build from config
    assert "save_to_preset" in message and "folder" in message  # a local preset folder
    assert ".weights.h5" in message  # a local weights file


def test_preset_without_network_raises_a_clear_error(no_network):
    preset = "deeplab_v3_plus_resnet50_pascalvoc"
    with pytest.raises(PresetUnavailableError) as info:
        from_keras_hub(preset, LowRankLogits(NUM_CLASSES))
    _assert_clear_offline_message(str(info.value), preset)
    with pytest.raises(PresetUnavailableError) as info:
        build_backbone("resnet_fpn", preset="resnet_18_imagenet")
    _assert_clear_offline_message(str(info.value), "resnet_18_imagenet")


def test_weights_file_loads_into_a_fresh_backbone(tmp_path):
    x = np.random.default_rng(3).normal(size=(1, SIZE, SIZE, 3)).astype("float32")
    source = build_backbone("resnet_fpn", num_channels=1)
    path = tmp_path / "resnet.weights.h5"
    source.encoder.save_weights(str(path))
    loaded = build_backbone("resnet_fpn", num_channels=1, weights=str(path))
    fresh = build_backbone("resnet_fpn", num_channels=1)
    expected = np.asarray(source.encoder(x))
    np.testing.assert_array_equal(np.asarray(loaded.encoder(x)), expected)
    assert not np.allclose(np.asarray(fresh.encoder(x)), expected)


def test_local_preset_folder_loads_without_network(tmp_path, no_network):
    x = np.random.default_rng(4).normal(size=(1, SIZE, SIZE, 3)).astype("float32")
    source = build_backbone("resnet_fpn").encoder
    folder = tmp_path / "my_resnet"
    source.save_to_preset(str(folder))
    expected = np.asarray(source(x))
    model = from_keras_hub(str(folder), CategoricalLogits(NUM_CLASSES))
    np.testing.assert_array_equal(np.asarray(model.backbone.encoder(x)), expected)
    backbone = build_backbone("resnet_fpn", num_channels=1, preset=str(folder))
    np.testing.assert_array_equal(np.asarray(backbone.encoder(x)), expected)


# --- resolution: upsampling parameters vs features --------------------------------------------
def _interpolation_matrix(h, w, height, width):
    """U [height*width, h*w] of ResizeToReference("bilinear"), from resized basis images."""
    basis = np.eye(h * w, dtype="float32").reshape(h * w, h, w, 1)
    reference = np.zeros((h * w, height, width, 1), "float32")
    resized = np.asarray(ResizeToReference("bilinear")([basis, reference]))
    return resized.reshape(h * w, height * width).T


def test_bilinear_upsampled_covariance_factor_is_exact_and_low_rank():
    """Upsampling SSN parameters: Cov' = U P P^T U^T + diag(exp(U d) + eps), rank <= R."""
    c, r, (h, w), (height, width) = 2, 2, (2, 3), (4, 6)
    head = LowRankLogits(c, rank=r)
    params = np.random.default_rng(0).normal(size=(1, h, w, head.params_size)).astype("float32")
    params_up = ResizeToReference("bilinear")([params, np.zeros((1, height, width, 1), "float32")])
    dense_up = np.asarray(head.distribution(params_up).covariance())[0].astype("float64")

    u = np.kron(_interpolation_matrix(h, w, height, width), np.eye(c)).astype("float64")
    loc, factor, diag = (np.asarray(t, "float64") for t in head.covariance_parts(params))
    p = factor.reshape(h * w * c, r)
    raw_up = u @ params[0, ..., c : 2 * c].reshape(-1).astype("float64")
    d_up = np.exp(raw_up) + head.epsilon
    expected = u @ p @ p.T @ u.T + np.diag(d_up)
    np.testing.assert_allclose(dense_up, expected, rtol=1e-4, atol=1e-5)
    # The factor part is exactly the pushforward of the low-resolution factor part, rank <= R.
    factor_part = dense_up - np.diag(d_up)
    np.testing.assert_allclose(factor_part, u @ (p @ p.T) @ u.T, rtol=1e-4, atol=1e-5)
    assert np.linalg.matrix_rank(factor_part, tol=1e-4) == r
    # The mean is interpolated too.
    mean_up = np.asarray(head.distribution(params_up).mean())[0].reshape(-1)
    np.testing.assert_allclose(mean_up, u @ loc.reshape(-1), rtol=1e-5, atol=1e-6)
    # ... but the diagonal is interpolated per pixel, not pushed forward: the full
    # covariance is not U (P P^T + D) U^T (that would correlate neighbouring pixels' noise).
    pushforward = u @ (p @ p.T + np.diag(diag.reshape(-1))) @ u.T
    assert np.abs(dense_up - pushforward).max() > 0.1


@pytest.mark.parametrize("head_name", sorted(HEADS))
def test_head_of_upsampled_features_equals_upsampled_params(head_name):
    """For 1x1 heads, upsampling features (what the adapter does) == upsampling parameters."""
    head = HEADS[head_name]()
    features = np.random.default_rng(1).normal(size=(2, 4, 5, 16)).astype("float32")
    reference = np.zeros((2, 16, 20, 1), "float32")
    resize = ResizeToReference("bilinear")
    via_features = np.asarray(head(resize([features, reference])))
    via_params = np.asarray(resize([head(features), reference]))
    np.testing.assert_allclose(via_features, via_params, rtol=1e-5, atol=1e-5)
    # Not true for a 3x3 head (the equivalence is a property of per-pixel affine heads).
    wide = type(head)(NUM_CLASSES, kernel_size=3)
    assert not np.allclose(
        np.asarray(wide(resize([features, reference]))),
        np.asarray(resize([wide(features), reference])),
        atol=1e-3,
    )


def test_resize_to_reference_matches_upsampling2d_and_round_trips():
    x = np.random.default_rng(2).normal(size=(1, 4, 4, 3)).astype("float32")
    resize = ResizeToReference("bilinear")
    ours = np.asarray(resize([x, np.zeros((1, 16, 16, 1), "float32")]))
    keras_up = np.asarray(keras.layers.UpSampling2D(4, interpolation="bilinear")(x))
    np.testing.assert_allclose(ours, keras_up, atol=1e-6)
    revived = ResizeToReference.from_config(resize.get_config())
    assert revived.get_config() == resize.get_config()
    with pytest.raises(ValueError, match="`interpolation` must be one of"):
        ResizeToReference("area")


# --- keras-cv ---------------------------------------------------------------------------------
def test_keras_cv_imports_with_this_keras():
    import keras_cv

    assert hasattr(keras_cv.models, "DeepLabV3Plus") and hasattr(keras_cv.models, "SegFormer")
    assert keras.__version__.startswith("3.")


def test_missing_keras_cv_gives_a_clear_import_error(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "keras_cv" or name.startswith("keras_cv."):
            raise ImportError("No module named 'keras_cv'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ImportError, match=r"tfp_seg\[keras-cv\].*from_keras_hub"):
        backbones.from_keras_cv("deeplab_v3_plus_resnet50_pascalvoc", CategoricalLogits(3))


@pytest.mark.slow
def test_from_keras_cv_takes_a_deeplabv3plus_instance(tmp_path):
    import keras_cv

    encoder = keras_cv.models.ResNetBackbone(
        stackwise_filters=[64, 32, 32, 32],
        stackwise_blocks=[1, 1, 1, 1],
        stackwise_strides=[1, 2, 2, 2],
        block_type="basic_block",
        include_rescaling=False,
        input_shape=(SIZE, SIZE, 3),
    )
    deeplab = keras_cv.models.DeepLabV3Plus(backbone=encoder, num_classes=5)
    model = backbones.from_keras_cv(deeplab, HeteroscedasticLogits(NUM_CLASSES))
    x = np.zeros((1, SIZE, SIZE, 3), "float32")
    assert tuple(model(x).shape) == (1, SIZE, SIZE, 2 * NUM_CLASSES)
    # The keras-cv classifier (5 classes) is cut off and frozen.
    assert all("segmentation_output" not in w.path for w in model.trainable_weights)
    _round_trip(model, x, tmp_path)


def test_preset_without_network_raises_for_keras_cv(no_network):
    # keras-cv is a test dependency: without it this fails (ImportError), it does not skip.
    import keras_cv  # noqa: F401

    with pytest.raises(PresetUnavailableError) as info:
        backbones.from_keras_cv("mobilenet_v3_large_imagenet", CategoricalLogits(NUM_CLASSES))
    assert "'mobilenet_v3_large_imagenet'" in str(info.value)
    assert "keras_cv.models.MobileNetV3Backbone.from_preset" in str(info.value)


def test_interpolation_matrix_rows_sum_to_one():
    # The equivalence above rests on bilinear weights forming a partition of unity.
    u = _interpolation_matrix(3, 4, 12, 16)
    np.testing.assert_allclose(u.sum(axis=1), 1.0, atol=1e-6)
    assert (u >= 0).all()


@pytest.mark.slow
def test_local_segmenter_preset_folder_is_used_as_is(tmp_path, no_network):
    source = build_backbone("deeplabv3plus_resnet").encoder
    folder = tmp_path / "my_deeplab"
    source.save_to_preset(str(folder))
    backbone = build_backbone("deeplabv3plus_resnet", num_channels=1, preset=str(folder))
    assert isinstance(backbone.encoder, keras_hub.models.DeepLabV3Backbone)
    x = np.random.default_rng(5).normal(size=(1, SIZE, SIZE, 3)).astype("float32")
    np.testing.assert_allclose(
        np.asarray(backbone.encoder(x)), np.asarray(source(x)), rtol=1e-5, atol=1e-5
    )
