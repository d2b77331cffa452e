"""Chunk scorers of the Monte Carlo NLL (`tfp_seg.losses.chunked`).

A scorer maps (differentiable tensors `theta`, chunk index k) to the log-probabilities
`lp [B*K, M_k, X]` of the K label maps of each image (row b*K + k) under the chunk's M_k
samples of that image; it is a pure function of k (stateless noise or sliced fixed noise),
so the backward pass can recompute it. The samples depend on the image only: its K raters
share them.

```none
low_rank_scorer   LowRankLogits (tfp_seg.protocols.PlanarLowRankLogits): the fused planar
                  kernels (tfp_seg.losses.planar), for 2 classes on the logit difference
generic_scorer    any head, through its own sample_logits
```
"""

from __future__ import annotations

from typing import Callable

import tensorflow as tf

from tfp_seg import _seeds
from tfp_seg import distributions as dists
from tfp_seg.losses import pixelwise, planar

__all__ = ["normal", "uses_logit_difference", "low_rank_scorer", "generic_scorer"]


# --- noise ---------------------------------------------------------------------------------------
def normal(shape, seed) -> tf.Tensor:
    """Standard normal noise from a stateless seed (Box-Muller, `dists.standard_normal`);
    distinct per replica under `tf.distribute`."""
    return dists.standard_normal(shape, seed)


# --- chunk scorers -------------------------------------------------------------------------------


def _slice_noise(noise, start, size: int):
    """Entries `[start, start + size)` of the leading axis (a static size, as XLA needs)."""

    def one(t):
        t = tf.convert_to_tensor(t)
        begin = tf.concat([[start], tf.zeros([tf.rank(t) - 1], tf.int32)], axis=0)
        return tf.slice(t, begin, tf.concat([[size], -tf.ones([tf.rank(t) - 1], tf.int32)], 0))

    if isinstance(noise, (tuple, list)):
        return type(noise)(one(t) for t in noise)
    return one(noise)


def uses_logit_difference(head, noise) -> bool:
    """Whether the fused path samples a 2-class head's logit difference (`planar.binary_parts`:
    one normal per pixel instead of C): with drawn noise only, as fixed noise is given per
    class (`noise=`: the same samples as the head's `sample_logits`)."""
    return head.num_classes == 2 and noise is None


def low_rank_scorer(head, labels, chunk, antithetic, seed, noise) -> Callable:
    c = head.num_classes
    binary = uses_logit_difference(head, noise)
    batch = tf.shape(labels)[0]
    flat_labels = tf.reshape(labels, tf.stack([batch, tf.shape(labels)[1], -1]))  # [B, K, X]
    mask = tf.one_hot(flat_labels, c, on_value=True, off_value=False, axis=2)  # [B, K, C, X]
    signs = planar.binary_signs(mask) if binary else None
    base = chunk // 2 if antithetic else chunk
    if noise is not None:
        z_all, eps_all = (tf.convert_to_tensor(t, tf.float32) for t in noise)

    def chunk_noise(theta, k):
        if noise is None:
            seed_k = _seeds.fold_seed(seed, k)
            z = normal(tf.stack([batch, 1, base, head.rank]), _seeds.fold_seed(seed_k, 0))
            planes = 1 if binary else c
            eps = normal(
                tf.stack([batch, planes, base, tf.shape(theta[0])[-1]]),
                _seeds.fold_seed(seed_k, 1),
            )
            return z, eps
        # Head layout (z [N', B, R], eps [N', B, *S, C]) -> planar.
        z, eps = _slice_noise((z_all, eps_all), k * base, base)
        z = tf.transpose(z, [1, 0, 2])[:, tf.newaxis]
        eps = tf.reshape(eps, tf.stack([base, batch, -1, c]))
        return z, tf.transpose(eps, [1, 3, 0, 2])

    def scorer(theta, k):
        loc, factor, scale = theta
        z, eps = chunk_noise(theta, k)
        if binary:
            return planar.binary_log_probs(loc, factor, scale, z, eps, signs, antithetic)
        return planar.log_probs(loc, factor, scale, z, eps, mask, antithetic)

    def reductions(theta, weights):
        z, eps = chunk_noise(theta, tf.constant(0))
        if binary:
            return planar.binary_reductions(theta, z, eps, signs, weights, antithetic)
        return planar.reductions(theta, z, eps, mask, weights, antithetic)

    scorer.reductions = reductions  # type: ignore[attr-defined]
    return scorer


def generic_scorer(head, labels, chunk, antithetic, seed, noise) -> Callable:
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
        log_p = pixelwise.label_set_log_probs(labels, samples)  # [M_k, B, K, *S]
        shape = tf.shape(log_p)
        flat = tf.reshape(log_p, tf.stack([shape[0], shape[1] * shape[2], -1]))
        return tf.transpose(flat, [1, 0, 2])

    return scorer
