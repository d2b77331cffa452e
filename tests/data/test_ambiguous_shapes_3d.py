"""`tfp_seg.data.ambiguous_shapes(spatial_dims=3)`: the volume benchmark and its exact modes,
and that the default (2D) data are unchanged by the rank-generic rendering."""

import hashlib

import numpy as np
import pytest

from tfp_seg.data import AmbiguousShapes, ambiguous_shapes, sample_annotations

SIZE = 16  # volumes of 16^3 voxels
S = (SIZE, SIZE, SIZE)


@pytest.fixture(scope="module")
def volumes():
    return ambiguous_shapes(num_images=64, image_size=SIZE, num_annotations=3, spatial_dims=3)


@pytest.fixture(scope="module")
def roomy():
    """Volumes large enough to hold several objects (max_objects = 3)."""
    return ambiguous_shapes(num_images=12, image_size=32, num_annotations=2, spatial_dims=3, seed=4)


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
    """Index of the (distinct) mode equal to each label map; every label must equal one."""
    flat_modes = modes.reshape(len(modes), -1)
    flat = labels.reshape(len(labels), -1)
    eq = np.stack([np.all(flat == m[None], axis=1) for m in flat_modes], axis=1)  # [K, M]
    assert np.all(eq.sum(1) == 1), "every annotation must equal exactly one mode"
    return eq.argmax(1)


# --- Shapes and dtypes -------------------------------------------------------------------------


def test_shapes_and_dtypes():
    d = ambiguous_shapes(
        num_images=5, image_size=SIZE, num_annotations=3, max_objects=2, channels=2, seed=1,
        spatial_dims=3,
    )  # fmt: skip
    n, k, m = 5, 3, d.max_modes
    assert isinstance(d, AmbiguousShapes) and len(d) == n
    assert d.spatial_dims == 3 and d.spatial_shape == S and d.image_size == SIZE
    assert repr(d).startswith("AmbiguousShapes(num_images=5, image_size=16, spatial_dims=3")
    assert d.images.shape == (n, *S, 2) and d.images.dtype == np.float32
    assert d.annotations.shape == (n, k, *S) and d.annotations.dtype == np.int32
    assert d.annotation_modes.shape == (n, k) and d.annotation_modes.dtype == np.int32
    assert d.mode_weights.shape == (n, m) and d.mode_weights.dtype == np.float32
    assert d.num_modes.shape == (n,) and m == d.num_modes.max() <= 9
    assert d.object_labels.shape == (n, 2, 3, *S) and d.object_labels.dtype == np.int8
    assert d.object_weights.shape == (n, 2, 3)
    assert d.modes.shape == (n, m, *S) and d.modes.dtype == np.int32
    assert d.marginals().shape == (n, *S, 3) and d.marginals().dtype == np.float32
    modes, w = d.modes_of(0)
    assert modes.shape == (d.num_modes[0], *S) and w.shape == (d.num_modes[0],)
    assert -0.01 < d.images.min() and d.images.max() < 1.01
    # Channels share the clean render and differ only by noise.
    assert not np.array_equal(d.images[..., 0], d.images[..., 1])
    assert np.abs(d.images[..., 0] - d.images[..., 1]).mean() < 0.1
    # Objects have 3 coordinates inside the volume.
    for image in d.objects:
        for obj in image:
            assert len(obj.center) == 3 and all(0 < c < SIZE - 1 for c in obj.center)


def test_image_size_tuple_gives_a_box():
    d = ambiguous_shapes(num_images=3, image_size=(16, 24, 20), spatial_dims=3, seed=2)
    assert d.images.shape == (3, 16, 24, 20, 1) and d.annotations.shape == (3, 4, 16, 24, 20)
    assert d.spatial_shape == (16, 24, 20) and d.image_size == (16, 24, 20)
    assert d.modes.shape[2:] == (16, 24, 20) and d.marginals().shape == (3, 16, 24, 20, 3)
    flat = ambiguous_shapes(num_images=2, image_size=(16, 32), seed=2)  # also for images
    assert flat.images.shape == (2, 16, 32, 1) and flat.spatial_dims == 2


# --- The exact distribution --------------------------------------------------------------------


def test_mode_weights_are_the_products_of_the_objects_weights(volumes):
    w, m = volumes.mode_weights, volumes.num_modes
    assert np.all(w >= 0)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-6)
    pad = np.arange(volumes.max_modes)[None] >= m[:, None]
    assert np.all(w[pad] == 0) and np.all(w[~pad] > 0)
    assert np.all(volumes.modes[pad] == 0)
    for i in range(len(volumes)):
        counts = [len(o.mode_weights) for o in volumes.objects[i]]
        assert m[i] == np.prod(counts)
        ref = np.array([1.0])
        for o in volumes.objects[i]:
            ref = np.outer(ref, o.mode_weights).ravel()
        np.testing.assert_allclose(w[i, : m[i]], ref, rtol=1e-5)


