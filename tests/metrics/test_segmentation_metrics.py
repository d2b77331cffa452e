"""Tests for `tfp_seg.metrics.segmentation`: mIoU and pixel accuracy."""

import numpy as np
import pytest
import tensorflow as tf

from tfp_seg import metrics

# ================================================================================================
# mIoU and pixel accuracy
# ================================================================================================


def test_mean_iou_and_pixel_accuracy_hand_computed():
    pred = np.array([0, 1, 1, 2])
    labels = np.array([0, 1, 2, 2])
    # class 0: I=1, U=1 -> 1; class 1: pred {1,2}, label {1} -> 1/2;
    # class 2: pred {3}, label {2,3} -> 1/2; class 3 absent -> mIoU = 2/3
    miou, per_class = metrics.mean_iou(pred, labels, 4, return_per_class=True)
    assert miou == pytest.approx(2 / 3)
    np.testing.assert_allclose(per_class, [1.0, 0.5, 0.5, np.nan])
    assert metrics.pixel_accuracy(pred, labels) == pytest.approx(0.75)
    cm = metrics.confusion_matrix(pred, labels, 4)
    expected_cm = np.zeros((4, 4), int)
    expected_cm[0, 0] = expected_cm[1, 1] = expected_cm[2, 1] = expected_cm[2, 2] = 1
    np.testing.assert_array_equal(cm, expected_cm)
    # ignoring label 2 drops pixels 2 and 3: perfect on classes 0 and 1
    assert metrics.mean_iou(pred, labels, 4, ignore_label=2) == pytest.approx(1.0)
    assert metrics.pixel_accuracy(pred, labels, ignore_label=2) == pytest.approx(1.0)


def test_mean_iou_matches_loop_reference():
    rng = np.random.default_rng(13)
    pred = rng.integers(0, 5, size=(3, 8, 8))
    labels = rng.integers(0, 4, size=(3, 8, 8))  # class 4 only predicted
    labels[0, :2] = 255
    valid = labels != 255
    ious = []
    for c in range(5):
        p, y = (pred == c) & valid, (labels == c) & valid
        union = (p | y).sum()
        if union:
            ious.append((p & y).sum() / union)
    got = metrics.mean_iou(tf.constant(pred), labels, 5, ignore_label=255)
    assert got == pytest.approx(np.mean(ious))
    assert metrics.pixel_accuracy(pred, labels, ignore_label=255) == pytest.approx(
        np.mean(pred[valid] == labels[valid])
    )
