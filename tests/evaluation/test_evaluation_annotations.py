"""`tfp_seg.evaluation.evaluate_annotations`: every key against a brute-force loop reference,
streaming (a `tf.data.Dataset` or any iterable of batches equals the arrays in memory), the seed
semantics (the Sampler's per-batch seeds), the V-statistic's known bias for a sampler of the
raters' own distribution, and one clear error per bad input.

The reference takes all logit samples of the set at once (`model.sample_logits(images, N,
seed, batch_size)`: the samples the streamed evaluation sees, batch by batch) and computes every
metric image by image with plain loops: IoU distances from `tests/metrics/_references.py`
(per pair), HM-IoU by brute force over all matchings, the ECE by its bin loop, Dice and the
confusion counts pixel by pixel, NLL and Brier from their formulas.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from tests.evaluation._samplers import (
    NoiseSampler,
    PerImageSampler,
    RaterSampler,
    blob_annotations,
    rater_images,
)
from tests.metrics._references import ref_ece, ref_hungarian, ref_iou_distance
from tfp_seg import metrics
from tfp_seg.data import AnnotatedImages
from tfp_seg.evaluation import evaluate_annotations

C = 3
IGNORE = 255
SIZE = 10


def _softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _mean_distance(x, y, num_classes):
    return float(np.mean([[ref_iou_distance(a, b, num_classes) for b in y] for a in x]))


def _dice(a, b, num_classes):
    scores = []
    for c in range(1, num_classes):
        total = np.sum(a == c) + np.sum(b == c)
        if total:
            scores.append(2.0 * np.sum((a == c) & (b == c)) / total)
    return float(np.mean(scores)) if scores else 1.0


def reference_report(logits, annotations, num_samples, sample_counts, ignore_label=None):
    """Every key of `evaluate_annotations` from all logits `[N, B, H, W, C]`, by loops."""
    num_images, k = annotations.shape[:2]
    C = logits.shape[-1]  # noqa: N806
    # The mean prediction in float32, as the evaluation computes it; everything after in float64.
    probs = _softmax(logits[:num_samples]).mean(axis=0).astype(np.float64)
    sizes = sorted({num_samples, *sample_counts})
    rows = []
    conf, acc, nll, brier, dice, kappa = [], [], [], [], [], []
    pixel_conf, pixel_err = [], []
    confusion = np.zeros((C, C))
    for i in range(num_images):
        valid = np.ones(annotations.shape[2:], bool)
        if ignore_label is not None:
            valid = np.all(annotations[i] != ignore_label, axis=0)
        samples = logits[:, i].argmax(-1)[:, valid]  # [N, P]
        raters = annotations[i][:, valid]  # [K, P]
        row = {}
        for n in sizes:
            assert math.lcm(n, k) <= 6  # brute-force matching: lcm(n, K)! permutations
            cross = _mean_distance(samples[:n], raters, C)
            sample_div = _mean_distance(samples[:n], samples[:n], C)
            rater_div = _mean_distance(raters, raters, C)
            row[n] = (2 * cross - sample_div - rater_div, cross, sample_div, rater_div)
            row[f"hm{n}"] = ref_hungarian(samples[:n], raters, C)
        rows.append(row)
        p = probs[i][valid]  # [P, C]
        pred = p.argmax(-1)
        image_dice = []
        for r in raters:
            image_dice.append(_dice(pred, r, C))
            for t, q in zip(r, pred, strict=True):
                confusion[t, q] += 1
        dice.append(np.mean(image_dice))
        plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
        kappa.append(np.mean(np.sum(plogp, axis=-1)))  # minus the mean entropy
        for j in range(p.shape[0]):
            q = np.array([np.mean(raters[:, j] == c) for c in range(C)])
            nll.append(-sum(q[c] * np.log(max(p[j, c], 1e-12)) for c in range(C)))
            brier.append(np.sum((p[j] - q) ** 2))
            conf.append(p[j].max())
            acc.append(q[pred[j]])
            for r in raters[:, j]:
                pixel_conf.append(p[j].max())
                pixel_err.append(float(pred[j] != r))
    iou = [
        confusion[c, c] / (confusion[c].sum() + confusion[:, c].sum() - confusion[c, c])
        for c in range(C)
        if confusion[c].sum() + confusion[:, c].sum() > 0
    ]
    report = {
        "num_images": num_images,
        "num_samples": num_samples,
        "num_annotations": k,
        "nll": np.mean(nll),
        "ece": ref_ece(np.array(conf), np.array(acc), np.linspace(0, 1, 11)),
        "brier": np.mean(brier),
        "miou": np.mean(iou),
        "dice": np.mean(dice),
        "pixel_accuracy": np.trace(confusion) / confusion.sum(),
    }
    terms = np.array([row[num_samples] for row in rows]).mean(axis=0)
    report.update(
        ged=terms[0],
        ged_cross=terms[1],
        ged_sample_diversity=terms[2],
        ged_reference_diversity=terms[3],
        diversity=terms[2],
        reference_diversity=terms[3],
        hm_iou=np.mean([row[f"hm{num_samples}"] for row in rows]),
    )
    for n in sample_counts:
        report[f"ged_{n}"] = np.mean([row[n][0] for row in rows])
        report[f"hm_iou_{n}"] = np.mean([row[f"hm{n}"] for row in rows])
    for key, value in metrics.selective_scores(np.array(pixel_conf), np.array(pixel_err)).items():
        report[f"{key}_pixel"] = value
    for key, value in metrics.selective_scores(np.array(kappa), 1 - np.array(dice)).items():
        report[f"{key}_image"] = value
    return report


def _assert_reports_equal(got, expected, atol=1e-9):
    assert set(got) == set(expected), set(got) ^ set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=atol), key


@pytest.fixture(scope="module")
def raters():
    rng = np.random.default_rng(21)
    annotations = blob_annotations(rng, num_images=7, num_raters=3, size=SIZE, num_classes=C)
    images = rng.uniform(size=(7, SIZE, SIZE, 1)).astype(np.float32)
    return images, annotations


@pytest.mark.parametrize("batch_size", [1, 3])
def test_every_key_equals_the_brute_force_reference(raters, batch_size):
    images, annotations = raters
    model = NoiseSampler(C)
    got = evaluate_annotations(
        model, images, annotations, num_samples=3, seed=5, batch_size=batch_size,
        sample_counts=(2, 6),
    )  # fmt: skip
    logits = model.sample_logits(images, 6, seed=5, batch_size=batch_size)
    expected = reference_report(logits, annotations, num_samples=3, sample_counts=(2, 6))
    _assert_reports_equal(got, expected)
    assert got["ged_sample_diversity"] > 0.05 and got["reference_diversity"] > 0.05  # not trivial


def test_ignore_label_equals_the_brute_force_reference(raters):
    images, annotations = raters
    annotations = annotations.copy()
    annotations[:, 1, :2] = IGNORE  # rater 1 left the top rows unlabelled
    annotations[2, :, :, -3:] = IGNORE  # every rater left a border of image 2
    model = NoiseSampler(C)
    got = evaluate_annotations(
        model, images, annotations, num_samples=3, seed=2, batch_size=4, sample_counts=(6,),
        ignore_label=IGNORE,
    )  # fmt: skip
    logits = model.sample_logits(images, 6, seed=2, batch_size=4)
    expected = reference_report(logits, annotations, 3, (6,), ignore_label=IGNORE)
    _assert_reports_equal(got, expected)
    # The ignored pixels change the result (the metric did not just skip nothing).
    filled = np.where(annotations == IGNORE, 0, annotations)
    plain = evaluate_annotations(
        model, images, filled, num_samples=3, seed=2, batch_size=4, sample_counts=(6,)
    )
    assert plain["ged"] != pytest.approx(got["ged"], abs=1e-6)


def test_an_ssn_segmenter_equals_the_reference():
    """A real (untrained) `ProbabilisticSegmenter` with an SSN head, through the Sampler base."""
    import keras

    from tfp_seg import layers, models

    rng = np.random.default_rng(3)
    annotations = blob_annotations(rng, num_images=3, num_raters=2, size=8, num_classes=2)
    images = rng.uniform(size=(3, 8, 8, 1)).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = models.ProbabilisticSegmenter(
        models.UNet(base_filters=4, depth=1), layers.LowRankLogits(2, rank=2)
    )
    model.build((None, 8, 8, 1))
    got = evaluate_annotations(
        model, images, annotations, num_samples=2, seed=1, batch_size=2, sample_counts=(4,)
    )
    logits = model.sample_logits(images, 4, seed=1, batch_size=2)
    _assert_reports_equal(got, reference_report(logits, annotations, 2, (4,)), atol=1e-9)


def test_a_stream_equals_the_arrays_in_memory(raters):
    images, annotations = raters
    model = NoiseSampler(C)
    kwargs = dict(num_samples=3, seed=8, batch_size=3, sample_counts=(4,))
    in_memory = evaluate_annotations(model, images, annotations, **kwargs)
    dataset = tf.data.Dataset.from_tensor_slices((images, annotations.astype(np.uint8))).batch(2)
    assert evaluate_annotations(model, dataset, **kwargs) == in_memory
    uneven = [(images[a:b], annotations[a:b]) for a, b in ((0, 1), (1, 5), (5, 5), (5, 7))]
    assert evaluate_annotations(model, iter(uneven), **kwargs) == in_memory
    data = AnnotatedImages(
        images, annotations.astype(np.uint8), ids=tuple(range(7)), num_classes=C,
        class_names=("background", "a", "b"),
    )  # fmt: skip
    assert evaluate_annotations(model, data, **kwargs) == in_memory  # num_classes from data
    assert evaluate_annotations(model, tf.constant(images), annotations, **kwargs) == in_memory


def test_batch_size_does_not_change_a_seed_free_model(raters):
    images, annotations = raters
    ids = np.broadcast_to(np.arange(7.0)[:, None, None, None], images.shape)
    tagged = np.concatenate([images, ids], axis=-1).astype(np.float32)
    model = PerImageSampler(C)
    reports = [
        evaluate_annotations(model, tagged, annotations, num_samples=4, batch_size=b, seed=0)
        for b in (1, 3, None)
    ]
    for other in reports[1:]:
        _assert_reports_equal(other, reports[0], atol=1e-12)


def test_seeds_reproduce_and_differ(raters):
    images, annotations = raters
    model = NoiseSampler(C)
    first = evaluate_annotations(model, images, annotations, num_samples=2, seed=[3, 4])
    assert evaluate_annotations(model, images, annotations, num_samples=2, seed=[3, 4]) == first
    assert evaluate_annotations(model, images, annotations, num_samples=2, seed=3) != first


def test_a_sampler_of_the_raters_has_the_v_statistic_bias():
    """Samples drawn uniformly from the K raters: with `R` the V-statistic rater diversity,
    `E[ged_n] = 2 R - (n - 1) / n R - R = R / n` and `E[sample diversity] = (n - 1) / n R`.
    The per-image estimates are independent across images; each mean is compared with its
    closed form within Z = 4 standard errors (estimated from the per-image deviations), which
    a correct estimator fails with probability ~6e-5 (normal approximation)."""
    rng = np.random.default_rng(0)
    annotations = blob_annotations(rng, num_images=150, num_raters=4, size=8, num_classes=2)
    images = rater_images(annotations)
    model = RaterSampler(2)
    report = evaluate_annotations(
        model, images, annotations, num_samples=2, seed=4, batch_size=50, sample_counts=(2, 8)
    )
    labels = model.sample_logits(images, 8, seed=4, batch_size=50).argmax(-1)
    per_image = {n: [] for n in (2, 8)}
    for i in range(len(images)):
        for n in (2, 8):
            per_image[n].append(
                metrics.generalized_energy_distance(
                    labels[:n, i], annotations[i], 2, return_terms=True
                )
            )
    rater_div = np.array([t["reference_diversity"] for t in per_image[2]])
    assert rater_div.mean() > 0.1
    for n in (2, 8):
        ged = np.array([t["ged"] for t in per_image[n]])
        assert report[f"ged_{n}"] == pytest.approx(ged.mean(), abs=1e-12)
        se = np.sqrt(np.sum((ged - rater_div / n) ** 2)) / ged.size
        assert abs(report[f"ged_{n}"] - rater_div.mean() / n) <= 4 * se, (n, se)
    div = np.array([t["sample_diversity"] for t in per_image[2]])
    se = np.sqrt(np.sum((div - rater_div / 2) ** 2)) / div.size
    assert abs(report["diversity"] - rater_div.mean() / 2) <= 4 * se
    assert report["reference_diversity"] == pytest.approx(rater_div.mean(), abs=1e-12)
    # The bias is visible: 8 samples sit closer to 0 than 2 do.
    assert report["ged_8"] < report["ged_2"]


# ================================================================================================
# Bad inputs: one clear error each
# ================================================================================================


class _Returns:
    def __init__(self, fn):
        self.fn = fn

    def sample_logits(self, x, num_samples, seed=None, batch_size=None):
        return self.fn(np.asarray(x), num_samples)


def _zeros(c=C, drop=0):
    return _Returns(lambda x, n: np.zeros((n, x.shape[0] - drop) + x.shape[1:3] + (c,)))


def _bad_cases(images, annotations):
    model = NoiseSampler(C)
    ok = dict(num_samples=2, sample_counts=(2,))
    ann = annotations
    fully_ignored = ann.copy()
    fully_ignored[1, 0] = IGNORE
    nan = _Returns(lambda x, n: np.full((n,) + x.shape[:3] + (C,), np.nan))
    return {
        "images rank": ((model, images[0], ann), ok, r"`images` must have rank 4"),
        "annotations rank": ((model, images, ann[:, 0]), ok, r"`annotations` must have rank 4"),
        "batch sizes": ((model, images, ann[:3]), ok, r"`annotations` must be \[B, K, H, W\]"),
        "spatial": ((model, images, ann[..., :4]), ok, r"`annotations` must be \[B, K, H, W\]"),
        "float labels": ((model, images, ann.astype(float)), ok, "integer class labels"),
        "out of range": ((model, images, ann + C), ok, r"labels in \[0, 3\)"),
        "ignore in range": ((model, images, ann), dict(ok, ignore_label=2), "ignore_label"),
        "ignore not int": ((model, images, ann), dict(ok, ignore_label=2.5), "ignore_label"),
        "all ignored": (
            (model, images, fully_ignored),
            dict(ok, ignore_label=IGNORE),
            "image 1 has no valid pixels",
        ),
        "no images": ((model, images[:0], ann[:0]), ok, "holds no images"),
        "empty stream": ((model, []), ok, "holds no images"),
        "no raters": ((model, images, ann[:, :0]), ok, "at least one annotation"),
        "one sample": ((model, images, ann), dict(ok, num_samples=1), "num_samples"),
        "float samples": ((model, images, ann), dict(ok, num_samples=2.5), "num_samples"),
        "bool samples": ((model, images, ann), dict(ok, num_samples=True), "num_samples"),
        "count of one": ((model, images, ann), dict(ok, sample_counts=(1, 16)), "sample_counts"),
        "count string": ((model, images, ann), dict(ok, sample_counts="16"), "sample_counts"),
        "count float": ((model, images, ann), dict(ok, sample_counts=(16.0,)), "sample_counts"),
        "batch size": ((model, images, ann), dict(ok, batch_size=0), "batch_size"),
        "seed": ((model, images, ann), dict(ok, seed="x"), "seed"),
        "num_classes": ((model, images, ann), dict(ok, num_classes=0), "num_classes"),
        "no annotations": ((model, images), ok, "`annotations` is required"),
        "dataset and annotations": (
            (model, tf.data.Dataset.from_tensor_slices(images).batch(2), ann),
            ok,
            "tf.data.Dataset with annotations",
        ),
        "not pairs": ((model, [images]), ok, "element 0 is a ndarray, not such a pair"),
        "raters change": (
            (model, [(images[:2], ann[:2]), (images[2:], ann[2:, :1])]),
            ok,
            "same K, H, W",
        ),
        "no sampler": ((object(), images, ann), ok, "`model` must have a method sample_logits"),
        "wrong shape": ((_zeros(drop=1), images, ann), ok, r"must return \[N, B, H, W, C\]"),
        "wrong classes": (
            (_zeros(c=4), images, ann),
            dict(ok, num_classes=C),
            "num_classes=3 classes",
        ),
        "nan logits": ((nan, images, ann), ok, "NaN or Inf"),
    }


_CASES = list(_bad_cases(np.zeros((4, SIZE, SIZE, 1)), np.zeros((4, 2, SIZE, SIZE), int)))


@pytest.mark.parametrize("case", _CASES)
def test_bad_inputs_get_one_clear_error(raters, case):
    images, annotations = raters
    args, kwargs, match = _bad_cases(images[:4], annotations[:4, :2])[case]
    with pytest.raises(ValueError, match=match):
        evaluate_annotations(*args, **kwargs)


def test_defaults_follow_the_literature(raters):
    """GED and HM-IoU at 16 and 100 samples by default, from one draw of 100."""
    images, annotations = raters
    calls = []

    class Counting(NoiseSampler):
        def sample_logits(self, x, num_samples=None, seed=None, batch_size=32, antithetic=False):
            calls.append(num_samples)
            return super().sample_logits(x, num_samples, seed=seed, batch_size=batch_size)

    report = evaluate_annotations(Counting(C), images[:2], annotations[:2])
    assert calls == [100]  # one batch, one draw of max(16, 100) samples
    for key in ("ged_16", "ged_100", "hm_iou_16", "hm_iou_100"):
        assert math.isfinite(report[key])
    assert report["ged_16"] == report["ged"] and report["num_samples"] == 16
