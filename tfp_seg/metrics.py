"""Evaluation metrics for probabilistic segmentation.

Two families live here:

* NumPy functions (`generalized_energy_distance`, `hungarian_matched_iou`,
  `expected_calibration_error`, `mean_iou`, `ood_scores`, ...). They accept NumPy arrays or eager
  TensorFlow tensors (converted with `np.asarray`), validate their inputs early (a `ValueError`
  naming the argument and the shape/dtype received) and return Python floats (or dicts / arrays
  where stated). They compute in float64.
* Streaming Keras 3 metrics (`StreamingMeanIoU`, `StreamingECE`, `StreamingNLL`,
  `StreamingBrier`) for `model.compile(metrics=[...])`. They accumulate sufficient statistics in
  float64 variables, so after any number of batches `result()` equals the NumPy function applied to
  the concatenated data. On a distribution head's packed parameters they score the head's Monte
  Carlo predictive probabilities `head.mean_probabilities(...)` (what `predict_proba` returns):
  `tfp_seg.models.ProbabilisticSegmenter.compile` gives them the model's head (`bind_head`).
  Without a head (plain Keras models, or `predictive=False`) they score the first `C` channels of
  `y_pred` as probabilities or logits.

Conventions (shared with the rest of `tfp_seg`):

* Label maps are integer arrays; class probabilities are channels-last `[..., C]`.
* Set metrics take one image as `samples [N,H,W]`, `references [K,H,W]`, or a batch as
  `[B,N,H,W]` / `[B,K,H,W]` and average over `B`.
* The set distance is `d(a, b) = 1 - IoU` over the foreground classes `1..C-1`, averaged over the
  classes present in `a` or `b`; two masks without any foreground have `d = 0` (Kohl et al., 2018;
  Monteiro et al., 2020).
"""

from __future__ import annotations

import math
from typing import Any, Optional, Union

import keras
import numpy as np
import numpy.typing as npt
import scipy.optimize
import scipy.stats
import tensorflow as tf

from tfp_seg.layers.base import DistributionHead

__all__ = [
    "StreamingBrier",
    "StreamingECE",
    "StreamingMeanIoU",
    "StreamingNLL",
    "bind_head",
    "brier_score",
    "confusion_matrix",
    "diversity",
    "expected_calibration_error",
    "expected_calibration_error_soft",
    "generalized_energy_distance",
    "hungarian_matched_iou",
    "iou_distance",
    "mean_iou",
    "negative_log_likelihood",
    "ood_scores",
    "pairwise_iou_distance",
    "per_class_iou",
    "pixel_accuracy",
    "reliability_diagram_data",
]

ArrayLike = npt.ArrayLike


# ================================================================================================
# Input validation
# ================================================================================================


def _describe(x: np.ndarray) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}"


def _as_array(x: Any, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"`{name}` must be an array; got None.")
    try:
        arr = np.asarray(x)
    except Exception as err:  # re-raised with the argument name
        raise ValueError(f"`{name}` could not be converted to a NumPy array: {err}") from err
    if arr.dtype == object:
        raise ValueError(f"`{name}` must be a numeric array; got {_describe(arr)}.")
    return arr


def _check_positive_int(value: Any, name: str, minimum: int = 1) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}; got {value}.")
    return int(value)


def _check_ignore_label(ignore_label: Any) -> Optional[int]:
    if ignore_label is None:
        return None
    if isinstance(ignore_label, (bool, np.bool_)) or not isinstance(
        ignore_label, (int, np.integer)
    ):
        raise ValueError(f"`ignore_label` must be an integer or None; got {ignore_label!r}.")
    return int(ignore_label)


def _is_integer_dtype(arr: np.ndarray) -> bool:
    return np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_


def _check_int_labels(
    x: Any,
    name: str,
    num_classes: Optional[int],
    expected: str,
    ignore_label: Optional[int] = None,
) -> np.ndarray:
    """Converts `x` to an int64 array and checks dtype, emptiness and range."""
    arr = _as_array(x, name)
    if not _is_integer_dtype(arr):
        raise ValueError(
            f"`{name}` must hold integer class labels ({expected}); got {_describe(arr)}. "
            "Cast label maps to an integer dtype (float labels are not accepted)."
        )
    if arr.size == 0:
        raise ValueError(f"`{name}` must not be empty ({expected}); got {_describe(arr)}.")
    arr = arr.astype(np.int64, copy=False)
    if num_classes is not None:
        values = arr if ignore_label is None else arr[arr != ignore_label]
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            extra = "" if ignore_label is None else f" (besides ignore_label={ignore_label})"
            raise ValueError(
                f"`{name}` must hold labels in [0, {num_classes}){extra}; got values in "
                f"[{values.min()}, {values.max()}] ({_describe(arr)})."
            )
    return arr


def _check_probs(x: Any, name: str, expected: str) -> np.ndarray:
    """Converts to float64 and checks: rank >= 1, finite, in [0, 1], sums to 1 on the last axis."""
    arr = _as_array(x, name)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(
            f"`{name}` must be a floating-point probability array ({expected}); "
            f"got {_describe(arr)}."
        )
    if arr.ndim < 1 or arr.size == 0 or arr.shape[-1] < 1:
        raise ValueError(f"`{name}` must be a non-empty array ({expected}); got {_describe(arr)}.")
    tol = max(1e-3, 4.0 * arr.shape[-1] * float(np.finfo(arr.dtype).eps))
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"`{name}` contains NaN or Inf values ({_describe(arr)}).")
    if out.min() < -tol or out.max() > 1.0 + tol:
        raise ValueError(
            f"`{name}` must hold probabilities in [0, 1] ({expected}); got values in "
            f"[{out.min():.4g}, {out.max():.4g}] ({_describe(arr)}). Apply a softmax to logits."
        )
    sums = out.sum(axis=-1)
    worst = float(np.max(np.abs(sums - 1.0)))
    if worst > tol:
        raise ValueError(
            f"`{name}` must sum to 1 over its last (class) axis ({expected}); the largest "
            f"deviation is {worst:.4g} ({_describe(arr)})."
        )
    return np.clip(out, 0.0, 1.0)


def _check_eps(eps: Any) -> float:
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.floating)):
        raise ValueError(f"`eps` must be a float in (0, 1); got {eps!r}.")
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(f"`eps` must be a float in (0, 1); got {eps!r}.")
    return float(eps)


