"""Tests for `tfp_seg.data.disk`: `MappedArray` views and `DiskAnnotatedImages`, which must give
exactly what the in-memory `AnnotatedImages` of the same source gives (arrays, ids, groups,
splits, and the same `to_dataset` batches for the same seed)."""

import numpy as np
import pytest

from tests.helpers import fake_lidc_entries, write_image_folder, write_lidc_pickle
from tfp_seg import data
from tfp_seg.data import DiskAnnotatedImages, MappedArray

SERIES = tuple(f"series-{j}" for j in range(6))


@pytest.fixture
def mapped(tmp_path):
    base = np.arange(7 * 3 * 2, dtype=np.float32).reshape(7, 3, 2)
    np.save(tmp_path / "base.npy", base)
    return base, np.load(tmp_path / "base.npy", mmap_mode="r")


def test_mapped_array_indexes_like_the_array_it_views(mapped):
    base, memmap = mapped
    rows = np.array([4, 0, 6, 5, 1])
    view, expected = MappedArray(memmap, rows), base[rows]
    assert view.shape == expected.shape and view.dtype == np.float32 and len(view) == 5
    assert view.nbytes == expected.nbytes and view.ndim == 3
    for key in (
        2,
        -1,
        slice(1, 4),
        slice(None, None, 2),
        [3, 0, 0],
        np.array([True, False] * 2 + [True]),
    ):
        np.testing.assert_array_equal(view[key], expected[key])
    np.testing.assert_array_equal(view[[2, 1], 0], expected[[2, 1], 0])
    np.testing.assert_array_equal(view[1:3, :, 1], expected[1:3, :, 1])
    np.testing.assert_array_equal(view[..., 1], expected[..., 1])
    np.testing.assert_array_equal(view[[0, 1], [2, 0]], expected[[0, 1], [2, 0]])
    np.testing.assert_array_equal(view[1:4, [2, 0]], expected[1:4, [2, 0]])
    np.testing.assert_array_equal(np.asarray(view), expected)
    np.testing.assert_array_equal(view.take([4, 2]).take(slice(1, None))[:], expected[[2]])
    np.testing.assert_array_equal(list(view), list(expected))  # iteration ends at the last row
    for bad in (5, -6):
        with pytest.raises(IndexError, match="out of range"):
            view[bad]
    with pytest.raises(IndexError, match="boolean index must have shape"):
        view[np.array([True, False])]
    with pytest.raises(ValueError, match=r"must lie in \[0, 7\)"):
        MappedArray(memmap, [0, 7])


def test_consecutive_rows_are_a_zero_copy_view_of_the_map(mapped):
    _, memmap = mapped
    whole, shuffled = MappedArray(memmap), MappedArray(memmap, [2, 3, 4, 0])
    for batch in (whole[2:5], shuffled[:3], np.asarray(whole)):
        assert np.shares_memory(batch, memmap) and not batch.flags.writeable
    assert not np.shares_memory(shuffled[[0, 3]], memmap)  # gathered rows are a copy


def _sources(tmp_path, rng):
    entries = fake_lidc_entries(rng, n=14, size=8, series=SERIES)
    single = write_lidc_pickle(tmp_path / "one.pickle", entries)
    parts = write_lidc_pickle(tmp_path / "parts", entries, parts=3)
    images, masks, _ = write_image_folder(tmp_path / "folder", rng, num_images=9, k=3, size=8)
    return {
        "lidc": f"lidc:{single}",
        "parts": f"lidc:{parts}",
        "folder": f"folder:{images}:{masks}",
    }


@pytest.fixture(params=["lidc", "parts", "folder"])
def both(request, tmp_path, rng):
    spec = _sources(tmp_path, rng)[request.param]
    streamed = data.load(spec, stream=True, cache_dir=str(tmp_path / "cache"))
    return streamed, data.load(spec, stream=False)


def _assert_same(streamed, in_memory):
    assert streamed.ids == in_memory.ids and streamed.groups == in_memory.groups
    assert (streamed.num_classes, streamed.class_names) == (
        in_memory.num_classes,
        in_memory.class_names,
    )
    np.testing.assert_array_equal(np.asarray(streamed.images), in_memory.images)
    np.testing.assert_array_equal(np.asarray(streamed.annotations), in_memory.annotations)


def test_a_streamed_source_holds_what_the_in_memory_load_holds(both):
    streamed, in_memory = both
    assert isinstance(streamed, DiskAnnotatedImages) and type(in_memory) is data.AnnotatedImages
    _assert_same(streamed, in_memory)
    assert (
        streamed.cache_status == "decoded" and "streamed from disk (stream=True)" in streamed.note
    )
    assert in_memory.note == "in memory (stream=False)"
    np.testing.assert_array_equal(streamed.marginals(), in_memory.marginals())
    _assert_same(streamed[[3, 1, 2]], in_memory[[3, 1, 2]])
    assert type(streamed.in_memory()) is data.AnnotatedImages
    _assert_same(streamed.in_memory(), in_memory)
    assert streamed.nbytes == in_memory.images.nbytes + in_memory.annotations.nbytes
    assert "DiskAnnotatedImages(num_images=" in repr(streamed)


