"""Pixel-wise kernels of the Monte Carlo losses: label log-probabilities and their reductions.

#### Mathematical Details

For logit samples `eta^m [M, B, *S, C]` and label maps `y [B, *S]` (`S = (H, W)` for images,
`(D, H, W)` for volumes, told by the rank of the samples: 5 or 6), with `i` running over the
pixels (voxels) of `S`:

```none
lp[m, b, i]  = log softmax(eta_{m,b,i})[y_{b,i}]                    (pixel_log_probs)
joint_b      = -logsumexp_m( sum_i w_i lp[m, b, i] ) + log M        (mc_categorical_nll)
marginal_b   = -sum_i w_i [ logsumexp_m lp[m, b, i] - log M ]       (mc_marginal_nll)
```

with `w_i = class_weight[y_i]` and `w_i = 0` for ignored pixels. All reductions are in log space
and in float32, also under a mixed-precision policy. These are the kernels shared by the
losses (`monte_carlo`, `heteroscedastic`, `elbo`) and the chunked driver (`chunked`).

#### References

[1] Monteiro et al. Stochastic Segmentation Networks. NeurIPS 2020.
[2] Kendall and Gal. What Uncertainties Do We Need in Bayesian Deep Learning for Computer
    Vision? NeurIPS 2017.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import tensorflow as tf

from tfp_seg import _checks

__all__ = [
    "mc_categorical_nll",
    "mc_marginal_nll",
    "pixel_log_likelihood",
    "pixel_log_probs",
    "pixel_weights",
    "label_log_softmax",
    "check_class_weights",
    "valid_pixel_count",
    "label_set_log_probs",
    "label_set_nll",
    "soft_marginal_nll",
]


def pixel_weights(labels, ignore_label, class_weights, dtype=tf.float32):
    """Per-pixel weights `[B, ...]` of the shape of `labels` (0 for ignored pixels) and
    labels safe to gather."""
    valid = tf.ones_like(labels, dtype=tf.bool)
    if ignore_label is not None:
        valid = tf.not_equal(labels, ignore_label)
    safe_labels = tf.where(valid, labels, tf.zeros_like(labels))
    weights = tf.cast(valid, dtype)
    if class_weights is not None:
        cw = tf.convert_to_tensor(class_weights, dtype=dtype)
        weights = weights * tf.gather(cw, safe_labels)
    return safe_labels, weights


def check_class_weights(class_weights, num_classes: Optional[int]):
    if class_weights is None:
        return None
    cw = [float(w) for w in class_weights]
    if num_classes is not None and len(cw) != num_classes:
        raise ValueError(
            f"`class_weights` must have one entry per class ({num_classes}); got {len(cw)}."
        )
    if any((not math.isfinite(w)) or w < 0 for w in cw):
        raise ValueError(f"`class_weights` must be finite and >= 0; got {cw}.")
    return cw


def label_log_softmax(logits, label_mask, axis: int):
    """`log softmax(logits)[y]` reducing the class `axis`; `label_mask` is one-hot (bool).

    The classes are reduced with plain elementwise ops and a stop-gradient max: with few
    classes on a *leading* axis this is several times faster on CPU than
    `sparse_softmax_cross_entropy_with_logits` over a trailing axis of 2-3 classes (which also
    needs the labels broadcast over the sample axis), and XLA fuses it.
    """
    shift = tf.stop_gradient(tf.reduce_max(logits, axis=axis, keepdims=True))
    shifted = logits - shift
    picked = tf.reduce_sum(tf.where(label_mask, shifted, tf.zeros_like(shifted)), axis=axis)
    return picked - tf.math.log(tf.reduce_sum(tf.exp(shifted), axis=axis))


def _classes_first(logit_samples):
    """`[M, B, *S, C]` -> `[C, M, B, *S]`."""
    rank = logit_samples.shape.rank
    return tf.transpose(logit_samples, [rank - 1, *range(rank - 1)])


def _spatial_sum(x, first: int):
    """`x` summed over its axes `first..` (the spatial axes of `[..., *S]`)."""
    return tf.reduce_sum(x, axis=list(range(first, x.shape.rank)))


def pixel_log_probs(labels, logit_samples, ignore_label=None, class_weights=None):
    """`log softmax(eta_i^m)[y_i]` `[M, B, *S]` and pixel weights `[B, *S]`."""
    safe_labels, weights = pixel_weights(labels, ignore_label, class_weights)
    num_classes = logit_samples.shape[-1]
    if num_classes is None:
        num_classes = tf.shape(logit_samples)[-1]
    # Classes first ([C, M, B, *S]): the class reductions become elementwise ops on
    # contiguous planes. The one-hot labels broadcast over the sample axis.
    planar = _classes_first(logit_samples)
    label_mask = tf.one_hot(safe_labels, num_classes, on_value=True, off_value=False, axis=0)
    log_p = label_log_softmax(planar, label_mask[:, tf.newaxis], axis=0)
    return log_p, weights


def pixel_log_likelihood(labels, logit_samples, ignore_label=None, class_weights=None):
    """Weighted per-sample log-likelihood `sum_i w_i log softmax(eta_i^m)[y_i]`, `[M, B]`.

    `labels [B, *S]`, `logit_samples [M, B, *S, C]` (validated by the caller)."""
    log_p, weights = pixel_log_probs(labels, logit_samples, ignore_label, class_weights)
    return _spatial_sum(log_p * weights[tf.newaxis], 2)


def prepare_samples(labels, logit_samples, ignore_label, class_weights, validate_args):
    """Validate `(labels [B, *S], logit_samples [M, B, *S, C])` and return them as int32 /
    float32 tensors; `S` (2 or 3 axes) is told by the rank of `logit_samples`."""
    logit_samples = tf.convert_to_tensor(logit_samples)
    if not logit_samples.dtype.is_floating:
        raise ValueError(
            f"`logit_samples` must be a float tensor; got dtype {logit_samples.dtype.name}."
        )
    logit_samples = tf.cast(logit_samples, tf.float32)
    s = _checks.infer_spatial_dims(
        logit_samples, "logit_samples", 3, "[M, B, H, W, C], sample axis first"
    )
    num_classes = logit_samples.shape[-1]
    class_weights = check_class_weights(class_weights, num_classes)
    form = _checks.spatial_form(s)
    labels = _checks.prepare_labels(
        labels,
        num_classes,
        ignore_label,
        validate_args=validate_args,
        spatial_rank=1 + s,
        form=form,
    )
    want = logit_samples.shape[1:-1]
    if labels.shape.is_fully_defined() and want.is_fully_defined():
        if labels.shape != want:
            raise ValueError(
                f"`labels` shape {tuple(labels.shape)} must equal the {form} of "
                f"`logit_samples` {tuple(logit_samples.shape)}."
            )
    if validate_args:
        logit_samples = _checks.assert_finite(logit_samples, "logit_samples")
    return labels, logit_samples, class_weights


def joint_nll_from_log_probs(log_p, weights):
    """Joint NLL `[B]` from `log_p [M, B, *S]` and `weights [B, *S]`."""
    loglik = _spatial_sum(log_p * weights[tf.newaxis], 2)  # [M, B]
    m = tf.cast(tf.shape(log_p)[0], log_p.dtype)
    return -(tf.reduce_logsumexp(loglik, axis=0) - tf.math.log(m))


def marginal_nll_from_log_probs(log_p, weights):
    """Marginal NLL `[B]` from `log_p [M, B, *S]` and `weights [B, *S]`."""
    m = tf.cast(tf.shape(log_p)[0], log_p.dtype)
    per_pixel = tf.reduce_logsumexp(log_p, axis=0) - tf.math.log(m)
    return -_spatial_sum(per_pixel * weights, 1)


def mc_categorical_nll(
    labels,
    logit_samples,
    ignore_label: Optional[int] = None,
    class_weights: Optional[Sequence[float]] = None,
    validate_args: bool = True,
) -> tf.Tensor:
    """Monte Carlo negative log-likelihood of label maps under sampled logits, per example.

    ```none
    nll_b = -logsumexp_m( sum_i w_i log softmax(eta_{m,b,i})[y_{b,i}] ) + log M
    ```

    Args:
      labels: int `[B, *S]` (or `[B, *S, 1]`) class ids in `[0, C)` or `ignore_label`.
      logit_samples: float `[M, B, *S, C]`, sample axis first; `S = (H, W)` (rank 5) or
        `(D, H, W)` (rank 6), told by its rank.
      ignore_label: pixels with this label contribute nothing.
      class_weights: `[C]` non-negative per-class weights on each pixel's log-likelihood.
      validate_args: run-time checks for label range and NaN/Inf samples.

    Returns:
      float32 `[B]`: the NLL of each example summed over its pixels (nats). When the covariance
      is zero (all samples equal) this is the summed pixel-wise cross-entropy.
    """
    labels, logit_samples, class_weights = prepare_samples(
        labels, logit_samples, ignore_label, class_weights, validate_args
    )
    log_p, weights = pixel_log_probs(labels, logit_samples, ignore_label, class_weights)
    return joint_nll_from_log_probs(log_p, weights)


def mc_marginal_nll(
    labels,
    logit_samples,
    ignore_label: Optional[int] = None,
    class_weights: Optional[Sequence[float]] = None,
    validate_args: bool = True,
) -> tf.Tensor:
    """Per-pixel (marginal) Monte Carlo NLL, summed over pixels, `[B]`.

    ```none
    nll_b = -sum_i w_i [ logsumexp_m log softmax(eta_{m,b,i})[y_{b,i}] - log M ]
    ```

    Each pixel's label is scored under its own predictive marginal `E[softmax(eta_i)]`: the
    heteroscedastic classification likelihood of Kendall & Gal (2017). Arguments as in
    `mc_categorical_nll`.
    """
    labels, logit_samples, class_weights = prepare_samples(
        labels, logit_samples, ignore_label, class_weights, validate_args
    )
    log_p, weights = pixel_log_probs(labels, logit_samples, ignore_label, class_weights)
    return marginal_nll_from_log_probs(log_p, weights)


def label_set_log_probs(label_set, logit_samples):
    """`log softmax(eta^m_{b,i})[y_{b,k,i}]` `[M, B, K, *S]` of K label maps of each image.

    The log-softmax of every sample is computed once and the K maps are picked from it (the
    raters of an image share its samples). `label_set` int `[B, K, *S]` must be safe to
    gather (no ignore label: `pixel_weights`); `logit_samples` float `[M, B, *S, C]`. With
    one map (static K = 1) this is `pixel_log_probs` exactly.
    """
    if label_set.shape[1] == 1:
        return pixel_log_probs(label_set[:, 0], logit_samples)[0][:, :, tf.newaxis]
    planar = _classes_first(logit_samples)  # [C, M, B, *S]
    shifted = planar - tf.stop_gradient(tf.reduce_max(planar, axis=0, keepdims=True))
    log_total = tf.math.log(tf.reduce_sum(tf.exp(shifted), axis=0))[:, :, tf.newaxis]
    num_classes = logit_samples.shape[-1]
    if num_classes is None:  # a dynamic class axis: one broadcast pick (C x the memory)
        mask = tf.one_hot(label_set, tf.shape(planar)[0], on_value=True, off_value=False, axis=0)
        picked = tf.where(mask[:, tf.newaxis], shifted[:, :, :, tf.newaxis], 0.0)
        return tf.reduce_sum(picked, axis=0) - log_total
    picked = None
    for c in range(num_classes):  # K x [M, B, *S] per class
        term = tf.where(tf.equal(label_set, c)[tf.newaxis], shifted[c][:, :, tf.newaxis], 0.0)
        picked = term if picked is None else picked + term
    return picked - log_total


def label_set_nll(
    label_set,
    logit_samples,
    ignore_label: Optional[int] = None,
    class_weights: Optional[Sequence[float]] = None,
    joint: bool = True,
) -> tf.Tensor:
    """Monte Carlo NLL `[B, K]` of each of K label maps of an image under its shared samples.

    ```none
    joint:     nll[b, k] = -logsumexp_m( sum_i w_{b,k,i} lp[m, b, k, i] ) + log M
    marginal:  nll[b, k] = -sum_i w_{b,k,i} [ logsumexp_m lp[m, b, k, i] - log M ]
    lp[m, b, k, i] = log softmax(eta^m_{b,i})[y_{b,k,i}]          (label_set_log_probs)
    ```

    `label_set` int32 `[B, K, *S]` (validated: `tfp_seg.losses.targets`), `logit_samples`
    float32 `[M, B, *S, C]`; `w` as in `mc_categorical_nll`, per rater map. With one map
    (static K = 1) this is `mc_categorical_nll` / `mc_marginal_nll` of that map exactly.
    """
    if label_set.shape[1] == 1:
        log_p, weights = pixel_log_probs(
            label_set[:, 0], logit_samples, ignore_label, class_weights
        )
        if joint:
            return joint_nll_from_log_probs(log_p, weights)[:, tf.newaxis]
        return marginal_nll_from_log_probs(log_p, weights)[:, tf.newaxis]
    safe, weights = pixel_weights(label_set, ignore_label, class_weights)
    log_p = label_set_log_probs(safe, logit_samples)  # [M, B, K, *S]
    log_m = tf.math.log(tf.cast(tf.shape(log_p)[0], log_p.dtype))
    if joint:
        loglik = _spatial_sum(log_p * weights[tf.newaxis], 3)  # [M, B, K]
        return -(tf.reduce_logsumexp(loglik, axis=0) - log_m)
    per_pixel = tf.reduce_logsumexp(log_p, axis=0) - log_m
    return -_spatial_sum(per_pixel * weights, 2)


def soft_marginal_nll(soft_labels, logit_samples, class_weights=None) -> tf.Tensor:
    """Per-pixel Monte Carlo NLL of soft labels, summed over pixels, `[B]`.

    ```none
    nll_b = -sum_i sum_c w_c q_{b,i,c} [ logsumexp_m log softmax(eta_{m,b,i})_c - log M ]
          = -sum_i sum_c w_c q_{b,i,c} log( (1/M) sum_m softmax(eta_{m,b,i})_c )
    ```

    the cross-entropy of the soft labels `q` (float32 `[B, *S, C]`, validated:
    `tfp_seg.losses.targets`) against each pixel's Monte Carlo predictive marginal, with
    class weights `w_c` (1 without). One-hot `q` give `mc_marginal_nll` of the hard labels;
    with M = 1 it is the soft-target cross-entropy of the logits. Classes with `q = 0` add
    nothing (also where their log-probability underflows).
    """
    log_soft = tf.nn.log_softmax(logit_samples, axis=-1)  # [M, B, *S, C]
    log_m = tf.math.log(tf.cast(tf.shape(log_soft)[0], log_soft.dtype))
    log_mean = tf.reduce_logsumexp(log_soft, axis=0) - log_m  # [B, *S, C]
    q = soft_labels
    if class_weights is not None:
        q = q * tf.convert_to_tensor(class_weights, q.dtype)
    return -_spatial_sum(tf.math.multiply_no_nan(log_mean, q), 1)


def valid_pixel_count(labels, ignore_label, spatial_dims: int = 2):
    """Number of non-ignored pixels of each label map `[B, *S]` (`spatial_dims` axes S),
    float32 `[B]`."""
    spatial_dims = _checks.check_spatial_dims(spatial_dims)
    labels = _checks.prepare_labels(
        labels,
        None,
        None,
        validate_args=False,
        spatial_rank=1 + spatial_dims,
        form=_checks.spatial_form(spatial_dims),
    )
    if ignore_label is None:
        return tf.cast(tf.reduce_prod(tf.shape(labels)[1:]), tf.float32) * tf.ones(
            tf.shape(labels)[:1], tf.float32
        )
    valid = tf.cast(tf.not_equal(labels, ignore_label), tf.float32)
    return _spatial_sum(valid, 1)
