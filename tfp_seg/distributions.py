"""Distributions over per-pixel logits, built from plain parameter tensors.

Keras 3 models cannot output a `tfd.Distribution`, so every head in `tfp_seg` outputs packed
parameter tensors and the functions here turn those parameters into TensorFlow Probability
distributions (TFP's `params_size` / `new` convention). Sampling that must survive export
(SavedModel, ONNX) is written in plain reparameterised ops in `sample_low_rank` and
`sample_diagonal`, not through TFP's own sampler, which tf2onnx cannot convert.

#### Mathematical Details

The low-rank logits distribution of a Stochastic Segmentation Network (Monteiro et al., 2020)
is a multivariate normal over the flattened event of S = H*W pixels and C classes:

```none
eta = vec(logits) in R^(S*C)
eta ~ N(mu, P P^T + diag(D)),   P in R^(S*C x R),   D in R_+^(S*C)
sample:  eta = mu + P z + sqrt(D) * eps,   z ~ N(0, I_R),  eps ~ N(0, I_(S*C))
```

The covariance is never materialised: TFP's `MultivariateNormalDiagPlusLowRankCovariance`
works through a `LinearOperatorLowRankUpdate` (Woodbury identity and the matrix determinant
lemma), O(S*C*R^2) per log-density instead of O((S*C)^3).

#### References

[1] Miguel Monteiro et al. Stochastic Segmentation Networks: Modelling Spatially Correlated
    Aleatoric Uncertainty. NeurIPS 2020. https://arxiv.org/abs/2006.06015
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import tensorflow as tf
import tensorflow_probability as tfp

from tfp_seg.distribute import replica_seed

tfd = tfp.distributions
tfb = tfp.bijectors

__all__ = [
    "low_rank_logits",
    "diagonal_logits",
    "LowRankLogitsDistribution",
    "sample_low_rank",
    "sample_diagonal",
    "standard_normal",
    "sample_low_rank_labels",
    "argmax_classes",
    "low_rank_mean_probabilities",
    "mean_softmax",
    "prefers_planar_sampling",
    "check_num_samples",
]

SeedLike = Union[None, int, Sequence[int], tf.Tensor]


def _static_rank_check(x: tf.Tensor, rank: int, name: str, form: str) -> None:
    if x.shape.rank is not None and x.shape.rank != rank:
        raise ValueError(
            f"`{name}` must have rank {rank} with shape {form}; got shape {tuple(x.shape)}."
        )


class LowRankLogitsDistribution(tfd.TransformedDistribution):
    """Low-rank multivariate normal over logits with event shape `[H, W, C]`.

    A `tfd.MultivariateNormalDiagPlusLowRankCovariance` over the flattened `H*W*C` event,
    reshaped to `[H, W, C]` by a `tfb.Reshape` bijector (a volume-preserving map, so
    `log_prob` is the flat density). It adds what `TransformedDistribution` lacks for this
    case: `mean`, `stddev`, `variance` and `covariance` (flattened event, small sizes only),
    and the parameters `loc`, `cov_factor`, `cov_diag` in their `[B, H, W, C(, R)]` layout.
    """

    def __init__(self, loc, cov_factor, cov_diag, validate_args=False, name="LowRankLogits"):
        parameters = dict(locals())
        with tf.name_scope(name) as name:
            loc = tf.convert_to_tensor(loc, name="loc")
            dtype = loc.dtype
            cov_factor = tf.convert_to_tensor(cov_factor, dtype=dtype, name="cov_factor")
            cov_diag = tf.convert_to_tensor(cov_diag, dtype=dtype, name="cov_diag")
            self._loc = loc
            self._cov_factor = cov_factor
            self._cov_diag = cov_diag
            event_shape = tf.shape(loc)[-3:]
            batch_shape = tf.shape(loc)[:-3]
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
            static_event = loc.shape[-3:]
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
        return dict(
            loc=tfp.util.ParameterProperties(event_ndims=3),
            cov_factor=tfp.util.ParameterProperties(event_ndims=4),
            cov_diag=tfp.util.ParameterProperties(event_ndims=3),
        )

    @property
    def loc(self) -> tf.Tensor:
        """Mean logits `[B, H, W, C]`."""
        return self._loc

    @property
    def cov_factor(self) -> tf.Tensor:
        """Low-rank covariance factor `P` in its `[B, H, W, C, R]` layout."""
        return self._cov_factor

    @property
    def cov_diag(self) -> tf.Tensor:
        """Diagonal `D` of the covariance (variances, not standard deviations) `[B, H, W, C]`."""
        return self._cov_diag

    @property
    def flat_distribution(self) -> tfd.MultivariateNormalDiagPlusLowRankCovariance:
        """The underlying distribution over the flattened `H*W*C` event."""
        return self.distribution

    def _mean(self, **kwargs):
        return tf.identity(self._loc)

    def _variance(self, **kwargs):
        return self._cov_diag + tf.reduce_sum(tf.square(self._cov_factor), axis=-1)

    def _stddev(self, **kwargs):
        return tf.sqrt(self._variance())

    def _covariance(self, **kwargs):
        # Dense [B, H*W*C, H*W*C]; only for small sizes (tests, diagnostics).
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
    """Low-rank multivariate normal over logits, event shape `[H, W, C]`.

    Args:
      loc: mean logits, float `[B, H, W, C]`.
      cov_factor: covariance factor, float `[B, H, W, C, R]`; reshaped to `P` of shape
        `[B, H*W*C, R]` (row-major over H, W, C, matching `tf.reshape(loc, [B, -1])`).
      cov_diag: positive covariance diagonal `D` (variances), float `[B, H, W, C]`.
      validate_args: check positivity and finiteness of the parameters at run time.

    Returns:
      A `LowRankLogitsDistribution` with batch shape `[B]`, event shape `[H, W, C]` and
      covariance `P P^T + diag(D)` over the flattened event; never materialised densely.
    """
    loc = tf.convert_to_tensor(loc)
    if not loc.dtype.is_floating:
        raise ValueError(f"`loc` must be a float tensor; got dtype {loc.dtype.name}.")
    cov_factor = tf.convert_to_tensor(cov_factor, dtype=loc.dtype)
    cov_diag = tf.convert_to_tensor(cov_diag, dtype=loc.dtype)
    _static_rank_check(loc, 4, "loc", "[B, H, W, C]")
    _static_rank_check(cov_factor, 5, "cov_factor", "[B, H, W, C, R]")
    _static_rank_check(cov_diag, 4, "cov_diag", "[B, H, W, C]")
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
        loc = _assert_finite(loc, "loc")
        cov_factor = _assert_finite(cov_factor, "cov_factor")
        cov_diag = _assert_finite(cov_diag, "cov_diag")
        with tf.control_dependencies(
            [tf.debugging.assert_positive(cov_diag, message="`cov_diag` must be positive")]
        ):
            cov_diag = tf.identity(cov_diag)
    return LowRankLogitsDistribution(
        loc, cov_factor, cov_diag, validate_args=validate_args, name=name
    )


def diagonal_logits(loc, scale, validate_args: bool = False, name: str = "DiagonalLogits"):
    """Independent normal logits, `tfd.Independent(tfd.Normal(loc, scale), 3)`.

    Args:
      loc: mean logits `[B, H, W, C]`.
      scale: positive standard deviations, same shape as `loc`.

    Returns:
      A distribution with batch shape `[B]` and event shape `[H, W, C]`.
    """
    loc = tf.convert_to_tensor(loc)
    scale = tf.convert_to_tensor(scale, dtype=loc.dtype)
    _static_rank_check(loc, 4, "loc", "[B, H, W, C]")
    _static_rank_check(scale, 4, "scale", "[B, H, W, C]")
    return tfd.Independent(
        tfd.Normal(loc, scale, validate_args=validate_args),
        reinterpreted_batch_ndims=3,
        name=name,
    )


def _assert_finite(x: tf.Tensor, name: str) -> tf.Tensor:
    return tf.debugging.assert_all_finite(x, f"`{name}` contains NaN or Inf")


def check_num_samples(num_samples, antithetic: bool) -> int:
    """Validate a Python sample count (and evenness with antithetic sampling)."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        try:
            num_samples = int(num_samples)
        except (TypeError, ValueError):
            raise ValueError(
                f"`num_samples` must be a positive int; got {num_samples!r}."
            ) from None
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1; got {num_samples}.")
    if antithetic and num_samples % 2:
        raise ValueError(
            f"`num_samples` must be even with antithetic=True (samples come in mirrored "
            f"pairs); got {num_samples}."
        )
    return num_samples


