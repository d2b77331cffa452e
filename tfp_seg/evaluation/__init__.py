"""Evaluation of probabilistic segmenters: against the exact label distribution of the built-in
benchmark, and against the raters of users' data.

* `evaluate_ambiguous(model, data, ...)` (`ambiguous`): `tfp_seg.data.ambiguous_shapes`, whose
  label distribution is known exactly; every metric next to its oracle value, sampled set
  metrics as unbiased U-statistics.
* `evaluate_annotations(model, images, annotations, ...)` (`annotations`): K annotations per
  image (LIDC, folders, NIfTI); GED and HM-IoU at 16 and 100 samples (`ged_16`, `ged_100`,
  `hm_iou_16`, `hm_iou_100`) as the literature's V-statistics, per-pixel metrics against the
  raters' marginals, `ignore_label`, arrays or a stream of batches.
* `format_report(report)`: a text table of either report.

Images and volumes alike: `x [B, *S, channels]` with `S = (H, W)` or `(D, H, W)`, told by the
rank of the images (their channel axis makes it unambiguous); annotations `[B, K, *S]`.

Any model with `sample_logits(x, num_samples, seed=None, batch_size=None) -> [N, B, *S, C]`
(numpy) can be evaluated: `ProbabilisticSegmenter`, `ProbabilisticUNet`, `MCDropout`,
`DeepEnsemble`. Both evaluations stream (`_stream`): one `sample_logits` call per batch of
`batch_size` images, with the seed the Sampler gives its own batch (`seed`, then
`fold_seed(seed, k)`), metrics kept as running sums; memory holds one batch's samples.
"""

from tfp_seg.evaluation._stream import softmax
from tfp_seg.evaluation.ambiguous import evaluate_ambiguous, format_report
from tfp_seg.evaluation.annotations import evaluate_annotations

__all__ = ["evaluate_ambiguous", "evaluate_annotations", "format_report", "softmax"]
