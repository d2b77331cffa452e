"""Mixtures of low-rank logits distributions with image-level weights (MoSE-style heads).

```none
eta | x  ~  sum_k pi_k N(mu_k, P_k P_k^T + diag(D_k)),   pi = softmax(mixture_logits)
```

over the flattened `prod(S)*C` event of every image (`S = (H, W)` or `(D, H, W)`): the
component `k` is one per image (a discrete choice shared by all pixels, e.g. "the faint
object is there" or "the boundary is the outer one"), and within a component the logits are
the low-rank normal of a Stochastic Segmentation Network (`tfp_seg.distributions.low_rank`).

`mixture_low_rank_logits` builds the TFP distribution (densities, moments);
`sample_mixture_low_rank` draws from it in export-safe ops (a component per image and sample
by the inverse CDF of a uniform, then its low-rank sample), and `mixture_components` is that
component draw on its own.

#### References

[1] Zhitong Gao et al. Modeling Multimodal Aleatoric Uncertainty in Segmentation with Mixture
    of Stochastic Experts. ICLR 2023. https://arxiv.org/abs/2212.07328
[2] Miguel Monteiro et al. Stochastic Segmentation Networks: Modelling Spatially Correlated
    Aleatoric Uncertainty. NeurIPS 2020. https://arxiv.org/abs/2006.06015
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf
import tensorflow_probability as tfp

from tfp_seg import _checks, _seeds
from tfp_seg._seeds import SeedLike
from tfp_seg.distributions import noise as noise_lib
from tfp_seg.distributions.low_rank import LowRankLogitsDistribution, check_low_rank_ranks

tfd = tfp.distributions

__all__ = [
    "MixtureLowRankLogitsDistribution",
    "mixture_low_rank_logits",
    "mixture_components",
    "sample_mixture_low_rank",
]


class MixtureLowRankLogitsDistribution(tfp.distributions.MixtureSameFamily):
    """`tfd.MixtureSameFamily(Categorical(mixture_logits), K low-rank logits distributions)`.

    Batch shape `[B]`, event shape `[*S, C]`; the components are one
    `LowRankLogitsDistribution` with batch shape `[B, K]`. It adds what `MixtureSameFamily`
    lacks for a rank-3 (or 4) event: `covariance` (dense over the flattened `prod(S)*C`
    event, small sizes only), and the parameters `mixture_logits`, `loc`, `cov_factor`,
    `cov_diag`. `spatial_dims` (2 or 3) is the number of spatial axes of the event.

    ```none
    mean     = sum_k pi_k mu_k
    Cov      = sum_k pi_k (Sigma_k + (mu_k - mean)(mu_k - mean)^T)        (law of total variance)
    log p(x) = logsumexp_k( log pi_k + log N(x; mu_k, Sigma_k) )
    ```
    """

    def __init__(
        self,
        mixture_logits,
        loc,
        cov_factor,
        cov_diag,
        validate_args=False,
        name="MixtureLowRankLogits",
        spatial_dims=2,
    ):
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            loc = tf.convert_to_tensor(loc, name="loc")
            dtype = loc.dtype
            mixture_logits = tf.convert_to_tensor(mixture_logits, dtype, name="mixture_logits")
            self._mixture_logits = mixture_logits
            self._components = LowRankLogitsDistribution(
                loc, cov_factor, cov_diag, validate_args=validate_args, spatial_dims=spatial_dims
            )
            super().__init__(
                mixture_distribution=tfd.Categorical(
                    logits=mixture_logits, validate_args=validate_args
                ),
                components_distribution=self._components,
                validate_args=validate_args,
                name=name,
            )
            self._parameters = parameters

    @classmethod
    def _parameter_properties(cls, dtype, num_classes=None):
        # [K, *S, C] (+ R): instance-dependent event ranks (TFP's callable `event_ndims`).
        return dict(
            mixture_logits=tfp.util.ParameterProperties(event_ndims=1),
            loc=tfp.util.ParameterProperties(event_ndims=lambda self: self.spatial_dims + 2),
            cov_factor=tfp.util.ParameterProperties(event_ndims=lambda self: self.spatial_dims + 3),
            cov_diag=tfp.util.ParameterProperties(event_ndims=lambda self: self.spatial_dims + 2),
        )

    @property
    def spatial_dims(self) -> int:
        """The number of spatial axes of the event `[*S, C]` (2 or 3)."""
        return self._components.spatial_dims

    @property
    def mixture_logits(self) -> tf.Tensor:
        """Unnormalised log weights of the components `[B, K]`."""
        return self._mixture_logits

    @property
    def loc(self) -> tf.Tensor:
        """Component means `[B, K, *S, C]`."""
        return self._components.loc

    @property
    def cov_factor(self) -> tf.Tensor:
        """Component covariance factors `[B, K, *S, C, R]`."""
        return self._components.cov_factor

    @property
    def cov_diag(self) -> tf.Tensor:
        """Component covariance diagonals (variances) `[B, K, *S, C]`."""
        return self._components.cov_diag

    def _covariance(self, **kwargs):
        # Dense [B, E, E] over the flattened event; only for small sizes (tests, diagnostics).
        probs = tf.nn.softmax(self._mixture_logits, axis=-1)  # [B, K]
        shape = tf.shape(self.loc)
        means = tf.reshape(self.loc, tf.concat([shape[:2], [-1]], 0))  # [B, K, E]
        covs = self._components.covariance()  # [B, K, E, E]
        mean = tf.reduce_sum(probs[..., tf.newaxis] * means, axis=1, keepdims=True)
        centred = means - mean
        within = tf.reduce_sum(probs[..., tf.newaxis, tf.newaxis] * covs, axis=1)
        between = tf.einsum("bk,bki,bkj->bij", probs, centred, centred)
        return within + between


def mixture_low_rank_logits(
    mixture_logits,
    loc,
    cov_factor,
    cov_diag,
    validate_args: bool = False,
    name: str = "MixtureLowRankLogits",
) -> MixtureLowRankLogitsDistribution:
    """A mixture of K low-rank normal logits distributions per image, event `[*S, C]`.

    `S = (H, W)` or `(D, H, W)`, told by the rank of `loc` (5 or 6).

    Args:
      mixture_logits: unnormalised log weights of the components, float `[B, K]`.
      loc: component means, float `[B, K, *S, C]`.
      cov_factor: component covariance factors `[B, K, *S, C, R]` (the factor of component
        `k` is `P_k = cov_factor[:, k]` reshaped to `[B, prod(S)*C, R]`, as in
        `low_rank_logits`).
      cov_diag: positive component covariance diagonals (variances) `[B, K, *S, C]`.
      validate_args: check finiteness and positivity of the parameters at run time.

    Returns:
      A `MixtureLowRankLogitsDistribution`: batch `[B]`, event `[*S, C]`.
    """
    loc = tf.convert_to_tensor(loc)
    if not loc.dtype.is_floating:
        raise ValueError(f"`loc` must be a float tensor; got dtype {loc.dtype.name}.")
    mixture_logits = tf.convert_to_tensor(mixture_logits, loc.dtype)
    cov_factor = tf.convert_to_tensor(cov_factor, loc.dtype)
    cov_diag = tf.convert_to_tensor(cov_diag, loc.dtype)
    spatial_dims = _check_mixture_args(mixture_logits, loc, cov_factor, cov_diag)
    if validate_args:
        mixture_logits = _checks.assert_finite(mixture_logits, "mixture_logits")
        loc = _checks.assert_finite(loc, "loc")
        cov_factor = _checks.assert_finite(cov_factor, "cov_factor")
        cov_diag = _checks.assert_finite(cov_diag, "cov_diag")
        with tf.control_dependencies(
            [tf.debugging.assert_positive(cov_diag, message="`cov_diag` must be positive")]
        ):
            cov_diag = tf.identity(cov_diag)
    return MixtureLowRankLogitsDistribution(
        mixture_logits,
        loc,
        cov_factor,
        cov_diag,
        validate_args=validate_args,
        name=name,
        spatial_dims=spatial_dims,
    )


def _check_mixture_args(mixture_logits, loc, cov_factor, cov_diag) -> int:
    """The `spatial_dims` (2 or 3) of mixture parameters `loc [B, K, *S, C]`, after the
    checks of their ranks and static shapes."""
    _checks.check_rank(mixture_logits, 2, "mixture_logits", "[B, K]")
    spatial_dims = check_low_rank_ranks(loc, cov_factor, cov_diag, leading="B, K")
    if not loc.shape[:2].is_compatible_with(mixture_logits.shape):
        raise ValueError(
            f"`mixture_logits` must have shape [B, K] = {tuple(loc.shape[:2])} (the first "
            f"two axes of `loc`); got {tuple(mixture_logits.shape)}."
        )
    if not loc.shape.is_compatible_with(cov_diag.shape):
        raise ValueError(
            f"`cov_diag` must have the shape of `loc` {tuple(loc.shape)}; "
            f"got {tuple(cov_diag.shape)}."
        )
    if not cov_factor.shape[:-1].is_compatible_with(loc.shape):
        raise ValueError(
            f"`cov_factor` must have shape {tuple(loc.shape)} + (R,); "
            f"got {tuple(cov_factor.shape)}."
        )
    return spatial_dims


def _uniform(shape, seed: SeedLike, dtype) -> tf.Tensor:
    """Uniforms in `[0, 1)` in export-safe ops (stateful `tf.random.uniform` for None, else
    `stateless_uniform`); distinct per replica under `tf.distribute`, as `standard_normal`."""
    seed = _seeds.replica_seed(seed)
    if seed is None:
        return tf.random.uniform(shape, dtype=dtype)
    return tf.random.stateless_uniform(shape, seed=_seeds.stateless_seed(seed), dtype=dtype)


def _component_one_hot(mixture_logits: tf.Tensor, uniforms: tf.Tensor) -> tf.Tensor:
    """One-hot components `[N, B, K]` (float) by the inverse CDF of `uniforms [N, B]`.

    ```none
    cdf_k = sum_(j<=k) pi_j;   component = k  iff  cdf_(k-1) <= u < cdf_k   (cdf_(-1) = 0)
    ```
    The last component takes everything above `cdf_(K-2)`, so rounding of `cdf_(K-1)` below 1
    loses no mass. Comparisons and products only (no ArgMax / OneHot): export-safe.
    """
    probs = tf.nn.softmax(mixture_logits, axis=-1)  # [B, K]
    cdf = tf.math.cumsum(probs, axis=-1)
    batch = tf.shape(cdf)[0]
    lower = tf.concat([tf.zeros([batch, 1], cdf.dtype), cdf[:, :-1]], axis=1)
    upper = tf.concat([cdf[:, :-1], tf.fill([batch, 1], tf.constant(2.0, cdf.dtype))], axis=1)
    u = uniforms[..., tf.newaxis]  # [N, B, 1]
    above = tf.cast(u >= lower[tf.newaxis], cdf.dtype)
    below = tf.cast(u < upper[tf.newaxis], cdf.dtype)
    return above * below


def mixture_components(mixture_logits, num_samples: int, seed: SeedLike = None, uniforms=None):
    """Component indices `[N, B]` (int32) drawn from `Categorical(mixture_logits [B, K])`.

    By the inverse CDF of uniforms (export-safe ops): the component draw of
    `sample_mixture_low_rank` for the same `seed` (or the same `uniforms [N, B]`).
    """
    mixture_logits = tf.convert_to_tensor(mixture_logits)
    _checks.check_rank(mixture_logits, 2, "mixture_logits", "[B, K]")
    num_samples = _checks.check_num_samples(num_samples, antithetic=False)
    if uniforms is None:
        shape = tf.stack([num_samples, tf.shape(mixture_logits)[0]])
        uniforms = _uniform(shape, _seeds.split_seed(seed, 41), mixture_logits.dtype)
    one_hot = _component_one_hot(
        mixture_logits, tf.convert_to_tensor(uniforms, mixture_logits.dtype)
    )
    k = tf.cast(tf.range(tf.shape(one_hot)[-1]), one_hot.dtype)
    return tf.cast(tf.reduce_sum(one_hot * k, axis=-1), tf.int32)


def sample_mixture_low_rank(
    mixture_logits: tf.Tensor,
    loc: tf.Tensor,
    cov_factor: tf.Tensor,
    cov_diag: tf.Tensor,
    num_samples: int,
    seed: SeedLike = None,
    antithetic: bool = False,
    noise: Optional[tuple] = None,
) -> tf.Tensor:
    """Samples `[N, B, *S, C]` of a mixture of low-rank logits, in export-safe ops.

    ```none
    k_n ~ Categorical(softmax(mixture_logits))      inverse CDF of u_n ~ U[0, 1), per image
    eta_n = mu_(k_n) + P_(k_n) z_n + sqrt(D_(k_n)) * eps_n,   z_n ~ N(0, I_R), eps_n ~ N(0, I)
    antithetic:  eta_(n+N/2) = 2 mu_(k_n) - eta_n       (a pair shares its component)
    ```

    The chosen component's parameters are read with one-hot matrix products (no gather):
    `mu_k` and `sqrt(D_k)` as `[B, N, K] x [B, K, E]` (E = prod(S)*C), and `P_k z` as one
    batched matmul of the factors of all components `[B, E, K*R]` with `z` placed in the
    chosen component's block of `[B, N, K*R]` (zeros elsewhere).

    Args:
      mixture_logits: `[B, K]`; loc: `[B, K, *S, C]`; cov_factor: `[B, K, *S, C, R]`;
        cov_diag: `[B, K, *S, C]` (variances).
      num_samples: N, a Python int (even when `antithetic`).
      seed: None (stateful RNG) or an int / shape-[2] seed for stateless sampling.
      antithetic: draw N/2 samples and mirror each about its component's mean.
      noise: optional fixed `(u, z, eps)`: uniforms `[N', B]` in `[0, 1)` (the components),
        `z [N', B, R]`, `eps [N', B, *S, C]` (N' = N/2 when antithetic).
    """
    num_samples = _checks.check_num_samples(num_samples, antithetic)
    n = num_samples // 2 if antithetic else num_samples
    loc = tf.convert_to_tensor(loc)
    mixture_logits = tf.convert_to_tensor(mixture_logits, loc.dtype)
    cov_factor = tf.convert_to_tensor(cov_factor, loc.dtype)
    cov_diag = tf.convert_to_tensor(cov_diag, loc.dtype)
    spatial_dims = _check_mixture_args(mixture_logits, loc, cov_factor, cov_diag)
    shape = tf.shape(loc)  # [B, K, *S, C]
    batch, k = shape[0], shape[1]
    rank = tf.shape(cov_factor)[-1]
    event = shape[2:]
    if noise is None:
        u = _uniform(tf.stack([n, batch]), _seeds.split_seed(seed, 41), loc.dtype)
        z = noise_lib.standard_normal(
            tf.stack([n, batch, rank]), _seeds.split_seed(seed, 42), loc.dtype
        )
        eps = noise_lib.standard_normal(
            tf.concat([[n, batch], event], 0), _seeds.split_seed(seed, 43), loc.dtype
        )
    else:
        if not isinstance(noise, (tuple, list)) or len(noise) != 3:
            raise ValueError(
                "`noise` must be a triple (u [N, B], z [N, B, R], eps "
                f"{_checks.spatial_form(spatial_dims, 'N, B', 'C')}); got "
                f"{type(noise).__name__}."
            )
        u, z, eps = (tf.convert_to_tensor(t, dtype=loc.dtype) for t in noise)
    one_hot = tf.transpose(_component_one_hot(mixture_logits, u), [1, 0, 2])  # [B, n, K]
    flat = tf.stack([batch, k, -1])
    mean = tf.matmul(one_hot, tf.reshape(loc, flat))  # [B, n, E]
    scale = tf.matmul(one_hot, tf.reshape(tf.sqrt(cov_diag), flat))  # [B, n, E]
    # P_k z for the chosen k: z in the chosen block of [B, n, K*R], times [B, E, K*R].
    factors = tf.transpose(tf.reshape(cov_factor, tf.stack([batch, k, -1, rank])), [0, 2, 1, 3])
    factors = tf.reshape(factors, tf.stack([batch, -1, k * rank]))  # [B, E, K*R]
    z_blocks = one_hot[..., tf.newaxis] * tf.transpose(z, [1, 0, 2])[:, :, tf.newaxis]
    z_blocks = tf.reshape(z_blocks, tf.stack([batch, n, k * rank]))
    low_rank = tf.matmul(z_blocks, factors, transpose_b=True)  # [B, n, E]
    eps_flat = tf.transpose(tf.reshape(eps, tf.stack([n, batch, -1])), [1, 0, 2])
    deviation = low_rank + scale * eps_flat
    samples = [mean + deviation, mean - deviation] if antithetic else [mean + deviation]
    samples = tf.concat(samples, axis=1)  # [B, N, E]
    out_shape = tf.concat([[num_samples, batch], event], 0)
    return tf.reshape(tf.transpose(samples, [1, 0, 2]), out_shape)
