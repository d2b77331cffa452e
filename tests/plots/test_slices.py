"""`tfp_seg.plots.volume_slice` / `informative_slice`: 2D views of volumes for the figures."""

import numpy as np
import pytest

from tfp_seg import plots


def test_volume_slice_takes_one_slice_of_every_leading_and_trailing_axis(rng):
    probs = rng.random((5, 4, 6, 7, 3))  # [N, D, H, W, C]
    np.testing.assert_array_equal(plots.volume_slice(probs, 2, leading=1), probs[:, 2])
    np.testing.assert_array_equal(plots.volume_slice(probs, -1, axis=1, leading=1), probs[:, :, 5])
    image = rng.random((4, 6, 7, 1))  # [D, H, W, ch]
    assert plots.volume_slice(image, 0).shape == (6, 7, 1)
    assert plots.volume_slice(image, 3, axis=2).shape == (4, 6, 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"index": 4}, "out of range for an axis of 4 slices"),
        ({"index": 1.0}, "`index` must be an int"),
        ({"index": 0, "axis": 3}, "`axis` must be 0 (D), 1 (H) or 2 (W)"),
        ({"index": 0, "leading": 2}, "2 leading axes and then the volume's"),
    ],
)
def test_volume_slice_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        plots.volume_slice(np.zeros((4, 5, 6)), **kwargs)


def test_informative_slice_has_the_most_foreground_ties_nearest_the_middle():
    labels = np.zeros((2, 9, 4, 4), np.int32)  # [K, D, H, W]
    labels[0, 1, :2] = 1  # 8 foreground voxels in slice 1
    labels[1, 6, :1] = 2  # 4 in slice 6 of the other rater
    labels[0, 6, 3, :] = 1  # and 4 more: slice 6 has 8 too, nearer the middle 4
    assert plots.informative_slice(labels) == 6
    labels[1, 1, 3, 0] = 1  # one more in slice 1
    assert plots.informative_slice(labels) == 1
    assert plots.informative_slice(np.zeros((9, 4, 4)), leading=0) == 4  # no foreground
    # along H: rows 0, 1 and 3 have 4 each; 1 and 3 are nearest the middle 2, 1 first
    assert plots.informative_slice(labels[0], axis=1, leading=0) == 1
    with pytest.raises(ValueError, match=r"\[\*L, D, H, W\] with 1 leading axes"):
        plots.informative_slice(np.zeros((2, 9, 4, 4, 1)))
