"""Dice in run reports: per class and, where the data name regions, per region, of the
predictive arg max against every annotation, for images and volumes alike.

```none
p_bar_b      = (1/N) sum_n softmax(eta_b^n)      the mean of N logit samples of image b
pred_b       = argmax_c p_bar_b[..., c]           [*S], the prediction
Dice_bkc     = 2 |{pred_b = c} & {y_bk = c}| / (|{pred_b = c}| + |{y_bk = c}|)
             = 1 where class c is in neither map (the BraTS convention)
dice_class_c = (1 / (B K)) sum_b sum_k Dice_bkc   averaged over images and annotations
```

`dice_report` adds `dice_class_<c>` for every class `c = 0..C-1` (background included) and
`class_names` (the classes' names, for the report's table); on the built-in benchmark
(`AmbiguousShapes`) also `oracle_dice_class_<c>`, the same Dice of the arg max of the exact
per-pixel marginals. The logit samples of batch `k` (`batch_size` images) are drawn with the
Sampler's seed of its own batch `k` (`seed`, then `fold_seed(seed, k)`), so the values equal
`tfp_seg.metrics.per_class_dice` of the arg max of `mean_probabilities(sampler, images, N,
seed)` against the annotations, which `tfp-seg sample` saves.

Regions (unions of classes) come from the data: `dice_regions(data)` is the data set's
`dice_regions` attribute (`tfp_seg.runs.volumes.VolumeSet` of BraTS labels sets it to
`tfp_seg.metrics.BRATS_REGIONS`: whole tumour {1, 2, 3}, tumour core {1, 3}, enhancing {3}).
`dice_report` then adds `dice_<region>`, the same average over images and annotations of the
region's Dice (`tfp_seg.metrics.region_dice(..., per_image=True)`: 1 where the region is in
neither map), from the same prediction as the per-class values.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from tfp_seg import _checks, _seeds, metrics
from tfp_seg.data import AmbiguousShapes
from tfp_seg.evaluation import softmax

__all__ = [
    "CLASS_PREFIX",
    "DICE_BATCH",
    "VOLUME_BATCH",
    "batch_size_for",
    "class_names",
    "dice_regions",
    "dice_report",
    "mean_probabilities",
]

CLASS_PREFIX = "dice_class_"
"""The report keys of the per-class Dice: `dice_class_0`, `dice_class_1`, ..."""
DICE_BATCH = 16
"""Images per `sample_logits` call; the seeds follow the batches."""
VOLUME_BATCH = 1
"""Volumes per `sample_logits` call (`batch_size_for`): the samples `[N, 1, D, H, W, C]` of one
volume at a time (BraTS, 155 x 240 x 240 x 4 classes: 143 MB per float32 sample)."""
_BUILTIN_NAMES = ("background", "class A", "class B")


def batch_size_for(images, batch_size: Optional[int] = None) -> int:
    """`batch_size` checked, or by default `VOLUME_BATCH` for volumes `[B, D, H, W, ch]` and
    `DICE_BATCH` for images `[B, H, W, ch]`."""
    if batch_size is None:
        return VOLUME_BATCH if len(images.shape) == 5 else DICE_BATCH
    return _checks.positive_int(batch_size, "batch_size")


def _batches(sampler, images, num_samples: int, seed: Any, batch_size: int):
    """Yield `(start, mean probabilities [b, *S, C])` batch by batch."""
    for index, start in enumerate(range(0, images.shape[0], batch_size)):
        xb = np.asarray(images[start : start + batch_size])
        logits = np.asarray(
            sampler.sample_logits(
                xb, num_samples, seed=_seeds.batch_seed(seed, index), batch_size=batch_size
            ),
            np.float32,
        )
        expected = (num_samples,) + tuple(xb.shape[:-1])
        if logits.shape[:-1] != expected:
            raise ValueError(
                f"`sampler.sample_logits` must return [N, B, *S, C] = {expected + ('C',)} "
                f"logits for images {tuple(xb.shape)}; got {logits.shape}."
            )
        yield start, softmax(logits).mean(axis=0)


def mean_probabilities(
    sampler, images, num_samples: int, seed: Any = 0, batch_size: Optional[int] = None
) -> np.ndarray:
    """The mean softmax of `num_samples` logit samples, float32 `[B, *S, C]`, for images
    `[B, *S, channels]` (`S = (H, W)` or `(D, H, W)`): the probabilities whose arg max
    `dice_report` scores (the same draws for the same `seed` and `batch_size`, default
    `batch_size_for(images)`)."""
    num_samples = _checks.positive_int(num_samples, "num_samples")
    batch_size = batch_size_for(images, batch_size)
    parts = [p for _, p in _batches(sampler, images, num_samples, seed, batch_size)]
    return np.concatenate(parts, axis=0).astype(np.float32)


def class_names(data: Any, num_classes: int) -> list:
    """The names of the classes: the data's `class_names`, the built-in benchmark's
    (background, class A, class B), else `class <c>` (class 0: background)."""
    names = getattr(data, "class_names", None)
    if names is not None and len(names) == num_classes:
        return [str(n) for n in names]
    if isinstance(data, AmbiguousShapes) and num_classes == len(_BUILTIN_NAMES):
        return list(_BUILTIN_NAMES)
    return ["background"] + [f"class {c}" for c in range(1, num_classes)]


def dice_regions(data: Any) -> Optional[Mapping[str, Sequence[int]]]:
    """The regions (`{name: class ids}`) the data set names for its Dice (`dice_regions`
    attribute, e.g. `tfp_seg.metrics.BRATS_REGIONS`), or None: per class only."""
    regions = getattr(data, "dice_regions", None)
    return dict(regions) if regions else None


def _pairs(pred: np.ndarray, annotations: np.ndarray) -> tuple:
    """`(pred_k, annotations_k)` `[B K, *S]`: every prediction against each of its K maps."""
    b, k = annotations.shape[:2]
    pred_k = np.repeat(pred[:, None], k, axis=1).reshape((b * k,) + pred.shape[1:])
    return pred_k, np.asarray(annotations).reshape((b * k,) + pred.shape[1:])


def _class_sums(pred: np.ndarray, annotations: np.ndarray, num_classes: int, ignore) -> tuple:
    """Sum over images and annotations of the per-class Dice, and the number of pairs."""
    pred_k, ann_k = _pairs(pred, annotations)
    table = metrics.per_class_dice(pred_k, ann_k, num_classes, ignore_label=ignore, per_image=True)
    return table.sum(axis=0), pred_k.shape[0]


def _region_sums(pred, annotations, regions: Mapping, num_classes: int, ignore) -> np.ndarray:
    """Sum over images and annotations of the Dice of every region, `[len(regions)]`."""
    pred_k, ann_k = _pairs(pred, annotations)
    dice = metrics.region_dice(
        pred_k, ann_k, regions, ignore_label=ignore, num_classes=num_classes, per_image=True
    )
    return np.array([dice[name].sum() for name in regions])


def dice_report(
    sampler,
    data,
    num_samples: int,
    seed: Any = 0,
    batch_size: Optional[int] = None,
) -> dict:
    """The Dice keys of a run's report (module docstring) for `sampler` on `data`.

    Args:
      sampler: anything with `sample_logits(x, num_samples, seed=, batch_size=)` returning
        `[N, B, *S, C]`.
      data: `images [B, *S, channels]`, `annotations [B, K, *S]`, `num_classes`
        (`AmbiguousShapes`, `AnnotatedImages`; images or volumes); `ignore_label` if it has
        one (those voxels are left out).
      num_samples: N, the logit samples averaged into the prediction (the evaluation's).
      seed: the sampling seed (the evaluation's).
      batch_size: images per `sample_logits` call (default `batch_size_for(data.images)`).

    Returns:
      `{"dice_class_<c>": float, ..., "class_names": [C names]}`, with `oracle_dice_class_<c>`
      for `AmbiguousShapes` and `dice_<region>` for the data's `dice_regions`.
    """
    num_samples = _checks.positive_int(num_samples, "num_samples")
    images, annotations = data.images, data.annotations
    batch_size = batch_size_for(images, batch_size)
    if images.ndim not in (4, 5) or annotations.ndim != images.ndim:
        raise ValueError(
            "`data` must have images [B, *S, channels] and annotations [B, K, *S] with S = "
            f"(H, W) or (D, H, W); got images {images.shape}, annotations {annotations.shape}."
        )
    num_classes = int(data.num_classes)
    ignore = getattr(data, "ignore_label", None)
    exact = isinstance(data, AmbiguousShapes)
    regions = dice_regions(data) or {}
    totals = {"model": np.zeros(num_classes), "oracle": np.zeros(num_classes)}
    totals["regions"] = np.zeros(len(regions))
    pairs = 0
    for start, probs in _batches(sampler, images, num_samples, seed, batch_size):
        stop = start + probs.shape[0]
        ann = np.asarray(annotations[start:stop])
        pred = probs.argmax(axis=-1)
        sums, count = _class_sums(pred, ann, num_classes, ignore)
        totals["model"] += sums
        pairs += count
        if regions:
            totals["regions"] += _region_sums(pred, ann, regions, num_classes, ignore)
        if exact:
            oracle = data[start:stop].marginals().argmax(axis=-1)
            totals["oracle"] += _class_sums(oracle, ann, num_classes, ignore)[0]
    report = {f"{CLASS_PREFIX}{c}": float(totals["model"][c] / pairs) for c in range(num_classes)}
    if exact:
        for c in range(num_classes):
            report[f"oracle_{CLASS_PREFIX}{c}"] = float(totals["oracle"][c] / pairs)
    for name, total in zip(regions, totals["regions"], strict=True):
        report[f"dice_{name}"] = float(total / pairs)
    report["class_names"] = class_names(data, num_classes)
    return report
