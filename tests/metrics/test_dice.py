"""`tfp_seg.metrics.dice`: Dice per region (BraTS by default) and per class, on images and
volumes, with the empty-region convention (both empty -> `empty`, 1.0 by default)."""

import math

import numpy as np
import pytest

from tfp_seg import metrics
from tfp_seg.metrics import BRATS_REGIONS, per_class_dice, region_dice


def _ref_dice(pred, true, ids, empty=1.0, valid=None):
    """Loop reference of one item's Dice over its flattened voxels."""
    a, t = np.isin(pred.ravel(), ids), np.isin(true.ravel(), ids)
    if valid is not None:
        a, t = a & valid.ravel(), t & valid.ravel()
    total = a.sum() + t.sum()
    return empty if total == 0 else 2.0 * (a & t).sum() / total


def test_known_answers_of_the_brats_regions():
    pred = np.array([[[0, 1, 2, 3]]])  # B = 1, S = (1, 4)
    true = np.array([[[0, 1, 1, 2]]])
    assert region_dice(pred, true) == pytest.approx(
        {"whole_tumour": 1.0, "tumour_core": 0.5, "enhancing": 0.0}
    )
    assert dict(BRATS_REGIONS) == {
        "whole_tumour": (1, 2, 3),
        "tumour_core": (1, 3),
        "enhancing": (3,),
    }
    # A region present in one map only has Dice 0; a perfect prediction 1.
    assert region_dice(true, true) == {"whole_tumour": 1.0, "tumour_core": 1.0, "enhancing": 1.0}


def test_known_answers_on_a_volume_batch():
    """Two 2x2x2 volumes, Dice per volume then the batch mean."""
    true = np.zeros((2, 2, 2, 2), int)
    pred = np.zeros((2, 2, 2, 2), int)
    true[0, 0] = [[1, 1], [3, 3]]  # volume 0: core {1, 3} 4 voxels, enhancing 2
    pred[0, 0] = [[1, 2], [3, 0]]  # core: 2 of them (1 and 3), enhancing: 1 voxel, right
    pred[0, 1, 0, 0] = 3  # a false enhancing voxel
    true[1, 1, 1] = [2, 2]  # volume 1: only oedema
    pred[1, 1, 1] = [2, 0]
    per_image = region_dice(pred, true, per_image=True)
    # volume 0: whole A={1,2,3: 4 voxels} T={4 voxels} inter 3 -> 6/8; core A=3 T=4 inter 2
    # -> 4/7; enhancing A=2 T=2 inter 1 -> 2/4. volume 1: whole 2*1/3; core, enhancing empty.
    np.testing.assert_allclose(per_image["whole_tumour"], [6 / 8, 2 / 3])
    np.testing.assert_allclose(per_image["tumour_core"], [4 / 7, 1.0])
    np.testing.assert_allclose(per_image["enhancing"], [0.5, 1.0])
    means = region_dice(pred, true)
    assert means["tumour_core"] == pytest.approx((4 / 7 + 1.0) / 2)
    # empty = nan leaves volume 1 out of the core and enhancing means.
    nan_means = region_dice(pred, true, empty=float("nan"))
    assert nan_means["tumour_core"] == pytest.approx(4 / 7)
    assert nan_means["enhancing"] == pytest.approx(0.5)
    assert nan_means["whole_tumour"] == pytest.approx(means["whole_tumour"])


def test_both_empty_everywhere():
    zeros = np.zeros((3, 2, 2, 2), int)
    assert region_dice(zeros, zeros) == {name: 1.0 for name in BRATS_REGIONS}
    out = region_dice(zeros, zeros, empty=float("nan"))
    assert all(math.isnan(v) for v in out.values())
    assert region_dice(zeros, zeros, empty=0.0)["enhancing"] == 0.0


def test_matches_the_loop_reference_and_the_reshaped_image(rng):
    """Random [2, 3, 4, 5] volumes: each volume's Dice is the loop reference; the volume
    and its [2, 3*4, 5] image give the same numbers (Dice pools the voxels of an item)."""
    pred = rng.integers(0, 4, size=(2, 3, 4, 5))
    true = rng.integers(0, 4, size=(2, 3, 4, 5))
    true[0, 0, 0, :2] = 255
    regions = {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,), "two": (2,)}
    out = region_dice(pred, true, regions, ignore_label=255, per_image=True)
    valid = true != 255
    for name, ids in regions.items():
        ref = [_ref_dice(pred[b], true[b], ids, valid=valid[b]) for b in range(2)]
        np.testing.assert_allclose(out[name], ref, rtol=1e-12)
    image = region_dice(pred.reshape(2, 12, 5), true.reshape(2, 12, 5), regions, 255)
    volume = region_dice(pred, true, regions, 255)
    assert image == pytest.approx(volume, rel=1e-12)


def test_per_class_dice_is_the_single_class_regions(rng):
    pred = rng.integers(0, 3, size=(2, 3, 4, 5))
    true = rng.integers(0, 3, size=(2, 3, 4, 5))
    true[1] = np.where(true[1] == 2, 0, true[1])
    pred[1] = np.where(pred[1] == 2, 0, pred[1])  # class 2 absent from volume 1: empty
    per_class = per_class_dice(pred, true, 3)
    regions = region_dice(pred, true, {c: (c,) for c in range(3)})
    np.testing.assert_allclose(per_class, [regions[str(c)] for c in range(3)], rtol=1e-12)
    table = per_class_dice(pred, true, 3, per_image=True)
    assert table.shape == (2, 3) and table[1, 2] == 1.0
    with_nan = per_class_dice(pred, true, 3, empty=float("nan"))
    assert with_nan[2] == pytest.approx(table[0, 2])


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda p, t: region_dice(p, t[:1]), "`labels_true` must have the shape of labels_pred"),
        (lambda p, t: region_dice(p[0, 0, 0], t[0, 0, 0]), "`labels_pred` must have rank >= 2"),
        (lambda p, t: region_dice(p.astype(float), t), "`labels_pred` must hold integer"),
        (lambda p, t: region_dice(p, t, {"wt": ()}), r"`regions\['wt'\]` must be a non-empty"),
        (lambda p, t: region_dice(p, t, {"wt": (1.5,)}), r"`regions\['wt'\]`"),
        (lambda p, t: region_dice(p, t, {}), "`regions` must be a non-empty"),
        (lambda p, t: region_dice(p, t, [1, 2]), "`regions` must be a non-empty"),
        (lambda p, t: region_dice(p, t, num_classes=3), r"< num_classes=3"),
        (lambda p, t: region_dice(p, t + 5, num_classes=4), "`labels_true` must hold labels"),
        (lambda p, t: region_dice(p, t, empty=2.0), "`empty`"),
        (lambda p, t: region_dice(p, t, empty=True), "`empty`"),
        (lambda p, t: region_dice(p, t, ignore_label=1.5), "`ignore_label`"),
        (lambda p, t: per_class_dice(p, t, 0), "`num_classes`"),
    ],
)
def test_bad_inputs_name_the_argument(call, match):
    pred = np.zeros((2, 3, 4, 5), int)
    with pytest.raises(ValueError, match=match):
        call(pred, pred.copy())


def test_public_names():
    assert metrics.region_dice is region_dice
    assert metrics.per_class_dice is per_class_dice
    assert metrics.BRATS_REGIONS is BRATS_REGIONS
