"""Input validation shared by the public boundary (layers, losses, models).

Static problems (wrong rank, mismatched static shapes, wrong dtype) raise `ValueError` at trace
time with a message naming the argument. Value problems (labels out of range, NaN/Inf) are
`tf.debugging` assertions: they run eagerly, inside `tf.function` and under `model.fit`, and are
skipped when the caller passes `validate_args=False`.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import tensorflow as tf


def positive_int(
    value: Any,
    name: str,
    minimum: int = 1,
    optional: bool = False,
    *,
    message: Optional[str] = None,
):
    """`value` as an int >= `minimum` (Python or NumPy integer, not bool), else `ValueError`.

    The one integer-count check of the package: `minimum=1` says "a positive int",
    another minimum "an int >= minimum"; `optional=True` also accepts (and returns) None.

    The error reads "`name` must be <what>; got <value>.". `message` replaces it where a public
    message predates this check: a format string with the fields `name`, `value` (its repr),
    `minimum` and `what` ("a positive int", "an int >= 2", "None or a positive int").
    """
    if optional and value is None:
        return None
    if (
        isinstance(value, (bool, np.bool_))
        or not isinstance(value, (int, np.integer))
        or value < minimum
    ):
        what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        if optional:
            what = f"None or {what}"
        if message is None:
            message = "`{name}` must be {what}; got {value}."
        raise ValueError(message.format(name=name, value=repr(value), minimum=minimum, what=what))
    return int(value)


def non_negative_float(value: Any, name: str) -> float:
    """`value` as a float, or a `ValueError` naming `name` unless it is a number >= 0 (not a
    bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"`{name}` must be a float >= 0; got {value!r}.")
    return float(value)


def check_num_samples(num_samples: Any, antithetic: bool) -> int:
    """Validate a Python sample count N >= 1 (even with antithetic sampling: mirrored pairs).

    Values that convert with `int()` (NumPy and eager scalar tensors) are accepted.
    """
    if isinstance(num_samples, bool) or not isinstance(num_samples, int):
        try:
            num_samples = int(num_samples)
        except (TypeError, ValueError):
            raise ValueError(
                f"`num_samples` must be a positive int; got {num_samples!r}."
            ) from None
    num_samples = positive_int(num_samples, "num_samples")
    if antithetic and num_samples % 2:
        raise ValueError(
            f"`num_samples` must be even with antithetic=True (samples come in mirrored "
            f"pairs); got {num_samples}."
        )
    return num_samples


def shape_str(x) -> str:
    shape = getattr(x, "shape", None)
    if shape is None:
        return "<no shape>"
    try:
        return str(tuple(tf.TensorShape(shape).as_list()))
    except (TypeError, ValueError):
        return str(shape)


def check_rank(x, rank: int, name: str, form: str) -> None:
    """Raise if `x` has a known rank different from `rank`."""
    r = getattr(x, "shape", tf.TensorShape(None)).rank
    if r is not None and r != rank:
        raise ValueError(f"`{name}` must have rank {rank} ({form}); got shape {shape_str(x)}.")


def check_last_dim(x, size: int, name: str, what: str) -> None:
    last = x.shape[-1] if x.shape.rank else None
    if last is not None and last != size:
        raise ValueError(
            f"`{name}` must have {size} channels in its last axis ({what}); "
            f"got shape {shape_str(x)}."
        )


def assert_finite(x: tf.Tensor, name: str) -> tf.Tensor:
    """Return `x`, failing at run time if it holds NaN or Inf."""
    if not x.dtype.is_floating:
        return x
    return tf.debugging.assert_all_finite(x, f"`{name}` contains NaN or Inf values")


