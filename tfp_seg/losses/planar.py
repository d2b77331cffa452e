"""The fused class-planar kernels of the SSN loss: sample, score K label maps, hand-written VJP.

For heads that offer their parameters class-planar (`tfp_seg.protocols.PlanarLowRankLogits`)
`tfp_seg.losses.chunked` draws low-rank samples and scores labels in the layout
`[B, C, M, X]` (X = H * W) straight from the parameters, with a hand-written gradient
through the softmax and the sampling:

```none
eta^(+/-) = mu +/- (P z + sqrt(D) eps)      z [B, 1, M', R], eps [B, C, M', X]
lp[b, k, m, i] = (eta - max_c eta)[y_{b,k,i}] - log sum_c exp(eta - max_c eta)
d lp[b, k, m, i] / d eta_c = [c == y_{b,k,i}] - softmax(eta^m_{b,i})_c
```

A label set (K raters of each image, `mask [B, K, C, X]`) is scored under ONE set of samples
of each image: the softmax of every sample is computed once and the K label maps are picked
from it, and the gradient of a sample's logits accumulates over the raters,

```none
dL/d eta^m_{b,c,i} = sum_k g[b,k,m,i] [c == y_{b,k,i}] - softmax(eta^m_{b,i})_c sum_k g[b,k,m,i]
```

One label map (K = 1, static) takes the single-rater kernels unchanged. Memory of the pick:
K x `[B, M, X]` (the one-hot masks are `[B, K, C, X]`, no sample axis).

Two classes (`binary_*`): the label log-probabilities depend only on the logit difference
`d = eta_1 - eta_0`, which under the low-rank normal is itself low-rank normal with ONE noise
value per pixel (`binary_parts`), so drawn-noise losses of 2-class heads sample and score
`[B, 1, M, X]` instead of `[B, 2, M, X]` (`tfp_seg.losses.chunked.uses_logit_difference`):

```none
d = (mu_1 - mu_0) +/- ((P_1 - P_0) z + sqrt(D_0 + D_1) eps'),   eps' [B, 1, M', X]
lp = log sigmoid(s d),   s = +1 (label 1) / -1 (label 0),   d lp / d d = -s expm1(lp)
```
"""

from __future__ import annotations

import tensorflow as tf

__all__ = [
    "binary_log_probs",
    "binary_parts",
    "binary_reductions",
    "binary_signs",
    "log_probs",
    "reductions",
    "reductions_vjp",
]


def _one_rater(mask_f) -> bool:
    return mask_f.shape[1] == 1


def _pick(shifted, mask_f):
    """`shifted[y]` `[B, K, M', X]` of the K label maps (`mask_f [B, K, C, X]` one-hot)."""
    if _one_rater(mask_f):
        return tf.reduce_sum(shifted * mask_f[:, 0, :, tf.newaxis], axis=1)[:, tf.newaxis]
    picked = None
    for c in range(mask_f.shape[2]):  # C is static (the head's classes): K x [B, M', X] each
        term = shifted[:, c, tf.newaxis] * mask_f[:, :, c, tf.newaxis]
        picked = term if picked is None else picked + term
    return picked


def _forward(loc, factor, scale, z, eps, mask_f, antithetic: bool):
    """Label log-probabilities `lp [B, K, M, X]` of low-rank samples and their softmaxes.

    The logits are finite (finite parameters), so the label is picked by a one-hot product.
    """
    deviation = tf.matmul(z, factor) + scale * eps  # [B, C, M', X]
    etas = [loc + deviation, loc - deviation] if antithetic else [loc + deviation]
    outs, probs = [], []
    for eta in etas:
        shifted = eta - tf.reduce_max(eta, axis=1, keepdims=True)
        exps = tf.exp(shifted)
        total = tf.reduce_sum(exps, axis=1, keepdims=True)
        probs.append(exps / total)
        outs.append(_pick(shifted, mask_f) - tf.math.log(total[:, 0])[:, tf.newaxis])
    return tf.concat(outs, axis=2), probs


def _eta_grad(g, p, mask_f):
    """`dL/d eta [B, C, M', X]` from `g = dL/dlp [B, K, M', X]`, summed over the K raters."""
    if _one_rater(mask_f):
        return g[:, 0, tf.newaxis] * (mask_f[:, 0, :, tf.newaxis] - p)
    g_mask = tf.stack(
        [tf.reduce_sum(g * mask_f[:, :, c, tf.newaxis], axis=1) for c in range(mask_f.shape[2])],
        axis=1,
    )
    return g_mask - tf.reduce_sum(g, axis=1)[:, tf.newaxis] * p


