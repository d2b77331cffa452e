"""keras-hub models as tfp_seg backbones: `from_keras_hub` and the named keras-hub configs.

```none
DeepLabV3ImageSegmenter / DeepLabV3Backbone -> its decoder features (already at H x W)
SegFormerImageSegmenter / SegFormerBackbone -> MLP-decoder features (H/4) -> bilinear x4
FeaturePyramidBackbone (ResNet, MiT, ...)   -> FPN over P2..P5 (stride >= 4) -> bilinear
MobileNetBackbone / other CNN encoder       -> PyramidEncoder -> FPN -> bilinear
```

`build(name, ...)` builds the keras-hub families of `tfp_seg.models.build_backbone` from config
(`catalog.py` lists the names).
"""

from __future__ import annotations

import os
from typing import Optional

import keras

from tfp_seg import protocols
from tfp_seg.models import segmenter as segmenter_lib
from tfp_seg.models.backbones import adapter, presets

__all__ = ["from_keras_hub"]


def _load_preset(preset: str, load_weights: bool = True):
    keras_hub = presets.import_keras_hub()
    if not os.path.isdir(preset) and os.path.exists(preset):
        raise ValueError(
            f"{preset!r} is a file, not a preset folder. Pass a `.weights.h5` file as "
            "`weights=` to tfp_seg.models.build_backbone, or a preset folder written by "
            "`backbone.save_to_preset(folder)`."
        )
    try:
        return keras_hub.models.Backbone.from_preset(preset, load_weights=load_weights)
    except Exception as e:
        if presets.is_network_error(e):
            message = presets.offline_message(preset, "keras-hub", e)
            raise presets.PresetUnavailableError(message) from e
        raise


def encoder_of(obj, load_weights: bool = True):
    """The functional keras-hub backbone inside `obj` (a preset, task, or backbone)."""
    keras_hub = presets.import_keras_hub()
    if isinstance(obj, (str, os.PathLike)):
        obj = _load_preset(os.fspath(obj), load_weights)
    if isinstance(obj, keras_hub.models.Task):
        obj = obj.backbone
    if not isinstance(obj, keras.Model):
        raise ValueError(
            "`backbone_or_segmenter` must be a keras-hub Backbone / ImageSegmenter, a keras.Model "
            f"or a preset name/folder; got {type(obj).__name__}."
        )
    return obj


