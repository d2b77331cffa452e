"""Distributions over per-pixel logits, built from plain parameter tensors.

Keras 3 models cannot output a `tfd.Distribution`, so every head in `tfp_seg` outputs packed
parameter tensors and the functions here turn those parameters into TensorFlow Probability
distributions (TFP's `params_size` / `new` convention). Sampling that must survive export
(SavedModel, ONNX) is written in plain reparameterised ops in `sample_low_rank` and
`sample_diagonal`, not through TFP's own sampler, which tf2onnx cannot convert.

#### Mathematical Details

The low-rank logits distribution of a Stochastic Segmentation Network (Monteiro et al., 2020)
is a multivariate normal over the flattened event of X = prod(S) pixels (or voxels) and C
classes, `S = (H, W)` for images or `(D, H, W)` for volumes:

```none
eta = vec(logits) in R^(X*C)
eta ~ N(mu, P P^T + diag(D)),   P in R^(X*C x R),   D in R_+^(X*C)
sample:  eta = mu + P z + sqrt(D) * eps,   z ~ N(0, I_R),  eps ~ N(0, I_(X*C))
```

The covariance is never materialised: TFP's `MultivariateNormalDiagPlusLowRankCovariance`
works through a `LinearOperatorLowRankUpdate` (Woodbury identity and the matrix determinant
lemma), O(X*C*R^2) per log-density instead of O((X*C)^3).

Every function takes parameters `[B, *S, C(, R)]` (mixtures `[B, K, *S, C(, R)]`) and tells
`S` from their rank; distributions have batch `[B]` and event `[*S, C]`, samples are
`[N, B, *S, C]` and label maps `[N, B, *S]`.

#### Modules

```none
low_rank    LowRankLogitsDistribution, low_rank_logits, sample_low_rank
diagonal    diagonal_logits, sample_diagonal           (independent normal logits)
noise       standard_normal                            (Box-Muller, export-safe)
planar      sample_low_rank_labels, low_rank_mean_probabilities   (class-planar samplers)
mixture     MixtureLowRankLogitsDistribution, mixture_low_rank_logits, sample_mixture_low_rank,
            mixture_components                 (K low-rank components, image-level weights)
readouts    argmax_classes, class_softmax, mean_softmax, prefers_planar_sampling
```

#### References

[1] Miguel Monteiro et al. Stochastic Segmentation Networks: Modelling Spatially Correlated
    Aleatoric Uncertainty. NeurIPS 2020. https://arxiv.org/abs/2006.06015
"""

from tfp_seg._checks import check_num_samples
from tfp_seg._seeds import SeedLike as SeedLike  # the seed type of every sampler
from tfp_seg.distributions.diagonal import diagonal_logits, sample_diagonal
from tfp_seg.distributions.low_rank import (
    LowRankLogitsDistribution,
    low_rank_logits,
    sample_low_rank,
)
from tfp_seg.distributions.mixture import (
    MixtureLowRankLogitsDistribution,
    mixture_components,
    mixture_low_rank_logits,
    sample_mixture_low_rank,
)
from tfp_seg.distributions.noise import standard_normal
from tfp_seg.distributions.planar import low_rank_mean_probabilities, sample_low_rank_labels
from tfp_seg.distributions.readouts import (
    argmax_classes,
    class_softmax,
    mean_softmax,
    prefers_planar_sampling,
)

__all__ = [
    "low_rank_logits",
    "diagonal_logits",
    "LowRankLogitsDistribution",
    "sample_low_rank",
    "sample_diagonal",
    "standard_normal",
    "sample_low_rank_labels",
    "argmax_classes",
    "low_rank_mean_probabilities",
    "class_softmax",
    "mean_softmax",
    "prefers_planar_sampling",
    "check_num_samples",
    "MixtureLowRankLogitsDistribution",
    "mixture_low_rank_logits",
    "sample_mixture_low_rank",
    "mixture_components",
]
