"""Deterministic segmentation metrics of a predicted label map: confusion matrix, per-class and
mean IoU, pixel accuracy."""

from __future__ import annotations

from typing import Any, Optional, Union

import numpy as np

from tfp_seg import _checks
from tfp_seg.metrics import _common
from tfp_seg.metrics._common import ArrayLike

__all__ = ["confusion_matrix", "mean_iou", "per_class_iou", "pixel_accuracy"]


def _pred_and_labels(
    pred: Any, labels: Any, num_classes: Optional[int], ignore_label: Optional[int]
) -> tuple[np.ndarray, np.ndarray]:
    pred_arr = _common.check_int_labels(pred, "pred", num_classes, "[...] predicted labels")
    lab_arr = _common.as_array(labels, "labels")
    if lab_arr.shape != pred_arr.shape:
        raise ValueError(
            f"`labels` must have the same shape as pred {tuple(pred_arr.shape)}; got "
            f"{_common.describe(lab_arr)}."
        )
    lab = _common.check_int_labels(lab_arr, "labels", num_classes, "[...] labels", ignore_label)
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
    num_classes = _checks.positive_int(num_classes, "num_classes")
    p, lab = _pred_and_labels(pred, labels, num_classes, _common.check_ignore_label(ignore_label))
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
    cm = _common.as_array(confusion, "confusion").astype(np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1] or cm.size == 0:
        raise ValueError(f"`confusion` must be a square [C, C] matrix; got {_common.describe(cm)}.")
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


def pixel_accuracy(pred: ArrayLike, labels: ArrayLike, ignore_label: Optional[int] = None) -> float:
    """Fraction of (non-ignored) pixels whose predicted label equals the true label.

    Args:
      pred: Integer predicted labels `[...]`.
      labels: Integer true labels, same shape.
      ignore_label: Label value whose pixels are excluded.

    Returns:
      Pixel accuracy, a float in `[0, 1]`.
    """
    p, lab = _pred_and_labels(pred, labels, None, _common.check_ignore_label(ignore_label))
    return float(np.mean(p == lab))
