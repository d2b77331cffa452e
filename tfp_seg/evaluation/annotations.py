"""Evaluation of a probabilistic segmenter against raters: users' data (LIDC, image folders,
NIfTI), where the label distribution of an image is known only through its K annotations.

Conventions (those of `tfp_seg.metrics`, and of the published LIDC tables):

```none
d(a, b)     = 1 - IoU over the foreground classes present in a or b;  d = 0 without foreground
ged_n       = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')]   over the first n samples of the image and
              its K raters, all pairs averaged (the V-statistic of generalized_energy_distance)
hm_iou_n    = Hungarian-matched IoU of the first n samples and the K raters (replicated to lcm)
q_ic        = (1/K) #{k : y_kic = c}      the raters' per-pixel marginals (soft labels)
p_ic        = mean softmax of the first num_samples logit samples  (the mean prediction)
```

The reference side is the K raters, not a known distribution (`evaluate_ambiguous`), so the
V-statistic is reported, as the literature does (Kohl et al., 2018; Baumgartner et al., 2019;
Monteiro et al., 2020): for a model that draws exactly the raters' empirical distribution
(each sample one of the K annotations, uniformly) `E[ged_n] = reference_diversity / n` (the
raters' V-statistic diversity, self-pairs included), a bias that shrinks with n, hence the
tables at 16 and 100 samples. `evaluate_ambiguous` instead reports the unbiased U-statistic
against exact modes; the two are not comparable number for number.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from tfp_seg import _checks, _seeds, metrics
from tfp_seg.evaluation._inputs import annotated_batches, check_labels
from tfp_seg.evaluation._stream import CalibrationSums, RiskCoverageSums, draw_logits, softmax

__all__ = ["evaluate_annotations"]

_TERMS = ("ged", "cross", "sample_diversity", "reference_diversity")


def _check_sample_counts(sample_counts: Any) -> tuple[int, ...]:
    message = (
        "`sample_counts` must be a sequence of ints >= 2 (the sample sizes of the reported "
        "`ged_<n>` / `hm_iou_<n>`, e.g. (16, 100)); got {!r}."
    )
    if isinstance(sample_counts, (str, bytes)) or not hasattr(sample_counts, "__iter__"):
        raise ValueError(message.format(sample_counts))
    counts = tuple(sample_counts)
    for n in counts:
        if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 2:
            raise ValueError(message.format(sample_counts))
    return tuple(sorted({int(n) for n in counts}))


class _RaterSums:
    """Running sums of every metric of `evaluate_annotations`, one batch at a time."""

    def __init__(self, num_samples, sample_counts, num_classes, ignore_label, num_bins, regions):
        self.num_samples, self.sample_counts = num_samples, sample_counts
        self.regions = regions
        self.region_dice: dict[str, list] = {name: [] for name in regions or ()}
        self.sizes = sorted({num_samples, *sample_counts})
        self.num_classes, self.ignore_label = num_classes, ignore_label
        self.per_image: dict[str, list] = {}
        self.sums = {"nll": 0.0, "brier": 0.0, "pixels": 0}
        self.calibration = CalibrationSums(num_bins)
        self.confusion = np.zeros((num_classes, num_classes), np.int64)
        self.pixel = RiskCoverageSums()
        self.image_kappa: list = []
        self.image_risk: list = []
        self.num_annotations = 0

    def _record(self, key: str, value) -> None:
        self.per_image.setdefault(key, []).append(value)

    def add(self, logits: np.ndarray, annotations: np.ndarray, valid: np.ndarray) -> None:
        """One batch: logit samples `[N, b, *S, C]`, annotations `[b, K, *S]`, valid
        pixels `[b, *S]`."""
        c, ignore = self.num_classes, self.ignore_label
        k = self.num_annotations = annotations.shape[1]
        spatial = annotations.ndim - 2
        for j in range(annotations.shape[0]):
            samples = logits[:, j].argmax(axis=-1)  # [N, *S]: the first n are used for n
            for n in self.sizes:
                terms = metrics.generalized_energy_distance(
                    samples[:n],
                    annotations[j],
                    c,
                    return_terms=True,
                    ignore_label=ignore,
                    spatial_dims=spatial,
                )
                hm = metrics.hungarian_matched_iou(
                    samples[:n], annotations[j], c, ignore_label=ignore, spatial_dims=spatial
                )
                if n == self.num_samples:
                    for key in _TERMS:
                        self._record(key, terms[key])
                    self._record("hm_iou", hm)
                if n in self.sample_counts:
                    self._record(f"ged_{n}", terms["ged"])
                    self._record(f"hm_iou_{n}", hm)

        probs = softmax(logits[: self.num_samples]).mean(axis=0)  # [b, *S, C] float32
        marginals = np.stack([np.mean(annotations == i, axis=1) for i in range(c)], axis=-1)
        raters = np.moveaxis(annotations, 1, -1)  # [b, *S, K]
        p, q, y = probs[valid], marginals[valid], raters[valid]  # valid pixels: [n, C], [n, K]
        self.sums["pixels"] += p.shape[0]
        self.sums["nll"] += metrics.negative_log_likelihood(p, q) * p.shape[0]
        self.sums["brier"] += metrics.brier_score(p, q) * p.shape[0]
        self.calibration.add(p, q)
        pred = p.argmax(axis=-1)
        for i in range(k):
            self.confusion += metrics.confusion_matrix(pred, y[:, i], c)
        self.pixel.add(p.max(axis=-1), np.sum(pred[:, None] != y, axis=1), k)
        shared = annotations if ignore is None else np.where(valid[:, None], annotations, ignore)
        if ignore is None:
            kappa, risks = metrics.image_confidence_risks(probs, annotations)
        else:  # Dice and the image's mean entropy over its valid pixels only
            p64 = probs.astype(np.float64)
            entropy = -np.sum(np.where(p64 > 0, p64 * np.log(np.where(p64 > 0, p64, 1.0)), 0), -1)
            uncertainty = np.array([e[v].mean() for e, v in zip(entropy, valid, strict=True)])
            kappa, risks = metrics.image_confidence_risks(
                probs, shared, uncertainty=uncertainty, ignore_label=ignore
            )
        self.image_kappa.append(kappa)
        self.image_risk.append(risks)
        if self.regions:  # per image and rater, then the mean over the K raters
            b = annotations.shape[0]
            pred_k = np.repeat(probs.argmax(axis=-1)[:, None], k, axis=1)
            dice = metrics.region_dice(
                pred_k.reshape((b * k,) + pred_k.shape[2:]),
                shared.reshape((b * k,) + shared.shape[2:]),
                self.regions,
                ignore_label=ignore,
                num_classes=c,
                per_image=True,
            )
            for name, values in dice.items():
                self.region_dice[name].append(values.reshape(b, k).mean(axis=1))

    def report(self) -> dict:
        mean = {key: float(np.mean(values)) for key, values in self.per_image.items()}
        risks = np.concatenate(self.image_risk)
        report = {
            "num_images": int(risks.size),
            "num_samples": int(self.num_samples),
            "num_annotations": int(self.num_annotations),
            "ged": mean["ged"],
            "ged_cross": mean["cross"],
            "ged_sample_diversity": mean["sample_diversity"],
            "ged_reference_diversity": mean["reference_diversity"],
            "diversity": mean["sample_diversity"],
            "reference_diversity": mean["reference_diversity"],
            "hm_iou": mean["hm_iou"],
        }
        for n in self.sample_counts:
            report[f"ged_{n}"] = mean[f"ged_{n}"]
            report[f"hm_iou_{n}"] = mean[f"hm_iou_{n}"]
        pixels = self.sums["pixels"]
        report.update(
            nll=self.sums["nll"] / pixels,
            ece=self.calibration.ece(),
            brier=self.sums["brier"] / pixels,
            miou=float(np.nanmean(metrics.per_class_iou(self.confusion))),
            dice=float(1.0 - risks.mean()),
            pixel_accuracy=float(np.trace(self.confusion) / self.confusion.sum()),
        )
        for name, values in self.region_dice.items():
            report[f"dice_{name}"] = float(np.concatenate(values).mean())
        for key, value in self.pixel.scores().items():
            report[f"{key}_pixel"] = value
        kappa = np.concatenate(self.image_kappa)
        for key, value in metrics.selective_scores(kappa, risks).items():
            report[f"{key}_image"] = value
        return report


def evaluate_annotations(
    model,
    images,
    annotations=None,
    num_samples: int = 16,
    seed: Any = 0,
    batch_size: Optional[int] = 16,
    num_classes: Optional[int] = None,
    ignore_label: Optional[int] = None,
    sample_counts: Sequence[int] = (16, 100),
    num_bins: int = 10,
    progress: bool = False,
    regions: Optional[Mapping[str, Sequence[int]]] = None,
) -> dict:
    """Evaluate any model-level sampler against the K annotations (raters) of every image.

    The literature's protocol is this one call: GED and HM-IoU at 16 and 100 samples
    (`ged_16`, `ged_100`, `hm_iou_16`, `hm_iou_100`), and every other metric at `num_samples`.

    Streaming: the images are taken `batch_size` at a time, one `model.sample_logits` call per
    batch draws `N = max(num_samples, *sample_counts)` samples of it, every metric is updated
    as running sums (per-image values, calibration bins, a confusion matrix, counts per
    confidence value) and the samples are dropped. So memory holds one batch's samples
    `[N, batch_size, *S, C]` (float32) and its inputs, whatever the number of images; a set
    larger than memory streams as an iterable or `tf.data.Dataset` of batches. All metrics
    come from the same draw: those at `n` samples use its first `n` samples (so `ged_16` is
    computed from the first 16 of the 100 samples behind `ged_100`).

    Seeds: batch `k` (of `batch_size` images, after re-batching a stream) is drawn with
    `seed` for `k = 0` and `fold_seed(seed, k)` after, the seeds `tfp_seg.models.sampling`'s
    Sampler gives its own batches. So for a Sampler the report equals the metrics of the
    samples of one `model.sample_logits(all_images, N, seed, batch_size)` call, and a stream
    gives the same report as the same images in memory. Like that call, it is reproducible for
    a fixed `batch_size`, not across batch sizes.

    Args:
      model: any sampler with `sample_logits(x, num_samples, seed=..., batch_size=...)`
        returning logits `[N, B, *S, C]` (`ProbabilisticSegmenter`, `ProbabilisticUNet`,
        `MCDropout`, `DeepEnsemble`, or a user model).
      images: `[B, *S, channels]` images with `annotations`, `S = (H, W)` (images, rank 4)
        or `(D, H, W)` (volumes, rank 5; the rank of the images tells which, and the
        annotations and logits must agree); or, with `annotations=None`, a data set with
        `images` and `annotations` (`tfp_seg.data.AnnotatedImages`, whose `num_classes` is
        then the default), or an iterable / `tf.data.Dataset` of
        `(images [b, *S, channels], annotations [b, K, *S])` batches.
      annotations: integer `[B, K, *S]`: K label maps per image (K >= 1; the same K for
        every image: LIDC crops carry 4, an empty mask counting as an annotation).
      num_samples: N >= 2 samples per image for `ged`, `hm_iou`, `diversity` and the mean
        prediction of the per-pixel metrics.
      seed: None (fresh randomness), an int or a pair of ints.
      batch_size: images per batch (None: arrays in one batch, a stream's batches as they
        come). Peak memory grows linearly with it.
      num_classes: C; default the data set's, else the logits' last axis (which must equal C).
      ignore_label: label of unlabelled pixels, outside `[0, C)` (e.g. 255). A pixel where any
        rater has it is left out of every metric of its image (the convention of
        `tfp_seg.metrics.sets`: one valid region per image, shared by samples and raters);
        an image without a valid pixel is an error.
      sample_counts: the sample sizes `n` of the extra `ged_<n>` and `hm_iou_<n>` (ints >= 2);
        `()` for none.
      num_bins: uniform confidence bins of the ECE.
      progress: show a progress bar over batches.
      regions: optional `{name: class ids}` (e.g. `tfp_seg.metrics.BRATS_REGIONS`): the
        report then has `dice_<name>` for each, the Dice of the region (a union of classes)
        of `argmax p` against each rater, averaged over raters and images
        (`tfp_seg.metrics.region_dice`; 1 where both are empty).

    Returns:
      A flat dict of floats:
      - `ged` (`D_GED^2` with its `ged_cross`, `ged_sample_diversity`,
        `ged_reference_diversity`) and `hm_iou` at `num_samples`; `ged_<n>`, `hm_iou_<n>` for
        every `n` of `sample_counts`; all averaged over images (see the module docstring);
      - `diversity` = `E[d(S, S')]` of the samples, `reference_diversity` = `E[d(Y, Y')]` of
        the raters, the two V-statistic terms of `ged` (`tfp_seg.metrics.diversity`);
      - `nll` (nats per pixel), `ece`, `brier`: the mean prediction `p` against the raters'
        marginals `q` (soft labels) over the valid pixels: `-sum_c q_c log p_c`,
        `sum_c (p_c - q_c)^2` (`tfp_seg.metrics` soft-target conventions); the ECE with the
        accuracy `q[argmax p]` equals the ECE against every rater's labels, pooled;
      - `miou`, `pixel_accuracy`: of `argmax p` against each rater, from the confusion
        matrix summed over raters and pixels (dataset-level, `tfp_seg.metrics.mean_iou`);
      - `dice`: per image and rater the Dice of `argmax p` over the foreground classes present
        in either (1 when neither has foreground), averaged over raters and images;
      - selective prediction, as in `evaluate_ambiguous`: `aurc_pixel`, `e_aurc_pixel`,
        `augrc_pixel` (pixels ranked by `max_c p`, errors against each rater; exact, streamed
        as counts per distinct confidence), `aurc_image`, `e_aurc_image`, `augrc_image`
        (images ranked by minus their mean predictive entropy, risk `1 - Dice`);
      - `num_images`, `num_samples`, `num_annotations` (K).
    """
    if not callable(getattr(model, "sample_logits", None)):
        raise ValueError(
            "`model` must have a method sample_logits(x, num_samples, seed=..., batch_size=...) "
            f"returning logits [N, B, *S, C]; got {type(model).__name__}."
        )
    num_samples = _checks.positive_int(
        num_samples,
        "num_samples",
        minimum=2,
        message="`{name}` must be {what} (the sample diversity E[d(S,S')], and so GED, needs "
        "a pair of samples); got {value}.",
    )
    sample_counts = _check_sample_counts(sample_counts)
    batch_size = _checks.positive_int(batch_size, "batch_size", optional=True)
    num_bins = _checks.positive_int(num_bins, "num_bins")
    num_classes = _checks.positive_int(num_classes, "num_classes", optional=True)
    if regions is not None:
        metrics.region_dice(np.zeros((1, 1), int), np.zeros((1, 1), int), regions)  # checks
    ignore_label = _checks.check_ignore_label(ignore_label)
    seed = _seeds.check_seed(seed)
    num_draws = max((num_samples, *sample_counts))
    batches, data_classes = annotated_batches(images, annotations, batch_size)
    num_classes = num_classes or data_classes

    sums = None
    first = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(desc="evaluate", unit="img")
    for index, (x, y) in enumerate(batches):
        logits = draw_logits(model, x, num_draws, seed, batch_size, index)
        if sums is None:
            num_classes = num_classes or logits.shape[-1]
            if ignore_label is not None and 0 <= ignore_label < num_classes:
                raise ValueError(
                    f"`ignore_label` must lie outside the class range [0, {num_classes}) (e.g. "
                    f"255); got {ignore_label}."
                )
            sums = _RaterSums(
                num_samples, sample_counts, num_classes, ignore_label, num_bins, regions
            )
        if logits.shape[-1] != num_classes:
            raise ValueError(
                f"`model.sample_logits` must return logits over num_classes={num_classes} "
                f"classes (last axis); got shape {logits.shape} for images {first}.."
                f"{first + x.shape[0] - 1}."
            )
        y, valid = check_labels(y, num_classes, ignore_label, first)
        sums.add(logits, y, valid)
        first += x.shape[0]
        del logits
        if bar is not None:
            bar.update(x.shape[0])
    if bar is not None:
        bar.close()
    if sums is None:
        raise ValueError("`images` holds no images: the evaluation set is empty.")
    return sums.report()
