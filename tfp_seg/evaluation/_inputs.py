"""The inputs of `evaluate_annotations`: images with K annotations each, as arrays, a data set
object or a stream of batches, turned into checked batches of `batch_size` images.

```none
images                         annotations       source
[B, H, W, channels] array      [B, K, H, W] int  sliced into batches of batch_size (arrays,
                                                  tensors, array-likes such as the memory-map
                                                  views of tfp_seg.data.MappedArray: only
                                                  each batch is read)
AnnotatedImages/AmbiguousShapes None              its .images / .annotations (and .num_classes);
  DiskAnnotatedImages                             read batch by batch from its cache
iterable or tf.data.Dataset     None              (images [b,H,W,ch], annotations [b,K,H,W])
  of (images, annotations)                        pairs, re-batched to batch_size images
```

Volumes take the same paths with `S = (D, H, W)`: images `[B, D, H, W, channels]` (rank 5) and
annotations `[B, K, D, H, W]`; the images' rank tells the two apart (their channel axis).
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

import numpy as np
import tensorflow as tf

from tfp_seg import _checks

__all__ = ["annotated_batches", "check_labels"]

_FORMS = (
    "an array of images [B, H, W, channels] with `annotations` [B, K, H, W], a data set with "
    "`images` and `annotations` (tfp_seg.data.AnnotatedImages), or an iterable / "
    "tf.data.Dataset of (images, annotations) batches with annotations=None"
)


def _shape(x: Any) -> tuple:
    return tuple(int(d) if d is not None else None for d in x.shape)


class _Checker:
    """Checks the batches of one source: ranks, sizes, dtypes, and the same K, *S in all.

    The spatial rank comes from the images, whose channel axis makes it unambiguous:
    `[B, H, W, channels]` (rank 4) are images, `[B, D, H, W, channels]` (rank 5) volumes; the
    annotations must then be `[B, K, *S]`, of the same rank."""

    def __init__(self):
        self.layout: Optional[tuple] = None  # (K, *S) of the first batch

    def __call__(self, images: Any, annotations: Any, where: str) -> tuple[np.ndarray, ...]:
        x, y = np.asarray(images), np.asarray(annotations)
        if x.ndim not in (4, 5):
            raise ValueError(
                f"`images` must have rank 4 ([B, H, W, channels] images) or 5 ([B, D, H, W, "
                f"channels] volumes){where}; got shape {x.shape}."
            )
        spatial = x.ndim - 2
        form = _checks.spatial_form(spatial, "B, K")
        axes = _checks.spatial_axes(spatial)
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"`images` must be a real array{where}; got dtype {x.dtype}.")
        if y.ndim != x.ndim:
            raise ValueError(
                f"`annotations` must have rank {x.ndim} ({form}: K label maps per image, for "
                f"images of shape {x.shape}){where}; got shape {y.shape}."
            )
        if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
            raise ValueError(
                f"`annotations` must hold integer class labels ({form}){where}; got dtype "
                f"{y.dtype}. Cast label maps to an integer dtype."
            )
        if y.shape[0] != x.shape[0] or y.shape[2:] != x.shape[1:-1]:
            raise ValueError(
                f"`annotations` must be {form} with B, {axes} of the images {x.shape}{where}; "
                f"got shape {y.shape}."
            )
        if y.shape[1] == 0:
            raise ValueError(
                f"`annotations` must hold at least one annotation per image (K >= 1){where}; got "
                f"shape {y.shape}."
            )
        layout = tuple(y.shape[1:])
        if self.layout is None:
            self.layout = layout
        elif layout != self.layout:
            raise ValueError(
                f"every batch must have the same K, {axes} (annotations "
                f"{_checks.spatial_form(spatial, 'b, K')} = [b, "
                f"{', '.join(map(str, self.layout))}] so far){where}; got shape {y.shape}."
            )
        return x, y


def _sliceable(x: Any) -> bool:
    """An array, tensor or array-like with a shape that is sliced batch by batch, not read
    whole (a disk-backed `tfp_seg.data.MappedArray`, an h5py or zarr dataset)."""
    if isinstance(x, (np.ndarray, tf.Tensor)):
        return True
    return all(hasattr(x, a) for a in ("shape", "dtype", "__getitem__", "__len__"))


def _array_batches(images: Any, annotations: Any, batch_size: Optional[int]) -> Iterator:
    if isinstance(images, tf.data.Dataset) or isinstance(annotations, tf.data.Dataset):
        raise ValueError(f"`images` must be {_FORMS}; got a tf.data.Dataset with annotations.")
    if not _sliceable(images):
        images = np.asarray(images)
    if not _sliceable(annotations):
        annotations = np.asarray(annotations)
    check = _Checker()
    num_images = _shape(images)[0] if len(images.shape) else 0
    rank = len(images.shape)
    if rank in (4, 5) and num_images == 0:
        raise ValueError(f"`images` holds no images (shape {_shape(images)}).")
    if rank not in (4, 5) or len(annotations.shape) != rank:
        check(images, annotations, "")  # raises the error of the wrong rank
    if _shape(annotations)[0] != num_images:
        check(images, annotations, "")  # raises the error of the mismatch
    step = batch_size or num_images
    for start in range(0, num_images, step):
        stop = start + step
        yield check(images[start:stop], annotations[start:stop], "")


def _pair(element: Any, number: int) -> tuple:
    if isinstance(element, (tuple, list)) and len(element) == 2:
        return element[0], element[1]
    raise ValueError(
        f"`images` is read as a stream of (images, annotations) batches; element {number} is "
        f"a {type(element).__name__}, not such a pair."
    )


def _stream_batches(stream: Iterator, batch_size: Optional[int]) -> Iterator:
    check = _Checker()
    held_x: list = []
    held_y: list = []
    held = 0
    for number, element in enumerate(stream):
        x, y = check(*_pair(element, number), f" (element {number} of the stream)")
        if x.shape[0] == 0:
            continue
        if batch_size is None:
            yield x, y
            continue
        held_x.append(x)
        held_y.append(y)
        held += x.shape[0]
        while held >= batch_size:
            xs = np.concatenate(held_x) if len(held_x) > 1 else held_x[0]
            ys = np.concatenate(held_y) if len(held_y) > 1 else held_y[0]
            yield xs[:batch_size], ys[:batch_size]
            held_x, held_y = [xs[batch_size:]], [ys[batch_size:]]
            held -= batch_size
    if held:
        yield np.concatenate(held_x), np.concatenate(held_y)


def annotated_batches(
    images: Any, annotations: Any, batch_size: Optional[int]
) -> tuple[Iterator, Optional[int]]:
    """`(batches, num_classes)`: checked `(images [b, *S, ch], annotations [b, K, *S])`
    numpy batches of `batch_size` images (the last may be smaller; None: arrays whole, a
    stream's batches as they come), and the `num_classes` of a data set object (else None)."""
    if annotations is not None:
        return _array_batches(images, annotations, batch_size), None
    if hasattr(images, "images") and hasattr(images, "annotations"):
        num_classes = getattr(images, "num_classes", None)
        return _array_batches(images.images, images.annotations, batch_size), num_classes
    if _sliceable(images):
        raise ValueError(
            f"`annotations` is required with an array of images (shape {_shape(images)}): "
            f"pass `images` as {_FORMS}."
        )
    try:
        stream = iter(images)
    except TypeError:
        raise ValueError(f"`images` must be {_FORMS}; got {type(images).__name__}.") from None
    return _stream_batches(stream, batch_size), None


def check_labels(
    annotations: np.ndarray, num_classes: int, ignore_label: Optional[int], first: int
) -> tuple[np.ndarray, np.ndarray]:
    """`(annotations, valid)`: `annotations [b, K, *S]` as int64 with labels checked to lie in
    `[0, C)` or be `ignore_label`, and the valid pixels `[b, *S]` (no annotation has
    ignore_label); an image without valid pixels is an error naming it (`first` = the index
    of the batch's first image)."""
    y = annotations.astype(np.int64, copy=False)
    ignored = None if ignore_label is None else y == ignore_label
    values = y if ignored is None else y[~ignored]
    if values.size and (values.min() < 0 or values.max() >= num_classes):
        extra = "" if ignore_label is None else f" (besides ignore_label={ignore_label})"
        raise ValueError(
            f"`annotations` must hold labels in [0, {num_classes}){extra}; got values in "
            f"[{values.min()}, {values.max()}] in images {first}..{first + y.shape[0] - 1}."
        )
    valid = np.ones((y.shape[0],) + y.shape[2:], bool)
    if ignored is not None:
        valid = ~ignored.any(axis=1)
        empty = np.flatnonzero(~valid.reshape(valid.shape[0], -1).any(axis=1))
        if empty.size:
            raise ValueError(
                f"image {first + int(empty[0])} has no valid pixels: every pixel is "
                f"ignore_label={ignore_label} in some annotation."
            )
    return y, valid
