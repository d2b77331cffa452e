"""`HeteroscedasticLogits`: per-pixel normal logits (Kendall & Gal, 2017; Collier et al., 2021)."""

from __future__ import annotations

import math
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_seg import _checks, _seeds
from tfp_seg import distributions as dists
from tfp_seg.layers.base import DistributionHead

tfd = tfp.distributions

__all__ = ["HeteroscedasticLogits"]

# Range of the log-variance before `exp`. Only there to keep exp finite in float32 (and sigma
# large enough that sqrt/exp do not underflow to 0): sigma^2 in [e^-20, e^20], i.e. sigma in
# [4.5e-5, 2.2e4]. Outside this range the gradient w.r.t. the log-variance is zero.
LOG_VARIANCE_MIN = -20.0
LOG_VARIANCE_MAX = 20.0
# Initial log-variance (bias of its channels), as in the reference implementation.
INITIAL_LOG_VARIANCE = -10.0


@keras.saving.register_keras_serializable(package="tfp_seg")
class HeteroscedasticBiasInitializer(keras.initializers.Initializer):
    """Bias vector `[0]*C (mu) | [log_variance]*C (log sigma^2) | [0]*(C*K) (factor)`."""

    def __init__(self, num_classes: int, low_rank_classes: int = 0, log_variance: float = -10.0):
        self.num_classes = int(num_classes)
        self.low_rank_classes = int(low_rank_classes)
        self.log_variance = float(log_variance)

    def __call__(self, shape, dtype=None):
        c, k = self.num_classes, self.low_rank_classes
        size = c * (2 + k)
        if tuple(shape) != (size,):
            raise ValueError(
                f"HeteroscedasticBiasInitializer builds a bias of shape ({size},); "
                f"got shape {tuple(shape)}."
            )
        values = [0.0] * c + [self.log_variance] * c + [0.0] * (c * k)
        return keras.ops.convert_to_tensor(values, dtype=dtype or "float32")

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "low_rank_classes": self.low_rank_classes,
            "log_variance": self.log_variance,
        }


def _check_temperature(temperature) -> float:
    """`temperature` as a finite float > 0 (Python / NumPy real, not bool), else `ValueError`."""
    real = isinstance(temperature, (int, float, np.integer, np.floating)) and not isinstance(
        temperature, (bool, np.bool_)
    )
    if not real or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"`temperature` must be a finite float > 0 (the softmax temperature tau); "
            f"got {temperature!r}."
        )
    return float(temperature)


