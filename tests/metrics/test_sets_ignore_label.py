"""`ignore_label` and `mask` in the set metrics (`tfp_seg.metrics.sets`).

Convention under test: ONE set of valid pixels per image, shared by every pair of maps,

```none
valid(p) = mask(p) and no map of the image (sample or reference) has label ignore_label at p
```

and every distance is the plain IoU distance of the maps restricted to the valid pixels. The
references below restrict with boolean indexing and then call the deliberately unvectorised
loops of `tests/metrics/_references.py`.
"""

import numpy as np
import pytest

from tests.metrics._references import (
    ref_ged,
    ref_hungarian,
    ref_iou_distance,
    ref_weighted_mean_distance,
)
from tfp_seg import metrics

IGNORE = 255
C = 3


def _sets(rng, batch=2, n=3, k=2, shape=(6, 7), ignore_fraction=0.2):
    """Samples `[B,N,H,W]` in [0, C) and references `[B,K,H,W]` with IGNORE at random pixels."""
    samples = rng.integers(0, C, size=(batch, n) + shape)
    references = rng.integers(0, C, size=(batch, k) + shape)
    references[rng.random(references.shape) < ignore_fraction] = IGNORE
    samples[0, 0] = 0  # an all-background sample
    return samples, references


def _valid(*sets):
    """[B, H, W]: no map of the image (in any set `[B, n, H, W]`) is IGNORE."""
    return np.all(np.concatenate(sets, axis=1) != IGNORE, axis=1)


def test_iou_distance_hand_computed():
    # Pixel 1 is unlabelled in b: a = [1, 0], b = [1, 0] on the valid pixels -> d = 0.
    a, b = np.array([[1, 1, 0]]), np.array([[1, IGNORE, 0]])
    assert metrics.iou_distance(a, b, 2, ignore_label=IGNORE) == 0.0
    # The same pixel labelled background instead: class 1 has I = 1, U = 2 -> d = 1/2.
    assert metrics.iou_distance(a, np.array([[1, 0, 0]]), 2) == pytest.approx(0.5)
    # A mask does the same as the ignored pixel, whatever b holds there.
    mask = np.array([[True, False, True]])
    assert metrics.iou_distance(a, np.array([[1, 0, 0]]), 2, mask=mask) == 0.0
    # Only background left on the valid pixels -> d = 0 by the empty-mask convention.
    assert metrics.iou_distance(np.array([[0, 1]]), np.array([[0, IGNORE]]), 2, IGNORE) == 0.0


def test_pairwise_and_iou_distance_match_loops(rng):
    samples, references = _sets(rng)
    x, y = samples[0], references[0]
    valid = _valid(samples[:1], references[:1])[0]
    expected = np.array([[ref_iou_distance(a[valid], b[valid], C) for b in y] for a in x])
    got = metrics.pairwise_iou_distance(x, y, C, ignore_label=IGNORE)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    # One valid region for all pairs: a single pair alone sees fewer ignored pixels.
    valid_01 = (x[0] != IGNORE) & (y[1] != IGNORE)
    assert metrics.iou_distance(x[0], y[1], C, ignore_label=IGNORE) == pytest.approx(
        ref_iou_distance(x[0][valid_01], y[1][valid_01], C), abs=1e-12
    )
    # The same matrix from an explicit mask, whatever the references hold at masked pixels.
    filled = np.where(y == IGNORE, rng.integers(0, C, size=y.shape), y)
    np.testing.assert_allclose(
        metrics.pairwise_iou_distance(x, filled, C, mask=valid), expected, atol=1e-12
    )


def test_ged_matches_loop_reference(rng):
    samples, references = _sets(rng, batch=3, n=4, k=3)
    valid = _valid(samples, references)
    terms = metrics.generalized_energy_distance(
        samples, references, C, return_terms=True, ignore_label=IGNORE
    )
    per_image = [ref_ged(samples[i][:, valid[i]], references[i][:, valid[i]], C) for i in range(3)]
    assert terms["ged"] == pytest.approx(np.mean(per_image), abs=1e-12)
    ref_div = [
        ref_weighted_mean_distance(r[:, v], r[:, v], np.full(3, 1 / 3), np.full(3, 1 / 3), C)
        for r, v in zip(references, valid, strict=True)
    ]
    assert terms["reference_diversity"] == pytest.approx(np.mean(ref_div), abs=1e-12)
    # Weighted references and an extra mask combine with the ignored pixels.
    weights = np.array([0.5, 0.3, 0.2])
    mask = rng.random(valid.shape) < 0.7
    both = valid & mask
    got = metrics.generalized_energy_distance(
        samples, references, C, reference_weights=weights, ignore_label=IGNORE, mask=mask
    )
    expected = np.mean(
        [
            ref_ged(samples[i][:, both[i]], references[i][:, both[i]], C, wr=weights)
            for i in range(3)
        ]
    )
    assert got == pytest.approx(expected, abs=1e-12)