def from_keras_hub(
    backbone_or_segmenter,
    head: protocols.Head,
    upsample: Optional[str] = "bilinear",
    feature_level="default",
    fusion_filters: int = 64,
    input_channels: Optional[int] = None,
    load_weights: bool = True,
    validate_inputs: bool = True,
) -> segmenter_lib.ProbabilisticSegmenter:
    """A `ProbabilisticSegmenter`: a keras-hub model's features -> `head`, at input resolution.

    ```none
    DeepLabV3ImageSegmenter / DeepLabV3Backbone -> its decoder features (already at H x W)
    SegFormerImageSegmenter / SegFormerBackbone -> MLP-decoder features (H/4) -> bilinear x4
    FeaturePyramidBackbone (ResNet, MiT, ...)   -> FPN over P2..P5 (stride >= 4) -> bilinear
    MobileNetBackbone / other CNN encoder       -> PyramidEncoder -> FPN -> bilinear
    preset name or local preset folder          -> keras_hub.models.Backbone.from_preset(...)
    ```

    The head's own classifier (of an `ImageSegmenter`) is dropped: the head predicts the
    distribution's parameters from the backbone's features. Features are upsampled before the
    head (equivalent to upsampling the parameters for 1x1 heads; see
    `tfp_seg.models.backbones.adapter`). keras-hub backbones are 2D: images
    `[B, H, W, channels]` only; a `head` with `spatial_dims=3` is a `ValueError` (volumes take
    `tfp_seg.models.UNet(spatial_dims=3)`).

    Args:
      backbone_or_segmenter: a keras-hub `Backbone`, `ImageSegmenter` (any `Task`: its
        `.backbone` is used), a functional `keras.Model`, or a preset name / local folder.
      head: a `tfp_seg.layers.DistributionHead`.
      upsample: "bilinear" (default), "nearest" or None (the features must then already be at
        the input resolution, or the segmenter raises).
      feature_level: "default" (see the table), None (the model's output), "auto" (all pyramid
        levels at stride >= 4), a level key "P3", or a list of keys to fuse.
      fusion_filters: FPN channels when several levels are fused.
      input_channels: image channels (default: the model's; 1 repeats grey images to RGB).
      load_weights: for presets: load the preset's weights (else its architecture only).
      validate_inputs: see `ProbabilisticSegmenter`.

    Raises:
      PresetUnavailableError: a preset could not be downloaded (no network); the message says
        how to build from config or use a local preset folder / `.weights.h5` file.

    #### Examples

    ```python
    encoder = keras_hub.models.MiTBackbone(                     # B0 sizes, from config
        layerwise_depths=[2, 2, 2, 2], num_layers=4, layerwise_num_heads=[1, 2, 5, 8],
        layerwise_sr_ratios=[8, 4, 2, 1], max_drop_path_rate=0.1,
        layerwise_patch_sizes=[7, 3, 3, 3], layerwise_strides=[4, 2, 2, 2],
        hidden_dims=[32, 64, 160, 256], image_shape=(64, 64, 3))
    segformer = keras_hub.models.SegFormerBackbone(image_encoder=encoder, projection_filters=64)
    model = tfp_seg.models.from_keras_hub(segformer, tfp_seg.layers.LowRankLogits(3, rank=10))
    model.compile(optimizer="adam", loss="auto")
    model(np.zeros([2, 64, 64, 3])).shape                       # ==> (2, 64, 64, 36)
    ```
    """
    if not isinstance(head, protocols.Head):
        raise ValueError(
            "`head` must be a distribution head (tfp_seg.protocols.Head, e.g. a "
            f"tfp_seg.layers.DistributionHead); got {type(head).__name__}."
        )
    adapter.check_image_head(head)
    encoder = encoder_of(backbone_or_segmenter, load_weights=load_weights)
    backbone = adapter.adapt(
        encoder,
        feature_level=feature_level,
        fusion_filters=fusion_filters,
        upsample=upsample,
        input_channels=input_channels,
    )
    return adapter.built_segmenter(backbone, head, validate_inputs)


def _resnet_config(size: str) -> dict:
    if size == "full":  # ResNet-50
        return dict(
            input_conv_filters=[64],
            input_conv_kernel_sizes=[7],
            stackwise_num_filters=[64, 128, 256, 512],
            stackwise_num_blocks=[3, 4, 6, 3],
            stackwise_num_strides=[1, 2, 2, 2],
            block_type="bottleneck_block",
        )
    # keras-hub's ResNet requires stackwise_num_filters[0] == 64.
    return dict(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 64, 64, 64],
        stackwise_num_blocks=[1, 1, 1, 1],
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="basic_block",
    )


def _mobilenetv3_config(size: str) -> dict:
    # keras-hub's MobileNetV3 configs (keras_hub/src/utils/timm/convert_mobilenet.py):
    # small = mobilenetv3_small_050, full = mobilenetv3_large_100.
    if size == "full":
        return dict(
            stackwise_num_blocks=[2, 3, 4, 2, 3],
            stackwise_expansion=[
                [64, 72],
                [72, 120, 120],
                [240, 200, 184, 184],
                [480, 672],
                [672, 960, 960],
            ],
            stackwise_num_filters=[
                [24, 24],
                [40, 40, 40],
                [80, 80, 80, 80],
                [112, 112],
                [160, 160, 160],
            ],
            stackwise_kernel_size=[[3, 3], [5, 5, 5], [3, 3, 3, 3], [3, 3], [5, 5, 5]],
            stackwise_num_strides=[[2, 1], [2, 1, 1], [2, 1, 1, 1], [1, 1], [2, 1, 1]],
            stackwise_se_ratio=[
                [None, None],
                [0.25, 0.25, 0.25],
                [None, None, None, None],
                [0.25, 0.25],
                [0.25, 0.25, 0.25],
            ],
            stackwise_activation=[
                ["relu", "relu"],
                ["relu", "relu", "relu"],
                ["hard_swish"] * 4,
                ["hard_swish"] * 2,
                ["hard_swish"] * 3,
            ],
            stackwise_padding=[[1, 1], [2, 2, 2], [1, 1, 1, 1], [1, 1], [2, 2, 2]],
            output_num_filters=1024,
            input_num_filters=16,
            depthwise_filters=16,
            depthwise_stride=1,
            depthwise_residual=True,
            squeeze_and_excite=None,
            last_layer_filter=960,
            input_activation="hard_swish",
            output_activation="hard_swish",
        )
    return dict(
        stackwise_num_blocks=[2, 3, 2, 3],
        stackwise_expansion=[[40, 56], [64, 144, 144], [72, 72], [144, 288, 288]],
        stackwise_num_filters=[[16, 16], [24, 24, 24], [24, 24], [48, 48, 48]],
        stackwise_kernel_size=[[3, 3], [5, 5, 5], [5, 5], [5, 5, 5]],
        stackwise_num_strides=[[2, 1], [2, 1, 1], [1, 1], [2, 1, 1]],
        stackwise_se_ratio=[[None, None], [0.25] * 3, [0.25] * 2, [0.25] * 3],
        stackwise_activation=[
            ["relu", "relu"],
            ["hard_swish"] * 3,
            ["hard_swish"] * 2,
            ["hard_swish"] * 3,
        ],
        stackwise_padding=[[1, 1], [2, 2, 2], [2, 2], [2, 2, 2]],
        output_num_filters=1024,
        input_num_filters=16,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        squeeze_and_excite=0.5,
        last_layer_filter=288,
        input_activation="hard_swish",
        output_activation="hard_swish",
    )


