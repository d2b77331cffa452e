"""Monte Carlo NLL terms computed from a head's parameters, optionally in sample chunks.

`StochasticSegmentationNLL` scores labels under `M` logit samples. Materialising all samples
costs memory proportional to `M * B * H * W * C` (several such tensors are kept for the
backward pass). With `chunk_size=K` the samples are drawn, scored and discarded `K` at a time
inside a `tf.while_loop`, and the two reductions over samples are carried online:

```none
joint:     loglik[b, m] = sum_i w_i log p(y_i | eta_i^m)             ([B, M]: kept, tiny)
marginal:  lse[b, i]    = logsumexp_m log p(y_i | eta_i^m)            (running max + sum)
           chunk k:  hi = max(hi, max_k lp);  s = s * exp(hi_old - hi) + sum_k exp(lp - hi)
```

The backward pass redraws each chunk from the same stateless seed (or slices the same fixed
noise), recomputes its log-probabilities and applies the exact vector-Jacobian product

```none
dL/dlp[b, m, i] = dL/dloglik[b, m] * w_i + dL/dlse[b, i] * exp(lp[b, m, i] - lse[b, i])
```

so value and gradient equal the direct form's on the same samples, and peak memory no longer
grows with `M` (only the `[B, M]` log-likelihoods do). The price is a second forward pass over
the samples (sampling noise included) in the backward pass.

For heads with the SSN covariance that offer their parameters class-planar
(`tfp_seg.protocols.PlanarLowRankLogits`: `LowRankLogits`) the samples are drawn and scored in
a class-planar layout (`[B, C, K, H*W]`) straight from the parameters (noise by Box-Muller
from stateless uniforms), with a hand-written gradient through the softmax, the sampling and,
without chunks, the two reductions: on CPU this is several times faster than sampling
`[M, B, H, W, C]` and scoring with a softmax over the trailing class axis (measurements in
`benchmarks/README.md`). Other heads (any `tfp_seg.protocols.Head`) are sampled through
their own `sample_logits`.
"""

from __future__ import annotations

import math
import typing
from typing import Callable, List, Optional, Sequence

import tensorflow as tf

from tfp_seg import _checks, _seeds, protocols
from tfp_seg import distributions as dists
from tfp_seg.losses import pixelwise

__all__ = ["sampled_nll_terms", "check_chunk_size"]


def check_chunk_size(chunk_size, num_samples: int, antithetic: bool) -> Optional[int]:
    """Validate `chunk_size` (None, or a divisor of `num_samples`, even with antithetic)."""
    chunk_size = _checks.positive_int(chunk_size, "chunk_size", optional=True)
    if chunk_size is None:
        return None
    if num_samples % chunk_size:
        raise ValueError(f"`chunk_size` ({chunk_size}) must divide `num_samples` ({num_samples}).")
    if antithetic and chunk_size % 2:
        raise ValueError(
            f"`chunk_size` must be even with antithetic sampling (mirrored pairs stay in one "
            f"chunk); got {chunk_size}."
        )
    return chunk_size


# --- noise ---------------------------------------------------------------------------------------
def _normal(shape, seed) -> tf.Tensor:
    """Standard normal noise from a stateless seed (Box-Muller, `dists.standard_normal`);
    distinct per replica under `tf.distribute`."""
    return dists.standard_normal(shape, seed)


# --- chunk scorers -------------------------------------------------------------------------------
# A scorer maps (differentiable tensors `theta`, chunk index k) to the log-probabilities
# `lp [B, K, H*W]` of the labels under the chunk's K samples; it is a pure function of k
# (stateless noise or sliced fixed noise), so the backward pass can recompute it.


