"""Input validation of the set metrics (`tfp_seg.metrics.sets`): label sets, set weights, and
the valid pixels of an image defined by `ignore_label` and `mask`."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np

from tfp_seg import _checks
from tfp_seg.metrics import _common


def check_ignore(ignore_label: Any, num_classes: int) -> Optional[int]:
    ignore_label = _common.check_ignore_label(ignore_label)
    if ignore_label is not None and 0 <= ignore_label < num_classes:
        raise ValueError(
            f"`ignore_label` must lie outside the class range [0, {num_classes}) (e.g. 255): a "
            f"class label {ignore_label} could not be told from an unlabelled pixel; got "
            f"{ignore_label}."
        )
    return ignore_label


def valid_pixels(
    sets: tuple[np.ndarray, ...], ignore_label: Optional[int], mask: Any, batched: bool
) -> Optional[np.ndarray]:
    """The valid pixels `[B, P]` of sets of label maps `[B, n, *S]` (None: all pixels)."""
    if ignore_label is None and mask is None:
        return None
    batch, spatial = sets[0].shape[0], tuple(sets[0].shape[2:])
    keep = np.ones((batch, int(np.prod(spatial))), bool)
    if mask is not None:
        m = _common.as_array(mask, "mask")
        shapes = [spatial] + ([(batch,) + spatial] if batched else [])
        form = " or ".join(str(shape) for shape in shapes)
        if m.dtype != np.bool_ or m.shape not in shapes:
            raise ValueError(
                f"`mask` must be a boolean array of valid pixels (True = valid), shape {form}; "
                f"got {_common.describe(m)}."
            )
        keep &= m.reshape(-1 if m.shape == spatial else batch, keep.shape[1])
    if ignore_label is not None:
        for x in sets:
            keep &= ~np.any(x.reshape(batch, x.shape[1], -1) == ignore_label, axis=1)
    empty = np.flatnonzero(~keep.any(axis=1))
    if empty.size:
        where = f"image {int(empty[0])} of the batch" if batched else "the image"
        causes = (["`mask` is False"] if mask is not None else []) + (
            [f"some map has ignore_label={ignore_label}"] if ignore_label is not None else []
        )
        raise ValueError(f"{where} has no valid pixels: {' or '.join(causes)} at every pixel.")
    return keep


def restrict(x: np.ndarray, keep: Optional[np.ndarray], i: int) -> np.ndarray:
    """Maps `x[i]` `[n, P]` at the valid pixels of image `i`."""
    return x[i] if keep is None else x[i][:, keep[i]]


def set_forms(spatial_dims: int, letter: str) -> tuple[str, str]:
    """The one-image and batch layouts of a set of label maps, e.g. `("[N,H,W]",
    "[B,N,H,W]")` (2) or `("[N,D,H,W]", "[B,N,D,H,W]")` (3)."""
    axes = _checks.spatial_axes(spatial_dims).replace(" ", "")
    return f"[{letter},{axes}]", f"[B,{letter},{axes}]"


def check_set_rank(arr: np.ndarray, name: str, letter: str, spatial_dims: int) -> bool:
    """Whether `arr` (a set of label maps) is a batch: rank `spatial_dims + 1` is one image
    `[n, *S]`, rank `spatial_dims + 2` a batch `[B, n, *S]`; another rank is a `ValueError`
    naming `name`, the forms and, for a rank that fits the other spatial rank, `spatial_dims`."""
    one, batch = set_forms(spatial_dims, letter)
    if arr.ndim not in (spatial_dims + 1, spatial_dims + 2):
        other = 5 - spatial_dims
        hint = (
            f" (for {'volumes' if other == 3 else 'images'} pass spatial_dims={other})"
            if arr.ndim in (other + 1, other + 2)
            else ""
        )
        raise ValueError(
            f"`{name}` must have rank {spatial_dims + 1} or {spatial_dims + 2} ({one} or "
            f"{batch}, spatial_dims={spatial_dims}); got {_common.describe(arr)}{hint}."
        )
    return arr.ndim == spatial_dims + 2


def check_label_sets(
    samples: Any,
    references: Any,
    num_classes: int,
    ignore_label: Any = None,
    mask: Any = None,
    spatial_dims: Any = 2,
) -> tuple[np.ndarray, np.ndarray, bool, Optional[np.ndarray]]:
    """Validates `samples`/`references`; returns them flattened to [B,N,P], [B,K,P], whether
    they were batched, and the valid pixels [B,P] (None: all). `spatial_dims` (2: `S = (H, W)`,
    3: `S = (D, H, W)`) tells one image `[N, *S]` from a batch `[B, N, *S]`."""
    spatial_dims = _checks.check_spatial_dims(spatial_dims)
    ignore_label = check_ignore(ignore_label, num_classes)
    s_forms, r_forms = set_forms(spatial_dims, "N"), set_forms(spatial_dims, "K")
    s = _common.check_int_labels(
        samples, "samples", num_classes, " or ".join(s_forms), ignore_label
    )
    r = _common.check_int_labels(
        references, "references", num_classes, " or ".join(r_forms), ignore_label
    )
    batched = check_set_rank(s, "samples", "N", spatial_dims)
    if check_set_rank(r, "references", "K", spatial_dims) != batched:
        raise ValueError(
            f"`samples` and `references` must both be single images ({s_forms[0]} / "
            f"{r_forms[0]}) or both batches ({s_forms[1]} / {r_forms[1]}); got samples "
            f"{_common.describe(s)} and references {_common.describe(r)}."
        )
    if not batched:
        s, r = s[None], r[None]
    if s.shape[0] != r.shape[0]:
        raise ValueError(
            f"`samples` and `references` must have the same batch size B; got samples "
            f"{_common.describe(s)} and references {_common.describe(r)}."
        )
    if s.shape[2:] != r.shape[2:]:
        raise ValueError(
            f"`samples` and `references` must have the same spatial shape "
            f"[{_checks.spatial_axes(spatial_dims)}]; got samples {_common.describe(s)} and "
            f"references {_common.describe(r)}."
        )
    keep = valid_pixels((s, r), ignore_label, mask, batched)
    b = s.shape[0]
    return s.reshape(b, s.shape[1], -1), r.reshape(b, r.shape[1], -1), batched, keep


def check_set_weights(weights: Any, name: str, batch: int, size: int, batched: bool) -> np.ndarray:
    """Returns weights as [B, size] float64 (uniform when None)."""
    if weights is None:
        return np.full((batch, size), 1.0 / size)
    w = _common.as_array(weights, name)
    form = f"[{size}] or [B, {size}] with B={batch}" if batched else f"[{size}]"
    if not (np.issubdtype(w.dtype, np.floating) or np.issubdtype(w.dtype, np.integer)):
        raise ValueError(f"`{name}` must be a real array ({form}); got {_common.describe(w)}.")
    w = w.astype(np.float64)
    if w.shape == (size,):
        w = np.broadcast_to(w, (batch, size))
    elif not (batched and w.shape == (batch, size)):
        raise ValueError(f"`{name}` must have shape {form}; got {_common.describe(w)}.")
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError(f"`{name}` must be finite and non-negative; got {w.tolist()}.")
    sums = w.sum(axis=-1)
    if np.any(np.abs(sums - 1.0) > 1e-5):
        raise ValueError(
            f"`{name}` must sum to 1 (per image); got sums {np.round(sums, 6).tolist()}."
        )
    return w / sums[:, None]
