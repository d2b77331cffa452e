"""`tfp_seg._io`: the one atomic, durable write policy."""

import json
import os

import numpy as np
import pytest

from tfp_seg import _io


def _leftovers(folder):
    return [p for p in os.listdir(folder) if ".tmp" in p]


def test_write_bytes_text_json(tmp_path):
    _io.atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    _io.atomic_write_text(str(tmp_path / "b.md"), "héllo\n")
    assert (tmp_path / "b.md").read_text(encoding="utf-8") == "héllo\n"
    _io.atomic_write_json(tmp_path / "c.json", {"b": 1, "a": [1.5, None]})
    text = (tmp_path / "c.json").read_text()
    assert json.loads(text) == {"a": [1.5, None], "b": 1}
    assert text == json.dumps({"a": [1.5, None], "b": 1}, indent=2, sort_keys=True) + "\n"
    _io.atomic_write_json(tmp_path / "c.json", {"z": 0}, indent=None)  # replaces; kwargs pass
    assert (tmp_path / "c.json").read_text() == '{"z": 0}\n'
    assert _leftovers(tmp_path) == []


def test_atomic_path_keeps_the_suffix_and_replaces(tmp_path):
    target = tmp_path / "model.keras"
    target.write_text("old")
    with _io.atomic_path(target) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)  # same folder: os.replace is a rename
        assert os.path.basename(tmp).startswith("model.tmp-") and tmp.endswith(".keras")
        assert os.path.isfile(tmp) and target.read_text() == "old"  # old file until the end
        with open(tmp, "w") as f:
            f.write("new")
    assert target.read_text() == "new"
    with _io.atomic_path(tmp_path / "x.weights.h5") as tmp:  # compound suffixes stay whole
        assert tmp.endswith(".weights.h5") and ".tmp-" in tmp
    with _io.atomic_path(tmp_path / ".hidden") as tmp:
        assert os.path.basename(tmp).startswith(".hidden.tmp-")
    assert _leftovers(tmp_path) == []


def test_atomic_path_with_a_path_writer(tmp_path):
    out = tmp_path / "s.npz"
    with _io.atomic_path(out) as tmp:
        np.savez_compressed(tmp, a=np.arange(3))  # numpy picks the format from the suffix
    with np.load(out) as f:
        np.testing.assert_array_equal(f["a"], np.arange(3))
    assert sorted(os.listdir(tmp_path)) == ["s.npz"]


def test_an_error_leaves_the_old_file_and_no_temp_file(tmp_path):
    target = tmp_path / "report.json"
    target.write_text('{"old": true}')
    with pytest.raises(RuntimeError, match="writer failed"):
        with _io.atomic_path(target) as tmp:
            with open(tmp, "w") as f:
                f.write('{"half')
            raise RuntimeError("writer failed")
    assert target.read_text() == '{"old": true}'
    with pytest.raises(TypeError):  # not serialisable: nothing written
        _io.atomic_write_json(target, {"x": object()})
    assert target.read_text() == '{"old": true}'
    with pytest.raises(KeyboardInterrupt):  # an interrupt too
        with _io.atomic_path(tmp_path / "new.txt"):
            raise KeyboardInterrupt
    assert not (tmp_path / "new.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["report.json"]


def test_atomic_dir(tmp_path):
    target = tmp_path / "ensemble"
    with _io.atomic_dir(target) as tmp:
        assert os.path.isdir(tmp) and ".tmp-" in tmp
        open(os.path.join(tmp, "a.txt"), "w").close()
    assert os.listdir(target) == ["a.txt"]
    with _io.atomic_dir(target) as tmp:  # replaces the old folder
        os.makedirs(os.path.join(tmp, "sub"))
        with open(os.path.join(tmp, "sub", "b.txt"), "w") as f:
            f.write("b")
    assert os.listdir(target) == ["sub"] and (target / "sub" / "b.txt").read_text() == "b"
    with pytest.raises(RuntimeError):
        with _io.atomic_dir(target) as tmp:
            with open(os.path.join(tmp, "c.txt"), "w") as f:
                f.write("c")
            raise RuntimeError("half-written")
    assert os.listdir(target) == ["sub"]
    assert sorted(os.listdir(tmp_path)) == ["ensemble"]


def test_missing_folder_is_an_oserror(tmp_path):
    with pytest.raises(FileNotFoundError):
        _io.atomic_write_text(tmp_path / "no" / "such" / "file.txt", "x")
    assert not (tmp_path / "no").exists()
