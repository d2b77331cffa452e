"""Monte Carlo NLL of a mixture head: K components with image-level weights (MoSE-style).

#### Mathematical Details

A mixture head (`tfp_seg.protocols.MixtureHead`, e.g. `MixtureLowRankLogits`) draws one
component per image, `k ~ Categorical(pi(x))`, and logits from that component. Its likelihood
integrates the pixel-wise softmax over each component by Monte Carlo, with M samples of EVERY
component (stratified by component, so the gate and all components get a gradient at every
step, and no sample is spent on drawing components):

```none
-log p(y | x) = -log sum_k pi_k E_(eta ~ p_k)[ prod_i softmax(eta_i)[y_i] ]
             ~= -logsumexp_(k,m)( log pi_k + sum_i w_i log softmax(eta_(k,m),i)[y_i] ) + log M
```

and, as the SSN loss adds (`StochasticSegmentationNLL`, `marginal_weight`), the per-pixel
likelihood of the same samples under the mixture's per-pixel predictive distribution

```none
marginal = -sum_i w_i [ logsumexp_(k,m)( log pi_k + log softmax(eta_(k,m),i)[y_i] ) - log M ]
```

with `w_i = class_weight[y_i]` (0 for ignored pixels). Both reductions are in log space and
float32. The components are sampled and scored as one batch of `B*K` images by the component
head's path in `tfp_seg.losses.chunked` (`sampled_log_likelihoods`: for SSN components the
fused class-planar path, with `chunk_size` the memory-flat chunked one), and the reductions
over components are taken here.

#### References

[1] Zhitong Gao et al. Modeling Multimodal Aleatoric Uncertainty in Segmentation with Mixture
    of Stochastic Experts. ICLR 2023.
[2] Monteiro et al. Stochastic Segmentation Networks. NeurIPS 2020.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import keras
import tensorflow as tf

from tfp_seg import _checks, protocols
from tfp_seg.losses import base, chunked, targets

__all__ = ["MixtureNLL", "mixture_nll_terms"]


def check_mixture_head(head, name: str = "head") -> protocols.MixtureHead:
    """`head` if it is a mixture head (`tfp_seg.protocols.MixtureHead`), else `ValueError`."""
    if not isinstance(head, protocols.MixtureHead):
        raise ValueError(
            f"`{name}` must be a mixture head (tfp_seg.protocols.MixtureHead, e.g. a "
            f"tfp_seg.layers.MixtureLowRankLogits); got {type(head).__name__}."
        )
    return head


def mixture_nll_terms(
    head,
    labels,
    params,
    num_samples: int,
    chunk_size: Union[int, str, None] = chunked.AUTO,
    antithetic: bool = False,
    ignore_label: Optional[int] = None,
    class_weights: Optional[Sequence[float]] = None,
    seed=None,
    noise=None,
    validate_args: bool = True,
    name: str = "labels",
):
    """Joint and per-pixel Monte Carlo NLL `([B], [B])` of `labels` under a mixture head.

    ```none
    joint_b    = -logsumexp_(k,m)( log pi_bk + loglik[b, k, m] ) + log M
    marginal_b = -sum_i w_i [ logsumexp_k( log pi_bk + lse[b, k, i] ) - log M ]
    loglik[b, k, m] = sum_i w_i lp[b, k, m, i],   lse[b, k, i] = logsumexp_m lp[b, k, m, i]
    lp[b, k, m, i]  = log softmax(eta_(b,k,m),i)[y_(b,i)],   eta_(b,k,m) ~ component k of image b
    ```

    A label set `[B, R, *S]` (R raters of each image) is scored under the same samples of
    every component for all R raters, and both terms are the mean over the raters of the
    single-rater terms above (`y_(b,i)` -> `y_(b,r,i)`, `w_i` -> `w_(b,r,i)`): the reasons are
    those of `tfp_seg.losses.chunked.sampled_nll_terms`; R = 1 is the single-rater loss
    exactly. Soft labels are a `ValueError` (the joint likelihood of a soft map is not defined).

    Args:
      head: a mixture head (`tfp_seg.protocols.MixtureHead`).
      labels: int `[B, *S]` (or `[B, *S, 1]`) label maps, or a label set `[B, R, *S]`
        (the rule of `tfp_seg.losses.targets`).
      params: the head's parameters `[B, *S, params_size]` (`S` of the head's
        `spatial_dims`: `(H, W)` or `(D, H, W)`).
      num_samples: M samples of every component (even with antithetic sampling).
      chunk_size: None (all M samples at once), K' dividing M: draw, score and discard K'
        samples at a time and recompute them in the backward pass (memory flat in M), or
        "auto" (the default: `tfp_seg.losses.chunked.auto_chunk_size`).
      antithetic: mirrored pairs about each component's mean.
      ignore_label, class_weights: as in `tfp_seg.losses.mc_categorical_nll`.
      seed: None (fresh noise at every call) or an int / shape-[2] seed.
      noise: fixed noise of the components in the component head's `sample_logits(noise=...)`
        format for its `B*K` rows (`head.component_params`: component `k` of image `b` at row
        `b*K + k`); for SSN components `(z [M', B*K, R], eps [M', B*K, *S, C])`, M' = M/2
        when antithetic.
      validate_args: run-time checks of labels (range) and parameters (NaN/Inf).
      name: the name of `labels` in error messages (the loss passes "y_true").
    """
    head = check_mixture_head(head)
    num_samples = _checks.check_num_samples(num_samples, antithetic)
    params = tf.convert_to_tensor(params)
    chunked.check_head_params(head, params)
    prepared = targets.prepare_targets(
        labels,
        params,
        head.num_classes,
        ignore_label,
        validate_args=validate_args,
        name=name,
        soft=targets.soft_rejected(
            name, "the mixture NLL (mixture_nll_terms)", chunked.head_spatial_dims(head)
        ),
    )
    k = head.num_components
    loglik, pixel_lse, weights = chunked.sampled_log_likelihoods(
        head.component_head,
        tf.repeat(prepared.labels, k, axis=0),  # [B*K_c, R, *S]: row b*K_c + c
        head.component_params(params),
        num_samples,
        chunk_size=chunk_size,
        antithetic=antithetic,
        ignore_label=ignore_label,
        class_weights=class_weights,
        seed=seed,
        noise=noise,
        validate_args=validate_args,
        name=name,
    )
    raters = tf.shape(prepared.labels)[1]
    pixels = tf.shape(pixel_lse)[-1]
    log_pi = tf.nn.log_softmax(head.mixture_logits(params), axis=-1)[:, :, None, None]
    loglik = tf.reshape(loglik, tf.stack([-1, k, raters, num_samples]))  # [B, K_c, R, M]
    pixel_lse = tf.reshape(pixel_lse, tf.stack([-1, k, raters, pixels]))  # [B, K_c, R, X]
    weights = tf.reshape(weights, tf.stack([-1, k, raters, pixels]))[:, 0]  # [B, R, X]
    log_m = math.log(num_samples)
    joint = -(tf.reduce_logsumexp(log_pi + loglik, axis=[1, 3]) - log_m)  # [B, R]
    pixel = tf.reduce_logsumexp(log_pi + pixel_lse, axis=1) - log_m  # [B, R, X]
    marginal = -tf.reduce_sum(weights * pixel, axis=2)
    return tf.reduce_mean(joint, axis=1), tf.reduce_mean(marginal, axis=1)


@base.register_default_loss("mixture_low_rank_normal_logits")
@keras.saving.register_keras_serializable(package="tfp_seg")
class MixtureNLL(base.SampledHeadLoss):
    """Monte Carlo NLL of a mixture head, a Keras `Loss` on packed params (`mixture_nll_terms`).

    `y_true` are label maps `[B, *S]` or label sets `[B, R, *S]` (R raters of each image,
    `annotation="all"`: every rater scored under the same samples, the loss the mean over
    raters; see `mixture_nll_terms`); `y_pred` are the head's params. Soft labels
    (`annotation="marginal"`) are rejected with a `ValueError`: the joint likelihood of a soft
    label map is not defined. Each call draws `num_samples` samples of every component
    (antithetic pairs by default for `MixtureLowRankLogits`) and returns

    ```none
    loss_b = joint_b + marginal_weight * marginal_b
    joint_b    = -log sum_k pi_k (1/M) sum_m prod_i p(y_i | eta_(k,m),i)      (in log space)
    marginal_b = -sum_i w_i log sum_k pi_k (1/M) sum_m p(y_i | eta_(k,m),i)
    ```

    divided by the number of non-ignored pixels with `normalize="pixels"` (nats per pixel; for
    a label set the non-ignored pixels of one rater's map averaged over the raters,
    `tfp_seg.losses.targets.valid_pixel_count`) or summed with `normalize="none"`.
    `marginal_weight` adds the per-pixel term for the reason
    given in `StochasticSegmentationNLL` (the joint estimator alone weights each sample by its
    likelihood, so a far-off sample gets no gradient); 0 is the joint estimator alone.

    Cost: K times the samples of an SSN loss with the same `num_samples`. `chunk_size`
    bounds the memory as in `StochasticSegmentationNLL` (same value and gradient on the same
    samples, a second pass over them in the backward pass).

    Args:
      head: a mixture head (`tfp_seg.protocols.MixtureHead`; weights are not used).
      num_samples: M Monte Carlo samples of every component per step (even with antithetic
        sampling).
      antithetic: override the head's default.
      ignore_label, class_weights: see `tfp_seg.losses.mc_categorical_nll`.
      normalize: "pixels" or "none".
      marginal_weight: weight of the per-pixel term (0: the joint estimator alone).
      chunk_size: "auto" (the default: `tfp_seg.losses.chunked.auto_chunk_size`), None (all
        samples at once) or a divisor of M (even with antithetic).
    """

    def __init__(
        self,
        head,
        num_samples: int = 20,
        antithetic: Optional[bool] = None,
        ignore_label: Optional[int] = None,
        class_weights: Optional[Sequence[float]] = None,
        normalize: str = "pixels",
        marginal_weight: float = 1.0,
        validate_args: bool = True,
        name: str = "mixture_nll",
        chunk_size: Union[int, str, None] = chunked.AUTO,
        **kwargs,
    ):
        if not isinstance(head, dict):
            check_mixture_head(base.check_head(head))
        if not (isinstance(marginal_weight, (int, float)) and marginal_weight >= 0):
            raise ValueError(f"`marginal_weight` must be a float >= 0; got {marginal_weight!r}.")
        self.marginal_weight = float(marginal_weight)
        super().__init__(
            head,
            num_samples,
            antithetic,
            ignore_label=ignore_label,
            class_weights=class_weights,
            normalize=normalize,
            validate_args=validate_args,
            name=name,
            chunk_size=chunk_size,
            **kwargs,
        )
        check_mixture_head(self.head)

    def _nll_terms(self, y_true, y_pred):
        y_pred = self._check_y_pred(y_pred)
        return mixture_nll_terms(
            self.head,
            y_true,
            y_pred,
            self.num_samples,
            chunk_size=self.chunk_size,
            antithetic=self.antithetic,
            ignore_label=self.ignore_label,
            class_weights=self.class_weights,
            validate_args=self.validate_args,
            name="y_true",
        )

    def call(self, y_true, y_pred):
        joint, marginal = self._nll_terms(y_true, y_pred)
        nll = joint + self.marginal_weight * marginal if self.marginal_weight else joint
        return self._normalize(nll, y_true, y_pred)

    def get_config(self):
        config = super().get_config()
        config.update({"marginal_weight": self.marginal_weight})
        return config
