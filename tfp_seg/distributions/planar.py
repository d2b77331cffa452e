"""Class-planar samplers of low-rank logits: label maps and mean probabilities.

Both draw on the K = C - 1 logit differences `delta_j = eta_j - eta_0`, which decide the arg
max and the softmax (`softmax(eta) = softmax(0, delta_1, ..., delta_K)`), on planes
`[B, n, X]` (`X = prod(S)` pixels or voxels of `S = (H, W)` or `(D, H, W)`, n samples): no
sample tensor `[N, B, *S, C]` is materialised, no softmax or arg max runs over a short
trailing axis, and each sample needs K per-pixel noise values instead of C. Faster on CPU up
to 8 classes (`tfp_seg.distributions.prefers_planar_sampling`).

#### Mathematical Details

Within a pixel, given `z ~ N(0, I_R)` (one per image and sample), the differences are normal
with mean `a_j = (mu_j - mu_0) + (P_j - P_0) z` and covariance `diag(D_1..D_K) + D_0 1 1^T`,
whose Cholesky factor `L` is applied in O(K) by a running sum (plane by plane):

```none
delta = a + L xi,   xi ~ N(0, I_K) per pixel
t_0 = 1;  L_jj = sqrt(D_j + t_(j-1) D_0);  L_ij = D_0 t_(j-1) / L_jj (i > j);
t_j = t_(j-1) D_j / L_jj^2
```
"""

from __future__ import annotations

import math
from typing import List, NamedTuple, Optional

import tensorflow as tf

from tfp_seg import _checks, _seeds
from tfp_seg._seeds import SeedLike
from tfp_seg.distributions import noise as noise_lib
from tfp_seg.distributions.low_rank import check_low_rank_ranks
from tfp_seg.distributions.readouts import raise_index

__all__ = ["sample_low_rank_labels", "low_rank_mean_probabilities"]

# Salts of the stateless seeds: z, the normal difference planes, the uniform plane of the last
# difference (label maps), the normal difference planes of the mean probabilities.
_Z_SALT, _XI_SALT, _UNIFORM_SALT, _MEAN_XI_SALT = 21, 22, 25, 26


def pixel_count(shape: tf.Tensor, start: int, spatial_dims: int) -> tf.Tensor:
    """`prod(shape[start : start + spatial_dims])`, the pixels (voxels) X of a dynamic shape,
    as a product of scalars (for images the `H * W` of one multiplication)."""
    count = shape[start]
    for axis in range(start + 1, start + spatial_dims):
        count = count * shape[axis]
    return count


def _planar(t: tf.Tensor, spatial_dims: int, trailing: int = 0) -> tf.Tensor:
    """`[B, *S, C, T...]` -> `[B, C, X, T...]` (`trailing=0`), or the `trailing` last axes
    moved before the pixels: `[B, *S, C, R]` -> `[B, C, R, X]` (`trailing=1`); X = prod(S)."""
    rank, s = t.shape.rank, spatial_dims
    after = list(range(s + 2, rank))
    moved = tf.transpose(t, [0, s + 1, *after[:trailing], *range(1, s + 1), *after[trailing:]])
    shape = tf.shape(moved)
    head = 2 + trailing
    pixels = [pixel_count(shape, head, s)]
    return tf.reshape(moved, tf.concat([shape[:head], pixels, shape[head + s :]], 0))


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


class _Differences(NamedTuple):
    """The K = C - 1 logit differences of one batch, as planes over the X pixels."""

    means: List[tf.Tensor]  # mu_j - mu_0, [B, 1, X]
    factors: Optional[List[tf.Tensor]]  # P_j - P_0, [B, R, X] (None: independent logits)
    diag: List[tf.Tensor]  # L_jj, [B, 1, X]
    below: List[tf.Tensor]  # L_ij (i > j), the same for every row below j; K - 1 planes


def _differences(loc, cov_factor, cov_diag, spatial_dims: int) -> _Differences:
    """The difference planes and the Cholesky factor of their per-pixel noise (module
    docstring), from `loc, cov_diag [B, *S, C]` and `cov_factor [B, *S, C, R]` or None."""
    k = loc.shape[-1] - 1
    loc_p, var_p = _planar(loc, spatial_dims), _planar(cov_diag, spatial_dims)  # [B, C, X]
    means = [loc_p[:, j : j + 1] - loc_p[:, :1] for j in range(1, k + 1)]
    factors = None
    if cov_factor is not None:
        factor_p = _planar(cov_factor, spatial_dims, trailing=1)  # [B, C, R, X]
        factors = [factor_p[:, j] - factor_p[:, 0] for j in range(1, k + 1)]
    var0 = var_p[:, :1]
    t = tf.ones_like(var0)
    diag, below = [], []
    for j in range(k):
        var_j = var_p[:, j + 1 : j + 2]
        l_jj = tf.sqrt(var_j + t * var0)
        diag.append(l_jj)
        if j + 1 < k:
            below.append(var0 * t / l_jj)
        t = t * var_j / tf.square(l_jj)
    return _Differences(means, factors, diag, below)


