"""Tests for `tfp_seg.data.decode`: decoding into the cache part by part and image by image gives
what the in-memory loaders give, with their checks and errors."""

import os

import numpy as np
import pytest
from PIL import Image

from tests.helpers import fake_lidc_entries, write_image_folder, write_lidc_pickle
from tfp_seg import data


def _pair(spec, tmp_path, **options):
    streamed = data.load(spec, stream=True, cache_dir=str(tmp_path / "cache"), **options)
    return streamed, data.load(spec, stream=False, **options)


def _same(streamed, in_memory):
    assert streamed.ids == in_memory.ids and streamed.groups == in_memory.groups
    assert streamed.num_classes == in_memory.num_classes
    assert streamed.class_names == in_memory.class_names
    np.testing.assert_array_equal(np.asarray(streamed.images), in_memory.images)
    np.testing.assert_array_equal(np.asarray(streamed.annotations), in_memory.annotations)


def test_an_id_in_several_parts_keeps_its_last_entry_as_in_memory(tmp_path, rng):
    entries = fake_lidc_entries(rng, n=6, size=8)
    folder = write_lidc_pickle(tmp_path / "parts", entries, parts=2)
    key = sorted(entries)[1]  # in part_1; part_2 (read after it) redefines it
    changed = dict(entries[key], image=np.ones((8, 8), np.float32), series_uid="moved")
    write_lidc_pickle(folder + "/part_2.pickle", {key: changed})
    streamed, in_memory = _pair(f"lidc:{folder}", tmp_path)
    _same(streamed, in_memory)
    assert streamed.groups[streamed.ids.index(key)] == "moved"
    assert streamed.images.base.shape[0] == 7 and len(streamed) == 6  # rows in decode order


def test_lidc_entries_are_checked_and_named_as_in_memory(tmp_path, rng):
    entries = fake_lidc_entries(rng, n=4, size=8)
    bad = sorted(entries)[3]
    entries[bad]["masks"] = entries[bad]["masks"][:3]
    folder = write_lidc_pickle(tmp_path / "parts", entries, parts=2)
    for stream in (True, False):
        with pytest.raises(ValueError, match=f"{bad}.*3 masks"):
            data.load(f"lidc:{folder}", stream=stream, cache_dir=str(tmp_path / "c"))
    entries[bad] = {"image": entries[bad]["image"]}
    write_lidc_pickle(tmp_path / "one.pickle", entries)
    with pytest.raises(ValueError, match=f"LIDC entry '{bad}'.*'image' and 'masks'"):
        data.load(f"lidc:{tmp_path / 'one.pickle'}", stream=True, cache_dir=str(tmp_path / "c"))


def test_a_folder_of_grey_and_colour_images_decodes_to_colour_as_in_memory(tmp_path, rng):
    images, masks, _ = write_image_folder(tmp_path, rng, num_images=4, k=2, size=8)
    colour = rng.integers(0, 255, size=(8, 8, 3)).astype(np.uint8)
    Image.fromarray(colour).save(os.path.join(images, "case3.png"))
    streamed, in_memory = _pair(f"folder:{images}:{masks}", tmp_path)
    assert in_memory.images.shape[-1] == 3
    _same(streamed, in_memory)


def test_folder_options_resize_and_class_ids_as_in_memory(tmp_path, rng):
    images, masks, _ = write_image_folder(tmp_path, rng, num_images=3, k=2, size=8)
    for stem in ("case0", "case1", "case2"):  # class ids 0..2 instead of 0/255
        for k in range(2):
            path = os.path.join(masks, f"{stem}_{k}.png")
            ids = (np.asarray(Image.open(path)) > 0).astype(np.uint8) * (1 + k)
            Image.fromarray(ids).save(path)
    spec = f"folder:{images}:{masks}"
    streamed, in_memory = _pair(spec, tmp_path, binarize=False, image_size=(4, 6), channels=3)
    assert in_memory.num_classes == 3 and in_memory.images.shape == (3, 4, 6, 3)
    _same(streamed, in_memory)
    with pytest.raises(ValueError, match=r"case\d_\d\.png holds class ids in \[0, 2\]"):
        data.load(spec, stream=True, cache_dir=str(tmp_path / "c"), binarize=False, num_classes=2)


def test_folder_layout_errors_come_before_any_decode(tmp_path, rng):
    images, masks, _ = write_image_folder(tmp_path, rng, num_images=3, k=2, size=8)
    os.remove(os.path.join(masks, "case1_0.png"))
    with pytest.raises(ValueError, match="different numbers of masks.*case1.png: 1"):
        data.load(f"folder:{images}:{masks}", stream=True, cache_dir=str(tmp_path / "c"))
    assert not (tmp_path / "c").exists()
