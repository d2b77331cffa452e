"""Evaluate a run: load its model back (`load_run`) and evaluate a trained model on the
held-out split, with the report files of `tfp_seg.runs.report` (`report.json`, `report.md`,
`figures/`): against the exact label distribution on the built-in benchmark
(`evaluate_ambiguous`), against the raters on users' data (`evaluate_annotations`, with the
literature's GED / HM-IoU at 16 and 100 samples).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Callable, Mapping, Optional

import keras

import tfp_seg  # noqa: F401  (registers the serialisable classes for load_model)
from tfp_seg.data import AmbiguousShapes
from tfp_seg.evaluation import evaluate_ambiguous, evaluate_annotations, format_report
from tfp_seg.models.wrappers import DeepEnsemble
from tfp_seg.runs.config import TrainConfig
from tfp_seg.runs.dice import batch_size_for, dice_report
from tfp_seg.runs.model import sampler_for
from tfp_seg.runs.report import write_report

__all__ = ["evaluate_data", "evaluate_trained", "load_run"]

# The sample sizes of the literature's tables on users' data (`ged_16`, `ged_100`, ...).
SAMPLE_COUNTS = (16, 100)


def evaluate_data(sampler, data, num_samples: int, seed, progress: bool = False) -> dict:
    """The report of `sampler` on `data` (images or volumes): `evaluate_ambiguous` for the
    built-in benchmark (exact label distribution, oracle values), else `evaluate_annotations`
    against the raters, with `ged_16`, `ged_100`, `hm_iou_16`, `hm_iou_100` (from the same
    draw of 100 samples); then the Dice of `tfp_seg.runs.dice` (`dice_class_<c>`,
    `class_names`, `dice_<region>` for the regions the data name; `oracle_dice_class_<c>` on
    the built-in benchmark), from the prediction `tfp-seg sample` saves."""
    if isinstance(data, AmbiguousShapes):
        report = evaluate_ambiguous(
            sampler, data, num_samples=num_samples, seed=seed, progress=progress
        )
    else:
        report = evaluate_annotations(
            sampler,
            data,
            num_samples=num_samples,
            seed=seed,
            sample_counts=SAMPLE_COUNTS,
            progress=progress,
            batch_size=batch_size_for(data.images),  # volumes: one at a time
        )
    return report | dice_report(sampler, data, num_samples, seed)


def evaluate_trained(
    model,
    config: TrainConfig,
    test_data,
    run_dir: str,
    facts: Optional[Mapping] = None,
    log: Callable = print,
) -> dict:
    """Evaluate a freshly trained run's sampler on `test_data` and write its report.

    The report holds the metrics of `evaluate_data` (`config.eval_samples` samples per
    image, `config.seed`), then `run`, `head`, `model`, `backbone` and `facts` (training facts
    such as `epochs`, `train_seconds`); `report.json`, `report.md` and the figures go into
    `run_dir`. Returns the report.
    """
    sampler = sampler_for(model, config)
    report = evaluate_data(
        sampler, test_data, config.eval_samples, config.seed, progress=config.progress
    )
    report.update(
        {
            "run": os.path.basename(run_dir),
            "head": config.head,
            "model": config.model,
            "backbone": config.backbone,
        }
    )
    report.update(facts or {})
    write_report(
        run_dir,
        report,
        sampler,
        test_data,
        num_samples=config.eval_samples,
        seed=config.seed,
        config=dataclasses.asdict(config),
        progress=config.progress,
    )
    log(format_report(report))
    return report


def load_run(path: str, config: Optional[TrainConfig] = None):
    """Load a run's model from its folder (`runs/<name>`) or a `.keras` file, `safe_mode=True`.

    Ensembles load as `DeepEnsemble` (from `<run>/ensemble/`); MC-dropout runs come back
    wrapped in `MCDropout` so that `sample_logits` samples dropout masks.
    """
    config = config or TrainConfig()
    if os.path.isdir(path) and os.path.isdir(os.path.join(path, "ensemble")):
        try:
            return DeepEnsemble.load(os.path.join(path, "ensemble"))
        except Exception as exc:
            raise ValueError(f"could not load ensemble in {path!r}: {exc}") from exc
    model_path = os.path.join(path, "model.keras") if os.path.isdir(path) else path
    if not os.path.isfile(model_path):
        raise FileNotFoundError(
            f"no model found at {model_path!r} (expected a run folder or a .keras file)"
        )
    try:
        model = keras.models.load_model(model_path, safe_mode=True)
    except Exception as exc:
        raise ValueError(f"could not load model {model_path!r}: {exc}") from exc
    return sampler_for(model, config)
