"""`evaluate_ambiguous` streams batch by batch and still gives the report of all samples at once;
the running sums of `tfp_seg.evaluation._stream` equal the NumPy metrics on concatenated data.

The reference is the pre-streaming implementation kept here as a loop: one
`model.sample_logits(data.images, N, seed, batch_size)` call for the whole split, then every
metric from the public `tfp_seg.metrics` functions on the full arrays. The streamed evaluation
calls the model once per batch with the Sampler's per-batch seeds, so the two see the same
samples and must agree: to float64 rounding (1e-9; sums are added in another order), and
`nll_joint`, whose TensorFlow Monte Carlo NLL is float32 and batch-shape dependent, to 1e-6.
"""

import numpy as np
import pytest

from tests.evaluation._samplers import NoiseSampler
from tfp_seg import metrics
from tfp_seg.data import ambiguous_shapes, sample_annotations
from tfp_seg.evaluation import _stream, evaluate_ambiguous, softmax
from tfp_seg.evaluation.ambiguous import _ged_terms
from tfp_seg.losses import mc_categorical_nll


def _reference_ambiguous(logit_samples, data, num_samples, seed, num_bins=10):
    """Every key of `evaluate_ambiguous` from all samples `[N, B, H, W, C]` at once."""
    num_classes, k = data.num_classes, data.num_annotations
    probs = softmax(logit_samples).mean(axis=0)
    label_samples = logit_samples.argmax(axis=-1)
    marginals, annotations = data.marginals(), data.annotations
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(len(data)):
        modes, weights = data.modes_of(i)
        terms = _ged_terms(label_samples[:, i], modes, weights, num_classes)
        oracle = sample_annotations(modes, weights, num_samples, rng)
        rows.append(
            {
                **terms,
                "oracle_ged": _ged_terms(oracle, modes, weights, num_classes)["ged"],
                "hm": metrics.hungarian_matched_iou(
                    label_samples[:, i], annotations[i], num_classes
                ),
                "oracle_hm": metrics.hungarian_matched_iou(oracle, annotations[i], num_classes),
            }
        )
    mean = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    joint = sum(
        float(mc_categorical_nll(annotations[:, j], logit_samples).numpy().sum()) for j in range(k)
    )
    pred_k = np.repeat(probs.argmax(-1)[:, None], k, axis=1)
    probs_k = np.repeat(probs[:, None], k, axis=1)
    report = {
        "num_images": len(data),
        "num_samples": num_samples,
        "ged": mean["ged"],
        "ged_cross": mean["cross"],
        "ged_sample_diversity": mean["sample_diversity"],
        "ged_reference_diversity": mean["reference_diversity"],
        "oracle_ged": mean["oracle_ged"],
        "hm_iou": mean["hm"],
        "oracle_hm_iou": mean["oracle_hm"],
        "diversity": mean["sample_diversity"],
        "oracle_diversity": mean["reference_diversity"],
        "nll": metrics.negative_log_likelihood(probs, marginals),
        "oracle_nll": metrics.negative_log_likelihood(marginals, marginals),
        "nll_joint": joint / (annotations.size),
        "ece": metrics.expected_calibration_error(probs_k, annotations, num_bins=num_bins),
        "ece_exact": metrics.expected_calibration_error_soft(probs, marginals, num_bins=num_bins),
        "brier": metrics.brier_score(probs, marginals),
        "miou": metrics.mean_iou(pred_k, annotations, num_classes),
        "pixel_accuracy": metrics.pixel_accuracy(pred_k, annotations),
    }
    for key, row_key in (
        ("ged", "ged"),
        ("oracle_ged", "oracle_ged"),
        ("hm_iou", "hm"),
        ("diversity", "sample_diversity"),
    ):
        values = np.array([r[row_key] for r in rows])
        report[f"{key}_se"] = float(np.sqrt(np.var(values, ddof=1) / len(values)))
    marginals_k = np.repeat(marginals[:, None], k, axis=1)
    for prefix, level, scores in (
        ("", "pixel", metrics.pixel_confidence_errors(probs_k, annotations)),
        ("oracle_", "pixel", metrics.pixel_confidence_errors(marginals_k, annotations)),
        ("", "image", metrics.image_confidence_risks(probs, annotations)),
    ):
        for key, value in metrics.selective_scores(*scores).items():
            report[f"{prefix}{key}_{level}"] = value
    return report


