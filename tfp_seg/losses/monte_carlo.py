"""Monte Carlo NLL of logit distributions (SSN) and the cross-entropy baseline.

#### Mathematical Details

Stochastic Segmentation Networks (Monteiro et al., 2020) integrate the pixel-wise softmax
likelihood over the logits distribution by Monte Carlo:

```none
-log p(y | x) = -log E_eta[ prod_i softmax(eta_i)[y_i] ]
             ~= -logsumexp_m( sum_i w_i log softmax(eta_i^m)[y_i] ) + log M,
                eta^m ~ N(mu(x), P P^T + D)
```

with `w_i = class_weight[y_i]` and `w_i = 0` for ignored pixels. All reductions are in log space
and in float32, also under a mixed-precision policy. The pixel-wise kernels
(`mc_categorical_nll`, `mc_marginal_nll`, `pixel_log_likelihood`) are in
`tfp_seg.losses.pixelwise` and re-exported here.

#### References

[1] Monteiro et al. Stochastic Segmentation Networks. NeurIPS 2020.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import keras
import tensorflow as tf

from tfp_seg import _checks
from tfp_seg.losses import base, chunked, pixelwise, targets
from tfp_seg.losses.pixelwise import mc_categorical_nll, mc_marginal_nll, pixel_log_likelihood

__all__ = [
    "mc_categorical_nll",
    "pixel_log_likelihood",
    "mc_marginal_nll",
    "StochasticSegmentationNLL",
    "SegmentationCrossEntropy",
]


@base.register_default_loss("low_rank_normal_logits")
@keras.saving.register_keras_serializable(package="tfp_seg")
class StochasticSegmentationNLL(base.SampledHeadLoss):
    """Monte Carlo NLL of a distribution head (SSN loss), a Keras `Loss` on packed params.

    `y_true` are label maps `[B, *S]` or label sets `[B, K, *S]` (K raters of each image,
    `annotation="all"` of `tfp_seg.data`); `y_pred` are the head's params `[B, *S, P]`, with
    `S = (H, W)` or `(D, H, W)` as the head's `spatial_dims` says. Each call draws
    `num_samples` logit samples through `head.sample_logits` (antithetic pairs by default) and
    scores the labels with

    ```none
    loss_b = joint_b + marginal_weight * marginal_b
    joint_b    = -logsumexp_m( sum_i w_i log p(y_i | eta_i^m) ) + log M     (Monteiro et al.)
    marginal_b = -sum_i w_i [ logsumexp_m log p(y_i | eta_i^m) - log M ]    (per pixel)
    ```

    divided by the number of non-ignored pixels when `normalize="pixels"` (the default: nats
    per pixel; the optimum is unchanged) or summed with `normalize="none"`.

    Label sets: ONE set of M samples of each image is shared by its K raters, and each term
    is the mean over the raters of the single-rater term with rater k's labels and weights,

    ```none
    joint_b    = (1/K) sum_k [ -logsumexp_m( sum_i w_bki log p(y_bki | eta^m_bi) ) + log M ]
    marginal_b = (1/K) sum_k [ -sum_i w_bki ( logsumexp_m log p(y_bki | eta^m_bi) - log M ) ]
    ```

    The raters are draws from the label distribution `p(y | x)`, so the expected NLL over
    raters is estimated by the mean over k; sharing the samples costs one sampling pass for K
    raters and keeps each term exactly the single-rater estimator (the same bias; its errors
    are correlated across k), so K = 1 reproduces the single-rater loss exactly.
    `ignore_label` and `class_weights` apply per rater map, and `normalize="pixels"` divides
    by the non-ignored pixels of one map averaged over the raters (`(1/K) sum_k n_{b,k}`).
    How `y_true` is told apart is `tfp_seg.losses.targets`. Soft labels `[B, *S, C]`
    (`annotation="marginal"`) are rejected with a `ValueError`: the joint likelihood of a soft
    label map is not defined (use label sets or one label map per image).

    `marginal_weight=0` is the paper's estimator exactly. The default adds the per-pixel
    (composite) likelihood of the same samples because the joint estimator alone has a failure
    mode: its gradient weights each sample by its likelihood, so a sample that is far off
    (e.g. the mirror image of a good antithetic sample flipping the whole background) gets no
    gradient and is never corrected; wasting half the samples costs only log 2 nats per image.
    On the built-in benchmark (`tfp-seg train --marginal-weight 0` vs `tfp-seg train`, 64x64,
    12 epochs) the joint-only loss gave D_GED^2 0.29, ECE 0.31 and a joint NLL of 0.031
    nats/pixel; with `marginal_weight=1`: D_GED^2 0.14, ECE 0.003 and a *lower* joint NLL,
    0.020 (the oracle's GED is 0.03). Both
    terms are proper scoring rules for the same distribution, so the target is unchanged.

    `mean_weight=w > 0` adds `w` times the cross-entropy of the mean logits `mu` (the
    deterministic head's loss, `SegmentationCrossEntropy`, on the same labels, weights and
    normalisation). Unlike the per-pixel term it is not a scoring rule of the logits
    distribution: it pulls `mu` toward the deterministic optimum, a regulariser for small
    backbones whose features serve both the mean and the factor. Measured on the built-in
    benchmark (`benchmarks/README.md`, "mean_weight"), `w = 1` is a trade-off, not a gain:
    on U-Net(8, depth 2), 12 epochs, it lowers D2_GED from 0.116 to 0.099 and raises mIoU
    from 0.60 to 0.63, with more diverse samples (0.64 against 0.60); on the default job
    (U-Net(16, depth 3), 36 epochs) it lowers HM-IoU from 0.696 to 0.668 and mIoU from 0.71
    to 0.66 at the same GED. The default, 0, is the loss above.

    Memory: `chunk_size=K` (a divisor of M, even with antithetic sampling) draws, scores and
    discards K samples at a time and recomputes them in the backward pass
    (`tfp_seg.losses.chunked`): the same value and gradient on the same samples, with peak
    memory flat in M, for a second pass over the samples; `chunk_size=None` draws all M at
    once. The default, `"auto"`, chooses from the problem size when the loss runs
    (`tfp_seg.losses.chunked.auto_chunk_size`): all samples at once up to 20 samples or
    2**20 sample values per image, chunks of at most 2**16 values per image beyond (at
    128 x 128 with 2 classes: 4 samples a chunk from M = 64 on), so peak memory stops growing
    with M. `LowRankLogits` is sampled and scored in a fused class-planar form on either path
    (for 2 classes through the logit difference: `tfp_seg.losses.planar`).

    Args:
      head: any `DistributionHead` (its `sample_logits` is used; weights are not).
      num_samples: M Monte Carlo samples per step (even with antithetic sampling).
      antithetic: override the head's default.
      ignore_label, class_weights: see `mc_categorical_nll`.
      marginal_weight: weight of the per-pixel term (0 = Monteiro et al. exactly).
      chunk_size: "auto" (the default), None (all samples at once) or K: samples per chunk
        (see above).
      mean_weight: weight of the mean logits' cross-entropy (0, the default: none; see above).
      mean_warmup: give the loss the switch `mean_only` (a non-trainable variable, 0 at the
        start) that `tfp_seg.losses.MeanWarmup` turns on for the first epochs of `fit`: while
        it is on, the loss is the cross-entropy of the mean logits alone (the covariance
        channels get no gradient). Off, the loss is the one above. Default False: no switch.
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
        name: str = "stochastic_segmentation_nll",
        chunk_size: Union[int, str, None] = chunked.AUTO,
        mean_weight: float = 0.0,
        mean_warmup: bool = False,
        **kwargs,
    ):
        self.marginal_weight = _checks.non_negative_float(marginal_weight, "marginal_weight")
        self.mean_weight = _checks.non_negative_float(mean_weight, "mean_weight")
        if not isinstance(mean_warmup, bool):
            raise ValueError(f"`mean_warmup` must be a bool; got {mean_warmup!r}.")
        # The switch `MeanWarmup` sets: 1 while only the mean is trained, 0 (the start) after.
        self.mean_only = (
            tf.Variable(0.0, trainable=False, dtype=tf.float32, name="mean_only")
            if mean_warmup
            else None
        )
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
        if self.mean_only is None:
            return self._normalize(self._ssn_nll(y_true, y_pred), y_true, y_pred)
        # Mean warm-up: the mean logits' cross-entropy alone while the switch is on (the
        # covariance channels get no gradient), the SSN loss after. Only the taken branch runs.
        nll = tf.cond(
            self.mean_only > 0.5,
            lambda: self._mean_nll(y_true, self._check_y_pred(y_pred), self.validate_args),
            lambda: self._ssn_nll(y_true, y_pred),
        )
        return self._normalize(nll, y_true, y_pred)

    def _ssn_nll(self, y_true, y_pred):
        """`[B]` SSN loss per example (before normalisation): joint + weighted terms."""
        joint, marginal = self._nll_terms(y_true, y_pred)
        nll = joint + self.marginal_weight * marginal if self.marginal_weight else joint
        if self.mean_weight:
            nll = nll + self.mean_weight * self._mean_nll(y_true, y_pred)
        return nll

    def _mean_nll(self, y_true, y_pred, validate_args: bool = False):
        """`[B]` cross-entropy of the mean logits; labels are checked with `validate_args`
        (off beside the SSN terms, which check them already)."""
        logits = tf.cast(self.head.mean_logits(y_pred), tf.float32)
        return _cross_entropy(y_true, logits, self.ignore_label, self.class_weights, validate_args)

    @property
    def mean_warmup(self) -> bool:
        """Whether the loss has the warm-up switch `mean_only`."""
        return self.mean_only is not None

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "marginal_weight": self.marginal_weight,
                "mean_weight": self.mean_weight,
                "mean_warmup": self.mean_warmup,  # absent from earlier versions' configs: False
            }
        )
        return config


