"""`BackboneAdapter`: a keras-hub / keras-cv model as a backbone at the input resolution.

`BackboneAdapter` wraps a hub model (an encoder, a feature pyramid, or a segmenter's decoder)
in a serialisable functional Keras model that returns features **at the input resolution**,
so any `DistributionHead` (deterministic, heteroscedastic, SSN) sits on top unchanged; `adapt`
picks the wrapping for an encoder, shared by `from_keras_hub` and `from_keras_cv`.

#### Resolution strategy

```none
hub model                        features (stride s)     adapter returns
DeepLabV3 / V3+ (keras-hub)      input resolution        them unchanged (the model upsamples)
SegFormer (MiT)                  s = 4                   bilinear resize x4 of the features
plain encoder (ResNet, MiT,      P2..P5, s = 4..32       FPN fusion to P2, then bilinear x4
  MobileNetV3) feature pyramid
```

The adapter upsamples **features**, and the head predicts at full resolution. For the
heads' default 1x1 kernel this is exactly the same distribution as predicting parameters at
feature resolution and upsampling the *parameters*: bilinear weights are non-negative and sum
to one, so for the affine head `A f + b`

```none
head(U f) = A (U f) + b = U (A f + b) = U head(f)        (per pixel; U = interpolation matrix)
```

and then, for `LowRankLogits` (loc mu, raw diagonal d, factor P, all upsampled by U):

```none
mu'  = U mu
P'   = U P                       -> covariance factor part  U P P^T U^T   (rank <= R, exact)
D'   = transform(U d) + epsilon  -> diagonal part: the upsampled *raw* diagonal, not U D U^T
Cov' = U P P^T U^T + diag(D')
```

So upsampling keeps the covariance low rank and carries the factor part exactly (the pushforward
of the low-resolution factor), while the diagonal is interpolated per pixel (independent noise
stays independent rather than becoming correlated as in `U D U^T`). `tests/test_backbones.py`
checks this against a dense covariance and checks `head(U f) == U head(f)`. The two orders
differ only in cost: upsampling features resizes F channels and runs the head at H*W pixels,
upsampling parameters resizes `head.params_size` channels and runs the head at H*W/s^2 pixels.
`benchmarks/bench_backbones.py` measured both side by side on CPU (2 shared cores, 64x64,
batch 2, SSN rank 10, C = 3; parameter counts are identical, the head is the same 1x1 conv):

```none
train step (ms)         upsample features   upsample parameters   ratio
ResNet-FPN (F = 32)     27 / 47             31 / 41               1.14 / 0.88   (two runs)
SegFormer-B0 (F = 64)   69 / 109            73 / 121              1.07 / 1.11
```

No consistent difference (within the +-15 % run-to-run noise, either sign): the head's 1x1
conv at full resolution (64*64*F*36 MACs) is small next to the encoder. We keep feature
upsampling: it leaves `ProbabilisticSegmenter` unchanged (its backbone returns features at the
input resolution) and stays correct for heads with `kernel_size > 1`, for which the two orders
differ.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import keras
import tensorflow as tf

from tfp_seg import _checks
from tfp_seg.models import segmenter as segmenter_lib
from tfp_seg.models.backbones import presets

__all__ = ["BackboneAdapter", "PyramidEncoder", "ResizeToReference", "detect_pyramid_layers"]

INTERPOLATIONS = ("bilinear", "nearest")
_PROBE_SIZE = 256


@keras.saving.register_keras_serializable(package="tfp_seg")
class ResizeToReference(keras.layers.Layer):
    """Resize `x [B, h, w, F]` to the spatial size of `reference [B, H, W, ...]`.

    `call([x, reference])` returns `[B, H, W, F]` (`tf.image.resize`, half-pixel centres, the
    same as `keras.layers.UpSampling2D(interpolation="bilinear")` for integer factors). The size
    is read at run time, so inputs of any size work; equal static sizes skip the resize.

    Args:
      interpolation: "bilinear" or "nearest".
    """

    def __init__(self, interpolation: str = "bilinear", **kwargs):
        super().__init__(**kwargs)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"`interpolation` must be one of {INTERPOLATIONS}; got {interpolation!r}."
            )
        self.interpolation = interpolation

    def call(self, inputs):
        x, reference = inputs
        if x.shape.rank != 4 or reference.shape.rank < 3:
            raise ValueError(
                "ResizeToReference takes [x [B, h, w, F], reference [B, H, W, ...]]; got shapes "
                f"{tuple(x.shape)} and {tuple(reference.shape)}."
            )
        static_ref, static_x = reference.shape[1:3], x.shape[1:3]
        if static_ref.is_fully_defined() and static_ref == static_x:
            return x
        size = tf.shape(reference)[1:3]
        resized = tf.image.resize(x, size, method=self.interpolation)
        return tf.cast(resized, x.dtype)

    def compute_output_shape(self, input_shape):
        x_shape, ref_shape = input_shape
        return (x_shape[0], ref_shape[1], ref_shape[2], x_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update({"interpolation": self.interpolation})
        return config


@keras.saving.register_keras_serializable(package="tfp_seg")
class PyramidEncoder(keras.Model):
    """Expose a plain CNN encoder's intermediate outputs as a feature pyramid.

    A functional model `images -> {"P<k>": features at stride 2^k}` with the
    `pyramid_outputs` property of keras-hub's `FeaturePyramidBackbone`, so encoders without one
    (keras-hub `MobileNetBackbone`, `keras.applications` models) work with
    `keras_hub.models.DeepLabV3Backbone` and with `BackboneAdapter`'s FPN fusion.

    Args:
      encoder: a functional Keras model.
      pyramid_layers: `{"P<k>": layer}` with `layer` an index into `encoder.layers` or a layer
        name (stored as an index: auto-generated names change when a model is rebuilt).
        Default: detected by running the encoder symbolically on a probe image and taking, for
        each stride 2^k (k >= 1, up to the encoder's output stride), the last layer whose
        output has that stride.
    """

    def __init__(self, encoder, pyramid_layers: Optional[dict] = None, **kwargs):
        if not isinstance(encoder, keras.Model) or not getattr(encoder, "inputs", None):
            raise ValueError(
                f"`encoder` must be a functional keras.Model; got {type(encoder).__name__}."
            )
        if pyramid_layers is None:
            pyramid_layers = detect_pyramid_layers(encoder)
        if not pyramid_layers:
            raise ValueError(f"No feature pyramid levels found in encoder {encoder.name!r}.")
        indices = {}
        for key, layer in pyramid_layers.items():
            if isinstance(layer, str):
                layer = encoder.layers.index(encoder.get_layer(layer))
            if isinstance(layer, bool) or not isinstance(layer, int):
                raise ValueError(
                    f"`pyramid_layers` values must be layer indices or names; got {layer!r}."
                )
            indices[str(key)] = layer
        outputs = {key: encoder.layers[i].output for key, i in indices.items()}
        super().__init__(inputs=encoder.inputs, outputs=outputs, **kwargs)
        self.encoder = encoder
        self.pyramid_layers = indices
        self._pyramid = outputs

    @property
    def pyramid_outputs(self) -> dict:
        """`{"P<k>": KerasTensor}` (keras-hub's `FeaturePyramidBackbone` interface)."""
        return dict(self._pyramid)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "pyramid_layers": dict(self.pyramid_layers),
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        encoder = keras.saving.deserialize_keras_object(config.pop("encoder"))
        return cls(encoder, **config)


def detect_pyramid_layers(encoder, probe_size: int = _PROBE_SIZE) -> dict:
    """`{"P<k>": index}`: the last layer of `encoder` at each stride 2^k (see PyramidEncoder)."""
    image = encoder.inputs[0]
    height, width, channels = image.shape[1:]
    height = height or probe_size
    width = width or probe_size
    candidates = []
    for index, layer in enumerate(encoder.layers):
        if isinstance(layer, keras.layers.InputLayer) or len(layer._inbound_nodes) != 1:
            continue
        output = layer.output
        if isinstance(output, keras.KerasTensor) and len(output.shape) == 4:
            candidates.append(index)
    if not candidates:
        return {}
    probe = keras.Model(encoder.inputs, [encoder.layers[i].output for i in candidates])
    specs = probe.compute_output_spec(keras.KerasTensor((1, height, width, channels)))
    final = keras.Model(encoder.inputs, encoder.outputs[0]).compute_output_spec(
        keras.KerasTensor((1, height, width, channels))
    )
    final_stride = height // final.shape[1] if len(final.shape) == 4 else math.inf
    levels = {}
    for index, spec in zip(candidates, specs, strict=True):
        size = spec.shape[1]
        if not size or height % size:
            continue
        stride = height // size
        if stride < 2 or stride > final_stride or stride & (stride - 1):
            continue
        levels[int(math.log2(stride))] = index  # later layers win: the end of each stage
    return {f"P{k}": levels[k] for k in sorted(levels)}


def pyramid_of(encoder) -> dict:
    """`{"P<k>": KerasTensor}` of a keras-hub (`pyramid_outputs`) or keras-cv encoder."""
    pyramid = getattr(encoder, "pyramid_outputs", None)
    if pyramid:
        return dict(pyramid)
    names = getattr(encoder, "pyramid_level_inputs", None)  # keras-cv backbones
    if names:
        return {key: encoder.get_layer(name).output for key, name in names.items()}
    return {}


def level_number(key: str) -> int:
    """The k of a pyramid key "P<k>" (0 if it has none)."""
    try:
        return int(str(key).lstrip("Pp"))
    except ValueError:
        return 0


def _strides(encoder, pyramid: dict) -> dict:
    """Stride of each pyramid level, from a symbolic probe of the encoder."""
    image = encoder.inputs[0]
    height, width, channels = image.shape[1:]
    height, width = height or _PROBE_SIZE, width or _PROBE_SIZE
    keys = list(pyramid)
    probe = keras.Model(encoder.inputs, [pyramid[k] for k in keys])
    specs = probe.compute_output_spec(keras.KerasTensor((1, height, width, channels)))
    if not isinstance(specs, (list, tuple)):
        specs = [specs]
    return {key: height // spec.shape[1] for key, spec in zip(keys, specs, strict=True)}


@keras.saving.register_keras_serializable(package="tfp_seg")
class BackboneAdapter(keras.Model):
    """Wrap a keras-hub / keras-cv model so it returns features at the input resolution.

    ```none
    images [B, H, W, input_channels]
      -> (1 channel: repeat to the encoder's 3; other mismatch: learned 1x1 conv)
      -> encoder
      -> features: the encoder's output (feature_level=None)           [B, H/s, W/s, F]
                   or one pyramid level ("P3")
                   or several levels fused FPN-style (lateral 1x1 convs to `fusion_filters`,
                   top-down bilinear upsampling + add, 3x3 conv-BN-ReLU at the finest level)
      -> bilinear resize to H x W (upsample="bilinear"; None keeps stride s)  [B, H, W, F]
    ```

    See the module docstring for why features (not distribution parameters) are upsampled.
    Images only (`spatial_dims = 2`): keras-hub and keras-cv encoders are 2D, so a head with
    `spatial_dims=3` on an adapter is a `ValueError`; use `tfp_seg.models.UNet(spatial_dims=3)`
    for volumes.

    Args:
      encoder: a functional Keras model: a keras-hub `Backbone` (`DeepLabV3Backbone`,
        `SegFormerBackbone`, a `FeaturePyramidBackbone` such as `ResNetBackbone`/`MiTBackbone`),
        a `PyramidEncoder`, a keras-cv backbone, or any model mapping images to features.
      feature_level: None (the encoder's output), a pyramid key such as "P3", or a sequence of
        keys to fuse. Use `"auto"` for every pyramid level at stride >= 4.
      fusion_filters: channels of the FPN fusion (used when several levels are fused).
      upsample: "bilinear", "nearest" or None.
      input_channels: channels of the images the adapter takes (default: the encoder's).

    #### Examples

    ```python
    encoder = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 64, 64, 64], stackwise_num_blocks=[1, 1, 1, 1],
        stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block")
    backbone = BackboneAdapter(encoder, feature_level="auto", input_channels=1)
    backbone(np.zeros([2, 64, 64, 1])).shape     # ==> (2, 64, 64, 64)
    ```
    """

    def __init__(
        self,
        encoder,
        feature_level: Union[None, str, Sequence[str]] = None,
        fusion_filters: int = 64,
        upsample: Optional[str] = "bilinear",
        input_channels: Optional[int] = None,
        **kwargs,
    ):
        if not isinstance(encoder, keras.Model) or not getattr(encoder, "inputs", None):
            raise ValueError(
                "`encoder` must be a functional keras.Model (a keras-hub/keras-cv backbone); "
                f"got {type(encoder).__name__}."
            )
        if upsample is True:
            upsample = "bilinear"
        if upsample is False:
            upsample = None
        if upsample is not None and upsample not in INTERPOLATIONS:
            raise ValueError(
                f"`upsample` must be one of {INTERPOLATIONS} or None; got {upsample!r}."
            )
        fusion_filters = _checks.positive_int(fusion_filters, "fusion_filters")
        image_shape = tuple(encoder.inputs[0].shape[1:])
        if len(image_shape) != 3 or image_shape[-1] is None:
            raise ValueError(
                "`encoder` must take channels-last images [B, H, W, C] with a known C; its input "
                f"has shape {tuple(encoder.inputs[0].shape)}."
            )
        encoder_channels = image_shape[-1]
        input_channels = encoder_channels if input_channels is None else input_channels
        input_channels = _checks.positive_int(input_channels, "input_channels")
        levels = _resolve_levels(encoder, feature_level)

        # === Functional Model ===
        inputs = keras.Input(shape=image_shape[:2] + (input_channels,), name="images")
        x = inputs
        if input_channels != encoder_channels:
            if input_channels == 1:
                x = keras.layers.Concatenate(name="repeat_channels")([x] * encoder_channels)
            else:
                x = keras.layers.Conv2D(encoder_channels, 1, name="channel_projection")(x)
        if levels is None:
            features = encoder(x)
        else:
            pyramid = pyramid_of(encoder)
            extractor = keras.Model(
                encoder.inputs, [pyramid[k] for k in levels], name="pyramid_features"
            )
            outputs = extractor(x)
            outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
            if len(levels) == 1:
                features = outputs[0]
            else:
                features = _fpn(dict(zip(levels, outputs, strict=True)), fusion_filters)
        if not isinstance(features, keras.KerasTensor) or len(features.shape) != 4:
            raise ValueError(
                "The encoder must return one feature map [B, h, w, F]; got "
                f"{features!r}. Choose a pyramid level with `feature_level`."
            )
        if upsample is not None:
            features = ResizeToReference(upsample, name="feature_upsampling")([features, inputs])
        super().__init__(inputs=inputs, outputs=features, **kwargs)

        # === Config ===
        self.encoder = encoder
        self.feature_level = list(levels) if levels is not None else None
        self.fusion_filters = fusion_filters
        self.upsample = upsample
        self.input_channels = input_channels

    @property
    def output_channels(self) -> int:
        """F, the channels of the features the adapter returns."""
        return int(self.outputs[0].shape[-1])

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "feature_level": self.feature_level,
            "fusion_filters": self.fusion_filters,
            "upsample": self.upsample,
            "input_channels": self.input_channels,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        encoder = keras.saving.deserialize_keras_object(config.pop("encoder"))
        return cls(encoder, **config)


def _resolve_levels(encoder, feature_level):
    if feature_level is None:
        return None
    pyramid = pyramid_of(encoder)
    if not pyramid:
        raise ValueError(
            f"`feature_level`={feature_level!r} needs an encoder with a feature pyramid "
            f"(`pyramid_outputs`); {type(encoder).__name__} has none. Wrap it in "
            "tfp_seg.models.backbones.PyramidEncoder, or pass feature_level=None."
        )
    if isinstance(feature_level, str) and feature_level == "auto":
        strides = _strides(encoder, pyramid)
        levels = [k for k in pyramid if strides[k] >= 4] or list(pyramid)
    elif isinstance(feature_level, str):
        levels = [feature_level]
    else:
        levels = [str(k) for k in feature_level]
    unknown = [k for k in levels if k not in pyramid]
    if unknown or not levels:
        raise ValueError(
            f"`feature_level` {feature_level!r} names levels {unknown} that the encoder does not "
            f"have; its pyramid levels are {sorted(pyramid, key=level_number)}."
        )
    return sorted(dict.fromkeys(levels), key=level_number)


def _fpn(features: dict, filters: int):
    """FPN top-down fusion (Lin et al., 2017) of `{"P<k>": tensor}` to the finest level."""
    keys = sorted(features, key=level_number)
    laterals = {
        k: keras.layers.Conv2D(filters, 1, name=f"fpn_lateral_{k}")(features[k]) for k in keys
    }
    x = laterals[keys[-1]]
    for k in reversed(keys[:-1]):
        up = ResizeToReference("bilinear", name=f"fpn_upsample_{k}")([x, laterals[k]])
        x = keras.layers.Add(name=f"fpn_add_{k}")([laterals[k], up])
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name="fpn_output_conv")(x)
    x = keras.layers.BatchNormalization(name="fpn_output_norm")(x)
    return keras.layers.ReLU(name="fpn_output_relu")(x)


def adapt(
    encoder,
    feature_level="default",
    fusion_filters: int = 64,
    upsample: Optional[str] = "bilinear",
    input_channels: Optional[int] = None,
) -> BackboneAdapter:
    """`BackboneAdapter` for an encoder; pyramid-less CNNs get a `PyramidEncoder` + FPN."""
    if isinstance(encoder, BackboneAdapter):
        return encoder
    if isinstance(feature_level, str) and feature_level == "default":
        if is_decoder(encoder):
            feature_level = None
        elif pyramid_of(encoder):
            feature_level = "auto"
        elif _needs_pyramid(encoder):
            encoder, feature_level = PyramidEncoder(encoder), "auto"
        else:
            feature_level = None
    elif feature_level is not None and not pyramid_of(encoder):
        encoder = PyramidEncoder(encoder)
    return BackboneAdapter(
        encoder,
        feature_level=feature_level,
        fusion_filters=fusion_filters,
        upsample=upsample,
        input_channels=input_channels,
    )


def is_decoder(encoder) -> bool:
    """A keras-hub DeepLabV3 / SegFormer backbone: its decoder output is used as is."""
    try:
        keras_hub = presets.import_keras_hub()
    except ImportError:  # pragma: no cover
        return False
    decoders = (keras_hub.models.DeepLabV3Backbone, keras_hub.models.SegFormerBackbone)
    return isinstance(encoder, decoders)


def _needs_pyramid(encoder) -> bool:
    """A CNN classifier backbone (output stride >= 8, no pyramid) gets an FPN over its stages."""
    if pyramid_of(encoder):
        return False
    try:
        levels = detect_pyramid_layers(encoder)
    except Exception:
        return False
    return len(levels) >= 2 and max(level_number(k) for k in levels) >= 3


def check_image_head(head) -> None:
    """Raise if `head` is for volumes (`spatial_dims=3`): the hub encoders are 2D."""
    if getattr(head, "spatial_dims", 2) != 2:
        raise ValueError(
            f"keras-hub / keras-cv backbones take images [B, H, W, channels] only "
            f"(spatial_dims=2); got a head with spatial_dims={head.spatial_dims}. For volumes "
            "use tfp_seg.models.UNet(spatial_dims=3) as the backbone."
        )


def built_segmenter(backbone: BackboneAdapter, head, validate_inputs: bool):
    """`ProbabilisticSegmenter(backbone, head)`, built for the adapter's input shape."""
    check_image_head(head)
    model = segmenter_lib.ProbabilisticSegmenter(backbone, head, validate_inputs=validate_inputs)
    model.build((None,) + tuple(backbone.inputs[0].shape[1:]))  # count_params() works at once
    return model
