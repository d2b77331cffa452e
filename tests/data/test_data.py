"""Tests for `tfp_seg.data.ambiguous_shapes`: exact mode distribution, sampling, tf.data."""

import numpy as np
import pytest

from tfp_seg.data import AmbiguousShapes, ambiguous_shapes, sample_annotations

SIZE = 32


@pytest.fixture(scope="module")
def data():
    return ambiguous_shapes(num_images=256, image_size=SIZE, num_annotations=4, seed=0)


@pytest.fixture(scope="module")
def small():
    return ambiguous_shapes(num_images=12, image_size=SIZE, num_annotations=3, seed=7)


def _fields(d):
    return (
        d.images,
        d.annotations,
        d.annotation_modes,
        d.mode_weights,
        d.num_modes,
        d.object_labels,
        d.object_weights,
    )


def _mode_index(modes, labels):
    """Index of the mode equal to each label map (all modes are distinct)."""
    eq = np.all(labels[:, None] == modes[None], axis=(2, 3))  # [K, M]
    assert np.all(eq.sum(1) == 1), "every annotation must equal exactly one mode"
    return eq.argmax(1)


def _object_mask(d, i, o):
    """The object's largest mode mask (its extent in the labels)."""
    return np.any(d.object_labels[i, o] > 0, axis=0)


# --- Determinism, shapes, weights --------------------------------------------------------------


