"""Losses: negative log-likelihoods of the heads' distributions, usable in `model.compile`.

Every loss takes labels `y_true` (below) and the head's packed parameters `y_pred`, and
rebuilds the head's distribution (or samples from it) to score the labels. Losses know heads
only through `tfp_seg.protocols` (`Head`, and the fused-path capability
`PlanarLowRankLogits`).

Each head declares the name of its likelihood (`head.likelihood`); the loss that is its
negative log-likelihood is registered under that name (`register_default_loss`), and
`default_loss(head, **kwargs)` (also `head.default_loss(**kwargs)`) builds it.

```none
base            HeadLoss, SampledHeadLoss, default_loss, register_default_loss
pixelwise       mc_categorical_nll, mc_marginal_nll, pixel_log_likelihood (kernels)
monte_carlo     StochasticSegmentationNLL (SSN), SegmentationCrossEntropy
heteroscedastic HeteroscedasticNLL
mixture         MixtureNLL, mixture_nll_terms (mixture heads: logsumexp over components)
elbo            ELBO, GECO (Probabilistic U-Net)
chunked         sampled_nll_terms: Monte Carlo NLL terms in sample chunks, fused SSN path
planar          the fused class-planar SSN kernels (sampling, label pick, hand-written VJP)
scorers         chunk scorers: a chunk's label log-probabilities (fused planar or any head)
chunk_sizes     chunk_size: None, S, or "auto" (auto_chunk_size: from the problem size)
targets         what y_true holds: label maps, label sets [B, K, *S], soft labels
```

Images and volumes share every loss: the spatial shape `S` is `(H, W)` or `(D, H, W)`; a
loss bound to a head (`head.default_loss()`, `compile(loss="auto")`) checks the parameters
against the head's `spatial_dims`, and `SegmentationCrossEntropy` (which holds no head) and
the kernels (`mc_categorical_nll`, ...) tell `S` from the rank of `y_pred` / the samples.

`y_true` may be label maps `[B, *S]`, label sets `[B, K, *S]` (K raters of each image,
scored under one shared set of samples; the loss is the mean over raters) or, for the
per-pixel losses (`HeteroscedasticNLL`, `SegmentationCrossEntropy`), soft labels
`[B, *S, C]`; the joint losses (SSN, mixture) reject soft labels (`tfp_seg.losses.targets`).
"""

from tfp_seg.losses.base import default_loss, register_default_loss
from tfp_seg.losses.elbo import ELBO, GECO
from tfp_seg.losses.heteroscedastic import HeteroscedasticNLL
from tfp_seg.losses.mixture import MixtureNLL, mixture_nll_terms
from tfp_seg.losses.monte_carlo import SegmentationCrossEntropy, StochasticSegmentationNLL
from tfp_seg.losses.pixelwise import mc_categorical_nll, mc_marginal_nll, pixel_log_likelihood
from tfp_seg.losses.warmup import MeanWarmup

__all__ = [
    "mc_categorical_nll",
    "mc_marginal_nll",
    "pixel_log_likelihood",
    "StochasticSegmentationNLL",
    "SegmentationCrossEntropy",
    "HeteroscedasticNLL",
    "MixtureNLL",
    "mixture_nll_terms",
    "ELBO",
    "GECO",
    "MeanWarmup",
    "default_loss",
    "register_default_loss",
]