def test_modes_distinct_and_annotations_are_modes(volumes, roomy):
    for d in (volumes, roomy):
        for i in range(len(d)):
            modes, w = d.modes_of(i)
            np.testing.assert_allclose(w.sum(), 1.0, atol=1e-6)
            np.testing.assert_array_equal(modes, d.modes[i, : len(w)])
            np.testing.assert_array_equal(w, d.mode_weights[i, : len(w)])
            assert len(np.unique(modes.reshape(len(w), -1), axis=0)) == len(w)
            idx = _mode_index(modes, d.annotations[i])
            np.testing.assert_array_equal(idx, d.annotation_modes[i])
        assert set(np.unique(d.annotations)) <= {0, 1, 2}
    assert roomy.num_modes.max() > 9  # several objects: products of their modes


def test_marginals_equal_weighted_mean_of_the_modes_one_hot(volumes, roomy):
    for d in (volumes, roomy):
        marg = d.marginals()
        for i in range(0, len(d), 3):
            modes, w = d.modes_of(i)
            ref = np.einsum("m,m...c->...c", w.astype(np.float64), np.eye(3)[modes])
            np.testing.assert_allclose(marg[i], ref, atol=1e-6)
        np.testing.assert_allclose(marg.sum(-1), 1.0, atol=1e-6)
        assert marg.min() >= 0
        ambiguous = marg.max(-1) < 1 - 1e-6
        # Every volume has ambiguous voxels (each object is ambiguous) and certain ones.
        assert np.all(ambiguous.any(axis=(1, 2, 3))) and np.all((~ambiguous).any(axis=(1, 2, 3)))


# --- Statistics of the sampled annotations ---------------------------------------------------


def test_sample_annotations_frequencies_match_weights(roomy):
    i = int(np.argmax(roomy.num_modes))
    modes, w = roomy.modes_of(i)
    n = 3000
    draws = sample_annotations(modes.astype(np.int8), w, n, np.random.default_rng(123))
    assert draws.shape == (n, 32, 32, 32) and draws.dtype == np.int8
    freq = np.bincount(_mode_index(modes, draws), minlength=len(w)) / n
    tol = 5 * np.sqrt(w * (1 - w) / n)  # 5 binomial standard errors
    assert np.all(np.abs(freq - w) <= tol), (freq, w)


def test_generated_annotations_follow_weights():
    n = 400
    d = ambiguous_shapes(
        num_images=4, image_size=SIZE, num_annotations=n, spatial_dims=3, seed=11, max_objects=1
    )
    assert set(d.num_modes) >= {2, 3}  # some boundary and some faint / class objects
    for i in range(4):
        w = d.mode_weights[i, : d.num_modes[i]].astype(np.float64)
        modes, _ = d.modes_of(i)
        idx = _mode_index(modes, d.annotations[i])
        np.testing.assert_array_equal(idx, d.annotation_modes[i])
        freq = np.bincount(idx, minlength=len(w)) / n
        tol = 5 * np.sqrt(w * (1 - w) / n)
        assert np.all(np.abs(freq - w) <= tol), (i, freq, w)


# --- The three kinds of ambiguity --------------------------------------------------------------


def test_every_kind_and_shape_occurs_with_documented_weights(volumes, roomy):
    objs = [o for d in (volumes, roomy) for image in d.objects for o in image]
    assert {o.kind for o in objs} == {"boundary", "faint", "class"}
    assert {o.shape for o in objs} == {"ball", "ellipsoid", "cube"}
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


def test_object_modes_are_the_three_ambiguities(volumes):
    for i, image in enumerate(volumes.objects):
        for o, obj in enumerate(image):
            labels = volumes.object_labels[i, o]  # [3, D, H, W]
            if obj.kind == "boundary":  # nested thresholds: under < normal < over
                under, normal, over = (labels[j] > 0 for j in range(3))
                assert 0 < under.sum() < normal.sum() < over.sum()
                assert np.all(normal[under]) and np.all(over[normal])
                assert set(np.unique(labels)) == {0, 1}
            elif obj.kind == "faint":  # class A or nothing
                assert labels[0].max() == 1 and labels[0].sum() > 0
                assert not labels[1:].any()
            else:  # the same voxels, class A or class B
                assert labels[0].sum() > 0
                np.testing.assert_array_equal(labels[0] == 1, labels[1] == 2)
                assert set(np.unique(labels[:2])) == {0, 1, 2} and not labels[2].any()


