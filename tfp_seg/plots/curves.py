"""Training curves of `tfp_seg.plots`: the losses per epoch and the validation metrics per
evaluated epoch, as `tfp-seg train` records them in `history.json`."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from tfp_seg.plots import _common

# history key -> (panel title, y label)
VALIDATION_CURVES = {
    "val_ged": ("validation D²_GED ↓", "squared GED"),
    "val_hm_iou": ("validation HM-IoU ↑", "Hungarian-matched IoU"),
    "val_diversity": ("validation sample diversity", "E[d(S, S')]"),
}
EPOCHS_KEY = "val_eval_epochs"


def _series(history: Mapping[str, Any], key: str, length: Optional[int] = None) -> np.ndarray:
    values = _common.array(history[key], f"history[{key!r}]")
    if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.number):
        raise ValueError(
            f"`history[{key!r}]` must be a non-empty list of numbers; got {_common.shape(values)}"
            f" of dtype {values.dtype}."
        )
    if length is not None and values.size != length:
        raise ValueError(
            f"`history[{key!r}]` must have one value per entry of the list it belongs to "
            f"({length}); got {values.size}."
        )
    return values.astype(np.float64)


def _check_history(history: Any) -> tuple:
    if not isinstance(history, Mapping):
        raise ValueError(
            "`history` must be a mapping of lists (history.json of a run, or "
            f"`model.fit(...).history`); got {type(history).__name__}."
        )
    losses = {}
    if "loss" in history:
        losses["loss"] = _series(history, "loss")
        if "val_loss" in history:
            losses["val_loss"] = _series(history, "val_loss", losses["loss"].size)
    curves = {k: history[k] for k in VALIDATION_CURVES if k in history}
    epochs = None
    if curves:
        if EPOCHS_KEY not in history:
            raise ValueError(
                f"`history` has validation curves {sorted(curves)} but no `{EPOCHS_KEY}` (the "
                "1-based epochs they belong to)."
            )
        epochs = _series(history, EPOCHS_KEY)
        if np.any(epochs != np.round(epochs)) or epochs.min() < 1 or np.any(np.diff(epochs) <= 0):
            raise ValueError(
                f"`history[{EPOCHS_KEY!r}]` must be increasing epoch numbers >= 1; got "
                f"{epochs.tolist()}."
            )
        curves = {k: _series(history, k, epochs.size) for k in curves}
    if not losses and not curves:
        raise ValueError(
            f"`history` has nothing to plot: neither `loss` nor any of {list(VALIDATION_CURVES)}."
        )
    return losses, epochs, curves


def _check_reference(reference: Any, curves: Mapping[str, np.ndarray]) -> dict:
    if reference is None:
        return {}
    if not isinstance(reference, Mapping):
        raise ValueError(
            f"`reference` must map validation keys {list(VALIDATION_CURVES)} to numbers; got "
            f"{type(reference).__name__}."
        )
    unknown = sorted(set(reference) - set(VALIDATION_CURVES))
    if unknown:
        raise ValueError(
            f"`reference` has keys {unknown}; known: {list(VALIDATION_CURVES)} (the curves a "
            "reference value belongs to)."
        )
    out = {}
    for key, value in reference.items():
        value = float(value)
        if not np.isfinite(value):
            raise ValueError(f"`reference[{key!r}]` must be finite; got {value}.")
        if key in curves:
            out[key] = value
    return out


def plot_training_curves(
    history: Mapping[str, Any],
    *,
    reference: Optional[Mapping[str, float]] = None,
    reference_label: str = "oracle",
    title: Optional[str] = None,
    path: Optional[_common.PathLike] = None,
    dpi: int = _common.DEFAULT_DPI,
):
    """The training and validation loss per epoch, and the validation GED, HM-IoU and sample
    diversity per evaluated epoch.

    Panels, left to right, one axes each: the loss (if `history` has `loss`): `loss` and
    `val_loss` against the epochs `1..E`; then one panel for each of `val_ged`, `val_hm_iou`
    and `val_diversity` that `history` holds, its values (dots joined by lines) against
    `history["val_eval_epochs"]`, with a dashed horizontal line at `reference[key]` when given
    (the oracle of the built-in benchmark: `D²_GED = 0` up to Monte Carlo error, its HM-IoU,
    the exact `E[d(Y, Y')]` that the diversity should match). So the figure has
    `[loss] + number of validation curves` axes, all over the same epochs. NaN values leave
    gaps.

    Args:
      history: A mapping as in a run's `history.json` (or `model.fit(...).history`): `loss`
        `[E]` and optional `val_loss` `[E]` (one value per epoch); `val_eval_epochs` `[n]`
        (increasing 1-based epochs) with `val_ged`, `val_hm_iou`, `val_diversity` `[n]` each
        (any of them). Other keys are ignored.
      reference: Horizontal reference lines `{"val_ged": value, ...}` (keys among the three
        validation curves; values for curves not in `history` are ignored), or None.
      reference_label: Legend label of the reference lines ("oracle"; "raters" for the raters'
        diversity of users' data).
      title, path, dpi: As in `plot_samples_grid`.

    Returns:
      The `matplotlib.figure.Figure`.
    """
    losses, epochs, curves = _check_history(history)
    reference = _check_reference(reference, curves)
    plt = _common.pyplot()
    from matplotlib.ticker import MaxNLocator

    panels = (1 if losses else 0) + len(curves)
    fig, axes = plt.subplots(
        1, panels, figsize=(3.6 * panels, 3.3), layout="constrained", squeeze=False
    )
    axes = list(axes[0])
    if losses:
        ax = axes.pop(0)
        x = np.arange(1, losses["loss"].size + 1)
        ax.plot(x, losses["loss"], "-o", markersize=3, color="#0072B2", label="training")
        if "val_loss" in losses:
            ax.plot(x, losses["val_loss"], "-s", markersize=3, color="#D55E00", label="validation")
        ax.set_title("loss ↓", fontsize=10)
        ax.set_ylabel("loss")
    for ax, (key, values) in zip(axes, curves.items(), strict=True):
        name, ylabel = VALIDATION_CURVES[key]
        ax.plot(epochs, values, "-o", markersize=4, color="#009E73", label="model")
        if key in reference:
            ax.axhline(
                reference[key], linestyle="--", color="gray", linewidth=1.2, label=reference_label
            )
        ax.set_title(name, fontsize=10)
        ax.set_ylabel(ylabel)
    last = max(losses["loss"].size if losses else 0, int(epochs[-1]) if curves else 0)
    for ax in fig.axes:  # one epoch axis for all panels
        ax.set_xlim(0.5, last + 0.5)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, frameon=False)
    fig.suptitle(title or "Training curves", fontsize=12)
    return _common.finish(fig, path, dpi)
