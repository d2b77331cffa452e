"""Out-of-distribution detection scores of an uncertainty measure (AUROC, AUPR, FPR95)."""

from __future__ import annotations

import numpy as np
import scipy.stats

from tfp_seg.metrics import _common
from tfp_seg.metrics._common import ArrayLike

__all__ = ["ood_scores"]


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
    u = _common.as_array(uncertainty, "uncertainty")
    if not (np.issubdtype(u.dtype, np.floating) or np.issubdtype(u.dtype, np.integer)):
        raise ValueError(f"`uncertainty` must be a real array; got {_common.describe(u)}.")
    if u.size == 0:
        raise ValueError(f"`uncertainty` must not be empty; got {_common.describe(u)}.")
    u = u.astype(np.float64)
    if not np.all(np.isfinite(u)):
        raise ValueError(f"`uncertainty` contains NaN or Inf values ({_common.describe(u)}).")
    y = _common.as_array(is_ood, "is_ood")
    if y.shape != u.shape:
        raise ValueError(
            f"`is_ood` must have the same shape as uncertainty {tuple(u.shape)}; "
            f"got {_common.describe(y)}."
        )
    if not _common.is_integer_dtype(y) or np.any((y != 0) & (y != 1)):
        raise ValueError(f"`is_ood` must be boolean (or 0/1 integers); got {_common.describe(y)}.")
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
