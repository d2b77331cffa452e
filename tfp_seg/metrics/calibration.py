"""Calibration and proper scoring rules of predicted class probabilities: expected calibration
error (hard and soft targets), reliability-diagram data, negative log-likelihood, Brier score.

Probabilities are channels-last `[..., C]`; labels are integer maps `probs.shape[:-1]`, or where
stated exact per-pixel label distributions (float soft targets `[..., C]`).
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from tfp_seg import _checks
from tfp_seg.metrics import _common
from tfp_seg.metrics._common import ArrayLike

__all__ = [
    "brier_score",
    "expected_calibration_error",
    "expected_calibration_error_soft",
    "negative_log_likelihood",
    "reliability_diagram_data",
]

_STRATEGIES = ("uniform", "quantile")


def _uniform_bin_index(conf: np.ndarray, num_bins: int) -> np.ndarray:
    # Right-closed bins ((b)/M, (b+1)/M]; confidence 0 falls in bin 0. Same float64 arithmetic as
    # the streaming metric so both assign identical bins.
    return np.clip(np.ceil(conf * num_bins).astype(np.int64) - 1, 0, num_bins - 1)


def _calibration_stats(
    conf: np.ndarray, acc: np.ndarray, num_bins: int, strategy: str
) -> dict[str, Any]:
    if strategy == "uniform":
        edges = np.linspace(0.0, 1.0, num_bins + 1)
        idx = _uniform_bin_index(conf, num_bins)
    else:
        edges = np.quantile(conf, np.linspace(0.0, 1.0, num_bins + 1))
        edges[0], edges[-1] = 0.0, 1.0
        idx = np.searchsorted(edges[1:-1], conf, side="left")
    counts = np.bincount(idx, minlength=num_bins)
    conf_sums = np.bincount(idx, weights=conf, minlength=num_bins)
    acc_sums = np.bincount(idx, weights=acc, minlength=num_bins)
    n = conf.size
    nonempty = counts > 0
    safe = np.maximum(counts, 1)
    return {
        "confidence": np.where(nonempty, conf_sums / safe, np.nan),
        "accuracy": np.where(nonempty, acc_sums / safe, np.nan),
        "counts": counts.astype(np.int64),
        "edges": edges,
        "ece": float(np.abs(acc_sums - conf_sums).sum() / n),
    }


def _check_calibration_args(num_bins: Any, strategy: Any) -> int:
    num_bins = _checks.positive_int(num_bins, "num_bins")
    if strategy not in _STRATEGIES:
        raise ValueError(f"`strategy` must be one of {_STRATEGIES}; got {strategy!r}.")
    return num_bins


def _hard_targets(
    probs: Any, labels: Any, ignore_label: Optional[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Validated (probs [n, C], labels [n]) with ignored pixels removed."""
    p = _common.check_probs(probs, "probs", "[..., C]")
    num_classes = p.shape[-1]
    lab_arr = _common.as_array(labels, "labels")
    if lab_arr.shape != p.shape[:-1]:
        raise ValueError(
            f"`labels` must have shape probs.shape[:-1] = {tuple(p.shape[:-1])} (integer labels "
            f"[...]); got {_common.describe(lab_arr)}."
        )
    lab = _common.check_int_labels(
        lab_arr, "labels", num_classes, "[...] integer labels", ignore_label
    )
    p, lab = p.reshape(-1, num_classes), lab.reshape(-1)
    if ignore_label is not None:
        keep = lab != ignore_label
        if not keep.any():
            raise ValueError(
                f"`labels` has no valid pixels: every entry equals ignore_label={ignore_label}."
            )
        p, lab = p[keep], lab[keep]
    return p, lab


