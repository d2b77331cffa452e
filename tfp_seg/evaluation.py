"""Exact evaluation of a probabilistic segmenter on `tfp_seg.data.ambiguous_shapes`.

The benchmark's true label distribution is known (enumerated modes with weights), so the
reference side of every metric is exact; only the model is sampled. Each model metric is
reported next to its *oracle* value: the same metric for a sampler that draws from the true
distribution (for sampled metrics) or for the true marginals (for per-pixel metrics).

Any model with `sample_logits(x, num_samples, seed=None, batch_size=None) -> [N,B,H,W,C]`
(numpy) can be evaluated: `ProbabilisticSegmenter`, `ProbabilisticUNet`, `MCDropout`,
`DeepEnsemble`.

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

from tfp_seg import _checks, metrics
from tfp_seg.data import AmbiguousShapes, sample_annotations
from tfp_seg.losses import mc_categorical_nll

__all__ = ["evaluate_ambiguous", "softmax"]


def softmax(logits: np.ndarray, axis: int = -1) -> np.ndarray:
    z = logits - logits.max(axis=axis, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=axis, keepdims=True)


def _joint_nll_per_pixel(logit_samples: np.ndarray, annotations: np.ndarray) -> float:
    """Mean over images and annotations of `-log p(y | x) / (H*W)`, MC over the samples."""
    n, b, h, w, c = logit_samples.shape
    total = 0.0
    samples = tf.constant(logit_samples)
    for k in range(annotations.shape[1]):
        nll = mc_categorical_nll(annotations[:, k], samples, validate_args=False).numpy()
        total += float(nll.sum())
    return total / (b * annotations.shape[1] * h * w)


def _ged_terms(
    samples: np.ndarray, modes: np.ndarray, weights: np.ndarray, num_classes: int
) -> dict:
    """Unbiased `D_GED^2` terms of one image: `N >= 2` samples `[N,H,W]` vs the exact modes.

    ```none
    cross               = (1/N) sum_n sum_k w_k d(s_n, m_k)              unbiased for E[d(S,Y)]
    sample_diversity    = 1/(N(N-1)) sum_{n != n'} d(s_n, s_n')          U-statistic, E[d(S,S')]
    reference_diversity = w^T D w,  D_kl = d(m_k, m_l)                    exact E[d(Y,Y')]
    ged                 = 2 cross - sample_diversity - reference_diversity
    ```
    """
    n = samples.shape[0]
    w = np.asarray(weights, np.float64)
    w = w / w.sum()
    d_ss = metrics.pairwise_iou_distance(samples, samples, num_classes)
    d_sy = metrics.pairwise_iou_distance(samples, modes, num_classes)
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


def evaluate_ambiguous(
    model,
    data: AmbiguousShapes,
    num_samples: int = 16,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
    num_bins: int = 10,
) -> dict:
    """Evaluate `model` against the exact label distribution of `data`.

    Args:
      model: exposes `sample_logits(x, num_samples, seed=..., batch_size=...)`.
      data: an `AmbiguousShapes` split (held out from training).
      num_samples: N >= 2 samples per image for sampled metrics (GED, HM-IoU, diversity,
        MC NLL). They are taken to be independent draws (as `sample_logits` gives by
        default). `DeepEnsemble` draws sample n from member n mod M, a stratified design, so
        for it the pair statistics below are not exactly unbiased for the members' uniform
        mixture (e.g. with deterministic members and N = M, `diversity` is M / (M - 1) times
        the mixture's E[d(S, S')]).
      seed: sampling seed (model and oracle).
      progress: show a progress bar over images.

    Returns:
      A flat dict of floats. Model metrics and (`oracle_*`) the same metric for the true
      distribution:
      - `ged` (D_GED^2 vs the exact modes, references weighted by their probabilities) with
        `ged_cross`, `ged_sample_diversity`, `ged_reference_diversity`; `oracle_ged`, the same
        estimator for N samples of the true distribution. All are unbiased (see the module
        docstring): `ged_sample_diversity` is the U-statistic over pairs of distinct samples,
        so E[ged] is the exact D_GED^2 of the model's distribution, and E[oracle_ged] = 0; a
        finite-N value can therefore be slightly negative;
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
        exact marginals); `miou`, `pixel_accuracy` of the predictive argmax vs the annotations.
    """
    # >= 2: the sample diversity E[d(S,S')] (and so GED) needs a pair of distinct samples.
    num_samples = _checks.positive_int(
        num_samples,
        "num_samples",
        minimum=2,
        message="`{name}` must be {what} (the sample diversity E[d(S,S')], and so GED, needs "
        "a pair of distinct samples); got {value}.",
    )
    num_classes = data.num_classes
    logit_samples = model.sample_logits(
        data.images, num_samples, seed=seed, batch_size=batch_size
    ).astype(np.float32)
    if logit_samples.ndim != 5 or logit_samples.shape[1] != len(data):
        raise ValueError(
            f"`model.sample_logits` must return [N, B, H, W, C]; got {logit_samples.shape}."
        )
    prob_samples = softmax(logit_samples)
    probs = prob_samples.mean(axis=0)
    label_samples = logit_samples.argmax(axis=-1).astype(np.int32)  # [N,B,H,W]
    marginals = data.marginals()
    annotations = data.annotations  # [B,K,H,W]
    k = annotations.shape[1]

    rng = np.random.default_rng(seed)
    ged_terms = {"ged": [], "cross": [], "sample_diversity": [], "reference_diversity": []}
    oracle_ged, hm, oracle_hm = [], [], []
    iterator = range(len(data))
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(iterator, desc="evaluate", unit="img")
    for i in iterator:
        modes, weights = data.modes_of(i)
        s = label_samples[:, i]
        terms = _ged_terms(s, modes, weights, num_classes)
        for key in ged_terms:
            ged_terms[key].append(terms[key])
        oracle_samples = sample_annotations(modes, weights, num_samples, rng)
        oracle_ged.append(_ged_terms(oracle_samples, modes, weights, num_classes)["ged"])
        hm.append(metrics.hungarian_matched_iou(s, annotations[i], num_classes))
        oracle_hm.append(metrics.hungarian_matched_iou(oracle_samples, annotations[i], num_classes))

    pred = probs.argmax(-1)
    pred_k = np.repeat(pred[:, None], k, axis=1)
    probs_k = np.repeat(probs[:, None], k, axis=1)
    report = {
        "num_images": len(data),
        "num_samples": int(num_samples),
        "ged": float(np.mean(ged_terms["ged"])),
        "ged_cross": float(np.mean(ged_terms["cross"])),
        "ged_sample_diversity": float(np.mean(ged_terms["sample_diversity"])),
        "ged_reference_diversity": float(np.mean(ged_terms["reference_diversity"])),
        "oracle_ged": float(np.mean(oracle_ged)),
        "hm_iou": float(np.mean(hm)),
        "oracle_hm_iou": float(np.mean(oracle_hm)),
        "diversity": float(np.mean(ged_terms["sample_diversity"])),
        "oracle_diversity": float(np.mean(ged_terms["reference_diversity"])),
        "nll": metrics.negative_log_likelihood(probs, marginals),
        "oracle_nll": metrics.negative_log_likelihood(marginals, marginals),
        "nll_joint": _joint_nll_per_pixel(logit_samples, annotations),
        "ece": metrics.expected_calibration_error(probs_k, annotations, num_bins=num_bins),
        "ece_exact": metrics.expected_calibration_error_soft(probs, marginals, num_bins=num_bins),
        "brier": metrics.brier_score(probs, marginals),
        "miou": metrics.mean_iou(pred_k, annotations, num_classes),
        "pixel_accuracy": metrics.pixel_accuracy(pred_k, annotations),
    }
    return report


def format_report(report: dict, keys: Optional[list] = None) -> str:
    """A two-column text table of a report (model value and oracle where there is one)."""
    keys = keys or [
        "ged",
        "hm_iou",
        "diversity",
        "nll",
        "nll_joint",
        "ece",
        "ece_exact",
        "brier",
        "miou",
        "pixel_accuracy",
    ]
    lines = [f"{'metric':<16}{'model':>10}{'oracle':>10}"]
    for key in keys:
        if key not in report:
            continue
        oracle = report.get(f"oracle_{key}")
        oracle_s = f"{oracle:>10.4f}" if oracle is not None else f"{'':>10}"
        lines.append(f"{key:<16}{report[key]:>10.4f}{oracle_s}")
    return "\n".join(lines)
