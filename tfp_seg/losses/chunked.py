"""Monte Carlo NLL terms computed from a head's parameters, optionally in sample chunks.

`StochasticSegmentationNLL` scores labels under `M` logit samples. Materialising all samples
costs memory proportional to `M * B * X * C`, X the pixels of an image `[H, W]` or the voxels
of a volume `[D, H, W]` (several such tensors are kept for the backward pass). With
`chunk_size=S` the samples are drawn, scored and discarded `S` at a time inside a
`tf.while_loop`, and the two reductions over samples are carried online:

```none
joint:     loglik[b, m] = sum_i w_i log p(y_i | eta_i^m)             ([B, M]: kept, tiny)
marginal:  lse[b, i]    = logsumexp_m log p(y_i | eta_i^m)            (running max + sum)
           chunk s:  hi = max(hi, max_s lp);  t = t * exp(hi_old - hi) + sum_s exp(lp - hi)
```

Label sets `[B, K, *S]` (K raters of each image): the samples depend on the image only, so
each chunk's samples of image b are drawn once and scored against its K label maps (each
sample's log-softmax computed once, the K maps picked from it); the rows `b*K + k` then go
through the same reductions, and the drivers average the K raters' terms
(`sampled_nll_terms`). The label pick costs K x `[B, M, X]` without chunks and K x
`[B, S, X]` per chunk (memory still flat in M).

`chunk_size="auto"` (the losses' default) picks S from the problem size when the loss runs
(`auto_chunk_size`): all samples at once up to 20 samples or 2**20 sample values per image,
chunks of at most 2**16 values per image beyond.

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
a class-planar layout (`[B, C, S, X]`) straight from the parameters (noise by Box-Muller
from stateless uniforms), with a hand-written gradient through the softmax, the sampling and,
without chunks, the two reductions: on CPU this is several times faster than sampling
`[M, B, *S, C]` and scoring with a softmax over the trailing class axis (measurements in
`benchmarks/README.md`); with 2 classes and drawn noise, through their logit difference (one
normal per pixel, `planar.binary_parts`). Other heads (any `tfp_seg.protocols.Head`) are
sampled through their own `sample_logits`. The planar kernels are `tfp_seg.losses.planar`.
"""

from __future__ import annotations

import math
import typing
from typing import List, Optional, Sequence

import tensorflow as tf

from tfp_seg import _checks, _seeds, protocols
from tfp_seg.losses import pixelwise, planar, scorers, targets
from tfp_seg.losses.chunk_sizes import AUTO, auto_chunk_size, check_chunk_size

__all__ = [
    "sampled_nll_terms",
    "sampled_log_likelihoods",
    "sampled_marginal_nll",
    "check_chunk_size",
    "auto_chunk_size",
    "AUTO",
]


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
                g_lp = planar.reductions_vjp(g_chunks[:, k], g_lse, lp, pixel_lse, weights)
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
    chunk_size=AUTO,
    antithetic: bool = False,
    ignore_label: Optional[int] = None,
    class_weights: Optional[Sequence[float]] = None,
    seed=None,
    noise=None,
    validate_args: bool = True,
    name: str = "labels",
):
    """Joint and marginal Monte Carlo NLL `([B], [B])` of `labels` under `head`'s samples.

    ```none
    joint_b    = (1/K) sum_k [ -logsumexp_m( sum_i w_{b,k,i} lp[b, k, m, i] ) + log M ]
    marginal_b = (1/K) sum_k [ -sum_i w_{b,k,i} ( logsumexp_m lp[b, k, m, i] - log M ) ]
    lp[b, k, m, i] = log softmax(eta_{b,i}^m)[y_{b,k,i}],   eta^m ~ head.distribution(params)
    ```

    For one label map (K = 1) these are the single-rater estimators of Monteiro et al.
    For a label set (K raters of each image) the M samples `eta^1..eta^M` of an image are
    drawn ONCE and shared by its K raters: the raters are draws from the label distribution
    `p(y | x)`, so the expected NLL over raters, `E_y[-log p(y | x)]`, is estimated by the mean
    over k, and with shared samples each term is exactly the single-rater estimator (the same
    bias of the log of a Monte Carlo mean; the terms' errors are correlated across k). One
    sampling pass serves all K raters, and K = 1 is the single-rater loss exactly (the same
    samples and value for a label map `[B, *S]` and a label set `[B, 1, *S]`).

    The two reductions it combines are `sampled_log_likelihoods` (same arguments).

    Args:
      head: a distribution head (`tfp_seg.protocols.Head`); one that offers its parameters
        class-planar (`tfp_seg.protocols.PlanarLowRankLogits`: `LowRankLogits`) takes the
        fused planar path.
      labels: int `[B, *S]` (or `[B, *S, 1]`) label maps, or a label set `[B, K, *S]`
        (told apart by their shape against `params`: `tfp_seg.losses.targets`). Soft labels
        `[B, *S, C]` are a `ValueError`: the joint likelihood of a soft map is not defined.
      params: the head's parameters `[B, *S, params_size]`, `S = (H, W)` or `(D, H, W)` as
        the head's `spatial_dims` says (a head without the attribute is 2D).
      num_samples: M (even with antithetic sampling).
      chunk_size: None (all M samples at once), S dividing M: draw, score and discard S
        samples at a time and recompute them in the backward pass (memory flat in M), or
        `"auto"` (the default): S chosen from the problem size (`auto_chunk_size`).
      antithetic: mirrored pairs `mu +/- deviation` (kept within a chunk).
      ignore_label, class_weights: as in `mc_categorical_nll`, per rater map.
      seed: None (a fresh seed from the stateful RNG at every call) or an int / shape-[2]
        seed. Chunk k draws from `fold_in(seed, k)`, so different chunk sizes draw different
        (equally distributed) samples from one seed.
      noise: fixed noise in the head's `sample_logits(noise=...)` format for all M samples
        (N' = M/2 leading entries with antithetic sampling); chunk s uses entries
        `[s S', (s+1) S')`. With fixed noise every chunk size sees the same samples. The
        noise is per image (`B` rows), shared by the raters of a label set.
      validate_args: run-time checks of labels (range) and parameters (NaN/Inf).
      name: the name of `labels` in error messages (the losses pass "y_true").
    """
    loglik, pixel_lse, weights = sampled_log_likelihoods(
        head,
        labels,
        params,
        num_samples,
        chunk_size=chunk_size,
        antithetic=antithetic,
        ignore_label=ignore_label,
        class_weights=class_weights,
        seed=seed,
        noise=noise,
        validate_args=validate_args,
        name=name,
    )
    joint, marginal = _terms(loglik, pixel_lse, weights, num_samples)
    batch = tf.shape(params)[0]
    return targets.rater_mean(joint, batch), targets.rater_mean(marginal, batch)


