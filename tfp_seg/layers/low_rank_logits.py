"""`LowRankLogits`: the Stochastic Segmentation Network head (Monteiro et al., 2020)."""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf
import tensorflow_probability as tfp

from tfp_seg import _checks
from tfp_seg import distributions as dists
from tfp_seg.layers import _init
from tfp_seg.layers.base import DistributionHead

__all__ = ["LowRankLogits"]

# Raw (pre-transform) diagonal written outside a region of interest: exp(-30) and
# softplus(-30) are ~1e-13, so the covariance there is `epsilon` alone.
_MASKED_RAW_DIAG = -30.0
_TRANSFORMS = ("exp", "softplus")


@keras.saving.register_keras_serializable(package="tfp_seg")
class LowRankLogits(DistributionHead):
    """Low-rank multivariate normal logits over all pixels and classes (SSN head).

    #### Mathematical Details

    ```none
    params[b, *s] = [ mu (C) | d_raw (C) | P (C*R, row-major as [C, R]) ]   at every pixel s
    D = transform(d_raw) + epsilon          transform = exp (SSN) or softplus
    eta ~ N(mu, P P^T + diag(D))            over the flattened prod(S)*C event
    sample: eta = mu + P z + sqrt(D) * eps,  z ~ N(0, I_R), eps ~ N(0, I)
    ```

    `S = (H, W)` for images, `(D, H, W)` for volumes (`spatial_dims=3`, the setting of the
    official SSN on BraTS): params `[B, *S, C (2 + R)]`, event `[*S, C]`; the covariance is
    never dense (one `z` per image couples all of its voxels).

    With an `roi_mask` (`[B, *S]` or `[B, *S, 1]`, 1 inside), `P` is zeroed and `D`
    becomes `epsilon` outside the region, as in the SSN reference implementation: the logits
    there are (almost) deterministic and only the region's pixels covary.

    Args:
      num_classes: C.
      rank: R, the rank of the covariance factor.
      epsilon: added to the diagonal (SSN uses 1e-5).
      diagonal_transform: "exp" (SSN) or "softplus" maps `d_raw` to a positive variance.
      antithetic: default for `sample_logits` and the loss: mirrored pairs
        `mu +/- (P z + sqrt(D) eps)`, as in the reference code.
      factor_init_scale: the factor's kernel columns are `kernel_initializer`'s times this
        at initialisation (default 0.1; 1: as drawn, the start of versions before it; 0: the
        factor starts at zero). Only where training starts: loaded weights load as saved.
      initial_diagonal: the diagonal's starting variance `D` where the kernel term of `d_raw`
        is zero (through its bias; default 0.018, `d_raw = -4` with exp); None starts the bias
        at 0 (`D = 1 + epsilon` with exp, 0.69 with softplus), as versions before it did.
        With glorot's factor and `D = 1` the logits start with a standard deviation of about
        2 from the covariance; the small start cuts D2_GED of a small U-Net trained for 12
        epochs on the built-in benchmark to a third and raises HM-IoU on the default job
        (benchmarks/README.md, "Model quality").
      kernel_size, kernel_initializer, validate_args, spatial_dims: see `DistributionHead`.

    #### Examples

    ```python
    head = tfp_seg.layers.LowRankLogits(num_classes=2, rank=10)
    params = head(features)                         # [B, H, W, 2 + 2 + 2*10]
    dist = head.distribution(params)                # batch [B], event [H, W, 2]
    samples = head.sample_logits(params, 16)        # [16, B, H, W, 2]
    volume = tfp_seg.layers.LowRankLogits(num_classes=4, rank=10, spatial_dims=3)
    params = volume(volume_features)                # [B, D, H, W, 4 * 12]
    ```

    #### References

    [1] Monteiro et al. Stochastic Segmentation Networks: Modelling Spatially Correlated
        Aleatoric Uncertainty. NeurIPS 2020.
    """

    likelihood = "low_rank_normal_logits"

    def __init__(
        self,
        num_classes: int,
        rank: int = 10,
        epsilon: float = 1e-5,
        diagonal_transform: str = "exp",
        antithetic: bool = True,
        kernel_size: int = 1,
        kernel_initializer="glorot_uniform",
        validate_args: bool = True,
        spatial_dims: int = 2,
        factor_init_scale: float = _init.FACTOR_INIT_SCALE,
        initial_diagonal: Optional[float] = _init.INITIAL_DIAGONAL,
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
        rank = _checks.positive_int(rank, "rank")
        if not float(epsilon) > 0:
            raise ValueError(f"`epsilon` must be > 0; got {epsilon!r}.")
        if diagonal_transform not in _TRANSFORMS:
            raise ValueError(
                f"`diagonal_transform` must be one of {_TRANSFORMS}; got {diagonal_transform!r}."
            )
        self.rank = rank
        self.epsilon = float(epsilon)
        self.diagonal_transform = diagonal_transform
        self.antithetic = bool(antithetic)
        self.factor_init_scale = _init.check_factor_init_scale(factor_init_scale)
        self.initial_diagonal = _init.check_initial_diagonal(initial_diagonal, self.epsilon)
        self.projection = self._make_projection()

    @staticmethod
    def params_size_for(num_classes: int, rank: int) -> int:
        """Parameter channels per pixel: `C * (2 + R)` (mean, raw diagonal, factor)."""
        return num_classes * (2 + rank)

    @property
    def params_size(self) -> int:
        return self.params_size_for(self.num_classes, self.rank)

    def _projection_kernel_initializer(self):
        return _init.LowRankKernelInitializer(
            self.kernel_initializer, self.num_classes, self.rank, self.factor_init_scale
        )

    def _bias_initializer(self):
        raw = _init.raw_diagonal_for(self.initial_diagonal, self.epsilon, self.diagonal_transform)
        return _init.LowRankBiasInitializer(self.num_classes, self.rank, raw)

    # --- parameter packing ---------------------------------------------------------------------
    def split_params(self, params):
        """Split params into `(loc [B,*S,C], raw_diag [B,*S,C], factor [B,*S,C,R])`."""
        params = self.check_params(params)
        c, r = self.num_classes, self.rank
        # One split, not three slices: the gradient of a split is one concat, while each
        # slice's gradient writes a zero-padded copy of all params (measured ~8x slower).
        loc, raw_diag, factor = tf.split(params, [c, c, c * r], axis=-1)
        factor = tf.reshape(factor, tf.concat([tf.shape(factor)[:-1], [c, r]], 0))
        return loc, raw_diag, factor

    def pack_params(self, loc, raw_diag, cov_factor):
        """Inverse of `split_params`."""
        factor = tf.reshape(
            cov_factor, tf.concat([tf.shape(cov_factor)[:-2], [self.num_classes * self.rank]], 0)
        )
        return tf.concat([loc, raw_diag, factor], axis=-1)

    def diag_from_raw(self, raw_diag):
        """`D = transform(raw) + epsilon`."""
        if self.diagonal_transform == "exp":
            # Clip only the exponent's upper end to keep exp finite in float32; such a
            # variance (e^80) is already meaningless, and gradients pass below it.
            return tf.exp(tf.minimum(raw_diag, 80.0)) + self.epsilon
        return tf.nn.softplus(raw_diag) + self.epsilon

    def raw_from_diag(self, cov_diag):
        """Inverse of `diag_from_raw` (for post-inference control of the diagonal)."""
        value = tf.maximum(cov_diag - self.epsilon, 1e-30)
        if self.diagonal_transform == "exp":
            return tf.math.log(value)
        return tfp.math.softplus_inverse(value)

    def covariance_parts(self, params):
        """`(loc, cov_factor, cov_diag)` of the distribution, in their `[B,*S,C(,R)]` layout."""
        loc, raw_diag, factor = self.split_params(params)
        return loc, factor, self.diag_from_raw(raw_diag)

    def planar_low_rank_parts(self, params):
        """`[loc [B,C,1,X], factor [B,C,R,X], scale [B,C,1,X]]`, X = prod(S), `scale = sqrt(D)`:
        the parameters in the class-planar layout of the fused loss path
        (`tfp_seg.protocols.PlanarLowRankLogits`, `tfp_seg.losses.chunked`)."""
        params = self.check_params(params)
        c, r = self.num_classes, self.rank
        shape = tf.shape(params)
        planar = tf.transpose(
            tf.reshape(params, tf.stack([shape[0], -1, self.params_size])), [0, 2, 1]
        )
        loc, raw_diag, factor = tf.split(planar, [c, c, c * r], axis=1)
        scale = tf.sqrt(self.diag_from_raw(raw_diag))
        factor = tf.reshape(factor, tf.stack([shape[0], c, r, -1]))
        return [loc[:, :, tf.newaxis], factor, scale[:, :, tf.newaxis]]

    # --- Keras ---------------------------------------------------------------------------------
    def _postprocess(self, params, roi_mask):
        if roi_mask is None:
            return params
        roi_mask = self.prepare_roi_mask(roi_mask, params)
        m = tf.cast(roi_mask, params.dtype)[..., tf.newaxis]
        c = self.num_classes
        loc = params[..., :c]
        raw_diag = params[..., c : 2 * c] * m + (1.0 - m) * _MASKED_RAW_DIAG
        factor = params[..., 2 * c :] * m
        return tf.concat([loc, raw_diag, factor], axis=-1)

    # --- distribution interface ---------------------------------------------------------------
    def distribution(self, params):
        loc, factor, diag = self.covariance_parts(params)
        event = loc.shape[1:]
        if event.is_fully_defined() and self.rank > event.num_elements():
            raise ValueError(
                f"`rank` ({self.rank}) must not exceed prod(S)*C = {event.num_elements()} of "
                f"`params` with shape {tuple(loc.shape)}."
            )
        return dists.low_rank_logits(loc, factor, diag, validate_args=False)

    def sample_logits(
        self,
        params,
        num_samples: int,
        seed=None,
        antithetic: Optional[bool] = None,
        noise=None,
    ):
        """Samples `[N, B, *S, C]`: `mu + P z + sqrt(D) eps` (mirrored pairs if antithetic);
        `noise`: fixed `(z [N', B, R], eps [N', B, *S, C])`, N' = N/2 when antithetic."""
        antithetic = self.antithetic if antithetic is None else bool(antithetic)
        loc, factor, diag = self.covariance_parts(params)
        return dists.sample_low_rank(
            loc, factor, diag, num_samples, seed=seed, antithetic=antithetic, noise=noise
        )

    def sample_labels(self, params, num_samples: int, seed=None, antithetic=None):
        """Label maps `[N, B, *S]` distributed as `argmax` of logit samples. Up to 8 classes
        they are drawn from the C - 1 logit differences
        (`tfp_seg.distributions.sample_low_rank_labels`; 0.75x the time of the arg max of
        `sample_logits` for 3 classes), so they are not the same draws for the same seed;
        with more classes, the arg max of `sample_logits` is faster and is used."""
        if not dists.prefers_planar_sampling(self.num_classes):
            return super().sample_labels(params, num_samples, seed=seed, antithetic=antithetic)
        antithetic = self.antithetic if antithetic is None else bool(antithetic)
        loc, factor, diag = self.covariance_parts(params)
        return dists.sample_low_rank_labels(
            loc, factor, diag, num_samples, seed=seed, antithetic=antithetic
        )

    def mean_probabilities(self, params, num_samples: int = 16, seed=None) -> tf.Tensor:
        """Monte Carlo predictive probabilities `E[softmax(eta)]`, `[B, *S, C]`: antithetic
        pairs when the head's default is antithetic and `num_samples` is even, independent
        samples otherwise; on class planes up to 8 classes
        (`tfp_seg.distributions.low_rank_mean_probabilities`)."""
        if not dists.prefers_planar_sampling(self.num_classes):
            return super().mean_probabilities(params, num_samples, seed=seed)
        num_samples, antithetic = self.mean_sampling(num_samples)
        loc, factor, diag = self.covariance_parts(params)
        return dists.low_rank_mean_probabilities(
            loc, factor, diag, num_samples, seed=seed, antithetic=antithetic
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "rank": self.rank,
                "epsilon": self.epsilon,
                "diagonal_transform": self.diagonal_transform,
                "antithetic": self.antithetic,
                "factor_init_scale": self.factor_init_scale,
                "initial_diagonal": self.initial_diagonal,
            }
        )
        return config