def _check_label_sets(
    samples: Any, references: Any, num_classes: int
) -> tuple[np.ndarray, np.ndarray, bool]:
    """Validates `samples`/`references`; returns them flattened to [B,N,P], [B,K,P]."""
    s = _check_int_labels(samples, "samples", num_classes, "[N,H,W] or [B,N,H,W]")
    r = _check_int_labels(references, "references", num_classes, "[K,H,W] or [B,K,H,W]")
    for name, arr, form in (("samples", s, "[N,H,W] or [B,N,H,W]"),
                            ("references", r, "[K,H,W] or [B,K,H,W]")):
        if arr.ndim not in (3, 4):
            raise ValueError(f"`{name}` must have rank 3 or 4 ({form}); got {_describe(arr)}.")
    if s.ndim != r.ndim:
        raise ValueError(
            "`samples` and `references` must both be single images ([N,H,W] / [K,H,W]) or both "
            f"batches ([B,N,H,W] / [B,K,H,W]); got samples {_describe(s)} and references "
            f"{_describe(r)}."
        )
    batched = s.ndim == 4
    if not batched:
        s, r = s[None], r[None]
    if s.shape[0] != r.shape[0]:
        raise ValueError(
            f"`samples` and `references` must have the same batch size B; got samples "
            f"{_describe(s)} and references {_describe(r)}."
        )
    if s.shape[2:] != r.shape[2:]:
        raise ValueError(
            f"`samples` and `references` must have the same spatial shape [H,W]; got samples "
            f"{_describe(s)} and references {_describe(r)}."
        )
    b = s.shape[0]
    return s.reshape(b, s.shape[1], -1), r.reshape(b, r.shape[1], -1), batched


def _check_set_weights(
    weights: Any, name: str, batch: int, size: int, batched: bool
) -> np.ndarray:
    """Returns weights as [B, size] float64 (uniform when None)."""
    if weights is None:
        return np.full((batch, size), 1.0 / size)
    w = _as_array(weights, name)
    form = f"[{size}] or [B, {size}] with B={batch}" if batched else f"[{size}]"
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise ValueError(f"`{name}` must be a real array ({form}); got {_describe(w)}.")
    w = w.astype(np.float64)
    if w.shape == (size,):
        w = np.broadcast_to(w, (batch, size))
    elif not (batched and w.shape == (batch, size)):
        raise ValueError(f"`{name}` must have shape {form}; got {_describe(w)}.")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"`{name}` must be finite and non-negative; got {w.tolist()}.")
    sums = w.sum(axis=-1)
    if np.any(np.abs(sums - 1.0) > 1e-5):
        raise ValueError(
            f"`{name}` must sum to 1 (per image); got sums {np.round(sums, 6).tolist()}."
        )
    return w / sums[:, None]


# ================================================================================================
# IoU distance
# ================================================================================================


def _pairwise_distance(x: np.ndarray, y: np.ndarray, num_classes: int) -> np.ndarray:
    """`1 - IoU` between every row of x [N,P] and y [K,P] (validated int arrays) -> [N,K]."""
    n, k = x.shape[0], y.shape[0]
    # Counts are exact in float32 below 2**24 pixels; BLAS then gives exact integer sums.
    dtype = np.float32 if x.shape[1] < 2**24 else np.float64
    iou_sum = np.zeros((n, k))
    present = np.zeros((n, k))
    for c in range(1, num_classes):  # loop over classes only; every pair at once per class
        xc = (x == c).astype(dtype)
        yc = (y == c).astype(dtype)
        inter = (xc @ yc.T).astype(np.float64)
        union = xc.sum(axis=1, dtype=np.float64)[:, None] + yc.sum(axis=1, dtype=np.float64)
        union = union - inter
        has = union > 0
        iou_sum += np.where(has, inter / np.where(has, union, 1.0), 0.0)
        present += has
    return np.where(present > 0, 1.0 - iou_sum / np.maximum(present, 1.0), 0.0)


def iou_distance(a: ArrayLike, b: ArrayLike, num_classes: int) -> float:
    """IoU distance `1 - IoU` between two label maps, over the foreground classes.

    Args:
      a: Integer label map, shape `[H, W]` (any non-empty shape is accepted, e.g. `[D,H,W]`).
      b: Integer label map of the same shape as `a`.
      num_classes: Number of classes `C` (labels in `[0, C)`; class 0 is background).

    Returns:
      The distance as a Python float in `[0, 1]`.

    #### Mathematical Details

    ```none
    IoU_c(a, b) = |{a = c} ∩ {b = c}| / |{a = c} ∪ {b = c}|
    P(a, b)     = {c in 1..C-1 : c occurs in a or in b}
    d(a, b)     = 1 - (1 / |P|) sum_{c in P} IoU_c(a, b)      if P is not empty
                = 0                                          if neither map has foreground
    ```

    #### References

    [1]: Simon Kohl et al. A Probabilistic U-Net for Segmentation of Ambiguous Images.
         NeurIPS 2018. https://arxiv.org/abs/1806.05034
    """
    num_classes = _check_positive_int(num_classes, "num_classes")
    a_arr = _check_int_labels(a, "a", num_classes, "[H,W] label map")
    b_arr = _check_int_labels(b, "b", num_classes, "[H,W] label map")
    if a_arr.ndim < 1:
        raise ValueError(f"`a` must be a label map of rank >= 1 ([H,W]); got {_describe(a_arr)}.")
    if a_arr.shape != b_arr.shape:
        raise ValueError(
            f"`a` and `b` must have the same shape; got a {_describe(a_arr)} and "
            f"b {_describe(b_arr)}."
        )
    return float(
        _pairwise_distance(a_arr.reshape(1, -1), b_arr.reshape(1, -1), num_classes)[0, 0]
    )


def pairwise_iou_distance(x: ArrayLike, y: ArrayLike, num_classes: int) -> np.ndarray:
    """Matrix of IoU distances between two sets of label maps.

    Vectorised over pairs: for every foreground class the intersections of all pairs come from
    one matrix product of the class indicator maps.

    Args:
      x: Integer label maps, shape `[N, H, W]` (any spatial rank >= 1: `[N, ...]`).
      y: Integer label maps, shape `[K, H, W]` (same spatial shape as `x`).
      num_classes: Number of classes `C`.

    Returns:
      float64 array `[N, K]` with entry `(n, k) = d(x[n], y[k])` (see `iou_distance`).

    #### Mathematical Details

    ```none
    X_c[n, p] = 1{x[n, p] = c},  Y_c[k, p] = 1{y[k, p] = c}
    I_c = X_c Y_c^T,  U_c[n, k] = |X_c[n]| + |Y_c[k]| - I_c[n, k]
    D[n, k] = 1 - mean_{c : U_c[n, k] > 0} I_c[n, k] / U_c[n, k]     (0 if no such c)
    ```
    """
    num_classes = _check_positive_int(num_classes, "num_classes")
    x_arr = _check_int_labels(x, "x", num_classes, "[N,H,W]")
    y_arr = _check_int_labels(y, "y", num_classes, "[K,H,W]")
    for name, arr, form in (("x", x_arr, "[N,H,W]"), ("y", y_arr, "[K,H,W]")):
        if arr.ndim < 2:
            raise ValueError(
                f"`{name}` must be a stack of label maps of rank >= 2 ({form}); "
                f"got {_describe(arr)}."
            )
    if x_arr.shape[1:] != y_arr.shape[1:]:
        raise ValueError(
            f"`x` and `y` must have the same spatial shape; got x {_describe(x_arr)} and "
            f"y {_describe(y_arr)}."
        )
    return _pairwise_distance(
        x_arr.reshape(x_arr.shape[0], -1), y_arr.reshape(y_arr.shape[0], -1), num_classes
    )