def _with_ones(z: tf.Tensor) -> tf.Tensor:
    """`[z, 1]`: `z [B, n, R]` with a column of ones, `[B, n, R + 1]`."""
    return tf.concat([z, tf.ones_like(z[..., :1])], axis=-1)


def _shifted_low_rank(z_ones, factor, mean, scale=None) -> tf.Tensor:
    """`(mean + factor^T z) * scale` `[B, n, X]` in one matmul, `[z, 1] @ [factor; mean]`
    (`z_ones [B, n, R + 1]`, `factor [B, R, X]`, `mean, scale [B, 1, X]`); with `factor`
    None, `mean * scale` `[B, 1, X]` (it broadcasts over the samples)."""
    if scale is not None:
        mean = mean * scale
        factor = None if factor is None else factor * scale
    if factor is None:
        return mean
    return tf.matmul(z_ones, tf.concat([factor, mean], axis=1))


def _low_rank(z, factor) -> Optional[tf.Tensor]:
    """`factor^T z` `[B, n, X]` (`z [B, n, R]`, `factor [B, R, X]`), or None without factor."""
    return None if factor is None else tf.matmul(z, factor)


def _add(*terms):
    """The sum of the terms that are not None (None when all are)."""
    total = None
    for term in terms:
        if term is not None:
            total = term if total is None else total + term
    return total


def _symmetric_uniform(shape, seed: SeedLike, dtype) -> tf.Tensor:
    """`w ~ U[-1, 1)` of `shape` (`P(w < e) = (1 + e) / 2` exactly for `e` in `[-1, 1]`):
    the stateful `tf.random.uniform` for `seed=None`, else stateless Philox; replica ids
    folded in as in `standard_normal`. 16-bit floats are drawn in float32 and cast."""
    seed = _seeds.replica_seed(seed)
    dtype = tf.as_dtype(dtype)
    draw = dtype if dtype in (tf.float32, tf.float64) else tf.float32
    if seed is None:
        w = tf.random.uniform(shape, -1.0, 1.0, dtype=draw)
    else:
        w = tf.random.stateless_uniform(
            shape, seed=_seeds.stateless_seed(seed), minval=-1.0, maxval=1.0, dtype=draw
        )
    return tf.cast(w, dtype)


class _Noise(NamedTuple):
    """One batch's noise: `z [B, n, R]` (None without factor), `z_ones` (`[z, 1]`, None when
    antithetic) and the normal difference planes `xi` (`[B, n, X]` each)."""

    z: Optional[tf.Tensor]
    z_ones: Optional[tf.Tensor]
    xi: List[tf.Tensor]


def _draw_noise(diffs: _Differences, shape, s: int, n: int, planes: int, seed, salt: int, dtype):
    """`_Noise` for n samples of the batch with dynamic `shape` `[B, *S, C]` (`s` spatial
    axes): `planes` normal difference planes, drawn as one `[planes, B, n, X]` tensor
    (unstacked along its first axis, which needs no copy)."""
    batch, pixels = shape[0], pixel_count(shape, 1, s)
    z = z_ones = None
    if diffs.factors is not None:
        rank = tf.shape(diffs.factors[0])[1]
        z = noise_lib.standard_normal(
            tf.stack([batch, n, rank]), _seeds.split_seed(seed, _Z_SALT), dtype
        )
        z_ones = _with_ones(z)
    xi = []
    if planes:
        drawn = noise_lib.standard_normal(
            tf.stack([planes, batch, n, pixels]), _seeds.split_seed(seed, salt), dtype
        )
        xi = tf.unstack(drawn, planes, axis=0)
    return _Noise(z, z_ones, xi)


def _normal_deltas(diffs: _Differences, noise: _Noise, planes: int, antithetic: bool):
    """The first `planes` differences drawn from normals: per plane a list of its sides,
    `[mu + dev]` or the mirrored `[mu + dev, mu - dev]` (`[B, n, X]` each), and the running
    sum `sum_(i < planes) L_(planes, i) xi_i` of the next row (None for `planes` = 0)."""
    running, out = None, []
    for j in range(planes):
        deviation = _add(diffs.diag[j] * noise.xi[j], running)
        if j < len(diffs.below):
            term = diffs.below[j] * noise.xi[j]
            running = term if running is None else running + term
        factor = None if diffs.factors is None else diffs.factors[j]
        if antithetic:
            deviation = _add(deviation, _low_rank(noise.z, factor))
            out.append([diffs.means[j] + deviation, diffs.means[j] - deviation])
        else:
            out.append([_shifted_low_rank(noise.z_ones, factor, diffs.means[j]) + deviation])
    return out, running


