"""The low-rank multivariate normal over logits of a Stochastic Segmentation Network.

```none
eta = vec(logits) in R^(X*C),  X = prod(S),  S = (H, W) or (D, H, W)
eta ~ N(mu, P P^T + diag(D)),   P in R^(X*C x R),   D in R_+^(X*C)
sample:  eta = mu + P z + sqrt(D) * eps,   z ~ N(0, I_R),  eps ~ N(0, I_(S*C))
```

The distribution (`low_rank_logits`) for densities, and its export-safe sampler
(`sample_low_rank`); the class-planar samplers of label maps and mean probabilities are in
`tfp_seg.distributions.planar`.

#### References

[1] Miguel Monteiro et al. Stochastic Segmentation Networks: Modelling Spatially Correlated
    Aleatoric Uncertainty. NeurIPS 2020. https://arxiv.org/abs/2006.06015
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf
import tensorflow_probability as tfp

from tfp_seg import _checks, _seeds
from tfp_seg._seeds import SeedLike
from tfp_seg.distributions import noise as noise_lib

tfd = tfp.distributions
tfb = tfp.bijectors

__all__ = [
    "LowRankLogitsDistribution",
    "low_rank_logits",
    "sample_low_rank",
    "check_low_rank_ranks",
]


class LowRankLogitsDistribution(tfp.distributions.TransformedDistribution):
    """Low-rank multivariate normal over logits with event shape `[*S, C]`.

    A `tfd.MultivariateNormalDiagPlusLowRankCovariance` over the flattened `prod(S)*C`
    event, reshaped to `[*S, C]` by a `tfb.Reshape` bijector (a volume-preserving map, so
    `log_prob` is the flat density). It adds what `TransformedDistribution` lacks for this
    case: `mean`, `stddev`, `variance` and `covariance` (flattened event, small sizes only),
    and the parameters `loc`, `cov_factor`, `cov_diag` in their `[..., *S, C(, R)]` layout.
    `spatial_dims` (2: `S = (H, W)`, the default; 3: `S = (D, H, W)`) is the number of
    spatial axes of the event; every axis before them is a batch axis.
    """

    def __init__(
        self,
        loc,
        cov_factor,
        cov_diag,
        validate_args=False,
        name="LowRankLogits",
        spatial_dims=2,
    ):
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            loc = tf.convert_to_tensor(loc, name="loc")
            dtype = loc.dtype
            cov_factor = tf.convert_to_tensor(cov_factor, dtype=dtype, name="cov_factor")
            cov_diag = tf.convert_to_tensor(cov_diag, dtype=dtype, name="cov_diag")
            self._loc = loc
            self._cov_factor = cov_factor
            self._cov_diag = cov_diag
            self._spatial_dims = _checks.check_spatial_dims(spatial_dims)
            event_ndims = self._spatial_dims + 1
            event_shape = tf.shape(loc)[-event_ndims:]
            batch_shape = tf.shape(loc)[:-event_ndims]
            flat_event = tf.reduce_prod(event_shape)
            rank = tf.shape(cov_factor)[-1]
            flat = tfd.MultivariateNormalDiagPlusLowRankCovariance(
                loc=tf.reshape(loc, tf.concat([batch_shape, [flat_event]], 0)),
                cov_diag_factor=tf.reshape(cov_diag, tf.concat([batch_shape, [flat_event]], 0)),
                cov_perturb_factor=tf.reshape(
                    cov_factor, tf.concat([batch_shape, [flat_event, rank]], 0)
                ),
                validate_args=validate_args,
            )
            static_event = loc.shape[-event_ndims:]
            event_out = static_event if static_event.is_fully_defined() else event_shape
            super().__init__(
                distribution=flat,
                bijector=tfb.Reshape(event_shape_out=event_out, event_shape_in=[-1]),
                validate_args=validate_args,
                name=name,
            )
            self._parameters = parameters

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        # Instance-dependent event ranks (TFP's callable `event_ndims`): [*S, C] (+ R).
        return dict(
            loc=tfp.util.ParameterProperties(event_ndims=lambda self: self.spatial_dims + 1),
            cov_factor=tfp.util.ParameterProperties(event_ndims=lambda self: self.spatial_dims + 2),
            cov_diag=tfp.util.ParameterProperties(event_ndims=lambda self: self.spatial_dims + 1),
        )

    @property
    def spatial_dims(self) -> int:
        """The number of spatial axes of the event `[*S, C]` (2 or 3)."""
        return self._spatial_dims

    @property
    def loc(self) -> tf.Tensor:
        """Mean logits `[B, *S, C]`."""
        return self._loc

    @property
    def cov_factor(self) -> tf.Tensor:
        """Low-rank covariance factor `P` in its `[B, *S, C, R]` layout."""
        return self._cov_factor

    @property
    def cov_diag(self) -> tf.Tensor:
        """Diagonal `D` of the covariance (variances, not standard deviations) `[B, *S, C]`."""
        return self._cov_diag

    @property
    def flat_distribution(self) -> tfp.distributions.MultivariateNormalDiagPlusLowRankCovariance:
        """The underlying distribution over the flattened `prod(S)*C` event."""
        return self.distribution

    def _mean(self, **kwargs):
        return tf.identity(self._loc)

    def _variance(self, **kwargs):
        return self._cov_diag + tf.reduce_sum(tf.square(self._cov_factor), axis=-1)

    def _stddev(self, **kwargs):
        return tf.sqrt(self._variance())

    def _covariance(self, **kwargs):
        # Dense [B, X*C, X*C], X = prod(S); only for small sizes (tests, diagnostics).
        return self.distribution.covariance()

    def _mode(self, **kwargs):
        return tf.identity(self._loc)


def low_rank_logits(
    loc,
    cov_factor,
    cov_diag,
    validate_args: bool = False,
    name: str = "LowRankLogits",
) -> LowRankLogitsDistribution:
    """Low-rank multivariate normal over logits, event shape `[*S, C]`.

    `S = (H, W)` or `(D, H, W)`, told by the rank of `loc` (4 or 5).

    Args:
      loc: mean logits, float `[B, *S, C]`.
      cov_factor: covariance factor, float `[B, *S, C, R]`; reshaped to `P` of shape
        `[B, prod(S)*C, R]` (row-major over *S, C, matching `tf.reshape(loc, [B, -1])`).
      cov_diag: positive covariance diagonal `D` (variances), float `[B, *S, C]`.
      validate_args: check positivity and finiteness of the parameters at run time.

    Returns:
      A `LowRankLogitsDistribution` with batch shape `[B]`, event shape `[*S, C]` and
      covariance `P P^T + diag(D)` over the flattened event; never materialised densely.
    """
    loc = tf.convert_to_tensor(loc)
    if not loc.dtype.is_floating:
        raise ValueError(f"`loc` must be a float tensor; got dtype {loc.dtype.name}.")
    cov_factor = tf.convert_to_tensor(cov_factor, dtype=loc.dtype)
    cov_diag = tf.convert_to_tensor(cov_diag, dtype=loc.dtype)
    spatial_dims = check_low_rank_ranks(loc, cov_factor, cov_diag)
    if loc.shape.is_fully_defined() and cov_diag.shape.is_fully_defined():
        if loc.shape != cov_diag.shape:
            raise ValueError(
                f"`cov_diag` must have the shape of `loc` {tuple(loc.shape)}; "
                f"got {tuple(cov_diag.shape)}."
            )
    if loc.shape.is_fully_defined() and cov_factor.shape[:-1].is_fully_defined():
        if cov_factor.shape[:-1] != loc.shape:
            raise ValueError(
                f"`cov_factor` must have shape {tuple(loc.shape)} + (R,); "
                f"got {tuple(cov_factor.shape)}."
            )
    if validate_args:
        loc = _checks.assert_finite(loc, "loc")
        cov_factor = _checks.assert_finite(cov_factor, "cov_factor")
        cov_diag = _checks.assert_finite(cov_diag, "cov_diag")
        with tf.control_dependencies(
            [tf.debugging.assert_positive(cov_diag, message="`cov_diag` must be positive")]
        ):
            cov_diag = tf.identity(cov_diag)
    return LowRankLogitsDistribution(
        loc, cov_factor, cov_diag, validate_args=validate_args, name=name, spatial_dims=spatial_dims
    )


def check_low_rank_ranks(loc, cov_factor, cov_diag, leading: str = "B") -> int:
    """`spatial_dims` (2 or 3) of low-rank parameters `loc, cov_diag [B, *S, C]` and
    `cov_factor [B, *S, C, R]` (or None), told by the rank of `loc`; a rank mismatch is a
    `ValueError` naming the argument. `leading` names the batch axes in messages."""
    extra = len(leading.split(",")) + 1  # the leading axes and C
    s = _checks.infer_spatial_dims(loc, "loc", extra, f"[{leading}, H, W, C]")
    _checks.check_rank(cov_diag, extra + s, "cov_diag", _checks.spatial_form(s, leading, "C"))
    if cov_factor is not None:
        form = _checks.spatial_form(s, leading, "C, R")
        _checks.check_rank(cov_factor, extra + 1 + s, "cov_factor", form)
    return s


def sample_low_rank(
    loc: tf.Tensor,
    cov_factor: tf.Tensor,
    cov_diag: tf.Tensor,
    num_samples: int,
    seed: SeedLike = None,
    antithetic: bool = False,
    noise: Optional[tuple] = None,
) -> tf.Tensor:
    """Reparameterised samples of low-rank logits, `[N, B, *S, C]`, in export-safe ops.

    ```none
    eta_n = mu + P z_n + sqrt(D) * eps_n,   z_n ~ N(0, I_R),  eps_n ~ N(0, I)
    antithetic:  eta_{n+N/2} = 2 mu - eta_n   (mirrored pairs; unbiased, lower variance)
    ```

    Args:
      loc: `[B, *S, C]`; cov_factor: `[B, *S, C, R]`; cov_diag: `[B, *S, C]` (variances),
        `S = (H, W)` or `(D, H, W)`.
      num_samples: N, a Python int (even when `antithetic`).
      seed: None (stateful RNG) or an int / shape-[2] seed for stateless sampling.
      antithetic: draw N/2 samples and mirror them about the mean.
      noise: optional `(z, eps)` with shapes `[N', B, R]` and `[N', B, *S, C]`
        (N' = N/2 when antithetic) to make sampling deterministic (export parity tests).
    """
    num_samples = _checks.check_num_samples(num_samples, antithetic)
    n = num_samples // 2 if antithetic else num_samples
    if noise is None:
        batch = tf.shape(loc)[0]
        rank = tf.shape(cov_factor)[-1]
        z = noise_lib.standard_normal(
            tf.stack([n, batch, rank]), _seeds.split_seed(seed, 1), loc.dtype
        )
        eps = noise_lib.standard_normal(
            tf.concat([[n], tf.shape(loc)], 0), _seeds.split_seed(seed, 2), loc.dtype
        )
    else:
        z, eps = (tf.convert_to_tensor(t, dtype=loc.dtype) for t in noise)
    # P z: [B,*S,C,R] x [N,B,R] -> [N,B,*S,C], as one batched matmul [B,N,R] x [B,R,X*C]
    # and a transpose of whole [X*C] rows (an einsum here is ~6x slower on CPU).
    shape = tf.shape(loc)
    flat_factor = tf.reshape(cov_factor, tf.stack([shape[0], -1, tf.shape(cov_factor)[-1]]))
    low_rank = tf.matmul(tf.transpose(z, [1, 0, 2]), flat_factor, transpose_b=True)
    low_rank = tf.reshape(tf.transpose(low_rank, [1, 0, 2]), tf.concat([[n], shape], 0))
    deviation = low_rank + tf.sqrt(cov_diag)[tf.newaxis] * eps
    if antithetic:
        deviation = tf.concat([deviation, -deviation], axis=0)
    return loc[tf.newaxis] + deviation
