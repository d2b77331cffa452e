"""The evaluations on volumes `S = (D, H, W)`: one code path with images.

Every metric of `evaluate_annotations` is per voxel or over the voxels of a volume, so volumes
`[B, D, H, W, ch]` with raters `[B, K, D, H, W]` and a sampler whose logits are a function of
each voxel give the report of the `[B, D*H, W, ch]` images (the same logits reshaped), every
key. `evaluate_ambiguous` runs on `ambiguous_shapes(..., spatial_dims=3)`: a sampler that
draws exactly the oracle's samples scores exactly the oracle's values.

The samplers here implement `sample_logits` themselves (no model, no Sampler base), so the
logits of every voxel are known exactly.
"""

import math

import numpy as np
import pytest

from tfp_seg import data as data_lib
from tfp_seg import metrics
from tfp_seg.evaluation import evaluate_ambiguous, evaluate_annotations, format_report

B, K, D, H, W, C = 3, 2, 3, 4, 5, 4
IGNORE = 255


class VoxelSampler:
    """Logits of each voxel from the image's own generator (its id in channel 1): a bias from
    channel 0, noise per voxel and class, a shift per sample and class (so whole maps differ
    between samples); drawn over the flattened voxels, so a volume's logits are its tall
    image's, reshaped. Ignores `seed` and `batch_size`."""

    def sample_logits(self, x, num_samples, seed=None, batch_size=None):
        x = np.asarray(x)
        out = []
        for image in x:
            rng = np.random.default_rng([int(image.reshape(-1, image.shape[-1])[0, 1]), 7])
            voxels = image.shape[:-1]
            noise = rng.normal(size=(num_samples, int(np.prod(voxels)), C))
            shift = 1.5 * rng.normal(size=(num_samples, 1, C))
            bias = image.reshape(1, -1, image.shape[-1])[..., :1] * np.linspace(0.0, 3.0, C)
            out.append((bias + noise + shift).reshape((num_samples,) + voxels + (C,)))
        return np.stack(out, axis=1).astype(np.float32)


def _volumes(rng):
    images = rng.uniform(size=(B, D, H, W, 2)).astype(np.float32)
    images[..., 1] = np.arange(B)[:, None, None, None]  # the image ids
    annotations = rng.integers(0, C, size=(B, K, D, H, W))
    annotations[:, 1] = np.where(rng.random((B, D, H, W)) < 0.5, annotations[:, 0], 0)
    annotations[0, 0, 0, 0] = IGNORE
    return images, annotations


def _tall(x, lead=1):
    s = x.shape
    return x.reshape(s[:lead] + (s[lead] * s[lead + 1],) + s[lead + 2 :])


def test_evaluate_annotations_of_volumes_is_that_of_the_tall_images(rng):
    images, annotations = _volumes(rng)
    regions = dict(metrics.BRATS_REGIONS)
    kwargs = dict(
        num_samples=4, sample_counts=(3,), ignore_label=IGNORE, regions=regions, batch_size=2
    )
    volume = evaluate_annotations(VoxelSampler(), images, annotations, **kwargs)
    image = evaluate_annotations(VoxelSampler(), _tall(images), _tall(annotations, 2), **kwargs)
    assert set(volume) == set(image)
    assert {f"dice_{name}" for name in regions} <= set(volume)
    for key in volume:
        assert volume[key] == pytest.approx(image[key], rel=1e-9, abs=1e-12), key
    assert all(math.isfinite(v) for v in volume.values())
    assert "dice_whole_tumour" in format_report(volume)


def test_region_dice_of_evaluate_annotations_is_the_mean_over_raters_and_volumes(rng):
    images, annotations = _volumes(rng)
    annotations[0, 0, 0, 0] = 0
    model = VoxelSampler()
    report = evaluate_annotations(
        model, images, annotations, num_samples=4, sample_counts=(), regions={"fg": (1, 2, 3)}
    )
    logits = model.sample_logits(images, 4)
    pred = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).mean(0).argmax(-1)
    per = [
        metrics.region_dice(pred[b][None], annotations[b, k][None], {"fg": (1, 2, 3)})["fg"]
        for b in range(B)
        for k in range(K)
    ]
    assert report["dice_fg"] == pytest.approx(np.mean(per), rel=1e-6)


@pytest.mark.parametrize(
    "images, annotations, match",
    [
        (np.zeros((B, D, H, W, 1)), np.zeros((B, K, D, H), int), r"must have rank 5 \(\[B, K, D"),
        (
            np.zeros((B, D, H, W, 1)),
            np.zeros((B, K, D, H, W + 1), int),
            r"`annotations` must be \[B, K, D, H, W\] with B, D, H, W",
        ),
        (np.zeros((B, 2, D, H, W, 1)), None, r"`images` must have rank 4 .* or 5"),
    ],
)
def test_mismatched_volumes_get_a_clear_error(images, annotations, match):
    if annotations is None:
        annotations = np.zeros((B, K, D, H, W), int)
    with pytest.raises(ValueError, match=match):
        evaluate_annotations(VoxelSampler(), images, annotations, num_samples=2, sample_counts=())


def test_streams_of_volumes_keep_one_layout(rng):
    images, annotations = _volumes(rng)
    stream = [(images[:2], annotations[:2]), (images[2:, :, :2], annotations[2:, :, :, :2])]
    with pytest.raises(ValueError, match=r"same K, D, H, W .*element 1"):
        evaluate_annotations(VoxelSampler(), stream, num_samples=2, sample_counts=())


def test_sampler_returning_image_logits_for_volumes_is_named(rng):
    images, annotations = _volumes(rng)

    class Flat(VoxelSampler):
        def sample_logits(self, x, num_samples, seed=None, batch_size=None):
            return super().sample_logits(x, num_samples)[:, :, 0]

    with pytest.raises(ValueError, match=r"must return \[N, B, D, H, W, C\]"):
        evaluate_annotations(Flat(), images, annotations, num_samples=2, sample_counts=())


class OracleSampler:
    """Draws every volume's samples from its exact modes with the generator that
    `evaluate_ambiguous` gives its oracle (`default_rng(seed)`, image by image): in one batch,
    the model's samples are then the oracle's."""

    def __init__(self, data, seed):
        self.data, self.rng = data, np.random.default_rng(seed)

    def sample_logits(self, x, num_samples, seed=None, batch_size=None):
        draws = []
        for i in range(len(x)):
            modes, weights = self.data.modes_of(i)
            draws.append(data_lib.sample_annotations(modes, weights, num_samples, self.rng))
        labels = np.stack(draws, axis=1)  # [N, b, D, H, W]
        return 10.0 * np.eye(self.data.num_classes, dtype=np.float32)[labels]


@pytest.fixture(scope="module")
def volumes():
    return data_lib.ambiguous_shapes(3, image_size=16, max_objects=2, seed=4, spatial_dims=3)


def test_evaluate_ambiguous_on_volumes(volumes):
    report = evaluate_ambiguous(OracleSampler(volumes, 0), volumes, num_samples=4, seed=0)
    for key in ("ged", "hm_iou"):  # the oracle's sampled metrics, from the same samples
        assert report[key] == pytest.approx(report[f"oracle_{key}"], abs=1e-12), key
    # The model's predictive probabilities are the empirical marginals of 4 samples, not the
    # exact ones: its NLL is at least the oracle's floor (the marginals' entropy).
    assert report["nll"] >= report["oracle_nll"] - 1e-9
    assert report["num_images"] == 3
    assert all(math.isfinite(v) for v in report.values())
