"""Read-outs of logit samples: arg max classes and mean softmax, plane by plane."""

from __future__ import annotations

import tensorflow as tf

__all__ = ["argmax_classes", "class_softmax", "mean_softmax", "prefers_planar_sampling"]

_PLANAR_MAX_CLASSES = 32  # argmax_classes: plane by plane up to here
# The planar softmax and the planar samplers (label maps from differences, mean probabilities)
# pay one op per class plane: faster up to 8 classes, slower from 12 on
# (`python benchmarks/bench_sampling_ops.py --num-classes C --no-jit`).
_PLANAR_SAMPLING_MAX_CLASSES = 8


def prefers_planar_sampling(num_classes: int) -> bool:
    """Whether the class-planar samplers (`sample_low_rank_labels`,
    `low_rank_mean_probabilities`) beat sampling logits for `num_classes` (measured)."""
    return num_classes <= _PLANAR_SAMPLING_MAX_CLASSES


def raise_index(index: tf.Tensor, condition: tf.Tensor, label: int) -> tf.Tensor:
    """`tf.where(condition, label, index)` for a `label` above every value of `index` (>= 0):
    `max(index, label * condition)`. Equal to it, but two vectorised integer ops: the CPU
    kernel of `tf.where` with a scalar branch is slow for int8 (13 M values: 27 ms against 11
    ms, `benchmarks/bench_sampling_ops.py`, "index select"); for int32 it is not (the int32
    arg max of `argmax_classes` keeps `tf.where`: 51 against 56 ms with this)."""
    return tf.maximum(index, tf.cast(condition, index.dtype) * tf.constant(label, index.dtype))


def _argmax_planes(planes):
    """Index of the largest of a list of equally shaped planes (the first on ties), int32.

    Elementwise ops over whole planes: faster on CPU than `tf.argmax` over a short trailing
    axis, which the kernel does not vectorise (see `argmax_classes`).
    """
    best, index = planes[0], tf.zeros(tf.shape(planes[0]), tf.int32)
    for c, plane in enumerate(planes[1:], start=1):
        index = tf.where(plane > best, tf.constant(c, tf.int32), index)  # int32: as fast
        best = tf.maximum(best, plane)
    return index


def argmax_classes(logits: tf.Tensor) -> tf.Tensor:
    """`argmax` over the trailing class axis of `logits [..., C]` as int32 (first on ties).

    The classes are moved first and compared plane by plane (up to 32 classes), which on CPU
    is ~4x faster than `tf.argmax(logits, -1)` for 3 classes and 1.4x for 19
    (`benchmarks/bench_sampling_ops.py`).
    """
    logits = tf.convert_to_tensor(logits)
    num_classes = logits.shape[-1]
    rank = logits.shape.rank
    if num_classes is None or rank is None or num_classes > _PLANAR_MAX_CLASSES:
        return tf.argmax(logits, axis=-1, output_type=tf.int32)
    if num_classes == 1:
        return tf.zeros(tf.shape(logits)[:-1], tf.int32)
    planar = tf.transpose(logits, [rank - 1] + list(range(rank - 1)))
    return _argmax_planes(tf.unstack(planar, num_classes, axis=0))


def class_softmax(logits) -> tf.Tensor:
    """`softmax` over the last (class) axis of a tensor of any rank (`tf.nn.softmax` takes at
    most rank 5 on CPU; volume samples `[N, B, D, H, W, C]` have rank 6)."""
    logits = tf.convert_to_tensor(logits)
    if logits.shape.rank is not None and logits.shape.rank <= 5:
        return tf.nn.softmax(logits, -1)
    shape = tf.shape(logits)
    flat = tf.reshape(logits, tf.stack([-1, shape[-1]]))
    return tf.reshape(tf.nn.softmax(flat, -1), shape)


def mean_softmax(logit_samples: tf.Tensor) -> tf.Tensor:
    """`mean_n softmax(logit_samples[n])`: `[N, ..., C]` -> `[..., C]`.

    Up to 8 classes computed with the classes moved first (elementwise ops on whole planes):
    ~2x faster on CPU than `tf.nn.softmax` over a trailing axis of 3 classes; from 12 classes
    on `tf.nn.softmax` is faster and is used (`benchmarks/bench_sampling_ops.py`).
    """
    samples = tf.convert_to_tensor(logit_samples)
    rank = samples.shape.rank
    num_classes = samples.shape[-1]
    if rank is None or num_classes is None or not prefers_planar_sampling(num_classes):
        return tf.reduce_mean(class_softmax(samples), axis=0)
    planar = tf.transpose(samples, [rank - 1] + list(range(rank - 1)))
    exps = tf.exp(planar - tf.reduce_max(planar, axis=0, keepdims=True))
    probs = tf.reduce_mean(exps / tf.reduce_sum(exps, axis=0, keepdims=True), axis=1)
    return tf.transpose(probs, list(range(1, rank - 1)) + [0])
