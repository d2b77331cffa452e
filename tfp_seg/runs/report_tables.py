"""The markdown of a run report: what every metric means (`METRICS`), the metric table, the
table of GED, diversity and Dice, and `render_markdown`, which writes them all.

```none
## Metrics                     metric | model | oracle | what it means   (every METRICS key)
## GED, diversity and Dice     one row of the model, one of the oracle (or the raters):
                               D²_GED | sample diversity | Dice <class> ... | Dice <region> ...
## Other values                every other key (run facts)
## Figures, ## Configuration
```

The Dice columns are the report's `dice_class_<c>` (`tfp_seg.runs.dice`, named by its
`class_names`), the users' data evaluation's foreground `dice` and `dice_<region>` (regions
such as `tfp_seg.metrics.BRATS_REGIONS`), with their `oracle_` twins where there are any.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from tfp_seg.runs.dice import CLASS_PREFIX

__all__ = ["METRICS", "config_dict", "dice_table", "render_markdown"]

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
    "ged_se": (
        "GED standard error",
        "-",
        "Standard error of the GED's image mean (std of the per-image values / sqrt(images)): "
        "the split's images and the Monte Carlo draws together. Differences smaller than "
        "about twice it are noise.",
    ),
    "hm_iou": (
        "HM-IoU",
        "higher",
        "Hungarian-matched IoU between the samples and the K annotations: does every "
        "annotation have a close sample and vice versa.",
    ),
    "hm_iou_se": (
        "HM-IoU standard error",
        "-",
        "Standard error of the HM-IoU's image mean (as for the GED).",
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


def config_dict(config: Any) -> Optional[dict]:
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


def _is_dice_key(key: str) -> bool:
    """`dice`, `dice_class_<c>`, `dice_<region>` and their `oracle_` twins."""
    return re.fullmatch(r"(oracle_)?dice(_\w+)?", key) is not None


def _metric_keys(report: Mapping[str, Any]) -> list:
    """Known metrics first (in `METRICS` order), then any other key with an `oracle_` twin
    (the Dice keys go to the Dice table)."""
    keys = [k for k in METRICS if k in report]
    for key in report:
        if key in keys or key.startswith("oracle_") or _is_dice_key(key):
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
    table of GED, diversity and Dice (`dice_table`), the remaining values, optional figures
    and the run configuration.

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
    config = config_dict(config)
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

    dice = dice_table(report)
    lines += dice
    shown = set(metric_keys) | {f"oracle_{k}" for k in metric_keys} | set(_SAMPLING_KEYS)
    shown |= {"run"}
    if dice:
        shown |= {k for k in report if _is_dice_key(k)} | {"class_names"}
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


def _dice_columns(report: Mapping[str, Any]) -> list:
    """`(column title, key)` of every Dice of `report`: per class (in class order), the
    foreground mean `dice`, per region."""
    names = report.get("class_names") or []
    classes = []
    for key in report:
        match = re.fullmatch(CLASS_PREFIX + r"(\d+)", key)
        if match and _is_number(report[key]):
            classes.append(int(match.group(1)))
    columns = [
        (f"Dice {names[c] if c < len(names) else f'class {c}'}", f"{CLASS_PREFIX}{c}")
        for c in sorted(classes)
    ]
    if _is_number(report.get("dice")):
        columns.append(("Dice (foreground)", "dice"))
    for key in report:
        if key.startswith("dice_") and not key.startswith(CLASS_PREFIX):
            if _is_number(report[key]):
                columns.append((f"Dice {key.removeprefix('dice_').replace('_', ' ')}", key))
    return columns


def dice_table(report: Mapping[str, Any]) -> list:
    """The lines of the "GED, diversity and Dice" section of `report` (`[]` without Dice):
    one row of model values and one of the oracle's (built-in benchmark) or the raters'
    (users' data: their diversity), columns D²_GED, sample diversity, then every Dice."""
    dice = _dice_columns(report)
    if not dice:
        return []
    lead = [
        (t, k) for t, k in (("D²_GED ↓", "ged"), ("sample diversity", "diversity")) if k in report
    ]
    columns = lead + [(f"{title} ↑", key) for title, key in dice]
    reference = {key: report.get(f"oracle_{key}") for _, key in columns}
    label = "oracle"
    if all(v is None for v in reference.values()) and "reference_diversity" in report:
        reference["diversity"], label = report["reference_diversity"], "raters"
    lines = [
        "## GED, diversity and Dice",
        "",
        "| | " + " | ".join(title for title, _ in columns) + " |",
        "|---|" + "---:|" * len(columns),
        "| model | " + " | ".join(_fmt(report[key]) for _, key in columns) + " |",
    ]
    if any(v is not None for v in reference.values()):
        lines.append(f"| {label} | " + " | ".join(_fmt(reference[k]) for _, k in columns) + " |")
    lines += [
        "",
        "*Dice* (per class, background included, and per region: a union of classes) of the "
        "predictive arg max, the arg max of the mean of the sampled softmax outputs, against "
        "every annotation, averaged over the annotations and the images (volumes); 1 where the "
        "class is in neither map (the BraTS convention). The oracle's is the arg max of the "
        "exact per-pixel marginals. Keys: `dice_class_<c>`, `dice`, `dice_<region>`.",
        "",
    ]
    return lines
