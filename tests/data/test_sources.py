"""Tests for `tfp_seg.data.sources`: specs, `load(spec)`, the grouped split and its record."""

import json

import numpy as np
import pytest

from tests.helpers import fake_lidc_entries, write_image_folder, write_lidc_pickle
from tfp_seg import data
from tfp_seg.data import AmbiguousShapes, AnnotatedImages


# --- specs -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, kind, paths",
    [
        ("builtin", "builtin", ()),
        (" builtin ", "builtin", ()),
        ("lidc:/data/data_lidc.pickle", "lidc", ("/data/data_lidc.pickle",)),
        ("folder:imgs:masks", "folder", ("imgs", "masks")),
    ],
)
def test_parse_spec(spec, kind, paths):
    parsed = data.parse_spec(spec)
    assert (parsed.kind, parsed.paths) == (kind, paths)
    assert data.parse_spec(str(parsed)) == parsed


@pytest.mark.parametrize(
    "spec, match",
    [
        ("", "non-empty string"),
        (None, "non-empty string"),
        ("imagenet", "unknown source 'imagenet'"),
        ("builtin:x", "takes none"),
        ("lidc:", "gives no path"),
        ("folder:only_one", "exactly two folders"),
        ("folder:a:b:c", "exactly two folders"),
        ("folder::b", "exactly two folders"),
    ],
)
def test_bad_specs_name_the_expected_forms(spec, match):
    with pytest.raises(ValueError, match=match) as info:
        data.parse_spec(spec)
    assert "folder:IMAGES_DIR:MASKS_DIR" in str(info.value) and "`data` spec" in str(info.value)


def test_missing_paths_and_unknown_options_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pickle"):
        data.load(f"lidc:{tmp_path / 'nope.pickle'}")
    (tmp_path / "imgs").mkdir()
    with pytest.raises(FileNotFoundError, match="masks"):
        data.load(f"folder:{tmp_path / 'imgs'}:{tmp_path / 'masks'}")
    with pytest.raises(ValueError, match=r"takes the options .*got \['image_size'\]"):
        data.load(f"lidc:{tmp_path}", image_size=32)
    with pytest.raises(ValueError, match="takes the options"):
        data.load("builtin", max_images=3)


def test_unreadable_pickle_names_the_file(tmp_path):
    bad = tmp_path / "broken.pickle"
    bad.write_bytes(b"not a pickle at all")
    with pytest.raises(ValueError, match="broken.pickle"):
        data.load(f"lidc:{bad}")


# --- load ------------------------------------------------------------------------------------
def test_builtin_is_the_benchmark():
    loaded = data.load("builtin", num_images=12, image_size=16, seed=3)
    direct = data.ambiguous_shapes(num_images=12, image_size=16, seed=3)
    assert isinstance(loaded, AmbiguousShapes)
    np.testing.assert_array_equal(loaded.images, direct.images)
    np.testing.assert_array_equal(loaded.annotations, direct.annotations)


@pytest.mark.parametrize("parts", [1, 3])
def test_lidc_file_or_folder_of_parts(tmp_path, rng, parts):
    entries = fake_lidc_entries(rng, n=7, size=16)
    path = write_lidc_pickle(tmp_path / ("d.pickle" if parts == 1 else "parts"), entries, parts)
    loaded = data.load(f"lidc:{path}")
    assert isinstance(loaded, AnnotatedImages)
    assert loaded.images.shape == (7, 16, 16, 1) and loaded.annotations.shape == (7, 4, 16, 16)
    for i, key in enumerate(sorted(entries)):
        assert loaded.ids[i] == key
        np.testing.assert_array_equal(loaded.annotations[i], np.stack(entries[key]["masks"]))
        assert loaded.groups[i] == entries[key]["series_uid"]


def test_image_folder_with_several_masks(tmp_path, rng):
    images, masks, truth = write_image_folder(tmp_path, rng, num_images=4, k=3)
    loaded = data.load(f"folder:{images}:{masks}")
    assert loaded.annotations.shape == (4, 3, 16, 16)
    for i, stem in enumerate(loaded.ids):
        np.testing.assert_array_equal(loaded.annotations[i], np.stack(truth[stem]))


# --- split -----------------------------------------------------------------------------------
def test_split_keeps_each_series_in_one_part_and_is_seeded(tmp_path, rng):
    series = tuple(f"s{j}" for j in range(10))
    entries = fake_lidc_entries(rng, n=40, size=8, series=series)
    loaded = data.load(f"lidc:{write_lidc_pickle(tmp_path / 'd.pickle', entries)}")
    parts = data.split_data(loaded, seed=5)
    assert sum(len(p) for p in parts) == 40
    groups = [set(p.groups) for p in parts]
    assert not (groups[0] & groups[1] or groups[0] & groups[2] or groups[1] & groups[2])
    assert [len(p) for p in parts] == [24, 8, 8]  # 60/20/20 of 10 series of 4 crops
    again = data.split_data(loaded, seed=5)
    assert all(a.ids == b.ids for a, b in zip(parts, again, strict=True))
    other = data.split_data(loaded, seed=6)
    assert any(a.ids != b.ids for a, b in zip(parts, other, strict=True))


def test_builtin_split_is_the_benchmarks_own():
    shapes = data.load("builtin", num_images=20, image_size=16, seed=2)
    for a, b in zip(data.split_data(shapes, seed=2), shapes.train_val_test(), strict=True):
        np.testing.assert_array_equal(a.indices, b.indices)


def test_split_errors():
    shapes = data.load("builtin", num_images=3, image_size=16)
    with pytest.raises(ValueError, match="of 3 images leaves val empty"):
        data.split_data(shapes)
    with pytest.raises(ValueError, match="train, val and test"):
        data.split_data(shapes, fractions=(0.5, 0.5))
    with pytest.raises(ValueError, match="sum to 1"):
        data.split_data(shapes, fractions=(0.5, 0.5, 0.5))


def test_split_record_round_trip_and_changed_data(tmp_path, rng):
    entries = fake_lidc_entries(rng, n=10, size=8, series=tuple("abcde"))
    spec = f"lidc:{write_lidc_pickle(tmp_path / 'd.pickle', entries)}"
    loaded = data.load(spec)
    parts = data.split_data(loaded, seed=1)
    record = json.loads(json.dumps(data.split_record(spec, parts, (0.6, 0.2, 0.2), 1)))
    assert record["data"] == spec and record["seed"] == 1
    for name, part in zip(data.SPLIT_PARTS, parts, strict=True):
        again = data.select_split(data.load(spec), record, name)
        assert again.ids == part.ids
        np.testing.assert_array_equal(again.images, part.images)
    shrunk = data.load(spec, max_images=3)
    with pytest.raises(ValueError, match="data changed since the split was recorded"):
        data.select_split(shrunk, record, "test")
    with pytest.raises(ValueError, match="`part` must be one of"):
        data.select_split(loaded, record, "holdout")
    builtin = data.load("builtin", num_images=10, image_size=16)
    rec = data.split_record("builtin", data.split_data(builtin), (0.8, 0.1, 0.1), 0)
    assert data.select_split(builtin, rec, "test").indices.tolist() == rec["ids"]["test"]
