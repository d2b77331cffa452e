"""Selective prediction: risk-coverage curves and their areas (AURC, E-AURC, AUGRC), the risk at
a coverage and the coverage at a risk, with the inputs of the two levels a segmenter is judged
at (pixels: confidence and misclassification; images: uncertainty and 1 - Dice).

Every function takes a confidence score `kappa` per item (higher = more confident; the most
confident items are accepted first) and a per-item loss `e` in `[0, 1]` (a 0/1 error, or any
bounded loss such as `1 - Dice`), both of any (the same) shape, flattened.

Ties: the curve is defined on the *distinct* confidence values. A threshold `t` accepts every
item with `kappa >= t`, so items of equal confidence are always accepted together, whatever their
order in the input; no result depends on how ties are broken.

```none
n items; distinct confidences t_1 > t_2 > ... > t_m;  A_j = {i : kappa_i >= t_j}, n_j = |A_j|
coverage           c_j = n_j / n
selective risk     r_j = (1 / n_j) sum_{i in A_j} e_i        (mean loss of the accepted items)
generalized risk   g_j = (1 / n)   sum_{i in A_j} e_i        (accepted loss among ALL items)
```

#### References

[1]: Ran El-Yaniv and Yair Wiener. On the Foundations of Noise-free Selective Classification.
     JMLR, 2010.
[2]: Yonatan Geifman, Guy Uziel and Ran El-Yaniv. Bias-Reduced Uncertainty Estimation for Deep
     Neural Classifiers. ICLR 2019. https://arxiv.org/abs/1805.08206
[3]: Jeremias Traub et al. Overcoming Common Flaws in the Evaluation of Selective
     Classification Systems. NeurIPS 2024. https://arxiv.org/abs/2407.01032
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from tfp_seg.metrics import _common
from tfp_seg.metrics._common import ArrayLike

__all__ = [
    "aurc",
    "augrc",
    "coverage_at_risk",
    "e_aurc",
    "image_confidence_risks",
    "pixel_confidence_errors",
    "risk_at_coverage",
    "risk_coverage_curve",
    "selective_scores",
]

_FORM = "any shape, the same for confidence and errors"


def _real(x: Any, name: str) -> np.ndarray:
    arr = _common.as_array(x, name)
    if not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or arr.dtype == np.bool_
    ):
        raise ValueError(f"`{name}` must be a real array ({_FORM}); got {_common.describe(arr)}.")
    if arr.size == 0:
        raise ValueError(f"`{name}` must not be empty ({_FORM}); got {_common.describe(arr)}.")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"`{name}` contains NaN or Inf values ({_common.describe(arr)}).")
    return out


def _scores(confidence: Any, errors: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated, flattened float64 (confidence [n], errors [n])."""
    kappa = _real(confidence, "confidence")
    err = _real(errors, "errors")
    if err.shape != kappa.shape:
        raise ValueError(
            f"`errors` must have the same shape as confidence {tuple(kappa.shape)}; got "
            f"{_common.describe(np.asarray(errors))}."
        )
    if err.min() < 0.0 or err.max() > 1.0:
        raise ValueError(
            f"`errors` must hold per-item losses in [0, 1]; got values in "
            f"[{err.min():.4g}, {err.max():.4g}] ({_common.describe(np.asarray(errors))})."
        )
    return kappa.reshape(-1), err.reshape(-1)


def _curve(kappa: np.ndarray, err: np.ndarray) -> dict[str, np.ndarray]:
    n = kappa.size
    order = np.argsort(-kappa, kind="stable")
    k_sorted = kappa[order]
    # Last index of each group of tied confidences: one operating point per distinct threshold.
    last = np.r_[np.flatnonzero(k_sorted[1:] != k_sorted[:-1]), n - 1]
    accepted_loss = np.cumsum(err[order])[last]
    counts = (last + 1).astype(np.int64)
    return {
        "threshold": k_sorted[last],
        "coverage": counts / n,
        "risk": accepted_loss / counts,
        "generalized_risk": accepted_loss / n,
        "count": counts,
    }


def _aurc(curve: dict[str, np.ndarray]) -> float:
    # sum_j (c_j - c_{j-1}) r_j, c_0 = 0: every item's coverage slice holds the selective risk of
    # the threshold that accepts it.
    return float(np.sum(np.diff(np.r_[0.0, curve["coverage"]]) * curve["risk"]))


def _augrc(curve: dict[str, np.ndarray]) -> float:
    c = np.r_[0.0, curve["coverage"]]
    g = np.r_[0.0, curve["generalized_risk"]]
    return float(np.sum(np.diff(c) * (g[1:] + g[:-1])) / 2.0)


