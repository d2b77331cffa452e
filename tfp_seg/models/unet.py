"""`UNet`: the built-in backbone (Ronneberger et al., 2015), the embedded default."""

from __future__ import annotations

from typing import Optional

import keras

from tfp_seg import _checks

__all__ = ["UNet"]

_NORMS = ("batch", "group", None)


@keras.saving.register_keras_serializable(package="tfp_seg")
class UNet(keras.Model):
    """A configurable U-Net returning a feature map at the input resolution.

    ```none
    level l = 0..depth:  filters_l = base_filters * filters_multiplier^l
    encoder: [conv3x3 -> norm -> act] x convs_per_block, then 2x2 max-pool (l < depth)
    decoder: 2x bilinear upsample -> concat skip_l -> [conv3x3 -> norm -> act] x convs_per_block
    output:  features [B, H, W, base_filters]
    ```

    Builds lazily for any channel count; `H` and `W` must be divisible by `2**depth`.

    Args:
      base_filters: filters of the first level (and of the output feature map).
      depth: number of 2x downsamplings.
      filters_multiplier: growth of filters per level.
      convs_per_block: 3x3 convolutions per block.
      norm: "group" (default; 8 groups, or fewer if filters are few), "batch" or None.
        Group normalisation is the default because it does not depend on the batch: no
        train/inference gap after short training (batch norm's moving averages lag), and
        the same result on one device as under `tf.distribute` data parallelism.
      activation: Keras activation name.
      dropout: dropout rate after every block of the bottleneck and decoder (0 disables;
        `tfp_seg.models.wrappers.MCDropout` keeps it active at inference).
    """

    def __init__(
        self,
        base_filters: int = 32,
        depth: int = 4,
        filters_multiplier: int = 2,
        convs_per_block: int = 2,
        norm: Optional[str] = "group",
        activation: str = "relu",
        dropout: float = 0.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        base_filters = _checks.positive_int(base_filters, "base_filters")
        depth = _checks.positive_int(depth, "depth", minimum=0)
        filters_multiplier = _checks.positive_int(filters_multiplier, "filters_multiplier")
        convs_per_block = _checks.positive_int(convs_per_block, "convs_per_block")
        if norm not in _NORMS:
            raise ValueError(f"`norm` must be one of {_NORMS}; got {norm!r}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1); got {dropout!r}.")
        self.base_filters = base_filters
        self.depth = depth
        self.filters_multiplier = filters_multiplier
        self.convs_per_block = convs_per_block
        self.norm = norm
        self.activation = activation
        self.dropout = float(dropout)

        # === Layers ===
        filters = [base_filters * filters_multiplier**level for level in range(depth + 1)]
        self.encoder_blocks = [self._block(f, f"enc{i}") for i, f in enumerate(filters)]
        self.pools = [keras.layers.MaxPooling2D(2, name=f"pool{i}") for i in range(depth)]
        self.upsamples = [
            keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"up{i}")
            for i in range(depth)
        ]
        self.concats = [keras.layers.Concatenate(name=f"concat{i}") for i in range(depth)]
        self.decoder_blocks = [self._block(filters[i], f"dec{i}") for i in range(depth)]
        self.dropouts = [
            keras.layers.Dropout(self.dropout, name=f"dropout{i}") for i in range(depth + 1)
        ]

    def _block(self, filters: int, name: str):
        layers = []
        for j in range(self.convs_per_block):
            layers.append(
                keras.layers.Conv2D(
                    filters,
                    3,
                    padding="same",
                    use_bias=self.norm is None,
                    name=f"{name}_conv{j}",
                )
            )
            if self.norm == "batch":
                layers.append(keras.layers.BatchNormalization(name=f"{name}_bn{j}"))
            elif self.norm == "group":
                layers.append(
                    keras.layers.GroupNormalization(
                        groups=_groups_for(filters), name=f"{name}_gn{j}"
                    )
                )
            layers.append(keras.layers.Activation(self.activation, name=f"{name}_act{j}"))
        return keras.Sequential(layers, name=name)

    @property
    def downsampling_factor(self) -> int:
        return 2**self.depth

    @property
    def output_channels(self) -> int:
        return self.base_filters

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(
                f"`inputs` must have rank 4 ([B, H, W, channels]); got shape {tuple(input_shape)}."
            )
        if input_shape[-1] is None:
            raise ValueError("`inputs` must have a known channel count (last axis).")
        self._check_spatial(input_shape)
        # Create every sublayer's weights now (loading a saved model needs them before the
        # first call): trace the network once on the smallest valid input.
        size = self.downsampling_factor
        self.call(keras.ops.zeros((1, size, size, input_shape[-1])), training=False)
        self.built = True

    def _check_spatial(self, shape):
        factor = self.downsampling_factor
        for axis, size in (("height", shape[1]), ("width", shape[2])):
            if size is not None and size % factor:
                raise ValueError(
                    f"`inputs` {axis} ({size}) must be divisible by 2**depth = {factor} "
                    f"(input shape {tuple(shape)}); pad or resize, or lower `depth`."
                )

    def call(self, inputs, training=None):
        if inputs.shape.rank != 4:
            raise ValueError(
                f"`inputs` must have rank 4 ([B, H, W, channels]); got shape {tuple(inputs.shape)}."
            )
        self._check_spatial(tuple(inputs.shape))
        x = inputs
        skips = []
        for level in range(self.depth):
            x = self.encoder_blocks[level](x, training=training)
            skips.append(x)
            x = self.pools[level](x)
        x = self.encoder_blocks[self.depth](x, training=training)
        x = self.dropouts[self.depth](x, training=training)
        for level in reversed(range(self.depth)):
            x = self.upsamples[level](x)
            x = self.concats[level]([x, skips[level]])
            x = self.decoder_blocks[level](x, training=training)
            if level > 0:
                x = self.dropouts[level](x, training=training)
        return x

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.base_filters,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "base_filters": self.base_filters,
                "depth": self.depth,
                "filters_multiplier": self.filters_multiplier,
                "convs_per_block": self.convs_per_block,
                "norm": self.norm,
                "activation": self.activation,
                "dropout": self.dropout,
            }
        )
        return config


def _groups_for(filters: int) -> int:
    for groups in (8, 4, 2, 1):
        if filters % groups == 0:
            return groups
    return 1
