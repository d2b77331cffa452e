"""`ProbabilisticSegmenter`: any backbone + a distribution head, as one Keras model."""

from __future__ import annotations

import json
from typing import Generic, TypeVar

import keras
import tensorflow as tf

from tfp_seg import _checks, metrics, protocols
from tfp_seg.models import _spatial, sampling

__all__ = ["ProbabilisticSegmenter"]

# The head's class: `ProbabilisticSegmenter(backbone, LowRankLogits(...)).head` is typed as a
# LowRankLogits (with its `default_loss`, `split_params`, ...) for a type checker.
HeadT = TypeVar("HeadT", bound=protocols.Head)


@keras.saving.register_keras_serializable(package="tfp_seg")
class ProbabilisticSegmenter(sampling.Sampler, keras.Model, Generic[HeadT]):
    """A segmentation model whose output is a distribution over per-pixel logits.

    `model(images)` returns the head's packed parameters `[B, *S, head.params_size]` (Keras
    models must output tensors); the distribution and its samples are derived from them.
    `S = (H, W)` for images and `(D, H, W)` for volumes: the rank is the head's
    `spatial_dims` (one code path for both), and a backbone that states another rank (a
    `UNet(spatial_dims=...)`, a functional model's input; keras-hub / keras-cv backbones are
    2D) is a `ValueError` at construction.

    ```none
    images [B, *S, channels] -> backbone -> features [B, *S, F] -> head -> params [B, *S, P]
    sample_logits [N, B, *S, C],  sample [N, B, *S],  predict_proba [B, *S, C]
    ```

    A head that takes a region of interest (`LowRankLogits`, `MixtureLowRankLogits`: outside
    it the logits are independent with a tiny variance) gets it as a second input: call,
    `fit`, `predict` and every read-out (`sample`, `predict_proba`, ...) take
    `{"images": [B, *S, channels], "roi_mask": [B, *S]}` in place of the images, e.g.
    `model.fit({"images": x, "roi_mask": brain_masks}, labels)`.

    Args:
      backbone: a Keras model/layer `images [B, *S, channels] -> features [B, *S, F]`
        (for example `tfp_seg.models.UNet()`), at the input resolution.
      head: a distribution head layer (`tfp_seg.protocols.Head`), e.g. a
        `tfp_seg.layers.DistributionHead`; its `spatial_dims` sets the model's.
      validate_inputs: fail at run time on NaN/Inf images.

    #### Examples

    ```python
    model = tfp_seg.models.ProbabilisticSegmenter(
        tfp_seg.models.UNet(base_filters=16, depth=3),
        tfp_seg.layers.LowRankLogits(num_classes=3, rank=10))
    model.compile(optimizer="adam", loss="auto")    # the head's NLL
    model.fit(images, labels, epochs=5)
    probs = model.predict_proba(images, num_samples=16)   # ==> [B, H, W, 3]
    maps = model.sample(images, num_samples=8)            # ==> [8, B, H, W]
    volumes = tfp_seg.models.ProbabilisticSegmenter(   # images [B, D, H, W, channels]
        tfp_seg.models.UNet(base_filters=8, depth=2, spatial_dims=3),
        tfp_seg.layers.LowRankLogits(num_classes=4, rank=10, spatial_dims=3))
    ```
    """

    # The read-outs (`sample`, `predict_proba`, ...) run as cached `tf.function`s.
    _compile_read_outs = True

    def __init__(self, backbone, head: HeadT, validate_inputs: bool = True, **kwargs):
        super().__init__(**kwargs)
        if not (isinstance(head, protocols.Head) and isinstance(head, keras.layers.Layer)):
            raise ValueError(
                "`head` must be a distribution head layer (a keras Layer that is a "
                "tfp_seg.protocols.Head, e.g. a tfp_seg.layers.DistributionHead); got "
                f"{type(head).__name__}."
            )
        if not callable(backbone):
            raise ValueError(f"`backbone` must be a callable Keras model; got {backbone!r}.")
        if getattr(backbone, "ensemble", None) is not None:
            raise ValueError(
                f"`backbone` is an efficient ensemble (ensemble={backbone.ensemble!r}, "
                f"ensemble_size={getattr(backbone, 'ensemble_size', None)}): its features hold "
                "every member's rows, [M*B, H, W, F]. Put the head on it with "
                "tfp_seg.models.EnsembleSegmenter(backbone, head), which trains each member on "
                "the batch and samples the members."
            )
        _spatial.check_backbone_rank(backbone, head.spatial_dims, f"The head {type(head).__name__}")
        self.backbone = backbone
        self.head: HeadT = head
        self.validate_inputs = bool(validate_inputs)

    @property
    def num_classes(self) -> int:
        """C, the number of classes of the head."""
        return self.head.num_classes

    @property
    def spatial_dims(self) -> int:
        """2 (images `[B, H, W, channels]`) or 3 (volumes `[B, D, H, W, channels]`): the
        head's `spatial_dims`."""
        return self.head.spatial_dims

    def build(self, input_shape):
        input_shape = tuple(sampling.split_inputs(input_shape, "inputs")[0])
        _spatial.check_input_rank(input_shape, self.spatial_dims)
        if not self.backbone.built:
            self.backbone.build(input_shape)
        feature_shape = tuple(self.backbone.compute_output_shape(input_shape))
        _spatial.check_feature_rank(feature_shape, self.spatial_dims)
        if not self.head.built:
            self.head.build(feature_shape)
        self.built = True

    def call(self, inputs, training=None):
        inputs, roi_mask = sampling.split_inputs(inputs, "inputs")
        inputs = tf.convert_to_tensor(inputs)
        if not inputs.dtype.is_floating:
            inputs = tf.cast(inputs, self.compute_dtype)
        _spatial.check_input_rank(inputs.shape, self.spatial_dims)
        if self.validate_inputs:
            inputs = _checks.assert_finite(inputs, "inputs")
        features = self.backbone(inputs, training=training)
        _spatial.check_feature_rank(features, self.spatial_dims)
        _spatial.check_resolution(
            inputs,
            features,
            self.spatial_dims,
            " Wrap it with tfp_seg.models.from_keras_hub(..., upsample=True) or resize its output.",
        )
        return self.head(features) if roi_mask is None else self.head(features, roi_mask=roi_mask)

    def compile(self, optimizer="adam", loss="auto", **kwargs):
        """`loss="auto"` uses the head's negative log-likelihood (`head.default_loss()`).

        Streaming metrics of `tfp_seg.metrics` in `metrics` / `weighted_metrics` that have no
        head (and not `predictive=False`) get the model's head (`tfp_seg.metrics.bind_head`):
        they score the Monte Carlo predictive distribution, as `predict_proba` does, not the
        softmax of the mean logits in the first C channels of the output.
        """
        if isinstance(loss, str) and loss == "auto":
            loss = self.head.default_loss()
        for key in ("metrics", "weighted_metrics"):
            if kwargs.get(key) is not None:
                metrics.bind_head(kwargs[key], self.head)
        super().compile(optimizer=optimizer, loss=loss, **kwargs)

    def compile_from_config(self, config):
        # `compile` is overridden (loss="auto"), so Keras leaves restoring it to us.
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    # --- probabilistic read-outs ---------------------------------------------------------------
    def _read_out_key(self) -> tuple:
        # The head's settings are Python values baked into a traced read-out: a head changed
        # in place (e.g. `model.head.antithetic = False`) gets a fresh trace.
        config = json.dumps(self.head.get_config(), sort_keys=True, default=repr)
        return (type(self.head).__name__, config, self.validate_inputs)

    def distribution(self, x, training: bool = False):
        """The logits distribution for images `x`: batch `[B]`, event `[*S, C]`."""
        return self.head.distribution(self(x, training=training))

    def _sample_logits_tensor(self, images, num_samples: int, seed=None, antithetic=False):
        return self.head.sample_logits(
            self(images, training=False), num_samples, seed=seed, antithetic=antithetic
        )

    def _sample_labels_tensor(self, images, num_samples: int, seed=None, antithetic=False):
        return self.head.sample_labels(
            self(images, training=False), num_samples, seed=seed, antithetic=antithetic
        )

    def _mean_probabilities(self, images, num_samples: int, seed=None) -> tf.Tensor:
        # The head's own estimator: antithetic pairs by default, one pass for a point mass.
        params = self(images, training=False)
        return self.head.mean_probabilities(params, num_samples=num_samples, seed=seed)

    # --- config --------------------------------------------------------------------------------
    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "backbone": keras.saving.serialize_keras_object(self.backbone),
                "head": keras.saving.serialize_keras_object(self.head),
                "validate_inputs": self.validate_inputs,
            }
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        backbone = keras.saving.deserialize_keras_object(config.pop("backbone"))
        head = keras.saving.deserialize_keras_object(config.pop("head"))
        return cls(backbone, head, **config)
