"""Per-pixel Monte Carlo NLL of heteroscedastic logits (Kendall & Gal, 2017).

#### Mathematical Details

Heteroscedastic heads model every pixel's logits independently, so the likelihood integrates
the softmax per pixel (not over the whole label map as the SSN loss does):

```none
-log p(y | x) = -sum_i w_i log E_{u_i}[ softmax(u_i / tau)[y_i] ]
             ~= -sum_i w_i ( logsumexp_t log softmax(u_i^t / tau)[y_i] - log T ),
                u_i^t ~ N(mu_i, diag(sigma_i^2) (+ V_i V_i^T))
```

with `w_i = class_weight[y_i]` and `w_i = 0` for ignored pixels and `tau` the head's softmax
temperature (Collier et al., 2021; the head's logit samples are `u / tau`). The log-mean-exp
over samples is taken per pixel, in log space and in float32.

#### References

[1] Kendall and Gal. What Uncertainties Do We Need in Bayesian Deep Learning for Computer
    Vision? NeurIPS 2017.
[2] Collier et al. Correlated Input-Dependent Label Noise in Large-Scale Image
    Classification. CVPR 2021.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from tfp_seg import _checks
from tfp_seg.losses import base, chunked, pixelwise, targets

__all__ = ["HeteroscedasticNLL"]


@base.register_default_loss("heteroscedastic_normal_logits")
@keras.saving.register_keras_serializable(package="tfp_seg")
class HeteroscedasticNLL(base.SampledHeadLoss):
    """Per-pixel Monte Carlo NLL of a heteroscedastic head, a Keras `Loss` on packed params.

    `y_true` are label maps `[B, *S]`; `y_pred` are the head's params `[B, *S, P]`
    (`S = (H, W)` or `(D, H, W)`, the head's `spatial_dims`). Each call draws
    `num_samples` logit samples through `head.sample_logits` and returns `mc_marginal_nll`
    per example, divided by the number of non-ignored pixels when `normalize="pixels"` (the
    default: nats per pixel, comparable to a cross-entropy) or summed with `normalize="none"`.

    `y_true` may also be (told apart by `tfp_seg.losses.targets`)

    ```none
    label sets [B, K, *S]     nll_b = (1/K) sum_k [ -sum_i w_bki ( logsumexp_t lp_bkit - log T ) ]
                              lp_bkit = log softmax(eta^t_bi)[y_bki], one set of T samples
                              of each image shared by its K raters (annotation="all")
    soft labels [B, *S, C]    nll_b = -sum_i sum_c cw_c q_bic log( (1/T) sum_t softmax(eta^t_bi)_c )
                              float per-pixel class fractions (annotation="marginal")
    ```

    A label set's loss is the mean over raters of the single-rater loss on the same samples
    (K = 1 is the single-rater loss exactly); its count for `normalize="pixels"` is the
    non-ignored pixels of one map averaged over the raters. Soft labels must be non-negative
    and sum to 1 over the classes (checked with `validate_args`); they have no ignored pixels
    (count prod(S)), and one-hot soft labels give the hard-label loss. Because the likelihood is
    per pixel, the mean over K raters and the soft label of the raters' fractions give the
    same value on the same samples (without ignored pixels).

    Args:
      head: a `HeteroscedasticLogits` (any `DistributionHead` works; weights are not used).
      num_samples: T Monte Carlo samples per pixel and step (even with antithetic sampling).
      antithetic: override the head's default.
      ignore_label, class_weights: see `tfp_seg.losses.mc_marginal_nll`.
      normalize: "pixels" or "none".
      chunk_size: None (the default: all T samples at once, `head.sample_logits` and
        `mc_marginal_nll`) or K dividing T (even with antithetic sampling): draw, score and
        discard K samples at a time and recompute them in the backward pass
        (`tfp_seg.losses.chunked`), so the loss's memory stays flat as T grows; same
        estimator, different draws.
      temperature: None (the default: the head's softmax temperature `tau`) or a finite
        float > 0 that replaces it for this loss: the loss then scores
        `softmax(u / temperature)` (it holds a copy of the head with that temperature,
        `loss.head`). Only heads with a `temperature` (`HeteroscedasticLogits`) take one.
    """

    def __init__(
        self,
        head,
        num_samples: int = 20,
        antithetic: Optional[bool] = None,
        ignore_label: Optional[int] = None,
        class_weights: Optional[Sequence[float]] = None,
        normalize: str = "pixels",
        validate_args: bool = True,
        name: str = "heteroscedastic_nll",
        chunk_size: Optional[int] = None,
        temperature: Optional[float] = None,
        **kwargs,
    ):
        if temperature is not None:
            head = _with_temperature(head, temperature)
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
        self.temperature = None if temperature is None else float(temperature)

    def call(self, y_true, y_pred):
        y_pred = self._check_y_pred(y_pred)
        if self.chunk_size is not None:
            nll = chunked.sampled_marginal_nll(
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
            return self._normalize(nll, y_true, y_pred)
        prepared = targets.prepare_targets(
            y_true,
            y_pred,
            self.head.num_classes,
            self.ignore_label,
            validate_args=self.validate_args,
            name="y_true",
        )
        samples = self.head.sample_logits(y_pred, self.num_samples, antithetic=self.antithetic)
        samples = tf.cast(samples, tf.float32)
        if self.validate_args:
            samples = _checks.assert_finite(samples, "logit_samples")
        if prepared.kind == targets.SOFT:
            nll = pixelwise.soft_marginal_nll(prepared.labels, samples, self.class_weights)
        else:
            per_rater = pixelwise.label_set_nll(
                prepared.labels, samples, self.ignore_label, self.class_weights, joint=False
            )
            nll = tf.reduce_mean(per_rater, axis=1)
        return self._normalize(nll, y_true, y_pred)

    def get_config(self):
        config = super().get_config()
        config["temperature"] = self.temperature
        return config


def _with_temperature(head, temperature):
    """A weightless copy of `head` whose softmax temperature is `temperature`."""
    real = isinstance(temperature, (int, float, np.integer, np.floating)) and not isinstance(
        temperature, (bool, np.bool_)
    )
    if not real or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(
            f"`temperature` must be None or a finite float > 0 (the softmax temperature tau); "
            f"got {temperature!r}."
        )
    copy = base.head_copy(head)
    config = copy.get_config()
    if "temperature" not in config:
        raise ValueError(
            f"`temperature` is only supported for heads with a softmax temperature "
            f"(HeteroscedasticLogits); {type(copy).__name__} has none. Got {temperature!r}."
        )
    config["temperature"] = float(temperature)
    return type(copy).from_config(config)
