"""Figures of probabilistic segmentations: samples, uncertainty maps, reliability diagrams.

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
`annotations [K, H, W]`).
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from tfp_seg import _checks, _io

__all__ = [
    "class_colors",
    "plot_reliability_diagram",
    "plot_samples_grid",
    "plot_uncertainty_maps",
]

PathLike = Union[str, os.PathLike]

# Background dark grey, then colour-blind-safe qualitative colours (Okabe-Ito), then tab20.
_BASE_COLORS = (
    "#202020",  # background
    "#E69F00",  # orange
    "#56B4E9",  # sky blue
    "#009E73",  # bluish green
    "#F0E442",  # yellow
    "#CC79A7",  # reddish purple
    "#D55E00",  # vermillion
    "#0072B2",  # blue
)
_PANEL_INCHES = 1.9
_DEFAULT_DPI = 100


# ================================================================================================
# Helpers
# ================================================================================================


def _pyplot():
    """`matplotlib.pyplot`, after selecting `"Agg"` if no backend has been chosen."""
    import matplotlib

    if os.environ.get("MPLBACKEND") is None and matplotlib.get_backend(auto_select=False) is None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _array(x: Any, name: str) -> np.ndarray:
    if x is None:
        raise ValueError(f"`{name}` must be an array; got None.")
    arr = np.asarray(x)
    if arr.dtype == object:
        raise ValueError(f"`{name}` must be a numeric array; got dtype object.")
    return arr


def _shape(x: np.ndarray) -> str:
    return f"shape {tuple(x.shape)}"


def _check_image(image: Any) -> np.ndarray:
    """`[H, W]`, `[H, W, 1]` or `[H, W, 3|4]` -> float array `[H, W]` or `[H, W, 3]`."""
    img = _array(image, "image")
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    elif img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    if not (img.ndim == 2 or (img.ndim == 3 and img.shape[-1] == 3)):
        raise ValueError(
            "`image` must be one image [H, W], [H, W, 1] or [H, W, 3] (channels last); "
            f"got {_shape(img)}."
        )
    img = img.astype(np.float64)
    if not np.all(np.isfinite(img)):
        raise ValueError("`image` contains NaN or Inf values.")
    return img


def _check_label_stack(x: Any, name: str, form: str, hw: tuple) -> np.ndarray:
    arr = _array(x, name)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"`{name}` must be integer label maps {form}; got {_shape(arr)}.")
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        raise ValueError(
            f"`{name}` must hold integer class labels {form}; got dtype {arr.dtype} "
            "(take the argmax of probabilities or logits first)."
        )
    if arr.shape[1:] != hw:
        raise ValueError(
            f"`{name}` must have the image's spatial shape {hw}; got {_shape(arr)} {form}."
        )
    if arr.shape[0] == 0:
        raise ValueError(f"`{name}` is empty ({_shape(arr)}).")
    if arr.min() < 0:
        raise ValueError(f"`{name}` holds negative labels (min {arr.min()}).")
    return arr.astype(np.int64)


def class_colors(num_classes: int) -> list:
    """RGBA colours of classes `0..num_classes-1` (class 0, the background, is dark grey)."""
    from matplotlib import colormaps
    from matplotlib import colors as mcolors

    num_classes = _checks.positive_int(num_classes, "num_classes")
    out = [mcolors.to_rgba(c) for c in _BASE_COLORS[:num_classes]]
    extra = colormaps["tab20"]
    for i in range(len(out), num_classes):
        out.append(extra((i - len(_BASE_COLORS)) % 20))
    return out


def _class_names(class_names: Optional[Sequence[str]], num_classes: int) -> list:
    if class_names is None:
        return ["background"] + [f"class {c}" for c in range(1, num_classes)]
    names = [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(
            f"`class_names` must name all {num_classes} classes; got {len(names)}: {names}."
        )
    return names


def _show_image(ax, img: np.ndarray) -> None:
    lo, hi = float(img.min()), float(img.max())
    if img.ndim == 2:
        ax.imshow(
            img, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1.0, interpolation="nearest"
        )
    else:
        scaled = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        ax.imshow(scaled, interpolation="nearest")
    _clean(ax)


def _clean(ax) -> None:
    ax.set_xticks([])
    ax.set_yticks([])


def _finish(fig, path: Optional[PathLike], dpi: int):
    if path is not None:
        folder = os.path.dirname(os.fspath(path))
        if folder:
            os.makedirs(folder, exist_ok=True)
        with _io.atomic_path(path) as tmp:  # readers never see a half-written PNG
            fig.savefig(tmp, dpi=dpi, format="png", facecolor="white")
    return fig


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
    path: Optional[PathLike] = None,
    dpi: int = _DEFAULT_DPI,
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
    img = _check_image(image)
    hw = img.shape[:2]
    stacks = {}
    for name, value, form in (
        ("annotations", annotations, "[K, H, W]"),
        ("samples", samples, "[N, H, W]"),
    ):
        if value is not None:
            stacks[name] = _check_label_stack(value, name, form, hw)
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
    names = _class_names(class_names, num_classes)
    colors = class_colors(num_classes)

    plt = _pyplot()
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
        figsize=(_PANEL_INCHES * ncols, _PANEL_INCHES * aspect * len(rows) + 1.2),
        layout="constrained",
    )
    grid = fig.add_gridspec(len(rows), ncols)
    ax = fig.add_subplot(grid[0, 0])
    _show_image(ax, img)
    ax.set_title("image", fontsize=10, fontweight="bold")
    for r, (group, panels) in enumerate(rows):
        for c, (label, labels) in enumerate(panels, start=1):
            ax = fig.add_subplot(grid[r, c])
            ax.imshow(labels, cmap=cmap, norm=norm, interpolation="nearest")
            _clean(ax)
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
    return _finish(fig, path, dpi)


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
    path: Optional[PathLike] = None,
    dpi: int = _DEFAULT_DPI,
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
    img = _check_image(image)
    hw = img.shape[:2]
    probs = _array(mean_probs, "mean_probs").astype(np.float64)
    if probs.shape == hw:
        probs = np.stack([1.0 - probs, probs], axis=-1)
    if probs.ndim != 3 or probs.shape[:2] != hw or probs.shape[-1] < 2:
        raise ValueError(
            f"`mean_probs` must be [H, W, C] (C >= 2) or [H, W] with [H, W] = {hw}; "
            f"got {_shape(probs)}."
        )
    if not np.all(np.isfinite(probs)) or probs.min() < -1e-3 or probs.max() > 1 + 1e-3:
        raise ValueError(
            "`mean_probs` must hold probabilities in [0, 1] (apply a softmax to logits); got "
            f"values in [{np.nanmin(probs):.4g}, {np.nanmax(probs):.4g}]."
        )
    maps = {}
    for name, value in (("entropy", entropy), ("mutual_info", mutual_info)):
        arr = _array(value, name).astype(np.float64)
        if arr.shape != hw:
            raise ValueError(f"`{name}` must be a map [H, W] = {hw}; got {_shape(arr)}.")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"`{name}` contains NaN or Inf values.")
        maps[name] = arr
    num_classes = probs.shape[-1]
    names = _class_names(class_names, num_classes)

    plt = _pyplot()
    panels = 1 + (num_classes - 1) + 2
    aspect = hw[0] / hw[1]
    fig, axes = plt.subplots(
        1, panels, figsize=(2.5 * panels, 2.5 * aspect + 0.9), layout="constrained"
    )
    _show_image(axes[0], img)
    axes[0].set_title("image", fontsize=10, fontweight="bold")
    for c in range(1, num_classes):
        ax = axes[c]
        im = ax.imshow(probs[..., c], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        _clean(ax)
        ax.set_title(f"P({names[c]})", fontsize=10)
        fig.colorbar(im, ax=ax, shrink=0.8, label="probability")
    log_c = float(np.log(num_classes))
    ax = axes[num_classes]
    im = ax.imshow(maps["entropy"], cmap="magma", vmin=0.0, vmax=log_c, interpolation="nearest")
    _clean(ax)
    ax.set_title("predictive entropy\n(total uncertainty)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label=f"nats (max log {num_classes} = {log_c:.2f})")
    ax = axes[num_classes + 1]
    top = max(float(maps["mutual_info"].max()), 1e-3)
    im = ax.imshow(maps["mutual_info"], cmap="magma", vmin=0.0, vmax=top, interpolation="nearest")
    _clean(ax)
    ax.set_title("mutual information\n(sample disagreement)", fontsize=10)
    fig.colorbar(im, ax=ax, shrink=0.8, label="nats (own scale)")
    fig.suptitle(title or "Predictive probabilities and uncertainty", fontsize=12)
    return _finish(fig, path, dpi)


# ================================================================================================
# Reliability diagram
# ================================================================================================


def _check_reliability(data: Mapping[str, Any]) -> dict:
    if not isinstance(data, Mapping):
        raise ValueError(
            "`reliability_data` must be the dict of `tfp_seg.metrics.reliability_diagram_data`; "
            f"got {type(data).__name__}."
        )
    missing = [k for k in ("confidence", "accuracy", "counts", "edges", "ece") if k not in data]
    if missing:
        raise ValueError(
            f"`reliability_data` lacks {missing} (use tfp_seg.metrics.reliability_diagram_data)."
        )
    out = {
        k: np.asarray(data[k], np.float64) for k in ("confidence", "accuracy", "counts", "edges")
    }
    m = out["counts"].shape
    if (
        len(m) != 1
        or out["confidence"].shape != m
        or out["accuracy"].shape != m
        or out["edges"].shape != (m[0] + 1,)
    ):
        raise ValueError(
            "`reliability_data` must hold `confidence`, `accuracy`, `counts` of shape [M] and "
            f"`edges` of shape [M + 1]; got confidence {out['confidence'].shape}, accuracy "
            f"{out['accuracy'].shape}, counts {out['counts'].shape}, edges {out['edges'].shape}."
        )
    out["ece"] = float(data["ece"])
    return out


def plot_reliability_diagram(
    reliability_data: Mapping[str, Any],
    *,
    title: Optional[str] = None,
    path: Optional[PathLike] = None,
    dpi: int = _DEFAULT_DPI,
):
    """Reliability diagram: accuracy per confidence bin against the diagonal, plus bin counts.

    Top axes: one blue bar per non-empty bin, spanning the bin, with height the bin's accuracy
    (the bar container is labelled `"accuracy"`); red hatched outlines from the accuracy to the
    bin's mean confidence (the gap; weighted by the counts and summed it is the ECE); black
    dots at (mean confidence, accuracy); the dashed diagonal is perfect calibration. Bottom
    axes: number of pixels per bin (log scale). The ECE is in the title; the legend below.
    Two axes in all.

    Args:
      reliability_data: The dict of `tfp_seg.metrics.reliability_diagram_data`
        (`confidence`, `accuracy`, `counts` `[M]`, `edges` `[M + 1]`, `ece`).
      title, path, dpi: As in `plot_samples_grid`.

    Returns:
      The `matplotlib.figure.Figure`.
    """
    d = _check_reliability(reliability_data)
    plt = _pyplot()
    edges = d["edges"]
    left, width = edges[:-1], np.diff(edges)
    nonempty = d["counts"] > 0
    fig, (ax, ax_n) = plt.subplots(
        2,
        1,
        figsize=(5.6, 6.6),
        sharex=True,
        layout="constrained",
        gridspec_kw={"height_ratios": [3, 1]},
    )
    ax.bar(
        left[nonempty],
        d["accuracy"][nonempty],
        width=width[nonempty],
        align="edge",
        color="#4C72B0",
        edgecolor="black",
        linewidth=0.6,
        label="accuracy",
    )
    gap = d["confidence"][nonempty] - d["accuracy"][nonempty]
    # Outline + hatch only: the accuracy bars keep their colour where the gap overlaps them.
    ax.bar(
        left[nonempty],
        gap,
        bottom=d["accuracy"][nonempty],
        width=width[nonempty],
        align="edge",
        facecolor="none",
        edgecolor="#CC2222",
        hatch="///",
        linewidth=0.8,
        label="gap: accuracy to mean confidence",
    )
    ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1.2, label="perfect calibration")
    ax.plot(
        d["confidence"][nonempty],
        d["accuracy"][nonempty],
        "o",
        color="black",
        markersize=3.5,
        label="bin (mean confidence, accuracy)",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("accuracy in bin")
    ax.grid(alpha=0.3)
    counts = np.where(nonempty, d["counts"], np.nan)
    ax_n.bar(
        left, counts, width=width, align="edge", color="#888888", edgecolor="black", linewidth=0.6
    )
    if nonempty.any():
        ax_n.set_yscale("log")
        ax_n.set_ylim(0.5, float(np.nanmax(counts)) * 3)
    ax_n.set_xlabel("confidence (top-class probability)")
    ax_n.set_ylabel("pixels (log)")
    ax_n.grid(alpha=0.3)
    total = int(d["counts"].sum())
    head = title or "Reliability diagram"
    fig.suptitle(f"{head}\nECE = {d['ece']:.4f}  ({total:,} pixels, {len(left)} bins)", fontsize=11)
    fig.legend(
        *ax.get_legend_handles_labels(),
        loc="outside lower center",
        ncols=2,
        fontsize=8.5,
        frameon=False,
    )
    return _finish(fig, path, dpi)