@pytest.fixture(scope="module")
def data():
    return ambiguous_shapes(num_images=7, image_size=16, num_annotations=3, max_objects=2, seed=3)


@pytest.mark.parametrize("batch_size", [1, 3, None])
def test_streamed_report_equals_all_samples_at_once(data, batch_size):
    model = NoiseSampler(data.num_classes)
    got = evaluate_ambiguous(model, data, num_samples=4, seed=9, batch_size=batch_size)
    logits = model.sample_logits(data.images, 4, seed=9, batch_size=batch_size)
    expected = _reference_ambiguous(logits, data, num_samples=4, seed=9)
    assert set(got) == set(expected)
    for key, value in expected.items():
        rel = 1e-6 if key == "nll_joint" else 1e-9
        assert got[key] == pytest.approx(value, rel=rel, abs=1e-9), key
    # The samples differ between batch sizes (a seed per batch), so the report does too.
    if batch_size == 1:
        other = evaluate_ambiguous(model, data, num_samples=4, seed=9, batch_size=3)
        assert other["ged"] != got["ged"]


def test_streamed_report_is_reproducible(data):
    model = NoiseSampler(data.num_classes)
    first = evaluate_ambiguous(model, data, num_samples=3, seed=[4, 2], batch_size=2)
    assert evaluate_ambiguous(model, data, num_samples=3, seed=[4, 2], batch_size=2) == first
    assert evaluate_ambiguous(model, data, num_samples=3, seed=5, batch_size=2) != first


def test_risk_coverage_sums_equal_selective_scores(rng, monkeypatch):
    # Few distinct confidences (many ties, across batches) and a merge after almost every batch.
    monkeypatch.setattr(_stream.RiskCoverageSums, "_BUFFER", 4)
    sums = _stream.RiskCoverageSums()
    conf, err = [], []
    for size in (5, 1, 17, 8, 30, 2):
        c = np.round(rng.uniform(0.3, 1.0, size=size), 1).astype(np.float32)
        if size == 2:  # a float64 batch after float32 ones: merged without rounding
            c = c.astype(np.float64) + 1e-9
        e = rng.integers(0, 4, size=size)  # errors among 3 items at each confidence
        sums.add(c, e, count=3)
        conf.append(np.repeat(c, 3))
        err.append(np.concatenate([(np.arange(3) < n).astype(float) for n in e]))
    expected = metrics.selective_scores(np.concatenate(conf), np.concatenate(err))
    got = sums.scores()
    for key in ("aurc", "e_aurc", "augrc"):
        assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    # All correct, all wrong: the optimal AURC is then the AURC itself.
    for value in (0, 1):
        only = _stream.RiskCoverageSums()
        only.add(np.array([0.5, 0.9, 0.9]), np.full(3, value))
        assert only.scores()["e_aurc"] == pytest.approx(0.0, abs=1e-15)


def test_calibration_sums_equal_ece(rng):
    probs = softmax(rng.normal(size=(40, 3)) * 2)
    labels = rng.integers(0, 3, size=40)
    soft = softmax(rng.normal(size=(40, 3)))
    hard, exact = _stream.CalibrationSums(7), _stream.CalibrationSums(7)
    for part in np.array_split(np.arange(40), 5):
        hard.add(probs[part], labels[part])
        exact.add(probs[part], soft[part])
    assert hard.ece() == pytest.approx(
        metrics.expected_calibration_error(probs, labels, num_bins=7), abs=1e-12
    )
    assert exact.ece() == pytest.approx(
        metrics.expected_calibration_error_soft(probs, soft, num_bins=7), abs=1e-12
    )


def test_a_model_returning_the_wrong_shape_is_an_error(data):
    class Wrong:
        def sample_logits(self, x, num_samples, seed=None, batch_size=None):
            return np.zeros((num_samples, 1) + x.shape[1:3] + (3,), np.float32)

    with pytest.raises(ValueError, match=r"`model.sample_logits` must return \[N, B, H, W, C\]"):
        evaluate_ambiguous(Wrong(), data, num_samples=2, batch_size=4)
