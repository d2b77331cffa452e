"""Exact evaluation of a probabilistic segmenter on `tfp_seg.data.ambiguous_shapes`.

The benchmark's true label distribution is known (enumerated modes with weights), so the
reference side of every metric is exact; only the model is sampled. Each model metric is
reported next to its *oracle* value: the same metric for a sampler that draws from the true
distribution (for sampled metrics) or for the true marginals (for per-pixel metrics).

Sampled set metrics are unbiased: with the reference side exact, the only term of
`D_GED^2 = 2 E[d(S,Y)] - E[d(S,S')] - E[d(Y,Y')]` that needs two model samples, `E[d(S,S')]`
for *independent* S, S', is estimated by the U-statistic over the `N (N - 1)` ordered pairs of
distinct samples. (The V-statistic of `tfp_seg.metrics.diversity` /
`generalized_energy_distance`, which also averages the `N` zero self-pairs `d(s_n, s_n) = 0`, has
expectation `(N - 1) / N E[d(S,S')]`, so a perfect sampler would read `(N - 1) / N` of the oracle
diversity and a GED `E[d(S,S')] / N` too high.) So model, oracle sampler and exact oracle values
are computed alike and comparable: a sampler of the true distribution has, in expectation,
`diversity == oracle_diversity` and `ged == oracle_ged == 0`.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import tensorflow as tf

from tfp_seg import _checks, _seeds, metrics
from tfp_seg.data import AmbiguousShapes, sample_annotations
from tfp_seg.evaluation._stream import CalibrationSums, RiskCoverageSums, draw_logits, softmax
from tfp_seg.losses import mc_categorical_nll

__all__ = ["evaluate_ambiguous", "format_report"]


def _joint_nll_sum(logit_samples: np.ndarray, annotations: np.ndarray) -> float:
    """Sum over images and annotations of `-log p(y | x)`, MC over the samples (nats)."""
    total = 0.0
    samples = tf.constant(logit_samples)
    for k in range(annotations.shape[1]):
        nll = mc_categorical_nll(annotations[:, k], samples, validate_args=False).numpy()
        total += float(nll.sum())
    return total


def _ged_terms(
    samples: np.ndarray,
    modes: np.ndarray,
    weights: np.ndarray,
    num_classes: int,
    d_yy: Optional[np.ndarray] = None,
) -> dict:
    """Unbiased `D_GED^2` terms of one image: `N >= 2` samples `[N, *S]` vs the exact modes
    `[M, *S]` (any spatial rank: the distances are over all pixels / voxels).

    ```none
    cross               = (1/N) sum_n sum_k w_k d(s_n, m_k)              unbiased for E[d(S,Y)]
    sample_diversity    = 1/(N(N-1)) sum_{n != n'} d(s_n, s_n')          U-statistic, E[d(S,S')]
    reference_diversity = w^T D w,  D_kl = d(m_k, m_l)                    exact E[d(Y,Y')]
    ged                 = 2 cross - sample_diversity - reference_diversity
    ```

    `d_yy`: the `[M, M]` mode distances `D` when the caller has them already (they depend on
    the image only, so the model's and the oracle's terms share one computation).
    """
    n = samples.shape[0]
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    d_ss = metrics.pairwise_iou_distance(samples, samples, num_classes)
    d_sy = metrics.pairwise_iou_distance(samples, modes, num_classes)
    if d_yy is None:
        d_yy = metrics.pairwise_iou_distance(modes, modes, num_classes)
    cross = float(np.mean(d_sy @ w))
    sample_div = float((d_ss.sum() - np.trace(d_ss)) / (n * (n - 1)))
    reference_div = float(w @ d_yy @ w)
    return {
        "ged": 2.0 * cross - sample_div - reference_div,
        "cross": cross,
        "sample_diversity": sample_div,
        "reference_diversity": reference_div,
    }


def _standard_error(values) -> float:
    """`std(values, ddof=1) / sqrt(n)`, the standard error of their mean (0 for n = 1)."""
    x = np.asarray(values, np.float64)
    return float(np.std(x, ddof=1) / np.sqrt(x.size)) if x.size > 1 else 0.0


def evaluate_ambiguous(
    model,
    data: AmbiguousShapes,
    num_samples: int = 16,
    seed: int = 0,
    batch_size: Optional[int] = 16,
    progress: bool = False,
    num_bins: int = 10,
) -> dict:
    """Evaluate `model` against the exact label distribution of `data`.

    Streams: the images are evaluated `batch_size` at a time (one `model.sample_logits` call
    per batch), every metric kept as running sums, so memory holds one batch's samples
    `[N, batch_size, *S, C]` whatever the size of `data`. Batch `k` is drawn with the seed
    the Sampler base gives its own batch `k` (`seed`, then `fold_seed(seed, k)`), so the report
    equals the one of all samples drawn at once by `model.sample_logits(data.images, N, seed,
    batch_size)`; like that call it is reproducible for a fixed `batch_size`, not across them.

    Args:
      model: exposes `sample_logits(x, num_samples, seed=..., batch_size=...)`.
      data: an `AmbiguousShapes` split (held out from training): images `S = (H, W)` or
        volumes `S = (D, H, W)` (`ambiguous_shapes(..., spatial_dims=3)`), told by the rank
        of `data.images [n, *S, channels]`; a voxel counts as a pixel in every metric.
      num_samples: N >= 2 samples per image for sampled metrics (GED, HM-IoU, diversity,
        MC NLL). They are taken to be independent draws (as `sample_logits` gives by
        default). `DeepEnsemble` draws sample n from member n mod M, a stratified design, so
        for it the pair statistics below are not exactly unbiased for the members' uniform
        mixture (e.g. with deterministic members and N = M, `diversity` is M / (M - 1) times
        the mixture's E[d(S, S')]).
      seed: sampling seed (model and oracle).
      batch_size: images per batch (None: all at once).
      progress: show a progress bar over images.
      num_bins: confidence bins of the ECEs.

    Returns:
      A flat dict of floats. Model metrics and (`oracle_*`) the same metric for the true
      distribution:
      - `ged` (D_GED^2 vs the exact modes, references weighted by their probabilities) with
        `ged_cross`, `ged_sample_diversity`, `ged_reference_diversity`; `oracle_ged`, the same
        estimator for N samples of the true distribution. All are unbiased (see the module
        docstring): `ged_sample_diversity` is the U-statistic over pairs of distinct samples,
        so E[ged] is the exact D_GED^2 of the model's distribution, and E[oracle_ged] = 0; a
        finite-N value can therefore be slightly negative;
      - `ged_se`, `oracle_ged_se`, `hm_iou_se`, `diversity_se`: the standard errors of those
        image means, `std(per-image values, ddof=1) / sqrt(n)` (images and Monte Carlo draws
        together: two draws of one model on one split differ by about sqrt(2) of it);
      - `hm_iou` vs the K annotations; `oracle_hm_iou`;
      - `diversity` = E[d(S, S')] for independent model samples S, S' (the U-statistic
        `ged_sample_diversity`, averaged over images); `oracle_diversity` = the exact
        E[d(Y, Y')] = w^T D w of the true distribution (`ged_reference_diversity`); a sampler
        of the true distribution gives `diversity == oracle_diversity` in expectation;
      - `nll` expected pixel NLL of the predictive probabilities under the true marginals
        (nats/pixel); `oracle_nll` = entropy of the true marginals (its floor);
      - `nll_joint` MC estimate of `-log p(annotation | x)` per pixel over the K annotations
        (the SSN objective; an upper bound for finite N);
      - `ece` vs the K annotations, `ece_exact` vs the exact marginals; `brier` (soft, vs the
        exact marginals); `miou`, `pixel_accuracy` of the predictive argmax vs the annotations;
      - selective prediction (`tfp_seg.metrics.selective`; ties accepted together):
        `aurc_pixel`, `e_aurc_pixel`, `augrc_pixel` rank the pixels by their top-label
        confidence `max_c p`, with the error `argmax_c p != y` against each of the K
        annotations; `oracle_*_pixel` the same for the exact marginals (their own confidence
        and argmax; for AUGRC, linear in the errors, the optimum in expectation);
        `aurc_image`, `e_aurc_image`, `augrc_image` rank the images by minus their mean
        predictive entropy, with the risk `1 - Dice` of the predictive argmax averaged over
        the K annotations. The pixel-level scores are exact, streamed as counts per distinct
        confidence value (`RiskCoverageSums`); the image-level ones keep two floats per image.
    """
    # >= 2: the sample diversity E[d(S,S')] (and so GED) needs a pair of distinct samples.
    num_samples = _checks.positive_int(
        num_samples,
        "num_samples",
        minimum=2,
        message="`{name}` must be {what} (the sample diversity E[d(S,S')], and so GED, needs "
        "a pair of distinct samples); got {value}.",
    )
    batch_size = _checks.positive_int(batch_size, "batch_size", optional=True)
    num_bins = _checks.positive_int(num_bins, "num_bins")
    seed = _seeds.check_seed(seed)
    num_classes, num_images = data.num_classes, len(data)
    k = data.num_annotations
    spatial = data.images.ndim - 2  # images [N, *S, channels]: 2 (H, W) or 3 (D, H, W)
    step = batch_size or num_images

    rng = np.random.default_rng(seed)
    per_image = {key: [] for key in ("ged", "cross", "sample_diversity", "reference_diversity")}
    per_image.update(oracle_ged=[], hm=[], oracle_hm=[], image_kappa=[], image_risk=[])
    sums = dict.fromkeys(("nll", "oracle_nll", "nll_joint", "brier"), 0.0)
    ece, ece_exact = CalibrationSums(num_bins), CalibrationSums(num_bins)
    pixel, oracle_pixel = RiskCoverageSums(), RiskCoverageSums()
    confusion = np.zeros((num_classes, num_classes), np.int64)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_images, desc="evaluate", unit="img")
    for index, start in enumerate(range(0, num_images, step)):
        part = data[start : start + step]
        logit_samples = draw_logits(model, part.images, num_samples, seed, batch_size, index)
        probs = softmax(logit_samples).mean(axis=0)
        label_samples = logit_samples.argmax(axis=-1).astype(np.int32)  # [N, b, *S]
        marginals, annotations = part.marginals(), part.annotations
        for j in range(len(part)):
            modes, weights = data.modes_of(start + j)
            s = label_samples[:, j]
            d_yy = metrics.pairwise_iou_distance(modes, modes, num_classes)
            terms = _ged_terms(s, modes, weights, num_classes, d_yy)
            for key in ("ged", "cross", "sample_diversity", "reference_diversity"):
                per_image[key].append(terms[key])
            oracle_samples = sample_annotations(modes, weights, num_samples, rng)
            oracle_terms = _ged_terms(oracle_samples, modes, weights, num_classes, d_yy)
            per_image["oracle_ged"].append(oracle_terms["ged"])
            per_image["hm"].append(
                metrics.hungarian_matched_iou(s, annotations[j], num_classes, spatial_dims=spatial)
            )
            per_image["oracle_hm"].append(
                metrics.hungarian_matched_iou(
                    oracle_samples, annotations[j], num_classes, spatial_dims=spatial
                )
            )
            if bar is not None:
                bar.update(1)

        num_pixels = marginals[..., 0].size
        sums["nll"] += metrics.negative_log_likelihood(probs, marginals) * num_pixels
        sums["oracle_nll"] += metrics.negative_log_likelihood(marginals, marginals) * num_pixels
        sums["brier"] += metrics.brier_score(probs, marginals) * num_pixels
        sums["nll_joint"] += _joint_nll_sum(logit_samples, annotations)
        pred = probs.argmax(-1)
        probs_k = np.repeat(probs[:, None], k, axis=1)
        ece.add(probs_k, annotations)
        ece_exact.add(probs, marginals)
        confusion += metrics.confusion_matrix(
            np.repeat(pred[:, None], k, axis=1), annotations, num_classes
        )
        for acc, p in ((pixel, probs), (oracle_pixel, marginals)):
            errors = np.sum(p.argmax(-1)[:, None] != annotations, axis=1)  # of K, per pixel
            acc.add(p.max(axis=-1), errors, count=k)
        kappa, risks = metrics.image_confidence_risks(probs, annotations)
        per_image["image_kappa"].append(kappa)
        per_image["image_risk"].append(risks)
        del logit_samples, probs, probs_k, label_samples
    if bar is not None:
        bar.close()

    total_pixels = num_images * int(np.prod(data.images.shape[1:-1]))
    report = {
        "num_images": num_images,
        "num_samples": int(num_samples),
        "ged": float(np.mean(per_image["ged"])),
        "ged_cross": float(np.mean(per_image["cross"])),
        "ged_sample_diversity": float(np.mean(per_image["sample_diversity"])),
        "ged_reference_diversity": float(np.mean(per_image["reference_diversity"])),
        "oracle_ged": float(np.mean(per_image["oracle_ged"])),
        "hm_iou": float(np.mean(per_image["hm"])),
        "oracle_hm_iou": float(np.mean(per_image["oracle_hm"])),
        "diversity": float(np.mean(per_image["sample_diversity"])),
        "oracle_diversity": float(np.mean(per_image["reference_diversity"])),
        "nll": sums["nll"] / total_pixels,
        "oracle_nll": sums["oracle_nll"] / total_pixels,
        "nll_joint": sums["nll_joint"] / (total_pixels * k),
        "ece": ece.ece(),
        "ece_exact": ece_exact.ece(),
        "brier": sums["brier"] / total_pixels,
        "miou": float(np.nanmean(metrics.per_class_iou(confusion))),
        "pixel_accuracy": float(np.trace(confusion) / confusion.sum()),
    }
    # Standard errors of the image means (over the split's images: their sampling and the
    # draws' Monte Carlo noise together); 0 for one image.
    for key, values in (
        ("ged", per_image["ged"]),
        ("oracle_ged", per_image["oracle_ged"]),
        ("hm_iou", per_image["hm"]),
        ("diversity", per_image["sample_diversity"]),
    ):
        report[f"{key}_se"] = _standard_error(values)
    for prefix, level, scores in (
        ("", "pixel", pixel.scores()),
        ("oracle_", "pixel", oracle_pixel.scores()),
        (
            "",
            "image",
            metrics.selective_scores(
                np.concatenate(per_image["image_kappa"]), np.concatenate(per_image["image_risk"])
            ),
        ),
    ):
        for key, value in scores.items():
            report[f"{prefix}{key}_{level}"] = value
    return report


def format_report(report: dict, keys: Optional[list] = None) -> str:
    """A two-column text table of a report (model value and oracle where there is one); by
    default the usual keys, then the region Dice scores `dice_<region>` it has."""
    keys = keys or [
        "ged",
        "ged_16",
        "ged_100",
        "hm_iou",
        "hm_iou_16",
        "hm_iou_100",
        "diversity",
        "reference_diversity",
        "nll",
        "nll_joint",
        "ece",
        "ece_exact",
        "brier",
        "miou",
        "dice",
        "pixel_accuracy",
        "aurc_pixel",
        "e_aurc_pixel",
        "augrc_pixel",
        "aurc_image",
        "e_aurc_image",
        "augrc_image",
    ] + sorted(key for key in report if key.startswith("dice_"))
    lines = [f"{'metric':<16}{'model':>10}{'oracle':>10}"]
    for key in keys:
        if key not in report:
            continue
        oracle = report.get(f"oracle_{key}")
        oracle_s = f"{oracle:>10.4f}" if oracle is not None else f"{'':>10}"
        lines.append(f"{key:<16}{report[key]:>10.4f}{oracle_s}")
    return "\n".join(lines)
