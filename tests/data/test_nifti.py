"""Tests for `tfp_seg.data.nifti` (and its cache, `tfp_seg.data.nifti_cache`): the BraTS layout
read with nibabel, channel order and axis convention, the brain mask and the normalisation
inside it, label mapping, one clear error per bad volume naming the case, the disk cache
(reused, re-decoded when a file changes, rebuilt when corrupt), splits by case and
`tfp_seg.data.load("nifti:DIR")`."""

import os
import re

import nibabel as nib
import numpy as np
import pytest

from tests.data.nifti_cases import (
    CASES,
    LONE_T2_XYZ,
    MODALITIES,
    SHAPE_XYZ,
    brain_box_xyz,
    to_dhw,
    write_cases,
    write_volume,
    write_with_sform,
    zscore_in_brain,
)
from tfp_seg import data
from tfp_seg.data import nifti_cache, nifti_decode

D, H, W = SHAPE_XYZ[::-1]


@pytest.fixture
def cases(tmp_path, rng):
    root = tmp_path / "brats"
    return root, write_cases(root, rng)


def _load(root, tmp_path, **kwargs):
    return data.load_nifti(str(root), cache_dir=str(tmp_path / "cache"), **kwargs)


def _brain_xyz(arrays) -> np.ndarray:
    return np.any([arrays[m] != 0 for m in MODALITIES], axis=0)


def test_loads_cases_in_order_with_channels_in_modality_order(cases, tmp_path):
    root, written = cases
    volumes = _load(root, tmp_path, normalize=False)
    assert len(volumes) == 3 and volumes.ids == CASES and volumes.groups == CASES
    assert volumes.modalities == MODALITIES and volumes.num_classes == 4
    assert volumes.class_names == data.BRATS_CLASS_NAMES
    for i, case in enumerate(CASES):
        image, label, brain = volumes.volume(i)
        assert image.shape == (D, H, W, 4) and image.dtype == np.float32
        assert label.shape == (D, H, W) and label.dtype == np.int32
        assert brain.shape == (D, H, W) and brain.dtype == bool
        assert not image.flags.writeable
        for m, name in enumerate(MODALITIES):  # channel m is the file of modality m, [Z, Y, X]
            np.testing.assert_array_equal(image[..., m], to_dhw(written[case][name]))
        # one voxel by hand: (d, h, w) is nibabel's (x, y, z) = (w, h, d)
        assert image[3, 4, 5, 2] == written[case]["t1ce"][5, 4, 3]
        assert volumes.cases[i].shape == (D, H, W)


def test_brain_mask_is_any_modality_non_zero(cases, tmp_path):
    root, written = cases
    volumes = _load(root, tmp_path)
    _, _, brain = volumes.volume(0)
    expected = brain_box_xyz()
    expected[LONE_T2_XYZ] = True  # only t2 is non-zero there: still brain
    np.testing.assert_array_equal(brain, to_dhw(expected))
    assert volumes.cases[0].num_brain == expected.sum()


def test_normalisation_is_zero_mean_unit_std_inside_the_brain(cases, tmp_path):
    root, written = cases
    volumes = _load(root, tmp_path)
    for i, case in enumerate(CASES):
        image, _, brain = volumes.volume(i)
        brain_xyz = _brain_xyz(written[case])
        for m, name in enumerate(MODALITIES):
            inside = image[..., m][brain].astype(np.float64)
            assert abs(inside.mean()) < 1e-5 and abs(inside.std() - 1.0) < 1e-5
            assert np.all(image[..., m][~brain] == 0)
            expected = zscore_in_brain(written[case][name], brain_xyz)
            np.testing.assert_allclose(image[..., m], to_dhw(expected), atol=1e-5)


def test_normalize_in_mask_checks_shapes_and_handles_constant_channels():
    image = np.stack([np.full((2, 3), 5.0), np.arange(6.0).reshape(2, 3)], axis=-1)
    mask = np.array([[True, True, False], [True, False, False]])
    out = data.normalize_in_mask(image, mask)
    np.testing.assert_array_equal(out[..., 0], 0.0)  # constant inside the mask -> 0
    inside = out[..., 1][mask]
    np.testing.assert_allclose([inside.mean(), inside.std()], [0.0, 1.0], atol=1e-6)
    assert np.all(out[..., 1][~mask] == 0)
    with pytest.raises(ValueError, match="`mask` must have the shape of `image`"):
        data.normalize_in_mask(image, mask[:, :2])