def sampled_log_likelihoods(
    head,
    labels,
    params,
    num_samples: int,
    chunk_size=AUTO,
    antithetic: bool = False,
    ignore_label: Optional[int] = None,
    class_weights: Optional[Sequence[float]] = None,
    seed=None,
    noise=None,
    validate_args: bool = True,
    name: str = "labels",
):
    """The two Monte Carlo reductions of `sampled_nll_terms`, before they are combined:

    ```none
    loglik    [B*K, M]   sum_i w_{b,k,i} lp[b, k, m, i]     (joint log-likelihood of sample m)
    pixel_lse [B*K, X]   logsumexp_m lp[b, k, m, i]         (X = prod(S))
    weights   [B*K, X]   w_{b,k,i} (0 for ignored pixels)
    ```

    one row per rater map (row `b*K + k`; K = 1 for label maps `[B, *S]`: rows are the
    images), all K rows of an image scored under the same M samples. Differentiable in
    `params` (chunked: with the recomputing gradient). Arguments as in `sampled_nll_terms`.
    Losses that combine several heads' samples (the mixture NLL, `tfp_seg.losses.mixture`)
    reduce these further.
    """
    fused, num_samples, chunk, params = _check_sampling(
        head, params, num_samples, chunk_size, antithetic
    )
    prepared = targets.prepare_targets(
        labels,
        params,
        head.num_classes,
        ignore_label,
        validate_args=validate_args,
        name=name,
        soft=targets.soft_rejected(
            name, "the joint Monte Carlo NLL (sampled_nll_terms)", head_spatial_dims(head)
        ),
    )
    safe_labels, weights = pixelwise.pixel_weights(prepared.labels, ignore_label, class_weights)
    weights = _fold_rows(weights)  # [B*K, X]
    loglik, pixel_lse = _reductions(
        head, safe_labels, weights, params, num_samples, chunk, antithetic, seed, noise, fused
    )
    return loglik, pixel_lse, weights


