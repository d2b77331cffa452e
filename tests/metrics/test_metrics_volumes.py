"""The metrics on volumes `S = (D, H, W)`: one code path with images.

Per-pixel and sum-over-pixels metrics (IoU, accuracy, ECE, NLL, Brier, pixel-level selective
scores, OOD scores, the IoU distance, GED, HM-IoU, diversity, the image-level risks) give on a
`[B, D, H, W]` volume exactly what they give on the `[B, D*H, W]` image; the set metrics read
`[N, D, H, W]` as one volume's samples with `spatial_dims=3` and are checked against the
loop references too; the streaming metrics score a 3D head's predictive probabilities.
"""

import numpy as np
import pytest
import tensorflow as tf

from tests.metrics._references import ref_ged, ref_iou_distance, softmax
from tfp_seg import layers, metrics

B, D, H, W, C = 2, 3, 4, 5, 3


def _probs_labels(rng):
    probs = softmax(2.0 * rng.normal(size=(B, D, H, W, C)))
    labels = rng.integers(0, C, size=(B, D, H, W))
    return probs, labels


def _as_image(x, lead=1):
    """`[*lead, D, H, W, ...]` -> `[*lead, D*H, W, ...]`."""
    shape = x.shape
    return x.reshape(shape[:lead] + (shape[lead] * shape[lead + 1],) + shape[lead + 2 :])


def test_pixel_metrics_of_a_volume_are_those_of_the_tall_image(rng):
    probs, labels = _probs_labels(rng)
    labels[0, 0, 0, :2] = 255
    img_p, img_y = _as_image(probs), _as_image(labels)
    pred = probs.argmax(-1)
    for fn in (
        lambda p, y: metrics.expected_calibration_error(p, y, 7, ignore_label=255),
        lambda p, y: metrics.expected_calibration_error(p, y, 5, "quantile", ignore_label=255),
        lambda p, y: metrics.negative_log_likelihood(p, y, ignore_label=255),
        lambda p, y: metrics.brier_score(p, y, ignore_label=255),
        lambda p, y: metrics.mean_iou(p.argmax(-1), y, C, ignore_label=255),
        lambda p, y: metrics.pixel_accuracy(p.argmax(-1), y, ignore_label=255),
        lambda p, y: metrics.selective_scores(*metrics.pixel_confidence_errors(p, y, 255)),
        lambda p, y: metrics.image_confidence_risks(p, y, ignore_label=255)[1].tolist(),
    ):
        assert fn(probs, labels) == pytest.approx(fn(img_p, img_y), rel=1e-12)
    soft = softmax(rng.normal(size=probs.shape))
    assert metrics.expected_calibration_error_soft(probs, soft) == pytest.approx(
        metrics.expected_calibration_error_soft(img_p, _as_image(soft)), rel=1e-12
    )
    np.testing.assert_array_equal(
        metrics.confusion_matrix(pred, labels, C, 255),
        metrics.confusion_matrix(_as_image(pred), img_y, C, 255),
    )
    u = rng.normal(size=(B, D, H, W))
    is_ood = rng.random((B, D, H, W)) < 0.3
    assert metrics.ood_scores(u, is_ood) == pytest.approx(
        metrics.ood_scores(_as_image(u), _as_image(is_ood)), rel=1e-12
    )


def test_image_confidence_risks_read_the_rank_from_probs(rng):
    """`labels [B, K, D, H, W]` (rank 5) is a label set, because `probs` is `[B, D, H, W, C]`;
    the default confidence is minus the mean entropy over all voxels of a volume."""
    probs, _ = _probs_labels(rng)
    sets = rng.integers(0, C, size=(B, 2, D, H, W))
    kappa, risks = metrics.image_confidence_risks(probs, sets)
    entropy = -np.sum(probs * np.log(probs), axis=-1)
    np.testing.assert_allclose(kappa, -entropy.reshape(B, -1).mean(1), rtol=1e-12)
    kappa_i, risks_i = metrics.image_confidence_risks(_as_image(probs), _as_image(sets, 2))
    np.testing.assert_allclose(risks, risks_i, rtol=1e-12)
    np.testing.assert_allclose(kappa, kappa_i, rtol=1e-12)
    with pytest.raises(ValueError, match=r"`labels` must have shape \[B, \*S\]"):
        metrics.image_confidence_risks(probs, sets[:, :, :2])


def test_set_metrics_take_spatial_dims(rng):
    """`[N, D, H, W]` samples of one volume with `spatial_dims=3` against the loop reference;
    a batch `[B, N, D, H, W]` averages the volumes; each equals the reshaped image."""
    samples = rng.integers(0, C, size=(B, 4, D, H, W))
    refs = rng.integers(0, C, size=(B, 3, D, H, W))
    for b in range(B):
        got = metrics.generalized_energy_distance(samples[b], refs[b], C, spatial_dims=3)
        assert got == pytest.approx(ref_ged(samples[b], refs[b], C), abs=1e-12)
    batch = metrics.generalized_energy_distance(samples, refs, C, spatial_dims=3)
    assert batch == pytest.approx(np.mean([ref_ged(samples[b], refs[b], C) for b in range(B)]))
    img_s, img_r = _as_image(samples, 2), _as_image(refs, 2)
    for fn, args in (
        (metrics.generalized_energy_distance, (samples, refs, C)),
        (metrics.hungarian_matched_iou, (samples, refs, C)),
        (metrics.diversity, (samples, C)),
    ):
        image_args = (img_s, img_r, C) if len(args) == 3 else (img_s, C)
        assert fn(*args, spatial_dims=3) == pytest.approx(fn(*image_args), abs=1e-12)
    d = metrics.pairwise_iou_distance(samples[0], refs[0], C)  # any spatial rank
    assert d[1, 2] == pytest.approx(ref_iou_distance(samples[0, 1], refs[0, 2], C))
    assert metrics.iou_distance(samples[0, 0], refs[0, 0], C) == pytest.approx(d[0, 0])


