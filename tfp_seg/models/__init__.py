"""Models: the built-in U-Net backbone and backbone + head segmenters."""

from tfp_seg.models.backbones import (
    BACKBONE_NAMES,
    BackboneAdapter,
    build_backbone,
    from_keras_cv,
    from_keras_hub,
)
from tfp_seg.models.ensembles import EnsembleSegmenter
from tfp_seg.models.hierarchical_prob_unet import HierarchicalProbabilisticUNet
from tfp_seg.models.prob_unet import ProbabilisticUNet
from tfp_seg.models.segmenter import ProbabilisticSegmenter
from tfp_seg.models.sliding import SlidingWindowSampler, sliding_window_params
from tfp_seg.models.unet import UNet
from tfp_seg.models.wrappers import DeepEnsemble, MCDropout

__all__ = [
    "UNet",
    "ProbabilisticSegmenter",
    "ProbabilisticUNet",
    "HierarchicalProbabilisticUNet",
    "BackboneAdapter",
    "from_keras_hub",
    "from_keras_cv",
    "build_backbone",
    "BACKBONE_NAMES",
    "MCDropout",
    "DeepEnsemble",
    "EnsembleSegmenter",
    "SlidingWindowSampler",
    "sliding_window_params",
]
