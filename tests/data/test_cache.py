"""Tests for `tfp_seg.data.cache`: the decode cache is reused without decoding again, decoded
again when a source file changes, never trusted when partial or corrupt, and its errors name
the folder or file."""

import json
import os
import pickle

import numpy as np
import pytest

from tests.helpers import fake_lidc_entries, write_image_folder, write_lidc_pickle
from tfp_seg import data
from tfp_seg.data import cache, decode

SERIES = tuple(f"series-{j}" for j in range(4))


@pytest.fixture
def parts(tmp_path, rng):
    entries = fake_lidc_entries(rng, n=9, size=8, series=SERIES)
    return write_lidc_pickle(tmp_path / "parts", entries, parts=3), entries


def _load(path, cache_dir, **options):
    return data.load(f"lidc:{path}", stream=True, cache_dir=str(cache_dir), **options)


def _count_decodes(monkeypatch) -> list:
    calls = []
    original = decode.decode_lidc

    def counting(*args, **kwargs):
        calls.append(args[1])
        return original(*args, **kwargs)

    monkeypatch.setattr(decode, "decode_lidc", counting)
    return calls


def test_the_cache_is_reused_without_a_second_decode(parts, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    first = _load(parts[0], tmp_path / "c")
    images_file = os.path.join(first.cache, "images.npy")
    stamp = os.stat(images_file).st_mtime_ns
    second = _load(parts[0], tmp_path / "c")
    assert (first.cache_status, second.cache_status) == ("decoded", "reused")
    assert len(calls) == 1 and second.cache == first.cache
    assert os.stat(images_file).st_mtime_ns == stamp  # not written again
    np.testing.assert_array_equal(np.asarray(second.images), np.asarray(first.images))
    # max_images is a view of the same cache, as load_lidc_crops(max_images=...) selects
    few = _load(parts[0], tmp_path / "c", max_images=4)
    assert few.cache_status == "reused" and len(calls) == 1
    expected = data.load(f"lidc:{parts[0]}", stream=False, max_images=4)
    assert few.ids == expected.ids
    np.testing.assert_array_equal(np.asarray(few.annotations), expected.annotations)


def test_a_changed_source_file_is_decoded_again(parts, tmp_path, monkeypatch):
    calls = _count_decodes(monkeypatch)
    old = _load(parts[0], tmp_path / "c")
    path = os.path.join(parts[0], "part_1.pickle")
    with open(path, "rb") as f:
        content = pickle.load(f)
    key = sorted(content)[0]
    content[key]["image"] = np.zeros_like(content[key]["image"])
    with open(path, "wb") as f:
        pickle.dump(content, f)
    new = _load(parts[0], tmp_path / "c")
    assert new.cache_status == "decoded" and len(calls) == 2 and new.cache != old.cache
    assert not os.path.exists(old.cache)  # the stale version is deleted
    position = new.ids.index(key)
    assert not np.asarray(new.images[position]).any()
    np.testing.assert_array_equal(
        np.asarray(new.images), data.load(f"lidc:{parts[0]}", stream=False).images
    )


def _truncate(folder):
    path = os.path.join(folder, "images.npy")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)


def _garble_meta(folder):
    with open(os.path.join(folder, "meta.json"), "w") as f:
        f.write('{"format": 1, "finger')


def _drop_meta(folder):
    os.remove(os.path.join(folder, "meta.json"))


def _garble_ids(folder):
    with open(os.path.join(folder, "ids.json"), "r+b") as f:
        f.write(b"[")