def test_set_metrics_with_mask_and_ignore_label_on_volumes(rng):
    samples = rng.integers(0, C, size=(B, 3, D, H, W))
    refs = rng.integers(0, C, size=(B, 2, D, H, W))
    refs[:, 0, 0, 0] = 255
    mask = rng.random((B, D, H, W)) < 0.8
    kwargs = dict(ignore_label=255, mask=mask)
    image_kwargs = dict(ignore_label=255, mask=_as_image(mask))
    img_s, img_r = _as_image(samples, 2), _as_image(refs, 2)
    volume = metrics.generalized_energy_distance(
        samples, refs, C, return_terms=True, spatial_dims=3, **kwargs
    )
    image = metrics.generalized_energy_distance(img_s, img_r, C, return_terms=True, **image_kwargs)
    assert volume == pytest.approx(image, abs=1e-12)
    assert metrics.diversity(samples, C, spatial_dims=3, **kwargs) == pytest.approx(
        metrics.diversity(img_s, C, **image_kwargs), abs=1e-12
    )


@pytest.mark.parametrize(
    "call, match",
    [
        # a batch of volumes read as images: the error says which spatial_dims fits
        (
            lambda s, r: metrics.generalized_energy_distance(s, r, C),
            r"`samples` must have rank 3 or 4 .*pass spatial_dims=3",
        ),
        (
            lambda s, r: metrics.generalized_energy_distance(s[0], r, C, spatial_dims=3),
            "both be single images",
        ),
        (
            lambda s, r: metrics.hungarian_matched_iou(s, r[..., :2], C, spatial_dims=3),
            r"same spatial shape \[D, H, W\]",
        ),
        (
            lambda s, r: metrics.hungarian_matched_iou(s, r[:1], C, spatial_dims=3),
            "same batch size",
        ),
        (
            lambda s, r: metrics.diversity(s[0, 0], C, spatial_dims=3),
            r"rank 4 or 5 \(\[N,D,H,W\] or \[B,N,D,H,W\]",
        ),
        (lambda s, r: metrics.diversity(s, C, spatial_dims=4), "`spatial_dims` must be 2"),
        (
            lambda s, r: metrics.generalized_energy_distance(
                s, r, C, spatial_dims=3, mask=np.ones((D, H), bool)
            ),
            "`mask` must be a boolean array",
        ),
    ],
)
def test_set_metric_errors_name_the_argument(call, match):
    samples = np.zeros((B, 2, D, H, W), int)
    refs = np.zeros((B, 2, D, H, W), int)
    with pytest.raises(ValueError, match=match):
        call(samples, refs)


def test_streaming_metrics_score_a_3d_heads_predictive_probabilities(rng):
    head = layers.LowRankLogits(C, rank=2, spatial_dims=3)
    params = rng.normal(size=(B, D, H, W, head.params_size)).astype(np.float32)
    labels = rng.integers(0, C, size=(B, D, H, W))
    probs = np.asarray(head.mean_probabilities(tf.constant(params), num_samples=8, seed=3))
    kwargs = dict(head=head, num_samples=8, seed=3)
    for metric, expected in (
        (
            metrics.StreamingECE(C, 6, **kwargs),
            metrics.expected_calibration_error(probs, labels, 6),
        ),
        (metrics.StreamingNLL(C, **kwargs), metrics.negative_log_likelihood(probs, labels)),
        (metrics.StreamingBrier(C, **kwargs), metrics.brier_score(probs, labels)),
        (metrics.StreamingMeanIoU(C, **kwargs), metrics.mean_iou(probs.argmax(-1), labels, C)),
    ):
        metric.update_state(labels, params)
        assert float(metric.result()) == pytest.approx(expected, rel=1e-4, abs=1e-6), metric.name
    form = rf"\[B, D, H, W, {head.params_size}\] \(spatial_dims=3\)"
    with pytest.raises(ValueError, match=form):  # a slice of the volume is not the head's input
        metrics.StreamingNLL(C, head=head).update_state(labels[:, 0], params[:, 0])


def test_streaming_metrics_without_a_head_pool_voxels(rng):
    probs, labels = _probs_labels(rng)
    metric = metrics.StreamingECE(C, num_bins=5)
    metric.update_state(labels, probs.astype(np.float32))
    image = metrics.StreamingECE(C, num_bins=5)
    image.update_state(_as_image(labels), _as_image(probs).astype(np.float32))
    assert float(metric.result()) == pytest.approx(float(image.result()), abs=1e-7)
    assert float(metric.result()) == pytest.approx(
        metrics.expected_calibration_error(probs.astype(np.float32), labels, 5), abs=1e-6
    )
