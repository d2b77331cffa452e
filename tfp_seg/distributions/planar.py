"""Class-planar samplers of low-rank logits: label maps and mean probabilities.

Both draw the noise class-first (`[B, N, X]` planes, `X = prod(S)` pixels or voxels of
`S = (H, W)` or `(D, H, W)`), so no sample tensor `[N, B, *S, C]` is transposed and no softmax
or arg max runs over a short trailing axis; faster on CPU up to 8 classes
(`tfp_seg.distributions.prefers_planar_sampling`).
"""

from __future__ import annotations

from typing import Optional

import tensorflow as tf

from tfp_seg import _checks, _seeds
from tfp_seg._seeds import SeedLike
from tfp_seg.distributions import noise as noise_lib
from tfp_seg.distributions.low_rank import check_low_rank_ranks

__all__ = ["sample_low_rank_labels", "low_rank_mean_probabilities"]


def pixel_count(shape: tf.Tensor, start: int, spatial_dims: int) -> tf.Tensor:
    """`prod(shape[start : start + spatial_dims])`, the pixels (voxels) X of a dynamic shape,
    as a product of scalars (for images the `H * W` of one multiplication)."""
    count = shape[start]
    for axis in range(start + 1, start + spatial_dims):
        count = count * shape[axis]
    return count


def _planar(t: tf.Tensor, spatial_dims: int) -> tf.Tensor:
    """`[B, *S, C, ...]` -> `[B, C, X, ...]`, X = prod(S)."""
    rank, s = t.shape.rank, spatial_dims
    moved = tf.transpose(t, [0, s + 1, *range(1, s + 1), *range(s + 2, rank)])
    shape = tf.shape(moved)
    return tf.reshape(moved, tf.concat([shape[:2], [pixel_count(shape, 2, s)], shape[2 + s :]], 0))


def _check_low_rank_args(loc, cov_factor, cov_diag, num_samples, antithetic: bool):
    """Validated `(num_samples, loc, cov_factor, cov_diag, spatial_dims)` of the planar
    low-rank samplers."""
    num_samples = _checks.check_num_samples(num_samples, antithetic)
    loc = tf.convert_to_tensor(loc)
    cov_diag = tf.convert_to_tensor(cov_diag, loc.dtype)
    if cov_factor is not None:
        cov_factor = tf.convert_to_tensor(cov_factor, loc.dtype)
    spatial_dims = check_low_rank_ranks(loc, cov_factor, cov_diag)
    if loc.shape[-1] is None:
        raise ValueError("`loc` must have a known number of classes (last axis).")
    return num_samples, loc, cov_factor, cov_diag, spatial_dims


def _planar_normals(noise_shape, planes: int, seed, dtype) -> list:
    """`planes` standard normal planes `[B, n, X]` from one draw of `noise_shape [B, n, P, X]`."""
    return tf.unstack(noise_lib.standard_normal(noise_shape, seed, dtype), planes, axis=2)


def _planar_low_rank(factor_p, noise_shape, planes: int, seed, dtype) -> list:
    """The planes `[B, n, X]` of `P z` for planar factors `factor_p [B, P, X, R]` and one
    `z ~ N(0, I_R)` per image and sample, as one batched matmul."""
    batch, rank = tf.shape(factor_p)[0], tf.shape(factor_p)[-1]
    flat = tf.reshape(factor_p, tf.stack([batch, -1, rank]))  # [B, P*X, R]
    z = noise_lib.standard_normal(tf.stack([batch, noise_shape[1], rank]), seed, dtype)
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
    """Label maps `[N, B, *S]` (int32) distributed as `argmax_c eta_c`, eta ~ low-rank logits.

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
      loc: `[B, *S, C]`, `S = (H, W)` or `(D, H, W)` (told by the rank); cov_factor:
        `[B, *S, C, R]` or None (independent logits); cov_diag: `[B, *S, C]` (variances,
        positive).
      num_samples: N, a Python int (even when `antithetic`).
      seed: None (stateful RNG) or an int / shape-[2] seed for stateless sampling.
      antithetic: draw N/2 maps and N/2 from the mirrored differences.
    """
    num_samples, loc, cov_factor, cov_diag, s = _check_low_rank_args(
        loc, cov_factor, cov_diag, num_samples, antithetic
    )
    n = num_samples // 2 if antithetic else num_samples
    num_classes = loc.shape[-1]
    shape = tf.shape(loc)
    maps_shape = tf.concat([[num_samples], shape[: 1 + s]], 0)
    if num_classes == 1:
        return tf.zeros(maps_shape, tf.int32)
    k = num_classes - 1
    loc_p, var_p = _planar(loc, s), _planar(cov_diag, s)  # [B, C, X]
    noise_shape = tf.stack([shape[0], n, k, pixel_count(shape, 1, s)])
    xi = _planar_normals(noise_shape, k, _seeds.split_seed(seed, 22), loc.dtype)
    if cov_factor is not None:
        factor_p = _planar(cov_factor, s)  # [B, C, X, R]
        low_rank = _planar_low_rank(
            factor_p[:, 1:] - factor_p[:, :1],
            noise_shape,
            k,
            _seeds.split_seed(seed, 21),
            loc.dtype,
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
    """Monte Carlo predictive probabilities `E[softmax(eta)]` `[B, *S, C]` of low-rank logits.

    The same estimator as the mean of `softmax(sample_low_rank(...))`, computed on class planes
    `[B, N, prod(S)]` (the samples are drawn class-first, so no transpose of the samples and no
    softmax over a short trailing axis); faster on CPU up to 8 classes (see
    `prefers_planar_sampling`). Not the same draws as `sample_low_rank` for the same seed.

    Args: as `sample_low_rank_labels` (`cov_factor` may be None for independent logits).
    """
    num_samples, loc, cov_factor, cov_diag, s = _check_low_rank_args(
        loc, cov_factor, cov_diag, num_samples, antithetic
    )
    n = num_samples // 2 if antithetic else num_samples
    num_classes = loc.shape[-1]
    shape = tf.shape(loc)
    if num_classes == 1:
        return tf.ones_like(loc)
    loc_p, scale_p = _planar(loc, s), tf.sqrt(_planar(cov_diag, s))  # [B, C, X]
    noise_shape = tf.stack([shape[0], n, num_classes, pixel_count(shape, 1, s)])
    eps = _planar_normals(noise_shape, num_classes, _seeds.split_seed(seed, 23), loc.dtype)
    if cov_factor is not None:
        low_rank = _planar_low_rank(
            _planar(cov_factor, s),
            noise_shape,
            num_classes,
            _seeds.split_seed(seed, 24),
            loc.dtype,
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