def test_splits_of_a_streamed_source_are_the_same_lazy_views(both):
    streamed, in_memory = both
    parts = data.split_data(streamed, seed=3)
    for disk_part, memory_part in zip(parts, data.split_data(in_memory, seed=3), strict=True):
        _assert_same(disk_part, memory_part)
        assert isinstance(disk_part.images, MappedArray)
        assert disk_part.images.base is streamed.images.base  # a view: nothing was copied
    record = data.split_record("lidc:x", parts, (0.6, 0.2, 0.2), 3)
    for name, part in zip(data.SPLIT_PARTS, parts, strict=True):
        again = data.select_split(streamed, record, name)
        assert again.ids == part.ids and again.images.base is streamed.images.base


def _batches(dataset):
    return [tuple(np.asarray(t) for t in batch) for batch in dataset]


@pytest.mark.parametrize("annotation", ["random", "first", "all", "marginal"])
@pytest.mark.parametrize("augment", [False, True])
def test_to_dataset_streams_the_in_memory_batches(both, annotation, augment):
    streamed, in_memory = both
    train_disk = data.split_data(streamed, seed=1)[0]  # rows out of order: gathered reads
    train_memory = data.split_data(in_memory, seed=1)[0]
    kwargs = dict(batch_size=3, annotation=annotation, seed=5, augment=augment)
    disk_ds, memory_ds = train_disk.to_dataset(**kwargs), train_memory.to_dataset(**kwargs)
    assert int(disk_ds.cardinality()) == int(memory_ds.cardinality())
    for _ in range(2):  # every epoch: the same new order and draws
        expected = _batches(memory_ds)
        got = _batches(disk_ds)
        assert len(got) == len(expected)
        for (x, y), (ex, ey) in zip(got, expected, strict=True):
            assert x.dtype == ex.dtype and y.dtype == ey.dtype and y.shape == ey.shape
            np.testing.assert_array_equal(x, ex)
            np.testing.assert_array_equal(y, ey)


def test_repeated_unshuffled_and_dropped_remainder_streams(both):
    streamed, in_memory = both
    for kwargs in (
        dict(batch_size=4, repeat=True, seed=2),
        dict(batch_size=4, shuffle=False, drop_remainder=True, annotation="first"),
    ):
        disk_ds, memory_ds = streamed.to_dataset(**kwargs), in_memory.to_dataset(**kwargs)
        assert int(disk_ds.cardinality()) == int(memory_ds.cardinality())
        got, expected = _batches(disk_ds.take(7)), _batches(memory_ds.take(7))
        for a, b in zip(got, expected, strict=True):
            np.testing.assert_array_equal(a[0], b[0])
            np.testing.assert_array_equal(a[1], b[1])


def test_disk_sets_take_only_mapped_float_images_and_uint8_labels(mapped):
    _, memmap = mapped
    images = np.zeros((2, 4, 4, 1), np.float32)
    labels = MappedArray(np.zeros((2, 1, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="must be a MappedArray"):
        DiskAnnotatedImages(images=images, annotations=labels, ids=("a", "b"))
    with pytest.raises(ValueError, match="float32 images and uint8 annotations"):
        DiskAnnotatedImages(
            images=MappedArray(images),
            annotations=MappedArray(np.zeros((2, 1, 4, 4))),
            ids=("a", "b"),
        )
    with pytest.raises(ValueError, match="`ids` must name all 2 images"):
        DiskAnnotatedImages(images=MappedArray(images), annotations=labels, ids=("a",))


class _SeededLogits:
    """A sampler whose logits are a fixed function of the images and the seed."""

    def sample_logits(self, x, num_samples, seed=None, batch_size=None):
        x = np.asarray(x, np.float32)
        noise = np.random.default_rng(np.abs(np.asarray(seed, np.int64)).tolist()).normal(
            size=(num_samples, *x.shape[:3], 2)
        )
        return (noise + np.concatenate([x, -x], axis=-1)[None]).astype(np.float32)


def test_evaluation_reads_a_streamed_set_batch_by_batch(both, monkeypatch):
    from tfp_seg.evaluation import evaluate_annotations

    streamed, in_memory = both
    test = data.split_data(streamed, seed=0)[2]
    kwargs = dict(num_samples=4, sample_counts=(4,), seed=3, batch_size=2)
    expected = evaluate_annotations(
        _SeededLogits(), data.split_data(in_memory, seed=0)[2], **kwargs
    )

    def whole(self, *args, **kwargs):
        raise AssertionError("the whole MappedArray was read")

    monkeypatch.setattr(MappedArray, "__array__", whole)
    assert evaluate_annotations(_SeededLogits(), test, **kwargs) == expected


def test_a_streamed_dataset_is_a_seeded_stream_for_resumed_runs(both):
    # `tfp-seg train --resume` builds the dataset inside `Dataset.flat_map` (seeded_stream)
    from tfp_seg import distribute

    streamed, in_memory = both
    kwargs = dict(batch_size=4, seed=7, repeat=True, augment=True)
    disk = distribute.seeded_stream(lambda: streamed.to_dataset(**kwargs))
    memory = distribute.seeded_stream(lambda: in_memory.to_dataset(**kwargs))
    assert disk.cardinality() == memory.cardinality()
    skipped = distribute.skip_epochs(disk, 1, 2)
    got, expected = _batches(skipped.take(3)), _batches(memory.skip(2).take(3))
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a[0], b[0])
        np.testing.assert_array_equal(a[1], b[1])
