"""Evaluation reports a person reads: `report.json`, `report.md` and PNG figures.

```none
<out_dir>/report.json                 the flat report dict (metrics, oracle values, run facts)
<out_dir>/report.md                   metric | model | oracle | what it means, figures, config
<out_dir>/figures/samples_<i>.png     image | K annotations | N model samples (test image i)
<out_dir>/figures/uncertainty_<i>.png image | P(class) | predictive entropy | mutual information
<out_dir>/figures/reliability.png     accuracy per confidence bin vs the diagonal, ECE
<out_dir>/figures/curves.png          loss per epoch; validation GED, HM-IoU, diversity per
                                      evaluated epoch (from the run's history.json)
```

`write_report` writes all of them (each file with `tfp_seg._io`: a temporary name, fsync,
rename; the figures are drawn by `tfp_seg.runs.figures`); `render_markdown` only builds the
markdown text. The report dict is the one of `tfp_seg.evaluation.evaluate_ambiguous` (model
values and `oracle_*` values), possibly with run facts added (`run`, `head`, `train_seconds`,
...).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from tfp_seg import _checks
from tfp_seg._io import atomic_write_json, atomic_write_text
from tfp_seg.evaluation import evaluate_ambiguous
from tfp_seg.runs.figures import draw_curves, draw_figures

__all__ = ["METRICS", "render_markdown", "write_report"]

PathLike = Union[str, os.PathLike]

# key -> (name shown, better direction, what it means). Order = order in the table.
METRICS: dict = {
    "ged": (
        "D²_GED",
        "lower",
        "Squared generalised energy distance between the model's sampled label maps and the "
        "true label distribution (exact modes, weighted): 2E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')] "
        "with d = 1 - IoU, E[d(S,S')] over pairs of distinct samples (unbiased, so a finite-N "
        "value can be slightly negative). 0 means the samples are distributed like the true "
        "labels; the oracle (N samples of the true distribution, same estimator) is 0 up to "
        "Monte Carlo error.",
    ),
    "ged_cross": (
        "E[d(S,Y)]",
        "lower",
        "Mean IoU distance between a model sample and a true label map (cross term of GED).",
    ),
    "ged_sample_diversity": (
        "E[d(S,S')]",
        "-",
        "Mean IoU distance between two independent model samples (diversity term of GED; "
        "unbiased: averaged over pairs of distinct samples); compare with E[d(Y,Y')].",
    ),
    "ged_reference_diversity": (
        "E[d(Y,Y')]",
        "-",
        "Mean IoU distance between two true label maps: the ambiguity of the data itself.",
    ),
    "hm_iou": (
        "HM-IoU",
        "higher",
        "Hungarian-matched IoU between the samples and the K annotations: does every "
        "annotation have a close sample and vice versa.",
    ),
    "ged_16": (
        "GED (16)",
        "lower",
        "Users' data: squared GED between 16 samples and the raters' annotations, the "
        "literature's V-statistic (all pairs, self-pairs included; tfp_seg.metrics), as in the "
        "LIDC tables of the Prob U-Net, PHiSeg and SSN papers.",
    ),
    "ged_100": (
        "GED (100)",
        "lower",
        "Users' data: the same with 100 samples (the papers' headline GED).",
    ),
    "hm_iou_16": (
        "HM-IoU (16)",
        "higher",
        "Users' data: Hungarian-matched IoU of 16 samples against the raters (the papers' "
        "headline HM-IoU).",
    ),
    "hm_iou_100": (
        "HM-IoU (100)",
        "higher",
        "Users' data: Hungarian-matched IoU of 100 samples against the raters.",
    ),
    "reference_diversity": (
        "rater diversity",
        "-",
        "Users' data: mean IoU distance between two raters' annotations (V-statistic): the "
        "ambiguity of the data, which the sample diversity should match.",
    ),
    "dice": (
        "Dice",
        "higher",
        "Users' data: Dice of the arg max of the mean prediction over the foreground classes, "
        "against each rater, averaged over raters and images.",
    ),
    "diversity": (
        "sample diversity",
        "match",
        "Mean IoU distance E[d(S,S')] between two independent model samples (averaged over "
        "pairs of distinct samples, so it is unbiased); should equal the oracle, the exact "
        "E[d(Y,Y')] of the true labels (the true ambiguity), which a sampler of the true "
        "distribution matches in expectation. 0 = the model always predicts the same map.",
    ),
    "nll": (
        "NLL (pixel)",
        "lower",
        "Expected per-pixel negative log-likelihood of the predictive probabilities under the "
        "true marginals (nats/pixel). The oracle is the entropy of the true marginals: the floor.",
    ),
    "nll_joint": (
        "NLL (joint)",
        "lower",
        "Monte Carlo estimate of -log p(whole annotation | image) per pixel (nats): how well "
        "entire label maps, not single pixels, are explained (the SSN training objective).",
    ),
    "ece": (
        "ECE",
        "lower",
        "Expected calibration error of the predictive probabilities against the K annotations "
        "(equal-width confidence bins): the gap between confidence and accuracy.",
    ),
    "ece_exact": (
        "ECE (exact)",
        "lower",
        "Expected calibration error against the exact per-pixel label marginals (accuracy = "
        "probability that the predicted class is right).",
    ),
    "brier": (
        "Brier",
        "lower",
        "Mean squared error between the predictive probabilities and the exact marginals.",
    ),
    "miou": (
        "mIoU",
        "higher",
        "Mean IoU of the predictive argmax against the annotations (a deterministic score).",
    ),
    "pixel_accuracy": (
        "pixel accuracy",
        "higher",
        "Fraction of pixels where the predictive argmax equals the annotation.",
    ),
    "aurc_pixel": (
        "AURC (pixel)",
        "lower",
        "Area under the risk-coverage curve of the pixels, accepted in order of the top-label "
        "confidence max_c p (ties together), error = predictive argmax wrong against an "
        "annotation: the mean error rate of the accepted pixels over all coverages. The oracle "
        "ranks the exact marginals by their own confidence.",
    ),
    "e_aurc_pixel": (
        "E-AURC (pixel)",
        "lower",
        "Excess pixel AURC over the best ranking of the same errors (correct pixels first): "
        "the part of the AURC that is due to the confidence ranking alone.",
    ),
    "augrc_pixel": (
        "AUGRC (pixel)",
        "lower",
        "Area under the generalized risk-coverage curve (Traub et al., 2024): accepted errors "
        "among all pixels, averaged over coverages; the average rate of silent failures. The "
        "oracle (exact marginals) is its optimum in expectation.",
    ),
    "aurc_image": (
        "AURC (image)",
        "lower",
        "Area under the risk-coverage curve of the images, accepted in order of minus their "
        "mean predictive entropy, risk = 1 - Dice of the predictive argmax (foreground classes, "
        "averaged over the annotations).",
    ),
    "e_aurc_image": (
        "E-AURC (image)",
        "lower",
        "Excess image AURC over the ranking of the images by their actual 1 - Dice.",
    ),
    "augrc_image": (
        "AUGRC (image)",
        "lower",
        "Area under the generalized risk-coverage curve of the images (1 - Dice accepted, "
        "divided by all images, averaged over coverages).",
    ),
    "val_ged": (
        "D²_GED (validation)",
        "lower",
        "The last point of the validation curve (figures/curves.png, epoch `val_eval_epoch`): "
        "the same GED on the first `val_images` validation images with `val_samples` "
        "samples, the oracle's value on those images.",
    ),
    "val_hm_iou": (
        "HM-IoU (validation)",
        "higher",
        "The last point of the validation HM-IoU curve (as `val_ged`).",
    ),
    "val_diversity": (
        "sample diversity (validation)",
        "match",
        "The last point of the validation diversity curve (as `val_ged`); the oracle is the "
        "exact E[d(Y,Y')] of those images.",
    ),
    "val_reference_diversity": (
        "rater diversity (validation)",
        "-",
        "Users' data: the raters' diversity on the validation images of the curves, which "
        "`val_diversity` should match.",
    ),
}
"""`{key: (name shown, better direction, meaning)}` of every report metric, in table order."""

_ARROWS = {"lower": " ↓", "higher": " ↑", "match": " ≈ oracle", "-": ""}
_SAMPLING_KEYS = ("num_images", "num_samples")


# ================================================================================================
# Markdown
# ================================================================================================


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
        value, (bool, np.bool_)
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}" if abs(int(value)) >= 10000 else str(int(value))
    if isinstance(value, (float, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "NaN"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return f"{v:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _config_dict(config: Any) -> Optional[dict]:
    if config is None:
        return None
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        return dataclasses.asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise ValueError(
        f"`config` must be a mapping or a dataclass instance (e.g. TrainConfig); got "
        f"{type(config).__name__}."
    )


def _metric_keys(report: Mapping[str, Any]) -> list:
    """Known metrics first (in `METRICS` order), then any other key with an `oracle_` twin."""
    keys = [k for k in METRICS if k in report]
    for key in report:
        if key in keys or key.startswith("oracle_"):
            continue
        if f"oracle_{key}" in report and _is_number(report[key]):
            keys.append(key)
    return keys


def render_markdown(
    report: Mapping[str, Any],
    config: Any = None,
    figures: Optional[Sequence[tuple]] = None,
    title: Optional[str] = None,
) -> str:
    """The report as markdown: a metric table (metric | model | oracle | what it means), the
    remaining values, optional figures and the run configuration.

    Args:
      report: The flat report dict (`tfp_seg.evaluation.evaluate_ambiguous`, plus run facts).
        Every metric of `METRICS` present in it gets a row; so does any other numeric key with
        an `oracle_<key>` twin. `oracle_*` values go into the oracle column ("—" where a metric
        has none). Values are shown with 4 decimals.
      config: The run configuration (a mapping or a dataclass such as `TrainConfig`), shown as
        a field | value table; None to leave it out.
      figures: `(caption, relative path)` pairs embedded as images.
      title: The first heading; default "Evaluation report" (+ the run name if known).

    Returns:
      The markdown text.
    """
    if not isinstance(report, Mapping):
        raise ValueError(f"`report` must be a mapping; got {type(report).__name__}.")
    config = _config_dict(config)
    run = report.get("run") or (config or {}).get("name")
    lines = [f"# {title or 'Evaluation report' + (f': {run}' if run else '')}", ""]
    facts = []
    if "num_images" in report:
        facts.append(f"{_fmt(report['num_images'])} held-out images")
    if "num_samples" in report:
        facts.append(f"{_fmt(report['num_samples'])} samples per image")
    if facts:
        lines += [", ".join(facts) + ".", ""]

    metric_keys = _metric_keys(report)
    if metric_keys:
        lines += [
            "## Metrics",
            "",
            "| metric | model | oracle | what it means |",
            "|---|---:|---:|---|",
        ]
        for key in metric_keys:
            name, direction, meaning = METRICS.get(key, (key, "-", ""))
            oracle = report.get(f"oracle_{key}")
            label = f"{name}{_ARROWS[direction]} (`{key}`)" if name != key else f"`{key}`"
            lines.append(f"| {label} | {_fmt(report[key])} | {_fmt(oracle)} | {_fmt(meaning)} |")
        lines += [
            "",
            "*Oracle*: the same metric for the true label distribution — a sampler that draws "
            "exact label maps (sampled metrics) or the exact per-pixel marginals (per-pixel "
            "metrics), with the same number of samples. It is the best value reachable on this "
            "data. ↓ lower is better, ↑ higher is better, ≈ oracle: should match the oracle.",
            "",
        ]

    shown = set(metric_keys) | {f"oracle_{k}" for k in metric_keys} | set(_SAMPLING_KEYS)
    shown |= {"run"}
    others = [k for k in report if k not in shown]
    if others:
        lines += ["## Other values", "", "| key | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(report[k])} |" for k in others]
        lines.append("")

    if figures:
        lines += ["## Figures", ""]
        for caption, rel in figures:
            lines += [f"**{caption}**", "", f"![{caption}]({rel})", ""]

    if config:
        lines += ["## Configuration", "", "| field | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in config.items()]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


# ================================================================================================
# Files
# ================================================================================================


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
    batch_size: int = 16,
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
      batch_size: Images per `sample_logits` call.
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
    config = _config_dict(config)
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