def test_ambiguity_visible_in_the_volume():
    d = ambiguous_shapes(num_images=48, image_size=SIZE, spatial_dims=3, seed=2, noise_std=0.0)
    faint_p, faint_level, strong_level, seen = [], [], [], set()
    for i, image in enumerate(d.objects):
        for o, obj in enumerate(image):
            mask = np.any(d.object_labels[i, o] > 0, axis=0)
            vol = d.images[i, ..., 0]
            if obj.kind == "faint":
                faint_p.append(obj.mode_weights[0])
                faint_level.append(vol[mask].mean())
            elif obj.kind == "boundary":
                strong_level.append(vol[mask].mean())
            else:  # stripes: the intensity varies along W (v) or along H (h)
                dw = np.abs(np.diff(vol, axis=2))[mask[:, :, 1:] & mask[:, :, :-1]].mean()
                dh = np.abs(np.diff(vol, axis=1))[mask[:, 1:] & mask[:, :-1]].mean()
                assert (dw > dh) == (obj.texture == "stripes_v"), (i, o, obj.texture, dw, dh)
                seen.add(obj.texture)
    assert seen == {"stripes_v", "stripes_h"}
    assert len(faint_p) >= 8 and np.corrcoef(faint_p, faint_level)[0, 1] > 0.9
    assert max(faint_level) < np.mean(strong_level)  # faint objects are darker


# --- Determinism, subsets, tf.data -------------------------------------------------------------


def test_same_seed_same_volumes_different_seed_different():
    a = ambiguous_shapes(num_images=4, image_size=SIZE, spatial_dims=3, seed=3)
    b = ambiguous_shapes(num_images=4, image_size=SIZE, spatial_dims=3, seed=3)
    c = ambiguous_shapes(num_images=4, image_size=SIZE, spatial_dims=3, seed=4)
    for x, y in zip(_fields(a), _fields(b), strict=True):
        np.testing.assert_array_equal(x, y)
    assert a.objects == b.objects
    assert not np.array_equal(a.images, c.images)
    assert not np.array_equal(a.object_labels, c.object_labels)


def test_split_and_slicing(volumes):
    part = volumes[2:6]
    assert isinstance(part, AmbiguousShapes) and part.spatial_dims == 3 and len(part) == 4
    np.testing.assert_array_equal(part.modes, volumes.modes[2:6])
    np.testing.assert_allclose(part.marginals(), volumes.marginals()[2:6])
    train, val, test = volumes.split((0.5, 0.25, 0.25))
    assert (len(train), len(val), len(test)) == (32, 16, 16)
    ids = [set(s.indices.tolist()) for s in (train, val, test)]
    assert set.union(*ids) == set(range(64)) and sum(map(len, ids)) == 64
    for s in (train, val, test):
        np.testing.assert_array_equal(s.annotations, volumes.annotations[s.indices])
    again = volumes.split((0.5, 0.25, 0.25))
    np.testing.assert_array_equal(again[0].indices, train.indices)


@pytest.mark.parametrize(
    "annotation, label_shape, label_dtype",
    [
        ("random", S, "int32"),
        ("first", S, "int32"),
        ("all", (3, *S), "int32"),
        ("marginal", (*S, 3), "float32"),
    ],
)
def test_to_dataset_yields_volumes(volumes, annotation, label_shape, label_dtype):
    d = volumes[:5]
    batches = list(d.to_dataset(batch_size=2, shuffle=False, annotation=annotation))
    assert [int(x.shape[0]) for x, _ in batches] == [2, 2, 1]
    images = np.concatenate([x.numpy() for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches])
    assert images.shape == (5, *S, 1) and images.dtype == np.float32
    assert labels.shape == (5, *label_shape) and labels.dtype == np.dtype(label_dtype)
    np.testing.assert_array_equal(images, d.images)
    if annotation == "first":
        np.testing.assert_array_equal(labels, d.annotations[:, 0])
    elif annotation == "all":
        np.testing.assert_array_equal(labels, d.annotations)
    elif annotation == "marginal":
        np.testing.assert_allclose(labels, d.marginals())
    else:
        for i in range(5):
            assert np.any(np.all(d.annotations[i] == labels[i], axis=(1, 2, 3)))


def _hw_transforms(a):
    """The 8 symmetries of the square in the (H, W) axes of a `[D, H, W, ...]` array."""
    turns = [np.rot90(a, k, axes=(1, 2)) for k in range(4)]
    return turns + [t[:, :, ::-1] for t in turns]


def _which(original, transformed):
    return {
        i
        for i, t in enumerate(_hw_transforms(original))
        if t.shape == transformed.shape and np.array_equal(t, transformed)
    }