def _vjp(g_lp, probs, z, eps, mask_f):
    """Gradient of `sum(g_lp * lp)` (`g_lp [B, K, M, X]`) w.r.t. `(loc, factor, scale)`:
    back through the softmax, then through `eta = mu +/- dev`."""
    parts = tf.split(g_lp, len(probs), axis=2) if len(probs) == 2 else [g_lp]
    g_eta = [_eta_grad(g, p, mask_f) for g, p in zip(parts, probs, strict=True)]
    return _param_grads(g_eta, z, eps)


def _param_grads(g_eta, z, eps):
    """`[g_loc, g_factor, g_scale]` from `dL/d eta` of the `+` (and `-`) samples."""
    g_loc = tf.reduce_sum(tf.add_n(g_eta), axis=2, keepdims=True)
    g_dev = g_eta[0] - g_eta[1] if len(g_eta) == 2 else g_eta[0]
    g_factor = tf.matmul(z, g_dev, transpose_a=True)  # [B, C, R, X]
    g_scale = tf.reduce_sum(g_dev * eps, axis=2, keepdims=True)
    return [g_loc, g_factor, g_scale]


# --- two classes: the logit difference ------------------------------------------------------
# With C = 2 a label's log-probability depends on the logits only through their difference
# d = eta_1 - eta_0:  lp = log sigmoid(s d),  s = +1 for label 1 and -1 for label 0. Under the
# low-rank normal, d = (mu_1 - mu_0) + (P_1 - P_0) z + sqrt(D_0 + D_1) eps' with ONE standard
# normal eps' per pixel (the difference of the two independent diagonal terms is normal with
# variance D_0 + D_1): the same joint distribution over all pixels with half the noise and half
# the per-sample work. The kernels below are the C-class ones on this one "class" plane, with
# the sign `s` in place of the one-hot mask:
#   d lp / d d = s sigmoid(-s d) = -s expm1(lp)        (no softmax to keep for the backward)


def binary_parts(theta):
    """The planar parts `[loc, factor, scale]` of a 2-class head (`[B, 2, 1, X]`,
    `[B, 2, R, X]`, `[B, 2, 1, X]`) -> those of its logit difference (class 1 minus class 0):
    `[B, 1, 1, X]`, `[B, 1, R, X]`, `[B, 1, 1, X]` with `scale = sqrt(D_0 + D_1)`
    (differentiable, plain TensorFlow ops)."""
    # splits, not slices: a split's gradient is one concat, a slice's a zero-padded copy
    (loc0, loc1), (f0, f1), (s0, s1) = (tf.split(t, 2, axis=1) for t in theta)
    return [loc1 - loc0, f1 - f0, tf.sqrt(tf.square(s0) + tf.square(s1))]


def binary_signs(mask):
    """`s [B, K, 1, X]`: +1 where the label is class 1, -1 where it is class 0 (`mask` bool
    `[B, K, 2, X]`, one-hot)."""
    return tf.where(mask[:, :, 1:2], 1.0, -1.0)


def _binary_forward(loc, factor, scale, z, eps, signs, antithetic: bool):
    """`lp [B, K, M, X]` of the labels (signs `[B, K, 1, X]`) under samples of the logit
    difference (`eps [B, 1, M', X]`)."""
    deviation = tf.matmul(z, factor) + scale * eps  # [B, 1, M', X]
    d = tf.concat([loc + deviation, loc - deviation], axis=2) if antithetic else loc + deviation
    return -tf.math.softplus(-signs * d)


def _binary_vjp(g_lp, lp, z, eps, signs, antithetic: bool):
    """Gradient of `sum(g_lp * lp)` w.r.t. the difference parts `(loc, factor, scale)`."""
    g_d = tf.reduce_sum(g_lp * signs * -tf.math.expm1(lp), axis=1, keepdims=True)  # [B,1,M,X]
    g_eta = tf.split(g_d, 2, axis=2) if antithetic else [g_d]
    return _param_grads(g_eta, z, eps)


def binary_log_probs(loc, factor, scale, z, eps, signs, antithetic: bool):
    """`lp [B*K, M, X]` of a 2-class head from its difference parts (`binary_parts`) and
    `binary_signs`, with the fused gradient: `log_probs` on the logit difference."""

    @tf.custom_gradient
    def score(*theta):
        loc_, factor_, scale_ = (tf.stop_gradient(t) for t in theta)  # see `log_probs`
        lp = _binary_forward(loc_, factor_, scale_, z, eps, signs, antithetic)

        def grad(upstream):
            return _binary_vjp(_unfold(upstream, signs), lp, z, eps, signs, antithetic)

        return _fold(lp), grad

    return score(loc, factor, scale)


