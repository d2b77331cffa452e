"""The reliability diagram of `tfp_seg.plots`."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from tfp_seg.plots import _common


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
    path: Optional[_common.PathLike] = None,
    dpi: int = _common.DEFAULT_DPI,
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
    plt = _common.pyplot()
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
    return _common.finish(fig, path, dpi)