def _low_rank_forward(loc, factor, scale, z, eps, mask_f, antithetic: bool):
    """Label log-probabilities `lp [B, K, X]` of low-rank samples and their softmaxes.

    ```none
    eta^(+/-) = mu +/- (P z + sqrt(D) eps)      z [B,1,K',R], eps [B,C,K',X], K = 2K' or K'
    lp = (eta - max_c eta)[y] - log sum_c exp(eta - max_c eta)
    ```

    The logits are finite (finite parameters), so the label is picked by a one-hot product.
    """
    deviation = tf.matmul(z, factor) + scale * eps  # [B, C, K', X]
    etas = [loc + deviation, loc - deviation] if antithetic else [loc + deviation]
    outs, probs = [], []
    for eta in etas:
        shifted = eta - tf.reduce_max(eta, axis=1, keepdims=True)
        exps = tf.exp(shifted)
        total = tf.reduce_sum(exps, axis=1, keepdims=True)
        probs.append(exps / total)
        outs.append(tf.reduce_sum(shifted * mask_f, axis=1) - tf.math.log(total[:, 0]))
    return tf.concat(outs, axis=1), probs


def _low_rank_vjp(g_lp, probs, z, eps, mask_f):
    """Gradient of `sum(g_lp * lp)` w.r.t. `(loc, factor, scale)`:
    `d lp / d eta_c = [c == y] - softmax(eta)_c`, then back through `eta = mu +/- dev`."""
    parts = tf.split(g_lp, len(probs), axis=1) if len(probs) == 2 else [g_lp]
    g_eta = [g[:, tf.newaxis] * (mask_f - p) for g, p in zip(parts, probs, strict=True)]
    g_loc = tf.reduce_sum(tf.add_n(g_eta), axis=2, keepdims=True)
    g_dev = g_eta[0] - g_eta[1] if len(probs) == 2 else g_eta[0]
    g_factor = tf.matmul(z, g_dev, transpose_a=True)  # [B, C, R, X]
    g_scale = tf.reduce_sum(g_dev * eps, axis=2, keepdims=True)
    return [g_loc, g_factor, g_scale]


def _low_rank_log_probs(loc, factor, scale, z, eps, mask, antithetic: bool):
    """`lp [B, K, X]` with the fused gradient (a chunk scorer: recomputed per chunk)."""
    mask_f = tf.cast(mask, loc.dtype)

    @tf.custom_gradient
    def score(*theta):
        # Unwatched inputs: in eager mode outer tapes would otherwise also record (and keep)
        # the forward ops, whose gradient is given by `grad` anyway.
        loc_, factor_, scale_ = (tf.stop_gradient(t) for t in theta)
        lp, probs = _low_rank_forward(loc_, factor_, scale_, z, eps, mask_f, antithetic)

        def grad(upstream):
            return _low_rank_vjp(upstream, probs, z, eps, mask_f)

        return lp, grad

    return score(loc, factor, scale)


def _low_rank_reductions(theta, z, eps, mask, weights, antithetic: bool):
    """All samples at once: `loglik [B, M]`, `logsumexp_m lp [B, X]`, one fused gradient."""
    mask_f = tf.cast(mask, theta[0].dtype)

    @tf.custom_gradient
    def run(*theta):
        loc, factor, scale = (tf.stop_gradient(t) for t in theta)  # see `_low_rank_log_probs`
        lp, probs = _low_rank_forward(loc, factor, scale, z, eps, mask_f, antithetic)
        loglik = tf.reduce_sum(lp * weights[:, tf.newaxis], axis=2)
        high = tf.reduce_max(lp, axis=1)
        pixel_lse = high + tf.math.log(tf.reduce_sum(tf.exp(lp - high[:, tf.newaxis]), axis=1))

        def grad(g_loglik, g_lse):
            g_lp = _reductions_vjp(g_loglik, g_lse, lp, pixel_lse, weights)
            return _low_rank_vjp(g_lp, probs, z, eps, mask_f)

        return (loglik, pixel_lse), grad

    return run(*theta)


