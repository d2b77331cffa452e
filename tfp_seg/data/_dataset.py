"""The `tf.data` pipeline shared by every multi-annotation data set in `tfp_seg.data`."""

from __future__ import annotations

from typing import Callable

import numpy as np

from tfp_seg import _checks

ANNOTATION_MODES = ("random", "first", "all", "marginal")
# The streamed pipeline's reads / per-example calls in flight and prefetched batches: fixed and
# few, so that its memory is a few batches, the same in every epoch of any length (more in
# flight gave peaks that varied by several batches between runs).
STREAM_PARALLEL_BATCHES = 1
STREAM_PREFETCH = 1


def _check_mode(annotation: str, batch_size) -> int:
    if annotation not in ANNOTATION_MODES:
        raise ValueError(
            f"annotation must be 'random', 'first', 'all' or 'marginal', got {annotation!r}"
        )
    return _checks.positive_int(batch_size, "batch_size")


def annotated_dataset(
    images: np.ndarray,
    annotations: np.ndarray,
    marginals: Callable[[], np.ndarray],
    batch_size: int = 8,
    shuffle: bool = True,
    annotation: str = "random",
    seed: int = 0,
    repeat: bool = False,
    drop_remainder: bool = False,
    augment: bool = False,
):
    """A batched `tf.data.Dataset` of `(image, label)` from images and K annotations each.

    `annotation`: `"random"` (one of the K annotations, drawn anew for every example in every
    epoch) or `"first"` -> int32 `[B, H, W]`; `"all"` -> int32 `[B, K, H, W]`; `"marginal"`
    (`marginals()`, called only in that mode) -> float32 `[B, H, W, C]`. Shuffling and the
    random choice are deterministic given `seed`. Images are float32 `[B, H, W, channels]`.
    `augment=True` applies to every example one of the 8 flips / 90-degree rotations of the
    square (the dihedral group; on non-square images the 4 that keep the shape), the same to
    the image and its label(s), drawn anew every epoch, deterministic given `seed`.
    Volumes (images `[N, D, H, W, channels]`, annotations `[N, K, D, H, W]`) give `[B, D, H,
    W, ...]` alike; `augment` turns and flips them in the last two spatial axes (H, W) only,
    every slice along D alike. The arrays are copied into the pipeline (`from_tensor_slices`);
    `streamed_dataset` reads them batch by batch instead.
    """
    batch_size = _check_mode(annotation, batch_size)
    import tensorflow as tf

    images = images.astype(np.float32, copy=False)
    if annotation == "random":
        base = tf.data.Dataset.from_tensor_slices((images, annotations))
        draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((base, draws))
    elif annotation == "first":
        ds = tf.data.Dataset.from_tensor_slices((images, annotations[:, 0]))
    elif annotation == "all":
        ds = tf.data.Dataset.from_tensor_slices((images, annotations))
    else:
        ds = tf.data.Dataset.from_tensor_slices((images, marginals()))
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    return _labelled_batches(
        ds,
        annotation,
        annotations.shape[1],
        images.shape,
        seed,
        batch_size,
        drop_remainder,
        augment,
    )