def test_ged_does_not_read_ignored_pixels(rng):
    samples, references = _sets(rng)
    ged = metrics.generalized_energy_distance(samples, references, C, ignore_label=IGNORE)
    # Whatever the samples say where a reference is unlabelled does not change the result.
    scrambled = np.where(
        _valid(references)[:, None], samples, rng.integers(0, C, size=samples.shape)
    )
    assert metrics.generalized_energy_distance(
        scrambled, references, C, ignore_label=IGNORE
    ) == pytest.approx(ged, abs=1e-12)
    # A set compared with itself is at distance 0 on its valid pixels.
    assert metrics.generalized_energy_distance(
        references, references, C, ignore_label=IGNORE
    ) == pytest.approx(0.0, abs=1e-12)
    # An all-True mask is no mask.
    all_valid = np.ones(samples.shape[-2:], bool)
    assert metrics.generalized_energy_distance(samples, samples[:, :2], C, mask=all_valid) == (
        pytest.approx(metrics.generalized_energy_distance(samples, samples[:, :2], C), abs=0)
    )


def test_diversity_with_ignore_label_and_mask(rng):
    samples, references = _sets(rng, n=4, k=3)
    valid = _valid(references)
    # The raters' diversity on their own valid pixels is GED's reference term.
    ref_terms = metrics.generalized_energy_distance(
        samples, references, C, return_terms=True, ignore_label=IGNORE
    )
    assert metrics.diversity(references, C, ignore_label=IGNORE) == pytest.approx(
        ref_terms["reference_diversity"], abs=1e-12
    )
    # The samples' diversity restricted to the raters' valid region (`mask`): GED's sample term.
    assert metrics.diversity(samples, C, mask=valid) == pytest.approx(
        ref_terms["sample_diversity"], abs=1e-12
    )
    u = np.full(4, 0.25)
    expected = np.mean(
        [
            ref_weighted_mean_distance(s[:, v], s[:, v], u, u, C)
            for s, v in zip(samples, valid, strict=True)
        ]
    )
    assert metrics.diversity(samples, C, mask=valid) == pytest.approx(expected, abs=1e-12)
    # One image [N, H, W] with a mask [H, W].
    assert metrics.diversity(samples[1], C, mask=valid[1]) == pytest.approx(
        ref_weighted_mean_distance(samples[1][:, valid[1]], samples[1][:, valid[1]], u, u, C),
        abs=1e-12,
    )


def test_hungarian_matched_iou_matches_brute_force(rng):
    samples, references = _sets(rng, batch=2, n=3, k=2, shape=(5, 5))
    valid = _valid(samples, references)
    got = metrics.hungarian_matched_iou(samples, references, C, ignore_label=IGNORE)
    expected = np.mean(
        [ref_hungarian(samples[i][:, valid[i]], references[i][:, valid[i]], C) for i in range(2)]
    )
    assert got == pytest.approx(expected, abs=1e-12)
    # Matching a set of annotations with itself is perfect on its valid pixels.
    assert metrics.hungarian_matched_iou(
        references, references, C, ignore_label=IGNORE
    ) == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize(
    "call",
    [
        lambda s, r, **kw: metrics.generalized_energy_distance(s, r, C, **kw),
        lambda s, r, **kw: metrics.hungarian_matched_iou(s, r, C, **kw),
        lambda s, r, **kw: metrics.diversity(r, C, **kw),
        lambda s, r, **kw: metrics.pairwise_iou_distance(s[0], r[0], C, **kw),
        lambda s, r, **kw: metrics.iou_distance(s[0, 0], r[0, 0], C, **kw),
    ],
    ids=["ged", "hm_iou", "diversity", "pairwise", "iou_distance"],
)
def test_bad_ignore_label_and_mask_are_rejected(rng, call):
    samples, references = _sets(rng)
    for bad in (1, 0, 2.5, True, "255"):  # inside [0, C) or not an int
        with pytest.raises(ValueError, match="ignore_label"):
            call(samples, references, ignore_label=bad)
    with pytest.raises(ValueError, match="mask"):  # not boolean
        call(samples, references, ignore_label=IGNORE, mask=np.ones(samples.shape[-2:], int))
    with pytest.raises(ValueError, match="mask"):  # wrong shape
        call(samples, references, ignore_label=IGNORE, mask=np.ones((2, 2), bool))
    with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):  # labels beyond C besides 255
        call(samples, np.where(references == IGNORE, 7, references), ignore_label=IGNORE)
    with pytest.raises(ValueError, match=r"labels in \[0, 3\)"):  # 255 without ignore_label
        call(samples, references)


def test_an_image_without_valid_pixels_is_an_error(rng):
    samples, references = _sets(rng)
    references[1, 0] = IGNORE  # one rater left image 1 unlabelled: no pixel is valid
    with pytest.raises(ValueError, match="image 1 of the batch has no valid pixels"):
        metrics.generalized_energy_distance(samples, references, C, ignore_label=IGNORE)
    with pytest.raises(ValueError, match="image 1 of the batch has no valid pixels"):
        metrics.hungarian_matched_iou(samples, references, C, ignore_label=IGNORE)
    mask = np.zeros(samples.shape[-2:], bool)
    with pytest.raises(ValueError, match="the image has no valid pixels: `mask` is False"):
        metrics.diversity(samples[0], C, mask=mask)
