"""What a loss's `y_true` holds: one label map, a label set of K raters, or soft labels.

The losses tell the three apart by the static shape of `y_true` against the parameters
`params [B, *S, P]` (or logits `[B, *S, C]`) and the number of classes C. The spatial shape
`S` is `(H, W)` for images or `(D, H, W)` for volumes, and is read off the rank of `params`
(4 or 5), so a volume's label map `[B, D, H, W]` is never taken for an image's label set:

```none
rank s+1  [B, *S]                                     one label map            (s = len(S))
rank s+2  [B, *S, 1]    shape[1:s+1] == S             one label map (trailing singleton)
rank s+2  [B, K, *S]    shape[2:] == S                a label set: K >= 1 raters' maps
rank s+2  [B, *S, C]    float, shape[1:s+1] == S      soft labels: per-pixel class fractions
```

For images (s = 2) these are `[B, H, W]`, `[B, H, W, 1]`, `[B, K, H, W]`, `[B, H, W, C]`.
An unknown static dimension matches anything. The singleton rule is checked first, so
`[B, H, W, 1]` always stays one label map (the only shape it shares with a label set is
`[B, 1, 1, 1]`, where both mean the same). A float `y_true` that is both a label set and soft
labels (every spatial size == C == K) is ambiguous and an error, as is a shape that is none
of the four; both errors name the argument. Keras converts `y_true` to float32 before a loss
sees it, so the dtype alone cannot tell a label set from soft labels: the shapes do.

`prepare_targets` returns the labels in one layout for every kind of hard labels, int32
`[B, K, *S]` (K = 1 for one label map), or the soft labels as float32 `[B, *S, C]`,
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
    "spatial_dims_of",
]

LABEL_MAP, LABEL_SET, SOFT = "label_map", "label_set", "soft"
SOFT_TOLERANCE = 1e-4


def _forms(spatial_dims: int) -> str:
    """The accepted layouts of `y_true`, written out for `spatial_dims` spatial axes."""
    form = _checks.spatial_form
    return (
        f"one label map {form(spatial_dims)} (or {form(spatial_dims, 'B', '1')}), a label set "
        f"{form(spatial_dims, 'B, K')} of K raters, or float soft labels "
        f"{form(spatial_dims, 'B', 'C')}"
    )


class Targets(NamedTuple):
    """Prepared `y_true`: `kind` (`LABEL_MAP`, `LABEL_SET`, `SOFT`) and `labels`, int32
    `[B, K, *S]` for hard labels (K = 1 for one label map) or float32 `[B, *S, C]`."""

    kind: str
    labels: tf.Tensor


def _match(got, want) -> bool:
    return all(g is None or w is None or g == w for g, w in zip(got, want, strict=True))


def spatial_dims_of(params) -> int:
    """The number of spatial axes of `params [B, *S, P]`: `rank - 2` for rank 4 or 5, and 2
    (images) where the rank is unknown or neither (the caller's rank check names it)."""
    rank = tf.TensorShape(getattr(params, "shape", None)).rank
    if rank is not None and rank - 2 in _checks.SPATIAL_DIMS:
        return rank - 2
    return 2


def _params_spatial(params, spatial_dims: int) -> list:
    """The static `S` of `params [B, *S, P]` (None for unknown sizes)."""
    shape = tf.TensorShape(getattr(params, "shape", None))
    if shape.rank is None or shape.rank != spatial_dims + 2:
        return [None] * spatial_dims
    return shape.as_list()[1:-1]


def target_kind(y_true, params, num_classes: Optional[int], name: str = "y_true") -> str:
    """`LABEL_MAP`, `LABEL_SET` or `SOFT`: what `y_true` holds, by the rule of this module.

    Args:
      y_true: the labels (any tensor-like with a known rank).
      params: the parameters (or logits) `[B, *S, P]` they are scored under; their rank
        tells `S`.
      num_classes: C (None: soft labels are not recognised).
      name: the argument named in errors.
    """
    y_true = tf.convert_to_tensor(y_true)
    s = spatial_dims_of(params)
    rank = y_true.shape.rank
    if rank == s + 1:
        return LABEL_MAP
    if rank != s + 2:
        raise ValueError(f"`{name}` must be {_forms(s)}; got shape {_checks.shape_str(y_true)}.")
    dims = y_true.shape.as_list()
    spatial = _params_spatial(params, s)
    if dims[-1] == 1 and _match(dims[1:-1], spatial):
        return LABEL_MAP
    is_set = _match(dims[2:], spatial)
    is_soft = (
        y_true.dtype.is_floating
        and num_classes is not None
        and dims[-1] == num_classes
        and _match(dims[1:-1], spatial)
    )
    axes = _checks.spatial_axes(s)
    if is_set and is_soft:
        raise ValueError(
            f"`{name}` of shape {_checks.shape_str(y_true)} is ambiguous for `params` of shape "
            f"{_checks.shape_str(params)} and {num_classes} classes: it reads both as a label "
            f"set {_checks.spatial_form(s, 'B, K')} and as soft labels "
            f"{_checks.spatial_form(s, 'B', 'C')}. Give the images a size "
            f"different from the class and rater counts (or a static ({axes}))."
        )
    if is_set:
        return LABEL_SET
    if is_soft:
        return SOFT
    raise ValueError(
        f"`{name}` shape {_checks.shape_str(y_true)} must be {_forms(s)}, with ({axes}) = "
        f"{tuple(spatial)} of `params` {_checks.shape_str(params)}"
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


def _soft_labels(y_true, name: str, validate_args: bool, spatial_dims: int) -> tf.Tensor:
    soft = tf.cast(y_true, tf.float32)
    if not validate_args:
        return soft
    soft = _checks.assert_finite(soft, name)
    total = tf.reduce_sum(soft, axis=-1)
    form = _checks.spatial_form(spatial_dims, "B", "C")
    checks = [
        tf.debugging.assert_non_negative(
            soft, message=f"`{name}` (soft labels {form}) has negative class fractions"
        ),
        tf.debugging.assert_less_equal(
            tf.abs(total - 1.0),
            SOFT_TOLERANCE,
            message=(
                f"`{name}` (soft labels {form}) must sum to 1 over the classes "
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
      params: the parameters (or logits) `[B, *S, P]` (their rank tells `S`).
      num_classes: C; hard labels must be in `[0, C)` or `ignore_label`.
      ignore_label, validate_args: as in `tfp_seg._checks.prepare_labels`.
      name: the argument named in errors.
      soft: None to accept soft labels, or the message of the `ValueError` raised for them
        (a loss that has no likelihood for them).

    Returns:
      `Targets(kind, labels)`: int32 `[B, K, *S]` hard labels, or float32 `[B, *S, C]`.
    """
    y_true = tf.convert_to_tensor(y_true)
    s = spatial_dims_of(params)
    kind = target_kind(y_true, params, num_classes, name)
    if kind == SOFT:
        if soft is not None:
            raise ValueError(soft)
        _check_batch(y_true, params, name)
        return Targets(kind, _soft_labels(y_true, name, validate_args, s))
    form = _checks.spatial_form(s) if kind == LABEL_MAP else _checks.spatial_form(s, "B, K")
    labels = _checks.prepare_labels(
        y_true,
        num_classes,
        ignore_label,
        name=name,
        validate_args=validate_args,
        spatial_rank=s + 1 if kind == LABEL_MAP else s + 2,
        form=form,
    )
    if kind == LABEL_MAP:
        want = tf.TensorShape(params.shape)[: s + 1]
        if labels.shape.is_fully_defined() and want.is_fully_defined() and labels.shape != want:
            raise ValueError(
                f"`{name}` shape {_checks.shape_str(labels)} must equal the {form} of "
                f"`params` {_checks.shape_str(params)}."
            )
        return Targets(kind, labels[:, tf.newaxis])
    if labels.shape[1] == 0:
        raise ValueError(f"`{name}` is an empty label set (shape {_checks.shape_str(labels)}).")
    _check_batch(labels, params, name)
    return Targets(kind, labels)


def soft_rejected(name: str, what: str, spatial_dims: int = 2) -> str:
    """The error message of a joint loss (`what`) given soft labels."""
    form = _checks.spatial_form
    return (
        f"`{name}` holds soft labels {form(spatial_dims, 'B', 'C')} (per-pixel class "
        f"fractions, annotation='marginal'), but {what} scores whole label maps jointly, and "
        f"the joint likelihood of a soft label map is not defined. Train it on label sets "
        f"{form(spatial_dims, 'B, K')} (annotation='all': every rater, one shared set of "
        f"samples) or on one label map per image (annotation='random'); soft labels suit the "
        f"per-pixel losses (HeteroscedasticNLL, SegmentationCrossEntropy)."
    )


def rater_mean(values, batch_size) -> tf.Tensor:
    """`[B*K]` (row b*K + k) -> `[B]`, the mean over the K raters of each image."""
    return tf.reduce_mean(tf.reshape(values, tf.stack([batch_size, -1])), axis=1)


def valid_pixel_count(targets: Targets, ignore_label: Optional[int]) -> tf.Tensor:
    """Pixels scored per image, float32 `[B]`: the non-ignored pixels of one rater's map,
    averaged over the K raters (`(1/K) sum_k n_{b,k}`); all prod(S) pixels for soft labels."""
    labels = targets.labels
    shape = tf.shape(labels)
    rank = labels.shape.rank
    if targets.kind == SOFT:  # [B, *S, C]
        return tf.cast(_product(shape, 1, rank - 1), tf.float32) * tf.ones(shape[:1], tf.float32)
    if ignore_label is None:  # [B, K, *S]
        return tf.cast(_product(shape, 2, rank), tf.float32) * tf.ones(shape[:1], tf.float32)
    valid = tf.cast(tf.not_equal(labels, ignore_label), tf.float32)
    return tf.reduce_mean(tf.reduce_sum(valid, axis=list(range(2, rank))), axis=1)


def _product(shape, start: int, stop: int):
    """`shape[start] * ... * shape[stop - 1]` (scalars: for images one multiplication)."""
    count = shape[start]
    for axis in range(start + 1, stop):
        count = count * shape[axis]
    return count
