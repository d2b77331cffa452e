"""Tests for `tfp_seg.data.patches`: random patches of NIfTI volumes through `tf.data`: shapes
and the model input form, seeded determinism, patches equal to the zero-padded slices of
their volume, centres inside the brain, the foreground share and the class balance of the
centres within stated binomial bounds, and one training step of an SSN head on them."""

import numpy as np
import pytest

from tests.data.nifti_cases import write_cases
from tfp_seg import data
from tfp_seg.data import patches

M = 4  # modalities


@pytest.fixture
def volumes(tmp_path, rng):
    write_cases(tmp_path / "brats", rng)
    return data.load_nifti(str(tmp_path / "brats"), cache_dir=str(tmp_path / "cache"))


def _batches(ds) -> list:
    return [(x["images"].numpy(), x["roi_mask"].numpy(), y.numpy()) for x, y in ds]


def test_batches_have_the_model_input_form(volumes):
    import tensorflow as tf

    ds = volumes.to_patch_dataset((4, 6, 5), batch_size=4, seed=3, num_patches=10)
    x_spec, y_spec = ds.element_spec
    assert set(x_spec) == {"images", "roi_mask"}
    assert x_spec["images"].shape.as_list() == [None, 4, 6, 5, M]
    assert x_spec["images"].dtype == tf.float32 and x_spec["roi_mask"].dtype == tf.float32
    assert x_spec["roi_mask"].shape.as_list() == [None, 4, 6, 5]
    assert y_spec.shape.as_list() == [None, 4, 6, 5] and y_spec.dtype == tf.int32
    batches = _batches(ds)
    assert [b[0].shape[0] for b in batches] == [4, 4, 2]
    for images, roi, labels in batches:
        assert images.shape[1:] == (4, 6, 5, M) and roi.shape == labels.shape
        assert set(np.unique(roi)) <= {0.0, 1.0}
        assert np.all(roi[:, 2, 3, 2] == 1)  # the centre voxel (size // 2) is in the brain
        assert labels.min() >= 0 and labels.max() < volumes.num_classes
    fixed = volumes.to_patch_dataset((4, 6, 5), batch_size=4, seed=3)  # endless: static batch
    assert fixed.element_spec[0]["images"].shape.as_list() == [4, 4, 6, 5, M]


def test_patches_are_deterministic_for_a_seed(volumes):
    ds = volumes.to_patch_dataset((3, 4, 5), batch_size=4, seed=11, num_patches=12)
    first, again = _batches(ds), _batches(ds)
    other = _batches(volumes.to_patch_dataset((3, 4, 5), batch_size=4, seed=11, num_patches=12))
    endless = _batches(volumes.to_patch_dataset((3, 4, 5), batch_size=4, seed=11).take(3))
    for batches in (again, other, endless):
        for a, b in zip(first, batches, strict=True):
            for u, v in zip(a, b, strict=True):
                np.testing.assert_array_equal(u, v)
    changed = _batches(volumes.to_patch_dataset((3, 4, 5), batch_size=4, seed=12, num_patches=12))
    assert any(not np.array_equal(a[0], b[0]) for a, b in zip(first, changed, strict=True))
    # the stream is the one read_patches reads, patch k from (seed, k) whatever the batching
    images, roi, labels = patches.read_patches(volumes, range(4, 8), (3, 4, 5), seed=11)
    np.testing.assert_array_equal(images, first[1][0])
    np.testing.assert_array_equal(roi, first[1][1])
    np.testing.assert_array_equal(labels, first[1][2])


