"""Per-pixel Monte Carlo NLL of heteroscedastic logits (Kendall & Gal, 2017).

#### Mathematical Details

Heteroscedastic heads model every pixel's logits independently, so the likelihood integrates
the softmax per pixel (not over the whole label map as the SSN loss does):

```none
-log p(y | x) = -sum_i w_i log E_{u_i}[ softmax(u_i)[y_i] ]
             ~= -sum_i w_i ( logsumexp_t log softmax(u_i^t)[y_i] - log T ),
                u_i^t ~ N(mu_i, diag(sigma_i^2) (+ V_i V_i^T))
```

with `w_i = class_weight[y_i]` and `w_i = 0` for ignored pixels. The log-mean-exp over samples
is taken per pixel, in log space and in float32.

#### References

[1] Kendall and Gal. What Uncertainties Do We Need in Bayesian Deep Learning for Computer
    Vision? NeurIPS 2017.
"""

from __future__ import annotations

from typing import Optional, Sequence

import keras

from tfp_seg.losses import base, pixelwise

__all__ = ["HeteroscedasticNLL"]


@base.register_default_loss("heteroscedastic_normal_logits")
@keras.saving.register_keras_serializable(package="tfp_seg")
class HeteroscedasticNLL(base.SampledHeadLoss):
    """Per-pixel Monte Carlo NLL of a heteroscedastic head, a Keras `Loss` on packed params.

    `y_true` are label maps `[B, H, W]`; `y_pred` are the head's params. Each call draws
    `num_samples` logit samples through `head.sample_logits` and returns `mc_marginal_nll`
    per example, divided by the number of non-ignored pixels when `normalize="pixels"` (the
    default: nats per pixel, comparable to a cross-entropy) or summed with `normalize="none"`.

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
        **kwargs,
    ):
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

    def call(self, y_true, y_pred):
        if self.chunk_size is not None:
            return self._normalize(self._nll_terms(y_true, y_pred)[1], y_true)
        samples = self.head.sample_logits(y_pred, self.num_samples, antithetic=self.antithetic)
        nll = pixelwise.mc_marginal_nll(
            y_true,
            samples,
            ignore_label=self.ignore_label,
            class_weights=self.class_weights,
            validate_args=self.validate_args,
        )
        return self._normalize(nll, y_true)
