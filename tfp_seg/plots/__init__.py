"""Figures of probabilistic segmentations: samples, uncertainty maps, reliability diagrams,
training curves.

Every function takes NumPy arrays (or eager tensors), returns a `matplotlib.figure.Figure` and,
given `path=`, also writes it as a PNG. The figures are made to be looked at: titles, class
colours with a legend, colourbars with units, readable at 100 dpi.

matplotlib is imported inside the functions, never when `tfp_seg` is imported. If no backend has
been chosen yet (no `MPLBACKEND`, no `matplotlib.use(...)`, no pyplot window open), the first
plot selects the non-interactive `"Agg"` backend, so headless training servers never try to open
a window; choose a backend yourself first to display the figures interactively. The figures are
pyplot figures: close them with `matplotlib.pyplot.close(fig)` when you make many.

Conventions (shared with the rest of `tfp_seg`): channels-last images `[H, W]` / `[H, W, 1]` /
`[H, W, 3]`; integer label maps; the sample axis first (`samples [N, H, W]`,
`annotations [K, H, W]`). Volumes are drawn one 2D slice at a time (`volume_slice`,
`informative_slice`).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np

from tfp_seg import _checks
from tfp_seg.plots import _common
from tfp_seg.plots._common import class_colors
from tfp_seg.plots.curves import plot_training_curves
from tfp_seg.plots.reliability import plot_reliability_diagram
from tfp_seg.plots.slices import informative_slice, volume_slice

__all__ = [
    "class_colors",
    "informative_slice",
    "plot_reliability_diagram",
    "plot_samples_grid",
    "plot_training_curves",
    "plot_uncertainty_maps",
    "volume_slice",
]

# what tests and callers reached through the module before the split
_pyplot = _common.pyplot


# ================================================================================================
# Samples grid
# ================================================================================================


def plot_samples_grid(
    image: Any,
    annotations: Any = None,
    samples: Any = None,
    *,
    num_classes: Optional[int] = None,
    class_names: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    max_columns: int = 8,
    path: Optional[_common.PathLike] = None,
    dpi: int = _common.DEFAULT_DPI,
):
    """The image, its K annotations and N sampled segmentations, in class colours.

    The image is in the first column; next to it one row of annotations ("rater 1..K"), then
    one row of the model's samples ("sample 1..N"), each wrapped after `max_columns` panels.
    A legend names the classes. Every panel is one axes: the figure has `1 + K + N` axes.

    Args:
      image: One image `[H, W]`, `[H, W, 1]` or `[H, W, 3]`.
      annotations: Integer label maps `[K, H, W]` (or one `[H, W]`), or None.
      samples: Integer label maps `[N, H, W]` (e.g. `model.sample(x, N)[:, i]`), or None.
      num_classes: Number of classes C; default `len(class_names)`, else `max(label) + 1`
        (at least 2).
      class_names: C names for the legend; default "background", "class 1", ...
      title: Figure title.
      max_columns: Panels per row before samples wrap to a new row.
      path: Write the figure as a PNG here (folders are created).
      dpi: Resolution of the PNG.

    Returns:
      The `matplotlib.figure.Figure`.
    """
    img = _common.check_image(image)
    hw = img.shape[:2]
    stacks = {}
    for name, value, form in (
        ("annotations", annotations, "[K, H, W]"),
        ("samples", samples, "[N, H, W]"),
    ):
        if value is not None:
            stacks[name] = _common.check_label_stack(value, name, form, hw)
    max_columns = _checks.positive_int(max_columns, "max_columns", minimum=2)
    top = stacks.get("annotations", np.zeros((0,) + hw, np.int64))
    bottom = stacks.get("samples", np.zeros((0,) + hw, np.int64))
    largest = max([int(s.max()) for s in stacks.values()], default=1)
    if num_classes is None:
        num_classes = len(class_names) if class_names is not None else max(2, largest + 1)
    if largest >= num_classes:
        raise ValueError(
            f"labels must lie in [0, num_classes={num_classes}); got a label {largest}."
        )
    names = _common.class_names(class_names, num_classes)
    colors = class_colors(num_classes)

    plt = _common.pyplot()
    from matplotlib import colors as mcolors
    from matplotlib.patches import Patch

    cmap = mcolors.ListedColormap(colors)
    norm = mcolors.BoundaryNorm(np.arange(num_classes + 1) - 0.5, num_classes)

    # Column 0: the image. Columns 1..: annotations, then samples, each group wrapped into
    # rows of at most `max_columns` panels; a group's first row carries its label.
    groups = [("annotations", "rater", top), ("model samples", "sample", bottom)]
    rows = []  # (group label or None, [(panel title, label map), ...])
    for group, prefix, maps in groups:
        panels = [(f"{prefix} {i + 1}", maps[i]) for i in range(len(maps))]
        for start in range(0, len(panels), max_columns):
            rows.append((group if start == 0 else None, panels[start : start + max_columns]))
    if not rows:
        rows.append((None, []))
    ncols = 1 + max(1, max(len(panels) for _, panels in rows))
    aspect = hw[0] / hw[1]
    fig = plt.figure(
        figsize=(_common.PANEL_INCHES * ncols, _common.PANEL_INCHES * aspect * len(rows) + 1.2),
        layout="constrained",
    )
    grid = fig.add_gridspec(len(rows), ncols)
    ax = fig.add_subplot(grid[0, 0])
    _common.show_image(ax, img)
    ax.set_title("image", fontsize=10, fontweight="bold")
    for r, (group, panels) in enumerate(rows):
        for c, (label, labels) in enumerate(panels, start=1):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(labels, cmap=cmap, norm=norm, interpolation="nearest")
            _common.clean(ax)
            ax.set_title(label, fontsize=10)
            if c == 1 and group is not None:
                ax.set_ylabel(group, fontsize=11, fontweight="bold")
    handles = [
        Patch(facecolor=colors[c], edgecolor="black", label=names[c]) for c in range(num_classes)
    ]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=min(num_classes, 6),
        frameon=False,
        fontsize=10,
    )
    if title is None:
        parts = []
        if len(top):
            parts.append(f"{len(top)} annotations")
        if len(bottom):
            parts.append(f"{len(bottom)} model samples")
        title = "Image, " + " and ".join(parts) if parts else "Image"
    fig.suptitle(title, fontsize=12)
    return _common.finish(fig, path, dpi)


# ================================================================================================
# Uncertainty maps
# ================================================================================================


def plot_uncertainty_maps(
    image: Any,
    mean_probs: Any,
    entropy: Any,
    mutual_info: Any,
    *,
    class_names: Optional[Sequence[str]] = None,
    title: Optional[str] = None,
    path: Optional[_common.PathLike] = None,
    dpi: int = _common.DEFAULT_DPI,
):
    """The image, the predictive probability of each foreground class, entropy and MI maps.

    Panels (one axes each, each but the image with its own colourbar axes): image |
    `P(class c)` for every foreground class `c = 1..C-1` (scale 0..1) | predictive entropy
    `H[p_bar]` (total uncertainty, nats, scale 0..log C) | mutual information (the part of the
    entropy that comes from disagreement between samples, nats, own scale). With `C` classes
    the figure has `1 + 2 * (C - 1 + 2)` axes (panels plus colourbars).

    Args:
      image: One image `[H, W]`, `[H, W, 1]` or `[H, W, 3]`.
      mean_probs: Predictive probabilities `[H, W, C]` (mean of the sampled softmax outputs),
        or the foreground probability `[H, W]` of a binary problem.
      entropy: Predictive entropy `[H, W]` in nats (`tfp_seg.uncertainty.predictive_entropy`).
      mutual_info: Mutual information `[H, W]` in nats (`tfp_seg.uncertainty.mutual_information`).
      class_names: C names (titles of the probability panels).
      title, path, dpi: As in `plot_samples_grid`.

    Returns:
      The `matplotlib.figure.Figure`.
    """
    img = _common.check_image(image)
    hw = img.shape[:2]
    probs = _common.array(mean_probs, "mean_probs").astype(np.float64)
    if probs.shape == hw:
        probs = np.stack([1.0 - probs, probs], axis=-1)
    if probs.ndim != 3 or probs.shape[:2] != hw or probs.shape[-1] < 2:
        raise ValueError(
            f"`mean_probs` must be [H, W, C] (C >= 2) or [H, W] with [H, W] = {hw}; "
            f"got {_common.shape(probs)}."
        )
    if not np.all(np.isfinite(probs)) or probs.min() < -1e-3 or probs.max() > 1 + 1e-3:
        raise ValueError(
            "`mean_probs` must hold probabilities in [0, 1] (apply a softmax to logits); got "
            f"values in [{np.nanmin(probs):.4g}, {np.nanmax(probs):.4g}]."
        )
    maps = {}
    for name, value in (("entropy", entropy), ("mutual_info", mutual_info)):
        arr = _common.array(value, name).astype(np.float64)
        if arr.shape != hw:
            raise ValueError(f"`{name}` must be a map [H, W] = {hw}; got {_common.shape(arr)}.")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"`{name}` contains NaN or Inf values.")
        maps[name] = arr
    num_classes = probs.shape[-1]
    names = _common.class_names(class_names, num_classes)

    plt = _common.pyplot()
    panels = 1 + (num_classes - 1) + 2
    aspect = hw[0] / hw[1]
    fig, axes = plt.subplots(
        1, panels, figsize=(2.5 * panels, 2.5 * aspect + 0.9), layout="constrained"
    )
    _common.show_image(axes[0], img)
    axes[0].set_title("image", fontsize=10, fontweight="bold")
    for c in range(1, num_classes):
        ax = axes[c]
        im = ax.imshow(probs[..., c], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        _common.clean(ax)
        ax.set_title(f"P({names[c]})", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8, label="probability")
    log_c = float(np.log(num_classes))
    ax = axes[num_classes]
    im = ax.imshow(maps["entropy"], cmap="magma", vmin=0.0, vmax=log_c, interpolation="nearest")
    _common.clean(ax)
    ax.set_title("predictive entropy\n(total uncertainty)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label=f"nats (max log {num_classes} = {log_c:.2f})")
    ax = axes[num_classes + 1]
    top = max(float(maps["mutual_info"].max()), 1e-3)
    im = ax.imshow(maps["mutual_info"], cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
    _common.clean(ax)
    ax.set_title("mutual information\n(sample disagreement)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="nats (own scale)")
    fig.suptitle(title or "Predictive probabilities and uncertainty", fontsize=12)
    return _common.finish(fig, path, dpi)


# ================================================================================================
# Reliability diagram
# ================================================================================================
