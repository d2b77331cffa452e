"""Probabilistic U-Net latent layers: Gaussian latent encoders and the latent injection (f_comb).

The Probabilistic U-Net (Kohl et al., 2018) is a conditional VAE on top of a U-Net. A *prior net*
encodes the image into a low-dimensional Gaussian `p(z | x)`, a *posterior net* encodes the
image and its label into `q(z | x, y)` (training only), and `f_comb` combines a latent sample
with the U-Net's last feature map into logits:

```none
prior      p(z | x)    = N(mu_p(x),    diag(sigma_p(x)^2))       LatentEncoder on x
posterior  q(z | x, y) = N(mu_q(x, y), diag(sigma_q(x, y)^2))    LatentEncoder on [x, onehot(y)]
logits     eta = f_comb([ features(x), tile_S(z) ])              LatentInjection, 1x1 convs
```

`x` is an image `[B, H, W, channels]` (`spatial_dims=2`, the default) or a volume
`[B, D, H, W, channels]` (`spatial_dims=3`: 3x3x3 convolutions, 2x2x2 pooling, the global
mean over D, H and W, and z broadcast over every voxel); shapes below are written
`[B, *S, ...]` with `S = (H, W)` or `(D, H, W)`. Configs without `spatial_dims` (files saved
before volumes) load as 2D.

Both encoders are `LatentEncoder` layers whose output is packed parameters `[B, 2 L]`
(`[mu | raw scale]`); `encoder.distribution(params)` builds the TFP distribution, as every tfp_seg
head does (Keras 3 models must output tensors).

#### References

[1] Kohl et al. A Probabilistic U-Net for Segmentation of Ambiguous Images. NeurIPS 2018.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_seg import _checks
from tfp_seg import distributions as dists
from tfp_seg.layers import _conv

tfd = tfp.distributions

__all__ = ["LatentEncoder", "LatentInjection"]

# softplus(_SOFTPLUS_INV_ONE) == 1: raw scale 0 means a unit standard deviation.
_SOFTPLUS_INV_ONE = math.log(math.expm1(1.0))


@keras.saving.register_keras_serializable(package="tfp_seg")
class LatentEncoder(keras.layers.Layer):
    """A convolutional encoder to a diagonal Gaussian latent (Prob. U-Net prior / posterior net).

    #### Mathematical Details

    ```none
    block_0 = [conv3x3(filters[0]) -> act] x convs_per_block      (3x3x3 for volumes)
    block_k = avgpool2x2 -> [conv3x3(filters[k]) -> act] x convs_per_block      k = 1..K-1
    h       = mean_S block_{K-1}(...)      (over H, W or D, H, W)              [B, filters[-1]]
    params  = dense(h) = [ mu (L) | raw (L) ]                                  [B, 2 L]
    sigma   = softplus(raw + log(e - 1)) + epsilon       (raw = 0  ->  sigma = 1 + epsilon)
    z ~ N(mu, diag(sigma^2))    (tfd.MultivariateNormalDiag, batch [B], event [L])
    ```

    The standard deviation is `softplus + epsilon`, not `exp(log_sigma)`: softplus grows only
    linearly, so extreme encoder outputs (e.g. +/-1e4) give a large but finite
    `KL(q || p)` (with `exp`, `sigma = inf` from `log_sigma > 88` in float32 and the KL is NaN),
    and `epsilon` bounds `1 / sigma^2` from above. Parameters are float32 also under a
    mixed-precision policy.

    The prior net is `LatentEncoder` applied to images `x`, the posterior net to
    `concat([x, one_hot(y)], -1)`. Average pooling uses `padding="same"`, so any input size works.
    Inputs are `[B, *S, channels]` with `spatial_dims` axes S.

    Args:
      latent_dim: L, the latent dimension (the reference uses 6).
      filters: output channels of each block (the reference uses the U-Net's, 32..192).
      convs_per_block: 3x3 convolutions per block (the reference uses 3).
      activation: Keras activation of the convolutions.
      epsilon: added to the standard deviation (> 0).
      kernel_initializer: of the convolutions and the output projection.
      validate_args: fail at run time on NaN/Inf parameters in `distribution` / `sample`.
      spatial_dims: 2 (images `[B, H, W, channels]`: Conv2D, AveragePooling2D) or 3 (volumes
        `[B, D, H, W, channels]`: Conv3D, AveragePooling3D).

    #### Examples

    ```python
    prior_net = tfp_seg.layers.LatentEncoder(latent_dim=6, filters=(16, 32))
    params = prior_net(images)                 # [B, 12]
    prior = prior_net.distribution(params)     # batch [B], event [6]
    z = prior_net.sample(params, 4, seed=0)    # [4, B, 6]
    ```
    """

    def __init__(
        self,
        latent_dim: int = 6,
        filters: Sequence[int] = (32, 64, 128, 192),
        convs_per_block: int = 3,
        activation: str = "relu",
        epsilon: float = 1e-4,
        kernel_initializer="he_normal",
        validate_args: bool = True,
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
        self.convs_per_block = _checks.positive_int(convs_per_block, "convs_per_block")
        self.activation = activation
        if not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"`epsilon` must be a finite float > 0; got {epsilon!r}.")
        self.epsilon = float(epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.validate_args = bool(validate_args)

        # === Layers ===
        pooling = (
            keras.layers.AveragePooling2D
            if self.spatial_dims == 2
            else keras.layers.AveragePooling3D
        )
        self.pools = [
            pooling(2, padding="same", name=f"pool{k}") for k in range(1, len(self.filters))
        ]
        conv = _conv.keras_conv(self.spatial_dims)
        self.convs = [
            [
                conv(
                    f,
                    3,
                    padding="same",
                    activation=activation,
                    kernel_initializer=self.kernel_initializer,
                    name=f"block{k}_conv{j}",
                )
                for j in range(self.convs_per_block)
            ]
            for k, f in enumerate(self.filters)
        ]
        self.projection = keras.layers.Dense(
            2 * self.latent_dim,
            kernel_initializer=keras.initializers.get(
                keras.initializers.serialize(self.kernel_initializer)
            ),
            dtype="float32",
            name="projection",
        )

    @property
    def params_size(self) -> int:
        """`2 * latent_dim`: `[mu | raw scale]`."""
        return 2 * self.latent_dim

    def _form(self, trailing: str) -> str:
        return _checks.spatial_form(self.spatial_dims, "B", trailing)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != self.spatial_dims + 2:
            raise ValueError(
                f"`inputs` must have rank {self.spatial_dims + 2} ({self._form('channels')}, "
                f"spatial_dims={self.spatial_dims}); got shape {input_shape}."
            )
        if input_shape[-1] is None:
            raise ValueError("`inputs` must have a known channel count (last axis).")
        shape = input_shape
        for k, block in enumerate(self.convs):
            if k > 0:
                pool = self.pools[k - 1]
                pool.build(shape)
                shape = tuple(pool.compute_output_shape(shape))
            for conv in block:
                conv.build(shape)
                shape = tuple(conv.compute_output_shape(shape))
        self.projection.build((input_shape[0], self.filters[-1]))
        self.built = True

    def call(self, inputs):
        """Images (or images + one-hot labels) `[B, *S, channels]` -> params `[B, 2 L]`."""
        s = self.spatial_dims
        _checks.check_rank(inputs, s + 2, "inputs", f"{self._form('channels')}, spatial_dims={s}")
        x = inputs
        for k, block in enumerate(self.convs):
            if k > 0:
                x = self.pools[k - 1](x)
            for conv in block:
                x = conv(x)
        h = tf.reduce_mean(tf.cast(x, tf.float32), axis=list(range(1, s + 1)))
        return self.projection(h)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.params_size)

    # --- parameter functions (use the config only, never the weights) --------------------------
    def check_params(self, params, name: str = "params") -> tf.Tensor:
        """Validate packed parameters `[B, 2 L]` (any leading batch shape) as float32."""
        params = tf.convert_to_tensor(params)
        if not params.dtype.is_floating:
            raise ValueError(f"`{name}` must be a float tensor; got dtype {params.dtype.name}.")
        params = tf.cast(params, tf.float32)
        if params.shape.rank is not None and params.shape.rank < 1:
            raise ValueError(f"`{name}` must have shape [B, {self.params_size}]; got a scalar.")
        _checks.check_last_dim(params, self.params_size, name, "[mu | raw scale] of the latent")
        if self.validate_args:
            params = _checks.assert_finite(params, name)
        return params

    def loc_and_scale(self, params):
        """`(mu, sigma)`, each `[B, L]`: `sigma = softplus(raw + log(e - 1)) + epsilon`."""
        params = self.check_params(params)
        loc = params[..., : self.latent_dim]
        raw = params[..., self.latent_dim :]
        scale = tf.nn.softplus(raw + _SOFTPLUS_INV_ONE) + self.epsilon
        return loc, scale

    def distribution(self, params) -> tfp.distributions.MultivariateNormalDiag:
        """`N(mu, diag(sigma^2))`: batch `[B]`, event `[L]`."""
        loc, scale = self.loc_and_scale(params)
        return tfd.MultivariateNormalDiag(loc=loc, scale_diag=scale)

    def mean(self, params) -> tf.Tensor:
        """The latent mean `mu`, `[B, L]`."""
        return self.loc_and_scale(params)[0]

    def sample(
        self, params, num_samples: int, seed=None, noise=None, antithetic: bool = False
    ) -> tf.Tensor:
        """Reparameterised latent samples `[N, B, L]` in export-safe ops (`mu + sigma * eps`).

        Args:
          params: `[B, 2 L]`.
          num_samples: N, a Python int (even when `antithetic`).
          seed: None (stateful RNG) or an int / shape-[2] seed (stateless, reproducible).
          noise: optional `eps` `[N', B, L]` (overrides `seed`; N' = N/2 when antithetic).
          antithetic: mirrored pairs `mu +/- sigma * eps` (samples `n` and `n + N/2`).
        """
        num_samples = dists.check_num_samples(num_samples, antithetic=antithetic)
        loc, scale = self.loc_and_scale(params)
        drawn = num_samples // 2 if antithetic else num_samples
        if noise is None:
            shape = tf.concat([[drawn], tf.shape(loc)], 0)
            noise = dists.standard_normal(shape, seed=seed)
        else:
            noise = tf.cast(tf.convert_to_tensor(noise), tf.float32)
            _checks.check_rank(noise, 3, "noise", "[N, B, L]")
        if antithetic:
            noise = tf.concat([noise, -noise], axis=0)
        return loc[tf.newaxis] + scale[tf.newaxis] * noise

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "latent_dim": self.latent_dim,
                "filters": list(self.filters),
                "convs_per_block": self.convs_per_block,
                "activation": self.activation,
                "epsilon": self.epsilon,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "validate_args": self.validate_args,
                "spatial_dims": self.spatial_dims,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tfp_seg")
class LatentInjection(keras.layers.Layer):
    """Combines a latent sample with a feature map into logits (the Prob. U-Net's `f_comb`).

    #### Mathematical Details

    ```none
    h_0   = concat([ features [B, *S, F],  broadcast_S(z [B, L]) ], -1)      [B, *S, F + L]
    h_k   = act(conv1x1(h_{k-1}, filters))          k = 1..num_convs
    eta   = conv1x1(h_num_convs, num_classes)                                  [B, *S, C]
    ```

    `S = (H, W)` (`spatial_dims=2`, Conv2D) or `(D, H, W)` (`spatial_dims=3`, Conv3D); z is
    the same at every pixel (voxel) of its image.

    `call(features, z)` takes one latent per image. `sample_logits(features, z_samples)` takes
    `N` latents per image `[N, B, L]` and folds N into the batch, so the U-Net features are
    computed once and only these 1x1 convolutions are re-evaluated per sample. Logits are
    float32 also under a mixed-precision policy.

    Args:
      num_classes: C (>= 2).
      filters: channels of the hidden 1x1 convolutions.
      num_convs: number of hidden 1x1 convolutions with activation (the reference uses 3),
        followed by the final 1x1 convolution to C logits.
      activation: Keras activation of the hidden convolutions.
      kernel_initializer: of all convolutions.
      spatial_dims: 2 (features `[B, H, W, F]`) or 3 (features `[B, D, H, W, F]`).

    #### Examples

    ```python
    f_comb = tfp_seg.layers.LatentInjection(num_classes=3, filters=16)
    logits = f_comb(features, z)                       # [B, H, W, 3]
    samples = f_comb.sample_logits(features, z_nbl)    # [N, B, H, W, 3]
    ```
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
        self.num_convs = _checks.positive_int(num_convs, "num_convs", minimum=0)
        self.activation = activation
        self.kernel_initializer = keras.initializers.get(kernel_initializer)

        # === Layers ===
        conv = _conv.keras_conv(self.spatial_dims)
        self.convs = [
            conv(
                self.filters,
                1,
                activation=activation,
                kernel_initializer=self.kernel_initializer,
                name=f"fcomb_conv{k}",
            )
            for k in range(num_convs)
        ]
        self.logits = conv(
            num_classes,
            1,
            kernel_initializer=keras.initializers.get(
                keras.initializers.serialize(self.kernel_initializer)
            ),
            dtype="float32",
            name="fcomb_logits",
        )

    def _features_form(self) -> str:
        return _checks.spatial_form(self.spatial_dims, "B", "F")

    def build(self, features_shape, z_shape=None):
        features_shape = tuple(features_shape)
        if len(features_shape) != self.spatial_dims + 2 or features_shape[-1] is None:
            raise ValueError(
                f"`features` must have rank {self.spatial_dims + 2} ({self._features_form()}, "
                f"spatial_dims={self.spatial_dims}) with known F; got shape {features_shape}."
            )
        if z_shape is None or len(tuple(z_shape)) != 2 or tuple(z_shape)[-1] is None:
            raise ValueError(f"`z` must have shape [B, L] with known L; got {z_shape}.")
        shape = features_shape[:-1] + (features_shape[-1] + tuple(z_shape)[-1],)
        for conv in self.convs:
            conv.build(shape)
            shape = tuple(conv.compute_output_shape(shape))
        self.logits.build(shape)
        self.built = True

    def call(self, features, z):
        """Features `[B, *S, F]` and latents `[B, L]` -> logits `[B, *S, C]` (float32)."""
        s = self.spatial_dims
        _checks.check_rank(features, s + 2, "features", self._features_form())
        _checks.check_rank(z, 2, "z", "[B, L]")
        z = tf.cast(z, features.dtype)
        spatial = tf.shape(features)[1 : s + 1]
        tiled = tf.broadcast_to(
            _over_space(z, s, 1), tf.concat([tf.shape(z)[:1], spatial, tf.shape(z)[-1:]], 0)
        )
        h = tf.concat([features, tiled], axis=-1)
        for conv in self.convs:
            h = conv(h)
        return self.logits(h)

    def sample_logits(self, features, z_samples) -> tf.Tensor:
        """Logits for `N` latents per image: `[N, B, L]` -> `[N, B, *S, C]`, batched as N*B.

        The first 1x1 convolution acts on `concat([features, z])`, so it splits into
        `features @ K_f + b`, computed once, plus `z @ K_z`, one vector per latent: the features
        are neither copied N times nor convolved N times. Equal to calling the layer once per
        latent up to float rounding.
        """
        features = tf.convert_to_tensor(features)
        z_samples = tf.convert_to_tensor(z_samples)
        s = self.spatial_dims
        _checks.check_rank(features, s + 2, "features", self._features_form())
        _checks.check_rank(z_samples, 3, "z_samples", "[N, B, L]")
        if not self.built:
            self.build(tuple(features.shape), (None, z_samples.shape[-1]))
        first = self.convs[0] if self.convs else self.logits
        dtype = first.compute_dtype
        kernel = tf.cast(tf.convert_to_tensor(first.kernel), dtype)  # [1, ..., 1, F + L, out]
        kernel = tf.reshape(kernel, kernel.shape[-2:])  # [F + L, out]
        num_features = features.shape[-1]
        if num_features is None or kernel.shape[0] != num_features + z_samples.shape[-1]:
            raise ValueError(
                f"`features` {self._features_form()} and `z_samples` [N, B, L] must have "
                f"F + L = {kernel.shape[0]} channels (as built); got shapes "
                f"{tuple(features.shape)} and {tuple(z_samples.shape)}."
            )
        fshape = tf.shape(features)
        flat = tf.reshape(tf.cast(features, dtype), [-1, num_features])
        shared = tf.reshape(
            tf.matmul(flat, kernel[:num_features]), tf.concat([fshape[: s + 1], [-1]], 0)
        )
        if first.use_bias:
            shared += tf.cast(tf.convert_to_tensor(first.bias), dtype)
        per_latent = tf.matmul(tf.cast(z_samples, dtype), kernel[num_features:])  # [N, B, out]
        h = first.activation(shared[tf.newaxis] + _over_space(per_latent, s, 2))
        n = tf.shape(z_samples)[0]
        h = tf.reshape(h, tf.concat([[-1], tf.shape(h)[2:]], 0))  # [N*B, *S, out]
        for conv in self.convs[1:] if self.convs else []:
            h = conv(h)
        logits = self.logits(h) if self.convs else tf.cast(h, tf.float32)
        return tf.reshape(logits, tf.concat([[n], fshape[: s + 1], [self.num_classes]], 0))

    def compute_output_shape(self, features_shape, z_shape=None):
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


def _over_space(x, spatial_dims: int, axis: int) -> tf.Tensor:
    """`x [..., L]` with `spatial_dims` unit axes inserted at `axis` (to broadcast over S)."""
    for _ in range(spatial_dims):
        x = tf.expand_dims(x, axis)
    return x


def one_hot_labels(
    labels, num_classes: int, ignore_label: Optional[int] = None, spatial_dims: int = 2
) -> tf.Tensor:
    """`[B, *S]` int labels -> float32 one-hot `[B, *S, C]` (all zeros for ignored pixels);
    `S` has `spatial_dims` axes."""
    spatial_dims = _checks.check_spatial_dims(spatial_dims)
    labels = _checks.prepare_labels(
        labels,
        num_classes,
        ignore_label,
        validate_args=True,
        spatial_rank=spatial_dims + 1,
        form=_checks.spatial_form(spatial_dims),
    )
    if ignore_label is not None:
        labels = tf.where(tf.equal(labels, ignore_label), -tf.ones_like(labels), labels)
    return tf.one_hot(labels, num_classes, dtype=tf.float32)
