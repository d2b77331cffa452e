"""What a run is: `TrainConfig`, its file form (`load_config`) and the choices it offers.

`head` takes a distribution head (`HEADS`: the model's output is a distribution over logits) or
a sampling baseline (`BASELINES`: a deterministic network sampled by dropout masks or by
independently trained members); `HEAD_CHOICES` is both, the values `tfp-seg train --head`
accepts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional

import yaml

from tfp_seg import _checks
from tfp_seg.distribute import POLICIES, STRATEGIES
from tfp_seg.models.backbones import catalog

__all__ = [
    "TrainConfig",
    "HEADS",
    "BASELINES",
    "HEAD_CHOICES",
    "BACKBONES",
    "MODELS",
    "load_config",
    "stored_config",
]

# Distribution heads (tfp_seg.layers): low-rank MVN logits (SSN), heteroscedastic normal logits,
# and the deterministic categorical head (a point-mass distribution over logits).
HEADS = ("low_rank", "heteroscedastic", "deterministic")
# Sampling baselines over a deterministic network (tfp_seg.models.MCDropout, DeepEnsemble).
BASELINES = ("mc_dropout", "ensemble")
HEAD_CHOICES = HEADS + BASELINES
BACKBONES = catalog.BACKBONE_NAMES  # the one list of named backbones
MODELS = ("segmenter", "prob_unet")


@dataclasses.dataclass
class TrainConfig:
    """Configuration of one training run (all fields settable from YAML/JSON or flags).

    `head` is one of `HEAD_CHOICES`: a distribution head (`HEADS`) or a sampling baseline
    (`BASELINES`).
    """

    name: Optional[str] = None
    model: str = "segmenter"
    head: str = "low_rank"
    backbone: str = "unet"
    rank: int = 10
    num_samples: int = 20
    marginal_weight: float = 1.0
    epochs: int = 12
    batch_size: int = 8
    learning_rate: float = 1e-3
    image_size: int = 64
    num_images: int = 640
    num_annotations: int = 4
    base_filters: int = 16
    depth: int = 3
    dropout: Optional[float] = None
    ensemble_size: int = 3
    latent_dim: int = 6
    beta: float = 1.0
    seed: int = 0
    eval_samples: int = 16
    output_dir: str = "runs"
    savedmodels_dir: str = "savedmodels"
    export: bool = True
    progress: bool = True
    strategy: str = "auto"
    resume: bool = False
    mixed_precision: Optional[str] = None

    def validate(self) -> "TrainConfig":
        if self.model not in MODELS:
            raise ValueError(f"`model` must be one of {MODELS}; got {self.model!r}.")
        if self.head not in HEAD_CHOICES:
            raise ValueError(f"`head` must be one of {HEAD_CHOICES}; got {self.head!r}.")
        if self.backbone not in BACKBONES:
            raise ValueError(f"`backbone` must be one of {BACKBONES}; got {self.backbone!r}.")
        if self.dropout is None:
            self.dropout = 0.2 if self.head == "mc_dropout" else 0.0
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1); got {self.dropout!r}.")
        if self.model == "prob_unet" and self.head not in ("low_rank", "deterministic"):
            raise ValueError(
                f"`head` {self.head!r} does not apply to `model` prob_unet (its latent space "
                "is the distribution); leave `head` at its default."
            )
        if self.head == "mc_dropout" and self.dropout == 0.0:
            raise ValueError("`head` mc_dropout needs `dropout` > 0 (default 0.2).")
        for field in (
            "rank",
            "num_samples",
            "epochs",
            "batch_size",
            "num_images",
            "eval_samples",
            "ensemble_size",
            "latent_dim",
        ):
            _checks.positive_int(getattr(self, field), field)
        if self.image_size % (2**self.depth):
            raise ValueError(
                f"`image_size` ({self.image_size}) must be divisible by 2**depth ({2**self.depth})."
            )
        if not self.beta >= 0:
            raise ValueError(f"`beta` must be >= 0; got {self.beta!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be > 0; got {self.learning_rate!r}.")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"`strategy` must be one of {STRATEGIES}; got {self.strategy!r}.")
        if self.mixed_precision not in POLICIES:
            raise ValueError(
                f"`mixed_precision` must be one of {POLICIES}; got {self.mixed_precision!r}."
            )
        if self.resume and not self.name:
            raise ValueError(
                "`resume` needs a run `name` (the run folder <output_dir>/<name> holds the "
                "backup); pass the same name when restarting."
            )
        return self

    def resolved_name(self) -> str:
        if self.name:
            return self.name
        tag = "ssn" if self.head == "low_rank" else self.head
        if self.model != "segmenter":
            tag = self.model
        return f"{tag}_{self.backbone}_{time.strftime('%Y%m%d-%H%M%S')}"


def load_config(path: str) -> dict:
    """Read a YAML or JSON config file into a dict of `TrainConfig` fields."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    try:
        values = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except Exception as exc:  # malformed YAML/JSON: say which file and why
        raise ValueError(f"could not parse config file {path}: {exc}") from exc
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ValueError(f"config file {path} must hold a mapping of fields; got {type(values)}.")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(
            f"config file {path} has unknown fields {unknown}; known: {sorted(known)}."
        )
    return values


def stored_config(run_dir: str) -> Optional[TrainConfig]:
    """The `TrainConfig` of a run folder's `config.json` (unknown fields ignored), or None
    when the folder has none. Raises `ValueError` for an unreadable or corrupt file."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"corrupt run config {path}: {exc}") from exc
    if not isinstance(stored, dict):
        raise ValueError(f"corrupt run config {path}: not a mapping of fields")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in stored.items() if k in known})
