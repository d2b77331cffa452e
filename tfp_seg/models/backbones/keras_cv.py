"""keras-cv 0.9 models as tfp_seg backbones (a legacy, optional extra): `from_keras_cv`.

```none
keras_cv.models.DeepLabV3Plus -> features before its softmax classifier (at H x W)
keras_cv.models.SegFormer     -> fused MLP-decoder features (H/4) -> bilinear x4
keras-cv backbone (ResNet, MobileNetV3, MiT; `pyramid_level_inputs`) -> FPN -> bilinear
```

`SegmenterFeatures` cuts a keras-cv segmenter before its classifier; `build(name, ...)` builds
the keras-cv families of `tfp_seg.models.build_backbone` from config.
"""

from __future__ import annotations

import os
from typing import Optional

import keras

from tfp_seg import protocols
from tfp_seg.models import segmenter as segmenter_lib
from tfp_seg.models.backbones import adapter, presets

__all__ = ["SegmenterFeatures", "from_keras_cv"]


@keras.saving.register_keras_serializable(package="tfp_seg")
class SegmenterFeatures(keras.Model):
    """A keras-cv segmenter cut before its classifier: `images -> decoder features`.

    ```none
    keras_cv.models.DeepLabV3Plus: concat(ASPP x8, low-level P2) -> conv-BN-ReLU -> x4  (H x W)
    keras_cv.models.SegFormer:     fused MLP-decoder features (after dropout)          (H/4)
    ```

    The segmenter is kept (and serialised with its own config, which round-trips where the
    functional graph of keras-cv 0.9's MiT layers does not); its classifier is frozen and unused.
    """

    def __init__(self, segmenter, **kwargs):
        keras_cv = presets.import_keras_cv()
        if isinstance(segmenter, keras_cv.models.DeepLabV3Plus):
            concat = [
                layer for layer in segmenter.layers if isinstance(layer, keras.layers.Concatenate)
            ]
            if len(concat) != 1:
                raise ValueError("Could not find DeepLabV3Plus's encoder-decoder concatenation.")
            x = concat[0].output
            head_layers = list(segmenter.segmentation_head.layers)
            classifier = head_layers[-1] if head_layers else None
            if isinstance(classifier, keras.layers.Conv2D):
                head_layers = head_layers[:-1]
            for layer in head_layers:
                x = layer(x)
        elif isinstance(segmenter, keras_cv.models.SegFormer):
            dropouts = [
                layer for layer in segmenter.layers if isinstance(layer, keras.layers.Dropout)
            ]
            if not dropouts:
                raise ValueError("Could not find the keras-cv SegFormer's decoder features.")
            x = dropouts[-1].output
            classifier = segmenter.layers[segmenter.layers.index(dropouts[-1]) + 1]
        else:
            raise ValueError(
                "SegmenterFeatures takes a keras_cv.models.DeepLabV3Plus or SegFormer; got "
                f"{type(segmenter).__name__}."
            )
        super().__init__(inputs=segmenter.inputs, outputs=x, **kwargs)
        if isinstance(classifier, keras.layers.Conv2D):
            classifier.trainable = False  # not part of the feature graph
        self.segmenter = segmenter

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "segmenter": keras.saving.serialize_keras_object(self.segmenter),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        segmenter = keras.saving.deserialize_keras_object(config.pop("segmenter"))
        return cls(segmenter, **config)


def segmenter_features(model):
    """Cut a keras-cv segmenter before its classifier; other models pass through."""
    keras_cv = presets.import_keras_cv()
    if isinstance(model, (keras_cv.models.DeepLabV3Plus, keras_cv.models.SegFormer)):
        return SegmenterFeatures(model, name=f"{model.name}_features")
    return model


def _preset_class(preset: str):
    """The keras-cv model class that lists `preset` (keras-cv's base `Backbone` lists none)."""
    keras_cv = presets.import_keras_cv()
    # Skip aliases (e.g. ResNet50Backbone): they define `__new__`, not `__init__`.
    classes = [getattr(keras_cv.models, name) for name in sorted(dir(keras_cv.models))]
    classes = [c for c in classes if isinstance(c, type) and "__init__" in vars(c)]
    # Tasks list their backbones' presets too: look in backbones first.
    classes.sort(key=lambda c: not issubclass(c, keras_cv.models.Backbone))
    for cls in classes:
        try:
            if preset in cls.presets:
                return cls
        except Exception:  # classes without a usable `presets`
            continue
    return keras_cv.models.Backbone