def streamed_dataset(
    read: Callable,
    num_images: int,
    image_shape: tuple,
    label_shapes: dict,
    batch_size: int = 8,
    shuffle: bool = True,
    annotation: str = "random",
    seed: int = 0,
    repeat: bool = False,
    drop_remainder: bool = False,
    augment: bool = False,
):
    """The dataset of `annotated_dataset`, with the examples read from disk batch by batch.

    The pipeline shuffles the image *indices* `0..num_images-1` (each with its random rater
    draw, as `annotated_dataset` pairs them), batches them, and calls `read(indices int64 [b])
    -> (images float32 [b, *image_shape], labels)` once per batch (`tf.numpy_function`, the
    next batch read while one is consumed); labels are uint8 `[b, K, *S]` for `"random"` /
    `"all"`, `[b, *S]` for `"first"`, float32 `[b, *S, C]` for `"marginal"`, of the shapes
    `label_shapes[annotation]` (without the batch axis). The examples then go through exactly
    the steps of `annotated_dataset` (rater choice, augmentation, batches, prefetching). `tf.data`'s
    shuffle is content independent, so for the same seed, order and draws equal those of
    `annotated_dataset` on the same arrays: the batches are identical. Memory: the shuffle
    buffer holds one int64 scalar per image (about 150 bytes each in `tf.data`'s buffer), the
    pipeline a few batches (`STREAM_PARALLEL_BATCHES`, `STREAM_PREFETCH`).
    """
    batch_size = _check_mode(annotation, batch_size)
    import tensorflow as tf

    label_dtype = tf.float32 if annotation == "marginal" else tf.uint8
    label_shape = tuple(label_shapes[annotation])

    def fetch(indices):
        x, y = tf.numpy_function(read, [indices], (tf.float32, label_dtype), stateful=False)
        x.set_shape((None, *image_shape))
        y.set_shape((None, *label_shape))
        return x, y

    num_ann = label_shapes["all"][0]
    ds = tf.data.Dataset.range(num_images)
    if annotation == "random":
        # Each index with its draw, paired before the shuffle as annotated_dataset pairs them,
        # packed into one int64 `index * K + draw mod K` (one scalar per shuffle-buffer slot).
        draws = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, draws)).map(
            lambda i, draw: i * num_ann + tf.math.floormod(draw, num_ann)
        )
    if shuffle:
        ds = ds.shuffle(num_images, seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    ds = ds.batch(batch_size)
    if annotation == "random":
        ds = ds.map(
            lambda code: (fetch(code // num_ann), code % num_ann),
            num_parallel_calls=STREAM_PARALLEL_BATCHES,
            deterministic=True,
        )
    else:
        ds = ds.map(fetch, num_parallel_calls=STREAM_PARALLEL_BATCHES, deterministic=True)
    ds = ds.unbatch()
    cardinality = tf.data.INFINITE_CARDINALITY if repeat else num_images
    ds = ds.apply(tf.data.experimental.assert_cardinality(cardinality))
    shape = (num_images, *image_shape)
    return _labelled_batches(
        ds, annotation, num_ann, shape, seed, batch_size, drop_remainder, augment, fixed=True
    )


def _labelled_batches(
    ds, annotation, num_ann, shape, seed, batch_size, drop_remainder, augment, fixed=False
):
    """The steps after shuffling of both pipelines: `ds` of `(image, labels)` (`"random"`:
    `((image, labels [K, *S]), draw)`) -> the rater's label map or int32 labels, the random
    dihedral transform (`augment`), batches of `batch_size`, prefetching. `shape` is the
    images' `[N, *S, channels]`. `fixed`: `STREAM_PARALLEL_BATCHES` parallel calls and
    `STREAM_PREFETCH` batches prefetched, not `tf.data.AUTOTUNE`'s (which may grow its
    buffers as an epoch goes on); the order and values are the same either way."""
    import tensorflow as tf

    parallel = STREAM_PARALLEL_BATCHES if fixed else tf.data.AUTOTUNE
    prefetch = STREAM_PREFETCH if fixed else tf.data.AUTOTUNE

    if annotation == "random":

        def pick(example, draw):
            image, labels = example
            k = tf.cast(tf.math.floormod(draw, num_ann), tf.int32)
            return image, tf.cast(tf.gather(labels, k), tf.int32)

        ds = ds.map(pick, num_parallel_calls=parallel, deterministic=True)
    elif annotation in ("first", "all"):
        ds = ds.map(lambda x, y: (x, tf.cast(y, tf.int32)), deterministic=True)
    if augment:
        rank = len(shape) - 2
        if rank not in (2, 3):
            raise ValueError(
                "augment=True needs images [N, H, W, channels] or volumes [N, D, H, W, "
                f"channels]; got shape {tuple(shape)}"
            )
        square = shape[-3] == shape[-2]
        draws = tf.data.Dataset.random(seed=seed + 7919, rerandomize_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, draws)).map(
            lambda example, draw: _dihedral(example, draw, annotation, square, rank),
            num_parallel_calls=parallel,
            deterministic=True,
        )
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    return ds.prefetch(prefetch)


def _dihedral(example, draw, annotation: str, square: bool, rank: int = 2):
    """One of the symmetries of the square (`draw` mod 8: k quarter turns, then a left-right
    flip) applied alike to an image `[H, W, ch]` and its label: `[H, W]`, a set `[K, H, W]`
    ("all") or soft labels `[H, W, C]` ("marginal"). Non-square: half turns only.
    Volumes (`rank=3`, `[D, H, W, ch]`, labels `[D, H, W]`, `[K, D, H, W]`, `[D, H, W, C]`):
    the same transform of every slice along D (`tf.image` takes D as its batch axis)."""
    import tensorflow as tf

    image, label = example
    draw = tf.cast(tf.math.floormod(draw, 8), tf.int32)
    turns = tf.math.floormod(draw, 4) if square else 2 * tf.math.floormod(draw, 2)
    flip = draw >= 4

    def apply(t):  # t: [*S, channels]
        t = tf.image.rot90(t, turns)
        return tf.cond(flip, lambda: tf.image.flip_left_right(t), lambda: t)

    if annotation == "marginal":  # [*S, C]
        label = apply(label)
    elif annotation == "all":  # a set [K, *S]: K moved last and back
        label = apply(tf.transpose(label, [*range(1, rank + 1), 0]))
        label = tf.transpose(label, [rank, *range(rank)])
    else:  # one map [*S]
        label = apply(label[..., tf.newaxis])[..., 0]
    return apply(image), label


def check_fractions(fractions) -> np.ndarray:
    """`fractions` as float64 `[P]`, non-negative and summing to 1, or a ValueError."""
    f = np.asarray(fractions, np.float64)
    if f.ndim != 1 or f.size < 1 or np.any(f < 0) or abs(f.sum() - 1.0) > 1e-6:
        raise ValueError(f"fractions must be non-negative and sum to 1, got {tuple(fractions)}")
    return f


class AnnotatedSet:
    """What every multi-annotation data set in `tfp_seg.data` shares.

    A subclass (a dataclass) has `images [N, H, W, channels]`, `annotations [N, K, H, W]`, a
    `marginals()` method (`[N, H, W, C]` soft labels) and `_take(idx)` (a subset).
    `_INDEX_HINT` is appended to the error for integer indexing.
    """

    _INDEX_HINT = ""

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def num_annotations(self) -> int:
        """K, the number of annotations per image."""
        return int(self.annotations.shape[1])

    def __getitem__(self, key):
        """`data[i:j]`, `data[[3, 1]]`, `data[mask]` -> a new data set of the same type."""
        if isinstance(key, (int, np.integer)):
            raise TypeError(
                f"{type(self).__name__} is indexed by slices or index arrays (data[i:i+1])"
                f"{self._INDEX_HINT}"
            )
        return self._take(np.atleast_1d(np.arange(len(self))[key]))

    def to_dataset(
        self,
        batch_size: int = 8,
        shuffle: bool = True,
        annotation: str = "random",
        seed: int = 0,
        repeat: bool = False,
        drop_remainder: bool = False,
        augment: bool = False,
    ):
        """A batched `tf.data.Dataset` of `(image, label)` pairs.

        Args:
          batch_size: examples per batch.
          shuffle: reshuffle the examples every epoch (deterministic given `seed`).
          annotation: which label to pair with each image:
            `"random"`: one of the K annotations, drawn anew for every example in every epoch
              (every iteration over the dataset, or every repetition) -> int32 `[B, H, W]`;
            `"first"`: annotation 0 -> int32 `[B, H, W]`;
            `"all"`: all annotations -> int32 `[B, K, H, W]`;
            `"marginal"`: the soft label of `marginals()` (exact for `AmbiguousShapes`, the
              raters' empirical distribution for `AnnotatedImages`) -> float32
              `[B, H, W, num_classes]`.
          seed: seed of the shuffling and of the `"random"` annotation choice.
          repeat: repeat indefinitely (each repetition is a new epoch).
          drop_remainder: drop the last incomplete batch.
          augment: a random flip / 90-degree rotation of every example, the same for its
            image and label(s) (the dihedral group of the square: 8 transforms; 4 on
            non-square images), drawn anew every epoch, deterministic given `seed`. Volumes
            are turned and flipped in their last two spatial axes (H, W), all D slices alike.

        Images are float32 `[B, H, W, channels]`; volumes `[B, D, H, W, channels]` with
        labels `[B, D, H, W]` (`"all"`: `[B, K, D, H, W]`, `"marginal"`: `[B, D, H, W, C]`).
        """
        return self._dataset(
            batch_size=batch_size,
            shuffle=shuffle,
            annotation=annotation,
            seed=seed,
            repeat=repeat,
            drop_remainder=drop_remainder,
            augment=augment,
        )

    def _dataset(self, **kwargs):
        """The pipeline of `to_dataset` (`annotated_dataset` of the arrays in memory)."""
        return annotated_dataset(self.images, self.annotations, self.marginals, **kwargs)
