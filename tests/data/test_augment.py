"""`to_dataset(augment=True)`: flips and 90-degree rotations, the same for image and labels."""

import numpy as np
import pytest

from tfp_seg.data import AnnotatedImages, ambiguous_shapes


def _dihedral(a):
    """The 8 symmetries of the square of a `[H, W, ...]` array, in the dataset's order."""
    turns = [np.rot90(a, k, axes=(0, 1)) for k in range(4)]
    return turns + [t[:, ::-1] for t in turns]


def _which(original, transformed):
    return [i for i, t in enumerate(_dihedral(original)) if np.array_equal(t, transformed)]


@pytest.mark.parametrize("annotation", ["random", "first", "all", "marginal"])
def test_image_and_labels_get_the_same_transform(annotation):
    data = ambiguous_shapes(num_images=6, image_size=16, seed=0)
    ds = data.to_dataset(batch_size=6, shuffle=False, annotation=annotation, augment=True)
    seen = set()
    for _ in range(6):  # epochs: transforms are drawn anew
        images, labels = (t.numpy() for t in next(iter(ds)))
        for i in range(6):
            candidates = _which(data.images[i], images[i])
            assert candidates, "the image is not a flip / rotation of the original"
            if annotation == "all":
                label = np.moveaxis(labels[i], 0, -1)  # [K,H,W] -> [H,W,K]
                reference = np.moveaxis(data.annotations[i], 0, -1)
            elif annotation == "marginal":
                label, reference = labels[i], data.marginals()[i]
            elif annotation == "first":
                label, reference = labels[i], data.annotations[i, 0]
            else:  # one of the K annotations
                ks = [
                    k
                    for k in range(data.num_annotations)
                    if _which(data.annotations[i, k], labels[i])
                ]
                assert ks
                label, reference = labels[i], data.annotations[i, ks[0]]
            # some transform maps both the image and its label: the same one
            assert set(candidates) & set(_which(reference, label))
            seen.add(candidates[0] if len(candidates) == 1 else None)
    assert len(seen - {None}) >= 6  # most of the 8 transforms occur over 36 draws


def test_seeded_and_off_by_default():
    data = ambiguous_shapes(num_images=4, image_size=16, seed=1)
    a = next(iter(data.to_dataset(batch_size=4, shuffle=False, augment=True, seed=3)))
    b = next(iter(data.to_dataset(batch_size=4, shuffle=False, augment=True, seed=3)))
    np.testing.assert_array_equal(a[0].numpy(), b[0].numpy())
    plain = next(iter(data.to_dataset(batch_size=4, shuffle=False, annotation="first")))
    np.testing.assert_array_equal(plain[0].numpy(), data.images)


def test_non_square_images_keep_their_shape():
    rng = np.random.default_rng(0)
    images = rng.random((3, 8, 12, 1)).astype("float32")
    annotations = (rng.random((3, 2, 8, 12)) > 0.5).astype("uint8")
    data = AnnotatedImages(images=images, annotations=annotations, ids=("a", "b", "c"))
    ds = data.to_dataset(batch_size=3, shuffle=False, annotation="first", augment=True)
    for _ in range(4):
        x, y = (t.numpy() for t in next(iter(ds)))
        assert x.shape == (3, 8, 12, 1) and y.shape == (3, 8, 12)
        for i in range(3):
            half_turns = [t for t in _which(images[i], x[i]) if t in (0, 2, 4, 6)]
            assert half_turns and set(half_turns) & set(_which(annotations[i, 0], y[i]))