def _optimal_aurc(err: np.ndarray) -> float:
    # The ranking that accepts the smallest losses first, every item with its own confidence.
    k = np.arange(1, err.size + 1, dtype=np.float64)
    return float(np.mean(np.cumsum(np.sort(err)) / k))


def risk_coverage_curve(confidence: ArrayLike, errors: ArrayLike) -> dict[str, np.ndarray]:
    """The risk-coverage curve of a confidence score, one point per distinct confidence.

    Args:
      confidence: Real scores, any shape (higher = more confident; accepted first).
      errors: Per-item losses in `[0, 1]` (0/1 errors or bounded losses), the same shape.

    Returns:
      A dict of `[m]` float64 arrays (`m` = number of distinct confidence values), ordered by
      decreasing threshold (increasing coverage; the last point has coverage 1):
        `"threshold"`: `t_j`, the accepted items are those with `confidence >= t_j`,
        `"coverage"`: `c_j = n_j / n`,
        `"risk"`: the selective risk `r_j`, the mean loss of the accepted items,
        `"generalized_risk"`: `g_j`, the accepted loss divided by all `n` items,
        `"count"`: int64 `n_j`, the number of accepted items.

    #### Mathematical Details

    ```none
    A_j = {i : kappa_i >= t_j},  n_j = |A_j|,  t_1 > ... > t_m the distinct confidences
    c_j = n_j / n,   r_j = (1 / n_j) sum_{i in A_j} e_i,   g_j = (1 / n) sum_{i in A_j} e_i
    ```
    Items with equal confidence are accepted together (one point per distinct value).
    """
    return _curve(*_scores(confidence, errors))


def aurc(confidence: ArrayLike, errors: ArrayLike) -> float:
    """Area under the risk-coverage curve (AURC) of a confidence score.

    Args:
      confidence: Real scores, any shape (higher = more confident; accepted first).
      errors: Per-item losses in `[0, 1]`, the same shape.

    Returns:
      AURC, a float in `[0, 1]` (lower is better).

    #### Mathematical Details

    The selective risk is a step function of coverage: the coverage slice `(c_{j-1}, c_j]` of
    the items first accepted at threshold `t_j` holds their risk `r_j` (`c_0 = 0`):

    ```none
    AURC = sum_j (c_j - c_{j-1}) r_j = (1 / n) sum_i r(kappa_i),
    r(t) = mean {e_l : kappa_l >= t}
    ```
    Without ties this is the mean selective risk over the `n` coverages `k / n`,
    `(1 / n) sum_k (1 / k) sum_{l <= k} e_(l)` (Geifman et al., 2019); with ties every item of a
    tie group gets the risk of the whole group.
    """
    return _aurc(_curve(*_scores(confidence, errors)))


def e_aurc(confidence: ArrayLike, errors: ArrayLike) -> float:
    """Excess AURC: AURC minus the AURC of the optimal ranking of the same losses.

    Args:
      confidence: Real scores, any shape (higher = more confident; accepted first).
      errors: Per-item losses in `[0, 1]`, the same shape.

    Returns:
      E-AURC, a float `>= 0` (0: the score ranks the items by their loss).

    #### Mathematical Details

    ```none
    E-AURC = AURC(kappa, e) - AURC*,
    AURC*  = (1 / n) sum_{k=1..n} (1 / k) sum_{l <= k} e_[l],   e_[1] <= ... <= e_[n]
    ```
    `AURC*` is the AURC of the same losses sorted ascending, each item with its own confidence
    (no ties). With ties the value stays `>= 0`: a tie group's risk is at least the optimal risk
    at every coverage in its slice. This is the finite-sample optimum (Geifman et al., 2019),
    not its large-`n` limit `r + (1 - r) log(1 - r)` for 0/1 errors with error rate `r`.
    """
    kappa, err = _scores(confidence, errors)
    return _aurc(_curve(kappa, err)) - _optimal_aurc(err)


def augrc(confidence: ArrayLike, errors: ArrayLike) -> float:
    """Area under the generalized risk-coverage curve (AUGRC, Traub et al., 2024).

    Args:
      confidence: Real scores, any shape (higher = more confident; accepted first).
      errors: Per-item losses in `[0, 1]`, the same shape.

    Returns:
      AUGRC, a float in `[0, 1/2]` (lower is better): the average risk of silent failures
      (accepted errors among all items) over all working points.

    #### Mathematical Details

    The generalized risk is linear between two thresholds (accepting part of a tie group at
    random accepts, in expectation, that part of its loss), so the area is the trapezoid rule
    from the origin `(c_0, g_0) = (0, 0)`:

    ```none
    AUGRC = sum_j (c_j - c_{j-1}) (g_j + g_{j-1}) / 2
    ```
    It equals the mean, over uniformly random orders of the tied items, of the same area with
    one point per item. For 0/1 errors with error rate `r`:
    `AUGRC = (1 - AUROC_f) r (1 - r) + r^2 / 2`, where `AUROC_f` is the AUROC of the confidence
    separating correct from failed items (ties counted 1/2).
    """
    return _augrc(_curve(*_scores(confidence, errors)))


