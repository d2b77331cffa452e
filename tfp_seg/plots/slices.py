"""2D slices of volumes, so that the image figures of `tfp_seg.plots` draw volumes too.

Volumes are `[D, H, W]` after any leading axes (samples, annotations) and before any trailing
ones (channels, classes): an image `[D, H, W, channels]`, annotations `[K, D, H, W]`,
probability samples `[N, D, H, W, C]`. `volume_slice` takes one slice along a spatial axis
(0 = D, the axial slices of a `[D, H, W]` volume) of such an array, and `informative_slice`
chooses which: the slice with the most foreground in the label maps.

```python
d = tfp_seg.plots.informative_slice(annotations)            # annotations [K, D, H, W]
tfp_seg.plots.plot_samples_grid(
    tfp_seg.plots.volume_slice(image, d),                    # [D, H, W, ch] -> [H, W, ch]
    tfp_seg.plots.volume_slice(annotations, d, leading=1),   # [K, D, H, W] -> [K, H, W]
    tfp_seg.plots.volume_slice(samples, d, leading=1))       # [N, D, H, W] -> [N, H, W]
```
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tfp_seg import _checks

__all__ = ["informative_slice", "volume_slice"]


def _check_axes(x: np.ndarray, axis: Any, leading: Any, name: str) -> tuple:
    leading = _checks.positive_int(leading, "leading", minimum=0)
    axis = _checks.positive_int(axis, "axis", minimum=0)
    if axis > 2:
        raise ValueError(f"`axis` must be 0 (D), 1 (H) or 2 (W) of a volume; got {axis}.")
    if x.ndim < leading + 3:
        raise ValueError(
            f"`{name}` must have {leading} leading axes and then the volume's (D, H, W); got "
            f"shape {tuple(x.shape)}."
        )
    return axis, leading


def volume_slice(x: Any, index: int, axis: int = 0, leading: int = 0) -> np.ndarray:
    """The slice `index` along spatial axis `axis` of `x [*L, D, H, W, *T]`.

    Args:
      x: An array with `leading` axes `L`, then the volume's `(D, H, W)`, then any trailing
        axes `T` (channels, classes).
      index: The slice, `0 <= index < x.shape[leading + axis]` (negative counts from the end).
      axis: 0 (D: axial slices `[H, W]`), 1 (H: `[D, W]`) or 2 (W: `[D, H]`).
      leading: The number of axes before the volume's.

    Returns:
      `x` without the sliced axis: `[*L, H, W, *T]` for `axis=0`.
    """
    x = np.asarray(x)
    axis, leading = _check_axes(x, axis, leading, "x")
    size = x.shape[leading + axis]
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
        raise ValueError(f"`index` must be an int; got {index!r}.")
    if not -size <= int(index) < size:
        raise ValueError(f"`index` {index} is out of range for an axis of {size} slices.")
    return np.take(x, int(index), axis=leading + axis)


def informative_slice(labels: Any, axis: int = 0, leading: int = 1) -> int:
    """The slice along `axis` with the most foreground voxels (label > 0) in `labels`.

    Args:
      labels: Integer label maps `[*L, D, H, W]` (e.g. annotations `[K, D, H, W]`,
        `leading=1`; one map `[D, H, W]`, `leading=0`).
      axis: As in `volume_slice`.
      leading: The number of axes before the volume's.

    Returns:
      The index of the slice whose foreground count, summed over the leading axes, is the
      largest; among equal counts the one nearest the middle `size // 2` (the middle slice
      when there is no foreground at all).
    """
    labels = np.asarray(labels)
    axis, leading = _check_axes(labels, axis, leading, "labels")
    if labels.ndim != leading + 3:
        raise ValueError(
            f"`labels` must be [*L, D, H, W] with {leading} leading axes; got shape "
            f"{tuple(labels.shape)}."
        )
    spatial = leading + axis
    others = tuple(a for a in range(labels.ndim) if a != spatial)
    counts = np.count_nonzero(labels > 0, axis=others)  # [size]
    middle = counts.size // 2
    distance = np.abs(np.arange(counts.size) - middle)
    # the most foreground first, then the nearest to the middle
    return int(np.lexsort((distance, -counts))[0])