def sampled_marginal_nll(
    head,
    labels,
    params,
    num_samples: int,
    chunk_size=AUTO,
    antithetic: bool = False,
    ignore_label: Optional[int] = None,
    class_weights: Optional[Sequence[float]] = None,
    seed=None,
    noise=None,
    validate_args: bool = True,
    name: str = "labels",
):
    """The per-pixel (marginal) Monte Carlo NLL `[B]` of label maps, label sets or soft labels.

    ```none
    hard:  the marginal term of `sampled_nll_terms` (the mean over a label set's K raters)
    soft:  -sum_i sum_c cw_c q_{b,i,c} [ logsumexp_m log softmax(eta^m_{b,i})_c - log M ]
    ```

    Soft labels `q [B, *S, C]` (float, per-pixel class fractions) are scored as C constant
    label maps (map c is class c everywhere) whose pixel weights are `cw_c q_{b,i,c}`, summed
    over c: every class's log-probability under the same samples, with the same chunked and
    fused paths (and memory) as a label set of C raters. Arguments as in `sampled_nll_terms`
    (`ignore_label` does not apply to soft labels: they have no ignored pixels).
    """
    fused, num_samples, chunk, params = _check_sampling(
        head, params, num_samples, chunk_size, antithetic
    )
    prepared = targets.prepare_targets(
        labels, params, head.num_classes, ignore_label, validate_args=validate_args, name=name
    )
    batch = tf.shape(params)[0]
    if prepared.kind != targets.SOFT:
        safe_labels, weights = pixelwise.pixel_weights(prepared.labels, ignore_label, class_weights)
        weights = _fold_rows(weights)
    else:
        c, rank = head.num_classes, prepared.labels.shape.rank
        q = tf.transpose(prepared.labels, [0, rank - 1, *range(1, rank - 1)])  # [B, C, *S]
        ones = [1] * (rank - 2)
        if class_weights is not None:
            q = q * tf.reshape(tf.constant(class_weights, q.dtype), [1, c, *ones])
        weights = _fold_rows(q)
        classes = tf.reshape(tf.range(c, dtype=tf.int32), [1, c, *ones])
        safe_labels = tf.broadcast_to(classes, tf.shape(q))
        safe_labels.set_shape(q.shape)
    loglik, pixel_lse = _reductions(
        head, safe_labels, weights, params, num_samples, chunk, antithetic, seed, noise, fused
    )
    marginal = _terms(loglik, pixel_lse, weights, num_samples)[1]  # [B*K]
    if prepared.kind == targets.SOFT:
        return tf.reduce_sum(tf.reshape(marginal, tf.stack([batch, -1])), axis=1)
    return targets.rater_mean(marginal, batch)


def _check_sampling(head, params, num_samples, chunk_size, antithetic):
    """`(fused, num_samples, chunk, params)`: the checks shared by the drivers."""
    if not isinstance(head, protocols.Head):
        raise ValueError(
            "`head` must be a distribution head (tfp_seg.protocols.Head, e.g. a "
            f"tfp_seg.layers.DistributionHead); got {type(head).__name__}."
        )
    fused = isinstance(head, protocols.PlanarLowRankLogits)
    num_samples = _checks.check_num_samples(num_samples, antithetic)
    chunk = check_chunk_size(chunk_size, num_samples, antithetic) or num_samples  # or AUTO
    params = tf.convert_to_tensor(params)
    check_head_params(head, params)
    return fused, num_samples, chunk, params


def head_spatial_dims(head) -> int:
    """The head's `spatial_dims` (2 for a head that does not declare one: images)."""
    return getattr(head, "spatial_dims", 2)


def check_head_params(head, params, name: str = "params") -> None:
    """Raise if `params` has a known rank other than `[B, *S, params_size]` of the head's
    spatial rank (`head_spatial_dims`), naming `name`."""
    s = head_spatial_dims(head)
    form = _checks.spatial_form(s, "B", str(head.params_size))
    _checks.check_rank(params, 2 + s, name, f"{form}, spatial_dims={s}")


def _fold_rows(t):
    """`[B, K, *S]` -> `[B*K, prod(S)]` (row b*K + k), static sizes kept where known."""
    dims = [d if d is not None else tf.shape(t)[i] for i, d in enumerate(t.shape.as_list())]
    pixels = dims[2]
    for d in dims[3:]:
        pixels = pixels * d
    return tf.reshape(t, tf.stack([dims[0] * dims[1], pixels]))


def _reductions(head, labels, weights, params, num_samples, chunk, antithetic, seed, noise, fused):
    """`loglik [B*K, M]`, `pixel_lse [B*K, X]` of safe label maps `labels [B, K, *S]`."""
    binary = fused and scorers.uses_logit_difference(head, noise)
    if chunk == AUTO:
        planes = 1 if binary else head.num_classes
        chunk = auto_chunk_size(num_samples, antithetic, _sample_elements(labels, weights, planes))
    num_chunks = num_samples // chunk
    if noise is None:
        seed = _seeds.draw_seed() if seed is None else _seeds.stateless_seed(seed)
    if fused:
        theta = typing.cast(protocols.PlanarLowRankLogits, head).planar_low_rank_parts(params)
        if binary:
            theta = planar.binary_parts(theta)
        scorer = scorers.low_rank_scorer(head, labels, chunk, antithetic, seed, noise)
    else:
        theta = [params]
        scorer = scorers.generic_scorer(head, labels, chunk, antithetic, seed, noise)

    if num_chunks == 1 and fused:
        return scorer.reductions(theta, weights)  # type: ignore[attr-defined]
    if num_chunks == 1:
        lp = scorer(theta, tf.constant(0))  # [B*K, M, X], plain autodiff
        loglik = tf.reduce_sum(lp * weights[:, tf.newaxis], axis=2)
        return loglik, tf.reduce_logsumexp(lp, axis=1)
    return _chunked_reductions(theta, scorer, num_chunks, weights)


def _sample_elements(labels, weights, planes: int) -> Optional[int]:
    """Values per image of one sample in the kernel that scores it (`auto_chunk_size`):
    X times the larger of the class planes (1 for a 2-class head's logit difference) and the
    K raters; None if X or K is known only at run time."""
    pixels, raters = weights.shape[1], labels.shape[1]
    if pixels is None or raters is None:
        return None
    return int(pixels) * max(planes, int(raters))