def _soft_targets(probs: Any, target_probs: Any, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validated (probs [n, C], target_probs [n, C])."""
    p = _common.check_probs(probs, "probs", "[..., C]")
    t_arr = _common.as_array(target_probs, name)
    if t_arr.shape != p.shape:
        raise ValueError(
            f"`{name}` must have the same shape as probs {tuple(p.shape)} (soft targets "
            f"[..., C]); got {_common.describe(t_arr)}."
        )
    t = _common.check_probs(t_arr, name, "[..., C] soft targets")
    return p.reshape(-1, p.shape[-1]), t.reshape(-1, p.shape[-1])


def _is_soft(probs: Any, labels: Any) -> bool:
    lab = np.asarray(labels) if labels is not None else None
    return (
        lab is not None
        and np.issubdtype(lab.dtype, np.floating)
        and lab.ndim == np.ndim(probs)
        and lab.ndim >= 1
    )


def reliability_diagram_data(
    probs: ArrayLike,
    labels: ArrayLike,
    num_bins: int = 10,
    strategy: str = "uniform",
    ignore_label: Optional[int] = None,
) -> dict[str, Any]:
    """Per-bin confidence, accuracy and counts for a reliability diagram.

    Args:
      probs: Predicted class probabilities `[..., C]`.
      labels: Integer labels `[...]` (= `probs.shape[:-1]`), or exact per-pixel label marginals
        given as float soft targets `[..., C]` (then accuracy is the probability that the
        predicted class is right, as in `expected_calibration_error_soft`).
      num_bins: Number of confidence bins `M`.
      strategy: `"uniform"` (equal-width bins on `[0, 1]`) or `"quantile"` (equal-mass bins).
      ignore_label: Label value excluded from the statistics (integer labels only).

    Returns:
      A dict with
        `"confidence"`: `[M]` mean confidence per bin (NaN for empty bins),
        `"accuracy"`: `[M]` mean accuracy per bin (NaN for empty bins),
        `"counts"`: `[M]` int64 number of pixels per bin,
        `"edges"`: `[M + 1]` bin edges (`edges[0] = 0`, `edges[-1] = 1`),
        `"ece"`: the expected calibration error (float).

    #### Mathematical Details

    ```none
    conf_i = max_c p_ic,   acc_i = 1{argmax_c p_ic = y_i}   (or q_i[argmax_c p_ic] for soft q)
    uniform: bin(i) = clip(ceil(M conf_i) - 1, 0, M-1)      i.e. bins (b/M, (b+1)/M]
    quantile: edges = quantiles of conf at 0, 1/M, ..., 1; right-closed bins
    ```
    """
    num_bins = _check_calibration_args(num_bins, strategy)
    if _is_soft(probs, labels):
        if ignore_label is not None:
            raise ValueError(
                "`ignore_label` is only supported with integer `labels`; got soft targets."
            )
        p, t = _soft_targets(probs, labels, "labels")
        pred = p.argmax(axis=-1)
        acc = t[np.arange(p.shape[0]), pred]
    else:
        p, lab = _hard_targets(probs, labels, _common.check_ignore_label(ignore_label))
        acc = (p.argmax(axis=-1) == lab).astype(np.float64)
    return _calibration_stats(p.max(axis=-1), acc, num_bins, strategy)


def expected_calibration_error(
    probs: ArrayLike,
    labels: ArrayLike,
    num_bins: int = 10,
    strategy: str = "uniform",
    ignore_label: Optional[int] = None,
) -> float:
    """Expected calibration error (ECE) of top-label confidences.

    Args:
      probs: Predicted class probabilities `[..., C]` (e.g. `[B, H, W, C]`); finite, in
        `[0, 1]`, summing to 1 over the last axis.
      labels: Integer labels `[...]` with shape `probs.shape[:-1]`.
      num_bins: Number of confidence bins `M`.
      strategy: `"uniform"` (equal-width bins `(b/M, (b+1)/M]`) or `"quantile"` (bin edges at
        the empirical quantiles of the confidences; right-closed bins).
      ignore_label: Label value whose pixels are excluded (may lie outside `[0, C)`, e.g. 255).

    Returns:
      ECE as a float in `[0, 1]`.

    #### Mathematical Details

    ```none
    conf_i = max_c p_ic,   acc_i = 1{argmax_c p_ic = y_i}
    ECE = sum_b (n_b / n) |acc_b - conf_b|
        = (1 / n) sum_b |sum_{i in b} acc_i - sum_{i in b} conf_i|
    ```
    where `acc_b`, `conf_b` are the means over the `n_b` pixels in bin `b`; empty bins add 0.

    #### References

    [1]: Mahdi Pakdaman Naeini et al. Obtaining Well Calibrated Probabilities Using Bayesian
         Binning. AAAI 2015.
    [2]: Chuan Guo et al. On Calibration of Modern Neural Networks. ICML 2017.
         https://arxiv.org/abs/1706.04599
    """
    num_bins = _check_calibration_args(num_bins, strategy)
    if _is_soft(probs, labels):
        raise ValueError(
            "`labels` must be integer labels [...] with shape probs.shape[:-1]; got float "
            f"{_common.describe(np.asarray(labels))}. For exact label distributions use "
            "`expected_calibration_error_soft(probs, target_probs)`."
        )
    p, lab = _hard_targets(probs, labels, _common.check_ignore_label(ignore_label))
    acc = (p.argmax(axis=-1) == lab).astype(np.float64)
    return _calibration_stats(p.max(axis=-1), acc, num_bins, strategy)["ece"]


def expected_calibration_error_soft(
    probs: ArrayLike,
    target_probs: ArrayLike,
    num_bins: int = 10,
    strategy: str = "uniform",
) -> float:
    """ECE against an exactly known per-pixel label distribution.

    Instead of a sampled label, each pixel comes with the exact marginal label distribution
    `q_i` (e.g. `sum_k w_k onehot(m_k)` from `tfp_seg.data.ambiguous_shapes`), and the accuracy
    of a pixel is the probability that its predicted class is right under `q_i`. This is the
    expectation of the hard-label bin accuracy over the label distribution, without the sampling
    noise of drawing labels.

    Args:
      probs: Predicted class probabilities `[..., C]`.
      target_probs: Exact label marginals `[..., C]` (same shape; rows sum to 1).
      num_bins: Number of confidence bins `M`.
      strategy: `"uniform"` or `"quantile"` (see `expected_calibration_error`).

    Returns:
      ECE as a float in `[0, 1]`.

    #### Mathematical Details

    ```none
    conf_i = max_c p_ic,   acc_i = q_i[argmax_c p_ic]
    ECE = sum_b (n_b / n) |acc_b - conf_b|
    ```
    """
    num_bins = _check_calibration_args(num_bins, strategy)
    p, t = _soft_targets(probs, target_probs, "target_probs")
    acc = t[np.arange(p.shape[0]), p.argmax(axis=-1)]
    return _calibration_stats(p.max(axis=-1), acc, num_bins, strategy)["ece"]


# ================================================================================================
# Proper scoring rules
# ================================================================================================


def _scoring_inputs(probs: Any, labels: Any, ignore_label: Any) -> tuple[np.ndarray, np.ndarray]:
    """(probs [n, C], targets [n, C]) with targets one-hot for integer labels."""
    if _is_soft(probs, labels):
        if ignore_label is not None:
            raise ValueError(
                "`ignore_label` is only supported with integer `labels`; got soft targets "
                f"{_common.describe(np.asarray(labels))}."
            )
        return _soft_targets(probs, labels, "labels")
    p, lab = _hard_targets(probs, labels, _common.check_ignore_label(ignore_label))
    onehot = np.zeros_like(p)
    onehot[np.arange(lab.size), lab] = 1.0
    return p, onehot


def negative_log_likelihood(
    probs: ArrayLike,
    labels: ArrayLike,
    ignore_label: Optional[int] = None,
    eps: float = 1e-12,
) -> float:
    """Mean per-pixel negative log-likelihood (cross-entropy) of the predicted probabilities.

    Args:
      probs: Predicted class probabilities `[..., C]`.
      labels: Integer labels `[...]` (= `probs.shape[:-1]`), or soft targets: float label
        distributions `[..., C]` (e.g. exact per-pixel marginals), in which case the result is
        the cross-entropy `-sum_c q_c log p_c`, which equals the expected hard-label NLL when
        `y ~ q` pixel-wise.
      ignore_label: Label value whose pixels are excluded (integer labels only).
      eps: Probabilities are clipped below at `eps` before the log.

    Returns:
      Mean NLL in nats per pixel, a float.

    #### Mathematical Details

    ```none
    NLL = (1 / n) sum_i -log max(p_i[y_i], eps)                    (integer labels)
    NLL = (1 / n) sum_i -sum_c q_ic log max(p_ic, eps)              (soft targets)
    ```
    """
    _common.check_eps(eps)
    p, t = _scoring_inputs(probs, labels, ignore_label)
    logp = np.log(np.maximum(p, eps))
    return float(np.mean(-np.sum(t * logp, axis=-1)))


def brier_score(probs: ArrayLike, labels: ArrayLike, ignore_label: Optional[int] = None) -> float:
    """Mean per-pixel multi-class Brier score.

    Args:
      probs: Predicted class probabilities `[..., C]`.
      labels: Integer labels `[...]` (= `probs.shape[:-1]`), or soft targets `[..., C]`. With
        soft targets `q` the score is the squared distance to `q`, `sum_c (p_c - q_c)^2`; this is
        smaller than the expected hard-label Brier score under `y ~ q` by the constant
        `sum_c q_c (1 - q_c)` (the irreducible part), so model rankings agree.
      ignore_label: Label value whose pixels are excluded (integer labels only).

    Returns:
      Mean Brier score per pixel, a float in `[0, 2]`.

    #### Mathematical Details

    ```none
    BS = (1 / n) sum_i sum_c (p_ic - 1{y_i = c})^2
    ```

    #### References

    [1]: Glenn Brier. Verification of forecasts expressed in terms of probability.
         Monthly Weather Review, 1950.
    """
    p, t = _scoring_inputs(probs, labels, ignore_label)
    return float(np.mean(np.sum((p - t) ** 2, axis=-1)))