# ================================================================================================
# Set metrics: GED, diversity, Hungarian-matched IoU
# ================================================================================================


def generalized_energy_distance(
    samples: ArrayLike,
    references: ArrayLike,
    num_classes: int,
    reference_weights: Optional[ArrayLike] = None,
    sample_weights: Optional[ArrayLike] = None,
    return_terms: bool = False,
) -> Union[float, dict[str, float]]:
    """Squared generalized energy distance `D_GED^2` between sampled and reference label maps.

    Args:
      samples: Integer label maps drawn from the model, `[N, H, W]` for one image or
        `[B, N, H, W]` for a batch.
      references: Integer reference annotations, `[K, H, W]` or `[B, K, H, W]` (same rank, batch
        size and spatial shape as `samples`).
      num_classes: Number of classes `C`.
      reference_weights: Optional probabilities of the references, `[K]` (shared over the batch)
        or `[B, K]`; non-negative, summing to 1. With weights the reference side is an exact
        discrete distribution (e.g. the enumerated annotation modes of
        `tfp_seg.data.ambiguous_shapes`), and its expectations are weighted. Default: uniform.
      sample_weights: Optional weights of the samples, `[N]` or `[B, N]`, same rules.
      return_terms: If True return a dict with the three terms as well.

    Returns:
      `D_GED^2` averaged over the batch as a float, or (if `return_terms`) a dict
      `{"ged", "cross", "sample_diversity", "reference_diversity"}` of batch-averaged floats,
      where `cross = E[d(S,Y)]`, `sample_diversity = E[d(S,S')]`,
      `reference_diversity = E[d(Y,Y')]`.

    #### Mathematical Details

    With `d(a, b) = 1 - IoU(a, b)` (see `iou_distance`), weights `u` over the `N` samples
    (uniform `1/N` by default) and `w` over the `K` references (uniform `1/K` by default):

    ```none
    D_GED^2 = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]
    E[d(S, Y)]  = u^T D_SY w          D_SY[n, k] = d(s_n, y_k)
    E[d(S, S')] = u^T D_SS u          (all N^2 pairs, including n = n')
    E[d(Y, Y')] = w^T D_YY w          (all K^2 pairs, including k = k')
    ```

    All pairs including identical indices are averaged (a V-statistic), so identical sample and
    reference sets give exactly 0. The result is not clipped; because `d` is not guaranteed to be
    of negative type, it can in principle be slightly negative.

    As an estimator of the `D_GED^2` between the *distributions* the sets are drawn from, the
    V-statistic is biased: for `N` i.i.d. samples `E[u^T D_SS u] = (N - 1) / N E[d(S, S')]`
    (the `N` self-pairs have `d = 0`), so even a perfect sampler scores `E[d(S, S')] / N` on
    average. `tfp_seg.evaluation.evaluate_ambiguous`, whose reference side is exact, uses the
    unbiased U-statistic over pairs of distinct samples instead.

    #### Examples

    ```python
    s = np.array([[[1, 0]], [[1, 1]]])      # N=2 samples of a 1x2 image
    y = np.array([[[1, 0]]])                # K=1 reference
    generalized_energy_distance(s, y, num_classes=2)
    # ==> 0.25   (= 2 * 0.25 - 0.25 - 0)
    ```

    #### References

    [1]: Simon Kohl et al. A Probabilistic U-Net for Segmentation of Ambiguous Images.
         NeurIPS 2018. https://arxiv.org/abs/1806.05034
    [2]: Gábor Székely and Maria Rizzo. Energy statistics: A class of statistics based on
         distances. Journal of Statistical Planning and Inference, 2013.
    [3]: Miguel Monteiro et al. Stochastic Segmentation Networks: Modelling Spatially Correlated
         Aleatoric Uncertainty. NeurIPS 2020. https://arxiv.org/abs/2006.06015
    """
    num_classes = _check_positive_int(num_classes, "num_classes")
    s, r, batched = _check_label_sets(samples, references, num_classes)
    batch = s.shape[0]
    w_ref = _check_set_weights(reference_weights, "reference_weights", batch, r.shape[1], batched)
    w_smp = _check_set_weights(sample_weights, "sample_weights", batch, s.shape[1], batched)
    cross = np.empty(batch)
    sample_div = np.empty(batch)
    reference_div = np.empty(batch)
    for i in range(batch):
        u, w = w_smp[i], w_ref[i]
        cross[i] = u @ _pairwise_distance(s[i], r[i], num_classes) @ w
        sample_div[i] = u @ _pairwise_distance(s[i], s[i], num_classes) @ u
        reference_div[i] = w @ _pairwise_distance(r[i], r[i], num_classes) @ w
    ged = 2.0 * cross - sample_div - reference_div
    if not return_terms:
        return float(ged.mean())
    return {
        "ged": float(ged.mean()),
        "cross": float(cross.mean()),
        "sample_diversity": float(sample_div.mean()),
        "reference_diversity": float(reference_div.mean()),
    }


