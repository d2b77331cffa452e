"""Evaluation metrics for probabilistic segmentation.

Two families live here:

* NumPy functions (`generalized_energy_distance`, `hungarian_matched_iou`,
  `expected_calibration_error`, `mean_iou`, `ood_scores`, ...). They accept NumPy arrays or eager
  TensorFlow tensors (converted with `np.asarray`), validate their inputs early (a `ValueError`
  naming the argument and the shape/dtype received) and return Python floats (or dicts / arrays
  where stated). They compute in float64.
* Streaming Keras 3 metrics (`StreamingMeanIoU`, `StreamingECE`, `StreamingNLL`,
  `StreamingBrier`) for `model.compile(metrics=[...])`. They accumulate sufficient statistics in
  float64 variables, so after any number of batches `result()` equals the NumPy function applied to
  the concatenated data. On a distribution head's packed parameters they score the head's Monte
  Carlo predictive probabilities `head.mean_probabilities(...)` (what `predict_proba` returns):
  `tfp_seg.models.ProbabilisticSegmenter.compile` gives them the model's head (`bind_head`).
  Without a head (plain Keras models, or `predictive=False`) they score the first `C` channels of
  `y_pred` as probabilities or logits.

Conventions (shared with the rest of `tfp_seg`):

* Label maps are integer arrays; class probabilities are channels-last `[..., C]`.
* Images and volumes alike: `S = (H, W)` or `S = (D, H, W)`; a voxel counts as a pixel.
  Per-pixel metrics (IoU, accuracy, ECE, NLL, Brier, pixel-level selective scores) pool all
  pixels of their input, so a `[B, D, H, W]` volume scores as the `[B, D*H, W]` image; where
  the layout matters the rank is read from a companion tensor (`probs [B, *S, C]` for
  `image_confidence_risks`), from the input's leading axis (`[B, *S]` of the Dice scores), or
  from an explicit `spatial_dims` (the set metrics: `[B, N, H, W]` is a batch of images or,
  with `spatial_dims=3`, one volume's `N` samples).
* Set metrics take one image as `samples [N, *S]`, `references [K, *S]`, or a batch as
  `[B, N, *S]` / `[B, K, *S]` and average over `B`.
* The set distance is `d(a, b) = 1 - IoU` over the foreground classes `1..C-1`, averaged over the
  classes present in `a` or `b`; two masks without any foreground have `d = 0` (Kohl et al., 2018;
  Monteiro et al., 2020).

Modules, by family (the names are all importable from `tfp_seg.metrics`):

* `sets`: `iou_distance`, `pairwise_iou_distance`, `generalized_energy_distance`, `diversity`,
  `hungarian_matched_iou`; each takes `ignore_label` / `mask`: one set of valid pixels per
  image, shared by every pair of maps compared.
* `segmentation`: `confusion_matrix`, `per_class_iou`, `mean_iou`, `pixel_accuracy`.
* `dice`: `region_dice` (per region, a union of classes; `BRATS_REGIONS` by default) and
  `per_class_dice`, per image or volume and averaged over the batch.
* `calibration`: `expected_calibration_error(_soft)`, `reliability_diagram_data`,
  `negative_log_likelihood`, `brier_score`.
* `ood`: `ood_scores`.
* `selective`: `risk_coverage_curve`, `aurc`, `e_aurc`, `augrc`, `selective_scores`,
  `risk_at_coverage`, `coverage_at_risk`, and their inputs at the pixel and image level
  (`pixel_confidence_errors`, `image_confidence_risks`).
* `streaming`: the Keras metrics and `bind_head`.
"""

from tfp_seg.metrics.calibration import (
    brier_score,
    expected_calibration_error,
    expected_calibration_error_soft,
    negative_log_likelihood,
    reliability_diagram_data,
)
from tfp_seg.metrics.dice import BRATS_REGIONS, per_class_dice, region_dice
from tfp_seg.metrics.ood import ood_scores
from tfp_seg.metrics.segmentation import confusion_matrix, mean_iou, per_class_iou, pixel_accuracy
from tfp_seg.metrics.selective import (
    augrc,
    aurc,
    coverage_at_risk,
    e_aurc,
    image_confidence_risks,
    pixel_confidence_errors,
    risk_at_coverage,
    risk_coverage_curve,
    selective_scores,
)
from tfp_seg.metrics.sets import (
    diversity,
    generalized_energy_distance,
    hungarian_matched_iou,
    iou_distance,
    pairwise_iou_distance,
)
from tfp_seg.metrics.streaming import (
    StreamingBrier,
    StreamingECE,
    StreamingMeanIoU,
    StreamingNLL,
    bind_head,
)

__all__ = [
    "BRATS_REGIONS",
    "StreamingBrier",
    "StreamingECE",
    "StreamingMeanIoU",
    "StreamingNLL",
    "augrc",
    "aurc",
    "bind_head",
    "brier_score",
    "confusion_matrix",
    "coverage_at_risk",
    "diversity",
    "e_aurc",
    "expected_calibration_error",
    "expected_calibration_error_soft",
    "generalized_energy_distance",
    "hungarian_matched_iou",
    "image_confidence_risks",
    "iou_distance",
    "mean_iou",
    "negative_log_likelihood",
    "ood_scores",
    "pairwise_iou_distance",
    "per_class_dice",
    "per_class_iou",
    "pixel_accuracy",
    "pixel_confidence_errors",
    "reliability_diagram_data",
    "region_dice",
    "risk_at_coverage",
    "risk_coverage_curve",
    "selective_scores",
]