def test_same_seed_same_data_different_seed_different():
    a = ambiguous_shapes(num_images=16, image_size=SIZE, seed=3)
    b = ambiguous_shapes(num_images=16, image_size=SIZE, seed=3)
    c = ambiguous_shapes(num_images=16, image_size=SIZE, seed=4)
    for x, y in zip(_fields(a), _fields(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.objects == b.objects
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.object_labels, c.object_labels)


def test_shapes_and_dtypes():
    d = ambiguous_shapes(
        num_images=10, image_size=48, num_annotations=5, max_objects=2, channels=3, seed=1
    )
    n, k, h, mmax = 10, 5, 48, d.max_modes
    assert isinstance(d, AmbiguousShapes) and len(d) == n
    assert repr(d).startswith("AmbiguousShapes(num_images=10, image_size=48")
    assert d.num_classes == 3 and d.image_size == h and d.seed == 1 and d.num_annotations == k
    assert d.images.shape == (n, h, h, 3) and d.images.dtype == np.float32
    assert d.annotations.shape == (n, k, h, h) and d.annotations.dtype == np.int32
    assert d.annotation_modes.shape == (n, k) and d.annotation_modes.dtype == np.int32
    assert d.mode_weights.shape == (n, mmax) and d.mode_weights.dtype == np.float32
    assert d.num_modes.shape == (n,) and d.num_modes.dtype == np.int32
    assert mmax == d.num_modes.max() <= 9
    assert d.modes.shape == (n, mmax, h, h) and d.modes.dtype == np.int32
    assert d.marginals().shape == (n, h, h, 3) and d.marginals().dtype == np.float32
    assert d.object_labels.shape == (n, 2, 3, h, h)
    assert d.object_weights.shape == (n, 2, 3)
    modes, w = d.modes_of(0)
    assert modes.shape == (d.num_modes[0], h, h) and w.shape == (d.num_modes[0],)
    assert -0.01 < d.images.min() and d.images.max() < 1.01
    # Channels share the clean render and differ only by noise.
    assert not np.array_equal(d.images[..., 0], d.images[..., 1])
    assert np.abs(d.images[..., 0] - d.images[..., 1]).mean() < 0.1


def test_mode_weights_valid(data):
    w, m = data.mode_weights, data.num_modes
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    assert np.all(m >= 1) and np.all(m <= 27)
    pad = np.arange(data.max_modes)[None] >= m[:, None]
    assert np.all(w[pad] == 0) and np.all(w[~pad] > 0)
    assert np.all(data.modes[pad] == 0)
    # num_modes is the product of the objects' mode counts; weights the product of theirs.
    for i in range(20):
        counts = [len(o.mode_weights) for o in data.objects[i]]
        assert m[i] == np.prod(counts)
        ref = np.array([1.0])
        for o in data.objects[i]:
            ref = np.outer(ref, o.mode_weights).ravel()
        np.testing.assert_allclose(w[i, : m[i]], ref, rtol=1e-5)


def test_modes_distinct_and_annotations_are_modes(data):
    for i in range(40):
        modes, w = data.modes_of(i)
        np.testing.assert_array_equal(modes, data.modes[i, : len(w)])
        np.testing.assert_array_equal(w, data.mode_weights[i, : len(w)])
        flat = modes.reshape(len(w), -1)
        assert len(np.unique(flat, axis=0)) == len(w), f"image {i} has duplicate modes"
        idx = _mode_index(modes, data.annotations[i])
        np.testing.assert_array_equal(idx, data.annotation_modes[i])
    assert set(np.unique(data.annotations)) <= {0, 1, 2}


def test_marginals_equal_loop_over_modes(data):
    marg = data.marginals()
    for i in range(0, 256, 9):
        modes, w = data.modes_of(i)
        ref = np.zeros((SIZE, SIZE, 3))
        for mode, wk in zip(modes, w, strict=True):
            ref += wk * np.eye(3)[mode]
        np.testing.assert_allclose(marg[i], ref, atol=1e-6)
    np.testing.assert_allclose(marg.sum(-1), 1.0, atol=1e-6)
    assert marg.min() >= 0


# --- Statistics of the sampled annotations ---------------------------------------------------


def test_sample_annotations_frequencies_match_weights(data):
    i = int(np.argmax(data.num_modes))
    modes, w = data.modes_of(i)
    n = 4000
    draws = sample_annotations(modes, w, n, np.random.default_rng(123))
    assert draws.shape == (n, SIZE, SIZE) and draws.dtype == modes.dtype
    freq = np.bincount(_mode_index(modes, draws), minlength=len(w)) / n
    tol = 4 * np.sqrt(w * (1 - w) / n)
    assert np.all(np.abs(freq - w) <= tol), (freq, w)


def test_generated_annotations_follow_weights():
    n = 3000
    d = ambiguous_shapes(num_images=3, image_size=SIZE, num_annotations=n, seed=11)
    for i in range(3):
        w = d.mode_weights[i, : d.num_modes[i]].astype(np.float64)
        freq = np.bincount(d.annotation_modes[i], minlength=len(w)) / n
        tol = 4 * np.sqrt(w * (1 - w) / n) + 1e-12
        assert np.all(np.abs(freq - w) <= tol), (i, freq, w)


def test_sample_annotations_rejects_bad_input():
    modes = np.zeros((2, 4, 4), np.int32)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="weights"):
        sample_annotations(modes, [0.5, 0.2], 3, rng)
    with pytest.raises(ValueError, match="weights"):
        sample_annotations(modes, [1.0], 3, rng)
    with pytest.raises(ValueError, match="modes"):
        sample_annotations(modes[0], [1.0], 3, rng)
    with pytest.raises(ValueError, match="k must"):
        sample_annotations(modes, [0.5, 0.5], 0, rng)


# --- The distribution is visible in the image ------------------------------------------------


def test_every_type_occurs_with_documented_weights(data):
    objs = [o for image in data.objects for o in image]
    kinds = {o.kind for o in objs}
    assert kinds == {"boundary", "faint", "class"}
    for o in objs:
        if o.kind == "boundary":
            assert o.mode_names == ("under", "normal", "over")
            assert o.mode_weights == (0.25, 0.5, 0.25)
        elif o.kind == "faint":
            p = o.mode_weights[0]
            assert 0.2 <= p <= 0.8 and o.mode_weights[1] == pytest.approx(1 - p)
            assert p == pytest.approx(0.2 + 0.6 * (o.contrast - 0.1) / 0.2)
        else:
            expected = {"stripes_v": (0.5, 0.5), "stripes_h": (0.3, 0.7)}[o.texture]
            assert o.mode_weights == expected
    assert {o.texture for o in objs if o.kind == "class"} == {"stripes_v", "stripes_h"}


