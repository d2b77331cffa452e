"""The catalog of named backbones: `BACKBONE_NAMES` (the one list) and `build_backbone`.

Every name the CLI, the experiment configs and the benchmarks accept is listed here once;
`build_backbone` builds each from config (nothing is downloaded unless a remote `preset` is
named).
"""

from __future__ import annotations

import os
from typing import Optional

import keras

from tfp_seg import _checks
from tfp_seg.models import unet
from tfp_seg.models.backbones import keras_cv, keras_hub

__all__ = ["BACKBONE_NAMES", "build_backbone"]


BACKBONE_NAMES = (
    "unet",
    "resnet_fpn",
    "deeplabv3plus_resnet",
    "deeplabv3_mobilenetv3",
    "segformer_mit_b0",
    "keras_cv_deeplabv3plus_resnet",
    "keras_cv_segformer_mit_b0",
)
"""The backbone names `build_backbone` (and `tfp-seg train --backbone`) accepts."""
_SIZES = ("small", "full")
# Families whose encoder fixes its spatial grid at construction (MiT reshapes tokens with
# static sizes; keras-cv's SegFormer builds its Resizing layers from static shapes).
_STATIC_SIZE = ("segformer_mit_b0", "keras_cv_segformer_mit_b0")


def _image_shape(name: str, num_channels, input_shape):
    if input_shape is None:
        channels = 3 if num_channels is None else num_channels
        input_shape = (None, None, channels)
    input_shape = tuple(input_shape)
    if len(input_shape) == 2:
        input_shape = input_shape + (3 if num_channels is None else num_channels,)
    if len(input_shape) == 4:
        raise ValueError(
            f"`input_shape` {input_shape!r} is a volume (D, H, W, C), but the named backbones "
            "are 2D (images (H, W, C)); for volumes use tfp_seg.models.UNet(spatial_dims=3)."
        )
    if len(input_shape) != 3:
        raise ValueError(f"`input_shape` must be (H, W, C) or (H, W); got {input_shape!r}.")
    if num_channels is not None and input_shape[-1] != num_channels:
        raise ValueError(
            f"`num_channels` ({num_channels}) and `input_shape` {input_shape} disagree."
        )
    channels = input_shape[-1]
    _checks.positive_int(
        channels, "channels", message="The channel count must be {what}; got {value}."
    )
    if name in _STATIC_SIZE and None in input_shape[:2]:
        raise ValueError(
            f"Backbone {name!r} needs a static input size: its encoder fixes the patch/feature "
            "grid when it is built. Pass input_shape=(H, W, C), e.g. build_backbone("
            f"{name!r}, input_shape=(64, 64, {channels})), with H and W divisible by 32."
        )
    return input_shape


def build_backbone(
    name: str,
    num_channels: Optional[int] = None,
    input_shape: Optional[tuple] = None,
    size: str = "small",
    preset: Optional[str] = None,
    weights: Optional[str] = None,
    **overrides,
) -> keras.Model:
    """A named backbone `images [B, H, W, num_channels] -> features [B, H, W, F]`.

    ```none
    name                            encoder (small / full)              features -> H x W
    unet                            tfp_seg UNet(16, depth 3) / UNet()  already H x W
    deeplabv3plus_resnet            keras-hub ResNet 4x1 basic, 64 ch   DeepLabV3+ decoder (256)
                                    / ResNet-50
    deeplabv3_mobilenetv3           keras-hub MobileNetV3-small-0.5     DeepLabV3 ASPP (256)
                                    / -large-1.0
    segformer_mit_b0                keras-hub MiT-B0                    SegFormer MLP decoder
                                                                        (64 / 256 ch), x4
    resnet_fpn                      keras-hub ResNet as above           FPN P2..P5 (32 / 256), x4
    keras_cv_deeplabv3plus_resnet   keras-cv ResNet / ResNet-50         DeepLabV3+ (256)
    keras_cv_segformer_mit_b0       keras-cv MiT-B0                     SegFormer (64 / 256), x4
    ```

    Everything is built from config (random weights); nothing is downloaded unless `preset`
    names a remote preset. Images are channels-last; 1-channel images are repeated to the
    encoder's 3 channels inside the model (`num_channels=1`). Images only: a volume
    `input_shape=(D, H, W, C)` is a `ValueError` (volumes take `UNet(spatial_dims=3)`).

    Args:
      name: one of `BACKBONE_NAMES`.
      num_channels: image channels (default 3, or `input_shape[-1]`).
      input_shape: `(H, W, C)`; `H`, `W` may be None (any size divisible by 32) except for
        the SegFormer families (MiT), which need a static size.
      size: "small" (CPU-friendly default) or "full" (the published configuration).
      preset: a keras-hub preset name or local preset folder for the *encoder* (ResNet,
        MobileNetV3, MiT) instead of the config; remote presets need network
        (`PresetUnavailableError` otherwise).
      weights: a `.weights.h5` file (from `encoder.save_weights`) loaded into the encoder
        (`model.encoder` of the returned adapter; for "unet" the whole U-Net).
      **overrides: keyword arguments of the encoder's constructor (e.g. `stackwise_num_blocks`,
        or `base_filters`, `depth`, `dropout` for "unet"), plus `fusion_filters` /
        `projection_filters` for the decoders.

    Returns:
      "unet": a `UNet`; otherwise a `BackboneAdapter` whose `.encoder` is the hub model.

    #### Examples

    ```python
    backbone = tfp_seg.models.build_backbone("deeplabv3plus_resnet", num_channels=1)
    model = tfp_seg.models.ProbabilisticSegmenter(backbone, tfp_seg.layers.LowRankLogits(3))
    ```
    """
    if name not in BACKBONE_NAMES:
        raise ValueError(f"`name` must be one of {BACKBONE_NAMES}; got {name!r}.")
    if size not in _SIZES:
        raise ValueError(f"`size` must be one of {_SIZES}; got {size!r}.")
    if weights is not None:
        weights = os.fspath(weights)
        if not weights.endswith(".weights.h5"):
            raise ValueError(f"`weights` must be a `.weights.h5` file; got {weights!r}.")
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"`weights` file {weights!r} does not exist.")
    image_shape = _image_shape(name, num_channels, input_shape)
    if name == "unet":
        if preset is not None:
            raise ValueError("The built-in 'unet' has no presets; pass `weights=` instead.")
        config = dict(base_filters=16, depth=3) if size == "small" else {}
        config.update(overrides)
        model = unet.UNet(**config)
        if weights is not None:
            model.build((None,) + image_shape)
            model.load_weights(weights)
        return model
    if name.startswith("keras_cv_"):
        adapter = keras_cv.build(name, image_shape, size, preset, overrides)
    else:
        adapter = keras_hub.build(name, image_shape, size, preset, overrides)
    if weights is not None:
        adapter.encoder.load_weights(weights)
    return adapter
