"""Loaders of local multi-annotator data: LIDC crops pickle, image folders, a real image."""

import importlib.util
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from tests.helpers import fake_lidc_entries, write_lidc_pickle
from tfp_seg.data import AnnotatedImages, load_image_folder, load_lidc_crops

# ================================================================================================
# LIDC crops pickle
# ================================================================================================


def test_lidc_round_trip(tmp_path, rng):
    raw = fake_lidc_entries(rng)
    data = load_lidc_crops(write_lidc_pickle(tmp_path / "data_lidc.pickle", raw))
    assert isinstance(data, AnnotatedImages)
    assert len(data) == 5 and data.num_annotations == 4 and data.num_classes == 2
    assert data.images.shape == (5, 16, 16, 1) and data.images.dtype == np.float32
    assert data.annotations.shape == (5, 4, 16, 16)
    keys = sorted(raw)
    assert data.ids == tuple(keys)
    for i, key in enumerate(keys):
        np.testing.assert_array_equal(data.images[i, ..., 0], raw[key]["image"])
        for k in range(4):
            np.testing.assert_array_equal(data.annotations[i, k], raw[key]["masks"][k])
    assert data.groups == tuple(raw[k]["series_uid"] for k in keys)
    np.testing.assert_allclose(data.marginals()[..., 1], data.annotations.mean(axis=1))


def test_lidc_folder_of_parts_and_max_images(tmp_path, rng):
    raw = fake_lidc_entries(rng, n=6, series=("a", "b", "c"))
    keys = sorted(raw)
    write_lidc_pickle(tmp_path / "part1.pickle", {k: raw[k] for k in keys[:3]})
    write_lidc_pickle(tmp_path / "part2.pickle", {k: raw[k] for k in keys[3:]})
    assert load_lidc_crops(tmp_path).ids == tuple(keys)
    assert load_lidc_crops(tmp_path, max_images=2).ids == tuple(keys[:2])


