"""What a loss's `y_true` holds: one label map, a label set of K raters, or soft labels.

The losses tell the three apart by the static shape of `y_true` against the parameters
`params [B, H, W, P]` (or logits `[B, H, W, C]`) and the number of classes C:

```none
rank 3  [B, H, W]                                         one label map
rank 4  [B, H, W, 1]    shape[1:3] == (H, W)              one label map (trailing singleton)
rank 4  [B, K, H, W]    shape[2:4] == (H, W)              a label set: K >= 1 raters' maps
rank 4  [B, H, W, C]    float, shape[1:3] == (H, W)       soft labels: per-pixel class fractions
```

An unknown static dimension matches anything. The singleton rule is checked first, so
`[B, H, W, 1]` always stays one label map (the only shape it shares with a label set is
`[B, 1, 1, 1]`, where both mean the same). A float `y_true` that is both a label set and soft
labels (H == W == C == K) is ambiguous and an error, as is a shape that is none of the four;
both errors name the argument. Keras converts `y_true` to float32 before a loss sees it, so
the dtype alone cannot tell a label set from soft labels: the shapes do.

`prepare_targets` returns the labels in one layout for every kind of hard labels, int32
`[B, K, H, W]` (K = 1 for one label map), or the soft labels as float32 `[B, H, W, C]`,
checked at run time (with `validate_args`) to be finite, non-negative and to sum to 1 over
the classes within `SOFT_TOLERANCE`. Soft labels have no ignored pixels: `ignore_label` does
not apply to them.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import tensorflow as tf

from tfp_seg import _checks

__all__ = [
    "LABEL_MAP",
    "LABEL_SET",
    "SOFT",
    "SOFT_TOLERANCE",
    "Targets",
    "target_kind",
    "prepare_targets",
    "rater_mean",
    "valid_pixel_count",
    "soft_rejected",
]

LABEL_MAP, LABEL_SET, SOFT = "label_map", "label_set", "soft"
SOFT_TOLERANCE = 1e-4
_FORMS = (
    "one label map [B, H, W] (or [B, H, W, 1]), a label set [B, K, H, W] of K raters, or "
    "float soft labels [B, H, W, C]"
)


class Targets(NamedTuple):
    """Prepared `y_true`: `kind` (`LABEL_MAP`, `LABEL_SET`, `SOFT`) and `labels`, int32
    `[B, K, H, W]` for hard labels (K = 1 for one label map) or float32 `[B, H, W, C]`."""

    kind: str
    labels: tf.Tensor


def _match(got, want) -> bool:
    return all(g is None or w is None or g == w for g, w in zip(got, want, strict=True))


def _params_hw(params):
    shape = tf.TensorShape(getattr(params, "shape", None))
    if shape.rank is None or shape.rank < 3:
        return [None, None]
    return shape.as_list()[1:3]


def target_kind(y_true, params, num_classes: Optional[int], name: str = "y_true") -> str:
    """`LABEL_MAP`, `LABEL_SET` or `SOFT`: what `y_true` holds, by the rule of this module.

    Args:
      y_true: the labels (any tensor-like with a known rank).
      params: the parameters (or logits) `[B, H, W, P]` they are scored under.
      num_classes: C (None: soft labels are not recognised).
      name: the argument named in errors.
    """
    y_true = tf.convert_to_tensor(y_true)
    rank = y_true.shape.rank
    if rank == 3:
        return LABEL_MAP
    if rank != 4:
        raise ValueError(f"`{name}` must be {_FORMS}; got shape {_checks.shape_str(y_true)}.")
    dims = y_true.shape.as_list()
    hw = _params_hw(params)
    if dims[3] == 1 and _match(dims[1:3], hw):
        return LABEL_MAP
    is_set = _match(dims[2:4], hw)
    is_soft = (
        y_true.dtype.is_floating
        and num_classes is not None
        and dims[3] == num_classes
        and _match(dims[1:3], hw)
    )
    if is_set and is_soft:
        raise ValueError(
            f"`{name}` of shape {_checks.shape_str(y_true)} is ambiguous for `params` of shape "
            f"{_checks.shape_str(params)} and {num_classes} classes: it reads both as a label "
            f"set [B, K, H, W] and as soft labels [B, H, W, C]. Give the images a size "
            f"different from the class and rater counts (or a static (H, W))."
        )
    if is_set:
        return LABEL_SET
    if is_soft:
        return SOFT
    raise ValueError(
        f"`{name}` shape {_checks.shape_str(y_true)} must be {_FORMS}, with (H, W) = "
        f"{tuple(hw)} of `params` {_checks.shape_str(params)}"
        + (f" and C = {num_classes}" if num_classes is not None else "")
        + "."
    )


def _check_batch(labels, params, name: str) -> None:
    got, want = labels.shape[0], tf.TensorShape(params.shape)[0]
    if got is not None and want is not None and got != want:
        raise ValueError(
            f"`{name}` shape {_checks.shape_str(labels)} must have the batch size of `params` "
            f"{_checks.shape_str(params)}."
        )


def _soft_labels(y_true, name: str, validate_args: bool) -> tf.Tensor:
    soft = tf.cast(y_true, tf.float32)
    if not validate_args:
        return soft
    soft = _checks.assert_finite(soft, name)
    total = tf.reduce_sum(soft, axis=-1)
    checks = [
        tf.debugging.assert_non_negative(
            soft, message=f"`{name}` (soft labels [B, H, W, C]) has negative class fractions"
        ),
        tf.debugging.assert_less_equal(
            tf.abs(total - 1.0),
            SOFT_TOLERANCE,
            message=(
                f"`{name}` (soft labels [B, H, W, C]) must sum to 1 over the classes "
                f"(within {SOFT_TOLERANCE:g}) at every pixel"
            ),
        ),
    ]
    with tf.control_dependencies(checks):
        return tf.identity(soft)


def prepare_targets(
    y_true,
    params,
    num_classes: Optional[int],
    ignore_label: Optional[int] = None,
    validate_args: bool = True,
    name: str = "y_true",
    soft: Optional[str] = None,
) -> Targets:
    """Classify (`target_kind`) and validate `y_true`.

    Args:
      y_true: labels as in the module docstring.
      params: the parameters (or logits) `[B, H, W, P]`.
      num_classes: C; hard labels must be in `[0, C)` or `ignore_label`.
      ignore_label, validate_args: as in `tfp_seg._checks.prepare_labels`.
      name: the argument named in errors.
      soft: None to accept soft labels, or the message of the `ValueError` raised for them
        (a loss that has no likelihood for them).

    Returns:
      `Targets(kind, labels)`: int32 `[B, K, H, W]` hard labels, or float32 `[B, H, W, C]`.
    """
    y_true = tf.convert_to_tensor(y_true)
    kind = target_kind(y_true, params, num_classes, name)
    if kind == SOFT:
        if soft is not None:
            raise ValueError(soft)
        _check_batch(y_true, params, name)
        return Targets(kind, _soft_labels(y_true, name, validate_args))
    rank = 3 if kind == LABEL_MAP else 4
    labels = _checks.prepare_labels(
        y_true, num_classes, ignore_label, name=name, validate_args=validate_args, spatial_rank=rank
    )
    if kind == LABEL_MAP:
        want = tf.TensorShape(params.shape)[:3]
        if labels.shape.is_fully_defined() and want.is_fully_defined() and labels.shape != want:
            raise ValueError(
                f"`{name}` shape {_checks.shape_str(labels)} must equal the [B, H, W] of "
                f"`params` {_checks.shape_str(params)}."
            )
        return Targets(kind, labels[:, tf.newaxis])
    if labels.shape[1] == 0:
        raise ValueError(f"`{name}` is an empty label set (shape {_checks.shape_str(labels)}).")
    _check_batch(labels, params, name)
    return Targets(kind, labels)


def soft_rejected(name: str, what: str) -> str:
    """The error message of a joint loss (`what`) given soft labels."""
    return (
        f"`{name}` holds soft labels [B, H, W, C] (per-pixel class fractions, "
        f"annotation='marginal'), but {what} scores whole label maps jointly, and the joint "
        f"likelihood of a soft label map is not defined. Train it on label sets [B, K, H, W] "
        f"(annotation='all': every rater, one shared set of samples) or on one label map per "
        f"image (annotation='random'); soft labels suit the per-pixel losses "
        f"(HeteroscedasticNLL, SegmentationCrossEntropy)."
    )


def rater_mean(values, batch_size) -> tf.Tensor:
    """`[B*K]` (row b*K + k) -> `[B]`, the mean over the K raters of each image."""
    return tf.reduce_mean(tf.reshape(values, tf.stack([batch_size, -1])), axis=1)


def valid_pixel_count(targets: Targets, ignore_label: Optional[int]) -> tf.Tensor:
    """Pixels scored per image, float32 `[B]`: the non-ignored pixels of one rater's map,
    averaged over the K raters (`(1/K) sum_k n_{b,k}`); all H*W pixels for soft labels."""
    labels = targets.labels
    shape = tf.shape(labels)
    if targets.kind == SOFT:
        return tf.cast(shape[1] * shape[2], tf.float32) * tf.ones(shape[:1], tf.float32)
    if ignore_label is None:
        return tf.cast(shape[2] * shape[3], tf.float32) * tf.ones(shape[:1], tf.float32)
    valid = tf.cast(tf.not_equal(labels, ignore_label), tf.float32)
    return tf.reduce_mean(tf.reduce_sum(valid, axis=[2, 3]), axis=1)