def _wrong_shape(folder):
    meta_path = os.path.join(folder, "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    np.save(os.path.join(folder, "annotations.npy"), np.zeros((2, 4, 8, 8), np.uint8))
    with open(meta_path, "w") as f:
        json.dump(meta, f)


@pytest.mark.parametrize(
    "damage, why",
    [
        (_truncate, "images.npy"),
        (_garble_meta, "meta.json is missing or unreadable"),
        (_drop_meta, "meta.json is missing or unreadable"),
        (_wrong_shape, "annotations.npy is |u1 [2, 4, 8, 8]"),
        (_garble_ids, "ids.json is not the file meta.json describes"),
    ],
)
def test_a_corrupt_or_partial_cache_is_detected_and_rebuilt(parts, tmp_path, damage, why):
    good = _load(parts[0], tmp_path / "c")
    damage(good.cache)
    again = _load(parts[0], tmp_path / "c")
    assert again.cache_status.startswith("rebuilt: ") and why in again.cache_status
    assert again.cache == good.cache
    np.testing.assert_array_equal(
        np.asarray(again.images), data.load(f"lidc:{parts[0]}", stream=False).images
    )
    assert _load(parts[0], tmp_path / "c").cache_status == "reused"


def test_an_interrupted_decode_leaves_nothing_that_is_trusted(parts, tmp_path, monkeypatch):
    from tfp_seg.data import lidc

    original, seen = lidc.decode_entry, []

    def interrupt_at_the_fifth(key, entry):
        seen.append(key)
        if len(seen) == 5:
            raise KeyboardInterrupt
        return original(key, entry)

    monkeypatch.setattr(lidc, "decode_entry", interrupt_at_the_fifth)
    with pytest.raises(KeyboardInterrupt):
        _load(parts[0], tmp_path / "c")
    (source_dir,) = (tmp_path / "c").iterdir()
    assert list(source_dir.iterdir()) == []  # the temporary folder was removed
    # a leftover of a killed process (its pid is gone) is removed by the next decode
    leftover = source_dir / "0123.tmp-deadbeef"
    leftover.mkdir()
    (leftover / "owner.json").write_text(
        json.dumps({"host": os.uname().nodename, "pid": 2**22 + 7})
    )
    monkeypatch.setattr(lidc, "decode_entry", original)
    loaded = _load(parts[0], tmp_path / "c")
    assert loaded.cache_status == "decoded" and not leftover.exists()
    assert [p.name for p in source_dir.iterdir()] == [os.path.basename(loaded.cache)]


def test_an_unwritable_cache_dir_is_named(parts, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match=r"cannot write the data cache in .*a-file.*cache_dir"):
        _load(parts[0], blocker)
    with pytest.raises(ValueError, match="`cache_dir` must be a folder path"):
        data.load(f"lidc:{parts[0]}", stream=True, cache_dir="")


def test_bad_files_are_named_and_leave_no_cache(tmp_path, rng, parts):
    broken = tmp_path / "broken"
    write_lidc_pickle(broken, fake_lidc_entries(rng, n=4, size=8), parts=2)
    (broken / "part_1.pickle").write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match=r"could not read pickle .*part_1\.pickle"):
        _load(broken, tmp_path / "c")
    images, masks, _ = write_image_folder(tmp_path / "folder", rng, num_images=3, k=2, size=8)
    with open(os.path.join(images, "case2.png"), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"could not read image .*case2\.png"):
        data.load(f"folder:{images}:{masks}", stream=True, cache_dir=str(tmp_path / "c"))
    leftovers = [p for source in (tmp_path / "c").iterdir() for p in source.iterdir()]
    assert leftovers == []


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv(cache.CACHE_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == str(tmp_path / "xdg" / "tfp_seg")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "env"))
    assert cache.cache_root() == str(tmp_path / "env")
    assert cache.cache_root(str(tmp_path / "arg")) == str(tmp_path / "arg")
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache.cache_root() == os.path.join(os.path.expanduser("~"), ".cache", "tfp_seg")


def test_npy_appender_writes_an_ordinary_npy_file(tmp_path, rng):
    rows = rng.normal(size=(5, 3, 2)).astype(np.float32)
    appender = cache.NpyAppender(str(tmp_path / "a.npy"), (3, 2), np.float32)
    appender.append(rows[0])
    appender.append(rows[1:])
    with pytest.raises(ValueError, match=r"a\.npy: rows of shape \(3, 2\) expected"):
        appender.append(rows[:, :2])
    appender.close()
    loaded = np.load(tmp_path / "a.npy", mmap_mode="r")
    assert loaded.offset == cache.NpyAppender.HEADER_BYTES
    np.testing.assert_array_equal(loaded, rows)
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), rows)


def test_a_full_disk_names_the_cache_file_and_leaves_nothing(parts, tmp_path, monkeypatch):
    def full(self, rows):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache.NpyAppender, "append", full)
    with pytest.raises(OSError, match="No space left on device"):
        _load(parts[0], tmp_path / "c")
    monkeypatch.undo()
    appender = cache.NpyAppender(str(tmp_path / "x.npy"), (2,), np.uint8)
    appender._file.close()
    appender._file = open(os.devnull, "rb")  # writes fail
    with pytest.raises(OSError, match=r"cannot write the data cache file .*x\.npy"):
        appender.append(np.zeros(2, np.uint8))
    appender._file.close()
    (source_dir,) = (tmp_path / "c").iterdir()
    assert list(source_dir.iterdir()) == []
