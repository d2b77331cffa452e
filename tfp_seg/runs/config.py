"""What a run is: `TrainConfig`, its file form (`load_config`) and the choices it offers.

`head` takes a distribution head (`HEADS`: the model's output is a distribution over logits) or
a sampling baseline (`BASELINES`: a deterministic network sampled by dropout masks or by
independently trained members); `HEAD_CHOICES` is both, the values `tfp-seg train --head`
accepts. `ensemble` (`ENSEMBLES`) makes the built-in U-Net an efficient ensemble of
`ensemble_size` members (BatchEnsemble or Packed-Ensembles) under a distribution head, trained
as one model and sampled with the members as samples.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Optional, Union

import yaml

from tfp_seg import _checks
from tfp_seg.data import sources as data_sources
from tfp_seg.distribute import POLICIES, STRATEGIES
from tfp_seg.layers import _init as layer_init
from tfp_seg.models.backbones import catalog

__all__ = [
    "TrainConfig",
    "HEADS",
    "BASELINES",
    "HEAD_CHOICES",
    "BACKBONES",
    "MODELS",
    "ENSEMBLES",
    "PATCH_DEFAULTS",
    "VOLUME_DEFAULTS",
    "load_config",
    "stored_config",
]

# Distribution heads (tfp_seg.layers): low-rank MVN logits (SSN), heteroscedastic normal logits,
# the deterministic categorical head (a point-mass distribution over logits), and a mixture of
# `components` low-rank components with image-level weights (MixtureLowRankLogits).
HEADS = ("low_rank", "heteroscedastic", "deterministic", "mixture")
"""The distribution heads of `TrainConfig.head` / `tfp-seg train --head`."""
# Sampling baselines over a deterministic network (tfp_seg.models.MCDropout, DeepEnsemble).
BASELINES = ("mc_dropout", "ensemble")
"""The sampling baselines of `TrainConfig.head` (MC dropout, deep ensemble)."""
HEAD_CHOICES = HEADS + BASELINES
"""Every value `TrainConfig.head` accepts: `HEADS` and `BASELINES`."""
BACKBONES = catalog.BACKBONE_NAMES  # the one list of named backbones
"""The backbones of `TrainConfig.backbone` (`tfp_seg.models.BACKBONE_NAMES`)."""
MODELS = ("segmenter", "prob_unet", "hprob_unet")
"""The models of `TrainConfig.model`: backbone + head, the Probabilistic U-Net, or the
Hierarchical Probabilistic U-Net."""
LATENT_MODELS = ("prob_unet", "hprob_unet")
"""The conditional-VAE models (no distribution head; an ELBO of their own)."""
# The latent size where a run leaves `latent_dim` unset: Kohl et al.'s 6 for the one global
# latent, 1 per cell and level for the hierarchical model (as its reference).
LATENT_DIM_DEFAULTS = {"prob_unet": 6, "hprob_unet": 1}
# How the K annotations of an image are scored in training: one drawn per image and step, all
# of them from one set of logit samples (label sets [B, K, H, W]), or their per-pixel fractions
# (soft labels [B, H, W, C], per-pixel heads only).
ANNOTATIONS = ("random", "all", "marginal")
# Normalisation layers of the built-in U-Net (tfp_seg.models.UNet(norm=...)).
NORMS = ("group", "batch")
# Learning rate over the epochs (`lr_schedule`): constant, or cosine decay to 0 by epoch.
LR_SCHEDULES = ("constant", "cosine")
# Efficient ensembles of the built-in U-Net (tfp_seg.models.UNet(ensemble=...)).
ENSEMBLES = ("batch", "packed")
# Volumes (`spatial_dims=3`): the defaults of the fields that size the built-in benchmark and
# its training, where a run on volumes leaves them unset (`TrainConfig.__post_init__`): an SSN
# on 24^3 volumes that trains in a few minutes on 2 CPU cores (docs/cli.md, "Volumes").
VOLUME_DEFAULTS = {"image_size": 24, "num_images": 160, "epochs": 20}
# The data sources that give volumes (`runs/data.py` loads them); the others give images.
# `nifti:DIR` gives volumes only: `spatial_dims` left unset is 3 for it.
VOLUME_SOURCES = ("builtin", "nifti")
# Runs on NIfTI volumes train on random patches and evaluate whole volumes through sliding
# windows (`tfp_seg.runs.volumes`): the fields that size them and their defaults.
PATCH_DEFAULTS = {
    "patch_size": 32,
    "patches_per_epoch": 256,
    "foreground_fraction": 0.5,
    "window_overlap": None,
}
# Backbones that take volumes: the built-in U-Net (keras-hub / keras-cv models are 2D).
VOLUME_BACKBONES = ("unet",)
_IMAGE_DEFAULTS = {"image_size": 64, "num_images": 640, "epochs": 36}
# The optimiser's defaults by `model`, where a run leaves `learning_rate` / `lr_schedule` unset
# (`TrainConfig.__post_init__`): Adam 3e-3 with cosine decay for the segmenter heads; the
# Probabilistic U-Net's KL term collapses its prior on some seeds under that (sample diversity
# 0.23 against the data's 0.45 on benchmark seed 1) and trains best at a constant 1e-3 (mean
# D2_GED 0.124 against 0.198 over seeds 0-2, benchmarks/README.md, "Probabilistic U-Net").
OPTIMISER_DEFAULTS: dict[str, dict[str, Union[float, str]]] = {
    "segmenter": {"learning_rate": 3e-3, "lr_schedule": "cosine"},
    "prob_unet": {"learning_rate": 1e-3, "lr_schedule": "constant"},
    "hprob_unet": {"learning_rate": 1e-3, "lr_schedule": "constant"},
}
# A head argument left at the head's own default (`factor_init_scale`, `initial_diagonal`).
AUTO = "auto"
# Fields whose default changed, with the value a stored run config of an earlier version ran
# with when it lacks the field (`stored_config`): runs of earlier versions resume as they ran.
# The learning rate was always stored; the schedule (constant before it existed) was not, nor
# the covariance start (glorot's factor and D = 1 before the SSN head's small start).
_EARLIER_DEFAULTS = {"lr_schedule": "constant", "factor_init_scale": 1.0, "initial_diagonal": None}


@dataclasses.dataclass
class TrainConfig:
    """Configuration of one training run (all fields settable from YAML/JSON or flags).

    `head` is one of `HEAD_CHOICES`: a distribution head (`HEADS`) or a sampling baseline
    (`BASELINES`). `val_every`, `val_images`, `val_samples`: the validation curves of
    `tfp_seg.runs.monitor` (every `val_every` epochs and after the last; 0 = none).

    `spatial_dims` is 2 (images `[H, W]`) or 3 (volumes `[D, H, W]`: the built-in benchmark
    `ambiguous_shapes(..., spatial_dims=3)`, `UNet(spatial_dims=3)` and the head on its 3D
    features). `image_size`, `num_images` and `epochs` left unset (None) take their image
    defaults (64, 640, 36) or, with `spatial_dims=3`, `VOLUME_DEFAULTS` (24, 160, 20). A
    stored config without `spatial_dims` is a 2D run; `spatial_dims` left unset (None) is 3
    for `data` `nifti:DIR` (volumes only) and 2 otherwise.

    NIfTI volumes (`data="nifti:DIR"`, `tfp_seg.runs.volumes`): training streams
    `patches_per_epoch` random patches of `patch_size`^3 voxels per epoch (rounded up to
    whole batches), a share `foreground_fraction` of them centred on a tumour class, the brain
    mask as the SSN `roi_mask`; validation curves and evaluation run on whole volumes through
    sliding windows of `patch_size` with `window_overlap` voxels shared by neighbours
    (default `patch_size // 4`). `image_size`, `num_images` and `num_annotations` do not
    apply (the cases give them). They need `model` segmenter, a distribution `head` (not a
    sampling baseline) and no `ensemble`.
    """

    name: Optional[str] = None
    data: str = "builtin"
    stream: Optional[bool] = None  # users' data: None = auto (by decoded size), True, False
    cache_dir: Optional[str] = None  # their decode cache (default $TFP_SEG_CACHE, ~/.cache)
    model: str = "segmenter"
    head: str = "low_rank"
    backbone: str = "unet"
    rank: int = 10
    head_kernel_size: int = 1  # the head's projection convolution (1: per-pixel, 1x1)
    factor_init_scale: Union[float, str] = AUTO  # AUTO: the head's default
    initial_diagonal: Union[float, str, None] = AUTO
    num_samples: int = 20
    marginal_weight: float = 1.0
    mean_weight: float = 0.0  # the SSN loss's mean cross-entropy term (StochasticSegmentationNLL)
    mean_warmup_epochs: int = 0  # epochs of the mean's cross-entropy alone first (MeanWarmup)
    epochs: Optional[int] = None  # 36; VOLUME_DEFAULTS["epochs"] with spatial_dims 3
    batch_size: int = 8
    learning_rate: Optional[float] = None  # OPTIMISER_DEFAULTS by `model`
    lr_schedule: Optional[str] = None
    image_size: Optional[int] = None  # 64; VOLUME_DEFAULTS with spatial_dims 3
    num_images: Optional[int] = None  # 640; VOLUME_DEFAULTS with spatial_dims 3
    num_annotations: int = 4
    base_filters: int = 16
    depth: int = 3
    max_filters: Optional[int] = None
    norm: str = "group"
    augment: bool = False
    annotations: Optional[str] = None  # all; random for prob_unet (see _validate_annotations)
    dropout: Optional[float] = None
    ensemble_size: Optional[int] = None  # 3 deep-ensemble members, 4 with `ensemble`
    components: int = 3
    ensemble: Optional[str] = None
    latent_dim: Optional[int] = None  # LATENT_DIM_DEFAULTS by `model` (6 otherwise)
    latent_levels: int = 3  # hprob_unet's levels with latents
    beta: float = 1.0
    seed: int = 0
    eval_samples: int = 16
    val_every: int = 9  # validation curves (tfp_seg.runs.monitor); 0 = off
    val_images: int = 16
    val_samples: int = 16
    output_dir: str = "runs"
    savedmodels_dir: str = "savedmodels"
    export: bool = True
    progress: bool = True
    strategy: str = "auto"
    resume: bool = False
    mixed_precision: Optional[str] = None
    spatial_dims: Optional[int] = None  # 2; 3 for nifti data
    patch_size: int = PATCH_DEFAULTS["patch_size"]
    patches_per_epoch: int = PATCH_DEFAULTS["patches_per_epoch"]
    foreground_fraction: float = PATCH_DEFAULTS["foreground_fraction"]
    window_overlap: Optional[int] = None  # patch_size // 4

    def __post_init__(self) -> None:
        if self.spatial_dims is None:
            self.spatial_dims = 3 if self.patch_data else 2
        # The sizes left unset take the defaults of the run's rank (a bad rank: those of
        # images, and `validate` names the field).
        defaults = VOLUME_DEFAULTS if self.spatial_dims == 3 else _IMAGE_DEFAULTS
        for field, value in defaults.items():
            if getattr(self, field) is None:
                setattr(self, field, value)
        # A bad `model`: the segmenter's (and `validate` names the field).
        optimiser = OPTIMISER_DEFAULTS.get(self.model, OPTIMISER_DEFAULTS["segmenter"])
        for field, value in optimiser.items():
            if getattr(self, field) is None:
                setattr(self, field, value)
        if self.latent_dim is None:
            self.latent_dim = LATENT_DIM_DEFAULTS.get(self.model, 6)

    def _validate_loss_weights(self) -> None:
        for field in ("marginal_weight", "mean_weight"):
            _checks.non_negative_float(getattr(self, field), field)
        _checks.positive_int(self.mean_warmup_epochs, "mean_warmup_epochs", minimum=0)
        for field in ("mean_weight", "mean_warmup_epochs"):
            if getattr(self, field) and (self.model != "segmenter" or self.head != "low_rank"):
                raise ValueError(
                    f"`{field}` applies to the SSN loss only (`head` low_rank, `model` "
                    f"segmenter); got head {self.head!r}, model {self.model!r}."
                )
        if isinstance(self.epochs, int) and self.mean_warmup_epochs >= self.epochs > 0:
            raise ValueError(
                f"`mean_warmup_epochs` ({self.mean_warmup_epochs}) must be less than `epochs` "
                f"({self.epochs}): the SSN loss trains the covariance after the warm-up."
            )

    @property
    def patch_data(self) -> bool:
        """Whether `data` names NIfTI volumes (trained on patches, evaluated by windows)."""
        try:
            return data_sources.parse_spec(self.data).kind == "nifti"
        except ValueError:  # a bad spec: `validate` names it
            return False

    def validate(self) -> "TrainConfig":
        """Check every field; return `self`, or raise `ValueError` naming the field."""
        self.data = str(data_sources.parse_spec(self.data))
        self._validate_volumes()
        self._validate_stream()
        if self.norm not in NORMS:
            raise ValueError(f"`norm` must be one of {NORMS}; got {self.norm!r}.")
        if not isinstance(self.augment, bool):
            raise ValueError(f"`augment` must be true or false; got {self.augment!r}.")
        _checks.positive_int(self.max_filters, "max_filters", optional=True)
        self._validate_annotations()
        if self.model not in MODELS:
            raise ValueError(f"`model` must be one of {MODELS}; got {self.model!r}.")
        if self.head not in HEAD_CHOICES:
            raise ValueError(f"`head` must be one of {HEAD_CHOICES}; got {self.head!r}.")
        if self.backbone not in BACKBONES:
            raise ValueError(f"`backbone` must be one of {BACKBONES}; got {self.backbone!r}.")
        if self.dropout is None:
            self.dropout = 0.2 if self.head == "mc_dropout" else 0.0
        if self.ensemble_size is None:  # 4 members divide the default 16 evaluation samples
            self.ensemble_size = 4 if self.ensemble else 3
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1); got {self.dropout!r}.")
        if self.model in LATENT_MODELS and self.head not in ("low_rank", "deterministic"):
            raise ValueError(
                f"`head` {self.head!r} does not apply to `model` {self.model} (its latent space "
                "is the distribution); leave `head` at its default."
            )
        if self.model in LATENT_MODELS and self.head_kernel_size != 1:
            raise ValueError(
                "`head_kernel_size` applies to `model` segmenter (its distribution head); "
                f"got {self.head_kernel_size!r} with `model` {self.model}."
            )
        if self.head == "mc_dropout" and self.dropout == 0.0:
            raise ValueError("`head` mc_dropout needs `dropout` > 0 (default 0.2).")
        for field in (
            "rank",
            "head_kernel_size",
            "num_samples",
            "epochs",
            "batch_size",
            "num_images",
            "eval_samples",
            "val_images",
            "ensemble_size",
            "components",
            "latent_dim",
            "latent_levels",
        ):
            _checks.positive_int(getattr(self, field), field)
        _checks.positive_int(self.val_every, "val_every", minimum=0)
        self._validate_loss_weights()
        _checks.positive_int(self.val_samples, "val_samples", minimum=2)
        self._validate_ensemble()
        if self.patch_data:
            self._validate_patches()
        elif self.image_size % (2**self.depth):
            raise ValueError(
                f"`image_size` ({self.image_size}) must be divisible by 2**depth ({2**self.depth})."
            )
        elif self.model == "hprob_unet" and self.image_size % (2 ** (self.depth + 1)):
            raise ValueError(
                f"`image_size` ({self.image_size}) must be divisible by 2**(depth + 1) "
                f"({2 ** (self.depth + 1)}) with `model` hprob_unet: its latent nets pool once "
                "more than the U-Net."
            )
        if self.model == "hprob_unet" and self.latent_levels > self.depth + 2:
            raise ValueError(
                f"`latent_levels` ({self.latent_levels}) must be at most depth + 2 "
                f"({self.depth + 2}), the levels of the latent nets."
            )
        # Where the SSN / mixture heads' covariance starts (their epsilon 1e-5, exp diagonal).
        if self.factor_init_scale != AUTO:
            layer_init.check_factor_init_scale(self.factor_init_scale)
        if self.initial_diagonal != AUTO:
            layer_init.check_initial_diagonal(self.initial_diagonal, 1e-5)
        if not self.beta >= 0:
            raise ValueError(f"`beta` must be >= 0; got {self.beta!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"`learning_rate` must be > 0; got {self.learning_rate!r}.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"`lr_schedule` must be one of {LR_SCHEDULES}; got {self.lr_schedule!r}."
            )
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

    def _validate_volumes(self) -> None:
        self.spatial_dims = _checks.check_spatial_dims(self.spatial_dims)
        kind = data_sources.parse_spec(self.data).kind
        if kind == "nifti" and self.spatial_dims == 2:
            raise ValueError(
                f"`data` {self.data!r} gives volumes: `spatial_dims` must be 3 (its default "
                "for nifti data); got 2."
            )
        if self.spatial_dims == 2:
            return
        if self.backbone not in VOLUME_BACKBONES:
            raise ValueError(
                f"`backbone` {self.backbone!r} takes images only (keras-hub / keras-cv models "
                f"are 2D); `spatial_dims` 3 needs one of {VOLUME_BACKBONES} (the built-in "
                "U-Net, 3D convolutions)."
            )
        if kind not in VOLUME_SOURCES:
            raise ValueError(
                f"`data` {self.data!r} is not a volume source of runs yet: `spatial_dims` 3 "
                f"takes `data` in {VOLUME_SOURCES} for now (the built-in benchmark in 3D, "
                "NIfTI volumes); use `spatial_dims` 2 for images."
            )

    def _validate_stream(self) -> None:
        if self.stream not in (None, True, False):
            raise ValueError(
                f"`stream` must be true, false or null (auto: stream users' data larger than "
                f"the threshold of tfp_seg.data.load); got {self.stream!r}."
            )
        if self.stream is False and self.patch_data:
            raise ValueError(
                f"`stream` false does not apply to `data` {self.data!r}: NIfTI volumes are "
                "always decoded into the disk cache and read from it (patches, windows); "
                "leave `stream` unset (or true)."
            )
        if self.stream and self.data == "builtin":
            raise ValueError(
                "`stream` true does not apply to `data` builtin (generated in memory); "
                "streaming is for lidc:PATH and folder:IMAGES:MASKS."
            )
        if self.cache_dir is not None and not (isinstance(self.cache_dir, str) and self.cache_dir):
            raise ValueError(f"`cache_dir` must be a folder path; got {self.cache_dir!r}.")

    def _validate_annotations(self) -> None:
        if self.annotations is None:
            # Every rater of an image in each step where the model's loss takes label sets
            # (on the built-in benchmark over 3 seeds: SSN D2_GED 0.056 against 0.094 with one
            # random rater, benchmarks/README.md, "Model quality"); the Prob U-Net keeps one
            # random rater per step, as Kohl et al. train it.
            self.annotations = "random" if self.model in LATENT_MODELS else "all"
        if self.annotations not in ANNOTATIONS:
            raise ValueError(
                f"`annotations` must be one of {ANNOTATIONS}; got {self.annotations!r}."
            )
        if self.annotations == "marginal" and self.model in LATENT_MODELS:
            raise ValueError(
                f"`annotations` marginal (soft labels) does not apply to `model` {self.model} (its "
                "posterior is conditioned on one label map); use random or all (every rater "
                "as its own (image, map) pair)."
            )
        if self.annotations == "marginal" and self.head in ("low_rank", "mixture"):
            raise ValueError(
                f"`annotations` marginal (soft labels) does not apply to `head` {self.head!r}: "
                "the joint likelihood of a soft label map is not defined; use all or random "
                "(marginal is for the per-pixel heads: heteroscedastic, deterministic and the "
                "sampling baselines)."
            )

    def _validate_patches(self) -> None:
        if self.model != "segmenter" or self.head not in HEADS or self.ensemble:
            raise ValueError(
                f"`data` {self.data!r} (NIfTI volumes, evaluated by sliding windows with one "
                f"latent per volume) needs `model` segmenter, `head` one of {HEADS} and no "
                f"`ensemble`; got model={self.model!r}, head={self.head!r}, "
                f"ensemble={self.ensemble!r}."
            )
        _checks.positive_int(self.patch_size, "patch_size")
        _checks.positive_int(self.patches_per_epoch, "patches_per_epoch")
        if self.patch_size % (2**self.depth):
            raise ValueError(
                f"`patch_size` ({self.patch_size}) must be divisible by 2**depth "
                f"({2**self.depth}): the U-Net takes patches and windows of that size."
            )
        fraction = self.foreground_fraction
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
            fraction = None
        if fraction is None or not 0.0 <= fraction <= 1.0:
            raise ValueError(
                "`foreground_fraction` must be a number in [0, 1] (the share of patches "
                f"centred on a tumour class); got {self.foreground_fraction!r}."
            )
        if self.window_overlap is None:
            self.window_overlap = self.patch_size // 4
        overlap = _checks.positive_int(self.window_overlap, "window_overlap", minimum=0)
        if overlap >= self.patch_size:
            raise ValueError(
                f"`window_overlap` ({overlap}) must be smaller than `patch_size` "
                f"({self.patch_size}): the windows' stride is their difference."
            )

    def _validate_ensemble(self) -> None:
        if self.ensemble is None:
            return
        if self.ensemble not in ENSEMBLES:
            raise ValueError(f"`ensemble` must be one of {ENSEMBLES}; got {self.ensemble!r}.")
        if self.model != "segmenter" or self.backbone != "unet" or self.head in BASELINES:
            raise ValueError(
                f"`ensemble` {self.ensemble!r} builds the built-in U-Net as an ensemble under a "
                f"distribution head: it needs `model` segmenter, `backbone` unet and `head` one "
                f"of {HEADS}; got model={self.model!r}, backbone={self.backbone!r}, "
                f"head={self.head!r}."
            )
        if self.eval_samples % self.ensemble_size:
            raise ValueError(
                f"`eval_samples` ({self.eval_samples}) must be a multiple of `ensemble_size` "
                f"({self.ensemble_size}) with `ensemble` {self.ensemble!r}: every member gives "
                "eval_samples / ensemble_size samples (e.g. --ensemble-size 4 with the default "
                "16)."
            )
        if self.val_every and self.val_samples % self.ensemble_size:
            raise ValueError(
                f"`val_samples` ({self.val_samples}) must be a multiple of `ensemble_size` "
                f"({self.ensemble_size}) with `ensemble` {self.ensemble!r} (or `val_every` 0)."
            )

    def resolved_name(self) -> str:
        """The run's name: `name` if set, else `<head or model>_<backbone>_<timestamp>`."""
        if self.name:
            return self.name
        tag = "ssn" if self.head == "low_rank" else self.head
        if self.model != "segmenter":
            tag = self.model
        if self.ensemble:
            tag = f"{tag}_{self.ensemble}{self.ensemble_size}"
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
    values = {**_EARLIER_DEFAULTS, **{k: v for k, v in stored.items() if k in known}}
    return TrainConfig(**values)