def standard_normal(shape, seed: SeedLike = None, dtype=tf.float32) -> tf.Tensor:
    """Standard normal noise in export-safe ops, by the Box-Muller transform of uniforms.

    ```none
    u1, u2 ~ U[0, 1)    r = sqrt(-2 log(1 - u1)),  a = 2 pi u2    ->   r cos(a), r sin(a) ~ N(0, 1)
    ```

    Exact in distribution, with the same float32 resolution as TensorFlow's own normal kernel
    (which is Box-Muller too: tails reach ~5.6 sigma), but built from vectorised elementwise
    ops on uniforms: ~1.6x faster on CPU than `tf.random.stateless_normal`, and the noise is
    the bulk of the cost of drawing many samples. Half precision and bfloat16 are drawn in
    float32 and cast; float64 is drawn from float64 uniforms.

    `seed=None` uses the stateful `tf.random.uniform` (converts to ONNX `RandomUniformLike`);
    an int or a shape-[2] int seed uses `tf.random.stateless_uniform`, reproducible across
    calls and independent of global state. Under a `tf.distribute` strategy with more than
    one replica in sync, the replica id is folded into the seed
    (`tfp_seg.distribute.replica_seed`) so that replicas do not draw identical noise for their
    different examples; with one replica (and in exported graphs) nothing changes.
    """
    seed = replica_seed(seed)
    dtype = tf.as_dtype(dtype)
    draw_dtype = tf.float64 if dtype == tf.float64 else tf.float32
    shape = tf.cast(shape, tf.int32)
    size = tf.reduce_prod(shape)
    pairs = tf.stack([2, (size + 1) // 2])
    if seed is None:
        u = tf.random.uniform(pairs, dtype=draw_dtype)
    else:
        if isinstance(seed, int):
            seed = [seed, 0]
        seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
        u = tf.random.stateless_uniform(pairs, seed=seed, dtype=draw_dtype)
    # 1 - u is exact (u is a multiple of 2^-23, or 2^-52) and in (0, 1]; `log(1 - u)`, not
    # `log1p(-u)`, because ONNX has no Log1p.
    radius = tf.sqrt(-2.0 * tf.math.log(1.0 - u[0]))
    angle = tf.constant(2.0 * math.pi, draw_dtype) * u[1]
    flat = tf.concat([radius * tf.cos(angle), radius * tf.sin(angle)], axis=0)
    return tf.cast(tf.reshape(flat[:size], shape), dtype)


def _split_seed(seed: SeedLike, salt: int):
    if seed is None:
        return None
    if isinstance(seed, int):
        return [seed, salt]
    seed = tf.cast(tf.convert_to_tensor(seed), tf.int64)
    return tf.stack([seed[0], seed[1] * 7919 + salt])


def sample_low_rank(
    loc: tf.Tensor,
    cov_factor: tf.Tensor,
    cov_diag: tf.Tensor,
    num_samples: int,
    seed: SeedLike = None,
    antithetic: bool = False,
    noise: Optional[tuple] = None,
) -> tf.Tensor:
    """Reparameterised samples of low-rank logits, `[N, B, H, W, C]`, in export-safe ops.

    ```none
    eta_n = mu + P z_n + sqrt(D) * eps_n,   z_n ~ N(0, I_R),  eps_n ~ N(0, I)
    antithetic:  eta_{n+N/2} = 2 mu - eta_n   (mirrored pairs; unbiased, lower variance)
    ```

    Args:
      loc: `[B, H, W, C]`; cov_factor: `[B, H, W, C, R]`; cov_diag: `[B, H, W, C]` (variances).
      num_samples: N, a Python int (even when `antithetic`).
      seed: None (stateful RNG) or an int / shape-[2] seed for stateless sampling.
      antithetic: draw N/2 samples and mirror them about the mean.
      noise: optional `(z, eps)` with shapes `[N', B, R]` and `[N', B, H, W, C]`
        (N' = N/2 when antithetic) to make sampling deterministic (export parity tests).
    """
    num_samples = check_num_samples(num_samples, antithetic)
    n = num_samples // 2 if antithetic else num_samples
    if noise is None:
        batch = tf.shape(loc)[0]
        rank = tf.shape(cov_factor)[-1]
        z = standard_normal(tf.stack([n, batch, rank]), _split_seed(seed, 1), loc.dtype)
        eps = standard_normal(tf.concat([[n], tf.shape(loc)], 0), _split_seed(seed, 2), loc.dtype)
    else:
        z, eps = (tf.convert_to_tensor(t, dtype=loc.dtype) for t in noise)
    # P z: [B,H,W,C,R] x [N,B,R] -> [N,B,H,W,C], as one batched matmul [B,N,R] x [B,R,HWC]
    # and a transpose of whole [H*W*C] rows (an einsum here is ~6x slower on CPU).
    shape = tf.shape(loc)
    flat_factor = tf.reshape(cov_factor, tf.stack([shape[0], -1, tf.shape(cov_factor)[-1]]))
    low_rank = tf.matmul(tf.transpose(z, [1, 0, 2]), flat_factor, transpose_b=True)
    low_rank = tf.reshape(tf.transpose(low_rank, [1, 0, 2]), tf.concat([[n], shape], 0))
    deviation = low_rank + tf.sqrt(cov_diag)[tf.newaxis] * eps
    if antithetic:
        deviation = tf.concat([deviation, -deviation], axis=0)
    return loc[tf.newaxis] + deviation


def sample_diagonal(
    loc: tf.Tensor,
    scale: tf.Tensor,
    num_samples: int,
    seed: SeedLike = None,
    antithetic: bool = False,
    noise: Optional[tf.Tensor] = None,
) -> tf.Tensor:
    """Reparameterised samples of independent normal logits `[N, B, H, W, C]`."""
    num_samples = check_num_samples(num_samples, antithetic)
    n = num_samples // 2 if antithetic else num_samples
    if noise is None:
        eps = standard_normal(tf.concat([[n], tf.shape(loc)], 0), _split_seed(seed, 3), loc.dtype)
    else:
        eps = tf.convert_to_tensor(noise, dtype=loc.dtype)
    deviation = scale[tf.newaxis] * eps
    if antithetic:
        deviation = tf.concat([deviation, -deviation], axis=0)
    return loc[tf.newaxis] + deviation


# --- label maps ----------------------------------------------------------------------------------
_PLANAR_MAX_CLASSES = 32  # argmax_classes: plane by plane up to here
# The planar softmax and the planar samplers (label maps from differences, mean probabilities)
# pay one op per class plane: faster up to 8 classes, slower from 12 on
# (`python benchmarks/bench_sampling_ops.py --num-classes C --no-jit`).
_PLANAR_SAMPLING_MAX_CLASSES = 8


def prefers_planar_sampling(num_classes: int) -> bool:
    """Whether the class-planar samplers (`sample_low_rank_labels`,
    `low_rank_mean_probabilities`) beat sampling logits for `num_classes` (measured)."""
    return num_classes <= _PLANAR_SAMPLING_MAX_CLASSES


def _argmax_planes(planes):
    """Index of the largest of a list of equally shaped planes (the first on ties), int32.

    Elementwise ops over whole planes: faster on CPU than `tf.argmax` over a short trailing
    axis, which the kernel does not vectorise (see `argmax_classes`).
    """
    best, index = planes[0], tf.zeros(tf.shape(planes[0]), tf.int32)
    for c, plane in enumerate(planes[1:], start=1):
        index = tf.where(plane > best, tf.constant(c, tf.int32), index)
        best = tf.maximum(best, plane)
    return index


def argmax_classes(logits: tf.Tensor) -> tf.Tensor:
    """`argmax` over the trailing class axis of `logits [..., C]` as int32 (first on ties).

    The classes are moved first and compared plane by plane (up to 32 classes), which on CPU
    is ~4x faster than `tf.argmax(logits, -1)` for 3 classes and 1.4x for 19
    (`benchmarks/bench_sampling_ops.py`).
    """
    logits = tf.convert_to_tensor(logits)
    num_classes = logits.shape[-1]
    rank = logits.shape.rank
    if num_classes is None or rank is None or num_classes > _PLANAR_MAX_CLASSES:
        return tf.argmax(logits, axis=-1, output_type=tf.int32)
    if num_classes == 1:
        return tf.zeros(tf.shape(logits)[:-1], tf.int32)
    planar = tf.transpose(logits, [rank - 1] + list(range(rank - 1)))
    return _argmax_planes(tf.unstack(planar, num_classes, axis=0))


def mean_softmax(logit_samples: tf.Tensor) -> tf.Tensor:
    """`mean_n softmax(logit_samples[n])`: `[N, ..., C]` -> `[..., C]`.

    Up to 8 classes computed with the classes moved first (elementwise ops on whole planes):
    ~2x faster on CPU than `tf.nn.softmax` over a trailing axis of 3 classes; from 12 classes
    on `tf.nn.softmax` is faster and is used (`benchmarks/bench_sampling_ops.py`).
    """
    samples = tf.convert_to_tensor(logit_samples)
    rank = samples.shape.rank
    num_classes = samples.shape[-1]
    if rank is None or num_classes is None or not prefers_planar_sampling(num_classes):
        return tf.reduce_mean(tf.nn.softmax(samples, axis=-1), axis=0)
    planar = tf.transpose(samples, [rank - 1] + list(range(rank - 1)))
    exps = tf.exp(planar - tf.reduce_max(planar, axis=0, keepdims=True))
    probs = tf.reduce_mean(exps / tf.reduce_sum(exps, axis=0, keepdims=True), axis=1)
    return tf.transpose(probs, list(range(1, rank - 1)) + [0])


def _planar(t: tf.Tensor) -> tf.Tensor:
    """`[B, H, W, C, ...]` -> `[B, C, H*W, ...]`."""
    rank = t.shape.rank
    moved = tf.transpose(t, [0, 3, 1, 2] + list(range(4, rank)))
    shape = tf.shape(moved)
    return tf.reshape(moved, tf.concat([shape[:2], [shape[2] * shape[3]], shape[4:]], 0))


def _check_low_rank_args(loc, cov_factor, cov_diag, num_samples, antithetic: bool):
    """Validated `(num_samples, loc, cov_factor, cov_diag)` of the planar low-rank samplers."""
    num_samples = check_num_samples(num_samples, antithetic)
    loc = tf.convert_to_tensor(loc)
    cov_diag = tf.convert_to_tensor(cov_diag, loc.dtype)
    _static_rank_check(loc, 4, "loc", "[B, H, W, C]")
    _static_rank_check(cov_diag, 4, "cov_diag", "[B, H, W, C]")
    if cov_factor is not None:
        cov_factor = tf.convert_to_tensor(cov_factor, loc.dtype)
        _static_rank_check(cov_factor, 5, "cov_factor", "[B, H, W, C, R]")
    if loc.shape[-1] is None:
        raise ValueError("`loc` must have a known number of classes (last axis).")
    return num_samples, loc, cov_factor, cov_diag


def _planar_normals(noise_shape, planes: int, seed, dtype) -> list:
    """`planes` standard normal planes `[B, n, X]` from one draw of `noise_shape [B, n, P, X]`."""
    return tf.unstack(standard_normal(noise_shape, seed, dtype), planes, axis=2)


def _planar_low_rank(factor_p, noise_shape, planes: int, seed, dtype) -> list:
    """The planes `[B, n, X]` of `P z` for planar factors `factor_p [B, P, X, R]` and one
    `z ~ N(0, I_R)` per image and sample, as one batched matmul."""
    batch, rank = tf.shape(factor_p)[0], tf.shape(factor_p)[-1]
    flat = tf.reshape(factor_p, tf.stack([batch, -1, rank]))  # [B, P*X, R]
    z = standard_normal(tf.stack([batch, noise_shape[1], rank]), seed, dtype)
    low_rank = tf.matmul(z, flat, transpose_b=True)  # [B, n, P*X]
    return tf.unstack(tf.reshape(low_rank, noise_shape), planes, axis=2)


def sample_low_rank_labels(
    loc: tf.Tensor,
    cov_factor: Optional[tf.Tensor],
    cov_diag: tf.Tensor,
    num_samples: int,
    seed: SeedLike = None,
    antithetic: bool = False,
) -> tf.Tensor:
    """Label maps `[N, B, H, W]` (int32) distributed as `argmax_c eta_c`, eta ~ low-rank logits.

    The arg max of a pixel's C logits depends only on the C - 1 differences
    `delta_c = eta_c - eta_0`, so the label maps are drawn from those directly, with C - 1
    normals per pixel and sample instead of C, C - 1 class planes of the factor, and no C-way
    arg max over a trailing axis (for two classes: one normal and a sign test). Within a pixel
    the differences' noise `sqrt(D_c) eps_c - sqrt(D_0) eps_0` has covariance
    `diag(D_1..D_K) + D_0 1 1^T` (K = C - 1), whose Cholesky factor is applied in O(K) by a
    running sum:

    ```none
    delta = (mu_c - mu_0) + (P_c - P_0) z + L xi,   z ~ N(0, I_R), xi ~ N(0, I_K) per pixel
    t_0 = 1;  L_jj = sqrt(D_j + t_(j-1) D_0);  L_ij = D_0 t_(j-1) / L_jj (i > j);
    t_j = t_(j-1) D_j / L_jj^2
    label = argmax(0, delta_1, ..., delta_K)
    ```

    The maps have exactly the distribution of `argmax(sample_low_rank(...), -1)`; they are
    not the same draws for the same seed (different noise is drawn). `antithetic` mirrors the
    differences about their mean, which mirrors the logits.

    Args:
      loc: `[B, H, W, C]`; cov_factor: `[B, H, W, C, R]` or None (independent logits);
        cov_diag: `[B, H, W, C]` (variances, positive).
      num_samples: N, a Python int (even when `antithetic`).
      seed: None (stateful RNG) or an int / shape-[2] seed for stateless sampling.
      antithetic: draw N/2 maps and N/2 from the mirrored differences.
    """
    num_samples, loc, cov_factor, cov_diag = _check_low_rank_args(
        loc, cov_factor, cov_diag, num_samples, antithetic
    )
    n = num_samples // 2 if antithetic else num_samples
    num_classes = loc.shape[-1]
    shape = tf.shape(loc)
    maps_shape = tf.concat([[num_samples], shape[:3]], 0)
    if num_classes == 1:
        return tf.zeros(maps_shape, tf.int32)
    k = num_classes - 1
    loc_p, var_p = _planar(loc), _planar(cov_diag)  # [B, C, X]
    noise_shape = tf.stack([shape[0], n, k, shape[1] * shape[2]])
    xi = _planar_normals(noise_shape, k, _split_seed(seed, 22), loc.dtype)
    if cov_factor is not None:
        factor_p = _planar(cov_factor)  # [B, C, X, R]
        low_rank = _planar_low_rank(
            factor_p[:, 1:] - factor_p[:, :1], noise_shape, k, _split_seed(seed, 21), loc.dtype
        )
    # Plane by plane (`tf.math.cumsum` over the short class axis is ~11x slower on CPU).
    var0 = var_p[:, :1]
    t = tf.ones_like(var0)
    running = None  # sum_(i<j) L_ji xi_i, the same coefficient for every row below i
    best = [None, None]
    index = [None, None]
    for j in range(k):
        var_j = var_p[:, j + 1 : j + 2]
        l_jj = tf.sqrt(var_j + t * var0)  # [B, 1, X]
        deviation = l_jj * xi[j]
        if running is not None:
            deviation += running
        if j + 1 < k:
            term = (var0 * t / l_jj) * xi[j]
            running = term if running is None else running + term
        t = t * var_j / tf.square(l_jj)
        if cov_factor is not None:
            deviation += low_rank[j]
        mean_j = loc_p[:, j + 1 : j + 2] - loc_p[:, :1]
        deltas = [mean_j + deviation, mean_j - deviation] if antithetic else [mean_j + deviation]
        for side, delta in enumerate(deltas):
            if j == 0:
                best[side] = tf.maximum(delta, 0.0)
                index[side] = tf.cast(delta > 0, tf.int32)
            else:
                label = tf.constant(j + 1, tf.int32)
                index[side] = tf.where(delta > best[side], label, index[side])
                best[side] = tf.maximum(best[side], delta)
    labels = tf.concat(index, axis=1) if antithetic else index[0]  # [B, N, X]
    return tf.reshape(tf.transpose(labels, [1, 0, 2]), maps_shape)


def low_rank_mean_probabilities(
    loc: tf.Tensor,
    cov_factor: Optional[tf.Tensor],
    cov_diag: tf.Tensor,
    num_samples: int,
    seed: SeedLike = None,
    antithetic: bool = False,
) -> tf.Tensor:
    """Monte Carlo predictive probabilities `E[softmax(eta)]` `[B, H, W, C]` of low-rank logits.

    The same estimator as the mean of `softmax(sample_low_rank(...))`, computed on class planes
    `[B, N, H*W]` (the samples are drawn class-first, so no transpose of the samples and no
    softmax over a short trailing axis); faster on CPU up to 8 classes (see
    `prefers_planar_sampling`). Not the same draws as `sample_low_rank` for the same seed.

    Args: as `sample_low_rank_labels` (`cov_factor` may be None for independent logits).
    """
    num_samples, loc, cov_factor, cov_diag = _check_low_rank_args(
        loc, cov_factor, cov_diag, num_samples, antithetic
    )
    n = num_samples // 2 if antithetic else num_samples
    num_classes = loc.shape[-1]
    shape = tf.shape(loc)
    if num_classes == 1:
        return tf.ones_like(loc)
    loc_p, scale_p = _planar(loc), tf.sqrt(_planar(cov_diag))  # [B, C, X]
    noise_shape = tf.stack([shape[0], n, num_classes, shape[1] * shape[2]])
    eps = _planar_normals(noise_shape, num_classes, _split_seed(seed, 23), loc.dtype)
    if cov_factor is not None:
        low_rank = _planar_low_rank(
            _planar(cov_factor), noise_shape, num_classes, _split_seed(seed, 24), loc.dtype
        )
    deviations = [
        scale_p[:, c : c + 1] * eps[c] + (low_rank[c] if cov_factor is not None else 0.0)
        for c in range(num_classes)
    ]
    sides = [1.0, -1.0] if antithetic else [1.0]
    totals = [0.0] * num_classes
    for sign in sides:
        etas = [loc_p[:, c : c + 1] + sign * d for c, d in enumerate(deviations)]  # [B, n, X]
        top = etas[0]
        for eta in etas[1:]:
            top = tf.maximum(top, eta)
        exps = [tf.exp(eta - top) for eta in etas]
        inv_total = 1.0 / tf.add_n(exps)
        for c in range(num_classes):
            totals[c] += tf.reduce_sum(exps[c] * inv_total, axis=1)  # [B, X]
    probs = tf.stack(totals, axis=-1) / float(num_samples)  # [B, X, C]
    return tf.reshape(probs, shape)
