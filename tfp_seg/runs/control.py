"""Post-inference control of a run's samples from the command line (`tfp-seg evaluate |
sample | export --covariance-temperature T|auto --class-scales s_0,...,s_{C-1}`).

```none
--covariance-temperature T     Sigma' = T Sigma (calibration.with_temperature), mean unchanged
--covariance-temperature auto  T chosen on the run's validation split against its raters
                               (calibration.CovarianceTemperature: the grid's lowest GED)
--class-scales s_0,...         class c's logit noise x s_c (calibration.scale_class_covariance)
```
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence

import numpy as np

from tfp_seg.calibration import ControlledSampler, CovarianceTemperature
from tfp_seg.runs.config import TrainConfig
from tfp_seg.runs.data import make_data

__all__ = ["add_control_args", "controlled_sampler", "parse_class_scales", "parse_temperature"]

AUTO = "auto"


def parse_temperature(text: str):
    """`"auto"` or a finite number > 0 (argparse type of `--covariance-temperature`)."""
    import argparse

    if text.strip().lower() == AUTO:
        return AUTO
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number > 0, got {text!r}")
    return value


def parse_class_scales(text: str) -> tuple:
    """Comma-separated finite numbers >= 0, one per class (argparse type of `--class-scales`)."""
    import argparse

    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers >= 0 (one per class), got {text!r}"
        ) from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise argparse.ArgumentTypeError(
            f"expected comma-separated numbers >= 0 (one per class), got {text!r}"
        )
    return values


def add_control_args(p) -> None:
    p.add_argument(
        "--covariance-temperature",
        type=parse_temperature,
        metavar="T|auto",
        help="SSN / heteroscedastic / mixture heads: sample with the logit covariance times T "
        "(mean unchanged), or 'auto': T of the lowest GED on the run's validation split "
        "against its raters (default: the model as trained)",
    )
    p.add_argument(
        "--class-scales",
        type=parse_class_scales,
        metavar="S0,S1,...",
        help="covariance heads: scale class c's logit noise by S_c, one number per class "
        "(default: all 1)",
    )


def controlled_sampler(
    sampler,
    config: TrainConfig,
    run_dir: str,
    temperature=None,
    class_scales: Optional[Sequence[float]] = None,
    log: Callable = print,
):
    """`(sampler, facts)`: the run's sampler under the asked control (a `ControlledSampler`)
    and what the report records of it, or `(sampler, {})` when no control is asked.

    Raises `ValueError` naming the flag when the model has no covariance head or the
    validation split for `auto` is not there in memory."""
    if temperature is None and class_scales is None:
        return sampler, {}
    given = 1.0 if temperature in (None, AUTO) else temperature
    try:
        wrapped = ControlledSampler(sampler, given, class_scales)
    except ValueError as exc:
        flag = "--covariance-temperature" if temperature is not None else "--class-scales"
        raise ValueError(f"{flag}: {exc}") from None
    facts: dict = {"class_scales": wrapped.control_config()["class_scales"]}
    if temperature == AUTO:
        _, val, _ = make_data(config, run_dir)
        images, raters = getattr(val, "images", None), getattr(val, "annotations", None)
        if not (isinstance(images, np.ndarray) and isinstance(raters, np.ndarray)):
            raise ValueError(
                "--covariance-temperature auto fits on the run's validation split in memory; "
                "this run's is not in memory (retry with --no-stream, or give a number)"
            )
        if not len(images):
            raise ValueError(
                "--covariance-temperature auto fits on the run's validation split; this run's "
                "is empty (give a number)"
            )
        fitted = CovarianceTemperature(seed=config.seed).fit(
            sampler,
            images,
            raters,
            ignore_label=getattr(val, "ignore_label", None),
            class_scales=class_scales,
        )
        wrapped = fitted.wrap(sampler)
        facts["covariance_temperature_fit"] = {
            "on": f"validation split ({len(images)} images, their raters)",
            "ged_by_temperature": {str(t): g for t, g in fitted.ged_by_temperature.items()},
        }
        log(
            f"covariance temperature {fitted.temperature:g} (validation GED "
            f"{fitted.ged_before:.4f} at 1 -> {fitted.ged_after:.4f})"
        )
    facts["covariance_temperature"] = float(wrapped.temperature)
    return wrapped, facts
