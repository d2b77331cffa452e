"""`HierarchicalLatent`: the latent hierarchy of the Hierarchical Probabilistic U-Net.

The Probabilistic U-Net (`LatentEncoder`) has one global latent per image. The hierarchical
form (Kohl et al., 2019) gives each of the coarsest `latent_levels` levels of a U-Net
decoder a spatial grid of latents, every level's Gaussian conditioned on the latents drawn
at the coarser ones:

```none
encoder   e_k = [conv3x3 -> act] x convs_per_block  (after a 2x average pool for k > 0)
                                                    k = 0..K-1, e_{K-1} the coarsest
decoder   h_0 = e_{K-1}
          h_j = [conv3x3 -> act] x convs_per_block ( concat(up2(g_{j-1}), e_{K-1-j}) )
          latent level j < latent_levels (the grid of h_j):
            p(z_j | z_<j, x) = N(mu_j, diag(sigma_j^2)),  [mu_j | raw_j] = conv1x1(h_j)
            z_j  = mu_j + sigma_j * eps_j                  [B, *S_j, L]
            g_j  = concat(h_j, z_j)
          g_j = h_j above the latent levels; with `decode_to_full` the decoder runs to
          level 0 and returns h_{K-1} [B, *S, filters[0]] (the likelihood's latent features)
```

`S_j` is the input's grid pooled `K-1-j` times; the input's spatial sizes must be multiples
of `2**(K-1)`. The joint over the levels is not Gaussian (each level's mean and scale depend
on the coarser draws); given the draws, the levels' Gaussians are packed into one
`tfd.MultivariateNormalDiag` over every cell and dimension (`distribution`), so that
`KL(q || p)` of two such packings (posterior and prior evaluated on the same draws) is the
hierarchical KL `sum_j KL(q_j || p_j)`, the ELBO's KL term at the drawn path.

Upsampling is nearest-neighbour 2x. `spatial_dims=3` uses 3x3x3 convolutions and 2x2x2
pooling and upsampling. Parameters and latents are float32 also under a mixed-precision policy.

#### References

[1] Kohl et al. A Hierarchical Probabilistic U-Net for Modeling Multi-Scale Ambiguities.
    arXiv:1905.13077, 2019.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_seg import _checks, _seeds
from tfp_seg import distributions as dists
from tfp_seg.layers import _conv
from tfp_seg.layers.latent import _SOFTPLUS_INV_ONE

tfd = tfp.distributions

__all__ = ["HierarchicalLatent", "SpatialLatentInjection"]

_AXES = {2: ("height", "width"), 3: ("depth", "height", "width")}


@keras.saving.register_keras_serializable(package="tfp_seg")
class HierarchicalLatent(keras.layers.Layer):
    """A U-Net encoder with a top-down decoder that draws spatial latents at its coarsest levels.

    `encode(x)` returns the encoder's levels; `decode(levels, ...)` runs the decoder, drawing
    (or taking) the latents level by level, and returns `(params, z, features)`: per latent
    level its packed parameters `[B, *S_j, 2 L]` and latents `[B, *S_j, L]`, and the decoder's
    output (with `decode_to_full`, `[B, *S, filters[0]]`; else the last latent level's `g`).
    `call(x)` is `decode(encode(x), mean=True)`'s features.

    Args:
      latent_dim: L, latent channels per cell and level.
      filters: channels of the encoder levels (and of the decoder at the same level); the
        number of entries K sets the depth.
      latent_levels: how many of the coarsest decoder levels carry latents (1..K).
      convs_per_block: 3x3 convolutions per encoder / decoder block.
      decode_to_full: run the decoder to the input resolution (the prior net: the likelihood
        reads it); else stop at the finest latent level (the posterior net).
      activation, kernel_initializer: of the convolutions.
      epsilon: added to the latent standard deviations (`softplus(raw) + epsilon`).
      spatial_dims: 2 (images) or 3 (volumes).
    """

    def __init__(
        self,
        latent_dim: int = 2,
        filters: Sequence[int] = (16, 32, 64, 128, 128),
        latent_levels: int = 3,
        convs_per_block: int = 2,
        decode_to_full: bool = True,
        activation: str = "relu",
        kernel_initializer="he_normal",
        epsilon: float = 1e-4,
        spatial_dims: int = 2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.spatial_dims = _checks.check_spatial_dims(spatial_dims)
        self.latent_dim = _checks.positive_int(latent_dim, "latent_dim")
        filters = list(filters) if isinstance(filters, (list, tuple)) else filters
        if not isinstance(filters, list) or not filters:
            raise ValueError(f"`filters` must be a non-empty sequence of ints; got {filters!r}.")
        self.filters = [_checks.positive_int(f, "filters") for f in filters]
        self.latent_levels = _checks.positive_int(latent_levels, "latent_levels")
        if self.latent_levels > len(self.filters):
            raise ValueError(
                f"`latent_levels` ({self.latent_levels}) must be at most the number of levels, "
                f"len(filters) = {len(self.filters)}."
            )
        self.convs_per_block = _checks.positive_int(convs_per_block, "convs_per_block")
        self.decode_to_full = bool(decode_to_full)
        self.activation = activation
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"`epsilon` must be a finite float > 0; got {epsilon!r}.")
        self.epsilon = float(epsilon)

        # === Layers ===
        conv = _conv.keras_conv(self.spatial_dims)
        pooling = (
            keras.layers.AveragePooling2D
            if self.spatial_dims == 2
            else keras.layers.AveragePooling3D
        )

        def block(f, name):
            return [
                conv(
                    f,
                    3,
                    padding="same",
                    activation=activation,
                    kernel_initializer=self._initializer(),
                    name=f"{name}_conv{j}",
                )
                for j in range(self.convs_per_block)
            ]

        upsampling = (
            keras.layers.UpSampling2D if self.spatial_dims == 2 else keras.layers.UpSampling3D
        )
        self.upsample = upsampling(2, name="upsample")
        k = len(self.filters)
        self.pools = [pooling(2, name=f"pool{level}") for level in range(1, k)]
        self.encoder_blocks = [block(f, f"enc{level}") for level, f in enumerate(self.filters)]
        # Decoder step j (j >= 1) works at encoder level k - 1 - j.
        self.decoder_blocks = [
            block(self.filters[k - 1 - j], f"dec{j}") for j in range(1, self.num_steps)
        ]
        self.projections = [
            conv(
                2 * self.latent_dim,
                1,
                kernel_initializer=self._initializer(),
                dtype="float32",
                name=f"latent{j}",
            )
            for j in range(self.latent_levels)
        ]

    def _initializer(self):
        return keras.initializers.get(keras.initializers.serialize(self.kernel_initializer))

    # --- structure -----------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        """Decoder levels run: K with `decode_to_full`, else `latent_levels`."""
        return len(self.filters) if self.decode_to_full else self.latent_levels

    @property
    def downsampling_factor(self) -> int:
        """`2**(K-1)`: the input's spatial sizes must be multiples of it."""
        return 2 ** (len(self.filters) - 1)

    @property
    def output_channels(self) -> int:
        """Channels of `decode`'s features."""
        if self.decode_to_full:
            return self.filters[0]
        return self.filters[len(self.filters) - self.latent_levels] + self.latent_dim

    def _form(self, trailing: str) -> str:
        return _checks.spatial_form(self.spatial_dims, "B", trailing)

    def check_input_shape(self, shape, name: str = "inputs") -> None:
        """Raise a `ValueError` naming `name` unless `shape` is `[B, *S, channels]` with every
        spatial size a multiple of `downsampling_factor`."""
        shape = tuple(shape)
        if len(shape) != self.spatial_dims + 2:
            raise ValueError(
                f"`{name}` must have rank {self.spatial_dims + 2} ({self._form('channels')}, "
                f"spatial_dims={self.spatial_dims}); got shape {shape}."
            )
        factor = self.downsampling_factor
        for axis, size in zip(_AXES[self.spatial_dims], shape[1:-1], strict=True):
            if size is not None and size % factor:
                raise ValueError(
                    f"`{name}` {axis} ({size}) must be divisible by 2**(len(filters) - 1) = "
                    f"{factor} (shape {shape}); pad or resize, or use fewer `filters`."
                )

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self.check_input_shape(input_shape)
        if input_shape[-1] is None:
            raise ValueError("`inputs` must have a known channel count (last axis).")
        # Create every weight now (loading needs them before the first call): trace once on
        # the smallest valid input.
        size = (self.downsampling_factor,) * self.spatial_dims
        self.decode(self.encode(tf.zeros((1,) + size + (input_shape[-1],))), mean=True)
        self.built = True

    # --- forward -------------------------------------------------------------------------------
    def encode(self, inputs) -> List[tf.Tensor]:
        """Inputs `[B, *S, channels]` -> the encoder's levels `[e_0, ..., e_{K-1}]`."""
        self.check_input_shape(inputs.shape)
        x = inputs
        levels = []
        for level, convs in enumerate(self.encoder_blocks):
            if level > 0:
                x = self.pools[level - 1](x)
            for layer in convs:
                x = layer(x)
            levels.append(x)
        return levels

    def loc_and_scale(self, params):
        """`(mu, sigma)` of one level's packed parameters `[..., 2 L]`."""
        params = tf.cast(params, tf.float32)
        loc = params[..., : self.latent_dim]
        scale = tf.nn.softplus(params[..., self.latent_dim :] + _SOFTPLUS_INV_ONE) + self.epsilon
        return loc, scale

    def decode(
        self,
        levels: Sequence[tf.Tensor],
        z: Optional[Sequence[tf.Tensor]] = None,
        seed=None,
        mean: bool = False,
        antithetic: bool = False,
    ):
        """Run the decoder over the encoder's `levels`.

        Args:
          levels: `encode`'s output.
          z: optional latents per level `[B, *S_j, L]` to condition on (teacher forcing: the
            prior evaluated on the posterior's draws) instead of drawing them.
          seed: None (stateful RNG) or an int / shape-[2] seed; level j draws with the seed
            folded with j.
          mean: use each level's mean as its latent (the mode path), drawing nothing.
          antithetic: the batch's second half draws the negated noise of its first half
            (rows `n` and `n + B/2`: folded samples `[N*B]`, N even, in mirrored pairs).

        Returns:
          `(params, z, features)`: lists over latent levels and the decoder's output.
        """
        if z is not None and len(z) != self.latent_levels:
            raise ValueError(
                f"`z` must hold one latent per level ({self.latent_levels}); got {len(z)}."
            )
        k = len(self.filters)
        base_seed = None if seed is None else _seeds.stateless_seed(seed)
        params_out, z_out = [], []
        g = None
        for j in range(self.num_steps):
            if j == 0:
                h = levels[k - 1]
            else:
                h = tf.concat([self.upsample(g), levels[k - 1 - j]], axis=-1)
                for layer in self.decoder_blocks[j - 1]:
                    h = layer(h)
            if j < self.latent_levels:
                params = self.projections[j](h)
                loc, scale = self.loc_and_scale(params)
                if z is not None:
                    z_j = tf.cast(z[j], tf.float32)
                elif mean:
                    z_j = loc
                else:
                    level_seed = (
                        None
                        if base_seed is None
                        else tf.random.experimental.stateless_fold_in(base_seed, j)
                    )
                    z_j = loc + scale * self._noise(tf.shape(loc), level_seed, antithetic)
                params_out.append(params)
                z_out.append(z_j)
                g = tf.concat([h, tf.cast(z_j, h.dtype)], axis=-1)
            else:
                g = h
        return params_out, z_out, g

    @staticmethod
    def _noise(shape, seed, antithetic: bool) -> tf.Tensor:
        if not antithetic:
            return dists.standard_normal(shape, seed=seed)
        half = tf.concat([[shape[0] // 2], shape[1:]], 0)
        eps = dists.standard_normal(half, seed=seed)
        return tf.concat([eps, -eps], axis=0)

    def call(self, inputs):
        """Inputs -> the decoder's features on the mean path (every latent at its mean)."""
        return self.decode(self.encode(inputs), mean=True)[2]

    def compute_output_shape(self, input_shape):
        input_shape = tuple(input_shape)
        if self.decode_to_full:
            spatial = input_shape[1:-1]
        else:
            factor = 2 ** (len(self.filters) - self.latent_levels)
            spatial = tuple(None if s is None else s // factor for s in input_shape[1:-1])
        return (input_shape[0],) + tuple(spatial) + (self.output_channels,)

    # --- distributions -------------------------------------------------------------------------
    def distribution(self, params: Sequence[tf.Tensor]) -> tfp.distributions.MultivariateNormalDiag:
        """The levels' Gaussians given the drawn path, packed: batch `[B]`, event
        `[sum_j prod(S_j) L]` (`KL` of two packings is the sum of the levels' KLs)."""
        locs, scales = [], []
        for params_j in params:
            loc, scale = self.loc_and_scale(params_j)
            batch = tf.shape(loc)[:1]
            locs.append(tf.reshape(loc, tf.concat([batch, [-1]], 0)))
            scales.append(tf.reshape(scale, tf.concat([batch, [-1]], 0)))
        return tfd.MultivariateNormalDiag(
            loc=tf.concat(locs, axis=-1), scale_diag=tf.concat(scales, axis=-1)
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "latent_dim": self.latent_dim,
                "filters": list(self.filters),
                "latent_levels": self.latent_levels,
                "convs_per_block": self.convs_per_block,
                "decode_to_full": self.decode_to_full,
                "activation": self.activation,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "epsilon": self.epsilon,
                "spatial_dims": self.spatial_dims,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tfp_seg")
class SpatialLatentInjection(keras.layers.Layer):
    """`f_comb` for a spatial latent feature map: 1x1 convolutions on `[features, g]`.

    ```none
    h_0 = concat([features [B, *S, F], g [B, *S, G]], -1);  h_k = act(conv1x1(h_{k-1}))
    eta = conv1x1(h_num_convs, num_classes)                  [B, *S, C], float32
    ```

    `sample_logits(features, g)` takes `g` for N draws folded into the batch `[N*B, *S, G]`
    (rows `n * B + b`) and returns `[N, B, *S, C]`; the first convolution's feature part is
    computed once per image, not per draw.

    Args:
      num_classes: C (>= 2).
      filters: channels of the hidden 1x1 convolutions.
      num_convs: hidden 1x1 convolutions with activation (>= 1).
      activation, kernel_initializer: of the convolutions.
      spatial_dims: 2 or 3.
    """

    def __init__(
        self,
        num_classes: int,
        filters: int = 32,
        num_convs: int = 3,
        activation: str = "relu",
        kernel_initializer="he_normal",
        spatial_dims: int = 2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.spatial_dims = _checks.check_spatial_dims(spatial_dims)
        self.num_classes = _checks.positive_int(num_classes, "num_classes", minimum=2)
        self.filters = _checks.positive_int(filters, "filters")
        self.num_convs = _checks.positive_int(num_convs, "num_convs", minimum=1)
        self.activation = activation
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        conv = _conv.keras_conv(self.spatial_dims)

        def initializer():
            return keras.initializers.get(keras.initializers.serialize(self.kernel_initializer))

        self.convs = [
            conv(
                self.filters,
                1,
                activation=activation,
                kernel_initializer=initializer(),
                name=f"fcomb_conv{k}",
            )
            for k in range(self.num_convs)
        ]
        self.logits = conv(
            num_classes, 1, kernel_initializer=initializer(), dtype="float32", name="fcomb_logits"
        )

    def build(self, features_shape, g_shape=None):
        features_shape, g_shape = tuple(features_shape), tuple(g_shape or ())
        for name, shape in (("features", features_shape), ("g", g_shape)):
            if len(shape) != self.spatial_dims + 2 or shape[-1] is None:
                raise ValueError(
                    f"`{name}` must have rank {self.spatial_dims + 2} with a known channel "
                    f"count; got shape {shape}."
                )
        shape = features_shape[:-1] + (features_shape[-1] + g_shape[-1],)
        for layer in self.convs:
            layer.build(shape)
            shape = tuple(layer.compute_output_shape(shape))
        self.logits.build(shape)
        self.built = True

    def call(self, features, g):
        """Features `[B, *S, F]` and latent features `[B, *S, G]` -> logits `[B, *S, C]`."""
        h = tf.concat([features, tf.cast(g, features.dtype)], axis=-1)
        for layer in self.convs:
            h = layer(h)
        return self.logits(h)

    def sample_logits(self, features, g) -> tf.Tensor:
        """Features `[B, *S, F]`, `g [N*B, *S, G]` -> logits `[N, B, *S, C]`."""
        s = self.spatial_dims
        first = self.convs[0]
        dtype = first.compute_dtype
        kernel = tf.cast(tf.convert_to_tensor(first.kernel), dtype)
        kernel = tf.reshape(kernel, kernel.shape[-2:])  # [F + G, out]
        num_features = features.shape[-1]
        fshape = tf.shape(features)
        shared = tf.reshape(
            tf.matmul(
                tf.reshape(tf.cast(features, dtype), [-1, num_features]), kernel[:num_features]
            ),
            tf.concat([fshape[: s + 1], [-1]], 0),
        ) + tf.cast(tf.convert_to_tensor(first.bias), dtype)
        gshape = tf.shape(g)
        per_draw = tf.reshape(
            tf.matmul(tf.reshape(tf.cast(g, dtype), [-1, gshape[-1]]), kernel[num_features:]),
            tf.concat([[-1], fshape[: s + 1], [kernel.shape[-1]]], 0),
        )  # [N, B, *S, out]
        h = first.activation(per_draw + shared[tf.newaxis])
        n = tf.shape(per_draw)[0]
        h = tf.reshape(h, tf.concat([[-1], tf.shape(h)[2:]], 0))
        for layer in self.convs[1:]:
            h = layer(h)
        logits = self.logits(h)
        return tf.reshape(logits, tf.concat([[n], fshape[: s + 1], [self.num_classes]], 0))

    def compute_output_shape(self, features_shape, g_shape=None):
        return tuple(features_shape[:-1]) + (self.num_classes,)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "filters": self.filters,
                "num_convs": self.num_convs,
                "activation": self.activation,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "spatial_dims": self.spatial_dims,
            }
        )
        return config