def _reductions_vjp(g_loglik, g_lse, lp, pixel_lse, weights):
    """`dL/dlp [B, K, X]` from the gradients of `loglik [B, K]` and `pixel_lse [B, X]`."""
    g_lp = 0.0
    if g_loglik is not None:
        g_lp = g_loglik[:, :, tf.newaxis] * weights[:, tf.newaxis]
    if g_lse is not None:
        g_lp = g_lp + g_lse[:, tf.newaxis] * tf.exp(lp - pixel_lse[:, tf.newaxis])
    if isinstance(g_lp, float):
        g_lp = tf.zeros_like(lp)
    return g_lp


def _slice_noise(noise, start, size: int):
    """Entries `[start, start + size)` of the leading axis (a static size, as XLA needs)."""

    def one(t):
        t = tf.convert_to_tensor(t)
        begin = tf.concat([[start], tf.zeros([tf.rank(t) - 1], tf.int32)], axis=0)
        return tf.slice(t, begin, tf.concat([[size], -tf.ones([tf.rank(t) - 1], tf.int32)], 0))

    if isinstance(noise, (tuple, list)):
        return type(noise)(one(t) for t in noise)
    return one(noise)


def _low_rank_scorer(head, labels, chunk, antithetic, seed, noise) -> Callable:
    c = head.num_classes
    batch = tf.shape(labels)[0]
    flat_labels = tf.reshape(labels, tf.stack([batch, -1]))
    mask = tf.one_hot(flat_labels, c, on_value=True, off_value=False, axis=1)[:, :, tf.newaxis]
    base = chunk // 2 if antithetic else chunk
    if noise is not None:
        z_all, eps_all = (tf.convert_to_tensor(t, tf.float32) for t in noise)

    def chunk_noise(theta, k):
        if noise is None:
            seed_k = _seeds.fold_seed(seed, k)
            z = _normal(tf.stack([batch, 1, base, head.rank]), _seeds.fold_seed(seed_k, 0))
            eps = _normal(
                tf.stack([batch, c, base, tf.shape(theta[0])[-1]]), _seeds.fold_seed(seed_k, 1)
            )
            return z, eps
        # Head layout (z [N', B, R], eps [N', B, H, W, C]) -> planar.
        z, eps = _slice_noise((z_all, eps_all), k * base, base)
        z = tf.transpose(z, [1, 0, 2])[:, tf.newaxis]
        eps = tf.reshape(eps, tf.stack([base, batch, -1, c]))
        return z, tf.transpose(eps, [1, 3, 0, 2])

    def scorer(theta, k):
        loc, factor, scale = theta
        z, eps = chunk_noise(theta, k)
        return _low_rank_log_probs(loc, factor, scale, z, eps, mask, antithetic)

    def reductions(theta, weights):
        z, eps = chunk_noise(theta, tf.constant(0))
        return _low_rank_reductions(theta, z, eps, mask, weights, antithetic)

    scorer.reductions = reductions  # type: ignore[attr-defined]
    return scorer


def _generic_scorer(head, labels, chunk, antithetic, seed, noise) -> Callable:
    base = chunk // 2 if antithetic else chunk

    def scorer(theta, k):
        (params,) = theta
        if noise is None:
            samples = head.sample_logits(
                params, chunk, seed=_seeds.fold_seed(seed, k), antithetic=antithetic
            )
        else:
            chunk_noise = _slice_noise(noise, k * base, base)
            samples = head.sample_logits(params, chunk, antithetic=antithetic, noise=chunk_noise)
        log_p, _ = pixelwise.pixel_log_probs(labels, samples)  # [K, B, H, W]
        shape = tf.shape(log_p)
        return tf.transpose(tf.reshape(log_p, tf.stack([shape[0], shape[1], -1])), [1, 0, 2])

    return scorer


# --- drivers -------------------------------------------------------------------------------------
def _terms(loglik, pixel_lse, weights, num_samples: int):
    log_m = math.log(num_samples)
    joint = -(tf.reduce_logsumexp(loglik, axis=1) - log_m)
    marginal = -tf.reduce_sum(weights * (pixel_lse - log_m), axis=1)
    return joint, marginal