def binary_reductions(theta, z, eps, signs, weights, antithetic: bool):
    """`reductions` of a 2-class head from its difference parts (`binary_parts`)."""

    @tf.custom_gradient
    def run(*theta):
        loc, factor, scale = (tf.stop_gradient(t) for t in theta)  # see `log_probs`
        lp4 = _binary_forward(loc, factor, scale, z, eps, signs, antithetic)
        lp = _fold(lp4)
        loglik, pixel_lse = _lse_reductions(lp, weights)

        def grad(g_loglik, g_lse):
            g_lp = reductions_vjp(g_loglik, g_lse, lp, pixel_lse, weights)
            return _binary_vjp(_unfold(g_lp, signs), lp4, z, eps, signs, antithetic)

        return (loglik, pixel_lse), grad

    return run(*theta)


def _lse_reductions(lp, weights):
    """`loglik [N, M]` (weighted sum over pixels) and `logsumexp_m lp [N, X]` of `lp [N, M, X]`."""
    loglik = tf.reduce_sum(lp * weights[:, tf.newaxis], axis=2)
    high = tf.reduce_max(lp, axis=1)
    pixel_lse = high + tf.math.log(tf.reduce_sum(tf.exp(lp - high[:, tf.newaxis]), axis=1))
    return loglik, pixel_lse


def _fold(lp):
    """`[B, K, M, X]` -> `[B*K, M, X]` (row b*K + k)."""
    shape = tf.shape(lp)
    return tf.reshape(lp, tf.stack([shape[0] * shape[1], shape[2], shape[3]]))


def _unfold(g, mask_f):
    """`[B*K, M, X]` -> `[B, K, M, X]`."""
    shape = tf.shape(mask_f)
    return tf.reshape(g, tf.stack([shape[0], shape[1], tf.shape(g)[1], shape[3]]))


def log_probs(loc, factor, scale, z, eps, mask, antithetic: bool):
    """`lp [B*K, M, X]` with the fused gradient (a chunk scorer: recomputed per chunk).

    Args:
      loc, factor, scale: the planar parameters `[B, C, 1, X]`, `[B, C, R, X]`, `[B, C, 1, X]`.
      z, eps: noise `[B, 1, M', R]`, `[B, C, M', X]` (M = 2 M' with antithetic pairs).
      mask: bool `[B, K, C, X]`, the one-hot label maps of the K raters (static C).
    """
    mask_f = tf.cast(mask, loc.dtype)

    @tf.custom_gradient
    def score(*theta):
        # Unwatched inputs: in eager mode outer tapes would otherwise also record (and keep)
        # the forward ops, whose gradient is given by `grad` anyway.
        loc_, factor_, scale_ = (tf.stop_gradient(t) for t in theta)
        lp, probs = _forward(loc_, factor_, scale_, z, eps, mask_f, antithetic)

        def grad(upstream):
            return _vjp(_unfold(upstream, mask_f), probs, z, eps, mask_f)

        return _fold(lp), grad

    return score(loc, factor, scale)


def reductions(theta, z, eps, mask, weights, antithetic: bool):
    """All samples at once: `loglik [B*K, M]`, `logsumexp_m lp [B*K, X]`, one fused gradient.

    `weights [B*K, X]` are the per-pixel weights of the K raters' maps (row b*K + k); other
    arguments as in `log_probs`.
    """
    mask_f = tf.cast(mask, theta[0].dtype)

    @tf.custom_gradient
    def run(*theta):
        loc, factor, scale = (tf.stop_gradient(t) for t in theta)  # see `log_probs`
        lp4, probs = _forward(loc, factor, scale, z, eps, mask_f, antithetic)
        lp = _fold(lp4)
        loglik, pixel_lse = _lse_reductions(lp, weights)

        def grad(g_loglik, g_lse):
            g_lp = reductions_vjp(g_loglik, g_lse, lp, pixel_lse, weights)
            return _vjp(_unfold(g_lp, mask_f), probs, z, eps, mask_f)

        return (loglik, pixel_lse), grad

    return run(*theta)


def reductions_vjp(g_loglik, g_lse, lp, pixel_lse, weights):
    """`dL/dlp [N, M, X]` from the gradients of `loglik [N, M]` and `pixel_lse [N, X]`."""
    g_lp = 0.0
    if g_loglik is not None:
        g_lp = g_loglik[:, :, tf.newaxis] * weights[:, tf.newaxis]
    if g_lse is not None:
        g_lp = g_lp + g_lse[:, tf.newaxis] * tf.exp(lp - pixel_lse[:, tf.newaxis])
    if isinstance(g_lp, float):
        g_lp = tf.zeros_like(lp)
    return g_lp