def load_preset(preset: str, load_weights: bool = True):
    cls = _preset_class(preset)
    try:
        return cls.from_preset(preset, load_weights=load_weights)
    except Exception as e:
        if presets.is_network_error(e):
            message = presets.offline_message(preset, "keras-cv", e).replace(
                "keras_hub.models.Backbone", f"keras_cv.models.{cls.__name__}"
            )
            raise presets.PresetUnavailableError(message) from e
        raise


def from_keras_cv(
    model_or_backbone,
    head: protocols.Head,
    upsample: Optional[str] = "bilinear",
    feature_level="default",
    fusion_filters: int = 64,
    input_channels: Optional[int] = None,
    load_weights: bool = True,
    validate_inputs: bool = True,
) -> segmenter_lib.ProbabilisticSegmenter:
    """`from_keras_hub` for keras-cv 0.9 models (an optional, no longer developed extra).

    ```none
    keras_cv.models.DeepLabV3Plus -> features before its softmax classifier (at H x W)
    keras_cv.models.SegFormer     -> fused MLP-decoder features (H/4) -> bilinear x4
    keras-cv backbone (ResNet, MobileNetV3, MiT; `pyramid_level_inputs`) -> FPN -> bilinear
    preset name                   -> keras_cv.models.Backbone.from_preset(...)
    ```

    keras-cv 0.9.0 imports and trains with Keras 3.15 / TF 2.21 (checked by the tests). Its
    aliases such as `keras_cv.models.MobileNetV3SmallBackbone()` fetch their config from Kaggle
    even without weights, so they fail offline: build the base classes from config instead
    (as `build_backbone("keras_cv_...")` does). Arguments as in `from_keras_hub`. Images
    only, as there: a `head` with `spatial_dims=3` is a `ValueError`.
    """
    if not isinstance(head, protocols.Head):
        raise ValueError(
            "`head` must be a distribution head (tfp_seg.protocols.Head, e.g. a "
            f"tfp_seg.layers.DistributionHead); got {type(head).__name__}."
        )
    adapter.check_image_head(head)
    presets.import_keras_cv()
    model = model_or_backbone
    if isinstance(model, (str, os.PathLike)):
        model = load_preset(os.fspath(model), load_weights)
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`model_or_backbone` must be a keras-cv model or preset; got {type(model).__name__}."
        )
    encoder = segmenter_features(model)
    if encoder is not model and isinstance(feature_level, str) and feature_level == "default":
        feature_level = None  # a segmenter cut before its classifier: use its decoder output
    backbone = adapter.adapt(
        encoder,
        feature_level=feature_level,
        fusion_filters=fusion_filters,
        upsample=upsample,
        input_channels=input_channels,
    )
    return adapter.built_segmenter(backbone, head, validate_inputs)


def build(name, image_shape, size, preset, overrides) -> adapter.BackboneAdapter:
    keras_cv = presets.import_keras_cv()
    overrides = dict(overrides)
    projection_filters = overrides.pop("projection_filters", 64 if size == "small" else 256)
    encoder_shape = image_shape[:2] + (3,)
    if preset is not None:
        encoder = load_preset(preset)
        if isinstance(encoder, (keras_cv.models.DeepLabV3Plus, keras_cv.models.SegFormer)):
            features = SegmenterFeatures(encoder, name=f"{encoder.name}_features")
            return adapter.BackboneAdapter(features, None, input_channels=image_shape[-1])
    elif name == "keras_cv_deeplabv3plus_resnet":
        config = (
            dict(
                stackwise_filters=[64, 32, 32, 32],
                stackwise_blocks=[1, 1, 1, 1],
                stackwise_strides=[1, 2, 2, 2],
                block_type="basic_block",
            )
            if size == "small"
            else dict(
                stackwise_filters=[64, 128, 256, 512],
                stackwise_blocks=[3, 4, 6, 3],
                stackwise_strides=[1, 2, 2, 2],
                block_type="block",
            )
        )
        config.update(overrides)
        encoder = keras_cv.models.ResNetBackbone(
            include_rescaling=False, input_shape=encoder_shape, **config
        )
    else:
        config = dict(depths=[2, 2, 2, 2], embedding_dims=[32, 64, 160, 256])
        config.update(overrides)
        encoder = keras_cv.models.MiTBackbone(
            include_rescaling=False, input_shape=encoder_shape, **config
        )
    if name == "keras_cv_deeplabv3plus_resnet":
        model = keras_cv.models.DeepLabV3Plus(
            backbone=encoder, num_classes=2, projection_filters=48 if size == "full" else 16
        )
    else:
        model = keras_cv.models.SegFormer(
            backbone=encoder, num_classes=2, projection_filters=projection_filters
        )
    return adapter.BackboneAdapter(segmenter_features(model), None, input_channels=image_shape[-1])