def _chunked_reductions(theta: List[tf.Tensor], scorer, num_chunks: int, weights):
    """`loglik [B, M]` and per-pixel `logsumexp_m lp [B, X]`, with a recomputing gradient."""

    def forward_chunk(k, values):
        lp = scorer(values, k)
        return lp, tf.reduce_sum(lp * weights[:, tf.newaxis], axis=2)

    @tf.custom_gradient
    def reductions(*parts):
        theta = list(parts)
        # Unwatched copies for the forward loop: in eager mode a `custom_gradient`'s forward
        # ops would otherwise be recorded by outer tapes (keeping every chunk alive).
        frozen = [tf.stop_gradient(t) for t in theta]

        def body(k, logliks, high, total):
            lp, loglik = forward_chunk(k, frozen)
            new_high = tf.maximum(high, tf.reduce_max(lp, axis=1))
            total = total * tf.exp(high - new_high) + tf.reduce_sum(
                tf.exp(lp - new_high[:, tf.newaxis]), axis=1
            )
            # Shape inference can lose a static batch of 1 through the scorer's broadcasting
            # matmuls; the loop variables keep their entry shapes (they are the same).
            new_high.set_shape(high.shape)
            total.set_shape(high.shape)
            return k + 1, logliks.write(k, loglik), new_high, total

        lowest = tf.fill(tf.shape(weights), weights.dtype.min)
        _, logliks, high, total = tf.while_loop(
            lambda k, *_: k < num_chunks,
            body,
            (
                tf.constant(0),
                tf.TensorArray(weights.dtype, size=num_chunks, element_shape=None),
                lowest,
                tf.zeros_like(weights),
            ),
            parallel_iterations=1,
        )
        stacked = logliks.stack()  # [num_chunks, B, K]
        loglik = tf.reshape(tf.transpose(stacked, [1, 0, 2]), tf.stack([tf.shape(weights)[0], -1]))
        pixel_lse = high + tf.math.log(total)

        def grad(g_loglik, g_lse):
            if g_loglik is None:
                g_loglik = tf.zeros_like(loglik)
            if g_lse is None:
                g_lse = tf.zeros_like(pixel_lse)
            g_chunks = tf.reshape(g_loglik, tf.stack([tf.shape(loglik)[0], num_chunks, -1]))

            def gbody(k, *acc):
                with tf.GradientTape() as tape:
                    tape.watch(theta)
                    lp = scorer(theta, k)
                g_lp = _reductions_vjp(g_chunks[:, k], g_lse, lp, pixel_lse, weights)
                grads = tape.gradient(
                    lp,
                    theta,
                    output_gradients=g_lp,
                    unconnected_gradients=tf.UnconnectedGradients.ZERO,
                )
                sums = tuple(a + g for a, g in zip(acc, grads, strict=True))
                for a, total in zip(acc, sums, strict=True):
                    total.set_shape(a.shape)
                return (k + 1,) + sums

            out = tf.while_loop(
                lambda k, *_: k < num_chunks,
                gbody,
                (tf.constant(0),) + tuple(tf.zeros_like(t) for t in theta),
                parallel_iterations=1,
            )
            return list(out[1:])

        return (loglik, pixel_lse), grad

    return reductions(*theta)