def _labels_from_deltas(deltas, sides: int, dtype):
    """Per side: `(best, index)` of `argmax(0, delta_1, ..., delta_J)` over the planes so far
    (`best = max(0, ...)`, index of `dtype`; first on ties)."""
    best, index = [None] * sides, [None] * sides
    for j, plane in enumerate(deltas):
        for side, delta in enumerate(plane):
            if j == 0:
                best[side] = tf.maximum(delta, 0.0)
                index[side] = tf.cast(delta > 0, dtype)
            else:
                index[side] = raise_index(index[side], delta > best[side], j + 1)
                best[side] = tf.maximum(best[side], delta)
    return best, index


def sample_low_rank_labels(
    loc: tf.Tensor,
    cov_factor: Optional[tf.Tensor],
    cov_diag: tf.Tensor,
    num_samples: int,
    seed: SeedLike = None,
    antithetic: bool = False,
) -> tf.Tensor:
    """Label maps `[N, B, *S]` (int32) distributed as `argmax_c eta_c`, eta ~ low-rank logits.

    The arg max of a pixel's C logits depends only on the K = C - 1 differences
    `delta_j = eta_j - eta_0` (module docstring). The first K - 1 are drawn with normals
    (`delta = a + L xi`, plane by plane); the last one is not drawn at all: given the others,
    `delta_K ~ N(a_K + r_K, L_KK^2)` (`r_K = sum_(i<K) L_Ki xi_i`), so the pixel takes class
    K with probability `Phi((a_K + r_K - m) / L_KK)`, `m = max(0, delta_1..delta_(K-1))`,
    which one uniform decides:

    ```none
    label = K                          if  w < erf((a_K + r_K - m) / (sqrt(2) L_KK)),
            argmax(0, delta_1..delta_(K-1))   otherwise;            w ~ U[-1, 1) per pixel
    two classes:  label = [w < erf(((mu_1 - mu_0) + (P_1 - P_0) z) / sqrt(2 (D_0 + D_1)))]
    ```

    (`P(w < e) = (1 + e) / 2 = Phi(.)`), so each sample costs C - 2 normals and one uniform
    per pixel. The maps have exactly the distribution of `argmax(sample_logits(...))`
    (within float32 resolution: `w` is a multiple of 2^-22); they are not the same draws for
    the same seed. `antithetic` mirrors `z` and `xi` and maps `w` to `-w` (the mirror of the
    last difference's normal), which mirrors the logits about their mean.

    Args:
      loc: `[B, *S, C]`, `S = (H, W)` or `(D, H, W)` (told by the rank); cov_factor:
        `[B, *S, C, R]` or None (independent logits); cov_diag: `[B, *S, C]` (variances,
        positive).
      num_samples: N, a Python int (even when `antithetic`).
      seed: None (stateful RNG) or an int / shape-[2] seed for stateless sampling.
      antithetic: draw N/2 maps and N/2 from the mirrored noise.
    """
    num_samples, loc, cov_factor, cov_diag, s = _check_low_rank_args(
        loc, cov_factor, cov_diag, num_samples, antithetic
    )
    n = num_samples // 2 if antithetic else num_samples
    k = loc.shape[-1] - 1
    shape = tf.shape(loc)
    maps_shape = tf.concat([[num_samples], shape[: 1 + s]], 0)
    if k == 0:
        return tf.zeros(maps_shape, tf.int32)
    diffs = _differences(loc, cov_factor, cov_diag, s)
    noise = _draw_noise(diffs, shape, s, n, k - 1, seed, _XI_SALT, loc.dtype)
    deltas, running = _normal_deltas(diffs, noise, k - 1, antithetic)
    # Indices as bytes (a quarter of the memory traffic of int32) while they fit.
    index_dtype = tf.int8 if k < 127 else tf.int32
    best, index = _labels_from_deltas(deltas, 2 if antithetic else 1, index_dtype)
    w = _symmetric_uniform(
        tf.stack([shape[0], n, pixel_count(shape, 1, s)]),
        _seeds.split_seed(seed, _UNIFORM_SALT),
        loc.dtype,
    )
    inv = 1.0 / (math.sqrt(2.0) * diffs.diag[-1])  # [B, 1, X]
    factor = None if diffs.factors is None else diffs.factors[-1]
    if antithetic:
        low_rank = _add(_low_rank(noise.z, factor), running)
        # Side +: w < erf(arg+); side -: -w < erf(arg-), i.e. w > erf(-arg-).
        arg_plus = _add(diffs.means[-1], low_rank, None if best[0] is None else -best[0])
        neg_minus = _add(-diffs.means[-1], low_rank, best[1])
        hits = [w < tf.math.erf(arg_plus * inv), w > tf.math.erf(neg_minus * inv)]
    else:
        arg = _shifted_low_rank(noise.z_ones, factor, diffs.means[-1], inv)
        if running is not None:
            arg = arg + (running - best[0]) * inv
        hits = [w < tf.math.erf(arg)]
    if k == 1:
        labels = hits  # bool planes: transposed as bytes, cast once below
    else:
        labels = [raise_index(idx, hit, k) for hit, idx in zip(hits, index, strict=True)]
    labels = tf.concat(labels, axis=1) if antithetic else labels[0]  # [B, N, X]
    return tf.reshape(tf.cast(tf.transpose(labels, [1, 0, 2]), tf.int32), maps_shape)


