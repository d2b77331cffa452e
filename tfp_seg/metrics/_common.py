"""Input validation shared by the NumPy metrics (and the streaming metrics' arguments).

Every check converts with `np.asarray` and raises a `ValueError` that names the argument, the
expected form and the shape / dtype received.
"""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import numpy.typing as npt

from tfp_seg import _checks

ArrayLike = npt.ArrayLike


def describe(x: np.ndarray) -> str:
    return f"shape {tuple(x.shape)}, dtype {x.dtype}"


def as_array(x: Any, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"`{name}` must be an array; got None.")
    try:
        arr = np.asarray(x)
    except Exception as err:  # re-raised with the argument name
        raise ValueError(f"`{name}` could not be converted to a NumPy array: {err}") from err
    if arr.dtype == object:
        raise ValueError(f"`{name}` must be a numeric array; got {describe(arr)}.")
    return arr


check_ignore_label = _checks.check_ignore_label


def is_integer_dtype(arr: np.ndarray) -> bool:
    return np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_


def check_int_labels(
    x: Any,
    name: str,
    num_classes: Optional[int],
    expected: str,
    ignore_label: Optional[int] = None,
) -> np.ndarray:
    """Converts `x` to an int64 array and checks dtype, emptiness and range."""
    arr = as_array(x, name)
    if not is_integer_dtype(arr):
        raise ValueError(
            f"`{name}` must hold integer class labels ({expected}); got {describe(arr)}. "
            "Cast label maps to an integer dtype (float labels are not accepted)."
        )
    if arr.size == 0:
        raise ValueError(f"`{name}` must not be empty ({expected}); got {describe(arr)}.")
    arr = arr.astype(np.int64, copy=False)
    if num_classes is not None:
        values = arr if ignore_label is None else arr[arr != ignore_label]
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            extra = "" if ignore_label is None else f" (besides ignore_label={ignore_label})"
            raise ValueError(
                f"`{name}` must hold labels in [0, {num_classes}){extra}; got values in "
                f"[{values.min()}, {values.max()}] ({describe(arr)})."
            )
    return arr


def check_probs(x: Any, name: str, expected: str) -> np.ndarray:
    """Converts to float64 and checks: rank >= 1, finite, in [0, 1], sums to 1 on the last axis."""
    arr = as_array(x, name)
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(
            f"`{name}` must be a floating-point probability array ({expected}); "
            f"got {describe(arr)}."
        )
    if arr.ndim < 1 or arr.size == 0 or arr.shape[-1] < 1:
        raise ValueError(f"`{name}` must be a non-empty array ({expected}); got {describe(arr)}.")
    tol = max(1e-3, 4.0 * arr.shape[-1] * float(np.finfo(arr.dtype).eps))
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"`{name}` contains NaN or Inf values ({describe(arr)}).")
    if out.min() < -tol or out.max() > 1.0 + tol:
        raise ValueError(
            f"`{name}` must hold probabilities in [0, 1] ({expected}); got values in "
            f"[{out.min():.4g}, {out.max():.4g}] ({describe(arr)}). Apply a softmax to logits."
        )
    sums = out.sum(axis=-1)
    worst = float(np.max(np.abs(sums - 1.0)))
    if worst > tol:
        raise ValueError(
            f"`{name}` must sum to 1 over its last (class) axis ({expected}); the largest "
            f"deviation is {worst:.4g} ({describe(arr)})."
        )
    return np.clip(out, 0.0, 1.0)


def check_eps(eps: Any) -> float:
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, (int, float, np.floating)):
        raise ValueError(f"`eps` must be a float in (0, 1); got {eps!r}.")
    if not 0.0 < float(eps) < 1.0:
        raise ValueError(f"`eps` must be a float in (0, 1); got {eps!r}.")
    return float(eps)