def test_marginals_partly_ambiguous(data):
    marg = data.marginals()
    ambiguous = marg.max(-1) < 1 - 1e-6
    frac = ambiguous.mean()
    assert 0.005 < frac < 0.5, frac
    # Every image has some ambiguous pixels (each object is ambiguous) and some certain ones.
    assert np.all(ambiguous.any(axis=(1, 2))) and np.all((~ambiguous).any(axis=(1, 2)))


def test_faint_present_probability_visible_as_intensity(data):
    p, level = [], []
    for i, image in enumerate(data.objects):
        for o, obj in enumerate(image):
            if obj.kind == "faint":
                mask = _object_mask(data, i, o)
                p.append(obj.mode_weights[0])
                level.append(data.images[i, ..., 0][mask].mean())
    p, level = np.array(p), np.array(level)
    assert len(p) > 30
    assert np.corrcoef(p, level)[0, 1] > 0.9
    order = np.argsort(p)
    low, high = level[order[: len(p) // 3]], level[order[-(len(p) // 3) :]]
    assert high.mean() > low.mean() + 0.05
    # Faint objects are clearly darker than the other (high contrast) objects.
    other = [
        data.images[i, ..., 0][_object_mask(data, i, o)].mean()
        for i, image in enumerate(data.objects)
        for o, obj in enumerate(image)
        if obj.kind == "boundary"
    ]
    assert level.max() < np.mean(other)


def test_class_texture_orientation_visible():
    d = ambiguous_shapes(num_images=64, image_size=64, seed=2, noise_std=0.0)
    seen = set()
    for i, image in enumerate(d.objects):
        for o, obj in enumerate(image):
            if obj.kind != "class":
                continue
            mask = _object_mask(d, i, o)
            img = d.images[i, ..., 0]
            dx = np.abs(np.diff(img, axis=1))[mask[:, 1:] & mask[:, :-1]].mean()
            dy = np.abs(np.diff(img, axis=0))[mask[1:] & mask[:-1]].mean()
            # Vertical stripes vary along x, horizontal stripes along y.
            assert (dx > dy) == (obj.texture == "stripes_v"), (i, o, obj.texture, dx, dy)
            seen.add(obj.texture)
    assert seen == {"stripes_v", "stripes_h"}


# --- Subsets -----------------------------------------------------------------------------------


def test_slicing_and_split(data):
    part = data[10:20]
    assert isinstance(part, AmbiguousShapes) and len(part) == 10
    np.testing.assert_array_equal(part.images, data.images[10:20])
    np.testing.assert_array_equal(part.indices, np.arange(10, 20))
    np.testing.assert_array_equal(part.modes, data.modes[10:20])
    np.testing.assert_allclose(part.marginals(), data.marginals()[10:20])
    assert part.objects == data.objects[10:20]
    with pytest.raises(TypeError):
        data[3]

    train, val, test = data.split((0.8, 0.1, 0.1))
    assert (len(train), len(val), len(test)) == (205, 26, 25)
    ids = [set(s.indices.tolist()) for s in (train, val, test)]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert set.union(*ids) == set(range(256))
    for s in (train, val, test):
        np.testing.assert_array_equal(s.annotations, data.annotations[s.indices])
        np.testing.assert_array_equal(s.mode_weights, data.mode_weights[s.indices])
    again = data.train_val_test()
    for a, b in zip((train, val, test), again, strict=True):
        np.testing.assert_array_equal(a.indices, b.indices)
    other = data.split((0.8, 0.1, 0.1), seed=99)
    assert not np.array_equal(other[0].indices, train.indices)
    with pytest.raises(ValueError, match="fractions"):
        data.split((0.5, 0.2))
    with pytest.raises(ValueError, match="fractions"):
        data.split((1.2, -0.2))


# --- tf.data -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "annotation, label_shape, label_dtype",
    [
        ("random", (SIZE, SIZE), "int32"),
        ("first", (SIZE, SIZE), "int32"),
        ("all", (3, SIZE, SIZE), "int32"),
        ("marginal", (SIZE, SIZE, 3), "float32"),
    ],
)
def test_to_dataset_shapes(small, annotation, label_shape, label_dtype):
    ds = small.to_dataset(batch_size=5, shuffle=False, annotation=annotation)
    batches = list(ds.as_numpy_iterator())
    assert [len(x) for x, _ in batches] == [5, 5, 2]
    images = np.concatenate([x for x, _ in batches])
    labels = np.concatenate([y for _, y in batches])
    assert images.dtype == np.float32 and images.shape == (12, SIZE, SIZE, 1)
    assert labels.dtype == np.dtype(label_dtype) and labels.shape == (12,) + label_shape
    np.testing.assert_array_equal(images, small.images)
    if annotation == "first":
        np.testing.assert_array_equal(labels, small.annotations[:, 0])
    elif annotation == "all":
        np.testing.assert_array_equal(labels, small.annotations)
    elif annotation == "marginal":
        np.testing.assert_allclose(labels, small.marginals())
    else:  # each label is one of that image's annotations
        for i in range(12):
            assert np.any(np.all(small.annotations[i] == labels[i], axis=(1, 2)))


def _epoch_choices(d, ds):
    """Index (into each image's annotations) of the label drawn, per epoch, in image order."""
    out = []
    for x, y in ds.as_numpy_iterator():
        for image, label in zip(x, y, strict=True):
            i = int(np.argmin(np.abs(d.images - image).sum(axis=(1, 2, 3))))
            out.append((i, int(np.argmax(np.all(d.annotations[i] == label, axis=(1, 2))))))
    return [k for _, k in sorted(out)]


def test_to_dataset_random_annotation_changes_per_epoch(small):
    # The drawn label is identified by the first annotation equal to it (deterministic).
    ds = small.to_dataset(batch_size=4, shuffle=True, annotation="random", seed=5)
    first, second = _epoch_choices(small, ds), _epoch_choices(small, ds)
    assert len(first) == 12
    assert first != second
    rebuilt = small.to_dataset(batch_size=4, shuffle=True, annotation="random", seed=5)
    assert _epoch_choices(small, rebuilt) == first
    # Shuffling reorders images between epochs.
    order = [
        [int(np.argmin(np.abs(small.images - im).sum(axis=(1, 2, 3)))) for im in x]
        for x, _ in ds.as_numpy_iterator()
    ]
    assert sorted(sum(order, [])) == list(range(12))
    assert sum(order, []) != list(range(12))


def test_to_dataset_repeat_and_bad_arguments(small):
    ds = small.to_dataset(batch_size=5, repeat=True, drop_remainder=True)
    assert len(list(ds.take(7).as_numpy_iterator())) == 7
    with pytest.raises(ValueError, match="annotation"):
        small.to_dataset(annotation="mean")
    with pytest.raises(ValueError, match="batch_size"):
        small.to_dataset(batch_size=0)


# --- Argument checks ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"image_size": 15}, "image_size"),
        ({"image_size": 32.0}, "image_size"),
        ({"num_annotations": 0}, "num_annotations"),
        ({"num_images": 0}, "num_images"),
        ({"max_objects": 0}, "max_objects"),
        ({"max_objects": 5}, "max_objects"),
        ({"channels": 0}, "channels"),
        ({"noise_std": -0.1}, "noise_std"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_arguments_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ambiguous_shapes(**{"num_images": 2, **kwargs})