def _padded_slice(array, centre, size):
    """The patch by another route: pad the volume by the patch size, then slice."""
    pad = [(s, s) for s in size] + [(0, 0)] * (array.ndim - 3)
    padded = np.pad(np.asarray(array), pad)
    start = [c - s // 2 + s for c, s in zip(centre, size, strict=True)]
    return padded[tuple(slice(a, a + s) for a, s in zip(start, size, strict=True))]


@pytest.mark.parametrize("size", [(3, 4, 5), (2, 2, 2), (24, 24, 24)])
def test_patches_equal_the_slices_of_their_volume(volumes, size):
    indices = np.arange(30)
    cases, centres = patches.patch_centres(volumes, indices, seed=7)
    images, roi, labels = patches.read_patches(volumes, indices, size, seed=7)
    assert set(cases.tolist()) == {0, 1, 2}
    for j, (i, centre) in enumerate(zip(cases, centres, strict=True)):
        image, label, brain = volumes.volume(int(i))
        assert brain[tuple(centre)]  # every centre is a brain voxel
        np.testing.assert_array_equal(images[j], _padded_slice(image, centre, size))
        np.testing.assert_array_equal(roi[j], _padded_slice(brain, centre, size))
        np.testing.assert_array_equal(labels[j], _padded_slice(label, centre, size))
    if size == (24, 24, 24):  # twice the 8 x 10 x 12 volume: it all, padded on every side
        assert (
            np.all(images[:, 0] == 0) and np.all(roi[:, -1] == 0) and np.all(labels[:, :, 0] == 0)
        )
        assert np.all(roi.sum(axis=(1, 2, 3)) == [volumes.cases[i].num_brain for i in cases])


def _centre_labels(volumes, n, fraction, seed=0):
    _, roi, labels = patches.read_patches(volumes, range(n), (1, 1, 1), seed, fraction)
    assert np.all(roi == 1)
    return labels[:, 0, 0, 0]


def _within_binomial(hits: int, n: int, p: float, k: float = 4.0) -> bool:
    """|hits/n - p| <= k sigma / sqrt(n), sigma = sqrt(p (1 - p)) (k = 4: a false failure
    about once in 16000 runs; the seeds are fixed anyway)."""
    return abs(hits / n - p) <= k * np.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("fraction", [0.0, 0.5, 0.8])
def test_foreground_share_within_a_binomial_bound(volumes, fraction):
    n = 3000
    centre = _centre_labels(volumes, n, fraction, seed=21)
    # case uniform; foreground draw with probability f, else a brain voxel (foreground w.p. q)
    q = [sum(c.class_counts[1:]) / c.num_brain for c in volumes.cases]
    p = float(np.mean([fraction + (1 - fraction) * qc for qc in q]))
    assert _within_binomial(int(np.sum(centre > 0)), n, p), (np.mean(centre > 0), p)


def test_foreground_centres_take_a_present_class_uniformly(volumes):
    n = 3000
    centre = _centre_labels(volumes, n, 1.0, seed=5)
    assert np.all(centre > 0)
    present = [np.flatnonzero(np.asarray(c.class_counts[1:])) + 1 for c in volumes.cases]
    assert [p.tolist() for p in present] == [[1, 2, 3], [1, 2, 3], [2]]
    for c in (1, 2, 3):  # 2/9, 5/9, 2/9 (voxel-proportional sampling: under 1/100 for 3)
        p = float(np.mean([(c in pc) / len(pc) for pc in present]))
        assert _within_binomial(int(np.sum(centre == c)), n, p), (c, np.mean(centre == c), p)


def test_extract_patch_reads_the_overlap_and_pads_with_zeros():
    volume = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) + 1
    patch = patches.extract_patch(volume, (0, 0, 0), (2, 2, 2))
    expected = np.zeros((2, 2, 2), np.float32)
    expected[1, 1, 1] = volume[0, 0, 0]
    np.testing.assert_array_equal(patch, expected)
    np.testing.assert_array_equal(patches.extract_patch(volume, (1, 1, 2), (1, 3, 4)), volume[1:])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"patch_size": (4, 4)}, "`patch_size` must be 3 positive ints"),
        ({"patch_size": (0, 4, 4)}, "`patch_size` must be 3 positive ints"),
        ({"patch_size": "444"}, "`patch_size` must be 3 positive ints"),
        ({"foreground_fraction": 1.5}, r"`foreground_fraction` must be a number in \[0, 1\]"),
        ({"foreground_fraction": True}, r"`foreground_fraction` must be a number in \[0, 1\]"),
        ({"seed": -1}, "`seed` must be an int >= 0"),
        ({"batch_size": 0}, "`batch_size` must be a positive int"),
        ({"num_patches": 0}, "`num_patches` must be None or a positive int"),
    ],
)
def test_bad_arguments_are_named(volumes, kwargs, match):
    kwargs = {"patch_size": (4, 4, 4), **kwargs}
    with pytest.raises(ValueError, match=match):
        volumes.to_patch_dataset(**kwargs)


def test_an_ssn_head_trains_on_patches_with_the_brain_as_roi_mask(volumes):
    import keras

    from tfp_seg.layers import LowRankLogits
    from tfp_seg.models import ProbabilisticSegmenter, UNet

    keras.utils.set_random_seed(0)
    model = ProbabilisticSegmenter(
        UNet(base_filters=4, depth=1, spatial_dims=3),
        LowRankLogits(num_classes=volumes.num_classes, rank=2, spatial_dims=3),
    )
    model.compile(optimizer="adam", loss="auto")
    ds = volumes.to_patch_dataset((4, 4, 4), batch_size=2, seed=0)
    history = model.fit(ds, steps_per_epoch=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][-1])
