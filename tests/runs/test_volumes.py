"""`tfp_seg.runs.volumes`: NIfTI cases as a run's data set (case views, split, regions), the
training patch streams and the run's sliding-window sampler."""

import numpy as np
import pytest

from tests.data import nifti_cases
from tfp_seg import export, layers, metrics, models
from tfp_seg.data import load_nifti
from tfp_seg.runs import TrainConfig
from tfp_seg.runs.volumes import (
    VolumeSampler,
    VolumeSet,
    brain_mask,
    evaluation_shapes,
    patch_datasets,
)

CASES = ("case_a", "case_b", "case_c", "case_d")


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    root = tmp_path_factory.mktemp("cases")
    nifti_cases.write_cases(root, np.random.default_rng(0), cases=CASES)
    return load_nifti(str(root), cache_dir=str(tmp_path_factory.mktemp("cache")))


def test_case_views_read_the_cases_lazily_in_every_indexing_form(volumes):
    data = VolumeSet(volumes)
    images, annotations = data.images, data.annotations
    assert images.shape == (4, 8, 10, 12, 4) and images.ndim == 5 and len(images) == 4
    assert annotations.shape == (4, 1, 8, 10, 12) and annotations.dtype == np.int32
    expected = [volumes.volume(i) for i in range(4)]
    np.testing.assert_array_equal(images[2], expected[2][0])
    np.testing.assert_array_equal(images[-1], expected[3][0])
    np.testing.assert_array_equal(annotations[1:3, 0], np.stack([e[1] for e in expected[1:3]]))
    np.testing.assert_array_equal(images[np.array([3, 0])][1], expected[0][0])
    np.testing.assert_array_equal(images[1, ..., 2], expected[1][0][..., 2])
    np.testing.assert_array_equal(images[:2, 0], np.stack([e[0][0] for e in expected[:2]]))
    np.testing.assert_array_equal(np.asarray(annotations)[:, 0], np.stack([e[1] for e in expected]))
    assert images[4:].shape == (0, 8, 10, 12, 4)


def test_split_subsets_and_regions_follow_the_cases(volumes, tmp_path):
    data = VolumeSet(volumes)
    parts = data.split((0.6, 0.2, 0.2), seed=3)
    assert all(isinstance(p, VolumeSet) for p in parts)
    assert [p.ids for p in parts] == [p.ids for p in volumes.split((0.6, 0.2, 0.2), seed=3)]
    assert data[[2, 0]].ids == ("case_c", "case_a") and data.groups == volumes.ids
    assert data.dice_regions == dict(metrics.BRATS_REGIONS)
    assert (data.num_classes, data.num_annotations) == (4, 1)
    other = load_nifti(
        volumes.directory, label_map={0: 0, 1: 1, 2: 1, 4: 1}, cache_dir=str(tmp_path)
    )
    assert VolumeSet(other).dice_regions is None  # regions only for the BraTS classes


def test_an_evaluation_set_of_several_shapes_names_the_cases(volumes, tmp_path):
    root = tmp_path / "mixed"
    nifti_cases.write_cases(root, np.random.default_rng(1), cases=("case_a", "case_b"))
    folder = root / "case_z"
    folder.mkdir()
    for name in (*nifti_cases.MODALITIES, "seg"):
        data = np.zeros((9, 10, 8), np.uint8 if name == "seg" else np.float32)
        if name != "seg":
            data[2:7, 2:8, 2:6] = 5.0 + np.arange(5)[:, None, None]
        nifti_cases.write_volume(folder / f"case_z_{name}.nii.gz", data)
    data = VolumeSet(load_nifti(str(root), cache_dir=str(tmp_path / "c")))
    with pytest.raises(
        ValueError, match=r"share one shape.*8x10x12: case_a, case_b; 8x10x9: case_z"
    ):
        _ = data.images
    with pytest.raises(ValueError, match="case_z"):
        evaluation_shapes([data[:2], data])  # what `train` checks before writing anything
    assert evaluation_shapes([data[:2]]) == [(8, 10, 12)]
    assert data[:2].images.shape == (2, 8, 10, 12, 4)  # a subset of one shape is fine


def test_the_brain_of_the_normalised_images_is_the_loaders_mask(volumes):
    data = VolumeSet(volumes)
    roi = brain_mask(data.images[:])
    assert roi.dtype == np.float32 and roi.shape == (4, 8, 10, 12)
    brains = np.stack([volumes.volume(i)[2] for i in range(4)])
    np.testing.assert_array_equal(roi.astype(bool), brains)


def _model():
    model = models.ProbabilisticSegmenter(
        models.UNet(base_filters=4, depth=1, spatial_dims=3),
        layers.LowRankLogits(4, rank=2, spatial_dims=3),
    )
    model({"images": np.zeros((1, 4, 4, 4, 4), "float32"), "roi_mask": np.ones((1, 4, 4, 4))})
    return model


def test_the_sampler_adds_the_brain_as_roi_and_stands_for_its_network():
    model = _model()
    sampler = VolumeSampler(model, window=4, overlap=2)
    x = np.zeros((1, 6, 4, 4, 4), "float32")
    x[:, 1:5] = np.random.default_rng(0).normal(size=(1, 4, 4, 4, 4))
    fed = sampler.inputs_of(x)
    np.testing.assert_array_equal(fed["roi_mask"], brain_mask(x))
    mask = np.ones(x.shape[:-1], "float32")
    assert sampler.inputs_of({"images": x, "roi_mask": mask})["roi_mask"] is mask
    plain = VolumeSampler(model, window=4, roi_mask=False)
    assert plain.inputs_of({"images": x, "roi_mask": mask}) is x and plain.inputs_of(x) is x
    _, factor, diag = (np.asarray(t) for t in model.head.covariance_parts(sampler.params(x)))
    outside = brain_mask(x) == 0
    assert outside.any() and not factor[outside].any() and (diag[~outside] > 1e-3).all()
    _, factor, _ = (np.asarray(t) for t in model.head.covariance_parts(plain.params(x)))
    assert factor[outside].any()  # without the roi the factor is not zeroed
    # The exporters export the network itself (one pass), the images' shape read from its
    # {"images", "roi_mask"} build config.
    adapter = export.as_adapter(sampler)
    assert adapter.trackable is model and adapter.image_shape == (4, 4, 4, 4)


@pytest.mark.parametrize("head, roi", [("low_rank", True), ("heteroscedastic", False)])
def test_patch_datasets_stream_epochs_of_patches_and_a_fixed_validation_set(volumes, head, roi):
    config = TrainConfig(
        data=f"nifti:{volumes.directory}",
        head=head,
        patch_size=4,
        patches_per_epoch=10,
        batch_size=4,
        depth=1,
    ).validate()
    data = VolumeSet(volumes)
    train_ds, val_ds, steps = patch_datasets(config, data[:3], data[3:])
    assert steps == 3  # ceil(10 / 4)
    x, y = next(iter(train_ds))
    assert y.shape == (4, 4, 4, 4)
    if roi:
        assert set(x) == {"images", "roi_mask"} and x["roi_mask"].shape == (4, 4, 4, 4)
    else:
        assert x.shape == (4, 4, 4, 4, 4)  # heads without a roi get the images alone
    assert int(val_ds.cardinality()) == 1  # ceil(3 / 4) batches of 4 fixed patches
    assert patch_datasets(config, data[:3], data[:0])[1] is None