def test_brats_labels_map_to_classes(cases, tmp_path):
    root, written = cases
    volumes = _load(root, tmp_path)
    for i, case in enumerate(CASES):
        _, label, brain = volumes.volume(i)
        raw = to_dhw(written[case]["seg"])
        np.testing.assert_array_equal(label, np.choose(raw // 1, [0, 1, 2, 0, 3]))
        counts = np.bincount(label[brain], minlength=4)
        assert volumes.cases[i].class_counts == tuple(counts)
    assert volumes.cases[2].class_counts[1] == 0 and volumes.cases[2].class_counts[3] == 0


def test_custom_label_map_string_keys_and_class_names(cases, tmp_path):
    root, written = cases
    whole_tumour = {"0": 0, "1": 1, "2": 1, "4": 1}  # as a JSON / YAML config gives it
    volumes = _load(root, tmp_path, label_map=whole_tumour)
    assert volumes.num_classes == 2 and volumes.class_names == ("class 0", "class 1")
    _, label, _ = volumes.volume(0)
    np.testing.assert_array_equal(label, to_dhw(written["case_a"]["seg"]) > 0)
    named = _load(root, tmp_path, label_map=whole_tumour, class_names=("bg", "tumour"))
    assert named.class_names == ("bg", "tumour")
    with pytest.raises(ValueError, match="`class_names` must name all 2 classes"):
        _load(root, tmp_path, label_map=whole_tumour, class_names=("bg",))
    for bad in ({0: 0, 1: 2}, {"a": 0}, {}):
        with pytest.raises(ValueError, match="`label_map` must be a mapping"):
            _load(root, tmp_path, label_map=bad)


def test_custom_modalities_and_plain_nii_files(tmp_path, rng):
    root = tmp_path / "nii"
    written = write_cases(root, rng, cases=("p1", "p2"), ext=".nii")
    volumes = _load(root, tmp_path, modalities=("t2", "flair"), normalize=False)
    image, _, _ = volumes.volume(1)
    assert image.shape == (D, H, W, 2)
    np.testing.assert_array_equal(image[..., 0], to_dhw(written["p2"]["t2"]))
    np.testing.assert_array_equal(image[..., 1], to_dhw(written["p2"]["flair"]))
    with pytest.raises(ValueError, match="`modalities` .* must be distinct"):
        _load(root, tmp_path, modalities=("t2", "t2"))


# ------------------------------------------------------------------------------------------------
# Bad volumes: one ValueError naming the case folder and the file
# ------------------------------------------------------------------------------------------------


def _path(root, case, name, ext=".nii.gz"):
    return os.path.join(root, case, f"{case}_{name}{ext}")


def _replace(root, case, name, array):
    path = _path(root, case, name)
    os.remove(path)
    write_volume(path, array)


def _bad_shape(root, written):
    _replace(root, "case_b", "t1", written["case_b"]["t1"][:, :, :7])
    return "t1", r"its shape \(12, 10, 7\) differs from the shape \(12, 10, 8\) of 'case_b_flair"


def _missing_modality(root, written):
    os.remove(_path(root, "case_b", "t1ce"))
    return "t1ce", "the modality 't1ce' file is missing"


def _missing_label(root, written):
    os.remove(_path(root, "case_b", "seg"))
    return "seg", "the label file is missing .*require_labels=False"


def _nan_voxel(root, written):
    flair = written["case_b"]["flair"].copy()
    flair[4, 4, 4] = np.nan
    _replace(root, "case_b", "flair", flair)
    return "flair", "1 voxels are NaN or infinite"


def _inf_voxel(root, written):
    t2 = written["case_b"]["t2"].copy()
    t2[5, 5, 5], t2[6, 5, 5] = np.inf, -np.inf
    _replace(root, "case_b", "t2", t2)
    return "t2", "2 voxels are NaN or infinite"


def _four_d(root, written):
    _replace(root, "case_b", "t2", np.stack([written["case_b"]["t2"]] * 2, axis=-1))
    return "t2", r"the data are 4-D, shape \(12, 10, 8, 2\); expected a 3-D volume"


def _singular_affine(root, written):
    path = _path(root, "case_b", "flair")
    write_with_sform(path, written["case_b"]["flair"], np.zeros((3, 4)))
    return "flair", r"the affine is not a finite, invertible 4x4 matrix; got \[\[0.0, 0.0"


def _nan_affine(root, written):
    path = _path(root, "case_b", "flair")
    write_with_sform(path, written["case_b"]["flair"], np.hstack([np.eye(3), [[np.nan]] * 3]))
    assert not np.all(np.isfinite(nib.load(path).affine))
    return "flair", r"the affine is not a finite, invertible 4x4 matrix; got .*nan"


def _label_shape(root, written):
    _replace(root, "case_b", "seg", written["case_b"]["seg"][:11])
    return "seg", r"the label map's shape \(11, 10, 8\) differs from the shape \(12, 10, 8\)"


def _unmapped_label(root, written):
    seg = written["case_b"]["seg"].copy()
    seg[3, 3, 3] = 3  # BraTS has no label 3
    _replace(root, "case_b", "seg", seg)
    return "seg", r"values \[3\] that `label_map` .* does not map"


def _fractional_label(root, written):
    _replace(root, "case_b", "seg", written["case_b"]["seg"].astype(np.float32) + 0.5)
    return "seg", "non-integer values"


def _unreadable(root, written):
    with open(_path(root, "case_b", "t1"), "wb") as f:
        f.write(b"not a nifti file")
    return "t1", "nibabel cannot read it"


def _doubled(root, written):
    write_volume(_path(root, "case_b", "t1", ".nii"), written["case_b"]["t1"])
    return "t1", "both .* keep one"


def _empty_brain(root, written):
    for m in MODALITIES:
        _replace(root, "case_b", m, np.zeros(SHAPE_XYZ, np.float32))
    return None, "no voxel of any modality is non-zero"


BREAKS = [
    _bad_shape,
    _missing_modality,
    _missing_label,
    _nan_voxel,
    _inf_voxel,
    _four_d,
    _singular_affine,
    _nan_affine,
    _label_shape,
    _unmapped_label,
    _fractional_label,
    _unreadable,
    _doubled,
    _empty_brain,
]


@pytest.mark.parametrize("break_case", BREAKS, ids=[b.__name__[1:] for b in BREAKS])
def test_each_bad_volume_is_one_error_naming_the_case_and_file(cases, tmp_path, break_case):
    root, written = cases
    name, why = break_case(str(root), written)
    where = f"case folder '{os.path.join(str(root), 'case_b')}'"
    if name is not None:
        where += f", file 'case_b_{name}.nii"
    with pytest.raises(ValueError, match=f"^{re.escape(where)}.*{why}"):
        _load(root, tmp_path)


def test_cases_without_labels_only_when_labels_are_not_required(cases, tmp_path):
    root, _ = cases
    os.remove(_path(str(root), "case_c", "seg"))
    volumes = _load(root, tmp_path, require_labels=False)
    image, label, brain = volumes.volume(2)
    assert label is None and image.shape == (D, H, W, 4) and brain.any()
    assert not volumes.cases[2].has_label and volumes.cases[0].has_label
    with pytest.raises(ValueError, match=r"need labels; cases without a label file: \['case_c'\]"):
        volumes.to_patch_dataset((4, 4, 4))


def test_an_empty_or_missing_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.csv").write_text("not a case\n")
    with pytest.raises(ValueError, match="holds no case folders; expected DIR/<case>/"):
        _load(tmp_path / "empty", tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _load(tmp_path / "nowhere", tmp_path)


# ------------------------------------------------------------------------------------------------
# The cache
# ------------------------------------------------------------------------------------------------


def test_cache_is_reused_without_decoding_again(cases, tmp_path, monkeypatch):
    root, _ = cases
    first = _load(root, tmp_path)
    assert first.cache_status == ("decoded",) * 3 and "3 decoded" in first.note
    folders = [c.cache for c in first.cases]
    assert all(os.path.isfile(os.path.join(f, "meta.json")) for f in folders)

    def no_decode(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(nifti_decode, "decode_case", no_decode)
    second = _load(root, tmp_path)
    assert second.cache_status == ("reused",) * 3 and "3 reused" in second.note
    assert [c.cache for c in second.cases] == folders
    for i in range(3):
        for a, b in zip(first.volume(i), second.volume(i), strict=True):
            np.testing.assert_array_equal(a, b)


def test_a_changed_case_is_decoded_again_and_its_old_version_removed(cases, tmp_path, rng):
    root, written = cases
    first = _load(root, tmp_path)
    flair = written["case_b"]["flair"] * 2 + 1
    _replace(str(root), "case_b", "flair", flair)
    os.utime(_path(str(root), "case_b", "flair"), ns=(1, 1))  # a new mtime even on coarse clocks
    second = _load(root, tmp_path, normalize=False)  # other options: another source folder
    again = _load(root, tmp_path)
    assert again.cache_status == ("reused", "decoded", "reused")
    assert not os.path.exists(first.cases[1].cache)  # the old version of case_b is gone
    image, _, _ = second.volume(1)
    np.testing.assert_array_equal(image[..., 0], to_dhw(flair))


def test_a_corrupt_cache_is_rebuilt(cases, tmp_path):
    root, _ = cases
    first = _load(root, tmp_path)
    path = os.path.join(first.cases[0].cache, "image.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 16)
    second = _load(root, tmp_path)
    assert second.cache_status[0].startswith("rebuilt: image.npy")
    assert second.cache_status[1:] == ("reused", "reused")
    for a, b in zip(first.volume(0), second.volume(0), strict=True):
        np.testing.assert_array_equal(a, b)


def test_sampling_indices_group_foreground_voxels_by_class():
    brain = np.zeros((2, 3, 4), bool)
    brain[:, 1:, 1:] = True
    label = np.zeros((2, 3, 4), np.uint8)
    label[0, 1, 1], label[1, 2, 3], label[0, 2, 2], label[0, 0, 0] = 2, 1, 1, 1  # last: no brain
    brain_index, class_index, counts = nifti_cache.sampling_indices(brain, label, 3)
    np.testing.assert_array_equal(brain_index, np.flatnonzero(brain))
    assert counts.tolist() == [brain.sum() - 3, 2, 1]
    flat = label.reshape(-1)
    assert flat[class_index].tolist() == [1, 1, 2]
    assert sorted(class_index[:2]) == sorted(np.flatnonzero(brain.reshape(-1) & (flat == 1)))


# ------------------------------------------------------------------------------------------------
# Subsets, splits, data sources
# ------------------------------------------------------------------------------------------------


def test_subsets_and_seeded_splits_by_case(cases, tmp_path):
    root, _ = cases
    volumes = data.load(f"nifti:{root}", cache_dir=str(tmp_path / "cache"))
    assert isinstance(volumes, data.NiftiVolumes)
    assert volumes[[2, 0]].ids == ("case_c", "case_a") and volumes[1:].ids == CASES[1:]
    with pytest.raises(TypeError, match="use volume"):
        volumes[0]
    fractions = (0.34, 0.33, 0.33)
    parts = data.split_data(volumes, fractions, seed=5)
    assert sorted(i for p in parts for i in p.ids) == sorted(CASES)
    assert all(len(p) == 1 for p in parts)
    again = data.split_data(volumes, fractions, seed=5)
    assert [p.ids for p in parts] == [p.ids for p in again]
    orders = {
        tuple(p.ids[0] for p in data.split_data(volumes, fractions, seed=s)) for s in range(8)
    }
    assert len(orders) > 1  # the seed decides
    record = data.split_record(f"nifti:{root}", parts, fractions, 5)
    assert record["data"] == f"nifti:{root}" and record["ids"]["test"] == list(parts[2].ids)
    reloaded = data.load(f"nifti:{root}", cache_dir=str(tmp_path / "cache"))
    test = data.select_split(reloaded, record, "test")
    assert test.ids == parts[2].ids
    np.testing.assert_array_equal(test.volume(0)[0], parts[2].volume(0)[0])
    assert data.sources.default_fractions(f"nifti:{root}") == (0.6, 0.2, 0.2)


def test_load_spec_options_and_errors(cases, tmp_path):
    root, _ = cases
    spec = data.parse_spec(f"nifti:{root}")
    assert spec.kind == "nifti" and spec.paths == (str(root),) and str(spec) == f"nifti:{root}"
    volumes = data.load(f"nifti:{root}", cache_dir=str(tmp_path / "c"), modalities=("t1",))
    assert volumes.modalities == ("t1",) and "3 cases" in volumes.note
    with pytest.raises(ValueError, match="gives no path"):
        data.parse_spec("nifti:")
    with pytest.raises(
        ValueError, match="takes the options .*'modalities'.*got \\['image_size'\\]"
    ):
        data.load(f"nifti:{root}", image_size=8)
    with pytest.raises(ValueError, match="`stream=False` does not apply to `nifti`"):
        data.load(f"nifti:{root}", stream=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load(f"nifti:{tmp_path / 'missing'}")