def diversity(samples: ArrayLike, num_classes: int) -> float:
    """Mean pairwise IoU distance `E[d(S, S')]` within a set of label maps.

    Args:
      samples: Integer label maps, `[N, H, W]` for one image or `[B, N, H, W]` for a batch.
      num_classes: Number of classes `C`.

    Returns:
      The sample diversity (the `E[d(S,S')]` term of `generalized_energy_distance`), averaged
      over the batch, as a float.

    #### Mathematical Details

    ```none
    diversity = (1 / N^2) sum_{n, n'} d(s_n, s_n')     (all pairs, including n = n')
    ```

    This V-statistic describes the set itself. For `N` i.i.d. samples of a distribution its
    expectation is `(N - 1) / N E[d(S, S')]`; `N / (N - 1)` times it is the unbiased
    U-statistic (mean over pairs `n != n'`), which `tfp_seg.evaluation.evaluate_ambiguous`
    reports as `diversity`.
    """
    num_classes = _check_positive_int(num_classes, "num_classes")
    s = _check_int_labels(samples, "samples", num_classes, "[N,H,W] or [B,N,H,W]")
    if s.ndim not in (3, 4):
        raise ValueError(
            f"`samples` must have rank 3 or 4 ([N,H,W] or [B,N,H,W]); got {_describe(s)}."
        )
    if s.ndim == 3:
        s = s[None]
    s = s.reshape(s.shape[0], s.shape[1], -1)
    return float(np.mean([_pairwise_distance(x, x, num_classes).mean() for x in s]))


