"""Distribution heads: Keras layers from a feature map to distribution parameters."""

from tfp_seg.layers.base import DistributionHead
from tfp_seg.layers.batch_ensemble import BatchEnsembleConv
from tfp_seg.layers.categorical_logits import CategoricalLogits
from tfp_seg.layers.heteroscedastic_logits import HeteroscedasticLogits
from tfp_seg.layers.hierarchical_latent import HierarchicalLatent, SpatialLatentInjection
from tfp_seg.layers.latent import LatentEncoder, LatentInjection
from tfp_seg.layers.low_rank_logits import LowRankLogits
from tfp_seg.layers.mixture_low_rank_logits import MixtureLowRankLogits
from tfp_seg.layers.packed import PackedConv

__all__ = [
    "DistributionHead",
    "CategoricalLogits",
    "LowRankLogits",
    "MixtureLowRankLogits",
    "HeteroscedasticLogits",
    "LatentEncoder",
    "LatentInjection",
    "HierarchicalLatent",
    "SpatialLatentInjection",
    "BatchEnsembleConv",
    "PackedConv",
]