@base.register_default_loss("categorical")
@keras.saving.register_keras_serializable(package="tfp_seg")
class SegmentationCrossEntropy(base.HeadLoss):
    """Pixel-wise softmax cross-entropy on logits (the deterministic baseline's NLL).

    `y_pred`'s first `num_classes` channels are taken as logits (every tfp_seg head packs its
    mean logits first), so it also trains the mean of a distribution head. Per example, the
    cross-entropy is summed over non-ignored pixels and divided by their count
    (`normalize="pixels"`), or left summed (`"none"`).

    `y_pred` is `[B, *S, P]` with `S = (H, W)` (rank 4) or `(D, H, W)` (rank 5, volumes),
    told by its rank (the loss holds no head). `y_true` (told apart by
    `tfp_seg.losses.targets`) is one of

    ```none
    label maps [B, *S]          nll_b = -sum_i w_i log softmax(logits_bi)[y_bi]
    label sets [B, K, *S]       nll_b = (1/K) sum_k [ -sum_i w_bki log softmax(logits_bi)[y_bki] ]
    soft labels [B, *S, C]      nll_b = -sum_i sum_c cw_c q_bic log softmax(logits_bi)_c
    ```

    with `w_i = class_weight[y_i]` (0 for ignored pixels). For a label set the count is the
    non-ignored pixels of one map averaged over the K raters; soft labels (float class
    fractions, `annotation="marginal"` of `tfp_seg.data`: non-negative, summing to 1 over the
    classes, checked with `validate_args`) have no ignored pixels, so the count is prod(S). The
    mean over raters equals the cross-entropy of the raters' empirical soft label (without
    ignored pixels), and one-hot soft labels give the hard-label loss.
    """

    def __init__(
        self,
        num_classes: Optional[int] = None,
        ignore_label: Optional[int] = None,
        class_weights: Optional[Sequence[float]] = None,
        normalize: str = "pixels",
        validate_args: bool = True,
        name: str = "segmentation_cross_entropy",
        **kwargs,
    ):
        super().__init__(
            ignore_label=ignore_label,
            class_weights=class_weights,
            normalize=normalize,
            validate_args=validate_args,
            num_classes=num_classes,
            name=name,
            **kwargs,
        )

    def call(self, y_true, y_pred):
        y_pred = tf.cast(y_pred, tf.float32)
        _checks.infer_spatial_dims(y_pred, "y_pred", 2, "[B, H, W, C] logits")
        logits = y_pred if self.num_classes is None else y_pred[..., : self.num_classes]
        nll = _cross_entropy(
            y_true, logits, self.ignore_label, self.class_weights, self.validate_args
        )
        return self._normalize(nll, y_true, y_pred)


def _cross_entropy(y_true, logits, ignore_label, class_weights, validate_args: bool):
    """`[B]` softmax cross-entropy of float32 logits `[B, *S, C]`, summed over pixels: the mean
    over raters for label maps / sets, the soft labels' expected value for soft labels."""
    classes = logits.shape[-1]
    class_weights = pixelwise.check_class_weights(class_weights, classes)
    prepared = targets.prepare_targets(
        y_true, logits, classes, ignore_label, validate_args=validate_args, name="y_true"
    )
    if validate_args:
        logits = _checks.assert_finite(logits, "y_pred")
    if prepared.kind == targets.SOFT:
        return pixelwise.soft_marginal_nll(prepared.labels, logits[tf.newaxis], class_weights)
    per_rater = pixelwise.label_set_nll(
        prepared.labels, logits[tf.newaxis], ignore_label, class_weights
    )
    return tf.reduce_mean(per_rater, axis=1)