def selective_scores(confidence: ArrayLike, errors: ArrayLike) -> dict[str, float]:
    """`{"aurc", "e_aurc", "augrc"}` of one confidence score, from a single sort.

    Args:
      confidence: Real scores, any shape (higher = more confident; accepted first).
      errors: Per-item losses in `[0, 1]`, the same shape.

    Returns:
      The values of `aurc`, `e_aurc` and `augrc` (see there) as floats.
    """
    kappa, err = _scores(confidence, errors)
    curve = _curve(kappa, err)
    area = _aurc(curve)
    return {"aurc": area, "e_aurc": area - _optimal_aurc(err), "augrc": _augrc(curve)}


def _fraction(value: Any, name: str, low_open: bool) -> float:
    """`value` as a float in `(0, 1]` (`low_open`) or `[0, 1]`, else `ValueError`."""
    interval = "(0, 1]" if low_open else "[0, 1]"
    real = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )
    inside = real and (0.0 < value <= 1.0 if low_open else 0.0 <= value <= 1.0)
    if not inside:  # also False for NaN
        raise ValueError(f"`{name}` must be a float in {interval}; got {value!r}.")
    return float(value)


def risk_at_coverage(confidence: ArrayLike, errors: ArrayLike, coverage: float) -> float:
    """Selective risk at the first operating point that covers at least `coverage`.

    Args:
      confidence: Real scores, any shape (higher = more confident; accepted first).
      errors: Per-item losses in `[0, 1]`, the same shape.
      coverage: Target coverage in `(0, 1]`.

    Returns:
      `r_j` for the largest threshold `t_j` with `c_j >= coverage` (ties are accepted together,
      so the point reached may cover more than asked).
    """
    target = _fraction(coverage, "coverage", low_open=True)
    curve = _curve(*_scores(confidence, errors))
    j = int(np.argmax(curve["coverage"] >= target - 1e-12))  # the last point has coverage 1
    return float(curve["risk"][j])


def coverage_at_risk(confidence: ArrayLike, errors: ArrayLike, risk: float) -> float:
    """The largest coverage of an operating point whose selective risk is at most `risk`.

    Args:
      confidence: Real scores, any shape (higher = more confident; accepted first).
      errors: Per-item losses in `[0, 1]`, the same shape.
      risk: Target selective risk in `[0, 1]`.

    Returns:
      `max {c_j : r_j <= risk}` over the distinct thresholds, or 0.0 if no threshold reaches the
      target (rejecting everything is the only choice).
    """
    target = _fraction(risk, "risk", low_open=False)
    curve = _curve(*_scores(confidence, errors))
    ok = curve["risk"] <= target + 1e-12
    return float(curve["coverage"][ok].max()) if ok.any() else 0.0


# ================================================================================================
# Inputs of the two levels
# ================================================================================================


