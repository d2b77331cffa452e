"""The application: what `tfp-seg` does, built on the library (which never imports it).

```none
config.py     TrainConfig, load_config, the choices: HEADS (distribution heads), BASELINES
              (sampling baselines: mc_dropout, ensemble), BACKBONES, MODELS; spatial_dims
              (2: images, 3: volumes, VOLUME_DEFAULTS)
flags.py      TRAIN_FLAGS: the `tfp-seg train` flag of every TrainConfig field
data.py       make_data: the source of `config.data` (VOLUME_LOADERS for volumes) and the
              run's recorded split
model.py      build_model, compile_model, sampler_for (the run's predictive sampler)
train.py      train: run folder, training loop (strategies, resume, ensembles), save_model
monitor.py    ValidationMonitor: validation GED / HM-IoU / diversity every few epochs
evaluate.py   load_run, evaluate_trained (evaluation + report of a trained run)
control.py    controlled_sampler: the CLI's --covariance-temperature T|auto, --class-scales
dice.py       dice_report: per-class (and region) Dice of the predictive arg max
report.py     write_report: report.json, report.md, figures/
report_tables.py  render_markdown, METRICS: the markdown tables (metrics; GED, diversity, Dice)
figures.py    the report's PNG figures (volumes: one axial slice each)
volumes.py    runs on NIfTI volumes: VolumeSet (cases as a data set), patch_datasets
              (training patches), VolumeSampler (sliding windows, the brain as roi_mask)
```

A run writes `runs/<name>/{config.json, history.json, model.keras | ensemble/, report.json,
report.md, figures/}`; every file with `tfp_seg._io` (temporary name, fsync, rename).
`tfp_seg.experiment` and `tfp_seg.reporting` are the earlier names of these modules.
"""

from tfp_seg.runs.config import (
    BACKBONES,
    BASELINES,
    HEAD_CHOICES,
    HEADS,
    MODELS,
    TrainConfig,
    load_config,
    stored_config,
)
from tfp_seg.runs.data import make_data
from tfp_seg.runs.evaluate import evaluate_trained, load_run
from tfp_seg.runs.model import build_model, compile_model, sampler_for
from tfp_seg.runs.report import METRICS, render_markdown, write_report
from tfp_seg.runs.train import save_model, train

__all__ = [
    "BACKBONES",
    "BASELINES",
    "HEAD_CHOICES",
    "HEADS",
    "METRICS",
    "MODELS",
    "TrainConfig",
    "build_model",
    "compile_model",
    "evaluate_trained",
    "load_config",
    "load_run",
    "make_data",
    "render_markdown",
    "sampler_for",
    "save_model",
    "stored_config",
    "train",
    "write_report",
]
