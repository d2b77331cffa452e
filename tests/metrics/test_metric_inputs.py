"""Input validation across `tfp_seg.metrics`: errors name the argument."""

import numpy as np
import pytest

from tfp_seg import metrics

# ================================================================================================
# Input validation
# ================================================================================================

C = 3  # classes
_S = np.zeros((2, 3, 3), int)
_P = np.full((4, 2), 0.5)
_Y = np.zeros(4, int)

BAD_INPUTS = [
    (metrics.generalized_energy_distance, (_S.astype(float), _S, 2), {}, "samples"),
    (metrics.generalized_energy_distance, (_S[0], _S, 2), {}, "samples"),
    (metrics.generalized_energy_distance, (_S, _S + 2, 2), {}, "references"),
    (metrics.generalized_energy_distance, (_S, _S[:, :2], 2), {}, "references"),
    (metrics.generalized_energy_distance, (_S[:0], _S, 2), {}, "samples"),
    (metrics.generalized_energy_distance, (_S, _S, 0), {}, "num_classes"),
    (
        metrics.generalized_energy_distance,
        (_S, _S, 2),
        {"reference_weights": [0.5, 0.6]},
        "reference_weights",
    ),
    (
        metrics.generalized_energy_distance,
        (_S, _S, 2),
        {"reference_weights": [1.5, -0.5]},
        "reference_weights",
    ),
    (
        metrics.generalized_energy_distance,
        (_S, _S, 2),
        {"reference_weights": [1.0]},
        "reference_weights",
    ),
    (
        metrics.generalized_energy_distance,
        (_S, _S, 2),
        {"sample_weights": [[0.5, 0.5]]},
        "sample_weights",
    ),
    (metrics.diversity, (_S[0, 0], 2), {}, "samples"),
    (metrics.hungarian_matched_iou, (_S, -_S - 1, 2), {}, "references"),
    (metrics.iou_distance, (_S[0], _S[0, :2], 2), {}, "`a` and `b`"),
    (metrics.pairwise_iou_distance, (_S[0, 0], _S, 2), {}, "`x`"),
    (metrics.expected_calibration_error, (np.full((4, 2), np.nan), _Y), {}, "probs"),
    (metrics.expected_calibration_error, (_P, _Y[:3]), {}, "labels"),
    (metrics.expected_calibration_error, (_P, _Y.astype(float)), {}, "labels"),
    (metrics.expected_calibration_error, (_P, _Y + 2), {}, "labels"),
    (metrics.expected_calibration_error, (_P, _Y), {"strategy": "equal"}, "strategy"),
    (metrics.expected_calibration_error, (_P, _Y), {"num_bins": 0}, "num_bins"),
    (metrics.expected_calibration_error, (_P, _Y + 7), {"ignore_label": 7}, "labels"),
    (metrics.expected_calibration_error, (_P, _P), {}, "labels"),
    (metrics.expected_calibration_error_soft, (_P, _P[:2]), {}, "target_probs"),
    (metrics.negative_log_likelihood, (_P * 3, _Y), {}, "probs"),
    (metrics.negative_log_likelihood, (_P, _Y), {"eps": 0.0}, "eps"),
    (metrics.brier_score, (_P, _P * 2), {}, "labels"),
    (metrics.brier_score, (_P, _P), {"ignore_label": 0}, "ignore_label"),
    (metrics.mean_iou, (_Y + 5, _Y, 3), {}, "pred"),
    (metrics.mean_iou, (_Y, _Y[:2], 3), {}, "labels"),
    (metrics.pixel_accuracy, (_Y.astype(float), _Y), {}, "pred"),
    (metrics.ood_scores, ([1.0, 2.0], [False, False]), {}, "is_ood"),
    (metrics.ood_scores, ([1.0, np.inf], [True, False]), {}, "uncertainty"),
    (metrics.ood_scores, ([1.0, 2.0], [True, False, True]), {}, "is_ood"),
    (metrics.StreamingECE, (C,), {"num_bins": 0}, "num_bins"),
]


@pytest.mark.parametrize(
    "fn,args,kwargs,name",
    BAD_INPUTS,
    ids=[f"{b[0].__name__}-{b[3]}-{i}" for i, b in enumerate(BAD_INPUTS)],
)
def test_bad_inputs_raise_value_error_naming_argument(fn, args, kwargs, name):
    with pytest.raises(ValueError, match=name):
        fn(*args, **kwargs)


def test_error_message_shows_received_shape_and_dtype():
    with pytest.raises(ValueError, match=r"shape \(2, 3\), dtype float64"):
        metrics.generalized_energy_distance(np.zeros((2, 3)), _S, 2)


def test_streaming_rejects_too_few_channels():
    m = metrics.StreamingMeanIoU(4)
    with pytest.raises(ValueError, match="y_pred"):
        m.update_state(np.zeros((1, 2, 2), int), np.zeros((1, 2, 2, 3), np.float32))