def sampled_nll_terms(
    head,
    labels,
    params,
    num_samples: int,
    chunk_size: Optional[int] = None,
    antithetic: bool = False,
    ignore_label: Optional[int] = None,
    class_weights: Optional[Sequence[float]] = None,
    seed=None,
    noise=None,
    validate_args: bool = True,
):
    """Joint and marginal Monte Carlo NLL `([B], [B])` of `labels` under `head`'s samples.

    ```none
    joint_b    = -logsumexp_m( sum_i w_i lp[b, m, i] ) + log M
    marginal_b = -sum_i w_i [ logsumexp_m lp[b, m, i] - log M ]
    lp[b, m, i] = log softmax(eta_{b,i}^m)[y_{b,i}],   eta^m ~ head.distribution(params)
    ```

    Args:
      head: a distribution head (`tfp_seg.protocols.Head`); one that offers its parameters
        class-planar (`tfp_seg.protocols.PlanarLowRankLogits`: `LowRankLogits`) takes the
        fused planar path.
      labels: int `[B, H, W]` (or `[B, H, W, 1]`).
      params: the head's parameters `[B, H, W, params_size]`.
      num_samples: M (even with antithetic sampling).
      chunk_size: None (all M samples at once) or K dividing M: draw, score and discard K
        samples at a time and recompute them in the backward pass (memory flat in M).
      antithetic: mirrored pairs `mu +/- deviation` (kept within a chunk).
      ignore_label, class_weights: as in `mc_categorical_nll`.
      seed: None (a fresh seed from the stateful RNG at every call) or an int / shape-[2]
        seed. Chunk k draws from `fold_in(seed, k)`, so different chunk sizes draw different
        (equally distributed) samples from one seed.
      noise: fixed noise in the head's `sample_logits(noise=...)` format for all M samples
        (N' = M/2 leading entries with antithetic sampling); chunk k uses entries
        `[k K', (k+1) K')`. With fixed noise every chunk size sees the same samples.
      validate_args: run-time checks of labels (range) and parameters (NaN/Inf).
    """
    if not isinstance(head, protocols.Head):
        raise ValueError(
            "`head` must be a distribution head (tfp_seg.protocols.Head, e.g. a "
            f"tfp_seg.layers.DistributionHead); got {type(head).__name__}."
        )
    fused = isinstance(head, protocols.PlanarLowRankLogits)
    num_samples = _checks.check_num_samples(num_samples, antithetic)
    chunk = check_chunk_size(chunk_size, num_samples, antithetic) or num_samples
    num_chunks = num_samples // chunk
    params = tf.convert_to_tensor(params)
    _checks.check_rank(params, 4, "params", f"[B, H, W, {head.params_size}]")
    labels = _checks.prepare_labels(
        labels, head.num_classes, ignore_label, validate_args=validate_args
    )
    if labels.shape.is_fully_defined() and params.shape[:3].is_fully_defined():
        if labels.shape != params.shape[:3]:
            raise ValueError(
                f"`labels` shape {tuple(labels.shape)} must equal the [B, H, W] of `params` "
                f"{tuple(params.shape)}."
            )
    safe_labels, weights = pixelwise.pixel_weights(labels, ignore_label, class_weights)
    weights = tf.reshape(weights, tf.stack([tf.shape(weights)[0], -1]))  # [B, X]
    if noise is None:
        seed = _seeds.draw_seed() if seed is None else _seeds.stateless_seed(seed)

    if fused:
        theta = typing.cast(protocols.PlanarLowRankLogits, head).planar_low_rank_parts(params)
        scorer = _low_rank_scorer(head, safe_labels, chunk, antithetic, seed, noise)
    else:
        theta = [params]
        scorer = _generic_scorer(head, safe_labels, chunk, antithetic, seed, noise)

    if num_chunks == 1 and fused:
        loglik, pixel_lse = scorer.reductions(theta, weights)  # type: ignore[attr-defined]
    elif num_chunks == 1:
        lp = scorer(theta, tf.constant(0))  # [B, M, X], plain autodiff
        loglik = tf.reduce_sum(lp * weights[:, tf.newaxis], axis=2)
        pixel_lse = tf.reduce_logsumexp(lp, axis=1)
    else:
        loglik, pixel_lse = _chunked_reductions(theta, scorer, num_chunks, weights)
    return _terms(loglik, pixel_lse, weights, num_samples)
