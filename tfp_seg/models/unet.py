"""`UNet`: the built-in backbone (Ronneberger et al., 2015), the embedded default, also as an
efficient ensemble (BatchEnsemble, Packed-Ensembles) of M members in one network, over images
(`spatial_dims=2`) or volumes (`spatial_dims=3`, the 3D U-Net of Cicek et al., 2016)."""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from tfp_seg import _checks
from tfp_seg.layers.batch_ensemble import BatchEnsembleConv
from tfp_seg.layers.packed import PackedConv, check_alpha, interleave_members, packed_width

__all__ = ["UNet", "ENSEMBLES"]

_NORMS = ("batch", "group", None)
ENSEMBLES = ("batch", "packed", None)
DEFAULT_ENSEMBLE_SIZE = 4
_AXIS_NAMES = {2: ("height", "width"), 3: ("depth", "height", "width")}


@keras.saving.register_keras_serializable(package="tfp_seg")
class UNet(keras.Model):
    """A configurable U-Net returning a feature map at the input resolution.

    ```none
    level l = 0..depth:  filters_l = min(base_filters * filters_multiplier^l, max_filters)
    encoder: [conv3x3 -> norm -> act] x convs_per_block, then 2x2 max-pool (l < depth)
    decoder: 2x bilinear upsample -> concat skip_l -> [conv3x3 -> norm -> act] x convs_per_block
    output:  features [B, H, W, base_filters]
    ```

    Builds lazily for any channel count; `H` and `W` must be divisible by `2**depth`.

    **Volumes** (`spatial_dims=3`): the same network with 3x3x3 convolutions (`Conv3D`, or the
    ensembles' convolutions with `rank=3`), 2x2x2 max-pooling and 2x trilinear upsampling
    (half-pixel centres, edges clamped: the 3D form of the bilinear upsampling above):

    ```none
    images [B, D, H, W, ch] -> features [B, D, H, W, base_filters]    (D, H, W divisible by
                                                                        2**depth)
    ```

    **Efficient ensembles** (`ensemble`, `ensemble_size=M`): the network is M members trained
    together, and its output is every member's features, member-major along the batch axis:

    ```none
    ensemble=None      images [B, H, W, ch] -> features [B, H, W, base_filters]    (M = 1)
    ensemble="batch"   images [B, H, W, ch] -> features [M*B, H, W, base_filters]
                       BatchEnsemble (Wen et al. 2020): the input tiled M times (member j =
                       rows j*B .. (j+1)*B - 1), every 3x3 convolution a
                       `tfp_seg.layers.BatchEnsembleConv` (shared W, member kernels
                       W * (r_j s_j^T)); normalisation and dropout are shared
    ensemble="packed"  images [B, H, W, ch] -> features [M*B, H, W, c],
                       c = packed_width(base_filters, alpha, M, gamma)
                       Packed-Ensembles PE(alpha, M, gamma) (Laurent et al. 2023): every 3x3
                       convolution a `tfp_seg.layers.PackedConv` (members of width
                       alpha f_l / M in one grouped convolution, the first reading the shared
                       image), group normalisation with a multiple of M groups, skip
                       connections concatenated member by member; the last features
                       [B, H, W, M c] are rearranged to [M*B, H, W, c]
    ```

    Put a head on top with `tfp_seg.models.EnsembleSegmenter(UNet(ensemble=...), head)`: it
    trains every member against the same labels and samples the members as the ensemble's
    samples (a `ProbabilisticSegmenter` expects features of batch B).

    Args:
      base_filters: filters of the first level (and of the output feature map).
      depth: number of 2x downsamplings.
      filters_multiplier: growth of filters per level.
      max_filters: cap on the filters of a level (None: no cap), e.g. 512 for the 7-level
        U-Net of the PHiSeg / SSN LIDC experiments (32, 64, ..., 512, 512, 512).
      convs_per_block: 3x3 convolutions per block.
      norm: "group" (default; 8 groups, or fewer if filters are few), "batch" or None.
        Group normalisation is the default because it does not depend on the batch: no
        train/inference gap after short training (batch norm's moving averages lag), and
        the same result on one device as under `tf.distribute` data parallelism.
      activation: Keras activation name.
      dropout: dropout rate after every block of the bottleneck and decoder (0 disables;
        `tfp_seg.models.wrappers.MCDropout` keeps it active at inference).
      ensemble: None (one network, default), "batch" or "packed" (see above).
      ensemble_size: M, the members of an ensemble (None: 4); 1 (or None) without one.
      alpha: Packed-Ensembles width factor (> 0, default 2: members half as wide as the
        single network for M = 4); `ensemble="packed"` only.
      gamma: Packed-Ensembles subgroups per member (default 1); `ensemble="packed"` only.
      spatial_dims: 2 (images `[B, H, W, ch]`, default) or 3 (volumes `[B, D, H, W, ch]`);
        every `ensemble` works in both.

    #### Examples

    ```python
    unet = tfp_seg.models.UNet(base_filters=8, depth=2)
    features = unet(tf.zeros([2, 32, 32, 1]))          # [2, 32, 32, 8]
    unet3d = tfp_seg.models.UNet(base_filters=8, depth=2, spatial_dims=3)
    features = unet3d(tf.zeros([2, 16, 16, 16, 1]))    # [2, 16, 16, 16, 8]
    ```
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
        ensemble: Optional[str] = None,
        ensemble_size: Optional[int] = None,
        alpha: float = 2.0,
        gamma: int = 1,
        max_filters: Optional[int] = None,
        spatial_dims: int = 2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.spatial_dims = _checks.check_spatial_dims(spatial_dims)
        base_filters = _checks.positive_int(base_filters, "base_filters")
        depth = _checks.positive_int(depth, "depth", minimum=0)
        filters_multiplier = _checks.positive_int(filters_multiplier, "filters_multiplier")
        convs_per_block = _checks.positive_int(convs_per_block, "convs_per_block")
        if norm not in _NORMS:
            raise ValueError(f"`norm` must be one of {_NORMS}; got {norm!r}.")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1); got {dropout!r}.")
        self.base_filters = base_filters
        self.max_filters = _checks.positive_int(max_filters, "max_filters", optional=True)
        self.depth = depth
        self.filters_multiplier = filters_multiplier
        self.convs_per_block = convs_per_block
        self.norm = norm
        self.activation = activation
        self.dropout = float(dropout)
        self.ensemble, self.ensemble_size = _check_ensemble(ensemble, ensemble_size)
        self.alpha = check_alpha(alpha)
        self.gamma = _checks.positive_int(gamma, "gamma")
        if self.ensemble != "packed" and (self.alpha != 2.0 or self.gamma != 1):
            raise ValueError(
                f"`alpha` and `gamma` apply to ensemble='packed' only; got alpha={alpha!r}, "
                f"gamma={gamma!r} with ensemble={ensemble!r}."
            )

        # === Layers ===
        filters = [base_filters * filters_multiplier**level for level in range(depth + 1)]
        if self.max_filters is not None:
            filters = [min(f, self.max_filters) for f in filters]
        self.encoder_blocks = [self._block(f, f"enc{i}") for i, f in enumerate(filters)]
        pooling = keras.layers.MaxPooling2D if self.spatial_dims == 2 else keras.layers.MaxPooling3D
        self.pools = [pooling(2, name=f"pool{i}") for i in range(depth)]
        # 3D: trilinear upsampling in `call` (keras' UpSampling3D has nearest neighbours only).
        self.upsamples = [
            keras.layers.UpSampling2D(2, interpolation="bilinear", name=f"up{i}")
            for i in range(depth if self.spatial_dims == 2 else 0)
        ]
        self.concats = [keras.layers.Concatenate(name=f"concat{i}") for i in range(depth)]
        self.decoder_blocks = [self._block(filters[i], f"dec{i}") for i in range(depth)]
        self.dropouts = [
            keras.layers.Dropout(self.dropout, name=f"dropout{i}") for i in range(depth + 1)
        ]

    def _conv(self, filters: int, name: str, first: bool):
        """A 3x3 (3x3x3) convolution of `filters` (of the single network) in the ensemble's
        form."""
        use_bias = self.norm is None
        rank = self.spatial_dims
        if self.ensemble == "batch":
            return BatchEnsembleConv(
                filters,
                3,
                ensemble_size=self.ensemble_size,
                rank=rank,
                use_bias=use_bias,
                name=name,
            )
        if self.ensemble == "packed":
            return PackedConv(
                filters,
                3,
                ensemble_size=self.ensemble_size,
                alpha=self.alpha,
                gamma=self.gamma,
                first=first,
                rank=rank,
                use_bias=use_bias,
                name=name,
            )
        conv = keras.layers.Conv2D if rank == 2 else keras.layers.Conv3D
        return conv(filters, 3, padding="same", use_bias=use_bias, name=name)

    def _norm_groups(self, filters: int) -> int:
        if self.ensemble == "packed":  # groups inside one member's channels only
            width = packed_width(filters, self.alpha, self.ensemble_size, self.gamma)
            return self.ensemble_size * _groups_for(width)
        return _groups_for(filters)

    def _block(self, filters: int, name: str):
        layers = []
        for j in range(self.convs_per_block):
            first = name == "enc0" and j == 0  # reads the image (packed: shared by members)
            layers.append(self._conv(filters, f"{name}_conv{j}", first))
            if self.norm == "batch":
                layers.append(keras.layers.BatchNormalization(name=f"{name}_bn{j}"))
            elif self.norm == "group":
                layers.append(
                    keras.layers.GroupNormalization(
                        groups=self._norm_groups(filters), name=f"{name}_gn{j}"
                    )
                )
            layers.append(keras.layers.Activation(self.activation, name=f"{name}_act{j}"))
        return keras.Sequential(layers, name=name)

    @property
    def downsampling_factor(self) -> int:
        """`2**depth`: input heights and widths (and depths) must be multiples of it."""
        return 2**self.depth

    @property
    def output_channels(self) -> int:
        """Channels of the features (of every member)."""
        if self.ensemble == "packed":
            return packed_width(self.base_filters, self.alpha, self.ensemble_size, self.gamma)
        return self.base_filters

    def build(self, input_shape):
        self._check_rank(input_shape)
        if input_shape[-1] is None:
            raise ValueError("`inputs` must have a known channel count (last axis).")
        self._check_spatial(input_shape)
        # Create every sublayer's weights now (loading a saved model needs them before the
        # first call): trace the network once on the smallest valid input.
        size = (self.downsampling_factor,) * self.spatial_dims
        self.call(keras.ops.zeros((1,) + size + (input_shape[-1],)), training=False)
        self.built = True

    def _check_rank(self, shape):
        if len(shape) != self.spatial_dims + 2:
            raise ValueError(
                f"`inputs` must have rank {self.spatial_dims + 2} "
                f"({_checks.spatial_form(self.spatial_dims, 'B', 'channels')} with "
                f"spatial_dims={self.spatial_dims}); "
                f"got shape {tuple(shape)}."
            )

    def _check_spatial(self, shape):
        factor = self.downsampling_factor
        for axis, size in zip(_AXIS_NAMES[self.spatial_dims], shape[1:-1], strict=True):
            if size is not None and size % factor:
                raise ValueError(
                    f"`inputs` {axis} ({size}) must be divisible by 2**depth = {factor} "
                    f"(input shape {tuple(shape)}); pad or resize, or lower `depth`."
                )

    def call(self, inputs, training=None):
        self._check_rank(tuple(inputs.shape))
        self._check_spatial(tuple(inputs.shape))
        x = inputs
        if self.ensemble == "batch":  # member j: rows j*B .. (j+1)*B - 1
            x = tf.tile(x, [self.ensemble_size] + [1] * (self.spatial_dims + 1))
        skips = []
        for level in range(self.depth):
            x = self.encoder_blocks[level](x, training=training)
            skips.append(x)
            x = self.pools[level](x)
        x = self.encoder_blocks[self.depth](x, training=training)
        x = self.dropouts[self.depth](x, training=training)
        for level in reversed(range(self.depth)):
            x = self._upsample(level, x)
            if self.ensemble == "packed":  # keep each member's channels in its block
                x = interleave_members([x, skips[level]], self.ensemble_size)
            else:
                x = self.concats[level]([x, skips[level]])
            x = self.decoder_blocks[level](x, training=training)
            if level > 0:
                x = self.dropouts[level](x, training=training)
        if self.ensemble == "packed":
            x = _members_to_batch(x, self.ensemble_size)
        return x

    def _upsample(self, level: int, x):
        if self.spatial_dims == 2:
            return self.upsamples[level](x)
        for axis in range(1, self.spatial_dims + 1):  # trilinear: linear along D, H and W
            x = upsample_linear(x, axis)
        return x

    def compute_output_shape(self, input_shape):
        batch = input_shape[0]
        if batch is not None:
            batch = batch * self.ensemble_size
        return (batch,) + tuple(input_shape[1:-1]) + (self.output_channels,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "base_filters": self.base_filters,
                "depth": self.depth,
                "filters_multiplier": self.filters_multiplier,
                "max_filters": self.max_filters,
                "convs_per_block": self.convs_per_block,
                "norm": self.norm,
                "activation": self.activation,
                "dropout": self.dropout,
                "ensemble": self.ensemble,
                "ensemble_size": self.ensemble_size,
                "alpha": self.alpha,
                "gamma": self.gamma,
                "spatial_dims": self.spatial_dims,
            }
        )
        return config


def _check_ensemble(ensemble, ensemble_size):
    """`(ensemble, M)`: M = 1 without an ensemble, `ensemble_size` (default 4) with one."""
    if ensemble not in ENSEMBLES:
        raise ValueError(f"`ensemble` must be one of {ENSEMBLES}; got {ensemble!r}.")
    if ensemble is None:
        if ensemble_size not in (None, 1) or isinstance(ensemble_size, bool):
            raise ValueError(
                f"`ensemble_size` needs an `ensemble` ('batch' or 'packed'); got "
                f"ensemble_size={ensemble_size!r} with ensemble=None."
            )
        return None, 1
    if ensemble_size is None:
        return ensemble, DEFAULT_ENSEMBLE_SIZE
    return ensemble, _checks.positive_int(ensemble_size, "ensemble_size")


def _members_to_batch(x, ensemble_size: int):
    """Packed features `[B, *S, M c]` (member j: channels j*c ..) -> `[M*B, *S, c]`."""
    m = ensemble_size
    c = x.shape[-1] // m
    rank = x.shape.rank - 2
    shape = tf.shape(x)
    x = tf.reshape(x, tf.concat([shape[:-1], [m, c]], axis=0))  # [B, *S, M, c]
    x = tf.transpose(x, [rank + 1] + list(range(rank + 1)) + [rank + 2])  # [M, B, *S, c]
    return tf.reshape(x, tf.concat([[m * shape[0]], shape[1:-1], [c]], axis=0))


def upsample_linear(x, axis: int):
    """2x linear upsampling of `x` along `axis`, half-pixel centres with clamped edges (what
    `tf.image.resize(..., "bilinear")` does along each of its axes):

    ```none
    y[2i] = 3/4 x[i] + 1/4 x[max(i - 1, 0)],   y[2i + 1] = 3/4 x[i] + 1/4 x[min(i + 1, n - 1)]
    ```

    Applied along every spatial axis in turn it is the separable bi- / trilinear upsampling.
    """
    n = tf.shape(x)[axis]
    index = tf.range(n)
    before = tf.gather(x, tf.maximum(index - 1, 0), axis=axis)
    after = tf.gather(x, tf.minimum(index + 1, n - 1), axis=axis)
    pairs = tf.stack([0.75 * x + 0.25 * before, 0.75 * x + 0.25 * after], axis=axis + 1)
    dims = [d if d is not None else tf.shape(x)[i] for i, d in enumerate(x.shape)]
    dims[axis] = 2 * dims[axis]
    return tf.reshape(pairs, tf.stack(dims) if any(tf.is_tensor(d) for d in dims) else dims)


def _groups_for(filters: int) -> int:
    for groups in (8, 4, 2, 1):
        if filters % groups == 0:
            return groups
    return 1
