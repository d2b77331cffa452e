"""What the figures of `tfp_seg.plots` share: argument checks, class colours, the lazy pyplot
import (no backend chosen at import), and writing a figure."""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np

from tfp_seg import _checks, _io

PathLike = Union[str, os.PathLike]

# Background dark grey, then colour-blind-safe qualitative colours (Okabe-Ito), then tab20.
BASE_COLORS = (
    "#202020",  # background
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#009E73",  # bluish green
    "#F0E442",  # yellow
    "#CC79A7",  # reddish purple
    "#D55E00",  # vermillion
    "#0072B2",  # blue
)
PANEL_INCHES = 1.9
DEFAULT_DPI = 100


# ================================================================================================
# Helpers
# ================================================================================================


def pyplot():
    """`matplotlib.pyplot`, after selecting `"Agg"` if no backend has been chosen."""
    import matplotlib

    if os.environ.get("MPLBACKEND") is None and matplotlib.get_backend(auto_select=False) is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def array(x: Any, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"`{name}` must be an array; got None.")
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"`{name}` must be a numeric array; got dtype object.")
    return arr


def shape(x: np.ndarray) -> str:
    return f"shape {tuple(x.shape)}"


def check_image(image: Any) -> np.ndarray:
    """`[H, W]`, `[H, W, 1]` or `[H, W, 3|4]` -> float array `[H, W]` or `[H, W, 3]`."""
    img = array(image, "image")
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    elif img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] == 3)):
        raise ValueError(
            "`image` must be one image [H, W], [H, W, 1] or [H, W, 3] (channels last); "
            f"got {shape(img)}."
        )
    img = img.astype(np.float64)
    if not np.all(np.isfinite(img)):
        raise ValueError("`image` contains NaN or Inf values.")
    return img


def check_label_stack(x: Any, name: str, form: str, hw: tuple) -> np.ndarray:
    arr = array(x, name)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"`{name}` must be integer label maps {form}; got {shape(arr)}.")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(
            f"`{name}` must hold integer class labels {form}; got dtype {arr.dtype} "
            "(take the argmax of probabilities or logits first)."
        )
    if arr.shape[1:] != hw:
        raise ValueError(
            f"`{name}` must have the image's spatial shape {hw}; got {shape(arr)} {form}."
        )
    if arr.shape[0] == 0:
        raise ValueError(f"`{name}` is empty ({shape(arr)}).")
    if arr.min() < 0:
        raise ValueError(f"`{name}` holds negative labels (min {arr.min()}).")
    return arr.astype(np.int64)


def class_colors(num_classes: int) -> list:
    """RGBA colours of classes `0..num_classes-1` (class 0, the background, is dark grey)."""
    from matplotlib import colormaps
    from matplotlib import colors as mcolors

    num_classes = _checks.positive_int(num_classes, "num_classes")
    out = [mcolors.to_rgba(c) for c in BASE_COLORS[:num_classes]]
    extra = colormaps["tab20"]
    for i in range(len(out), num_classes):
        out.append(extra((i - len(BASE_COLORS)) % 20))
    return out


def class_names(class_names: Optional[Sequence[str]], num_classes: int) -> list:
    if class_names is None:
        return ["background"] + [f"class {c}" for c in range(1, num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(
            f"`class_names` must name all {num_classes} classes; got {len(names)}: {names}."
        )
    return names


def show_image(ax, img: np.ndarray) -> None:
    lo, hi = float(img.min()), float(img.max())
    if img.ndim == 2:
        ax.imshow(
            img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1.0, interpolation="nearest"
        )
    else:
        scaled = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        ax.imshow(scaled, interpolation="nearest")
    clean(ax)


def clean(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def finish(fig, path: Optional[PathLike], dpi: int):
    if path is not None:
        folder = os.path.dirname(os.fspath(path))
        if folder:
            os.makedirs(folder, exist_ok=True)
        with _io.atomic_path(path) as tmp:  # readers never see a half-written PNG
            fig.savefig(tmp, dpi=dpi, format="png", facecolor="white")
    return fig