def test_lidc_masks_binarised_from_0_255(tmp_path, rng):
    raw = fake_lidc_entries(rng, n=1)
    entry = next(iter(raw.values()))
    entry["masks"] = [m * 255 for m in entry["masks"]]
    data = load_lidc_crops(write_lidc_pickle(tmp_path / "d.pickle", raw))
    assert set(np.unique(data.annotations)) <= {0, 1}
    np.testing.assert_array_equal(data.annotations[0, 0], entry["masks"][0] // 255)


def test_lidc_errors_name_the_entry(tmp_path, rng):
    raw = fake_lidc_entries(rng, n=3)
    bad = sorted(raw)[1]
    raw[bad]["masks"] = raw[bad]["masks"][:3]
    with pytest.raises(ValueError, match=f"{bad}.*3 masks"):
        load_lidc_crops(write_lidc_pickle(tmp_path / "k.pickle", raw))
    raw = fake_lidc_entries(rng, n=2)
    del raw[sorted(raw)[0]]["masks"]
    with pytest.raises(ValueError, match="'image' and 'masks'"):
        load_lidc_crops(write_lidc_pickle(tmp_path / "m.pickle", raw))
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        load_lidc_crops(tmp_path / "missing.pickle")


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def test_lidc_refuses_code_in_untrusted_pickle(tmp_path, rng):
    raw = fake_lidc_entries(rng, n=1)
    next(iter(raw.values()))["payload"] = _Evil()
    path = write_lidc_pickle(tmp_path / "evil.pickle", raw)
    with pytest.raises(pickle.UnpicklingError, match="posix.getcwd|os.getcwd|nt.getcwd"):
        load_lidc_crops(path)
    assert len(load_lidc_crops(path, trusted=True)) == 1


def test_split_keeps_groups_together(tmp_path, rng):
    series = tuple(f"s{i // 3}" for i in range(30))  # 10 series of 3 crops
    data = load_lidc_crops(
        write_lidc_pickle(tmp_path / "d.p", fake_lidc_entries(rng, n=30, size=8, series=series))
    )
    parts = data.train_val_test(seed=1)
    assert sum(len(p) for p in parts) == 30
    assert [len(p) for p in parts] == [24, 3, 3]
    seen = [set(p.groups) for p in parts]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
    all_ids = sorted(i for p in parts for i in p.ids)
    assert all_ids == sorted(data.ids)


def test_to_dataset_shapes_and_annotation_modes(tmp_path, rng):
    data = load_lidc_crops(
        write_lidc_pickle(tmp_path / "d.pickle", fake_lidc_entries(rng, n=5, size=8))
    )
    x, y = next(iter(data.to_dataset(batch_size=4, shuffle=False, annotation="first")))
    assert x.shape == (4, 8, 8, 1) and y.shape == (4, 8, 8) and y.dtype.name == "int32"
    np.testing.assert_array_equal(y.numpy(), data.annotations[:4, 0])
    _, y = next(iter(data.to_dataset(batch_size=5, shuffle=False, annotation="all")))
    assert y.shape == (5, 4, 8, 8)
    _, y = next(iter(data.to_dataset(batch_size=5, shuffle=False, annotation="marginal")))
    assert y.shape == (5, 8, 8, 2)
    # "random" picks one of the K annotations of the same image.
    _, y = next(iter(data.to_dataset(batch_size=5, shuffle=False, annotation="random", seed=3)))
    for i in range(5):
        assert any(np.array_equal(y[i].numpy(), data.annotations[i, k]) for k in range(4))
    with pytest.raises(ValueError, match="annotation must be"):
        data.to_dataset(annotation="mean")


# ================================================================================================
# Image folders
# ================================================================================================


def _png(path, array, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)


def _folder(tmp_path, rng, layout="suffix", k=3, size=(12, 10)):
    images, masks = tmp_path / "images", tmp_path / "masks"
    truth = {}
    for stem in ("case1", "case2", "case10"):
        _png(str(images / f"{stem}.png"), (rng.random(size) * 255).astype(np.uint8))
        truth[stem] = []
        for j in range(k):
            m = (rng.random(size) > 0.5).astype(np.uint8)
            truth[stem].append(m)
            target = masks / f"{stem}_{j}.png" if layout == "suffix" else masks / stem / f"{j}.png"
            _png(str(target), m * 255)
    return images, masks, truth


@pytest.mark.parametrize("layout", ["suffix", "subfolder"])
def test_folder_several_masks_per_image(tmp_path, rng, layout):
    images, masks, truth = _folder(tmp_path, rng, layout)
    data = load_image_folder(images, masks)
    assert data.ids == ("case1", "case2", "case10")  # natural order
    assert data.images.shape == (3, 12, 10, 1) and data.annotations.shape == (3, 3, 12, 10)
    assert data.images.max() <= 1.0 and data.num_classes == 2
    for i, stem in enumerate(data.ids):
        raw = np.asarray(Image.open(images / f"{stem}.png"), np.float32) / 255.0
        np.testing.assert_allclose(data.images[i, ..., 0], raw)
        for j in range(3):
            np.testing.assert_array_equal(data.annotations[i, j], truth[stem][j])


def test_folder_single_mask_and_class_ids(tmp_path, rng):
    images, masks = tmp_path / "im", tmp_path / "lab"
    labels = rng.integers(0, 4, (8, 8)).astype(np.uint8)
    _png(str(images / "a.png"), (rng.random((8, 8, 3)) * 255).astype(np.uint8))
    _png(str(masks / "a.png"), labels)
    data = load_image_folder(images, masks, binarize=False)
    assert data.num_classes == 4 and data.images.shape == (1, 8, 8, 3)
    np.testing.assert_array_equal(data.annotations[0, 0], labels)
    with pytest.raises(ValueError, match=r"lab/a.png holds class ids in \[0, 3\]"):
        load_image_folder(images, masks, binarize=False, num_classes=3)


def test_folder_missing_mask_names_image(tmp_path, rng):
    images, masks, _ = _folder(tmp_path, rng)
    _png(str(images / "orphan.png"), np.zeros((12, 10), np.uint8))
    with pytest.raises(FileNotFoundError, match="no mask for image .*orphan.png"):
        load_image_folder(images, masks)


def test_folder_size_mismatch_names_mask(tmp_path, rng):
    images, masks, _ = _folder(tmp_path, rng)
    _png(str(masks / "case2_1.png"), np.zeros((12, 11), np.uint8))
    pattern = r"mask .*case2_1.png is 11x12 .* image .*case2.png is 10x12"
    with pytest.raises(ValueError, match=pattern):
        load_image_folder(images, masks)


def test_folder_other_errors(tmp_path, rng):
    images, masks, _ = _folder(tmp_path, rng)
    os.remove(masks / "case10_2.png")
    with pytest.raises(ValueError, match="different numbers of masks.*case10.png: 2"):
        load_image_folder(images, masks)
    _png(str(masks / "case10_2.png"), np.zeros((12, 10), np.uint8))
    _png(str(masks / "caes1_0.png"), np.zeros((12, 10), np.uint8))  # typo
    with pytest.raises(ValueError, match="without an image.*caes1_0.png"):
        load_image_folder(images, masks)
    assert len(load_image_folder(images, masks, strict=False)) == 3
    _png(str(images / "big.png"), np.zeros((14, 10), np.uint8))
    _png(str(masks / "big_0.png"), np.zeros((14, 10), np.uint8))
    _png(str(masks / "big_1.png"), np.zeros((14, 10), np.uint8))
    _png(str(masks / "big_2.png"), np.zeros((14, 10), np.uint8))
    with pytest.raises(ValueError, match="big.png is 10x14.*image_size"):
        load_image_folder(images, masks, strict=False)
    data = load_image_folder(images, masks, strict=False, image_size=(6, 5))
    assert data.images.shape == (4, 6, 5, 1) and data.annotations.shape == (4, 3, 6, 5)
    assert set(np.unique(data.annotations)) <= {0, 1}
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        load_image_folder(tmp_path / "nope", masks)


# ================================================================================================
# A real image with a human-made mask (stardist wheel, installed with --no-deps)
# ================================================================================================


def _stardist_images():
    spec = importlib.util.find_spec("stardist")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = os.path.join(list(spec.submodule_search_locations)[0], "data", "images")
    needed = [os.path.join(folder, f) for f in ("img2d.tif", "mask2d.tif")]
    return needed if all(os.path.isfile(p) for p in needed) else None


@pytest.mark.skipif(  # .ci/run installs it, so CI (CI=true) never skips: it fails without it
    _stardist_images() is None and os.environ.get("CI") != "true",
    reason="needs the nuclei test image of the stardist wheel: pip install --no-deps "
    "stardist==0.9.2",
)
def test_real_nuclei_image_with_human_mask(tmp_path):
    """DSB 2018 fluorescence nuclei (Caicedo et al. 2019) and their annotated instance mask."""
    img_path, mask_path = _stardist_images()
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    os.symlink(img_path, tmp_path / "images" / "nuclei.tif")
    os.symlink(mask_path, tmp_path / "masks" / "nuclei.tif")
    data = load_image_folder(tmp_path / "images", tmp_path / "masks", normalize="minmax")
    assert data.images.shape == (1, 512, 512, 1) and data.annotations.shape == (1, 1, 512, 512)
    image, mask = data.images[0, ..., 0], data.annotations[0, 0]
    assert image.min() == 0.0 and image.max() == 1.0
    instances = np.asarray(Image.open(mask_path))
    np.testing.assert_array_equal(mask, instances > 0)  # instance ids -> foreground
    assert 0.05 < mask.mean() < 0.6
    # Image and mask are aligned: nuclei are bright, and a global threshold half-way between
    # the class means segments them with IoU > 0.5 against the human mask.
    fg, bg = image[mask == 1].mean(), image[mask == 0].mean()
    assert fg > bg + 0.1
    pred = image > (fg + bg) / 2
    iou = (pred & (mask == 1)).sum() / (pred | (mask == 1)).sum()
    assert iou > 0.5, iou
    shifted = np.roll(mask, 40, axis=1) == 1  # a misaligned mask would score far lower
    assert (pred & shifted).sum() / (pred | shifted).sum() < iou - 0.2
