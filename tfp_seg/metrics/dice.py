"""Dice scores of predicted label maps, per class and per region (a union of classes, e.g. the
BraTS tumour regions), per image or volume and averaged over a batch.

Label maps are `[B, *S]`: axis 0 indexes the images (or volumes, cases) and every other axis is
spatial, `S = (H, W)` or `(D, H, W)`, or any other shape; the Dice of one item is taken over
all of its pixels (voxels), so the same call serves images and volumes and needs no
`spatial_dims`. A single image or volume is passed with a leading axis of size 1
(`labels[None]`): a `[D, H, W]` volume passed as is would be read as `D` images.

```none
region r = a set of class ids R_r                     (after the data's label mapping)
A_br = {v : pred_b(v) in R_r, v valid},  T_br = {v : true_b(v) in R_r, v valid}
Dice_br = 2 |A_br & T_br| / (|A_br| + |T_br|)         if |A_br| + |T_br| > 0
        = empty  (default 1.0)                         if both are empty
Dice_r  = (1 / B) sum_b Dice_br                        (nanmean when empty = nan)
```

Both empty: a prediction that correctly finds no voxel of the region scores `empty = 1.0`, the
convention of the BraTS challenge's evaluation (a case without enhancing tumour and a
prediction without it is a perfect prediction of that region). `empty=float("nan")` instead
leaves such images out of the batch mean (the mean is over the images where the region occurs
in the prediction or the truth; nan if it occurs in none).

BraTS regions (`BRATS_REGIONS`), over the class ids of the usual mapping of the raw labels
(0 background, 1 necrotic / non-enhancing core, 2 oedema, 3 enhancing tumour; the raw label 4
of BraTS 2017-2020 mapped to 3): whole tumour `{1, 2, 3}`, tumour core `{1, 3}`, enhancing
tumour `{3}`. For another mapping, pass the regions over its class ids.

#### References

[1]: Bjoern Menze et al. The Multimodal Brain Tumor Image Segmentation Benchmark (BRATS).
     IEEE Transactions on Medical Imaging, 2015.
[2]: Miguel Monteiro et al. Stochastic Segmentation Networks. NeurIPS 2020 (the BraTS table).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from tfp_seg import _checks
from tfp_seg.metrics import _common
from tfp_seg.metrics._common import ArrayLike

__all__ = ["BRATS_REGIONS", "per_class_dice", "region_dice"]

BRATS_REGIONS: Mapping[str, tuple[int, ...]] = {
    "whole_tumour": (1, 2, 3),
    "tumour_core": (1, 3),
    "enhancing": (3,),
}
"""The BraTS evaluation regions over class ids (0 background, 1 necrotic / non-enhancing
core, 2 oedema, 3 enhancing tumour): whole tumour, tumour core, enhancing tumour."""

_FORM = "[B, *S] integer label maps, axis 0 = images / volumes"


def _check_empty(empty: Any) -> float:
    real = isinstance(empty, (int, float, np.integer, np.floating)) and not isinstance(
        empty, (bool, np.bool_)
    )
    if not real or not (math.isnan(empty) or 0.0 <= empty <= 1.0):
        raise ValueError(
            f"`empty` (the Dice of an image where the region is empty in both maps) must be a "
            f"float in [0, 1] or nan; got {empty!r}."
        )
    return float(empty)


def _check_regions(regions: Any, num_classes: Optional[int]) -> dict[str, tuple[int, ...]]:
    form = "a dict {name: class ids}, e.g. {'whole_tumour': (1, 2, 3)}"
    if not isinstance(regions, Mapping) or not regions:
        raise ValueError(f"`regions` must be a non-empty {form}; got {regions!r}.")
    out = {}
    for name, ids in regions.items():
        if isinstance(ids, (int, np.integer)) and not isinstance(ids, (bool, np.bool_)):
            ids = (ids,)
        ok = isinstance(ids, Sequence) and not isinstance(ids, str) and len(ids) > 0
        ok = ok and all(
            isinstance(i, (int, np.integer)) and not isinstance(i, (bool, np.bool_)) and i >= 0
            for i in ids
        )
        if ok and num_classes is not None:
            ok = all(i < num_classes for i in ids)
        if not ok:
            bound = "" if num_classes is None else f" < num_classes={num_classes}"
            raise ValueError(
                f"`regions[{name!r}]` must be a non-empty tuple of class ids >= 0{bound} "
                f"({form}); got {ids!r}."
            )
        out[str(name)] = tuple(sorted({int(i) for i in ids}))
    return out


def _label_pair(
    labels_pred: Any, labels_true: Any, num_classes: Optional[int], ignore_label: Optional[int]
) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]:
    """(pred [B, P], true [B, P], valid [B, P] or None), checked."""
    pred = _common.check_int_labels(labels_pred, "labels_pred", num_classes, _FORM)
    true = _common.check_int_labels(labels_true, "labels_true", num_classes, _FORM, ignore_label)
    if pred.ndim < 2:
        raise ValueError(
            f"`labels_pred` must have rank >= 2 ({_FORM}; one map: labels[None]); got "
            f"{_common.describe(pred)}."
        )
    if true.shape != pred.shape:
        raise ValueError(
            f"`labels_true` must have the shape of labels_pred {tuple(pred.shape)} ({_FORM}); "
            f"got {_common.describe(true)}."
        )
    batch = pred.shape[0]
    pred, true = pred.reshape(batch, -1), true.reshape(batch, -1)
    valid = None if ignore_label is None else true != ignore_label
    return pred, true, valid


def _dice_table(
    pred: np.ndarray,
    true: np.ndarray,
    valid: Optional[np.ndarray],
    groups: Sequence[tuple[int, ...]],
    empty: float,
) -> np.ndarray:
    """`[B, R]`: the Dice of every image (row of pred / true `[B, P]`) and group of ids."""
    table = np.empty((pred.shape[0], len(groups)))
    for r, ids in enumerate(groups):
        a, t = np.isin(pred, ids), np.isin(true, ids)
        if valid is not None:
            a, t = a & valid, t & valid
        inter = np.count_nonzero(a & t, axis=1)
        total = np.count_nonzero(a, axis=1) + np.count_nonzero(t, axis=1)
        table[:, r] = np.where(total > 0, 2.0 * inter / np.maximum(total, 1), empty)
    return table


def _batch_mean(table: np.ndarray) -> np.ndarray:
    """Mean over axis 0 ignoring nan (nan where a column is all nan), without warnings."""
    present = ~np.isnan(table)
    count = present.sum(axis=0)
    total = np.where(present, table, 0.0).sum(axis=0)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def region_dice(
    labels_pred: ArrayLike,
    labels_true: ArrayLike,
    regions: Optional[Mapping[str, Sequence[int]]] = None,
    ignore_label: Optional[int] = None,
    num_classes: Optional[int] = None,
    empty: float = 1.0,
    per_image: bool = False,
) -> Union[dict[str, float], dict[str, np.ndarray]]:
    """Dice of every region (a union of classes) per image or volume, averaged over the batch.

    Args:
      labels_pred: Integer predicted label maps `[B, *S]` (e.g. `[B, H, W]` or
        `[B, D, H, W]`; axis 0 indexes the images or volumes, see the module docstring).
      labels_true: Integer true label maps, the same shape.
      regions: `{name: class ids}`; default `BRATS_REGIONS` = `{"whole_tumour": (1, 2, 3),
        "tumour_core": (1, 3), "enhancing": (3,)}`, over the class ids after the data's label
        mapping.
      ignore_label: Label of unlabelled voxels in `labels_true`; they are left out of both
        maps.
      num_classes: Optional `C`: labels must then lie in `[0, C)` (or be `ignore_label`) and
        region ids below `C`.
      empty: The Dice of an image where the region is empty in both maps: 1.0 (default, the
        BraTS convention) or nan (such images are left out of the mean).
      per_image: Return the `[B]` Dice of every image instead of the batch mean.

    Returns:
      `{name: Dice}`: floats (batch means) or float64 `[B]` arrays (`per_image`).

    #### Mathematical Details

    ```none
    Dice_br = 2 |A_br & T_br| / (|A_br| + |T_br|),   A_br = {pred_b in R_r},  T_br = {true_b in R_r}
    ```
    over the valid voxels of image `b`; `empty` when `|A_br| + |T_br| = 0`.

    A known answer, one image of four voxels (`B = 1`, `S = (1, 4)`):

    ```none
    pred = [[[0, 1, 2, 3]]],  true = [[[0, 1, 1, 2]]]
    whole_tumour {1,2,3}: A = T = voxels 1..3           Dice = 2*3 / (3 + 3) = 1
    tumour_core  {1,3}:   A = {1, 3}, T = {1, 2}         Dice = 2*1 / (2 + 2) = 0.5
    enhancing    {3}:     A = {3},    T = {}             Dice = 0
    ```
    """
    num_classes = _checks.positive_int(num_classes, "num_classes", optional=True)
    regions = _check_regions(BRATS_REGIONS if regions is None else regions, num_classes)
    empty = _check_empty(empty)
    ignore_label = _common.check_ignore_label(ignore_label)
    pred, true, valid = _label_pair(labels_pred, labels_true, num_classes, ignore_label)
    table = _dice_table(pred, true, valid, list(regions.values()), empty)
    if per_image:
        return {name: table[:, r] for r, name in enumerate(regions)}
    means = _batch_mean(table)
    return {name: float(means[r]) for r, name in enumerate(regions)}


def per_class_dice(
    labels_pred: ArrayLike,
    labels_true: ArrayLike,
    num_classes: int,
    ignore_label: Optional[int] = None,
    empty: float = 1.0,
    per_image: bool = False,
) -> np.ndarray:
    """Dice of every class `0..C-1` per image or volume, averaged over the batch.

    The regions of `region_dice` with one class each, background (class 0) included; the same
    inputs, validity and empty-class convention (`empty`, default 1.0).

    Args:
      labels_pred: Integer predicted label maps `[B, *S]`, in `[0, C)`.
      labels_true: Integer true label maps, the same shape, in `[0, C)` or `ignore_label`.
      num_classes: `C`.
      ignore_label: Label of unlabelled voxels in `labels_true`.
      empty: The Dice of a class absent from both maps of an image: 1.0 or nan.
      per_image: Return `[B, C]` instead of the batch mean.

    Returns:
      float64 `[C]` (batch means; nan for a class with `empty=nan` absent from every image)
      or `[B, C]` (`per_image`).
    """
    num_classes = _checks.positive_int(num_classes, "num_classes")
    empty = _check_empty(empty)
    ignore_label = _common.check_ignore_label(ignore_label)
    pred, true, valid = _label_pair(labels_pred, labels_true, num_classes, ignore_label)
    table = _dice_table(pred, true, valid, [(c,) for c in range(num_classes)], empty)
    return table if per_image else _batch_mean(table)
