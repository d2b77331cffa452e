"""Random patches of volumes for training on patches, as the official SSN sampler draws them,
streamed through `tf.data` (`NiftiVolumes.to_patch_dataset`).

Patch `k` of a stream of seed `s` is drawn by its own generator, `np.random.default_rng([s,
k])`, so any patch can be recomputed alone (`patch_centres`) and the stream is the same for a
seed whatever the batching or threading:

1. a case, uniformly;
2. with probability `foreground_fraction`, a class uniformly among the foreground classes
   `1..C-1` present in the case's brain mask, and the centre uniformly among the brain voxels
   of that class; otherwise (and for a case without foreground) the centre uniformly among the
   brain voxels.

This is the official `ConditionalPatchSampler` with equal probabilities for the present
foreground classes, and its uniform brain sampler for the rest: every centre is inside the
brain, and a share `f + (1 - f) q` of the centres is foreground, `q` the foreground fraction of
the brain voxels of the chosen cases. (The official BraTS config uses its
`ForegroundBackgroundPatchSampler`, whose non-foreground draws avoid tumour voxels and whose
foreground draws are voxel-proportional.)

A patch of size `(d, h, w)` covers `[c - d//2, c - d//2 + d)` (likewise in `h`, `w`) around
its centre `c`: the centre voxel sits at patch index `(d//2, h//2, w//2)`. Where it leaves the
volume it is zero-padded: images 0, `roi_mask` 0, labels 0 (the official code pads labels
and masks with 0 but images with their edge values). Memory: one batch of patches (and one
prefetched); the volumes are read from their memory maps.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from tfp_seg import _checks
from tfp_seg.data._dataset import STREAM_PARALLEL_BATCHES, STREAM_PREFETCH

__all__ = ["extract_patch", "patch_centres", "patch_dataset", "read_patches"]


def _patch_size(patch_size: Any) -> tuple:
    size = tuple(patch_size) if isinstance(patch_size, (tuple, list, np.ndarray)) else ()
    message = "`patch_size` must be 3 positive ints (d, h, w); got {value}."
    if len(size) != 3:
        raise ValueError(message.format(value=repr(patch_size)))
    return tuple(_checks.positive_int(s, "patch_size", message=message) for s in size)


def _fraction(foreground_fraction: Any) -> float:
    if isinstance(foreground_fraction, (bool, np.bool_)) or not isinstance(
        foreground_fraction, (int, float, np.integer, np.floating)
    ):
        raise ValueError(
            f"`foreground_fraction` must be a number in [0, 1]; got {foreground_fraction!r}."
        )
    if not 0.0 <= float(foreground_fraction) <= 1.0:
        raise ValueError(
            f"`foreground_fraction` must be a number in [0, 1]; got {foreground_fraction!r}."
        )
    return float(foreground_fraction)


def _seed(seed: Any) -> int:
    return _checks.positive_int(seed, "seed", minimum=0)


def _check_labelled(volumes) -> None:
    if not len(volumes):
        raise ValueError("`volumes` holds no cases to draw patches from.")
    unlabelled = [c.case_id for c in volumes.cases if not c.has_label]
    if unlabelled:
        raise ValueError(
            f"patches for training need labels; cases without a label file: {unlabelled[:5]}"
            + (" ..." if len(unlabelled) > 5 else "")
        )


def patch_centres(
    volumes, indices: Sequence[int], seed: int = 0, foreground_fraction: float = 0.5
) -> tuple:
    """`(cases int64 [n], centres int64 [n, 3])`: the case and centre voxel `(d, h, w)` of the
    patches `indices` of the stream of `seed` (see the module docstring). `volumes` is a
    `NiftiVolumes` whose cases all have labels."""
    seed, fraction = _seed(seed), _fraction(foreground_fraction)
    _check_labelled(volumes)
    indices = np.asarray(indices, np.int64).reshape(-1)
    cases = np.empty(indices.size, np.int64)
    centres = np.empty((indices.size, 3), np.int64)
    for j, k in enumerate(indices):
        rng = np.random.default_rng([seed, int(k)])
        i = int(rng.integers(len(volumes)))
        case = volumes.cases[i]
        counts = np.asarray(case.class_counts, np.int64)
        present = np.flatnonzero(counts[1:]) + 1
        foreground = rng.random() < fraction and present.size > 0
        maps = volumes.arrays(i)
        if foreground:
            c = int(rng.choice(present))
            offset = int(counts[1:c].sum())
            flat = maps["class_index"][offset + int(rng.integers(counts[c]))]
        else:
            flat = maps["brain_index"][int(rng.integers(case.num_brain))]
        cases[j] = i
        centres[j] = np.unravel_index(int(flat), case.shape)
    return cases, centres


def extract_patch(array: np.ndarray, centre: Sequence[int], patch_size: Sequence[int]):
    """The patch `[d, h, w, *rest]` of `array [D, H, W, *rest]` around `centre` (`[c - s//2,
    c - s//2 + s)` in every axis), zero where it leaves the array; reads only the overlap."""
    size = _patch_size(patch_size)
    out = np.zeros(size + tuple(array.shape[3:]), array.dtype)
    src, dst = [], []
    for c, s, n in zip(centre, size, array.shape[:3], strict=True):
        start = int(c) - s // 2
        lo, hi = max(start, 0), min(start + s, n)
        if hi <= lo:
            return out
        src.append(slice(lo, hi))
        dst.append(slice(lo - start, hi - start))
    out[tuple(dst)] = array[tuple(src)]
    return out


def read_patches(
    volumes,
    indices: Sequence[int],
    patch_size: Sequence[int],
    seed: int = 0,
    foreground_fraction: float = 0.5,
) -> tuple:
    """`(images float32 [n, d, h, w, M], roi_mask float32 [n, d, h, w], labels int32 [n, d,
    h, w])` of the patches `indices` of the stream of `seed`: `roi_mask` is the brain mask
    (1 inside), all three zero-padded outside the volume."""
    size = _patch_size(patch_size)
    cases, centres = patch_centres(volumes, indices, seed, foreground_fraction)
    n, m = cases.size, len(volumes.modalities)
    images = np.empty((n, *size, m), np.float32)
    roi = np.empty((n, *size), np.float32)
    labels = np.empty((n, *size), np.int32)
    for j, (i, centre) in enumerate(zip(cases, centres, strict=True)):
        maps = volumes.arrays(int(i))
        images[j] = extract_patch(maps["image"], centre, size)
        roi[j] = extract_patch(maps["brain"], centre, size)
        labels[j] = extract_patch(maps["label"], centre, size)
    return images, roi, labels


def patch_dataset(
    volumes,
    patch_size: Sequence[int],
    batch_size: int = 8,
    seed: int = 0,
    foreground_fraction: float = 0.5,
    num_patches: Optional[int] = None,
    drop_remainder: bool = False,
):
    """A `tf.data.Dataset` of random patches of `volumes` (a `NiftiVolumes`; see the module
    docstring) in the form the library's models take with a region of interest:

    ```none
    ({"images": float32 [B, d, h, w, M], "roi_mask": float32 [B, d, h, w]},
     labels int32 [B, d, h, w])
    ```

    `model.fit(dataset, steps_per_epoch=...)` trains an SSN head (`LowRankLogits`) with the
    brain mask as its `roi_mask`. `num_patches=None` streams without end (patches `0, 1, 2,
    ...` of the seed; every new iterator starts again at patch 0, and `fit` with
    `steps_per_epoch` keeps one iterator over its epochs, so each epoch gets new patches);
    `num_patches=n` is a finite set, the same `n` patches at every iteration (a fixed
    validation set). Deterministic for a seed:
    patch `k` depends on `(seed, k)` only. Each batch is read by one `tf.numpy_function` call
    from the memory maps (one call in flight, one batch prefetched).

    Raises:
      ValueError: a bad `patch_size` (3 positive ints), `batch_size`, `seed` (an int >= 0),
        `foreground_fraction` (in [0, 1]) or `num_patches`, or cases without labels (named).
    """
    size = _patch_size(patch_size)
    batch_size = _checks.positive_int(batch_size, "batch_size")
    seed, fraction = _seed(seed), _fraction(foreground_fraction)
    num_patches = _checks.positive_int(num_patches, "num_patches", optional=True)
    _check_labelled(volumes)
    import tensorflow as tf

    channels = len(volumes.modalities)
    fixed = drop_remainder or num_patches is None or num_patches % batch_size == 0
    batch = batch_size if fixed else None

    def read(indices):
        return read_patches(volumes, indices, size, seed, fraction)

    def fetch(indices):
        out = tf.numpy_function(read, [indices], (tf.float32, tf.float32, tf.int32), stateful=False)
        images, roi, labels = out
        images.set_shape((batch, *size, channels))
        roi.set_shape((batch, *size))
        labels.set_shape((batch, *size))
        return {"images": images, "roi_mask": roi}, labels

    if num_patches is None:
        ds = tf.data.Dataset.counter(dtype=tf.int64)
    else:
        ds = tf.data.Dataset.range(num_patches)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    ds = ds.map(fetch, num_parallel_calls=STREAM_PARALLEL_BATCHES, deterministic=True)
    return ds.prefetch(STREAM_PREFETCH)