# MiT-B0 (Xie et al., 2021): the same encoder in both sizes; `size` scales the decoder.
_MIT_B0 = dict(
    num_layers=4,
    hidden_dims=[32, 64, 160, 256],
    layerwise_depths=[2, 2, 2, 2],
    layerwise_num_heads=[1, 2, 5, 8],
    layerwise_sr_ratios=[8, 4, 2, 1],
    layerwise_patch_sizes=[7, 3, 3, 3],
    layerwise_strides=[4, 2, 2, 2],
    max_drop_path_rate=0.1,
)


def build(name, image_shape, size, preset, overrides) -> adapter.BackboneAdapter:
    keras_hub = presets.import_keras_hub()
    overrides = dict(overrides)
    fusion_filters = overrides.pop("fusion_filters", 32 if size == "small" else 256)
    projection_filters = overrides.pop("projection_filters", 64 if size == "small" else 256)
    encoder_shape = image_shape[:2] + (3,)
    loaded = None
    if preset is not None:
        if overrides:
            raise ValueError(
                f"Pass either `preset` or encoder config overrides, not both; got {overrides}."
            )
        loaded = encoder_of(preset)
        if adapter.is_decoder(loaded):  # a DeepLabV3 / SegFormer preset: its decoder is used as is
            return adapter.BackboneAdapter(loaded, None, input_channels=image_shape[-1])

    def encoder_from(cls, config):
        if loaded is not None:
            return loaded
        config.update(overrides)
        return cls(image_shape=encoder_shape, **config)

    if name in ("deeplabv3plus_resnet", "resnet_fpn"):
        resnet = encoder_from(keras_hub.models.ResNetBackbone, _resnet_config(size))
        if name == "resnet_fpn":
            return adapter.BackboneAdapter(
                resnet, "auto", fusion_filters=fusion_filters, input_channels=image_shape[-1]
            )
        encoder = keras_hub.models.DeepLabV3Backbone(
            image_encoder=resnet,
            spatial_pyramid_pooling_key="P5",
            upsampling_size=8,
            dilation_rates=[6, 12, 18],
            low_level_feature_key="P2",
            projection_filters=48 if size == "full" else 16,
            image_shape=encoder_shape,
        )
    elif name == "deeplabv3_mobilenetv3":
        mobilenet = encoder_from(keras_hub.models.MobileNetBackbone, _mobilenetv3_config(size))
        encoder = keras_hub.models.DeepLabV3Backbone(
            image_encoder=adapter.PyramidEncoder(mobilenet),
            spatial_pyramid_pooling_key="P5",
            upsampling_size=8,
            dilation_rates=[6, 12, 18],
            image_shape=encoder_shape,
        )
    else:  # segformer_mit_b0
        mit = encoder_from(keras_hub.models.MiTBackbone, dict(_MIT_B0))
        encoder = keras_hub.models.SegFormerBackbone(
            image_encoder=mit, projection_filters=projection_filters
        )
    return adapter.BackboneAdapter(encoder, None, input_channels=image_shape[-1])