def prepare_labels(
    labels,
    num_classes: Optional[int],
    ignore_label: Optional[int],
    name: str = "labels",
    validate_args: bool = True,
    spatial_rank: int = 3,
    form: Optional[str] = None,
) -> tf.Tensor:
    """Validate integer label maps `[B, *S]` (or `[B, *S, 1]`) and return them as int32.

    `spatial_rank` is the rank of the label tensor (3 for `[B, H, W]`, 4 for `[B, D, H, W]`
    or a label set `[B, K, H, W]`); `form` is the layout named in the rank error (default
    `"[B, H, W]"`). Float labels are accepted only when every value is integral (Keras losses
    receive labels cast to float); anything else fails. Values must be in `[0, num_classes)`
    or equal `ignore_label`.
    """
    labels = tf.convert_to_tensor(labels)
    if labels.shape.rank == spatial_rank + 1 and labels.shape[-1] == 1:
        labels = labels[..., 0]
    check_rank(labels, spatial_rank, name, f"{form or '[B, H, W]'} integer class ids")
    if labels.shape.rank and labels.shape[0] == 0:
        raise ValueError(f"`{name}` is an empty batch (shape {shape_str(labels)}).")
    if labels.dtype == tf.bool or not (labels.dtype.is_integer or labels.dtype.is_floating):
        raise ValueError(f"`{name}` must hold integer class ids; got dtype {labels.dtype.name}.")
    asserts = []
    if labels.dtype.is_floating:
        if validate_args:
            asserts.append(
                tf.debugging.assert_equal(
                    labels,
                    tf.round(labels),
                    message=f"`{name}` must hold integer class ids; got non-integral floats",
                )
            )
        labels = tf.cast(labels, tf.int32)
    else:
        labels = tf.cast(labels, tf.int32)
    if validate_args and num_classes is not None:
        valid = tf.logical_and(labels >= 0, labels < num_classes)
        if ignore_label is not None:
            valid = tf.logical_or(valid, tf.equal(labels, ignore_label))
        allowed = f"[0, {num_classes})" + (
            f" or ignore_label={ignore_label}" if ignore_label is not None else ""
        )
        asserts.append(
            tf.debugging.assert_equal(
                tf.reduce_all(valid),
                True,
                message=f"`{name}` has values outside {allowed}",
            )
        )
    if asserts:
        with tf.control_dependencies(asserts):
            labels = tf.identity(labels)
    return labels


def check_ignore_label(ignore_label: Any) -> Optional[int]:
    """`ignore_label` as an int, or None; a bool or non-integer is a `ValueError` naming it
    (the NumPy-side check of metrics, evaluation and calibration)."""
    if ignore_label is None:
        return None
    if isinstance(ignore_label, (bool, np.bool_)) or not isinstance(
        ignore_label, (int, np.integer)
    ):
        raise ValueError(f"`ignore_label` must be an integer or None; got {ignore_label!r}.")
    return int(ignore_label)


# --- spatial rank: S = (H, W) or (D, H, W) ----------------------------------------------------
SPATIAL_DIMS = (2, 3)


def check_spatial_dims(spatial_dims: Any, name: str = "spatial_dims") -> int:
    """`spatial_dims` as an int in `SPATIAL_DIMS` (2: images `(H, W)`, 3: volumes
    `(D, H, W)`), else `ValueError` naming it."""
    if isinstance(spatial_dims, (bool, np.bool_)) or not isinstance(
        spatial_dims, (int, np.integer)
    ):
        raise ValueError(
            f"`{name}` must be 2 (images [H, W]) or 3 (volumes [D, H, W]); got {spatial_dims!r}."
        )
    if int(spatial_dims) not in SPATIAL_DIMS:
        raise ValueError(
            f"`{name}` must be 2 (images [H, W]) or 3 (volumes [D, H, W]); got {spatial_dims!r}."
        )
    return int(spatial_dims)


def spatial_axes(spatial_dims: int) -> str:
    """The names of the spatial axes, `"H, W"` (2) or `"D, H, W"` (3), for shape messages."""
    return "H, W" if spatial_dims == 2 else "D, H, W"


def spatial_form(spatial_dims: int, leading: str = "B", trailing: Optional[str] = None) -> str:
    """A layout such as `"[B, H, W, C]"` or `"[N, B, D, H, W]"` for error messages."""
    parts = [leading, spatial_axes(spatial_dims)] if leading else [spatial_axes(spatial_dims)]
    if trailing:
        parts.append(trailing)
    return "[" + ", ".join(parts) + "]"


def infer_spatial_dims(x, name: str, extra: int, form: str) -> int:
    """The number of spatial axes of `x` whose layout has `extra` non-spatial axes, e.g.
    `loc [B, *S, C]` (`extra=2`): 2 for rank `extra + 2`, 3 for rank `extra + 3`.

    A tensor of unknown rank, or of another rank, is a `ValueError` naming `name` and the
    expected `form` (written for S = (H, W), e.g. `"[B, H, W, C]"`)."""
    rank = getattr(x, "shape", tf.TensorShape(None)).rank
    if rank is None:
        raise ValueError(f"`{name}` must have a known rank ({form}).")
    spatial = rank - extra
    if spatial not in SPATIAL_DIMS:
        volume = form.replace("H, W", "D, H, W")
        raise ValueError(
            f"`{name}` must have rank {extra + 2} ({form}) or {extra + 3} ({volume}); "
            f"got shape {shape_str(x)}."
        )
    return spatial