@pytest.mark.parametrize("annotation", ["first", "all", "marginal"])
def test_augment_turns_volumes_in_their_last_two_axes(volumes, annotation):
    d = volumes[:4]
    ds = d.to_dataset(batch_size=4, shuffle=False, annotation=annotation, augment=True, seed=1)
    seen = set()
    for _ in range(5):  # epochs: new transforms
        images, labels = (t.numpy() for t in next(iter(ds)))
        assert images.shape == (4, *S, 1)
        for i in range(4):
            candidates = _which(d.images[i], images[i])
            assert candidates, "not a turn / flip of the volume in (H, W)"
            if annotation == "all":  # [K, D, H, W] -> [D, H, W, K]
                label, reference = (
                    np.moveaxis(labels[i], 0, -1),
                    np.moveaxis(d.annotations[i], 0, -1),
                )
            elif annotation == "marginal":
                label, reference = labels[i], d.marginals()[i]
            else:
                label, reference = labels[i], d.annotations[i, 0]
            assert candidates & _which(reference, label)  # the same transform
            seen |= candidates if len(candidates) == 1 else set()
    assert len(seen) >= 5  # most of the 8 transforms occur over 20 draws


def test_augment_keeps_the_shape_of_non_square_slices():
    d = ambiguous_shapes(num_images=3, image_size=(16, 16, 24), spatial_dims=3, seed=5)
    ds = d.to_dataset(batch_size=3, shuffle=False, annotation="first", augment=True)
    for _ in range(3):
        x, y = (t.numpy() for t in next(iter(ds)))
        assert x.shape == (3, 16, 16, 24, 1) and y.shape == (3, 16, 16, 24)
        for i in range(3):
            half_turns = _which(d.images[i], x[i]) & {0, 2, 4, 6}
            assert half_turns & _which(d.annotations[i, 0], y[i])


# --- 2D is unchanged ---------------------------------------------------------------------------

# Computed with the 2D-only implementation before the rendering became rank-generic: sha256 of
# the integer arrays (exact), and float summaries (to round-off: they go through cos / Phi).
REFERENCE_2D = [
    (
        {"num_images": 8, "image_size": 32, "seed": 0},
        "a952a559507826529fecddd42ed808eb9df45c0432e34ae78d43a8d97556802e",
        (1174.4677917222944, 571.1369025044908, 1.59419941960829, 525.7237066328526),
        ((23.72038433138426, 17.62374370823273), 4.121256911893858),
    ),
    (
        {
            "num_images": 6,
            "image_size": 48,
            "num_annotations": 3,
            "max_objects": 4,
            "channels": 2,
            "seed": 5,
            "noise_std": 0.1,
        },
        "c10be8bebbc54ac66586976514ba8c0da5e1609f10d5048483cce24424b16ce6",
        (4043.0370274307425, 1937.5686078613946, 1.3170075270014063, 754.4101405441761),
        ((8.123945127389321, 19.47971324529437), 4.844137615801369),
    ),
]


def _int_digest(d):
    h = hashlib.sha256()
    for a in (d.annotations, d.annotation_modes, d.num_modes, d.object_labels):
        a = np.ascontiguousarray(a)
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _float_summary(d):
    x = d.images.astype(np.float64)
    ramp = np.arange(x.size, dtype=np.float64).reshape(x.shape) / x.size
    return (
        float(x.sum()),
        float((x * ramp).sum()),
        float((d.mode_weights.astype(np.float64) ** 2).sum()),
        float(d.marginals().astype(np.float64)[..., 1:].sum()),
    )


@pytest.mark.parametrize("kwargs, digest, summary, first_object", REFERENCE_2D)
def test_2d_data_unchanged(kwargs, digest, summary, first_object):
    for d in (ambiguous_shapes(**kwargs), ambiguous_shapes(**kwargs, spatial_dims=2)):
        assert d.spatial_dims == 2 and d.image_size == kwargs["image_size"]
        assert repr(d).startswith(f"AmbiguousShapes(num_images={kwargs['num_images']}, ")
        assert "spatial_dims" not in repr(d)
        assert _int_digest(d) == digest
        np.testing.assert_allclose(_float_summary(d), summary, rtol=1e-9)
        obj = d.objects[0][0]
        np.testing.assert_allclose(obj.center, first_object[0], rtol=1e-12)
        assert obj.radius == pytest.approx(first_object[1], rel=1e-12)
        assert obj.shape in ("disc", "ellipse", "square")


# --- Argument checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("spatial_dims", [1, 4, 0, "3", 3.0, True, None])
def test_bad_spatial_dims_raise(spatial_dims):
    with pytest.raises(ValueError, match=r"`spatial_dims` must be 2 \(images.*or 3 \(volumes"):
        ambiguous_shapes(num_images=2, spatial_dims=spatial_dims)


@pytest.mark.parametrize(
    "image_size, spatial_dims",
    [((16, 16), 3), ((16, 16, 16), 2), ((16, 15, 16), 3), (8, 3), ((16, 16.0, 16), 3)],
)
def test_bad_image_size_raise(image_size, spatial_dims):
    with pytest.raises(ValueError, match="image_size"):
        ambiguous_shapes(num_images=2, image_size=image_size, spatial_dims=spatial_dims)
