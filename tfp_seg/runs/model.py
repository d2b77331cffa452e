"""The model of a run: built, compiled and sampled as its `TrainConfig` says.

A distribution head (`HEADS`) sits on a backbone in a `ProbabilisticSegmenter`; the sampling
baselines (`BASELINES`) are deterministic segmenters sampled by `MCDropout` (dropout masks) or
trained as a `DeepEnsemble`; `model="prob_unet"` is a `ProbabilisticUNet`. With `ensemble`
("batch" | "packed") the U-Net holds `ensemble_size` members under the head, in an
`EnsembleSegmenter` (trained as one model; its members are its samples).
"""

from __future__ import annotations

import keras

from tfp_seg import layers, models
from tfp_seg.models.wrappers import DeepEnsemble, MCDropout
from tfp_seg.runs import volumes
from tfp_seg.runs.config import AUTO, LATENT_MODELS, TrainConfig

__all__ = ["build_model", "compile_model", "sampler_for"]


def _head(config: TrainConfig, num_classes: int):
    """The head on features `[B, *S, F]` (`S` of rank `config.spatial_dims`)."""
    common = {"spatial_dims": config.spatial_dims, "kernel_size": config.head_kernel_size}
    # Where the covariance starts: the config's values, or the head's defaults ("auto").
    start = {
        k: v
        for k, v in (
            ("factor_init_scale", config.factor_init_scale),
            ("initial_diagonal", config.initial_diagonal),
        )
        if v != AUTO
    }
    if config.head == "low_rank":
        return layers.LowRankLogits(num_classes, rank=config.rank, **start, **common)
    if config.head == "heteroscedastic":
        return layers.HeteroscedasticLogits(num_classes, **common)
    if config.head == "mixture":
        return layers.MixtureLowRankLogits(
            num_classes, num_components=config.components, rank=config.rank, **start, **common
        )
    return layers.CategoricalLogits(num_classes, **common)  # deterministic, and the baselines


def _backbone(config: TrainConfig, input_shape=None):
    """The built-in U-Net, or a keras-hub / keras-cv family built from config (no download)."""
    if config.backbone == "unet":
        return models.UNet(
            base_filters=config.base_filters,
            depth=config.depth,
            max_filters=config.max_filters,
            norm=config.norm,
            dropout=config.dropout,
            ensemble=config.ensemble,
            ensemble_size=config.ensemble_size if config.ensemble else None,
            spatial_dims=config.spatial_dims,
        )
    if input_shape is None:
        input_shape = (config.image_size, config.image_size, 1)
    return models.build_backbone(config.backbone, input_shape=tuple(input_shape))


def _segmenter(config: TrainConfig, num_classes: int, input_shape=None):
    backbone = _backbone(config, input_shape)
    if config.ensemble:
        return models.EnsembleSegmenter(backbone, _head(config, num_classes))
    return models.ProbabilisticSegmenter(backbone, _head(config, num_classes))


def build_model(config: TrainConfig, num_classes: int, input_shape=None):
    """Build the (uncompiled) model described by `config`.

    `head="ensemble"` gives a `tfp_seg.models.DeepEnsemble` of `ensemble_size`
    independently initialised deterministic segmenters; `head="mc_dropout"` a deterministic
    segmenter with dropout (wrapped in `MCDropout` for evaluation by `sampler_for`).
    `input_shape` (`(H, W, channels)`, default the built-in images' `(image_size,
    image_size, 1)`) sizes the keras-hub / keras-cv backbones that need it. With
    `config.spatial_dims == 3` the U-Net, the head and the Probabilistic U-Net are 3D (inputs
    `[B, D, H, W, channels]`).
    """
    if config.model in LATENT_MODELS:
        hierarchical = config.model == "hprob_unet"
        cls = models.HierarchicalProbabilisticUNet if hierarchical else models.ProbabilisticUNet
        return cls(
            num_classes,
            latent_dim=config.latent_dim,
            beta=config.beta,
            backbone=_backbone(config, input_shape),
            spatial_dims=config.spatial_dims,
            **({"latent_levels": config.latent_levels} if hierarchical else {}),
        )
    if config.head == "ensemble":
        return DeepEnsemble.from_factory(
            lambda: _segmenter(config, num_classes, input_shape), config.ensemble_size
        )
    return _segmenter(config, num_classes, input_shape)


def sampler_for(model, config: TrainConfig):
    """The object whose `sample_logits` represents the run's predictive distribution: on NIfTI
    volumes (`config.patch_data`) a `tfp_seg.runs.volumes.VolumeSampler` over whole volumes
    (sliding windows of `patch_size`, overlap `window_overlap`, the brain as `roi_mask`)."""
    if config.head == "mc_dropout":
        return MCDropout(model, num_samples=config.eval_samples)
    if config.patch_data:
        return volumes.VolumeSampler(
            model,
            window=config.patch_size,
            overlap=config.window_overlap,
            roi_mask=config.head in volumes.ROI_HEADS,
        )
    return model


def compile_model(model, config: TrainConfig) -> None:
    """Compile `model` (every member of an ensemble) with Adam and the run's loss."""

    def optimizer():
        return keras.optimizers.Adam(config.learning_rate)

    if config.model in LATENT_MODELS:
        model.compile(optimizer=optimizer())
        return
    if config.head == "ensemble":
        for member in model.members:
            member.compile(optimizer=optimizer(), loss="auto")
        return
    head = model.member_head if config.ensemble else model.head  # EnsembleSegmenter's
    if config.head in ("low_rank", "mixture"):
        # `mean_weight` is the SSN loss's only (validated), passed where it is set: a mixture's
        # loss takes no such argument.
        extra = {"mean_weight": config.mean_weight} if config.mean_weight else {}
        if config.mean_warmup_epochs:
            extra["mean_warmup"] = True
        loss = head.default_loss(
            num_samples=config.num_samples, marginal_weight=config.marginal_weight, **extra
        )
    elif config.head == "heteroscedastic":
        loss = head.default_loss(num_samples=config.num_samples)
    else:
        loss = "auto"
    model.compile(optimizer=optimizer(), loss=loss)