def hungarian_matched_iou(samples: ArrayLike, references: ArrayLike, num_classes: int) -> float:
    """Mean IoU of an optimal one-to-one matching between samples and references.

    Args:
      samples: Integer label maps, `[N, H, W]` or `[B, N, H, W]`.
      references: Integer label maps, `[K, H, W]` or `[B, K, H, W]`.
      num_classes: Number of classes `C`.

    Returns:
      The Hungarian-matched IoU averaged over the batch, a float in `[0, 1]`.

    #### Mathematical Details

    Both sets are replicated to the common size `L = lcm(N, K)` (each sample `L / N` times,
    each reference `L / K` times). When one size divides the other this is the usual "replicate
    the smaller set to the size of the larger" (e.g. 16 samples vs 4 raters: each rater 4
    times); unlike cyclic tiling to `max(N, K)`, it does not depend on the order of the sets
    when neither divides the other, and equals optimal transport between the two uniform
    empirical distributions. With `IoU = 1 - d` (two masks with no foreground have IoU 1):

    ```none
    pi*  = argmin_{permutation pi} sum_i d(s_i, y_pi(i))      (scipy linear_sum_assignment)
    HM-IoU = (1 / L) sum_i (1 - d(s_i, y_pi*(i)))
    ```

    #### References

    [1]: Simon Kohl et al. A Hierarchical Probabilistic U-Net for Modeling Multi-Scale
         Ambiguities. 2019. https://arxiv.org/abs/1905.13077
    [2]: Miguel Monteiro et al. Stochastic Segmentation Networks. NeurIPS 2020.
    """
    num_classes = _check_positive_int(num_classes, "num_classes")
    s, r, _ = _check_label_sets(samples, references, num_classes)
    n, k = s.shape[1], r.shape[1]
    size = math.lcm(n, k)
    rows = np.repeat(np.arange(n), size // n)
    cols = np.repeat(np.arange(k), size // k)
    scores = []
    for i in range(s.shape[0]):
        cost = _pairwise_distance(s[i], r[i], num_classes)[np.ix_(rows, cols)]
        row_idx, col_idx = scipy.optimize.linear_sum_assignment(cost)
        scores.append(np.mean(1.0 - cost[row_idx, col_idx]))
    return float(np.mean(scores))


# ================================================================================================
# Calibration
# ================================================================================================

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
    num_bins = _check_positive_int(num_bins, "num_bins")
    if strategy not in _STRATEGIES:
        raise ValueError(f"`strategy` must be one of {_STRATEGIES}; got {strategy!r}.")
    return num_bins


def _hard_targets(
    probs: Any, labels: Any, ignore_label: Optional[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Validated (probs [n, C], labels [n]) with ignored pixels removed."""
    p = _check_probs(probs, "probs", "[..., C]")
    num_classes = p.shape[-1]
    lab_arr = _as_array(labels, "labels")
    if lab_arr.shape != p.shape[:-1]:
        raise ValueError(
            f"`labels` must have shape probs.shape[:-1] = {tuple(p.shape[:-1])} (integer labels "
            f"[...]); got {_describe(lab_arr)}."
        )
    lab = _check_int_labels(lab_arr, "labels", num_classes, "[...] integer labels", ignore_label)
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
    p = _check_probs(probs, "probs", "[..., C]")
    t_arr = _as_array(target_probs, name)
    if t_arr.shape != p.shape:
        raise ValueError(
            f"`{name}` must have the same shape as probs {tuple(p.shape)} (soft targets "
            f"[..., C]); got {_describe(t_arr)}."
        )
    t = _check_probs(t_arr, name, "[..., C] soft targets")
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
        p, lab = _hard_targets(probs, labels, _check_ignore_label(ignore_label))
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
            f"{_describe(np.asarray(labels))}. For exact label distributions use "
            "`expected_calibration_error_soft(probs, target_probs)`."
        )
    p, lab = _hard_targets(probs, labels, _check_ignore_label(ignore_label))
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


def _scoring_inputs(
    probs: Any, labels: Any, ignore_label: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(probs [n, C], targets [n, C]) with targets one-hot for integer labels."""
    if _is_soft(probs, labels):
        if ignore_label is not None:
            raise ValueError(
                "`ignore_label` is only supported with integer `labels`; got soft targets "
                f"{_describe(np.asarray(labels))}."
            )
        return _soft_targets(probs, labels, "labels")
    p, lab = _hard_targets(probs, labels, _check_ignore_label(ignore_label))
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
    _check_eps(eps)
    p, t = _scoring_inputs(probs, labels, ignore_label)
    logp = np.log(np.maximum(p, eps))
    return float(np.mean(-np.sum(t * logp, axis=-1)))


def brier_score(
    probs: ArrayLike, labels: ArrayLike, ignore_label: Optional[int] = None
) -> float:
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


# ================================================================================================
# Deterministic segmentation metrics
# ================================================================================================


def _pred_and_labels(
    pred: Any, labels: Any, num_classes: Optional[int], ignore_label: Optional[int]
) -> tuple[np.ndarray, np.ndarray]:
    pred_arr = _check_int_labels(pred, "pred", num_classes, "[...] predicted labels")
    lab_arr = _as_array(labels, "labels")
    if lab_arr.shape != pred_arr.shape:
        raise ValueError(
            f"`labels` must have the same shape as pred {tuple(pred_arr.shape)}; got "
            f"{_describe(lab_arr)}."
        )
    lab = _check_int_labels(lab_arr, "labels", num_classes, "[...] labels", ignore_label)
    pred_arr, lab = pred_arr.reshape(-1), lab.reshape(-1)
    if ignore_label is not None:
        keep = lab != ignore_label
        if not keep.any():
            raise ValueError(
                f"`labels` has no valid pixels: every entry equals ignore_label={ignore_label}."
            )
        pred_arr, lab = pred_arr[keep], lab[keep]
    return pred_arr, lab


def confusion_matrix(
    pred: ArrayLike,
    labels: ArrayLike,
    num_classes: int,
    ignore_label: Optional[int] = None,
) -> np.ndarray:
    """Confusion matrix of predicted vs true labels.

    Args:
      pred: Integer predicted labels `[...]`.
      labels: Integer true labels, same shape.
      num_classes: Number of classes `C`.
      ignore_label: Label value whose pixels are excluded.

    Returns:
      int64 array `[C, C]`: entry `(i, j)` counts pixels with true label `i` predicted as `j`
      (rows: truth, columns: prediction).
    """
    num_classes = _check_positive_int(num_classes, "num_classes")
    p, lab = _pred_and_labels(pred, labels, num_classes, _check_ignore_label(ignore_label))
    counts = np.bincount(lab * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64)


def per_class_iou(confusion: ArrayLike) -> np.ndarray:
    """Per-class IoU from a confusion matrix.

    Args:
      confusion: `[C, C]` confusion matrix (rows truth, columns prediction), e.g. from
        `confusion_matrix` or `StreamingMeanIoU.confusion_matrix()`.

    Returns:
      float64 array `[C]`: `TP_c / (TP_c + FP_c + FN_c)`, NaN for classes absent from both the
      prediction and the labels.
    """
    cm = _as_array(confusion, "confusion").astype(np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.size == 0:
        raise ValueError(f"`confusion` must be a square [C, C] matrix; got {_describe(cm)}.")
    if not np.all(np.isfinite(cm)) or np.any(cm < 0):
        raise ValueError("`confusion` must hold finite, non-negative counts.")
    tp = np.diag(cm)
    union = cm.sum(axis=0) + cm.sum(axis=1) - tp
    return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def mean_iou(
    pred: ArrayLike,
    labels: ArrayLike,
    num_classes: int,
    ignore_label: Optional[int] = None,
    return_per_class: bool = False,
) -> Union[float, tuple[float, np.ndarray]]:
    """Mean intersection-over-union of a predicted label map (confusion-matrix mIoU).

    Args:
      pred: Integer predicted labels `[...]` (e.g. `[B, H, W]`), in `[0, C)`.
      labels: Integer true labels, same shape.
      num_classes: Number of classes `C` (background included).
      ignore_label: Label value whose pixels are excluded.
      return_per_class: If True also return the `[C]` per-class IoU (NaN for absent classes).

    Returns:
      mIoU as a float, or `(miou, per_class)` if `return_per_class`.

    #### Mathematical Details

    Accumulated over all pixels of the input (dataset-level, not per image):

    ```none
    IoU_c = TP_c / (TP_c + FP_c + FN_c)
    mIoU  = mean of IoU_c over the classes present in pred or labels (TP+FP+FN > 0)
    ```
    """
    cm = confusion_matrix(pred, labels, num_classes, ignore_label)
    per_class = per_class_iou(cm)
    miou = float(np.nanmean(per_class))
    return (miou, per_class) if return_per_class else miou


def pixel_accuracy(
    pred: ArrayLike, labels: ArrayLike, ignore_label: Optional[int] = None
) -> float:
    """Fraction of (non-ignored) pixels whose predicted label equals the true label.

    Args:
      pred: Integer predicted labels `[...]`.
      labels: Integer true labels, same shape.
      ignore_label: Label value whose pixels are excluded.

    Returns:
      Pixel accuracy, a float in `[0, 1]`.
    """
    p, lab = _pred_and_labels(pred, labels, None, _check_ignore_label(ignore_label))
    return float(np.mean(p == lab))


# ================================================================================================
# Out-of-distribution detection
# ================================================================================================


def ood_scores(uncertainty: ArrayLike, is_ood: ArrayLike) -> dict[str, float]:
    """Threshold-free OOD detection scores of an uncertainty measure.

    OOD is the positive class and a higher uncertainty means "more OOD".

    Args:
      uncertainty: Real scores, any shape (e.g. per image `[B]` or per pixel `[B, H, W]`).
      is_ood: Boolean (or 0/1 integer) array of the same shape; both classes must occur.

    Returns:
      `{"auroc", "aupr", "fpr95"}` as floats:
        `auroc`: area under the ROC curve (ties count 1/2),
        `aupr`: average precision with OOD as positive (scikit-learn's step-wise definition),
        `fpr95`: false-positive rate at the operating point where the true-positive rate first
          reaches 0.95, i.e. the largest threshold `t` with `TPR(t) >= 0.95`
          (predict OOD when `u >= t`).

    #### Mathematical Details

    ```none
    AUROC = P(u_ood > u_id) + 0.5 P(u_ood = u_id)
          = (R_+ - n_+ (n_+ + 1) / 2) / (n_+ n_-)      R_+ = sum of average ranks of positives
    AP    = sum_k (R_k - R_{k-1}) P_k        over distinct thresholds in decreasing order
    FPR95 = FPR(t*),   t* = max {t : TPR(t) >= 0.95}
    ```

    #### References

    [1]: James Hanley and Barbara McNeil. The meaning and use of the area under a receiver
         operating characteristic (ROC) curve. Radiology, 1982.
    [2]: Dan Hendrycks and Kevin Gimpel. A Baseline for Detecting Misclassified and
         Out-of-Distribution Examples in Neural Networks. ICLR 2017.
    [3]: Shiyu Liang et al. Enhancing The Reliability of Out-of-distribution Image Detection in
         Neural Networks. ICLR 2018.
    """
    u = _as_array(uncertainty, "uncertainty")
    if not (np.issubdtype(u.dtype, np.floating) or np.issubdtype(u.dtype, np.integer)):
        raise ValueError(f"`uncertainty` must be a real array; got {_describe(u)}.")
    if u.size == 0:
        raise ValueError(f"`uncertainty` must not be empty; got {_describe(u)}.")
    u = u.astype(np.float64)
    if not np.all(np.isfinite(u)):
        raise ValueError(f"`uncertainty` contains NaN or Inf values ({_describe(u)}).")
    y = _as_array(is_ood, "is_ood")
    if y.shape != u.shape:
        raise ValueError(
            f"`is_ood` must have the same shape as uncertainty {tuple(u.shape)}; "
            f"got {_describe(y)}."
        )
    if not _is_integer_dtype(y) or np.any((y != 0) & (y != 1)):
        raise ValueError(f"`is_ood` must be boolean (or 0/1 integers); got {_describe(y)}.")
    y = y.astype(bool).reshape(-1)
    u = u.reshape(-1)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(
            f"`is_ood` must contain both OOD (True) and in-distribution (False) entries; got "
            f"{n_pos} OOD and {n_neg} in-distribution."
        )
    ranks = scipy.stats.rankdata(u)  # average ranks for ties
    auroc = (ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)

    order = np.argsort(-u, kind="mergesort")
    u_sorted, y_sorted = u[order], y[order]
    # Last index of each group of tied scores: one operating point per distinct threshold.
    last = np.r_[np.flatnonzero(np.diff(u_sorted)), u_sorted.size - 1]
    tps = np.cumsum(y_sorted)[last].astype(np.float64)
    fps = (last + 1) - tps
    precision = tps / (tps + fps)
    # sum_k (R_k - R_{k-1}) P_k with R_k = tps_k / n_pos, dividing once at the end.
    aupr = float(np.sum(np.diff(np.r_[0.0, tps]) * precision) / n_pos)
    first = int(np.argmax(tps >= 0.95 * n_pos - 1e-9))
    fpr95 = float(fps[first] / n_neg)
    return {"auroc": float(auroc), "aupr": aupr, "fpr95": fpr95}


# ================================================================================================
# Streaming Keras metrics
# ================================================================================================


def _metric_head(head: Any) -> Any:
    """A weightless copy of a distribution head (a metric must not own the model's layer)."""
    if head is None:
        return None
    if isinstance(head, dict):
        head = keras.saving.deserialize_keras_object(head)
    elif isinstance(head, DistributionHead):
        head = type(head).from_config(head.get_config())
    if not isinstance(head, DistributionHead):
        raise ValueError(
            "`head` must be a tfp_seg.layers.DistributionHead (or its serialized config) or "
            f"None; got {type(head).__name__}."
        )
    return head


def _check_seed(seed: Any) -> Optional[int]:
    if seed is None:
        return None
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"`seed` must be an integer or None; got {seed!r}.")
    return int(seed)


class _StreamingSegmentationMetric(keras.metrics.Metric):
    """Shared input handling: labels `[B,H,W]`; the predictive probabilities of a distribution
    `head` from `y_pred`'s packed parameters, or without a head the first `num_classes`
    channels of `y_pred`."""

    def __init__(
        self,
        num_classes: int,
        from_logits: bool = False,
        ignore_label: Optional[int] = None,
        name: Optional[str] = None,
        dtype: Any = None,
        head: Any = None,
        num_samples: int = 16,
        seed: Optional[int] = None,
        predictive: bool = True,
    ) -> None:
        super().__init__(name=name, dtype=dtype)
        self.num_classes = _check_positive_int(num_classes, "num_classes")
        self.from_logits = bool(from_logits)
        self.ignore_label = _check_ignore_label(ignore_label)
        self.num_samples = _check_positive_int(num_samples, "num_samples")
        self.seed = _check_seed(seed)
        self.predictive = bool(predictive)
        self.head = None
        if head is not None:
            if not self.predictive:
                raise ValueError(
                    "`head` was given with predictive=False; predictive=False scores the first "
                    "num_classes channels of y_pred and takes no head."
                )
            self.bind_head(head)

    def bind_head(self, head: Any) -> bool:
        """Score the predictive distribution of `head` from now on (a weightless copy of it is
        kept). Does nothing, and returns False, if the metric already has a head or was built
        with `predictive=False`; returns True when bound."""
        if self.head is not None or not self.predictive:
            return False
        head = _metric_head(head)
        if head.num_classes != self.num_classes:
            raise ValueError(
                f"`head` has num_classes={head.num_classes} but the metric was built with "
                f"num_classes={self.num_classes}."
            )
        self.head = head
        return True

    @property
    def _scores_are_logits(self) -> bool:
        return self.from_logits and self.head is None

    def _class_scores(self, y_pred: tf.Tensor) -> tf.Tensor:
        """`[..., C]`: predictive probabilities of the head, or the first C channels."""
        if self.head is None:
            return y_pred[..., : self.num_classes]
        return self.head.mean_probabilities(y_pred, num_samples=self.num_samples, seed=self.seed)

    def _prepare(
        self, y_true: Any, y_pred: Any, sample_weight: Any
    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """Returns (labels [n] int32, class scores [n, C] float32, weights [n] float64)."""
        c = self.num_classes
        y_pred = tf.convert_to_tensor(y_pred)
        y_true = tf.convert_to_tensor(y_true)
        if y_pred.shape.rank is not None:
            if self.head is not None and (
                y_pred.shape.rank != 4
                or (y_pred.shape[-1] is not None and y_pred.shape[-1] != self.head.params_size)
            ):
                raise ValueError(
                    f"`y_pred` must hold the packed parameters of the metric's "
                    f"{type(self.head).__name__} head, [B,H,W,{self.head.params_size}]; got "
                    f"shape {tuple(y_pred.shape)}."
                )
            if y_pred.shape.rank < 1 or (
                y_pred.shape[-1] is not None and y_pred.shape[-1] < c
            ):
                raise ValueError(
                    f"`y_pred` must have at least num_classes={c} channels in its last axis "
                    f"([B,H,W,P], P >= C; the first C channels are used); got shape "
                    f"{tuple(y_pred.shape)}."
                )
            if y_true.shape.rank == y_pred.shape.rank and y_true.shape[-1] == 1:
                y_true = tf.squeeze(y_true, axis=-1)
            if y_true.shape.rank is not None and not y_true.shape.is_compatible_with(
                y_pred.shape[:-1]
            ):
                raise ValueError(
                    f"`y_true` must have shape y_pred.shape[:-1] = {tuple(y_pred.shape[:-1])} "
                    f"(integer labels [B,H,W]); got {tuple(y_true.shape)}."
                )
        if y_true.dtype.is_floating:
            y_true = tf.round(y_true)
        labels = tf.reshape(tf.cast(y_true, tf.int32), [-1])
        scores = tf.reshape(tf.cast(self._class_scores(y_pred), tf.float32), [-1, c])
        weights = tf.ones_like(labels, dtype=tf.float64)
        if sample_weight is not None:
            sw = tf.cast(tf.convert_to_tensor(sample_weight), tf.float64)
            target_rank = y_true.shape.rank
            if sw.shape.rank is not None and target_rank is not None:
                if sw.shape.rank == target_rank + 1 and sw.shape[-1] == 1:
                    sw = tf.squeeze(sw, axis=-1)
                for _ in range(target_rank - sw.shape.rank):
                    sw = sw[..., None]
            weights = tf.reshape(tf.broadcast_to(sw, tf.shape(y_true)), [-1])
        if self.ignore_label is not None:
            valid = tf.not_equal(labels, self.ignore_label)
            weights = tf.where(valid, weights, tf.zeros_like(weights))
            labels = tf.where(valid, labels, tf.zeros_like(labels))
        checks = [
            tf.debugging.assert_non_negative(labels, message="`y_true` has negative labels"),
            tf.debugging.assert_less(
                labels, c, message=f"`y_true` has labels >= num_classes={c}"
            ),
        ]
        with tf.control_dependencies(checks):
            labels = tf.identity(labels)
        return labels, scores, weights

    def _probs(self, scores: tf.Tensor) -> tf.Tensor:
        return tf.nn.softmax(scores, axis=-1) if self._scores_are_logits else scores

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "from_logits": self.from_logits,
                "ignore_label": self.ignore_label,
                "head": (
                    None if self.head is None else keras.saving.serialize_keras_object(self.head)
                ),
                "num_samples": self.num_samples,
                "seed": self.seed,
                "predictive": self.predictive,
            }
        )
        return config


@keras.saving.register_keras_serializable(package="tfp_seg")
class StreamingMeanIoU(_StreamingSegmentationMetric):
    """Streaming mean IoU of `argmax` predictions (accumulates a confusion matrix).

    `y_true`: integer labels `[B, H, W]` (or `[B, H, W, 1]`). `y_pred`: with a `head`, its
    packed parameters `[B, H, W, head.params_size]`; without one, `[B, H, W, P]` with
    `P >= num_classes`. `sample_weight` (broadcastable to `[B, H, W]`) weights the pixel counts;
    pixels labelled `ignore_label` get weight 0.

    What is scored: with a distribution `head` (given here, or bound by
    `tfp_seg.models.ProbabilisticSegmenter.compile`, which passes the model's head to every
    streaming metric that has none), the metric scores the Monte Carlo predictive
    probabilities `probs = head.mean_probabilities(y_pred, num_samples, seed)` =
    `E[softmax(eta)]`: the distribution that `predict_proba` returns and `report.json`
    (`tfp_seg.evaluation.evaluate_ambiguous`) scores; `from_logits` is then not used. Without
    a head (a plain Keras model, or `predictive=False`) it scores the first `num_classes`
    channels, `probs = y_pred[..., :C]`, as probabilities, or as logits with
    `from_logits=True`; on a distribution head's parameters that is the softmax of the *mean
    logits*, a different (for large logit variances, very different) distribution. Here only
    the argmax of `probs` matters (so `from_logits` does not change the result), and the
    predictive argmax can differ from the argmax of the mean logits.

    `result()` equals `mean_iou(argmax(probs), y_true, C, ignore_label)` on the concatenation of
    all batches seen since the last `reset_state()` (with the same draws: a fixed `seed`).

    Args:
      num_classes: C.
      ignore_label: label whose pixels are not counted.
      from_logits: whether the first C channels are logits (no head; no effect on the argmax).
      head: a `tfp_seg.layers.DistributionHead` (a weightless copy is kept; also its
        serialized config), or None.
      num_samples: Monte Carlo samples of `head.mean_probabilities` per batch.
      seed: None (fresh noise every batch) or an int (stateless: the same noise for equally
        shaped batches, reproducible).
      predictive: False never takes a head (`ProbabilisticSegmenter.compile` binds none) and
        scores the first C channels of `y_pred`.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_label: Optional[int] = None,
        from_logits: bool = False,
        name: str = "mean_iou",
        dtype: Any = None,
        head: Any = None,
        num_samples: int = 16,
        seed: Optional[int] = None,
        predictive: bool = True,
    ) -> None:
        super().__init__(
            num_classes, from_logits, ignore_label, name=name, dtype=dtype, head=head,
            num_samples=num_samples, seed=seed, predictive=predictive,
        )
        c = self.num_classes
        self.total_cm = self.add_variable(
            shape=(c, c), initializer="zeros", dtype="float64", name="total_confusion_matrix"
        )

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        labels, scores, weights = self._prepare(y_true, y_pred, sample_weight)
        c = self.num_classes
        pred = tf.argmax(scores, axis=-1, output_type=tf.int32)
        counts = tf.math.unsorted_segment_sum(weights, labels * c + pred, c * c)
        self.total_cm.assign_add(tf.reshape(counts, (c, c)))

    def result(self) -> tf.Tensor:
        cm = tf.convert_to_tensor(self.total_cm)
        tp = tf.linalg.diag_part(cm)
        union = tf.reduce_sum(cm, axis=0) + tf.reduce_sum(cm, axis=1) - tp
        present = union > 0
        iou = tf.where(present, tp / tf.where(present, union, tf.ones_like(union)), 0.0)
        n_present = tf.reduce_sum(tf.cast(present, tf.float64))
        value = tf.math.divide_no_nan(tf.reduce_sum(iou), n_present)
        return tf.cast(value, self.dtype)

    def confusion_matrix(self) -> np.ndarray:
        """The accumulated `[C, C]` confusion matrix (rows truth, columns prediction)."""
        return np.asarray(keras.ops.convert_to_numpy(self.total_cm))


@keras.saving.register_keras_serializable(package="tfp_seg")
class StreamingECE(_StreamingSegmentationMetric):
    """Streaming expected calibration error with `num_bins` equal-width bins.

    Accumulates per-bin pixel counts, confidence sums and accuracy sums (float64), so `result()`
    equals `expected_calibration_error(probs, labels, num_bins, "uniform", ignore_label)` on the
    concatenation of all batches, with `probs = head.mean_probabilities(y_pred, num_samples,
    seed)` given a head, else `softmax(y_pred[..., :C])` if `from_logits` else
    `y_pred[..., :C]`. Input conventions and the other arguments as in `StreamingMeanIoU`.
    Scores the predictive distribution of a distribution head when it has one (given, or bound
    by `ProbabilisticSegmenter.compile`); see "What is scored" in `StreamingMeanIoU`.
    """

    def __init__(
        self,
        num_classes: int,
        num_bins: int = 15,
        from_logits: bool = False,
        ignore_label: Optional[int] = None,
        name: str = "ece",
        dtype: Any = None,
        head: Any = None,
        num_samples: int = 16,
        seed: Optional[int] = None,
        predictive: bool = True,
    ) -> None:
        super().__init__(
            num_classes, from_logits, ignore_label, name=name, dtype=dtype, head=head,
            num_samples=num_samples, seed=seed, predictive=predictive,
        )
        self.num_bins = _check_positive_int(num_bins, "num_bins")
        shape = (self.num_bins,)
        self.bin_counts = self.add_variable(
            shape=shape, initializer="zeros", dtype="float64", name="bin_counts"
        )
        self.bin_conf_sums = self.add_variable(
            shape=shape, initializer="zeros", dtype="float64", name="bin_confidence_sums"
        )
        self.bin_acc_sums = self.add_variable(
            shape=shape, initializer="zeros", dtype="float64", name="bin_accuracy_sums"
        )

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        labels, scores, weights = self._prepare(y_true, y_pred, sample_weight)
        probs = self._probs(scores)
        conf = tf.cast(tf.reduce_max(probs, axis=-1), tf.float64)
        conf = tf.clip_by_value(conf, 0.0, 1.0)
        correct = tf.cast(
            tf.equal(tf.argmax(probs, axis=-1, output_type=tf.int32), labels), tf.float64
        )
        m = self.num_bins
        bins = tf.clip_by_value(tf.cast(tf.math.ceil(conf * m), tf.int32) - 1, 0, m - 1)
        self.bin_counts.assign_add(tf.math.unsorted_segment_sum(weights, bins, m))
        self.bin_conf_sums.assign_add(tf.math.unsorted_segment_sum(weights * conf, bins, m))
        self.bin_acc_sums.assign_add(tf.math.unsorted_segment_sum(weights * correct, bins, m))

    def result(self) -> tf.Tensor:
        gap = tf.reduce_sum(tf.abs(tf.convert_to_tensor(self.bin_acc_sums) - self.bin_conf_sums))
        value = tf.math.divide_no_nan(gap, tf.reduce_sum(self.bin_counts))
        return tf.cast(value, self.dtype)

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["num_bins"] = self.num_bins
        return config


class _StreamingMean(_StreamingSegmentationMetric):
    """Weighted running mean of a per-pixel score."""

    def __init__(
        self,
        num_classes: int,
        from_logits: bool,
        ignore_label: Optional[int],
        name: Optional[str],
        dtype: Any,
        **kwargs: Any,
    ) -> None:
        super().__init__(num_classes, from_logits, ignore_label, name=name, dtype=dtype, **kwargs)
        self.total = self.add_variable(shape=(), initializer="zeros", dtype="float64", name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", dtype="float64", name="count")

    def _per_pixel(self, labels: tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
        raise NotImplementedError

    def update_state(self, y_true: Any, y_pred: Any, sample_weight: Any = None) -> None:
        labels, scores, weights = self._prepare(y_true, y_pred, sample_weight)
        values = tf.cast(self._per_pixel(labels, scores), tf.float64)
        self.total.assign_add(tf.reduce_sum(weights * values))
        self.count.assign_add(tf.reduce_sum(weights))

    def result(self) -> tf.Tensor:
        return tf.cast(tf.math.divide_no_nan(self.total, self.count), self.dtype)


@keras.saving.register_keras_serializable(package="tfp_seg")
class StreamingNLL(_StreamingMean):
    """Streaming mean per-pixel negative log-likelihood.

    `result()` equals `negative_log_likelihood(probs, labels, ignore_label, eps)` on the
    concatenation of all batches (`probs` as in `StreamingECE`: the head's predictive
    probabilities given a head; without one and with `from_logits=True` the log-probabilities
    come from `log_softmax`, clipped below at `log(eps)`). Input conventions and the other
    arguments as in `StreamingMeanIoU`.
    Scores the predictive distribution of a distribution head when it has one (given, or bound
    by `ProbabilisticSegmenter.compile`); see "What is scored" in `StreamingMeanIoU`.
    """

    def __init__(
        self,
        num_classes: int,
        from_logits: bool = False,
        ignore_label: Optional[int] = None,
        eps: float = 1e-12,
        name: str = "nll",
        dtype: Any = None,
        head: Any = None,
        num_samples: int = 16,
        seed: Optional[int] = None,
        predictive: bool = True,
    ) -> None:
        super().__init__(
            num_classes, from_logits, ignore_label, name=name, dtype=dtype, head=head,
            num_samples=num_samples, seed=seed, predictive=predictive,
        )
        self.eps = _check_eps(eps)

    def _per_pixel(self, labels: tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
        if self._scores_are_logits:
            logp = tf.nn.log_softmax(scores, axis=-1)
        else:
            logp = tf.math.log(tf.maximum(tf.cast(scores, tf.float64), self.eps))
        picked = tf.gather(tf.cast(logp, tf.float64), labels, axis=1, batch_dims=1)
        return -tf.maximum(picked, float(np.log(self.eps)))

    def get_config(self) -> dict[str, Any]:
        config = super().get_config()
        config["eps"] = self.eps
        return config


@keras.saving.register_keras_serializable(package="tfp_seg")
class StreamingBrier(_StreamingMean):
    """Streaming mean per-pixel multi-class Brier score.

    `result()` equals `brier_score(probs, labels, ignore_label)` on the concatenation of all
    batches (`probs` as in `StreamingECE`). Input conventions and the other arguments as in
    `StreamingMeanIoU`.
    Scores the predictive distribution of a distribution head when it has one (given, or bound
    by `ProbabilisticSegmenter.compile`); see "What is scored" in `StreamingMeanIoU`.
    """

    def __init__(
        self,
        num_classes: int,
        from_logits: bool = False,
        ignore_label: Optional[int] = None,
        name: str = "brier",
        dtype: Any = None,
        head: Any = None,
        num_samples: int = 16,
        seed: Optional[int] = None,
        predictive: bool = True,
    ) -> None:
        super().__init__(
            num_classes, from_logits, ignore_label, name=name, dtype=dtype, head=head,
            num_samples=num_samples, seed=seed, predictive=predictive,
        )

    def _per_pixel(self, labels: tf.Tensor, scores: tf.Tensor) -> tf.Tensor:
        probs = tf.cast(self._probs(scores), tf.float64)
        onehot = tf.one_hot(labels, self.num_classes, dtype=tf.float64)
        return tf.reduce_sum(tf.square(probs - onehot), axis=-1)


def bind_head(metrics: Any, head: Any) -> list:
    """Give every streaming metric in `metrics` (a metric, or nested lists / tuples / dicts of
    them, as `compile(metrics=...)` takes) that has no head, and was not built with
    `predictive=False`, the distribution `head`, so that it scores the head's predictive
    probabilities. Other entries (names, other metrics) are left alone. Returns the metrics
    that were bound. `tfp_seg.models.ProbabilisticSegmenter.compile` calls it with the model's
    head."""
    bound = []
    stack = [metrics]
    while stack:
        item = stack.pop()
        if isinstance(item, _StreamingSegmentationMetric):
            if item.bind_head(head):
                bound.append(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple)):
            stack.extend(item)
    return bound