@keras.saving.register_keras_serializable(package="tfp_seg")
class HeteroscedasticLogits(DistributionHead):
    """Per-pixel normal logits: aleatoric noise independent across pixels.

    #### Mathematical Details

    ```none
    params[b, *s] = [ mu (C) | s = log sigma^2 (C) | V (C*K, row-major as [C, K]) ]
    sigma^2 = exp(clip(s, -20, 20))                     (clip only keeps exp finite)
    K = 0 (Kendall & Gal 2017):    u_i ~ N(mu_i, diag(sigma_i^2))
    K > 0 (Collier et al. 2021):   u_i ~ N(mu_i, V_i V_i^T + diag(sigma_i^2))  (over classes)
    sample: u_i = mu_i + V_i z_i + sigma_i * eps_i,  z_i ~ N(0, I_K), eps_i ~ N(0, I_C)
    logits: eta_i = u_i / tau                          (softmax temperature tau > 0)
    p(y_i | x) = E_u[ softmax(u_i / tau)[y_i] ]   independently for every pixel i
    ```

    **Temperature** (Collier et al. 2021, Sec. 3): the packed parameters describe latent
    utilities `u`; the head's logits are `eta = u / tau`, so every softmax of the head's samples
    is the tempered `softmax(u / tau)`. `distribution`, `sample_logits`, `mean_logits`,
    `covariance_parts` and `scale` describe `eta` (mean `mu / tau`, covariance
    `Sigma / tau^2`); the parameter interface (`split_params`, `pack_params`, `diag_from_raw`,
    `raw_from_diag`) stays in the space of `u`, so the controls of `tfp_seg.calibration`
    (which rescale `u`) commute with `tau`. The losses (`HeteroscedasticNLL`, through
    `sample_logits`), `mean_probabilities`, the evaluation and the exported signatures all see
    the tempered logits. Limits: `tau -> 0` turns `softmax(u / tau)` into the one-hot arg max of
    `u` (the latent-utility model `y = argmax u` that the tempered softmax smooths); large
    `tau` makes it uniform, `1 / C`. Label samples are `argmax eta = argmax u`, the same for
    every `tau` (the `tau -> 0` model). `tau = 1` (the default) leaves every output as it was.

    Pixels (voxels, with `spatial_dims=3`: params `[B, D, H, W, P]`, event `[D, H, W, C]`)
    are independent (unlike `LowRankLogits`, whose covariance couples all pixels);
    `K = low_rank_classes > 0` adds a per-pixel low-rank covariance between classes. The
    log-variance channels start at a bias of -10 (sigma^2 ~ 4.5e-5, as in the reference code),
    so training starts from an almost deterministic softmax classifier.

    The parameter interface (`split_params`, `pack_params`, `diag_from_raw`, `raw_from_diag`,
    `covariance_parts`) mirrors `LowRankLogits`, with `raw` = log sigma^2 and the factor
    `[B, *S, C, K]` (K may be 0), so `tfp_seg.calibration.scale_class_covariance` and
    `with_temperature` accept this head too.

    Args:
      num_classes: C.
      low_rank_classes: K >= 0, rank of the per-pixel class covariance factor (0: diagonal).
      antithetic: default for `sample_logits` and the loss: mirrored pairs `mu +/- noise`.
      temperature: the softmax temperature `tau`, a finite float > 0 (default 1.0); the head's
        logits are `u / tau`.
      kernel_size, kernel_initializer, validate_args, spatial_dims: see `DistributionHead`.

    #### Examples

    ```python
    head = tfp_seg.layers.HeteroscedasticLogits(num_classes=3)
    params = head(features)                         # [B, H, W, 3 + 3]
    dist = head.distribution(params)                # batch [B], event [H, W, 3]
    samples = head.sample_logits(params, 16)        # [16, B, H, W, 3]
    loss = head.default_loss(num_samples=20)        # tfp_seg.losses.HeteroscedasticNLL
    ```

    #### References

    [1] Alex Kendall and Yarin Gal. What Uncertainties Do We Need in Bayesian Deep Learning
        for Computer Vision? NeurIPS 2017. https://arxiv.org/abs/1703.04977
    [2] Mark Collier et al. Correlated Input-Dependent Label Noise in Large-Scale Image
        Classification. CVPR 2021. https://arxiv.org/abs/2105.10305
    """

    likelihood = "heteroscedastic_normal_logits"

    def __init__(
        self,
        num_classes: int,
        low_rank_classes: int = 0,
        antithetic: bool = False,
        kernel_size: int = 1,
        kernel_initializer="glorot_uniform",
        validate_args: bool = True,
        temperature: float = 1.0,
        spatial_dims: int = 2,
        **kwargs,
    ):
        super().__init__(
            num_classes,
            kernel_size=kernel_size,
            kernel_initializer=kernel_initializer,
            validate_args=validate_args,
            spatial_dims=spatial_dims,
            **kwargs,
        )
        self.low_rank_classes = _checks.positive_int(low_rank_classes, "low_rank_classes", 0)
        self.antithetic = bool(antithetic)
        self.temperature = _check_temperature(temperature)
        self.projection = self._make_projection()

    @staticmethod
    def params_size_for(num_classes: int, low_rank_classes: int = 0) -> int:
        """Parameter channels per pixel: `C * (2 + K)` (mean, log-variance, factor)."""
        return num_classes * (2 + low_rank_classes)

    @property
    def params_size(self) -> int:
        return self.params_size_for(self.num_classes, self.low_rank_classes)

    @property
    def rank(self) -> int:
        """Rank of the per-pixel class covariance factor (`low_rank_classes`)."""
        return self.low_rank_classes

    def _bias_initializer(self):
        return HeteroscedasticBiasInitializer(
            self.num_classes, self.low_rank_classes, INITIAL_LOG_VARIANCE
        )

    # --- parameter packing ---------------------------------------------------------------------
    def split_params(self, params):
        """Split params into `(loc, log_variance, factor)`: `[B,*S,C]` x2, `[B,*S,C,K]`."""
        params = self.check_params(params)
        c, k = self.num_classes, self.low_rank_classes
        # A split, not slices: the gradient of a split is one concat, while each slice's
        # gradient writes a zero-padded copy of all params.
        if k:
            loc, log_variance, factor = tf.split(params, [c, c, c * k], axis=-1)
        else:
            loc, log_variance = tf.split(params, [c, c], axis=-1)
            factor = params[..., 2 * c :]  # empty; unused by the diagonal model
        factor = tf.reshape(factor, tf.concat([tf.shape(factor)[:-1], [c, k]], 0))
        return loc, log_variance, factor

    def pack_params(self, loc, log_variance, cov_factor=None):
        """Inverse of `split_params` (`cov_factor` may be None when K = 0)."""
        parts = [loc, log_variance]
        if self.low_rank_classes:
            if cov_factor is None:
                raise ValueError("`cov_factor` is required when `low_rank_classes` > 0.")
            parts.append(
                tf.reshape(
                    cov_factor,
                    tf.concat(
                        [tf.shape(cov_factor)[:-2], [self.num_classes * self.low_rank_classes]],
                        0,
                    ),
                )
            )
        return tf.concat(parts, axis=-1)

    def diag_from_raw(self, log_variance):
        """`sigma^2 = exp(clip(log_variance, -20, 20))` (the clip only keeps it finite)."""
        return tf.exp(tf.clip_by_value(log_variance, LOG_VARIANCE_MIN, LOG_VARIANCE_MAX))

    def raw_from_diag(self, variance):
        """Inverse of `diag_from_raw` on its range: `log sigma^2`."""
        return tf.math.log(tf.maximum(variance, 1e-30))

    def _tempered(self, x, power: int = 1):
        """`x / tau^power` (`x` itself at `tau = 1`, so the default changes no bit)."""
        if self.temperature == 1.0:
            return x
        return x / tf.constant(self.temperature**power, x.dtype)

    def covariance_parts(self, params):
        """`(loc, cov_factor [B,*S,C,K], variance [B,*S,C])` of the logits `u / tau`:
        `(mu / tau, V / tau, sigma^2 / tau^2)`."""
        loc, log_variance, factor = self.split_params(params)
        return (
            self._tempered(loc),
            self._tempered(factor),
            self._tempered(self.diag_from_raw(log_variance), 2),
        )

    def scale(self, params):
        """Per-class standard deviations `sigma / tau` `[B, *S, C]` of the logits (diagonal
        part only)."""
        _, log_variance, _ = self.split_params(params)
        return self._tempered(
            tf.exp(0.5 * tf.clip_by_value(log_variance, LOG_VARIANCE_MIN, LOG_VARIANCE_MAX))
        )

    def mean_logits(self, params) -> tf.Tensor:
        """The mean of the logits distribution, `mu / tau` `[B, *S, C]`."""
        return self._tempered(super().mean_logits(params))

    # --- distribution interface ---------------------------------------------------------------
    def distribution(self, params):
        """Batch `[B]`, event `[*S, C]`: independent normals, or per-pixel low-rank MVNs."""
        loc, factor, variance = self.covariance_parts(params)
        if not self.low_rank_classes:
            return dists.diagonal_logits(loc, tf.sqrt(variance))
        return tfd.Independent(
            tfd.MultivariateNormalDiagPlusLowRankCovariance(
                loc=loc, cov_diag_factor=variance, cov_perturb_factor=factor
            ),
            reinterpreted_batch_ndims=self.spatial_dims,
            name="HeteroscedasticLowRankLogits",
        )

    def sample_logits(
        self,
        params,
        num_samples: int,
        seed=None,
        antithetic: Optional[bool] = None,
        noise=None,
    ):
        """Samples `[N, B, *S, C]`: `(mu + V z + sigma * eps) / tau` in plain (export-safe)
        ops.

        Args:
          params: `[B, *S, params_size]`.
          num_samples: N (even when antithetic).
          seed: None (stateful RNG) or an int / shape-[2] seed (stateless, reproducible).
          antithetic: override the head's default (mirrored pairs about the mean).
          noise: fixed noise instead of random draws, with N' = N/2 when antithetic:
            `eps [N', B, *S, C]` when K = 0, or `(z [N', B, *S, K], eps)` when K > 0.
        """
        antithetic = self.antithetic if antithetic is None else bool(antithetic)
        loc, log_variance, factor = self.split_params(params)
        scale = tf.exp(0.5 * tf.clip_by_value(log_variance, LOG_VARIANCE_MIN, LOG_VARIANCE_MAX))
        if not self.low_rank_classes:
            return self._tempered(
                dists.sample_diagonal(
                    loc, scale, num_samples, seed=seed, antithetic=antithetic, noise=noise
                )
            )
        num_samples = _checks.check_num_samples(num_samples, antithetic)
        n = num_samples // 2 if antithetic else num_samples
        if noise is None:
            z_shape = tf.concat([[n], tf.shape(loc)[:-1], [self.low_rank_classes]], 0)
            z = dists.standard_normal(z_shape, _seeds.split_seed(seed, 11), loc.dtype)
            eps = dists.standard_normal(
                tf.concat([[n], tf.shape(loc)], 0), _seeds.split_seed(seed, 12), loc.dtype
            )
        else:
            if not isinstance(noise, (tuple, list)) or len(noise) != 2:
                z_form = self.spatial_form("K", "N, B")
                eps_form = self.spatial_form("C", "N, B")
                raise ValueError(
                    f"`noise` must be a pair (z {z_form}, eps {eps_form}) when "
                    f"`low_rank_classes` > 0; got {type(noise).__name__}."
                )
            z, eps = (tf.convert_to_tensor(t, dtype=loc.dtype) for t in noise)
        # V z: [B,*S,C,K] x [N,B,*S,K] -> [N,B,*S,C] ("bhwck,nbhwk->nbhwc" for images)
        axes = "dhw"[-self.spatial_dims :]
        deviation = (
            tf.einsum(f"b{axes}ck,nb{axes}k->nb{axes}c", factor, z) + scale[tf.newaxis] * eps
        )
        if antithetic:
            deviation = tf.concat([deviation, -deviation], axis=0)
        return self._tempered(loc[tf.newaxis] + deviation)

    def sample_labels(self, params, num_samples: int, seed=None, antithetic=None):
        """Label maps `[N, B, *S]` distributed as `argmax` of logit samples. Without class
        factors and up to 8 classes they are drawn from the C - 1 logit differences
        (`tfp_seg.distributions.sample_low_rank_labels`), which is cheaper than the arg max of
        `sample_logits` but not the same draws for the same seed. The temperature does not
        change them: `argmax(u / tau) = argmax(u)`."""
        if self.low_rank_classes or not dists.prefers_planar_sampling(self.num_classes):
            return super().sample_labels(params, num_samples, seed=seed, antithetic=antithetic)
        antithetic = self.antithetic if antithetic is None else bool(antithetic)
        loc, log_variance, _ = self.split_params(params)  # of u: the same maps for every tau
        return dists.sample_low_rank_labels(
            loc,
            None,
            self.diag_from_raw(log_variance),
            num_samples,
            seed=seed,
            antithetic=antithetic,
        )

    def mean_probabilities(self, params, num_samples: int = 16, seed=None) -> tf.Tensor:
        """Monte Carlo predictive probabilities `E[softmax(u / tau)]`, `[B, *S, C]`:
        antithetic pairs when the head's default is antithetic and `num_samples` is even; on
        class planes without class factors and up to 8 classes."""
        if self.low_rank_classes or not dists.prefers_planar_sampling(self.num_classes):
            return super().mean_probabilities(params, num_samples, seed=seed)
        num_samples, antithetic = self.mean_sampling(num_samples)
        loc, _, variance = self.covariance_parts(params)
        return dists.low_rank_mean_probabilities(
            loc, None, variance, num_samples, seed=seed, antithetic=antithetic
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "low_rank_classes": self.low_rank_classes,
                "antithetic": self.antithetic,
                "temperature": self.temperature,
            }
        )
        return config
