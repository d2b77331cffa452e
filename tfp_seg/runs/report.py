"""Evaluation reports a person reads: `report.json`, `report.md` and PNG figures.

```none
<out_dir>/report.json                 the flat report dict (metrics, oracle values, run facts)
<out_dir>/report.md                   metric | model | oracle | what it means; GED, diversity
                                      and Dice; figures; config (tfp_seg.runs.report_tables)
<out_dir>/figures/samples_<i>.png     image | K annotations | N model samples (test image i;
                                      volumes: one axial slice, tfp_seg.runs.figures)
<out_dir>/figures/uncertainty_<i>.png image | P(class) | predictive entropy | mutual information
<out_dir>/figures/reliability.png     accuracy per confidence bin vs the diagonal, ECE
<out_dir>/figures/curves.png          loss per epoch; validation GED, HM-IoU, diversity per
                                      evaluated epoch (from the run's history.json)
```

`write_report` writes all of them (each file with `tfp_seg._io`: a temporary name, fsync,
rename; the figures are drawn by `tfp_seg.runs.figures`); `render_markdown`
(`tfp_seg.runs.report_tables`) only builds the markdown text. The report dict is the one of
`tfp_seg.evaluation.evaluate_ambiguous` (model values and `oracle_*` values), possibly with
run facts added (`run`, `head`, `train_seconds`, ...).
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Union

import numpy as np

from tfp_seg import _checks
from tfp_seg._io import atomic_write_json, atomic_write_text
from tfp_seg.evaluation import evaluate_ambiguous
from tfp_seg.runs.dice import DICE_BATCH, batch_size_for
from tfp_seg.runs.figures import draw_curves, draw_figures
from tfp_seg.runs.report_tables import METRICS, config_dict, render_markdown

__all__ = ["METRICS", "render_markdown", "write_report"]

PathLike = Union[str, os.PathLike]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _read_run_file(out_dir: str, name: str) -> Optional[dict]:
    """`out_dir/name` (a run's config.json or history.json) as a dict; None if missing or
    unreadable (the report does not depend on it)."""
    path = os.path.join(out_dir, name)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return value if isinstance(value, dict) else None


def write_report(
    out_dir: PathLike,
    report: Optional[Mapping[str, Any]] = None,
    model: Any = None,
    data: Any = None,
    num_samples: int = 16,
    seed: int = 0,
    *,
    config: Any = None,
    figures: bool = True,
    num_images: int = 3,
    num_bins: int = 10,
    batch_size: Optional[int] = None,
    progress: Optional[bool] = None,
    dpi: int = 100,
    title: Optional[str] = None,
    history: Optional[Mapping[str, Any]] = None,
) -> dict:
    """Write `report.json`, `report.md` and the figures of an evaluation into `out_dir`.

    Args:
      out_dir: A run folder (`runs/<name>`) or any output folder (created if needed).
      report: The report dict (`tfp_seg.evaluation.evaluate_ambiguous` + run facts). None:
        evaluate `model` on `data` first (which must then be `AmbiguousShapes`).
      model: Anything with `sample_logits(x, num_samples, seed=, batch_size=) -> [N,B,H,W,C]`
        (`ProbabilisticSegmenter`, `ProbabilisticUNet`, `MCDropout`, `DeepEnsemble`). Needed
        for the figures.
      data: The evaluated split: `images [B,H,W,ch]`, `annotations [B,K,H,W]`, `num_classes`
        (`AmbiguousShapes`, `tfp_seg.data.AnnotatedImages`). Needed for the figures.
      num_samples: Samples per image drawn for the figures (use the evaluation's value).
      seed: Sampling seed (use the evaluation's: the figures then show the evaluated samples,
        and the reliability diagram's ECE equals the report's `ece` for seed-deterministic
        samplers such as `ProbabilisticSegmenter` with the same `batch_size`).
      config: The run configuration for `report.md` (mapping or dataclass). None: read
        `out_dir/config.json` if there is one.
      figures: Draw the PNG figures (needs `model` and `data`; skipped without them).
      num_images: Images (the first of `data`) that get a samples grid and uncertainty maps.
      num_bins: Confidence bins of the reliability diagram.
      batch_size: Images per `sample_logits` call (default 16 images, or 1 volume:
        `tfp_seg.runs.dice.batch_size_for`).
      progress: Progress bar over the batches; None: only for 64 images or more.
      dpi: Resolution of the PNGs.
      title: First heading of `report.md` (default "Evaluation report: <run>").
      history: The run's training history (as `history.json`: `loss`, `val_loss` per epoch,
        the validation curves of `tfp_seg.runs.monitor`) for `figures/curves.png`
        (`tfp_seg.plots.plot_training_curves`; needs neither `model` nor `data`). None: read
        `out_dir/history.json` if there is one.

    Returns:
      `{"json": path, "markdown": path, "figures": [paths]}`.
    """
    out_dir = os.fspath(out_dir)
    if batch_size is None:
        images = getattr(data, "images", None)
        batch_size = DICE_BATCH if images is None else batch_size_for(images)
    for name, value, low in (
        ("num_samples", num_samples, 1),
        ("num_images", num_images, 0),
        ("num_bins", num_bins, 1),
        ("batch_size", batch_size, 1),
    ):
        _checks.positive_int(
            value, name, minimum=low, message="`{name}` must be an int >= {minimum}; got {value}."
        )
    if report is None:
        if model is None or data is None:
            raise ValueError("`report` is None: pass a report dict, or `model` and `data`.")
        report = evaluate_ambiguous(
            model,
            data,
            num_samples=num_samples,
            seed=seed,
            batch_size=batch_size,
            progress=bool(progress),
            num_bins=num_bins,
        )
    if not isinstance(report, Mapping):
        raise ValueError(f"`report` must be a mapping; got {type(report).__name__}.")
    report = _jsonable(report)
    if config is None:
        config = _read_run_file(out_dir, "config.json")
    config = config_dict(config)
    if history is None:
        history = _read_run_file(out_dir, "history.json")
    if history is not None and not isinstance(history, Mapping):
        raise ValueError(f"`history` must be a mapping of lists; got {type(history).__name__}.")
    os.makedirs(out_dir, exist_ok=True)

    figure_list = []
    if figures and history:
        figure_list += draw_curves(out_dir, history, dpi)
    if figures and model is not None and data is not None:
        figure_list += draw_figures(
            out_dir,
            model,
            data,
            num_samples,
            seed,
            num_images,
            num_bins,
            batch_size,
            progress,
            dpi,
        )
    json_path = os.path.join(out_dir, "report.json")
    atomic_write_json(json_path, report)
    md_path = os.path.join(out_dir, "report.md")
    atomic_write_text(
        md_path,
        render_markdown(report, config=config, figures=figure_list, title=title),
    )
    return {
        "json": json_path,
        "markdown": md_path,
        "figures": [os.path.join(out_dir, rel) for _, rel in figure_list],
    }