def pixel_confidence_errors(
    probs: ArrayLike, labels: ArrayLike, ignore_label: Optional[int] = None
) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-level selective-prediction inputs: top-label confidence and misclassification.

    Args:
      probs: Predicted class probabilities `[..., C]` (e.g. `[B, H, W, C]`).
      labels: Integer labels with shape `probs.shape[:-1]`.
      ignore_label: Label value whose pixels are left out.

    Returns:
      `(confidence [n], errors [n])` float64 over the `n` kept pixels:
      `confidence_i = max_c p_ic`, `errors_i = 1{argmax_c p_ic != y_i}`; ready for `aurc`,
      `augrc`, `risk_coverage_curve`, ...
    """
    p = _common.check_probs(probs, "probs", "[..., C]")
    lab_arr = _common.as_array(labels, "labels")
    if lab_arr.shape != p.shape[:-1]:
        raise ValueError(
            f"`labels` must have shape probs.shape[:-1] = {tuple(p.shape[:-1])} (integer labels "
            f"[...]); got {_common.describe(lab_arr)}."
        )
    ignore_label = _common.check_ignore_label(ignore_label)
    lab = _common.check_int_labels(
        lab_arr, "labels", p.shape[-1], "[...] integer labels", ignore_label
    )
    p, lab = p.reshape(-1, p.shape[-1]), lab.reshape(-1)
    if ignore_label is not None:
        keep = lab != ignore_label
        if not keep.any():
            raise ValueError(
                f"`labels` has no valid pixels: every entry equals ignore_label={ignore_label}."
            )
        p, lab = p[keep], lab[keep]
    return p.max(axis=-1), (p.argmax(axis=-1) != lab).astype(np.float64)


def _dice_risk(pred: np.ndarray, lab: np.ndarray, keep: np.ndarray, num_classes: int) -> float:
    dice = []
    for c in range(1, num_classes):
        a, b = (pred == c) & keep, (lab == c) & keep
        total = int(a.sum()) + int(b.sum())
        if total:
            dice.append(2.0 * int((a & b).sum()) / total)
    return 1.0 - float(np.mean(dice)) if dice else 0.0


def image_confidence_risks(
    probs: ArrayLike,
    labels: ArrayLike,
    uncertainty: Optional[ArrayLike] = None,
    confidence: Optional[ArrayLike] = None,
    ignore_label: Optional[int] = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Image-level selective-prediction inputs: per-image confidence and risk `1 - Dice`.

    Args:
      probs: Predicted class probabilities `[B, *S, C]` (`S = (H, W)` or `(D, H, W)`).
      labels: Integer label maps `[B, *S]`, or `K` annotations per image `[B, K, *S]`.
      uncertainty: Optional per-pixel `[B, *S]` or per-image `[B]` uncertainty (e.g. a
        mutual-information map); default: the predictive entropy of `probs`.
      confidence: Optional per-image score `[B]` (higher = more confident), used as is;
        exclusive with `uncertainty`.
      ignore_label: Label value whose pixels are left out of Dice.

    Returns:
      `(confidence [B], risks [B])` float64, ready for `aurc`, `augrc`, ...:
      `confidence_b = -mean_pixels u_b` (or the given score), `risks_b` = `1 - Dice` of the
      predicted mask `argmax_c p` against the labels, averaged over the `K` annotations.

    #### Mathematical Details

    ```none
    u_bs = -sum_c p_bsc log p_bsc                         (default uncertainty)
    Dice_c(a, y) = 2 |a_c & y_c| / (|a_c| + |y_c|)          foreground classes c = 1..C-1
    risk_b = mean_k (1 - mean_{c : |a_c| + |y_kc| > 0} Dice_c(a_b, y_bk)),   0 if no class occurs
    ```
    As the IoU distance of the set metrics: Dice is averaged over the foreground classes
    present in the prediction or the annotation; a prediction and annotation without any
    foreground have risk 0.
    """
    p = _common.check_probs(probs, "probs", "[B, *S, C]")
    if p.ndim < 3:
        raise ValueError(
            f"`probs` must have rank >= 3 ([B, *S, C] class probabilities); got "
            f"{_common.describe(p)}."
        )
    num_images, spatial, num_classes = p.shape[0], p.shape[1:-1], p.shape[-1]
    lab_arr = _common.as_array(labels, "labels")
    if lab_arr.shape == p.shape[:-1]:
        lab_arr = lab_arr[:, None]
    if lab_arr.ndim != p.ndim or lab_arr.shape[0] != num_images or lab_arr.shape[2:] != spatial:
        raise ValueError(
            f"`labels` must have shape [B, *S] = {tuple(p.shape[:-1])} or [B, K, *S] = "
            f"{(num_images, 'K') + tuple(spatial)} (integer label maps); got "
            f"{_common.describe(lab_arr)}."
        )
    ignore_label = _common.check_ignore_label(ignore_label)
    lab = _common.check_int_labels(
        lab_arr, "labels", num_classes, "[B, K, *S] integer labels", ignore_label
    )
    if uncertainty is not None and confidence is not None:
        raise ValueError("Pass at most one of `uncertainty` and `confidence`; got both.")
    if confidence is not None:
        kappa = _real(confidence, "confidence")
        if kappa.shape != (num_images,):
            raise ValueError(
                f"`confidence` must be a per-image score [B] = ({num_images},); got "
                f"{_common.describe(kappa)}."
            )
    else:
        if uncertainty is None:
            u = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=-1)
        else:
            u = _real(uncertainty, "uncertainty")
            if u.shape not in ((num_images,), tuple(p.shape[:-1])):
                raise ValueError(
                    f"`uncertainty` must be per pixel [B, *S] = {tuple(p.shape[:-1])} or per "
                    f"image [B] = ({num_images},); got {_common.describe(u)}."
                )
        kappa = -u.reshape(num_images, -1).mean(axis=1)
    pred = p.argmax(axis=-1)
    risks = np.empty(num_images, np.float64)
    for b in range(num_images):
        per_annotation = []
        for y in lab[b]:
            keep = np.ones(y.shape, bool) if ignore_label is None else y != ignore_label
            per_annotation.append(_dice_risk(pred[b], y, keep, num_classes))
        risks[b] = np.mean(per_annotation)
    return kappa, risks
