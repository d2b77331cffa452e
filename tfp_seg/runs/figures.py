"""The PNG figures of a report, drawn from the model's samples of the evaluated images.

```none
<out_dir>/figures/samples_<i>.png     image | K annotations | N model samples (test image i)
<out_dir>/figures/uncertainty_<i>.png image | P(class) | predictive entropy | mutual information
<out_dir>/figures/reliability.png     accuracy per confidence bin vs the diagonal, ECE
<out_dir>/figures/curves.png          loss per epoch; validation GED, HM-IoU, diversity per
                                      evaluated epoch, with the oracle's (or raters') values
```

`draw_curves` draws the last from the run's history alone (`history.json`).

Volumes (`images [B, D, H, W, channels]`, `annotations [B, K, D, H, W]`) get the same figures
of one axial slice each: the slice `d` with the most foreground in the volume's annotations
(`tfp_seg.plots.informative_slice`), taken of the image, the annotations, the samples and the
probabilities by `tfp_seg.plots.volume_slice`; the figure's title names it ("axial slice d of
D"). The image column shows the volume's first channel (the first modality of a NIfTI case,
FLAIR for BraTS) in grey. The reliability diagram counts every voxel.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Optional

import numpy as np

from tfp_seg import metrics, plots
from tfp_seg._io import atomic_path
from tfp_seg.plots.curves import EPOCHS_KEY, VALIDATION_CURVES
from tfp_seg.runs.dice import class_names
from tfp_seg.uncertainty import mutual_information, predictive_entropy

__all__ = ["draw_curves", "draw_figures"]


def _save_figure(fig, path: str, dpi: int) -> None:
    # pyplot only to close the figure: tfp_seg.plots chose the backend when it drew it, and
    # importing pyplot at module level would choose one when tfp_seg is imported.
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as tmp:  # tmp keeps the .png suffix
            fig.savefig(tmp, dpi=dpi, format="png", facecolor="white")
    finally:
        plt.close(fig)


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def _check_data(data: Any) -> tuple:
    images = getattr(data, "images", None)
    annotations = getattr(data, "annotations", None)
    if images is None or annotations is None:
        raise ValueError(
            "`data` must have `images` [B, H, W, channels] and `annotations` [B, K, H, W] "
            f"(AmbiguousShapes, AnnotatedImages); got {type(data).__name__}."
        )
    # Arrays and array-likes with a shape (the memory-mapped views of a streamed source) are
    # sliced batch by batch below, never read whole.
    if not hasattr(images, "shape"):
        images = np.asarray(images)
    if not hasattr(annotations, "shape"):
        annotations = np.asarray(annotations)
    if (
        len(images.shape) not in (4, 5)
        or len(annotations.shape) != len(images.shape)
        or images.shape[0] != annotations.shape[0]
        or images.shape[1:-1] != annotations.shape[2:]
    ):
        raise ValueError(
            "`data.images` must be [B, H, W, channels] and `data.annotations` [B, K, H, W] with "
            "the same B, H, W (volumes: [B, D, H, W, channels] and [B, K, D, H, W]); got "
            f"images {images.shape} and annotations {annotations.shape}."
        )
    if images.shape[0] == 0:
        raise ValueError("`data` holds no images.")
    return images, annotations


def _shown_views(image, annotations, prob_samples) -> tuple:
    """What the figures of one image show: `(image [H, W, ch], annotations [K, H, W],
    probability samples [N, H, W, C], where)`; for a volume its informative axial slice
    `d` (of its first channel) and `where = " (axial slice d of D)"`, else the image itself
    and `where = ""`."""
    image, annotations = np.asarray(image), np.asarray(annotations)
    if image.ndim == 3:
        return image, annotations, prob_samples, ""
    d = plots.informative_slice(annotations)
    views = (
        plots.volume_slice(image[..., :1], d),  # the first channel (modality) in grey
        plots.volume_slice(annotations, d, leading=1),
        plots.volume_slice(prob_samples, d, leading=1),
    )
    return views + (f" (axial slice {d} of {image.shape[0]})",)


def _reliability_accumulate(acc: dict, probs: np.ndarray, labels: np.ndarray, num_bins: int):
    """Adds one batch (`probs [b,H,W,C]`, annotations `[b,K,H,W]`) to per-bin sums."""
    k = labels.shape[1]
    probs_k = np.broadcast_to(probs[:, None], (probs.shape[0], k) + probs.shape[1:])
    part = metrics.reliability_diagram_data(probs_k, labels, num_bins=num_bins)
    counts = part["counts"].astype(np.float64)
    acc["counts"] += part["counts"]
    acc["conf_sum"] += np.nan_to_num(part["confidence"]) * counts
    acc["acc_sum"] += np.nan_to_num(part["accuracy"]) * counts
    acc["edges"] = part["edges"]


def _reliability_result(acc: dict) -> dict:
    counts = acc["counts"]
    n = max(int(counts.sum()), 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.where(counts > 0, acc["conf_sum"] / counts, np.nan)
        accuracy = np.where(counts > 0, acc["acc_sum"] / counts, np.nan)
    return {
        "confidence": confidence,
        "accuracy": accuracy,
        "counts": counts.astype(np.int64),
        "edges": acc["edges"],
        "ece": float(np.abs(acc["acc_sum"] - acc["conf_sum"]).sum() / n),
    }


def draw_curves(out_dir: str, history: Mapping[str, Any], dpi: int) -> list:
    """`figures/curves.png` of a run's history (`tfp_seg.plots.plot_training_curves`): the
    losses, and the validation curves with horizontal lines at `oracle_val_<metric>` (built-in
    benchmark) or `val_reference_diversity` (the raters' diversity, users' data). Returns
    `[(caption, "figures/curves.png")]`, or `[]` for a history with nothing to plot."""
    curves = [k for k in VALIDATION_CURVES if k in history]
    if "loss" not in history and not curves:
        return []
    reference = {k: history[f"oracle_{k}"] for k in curves if f"oracle_{k}" in history}
    label = "oracle"
    if not reference and "val_reference_diversity" in history:
        reference, label = {"val_diversity": history["val_reference_diversity"]}, "raters"
    points = len(history.get(EPOCHS_KEY) or [])
    detail = f"{points} validation evaluations" if curves else "no validation curves"
    fig = plots.plot_training_curves(
        history, reference=reference, reference_label=label, title=f"Training curves ({detail})"
    )
    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    _save_figure(fig, os.path.join(fig_dir, "curves.png"), dpi)
    caption = "Training curves: loss per epoch"
    if curves:
        caption += ", validation GED, HM-IoU and diversity per evaluated epoch"
        caption += f" (dashed: the {label})" if reference else ""
    return [(caption, "figures/curves.png")]


def draw_figures(
    out_dir: str,
    model: Any,
    data: Any,
    num_samples: int,
    seed: int,
    num_images: int,
    num_bins: int,
    batch_size: int,
    progress: Optional[bool],
    dpi: int,
) -> list:
    """Samples the model over `data` (batches, optional progress bar) and writes the PNGs.

    Returns `(caption, path relative to out_dir)` pairs.
    """
    images, annotations = _check_data(data)
    n = images.shape[0]
    num_classes = getattr(data, "num_classes", None)
    shown = min(num_images, n)
    if progress is None:
        progress = n >= 64
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm  # only for a progress bar, like tfp_seg.evaluation

        starts = tqdm(starts, desc="report figures", unit="batch", total=math.ceil(n / batch_size))
    rel = {
        "counts": np.zeros(num_bins, np.int64),
        "conf_sum": np.zeros(num_bins),
        "acc_sum": np.zeros(num_bins),
        "edges": None,
    }
    kept = []  # the views of the first `shown` images (_shown_views: slices of volumes)
    for start in starts:
        xb = images[start : start + batch_size]
        logits = np.asarray(
            model.sample_logits(xb, num_samples, seed=seed, batch_size=batch_size), np.float32
        )
        if logits.ndim != xb.ndim + 1 or logits.shape[1] != xb.shape[0]:
            raise ValueError(
                "`model.sample_logits` must return [N, B, H, W, C] (volumes: [N, B, D, H, W, "
                f"C]); got {logits.shape} for images {tuple(xb.shape)}."
            )
        prob_samples = _softmax(logits)
        num_classes = num_classes or prob_samples.shape[-1]
        _reliability_accumulate(
            rel, prob_samples.mean(axis=0), annotations[start : start + batch_size], num_bins
        )
        for j in range(max(0, min(shown - start, xb.shape[0]))):
            kept.append(_shown_views(images[start + j], annotations[start + j], prob_samples[:, j]))
    names = class_names(data, num_classes)

    fig_dir = os.path.join(out_dir, "figures")
    os.makedirs(fig_dir, exist_ok=True)
    written = []
    for i, (image, image_annotations, ps, where) in enumerate(kept):
        samples = ps.argmax(axis=-1)
        fig = plots.plot_samples_grid(
            image,
            image_annotations,
            samples,
            num_classes=num_classes,
            class_names=names,
            title=f"Test image {i}{where}: {annotations.shape[1]} annotations and "
            f"{num_samples} model samples",
        )
        _save_figure(fig, os.path.join(fig_dir, f"samples_{i}.png"), dpi)
        written.append(
            (f"Test image {i}{where}: annotations and model samples", f"figures/samples_{i}.png")
        )
        fig = plots.plot_uncertainty_maps(
            image,
            ps.mean(axis=0),
            predictive_entropy(ps),
            mutual_information(ps),
            class_names=names,
            title=f"Test image {i}{where}: predictive probabilities and uncertainty "
            f"({num_samples} samples)",
        )
        _save_figure(fig, os.path.join(fig_dir, f"uncertainty_{i}.png"), dpi)
        written.append(
            (
                f"Test image {i}{where}: mean probability, predictive entropy, mutual information",
                f"figures/uncertainty_{i}.png",
            )
        )
    fig = plots.plot_reliability_diagram(
        _reliability_result(rel),
        title=f"Reliability vs the annotations ({n} images, {num_samples} samples)",
    )
    _save_figure(fig, os.path.join(fig_dir, "reliability.png"), dpi)
    written.append(
        ("Reliability diagram of the predictive probabilities", "figures/reliability.png")
    )
    return written