def _sum_sigmoids(planes) -> List[tf.Tensor]:
    """`[sum_n sigmoid(-delta), sum_n sigmoid(delta)]` `[B, X]` over the samples of all the
    sides of one difference plane: the two-class probabilities, each from its own sigmoid
    (no `1 - p`, which would lose a small probability's relative precision)."""
    pos = tf.add_n([tf.reduce_sum(tf.sigmoid(d), axis=1) for d in planes])
    neg = tf.add_n([tf.reduce_sum(tf.sigmoid(-d), axis=1) for d in planes])
    return [neg, pos]


def _sum_softmax(deltas, sides: int) -> List[tf.Tensor]:
    """`sum_n softmax(0, delta_1, ..., delta_K)_c` `[B, X]` for every class c, plane-wise."""
    totals = None
    for side in range(sides):
        planes = [plane[side] for plane in deltas]
        top = planes[0]
        for delta in planes[1:]:
            top = tf.maximum(top, delta)
        top = tf.maximum(top, 0.0)
        exps = [tf.exp(-top)] + [tf.exp(delta - top) for delta in planes]
        inv_total = 1.0 / tf.add_n(exps)
        sums = [tf.reduce_sum(e * inv_total, axis=1) for e in exps]
        totals = sums if totals is None else [a + b for a, b in zip(totals, sums, strict=True)]
    assert totals is not None  # sides >= 1
    return totals


def low_rank_mean_probabilities(
    loc: tf.Tensor,
    cov_factor: Optional[tf.Tensor],
    cov_diag: tf.Tensor,
    num_samples: int,
    seed: SeedLike = None,
    antithetic: bool = False,
) -> tf.Tensor:
    """Monte Carlo predictive probabilities `E[softmax(eta)]` `[B, *S, C]` of low-rank logits.

    ```none
    probs = (1/N) sum_n softmax(0, delta_1^n, ..., delta_K^n)     delta^n = a^n + L xi^n
    two classes:  p_1 = (1/N) sum_n sigmoid(delta^n),  p_0 = (1/N) sum_n sigmoid(-delta^n)
    ```

    The same estimator as the mean of `softmax(sample_low_rank(...))` (the softmax is a
    function of the differences, which have exactly the distribution of the logits'
    differences), computed on planes `[B, n, prod(S)]` with C - 1 normals per pixel and sample
    (module docstring); `antithetic` pairs `delta` with its mirror `2 a_0 - delta` (`z`, `xi`
    negated). Not the same draws as `sample_low_rank` for the same seed.

    Args: as `sample_low_rank_labels` (`cov_factor` may be None for independent logits).
    """
    num_samples, loc, cov_factor, cov_diag, s = _check_low_rank_args(
        loc, cov_factor, cov_diag, num_samples, antithetic
    )
    n = num_samples // 2 if antithetic else num_samples
    k = loc.shape[-1] - 1
    shape = tf.shape(loc)
    if k == 0:
        return tf.ones_like(loc)
    diffs = _differences(loc, cov_factor, cov_diag, s)
    noise = _draw_noise(diffs, shape, s, n, k, seed, _MEAN_XI_SALT, loc.dtype)
    deltas, _ = _normal_deltas(diffs, noise, k, antithetic)
    if k == 1:
        totals = _sum_sigmoids(deltas[0])
    else:
        totals = _sum_softmax(deltas, 2 if antithetic else 1)
    probs = tf.stack(totals, axis=-1) / tf.cast(num_samples, loc.dtype)  # [B, X, C]
    return tf.reshape(probs, shape)
