"""A synthetic ambiguous-segmentation benchmark whose true label distribution is known exactly.

Real multi-rater data (LIDC-IDRI) cannot be downloaded here, and its true label distribution is
unknown anyway. `ambiguous_shapes` renders images from hidden object parameters and attaches to
every image the complete, enumerable distribution over its label maps, so exact per-pixel
marginals and the exact reference terms of the generalised energy distance are available; only
the model side has to be sampled.

Images (`spatial_dims=2`, `S = (H, W)`) and volumes (`spatial_dims=3`, `S = (D, H, W)`) come
from one rank-generic code path (the rendering in `tfp_seg.data._shapes`); arrays are
`[N, *S, ...]` alike.

NumPy (and SciPy's normal CDF) only; TensorFlow is imported inside `AmbiguousShapes.to_dataset`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Sequence

import numpy as np

from tfp_seg import _checks
from tfp_seg.data import modes as modes_lib
from tfp_seg.data._dataset import AnnotatedSet, check_fractions
from tfp_seg.data._shapes import (
    MAX_OBJECTS_LIMIT,
    MODES_PER_OBJECT,
    NUM_CLASSES,
    ShapeObject,
    render_image,
)
from tfp_seg.data.modes import sample_annotations

__all__ = ["AmbiguousShapes", "ShapeObject", "ambiguous_shapes", "sample_annotations"]

SPATIAL_DIMS = _checks.SPATIAL_DIMS
MIN_SIZE = 16


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class AmbiguousShapes(AnnotatedSet):
    """Images, K sampled annotations each, and the exact distribution over label maps.

    The joint label distribution of image `i` factorises over its objects. It is stored compactly
    as per-object mode label maps (`object_labels`, `object_weights`); the joint modes are the
    Cartesian product, materialised on demand by `modes_of(i)` (one image) or `modes` (all images,
    `[N, M_max, *S]` int32: large for 128 px images, prefer `modes_of`).

    `S` is the spatial shape: `(H, W)` for images, `(D, H, W)` for volumes (`spatial_dims=3`).

    Attributes:
      images: float32 `[N, *S, channels]`, roughly in `[0, 1]`.
      annotations: int32 `[N, K, *S]`, K i.i.d. draws from each image's mode distribution.
      annotation_modes: int32 `[N, K]`, the joint mode index of every annotation.
      mode_weights: float32 `[N, M_max]`, joint mode weights, 0 beyond `num_modes`; rows sum to 1.
      num_modes: int32 `[N]`, number of joint modes of each image (<= 3 ** max_objects).
      object_labels: int8 `[N, max_objects, 3, *S]`, label map of each object's modes (0 where
        the object's mode paints nothing, and for padding objects / modes).
      object_weights: float32 `[N, max_objects, 3]`, weight of each object mode, 0 for padding.
      objects: per image, the tuple of its `ShapeObject`s (order = object axis above).
      indices: int64 `[N]`, position of each image in the originally generated set.
      image_size: H = W (images), D = H = W (volumes), or the tuple `S` if the sides differ.
      seed: the seed the set was generated from.
      num_classes: 3 (0 background, 1 class A, 2 class B).
    """

    images: np.ndarray
    annotations: np.ndarray
    annotation_modes: np.ndarray
    mode_weights: np.ndarray
    num_modes: np.ndarray
    object_labels: np.ndarray
    object_weights: np.ndarray
    objects: tuple[tuple[ShapeObject, ...], ...]
    indices: np.ndarray
    image_size: int | tuple[int, ...]
    seed: int
    num_classes: int = NUM_CLASSES

    _INDEX_HINT = "; use modes_of(i) or the array fields for a single image"

    # --- Sizes ------------------------------------------------------------------------------

    def __repr__(self) -> str:
        rank = "" if self.spatial_dims == 2 else f", spatial_dims={self.spatial_dims}"
        return (
            f"AmbiguousShapes(num_images={len(self)}, image_size={self.image_size}{rank}, "
            f"channels={self.images.shape[-1]}, num_annotations={self.num_annotations}, "
            f"max_modes={self.max_modes}, num_classes={self.num_classes}, seed={self.seed})"
        )

    @property
    def spatial_shape(self) -> tuple[int, ...]:
        """S: `(H, W)` for images, `(D, H, W)` for volumes."""
        return tuple(int(x) for x in self.images.shape[1:-1])

    @property
    def spatial_dims(self) -> int:
        """The spatial rank: 2 (images) or 3 (volumes)."""
        return len(self.spatial_shape)

    @property
    def max_modes(self) -> int:
        """M_max, the padded size of the mode axis."""
        return int(self.mode_weights.shape[1])

    # --- Exact distribution -----------------------------------------------------------------

    def modes_of(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Joint modes of image `i` without padding.

        Returns:
          modes: int32 `[M_i, *S]`, all distinct label maps.
          weights: float32 `[M_i]`, summing to 1 (equal to `mode_weights[i, :M_i]`).
        """
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"modes_of: index {i} out of range for {n} images")
        i = int(i) % n
        modes, _ = modes_lib.joint_modes(self.object_labels[i], self.object_weights[i])
        m = int(self.num_modes[i])
        return modes, self.mode_weights[i, :m].copy()

    @functools.cached_property
    def modes(self) -> np.ndarray:
        """int32 `[N, M_max, *S]`, the joint modes of every image, zero-padded (cached)."""
        out = np.zeros((len(self), self.max_modes) + self.spatial_shape, np.int32)
        for i in range(len(self)):
            modes, _ = modes_lib.joint_modes(self.object_labels[i], self.object_weights[i])
            out[i, : modes.shape[0]] = modes
        return out

    def marginals(self) -> np.ndarray:
        """Exact per-pixel label distribution, float32 `[N, *S, num_classes]`.

        `p(y_x = c) = sum_k w_k [m_k(x) = c]`; computed from the per-object factors (objects are
        disjoint, so each pixel's distribution comes from at most one object).
        """
        out = np.zeros(self.images.shape[:-1] + (self.num_classes,), np.float64)
        num_objects, num_slots = self.object_weights.shape[1:]
        broadcast = (-1,) + (1,) * self.spatial_dims
        for o, j in itertools.product(range(num_objects), range(num_slots)):
            labels = self.object_labels[:, o, j]  # [N, *S]
            w = self.object_weights[:, o, j].astype(np.float64).reshape(broadcast)
            for c in range(1, self.num_classes):
                out[..., c] += w * (labels == c)
        out[..., 0] = np.clip(1.0 - out[..., 1:].sum(-1), 0.0, 1.0)
        return out.astype(np.float32)

    # --- Subsets ----------------------------------------------------------------------------

    def _take(self, idx: np.ndarray) -> AmbiguousShapes:
        return dataclasses.replace(
            self,
            images=self.images[idx],
            annotations=self.annotations[idx],
            annotation_modes=self.annotation_modes[idx],
            mode_weights=self.mode_weights[idx],
            num_modes=self.num_modes[idx],
            object_labels=self.object_labels[idx],
            object_weights=self.object_weights[idx],
            objects=tuple(self.objects[int(i)] for i in idx),
            indices=self.indices[idx],
        )

    def split(
        self, fractions: Sequence[float] = (0.8, 0.1, 0.1), seed: int | None = None
    ) -> tuple[AmbiguousShapes, ...]:
        """Disjoint random subsets of the given fractions, reproducible from `seed`.

        Sizes are `round(f * N)` for all but the last part, which takes the rest. Images keep
        their original order inside each part. `seed=None` uses the dataset's own seed.

        Raises:
          ValueError: if `fractions` are negative or do not sum to 1.
        """
        f = check_fractions(fractions)
        n = len(self)
        sizes = [int(round(x * n)) for x in f[:-1]]
        sizes.append(n - sum(sizes))
        if sizes[-1] < 0:
            raise ValueError(f"fractions {tuple(fractions)} give negative split sizes {sizes}")
        rng = np.random.default_rng(self.seed if seed is None else seed)
        perm = rng.permutation(n)
        bounds = np.cumsum([0] + sizes)
        return tuple(
            self._take(np.sort(perm[a:b])) for a, b in zip(bounds[:-1], bounds[1:], strict=True)
        )

    def train_val_test(self, seed: int | None = None) -> tuple[AmbiguousShapes, ...]:
        """`split((0.8, 0.1, 0.1), seed)`."""
        return self.split((0.8, 0.1, 0.1), seed=seed)


# --- Public constructor -----------------------------------------------------------------------


def _check_int(name, value, low, high=None):
    value = _checks.positive_int(
        value, name, minimum=low, message="{name} must be {what}, got {value}"
    )
    if high is not None and value > high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _check_size(image_size, spatial_dims: int) -> tuple[int, ...]:
    """`image_size` (one side, or `spatial_dims` sides, each >= 16) as the spatial shape S."""
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != spatial_dims:
            raise ValueError(
                f"image_size must be an int or {spatial_dims} ints (one per spatial axis with "
                f"spatial_dims={spatial_dims}), got {image_size!r}"
            )
        return tuple(_check_int("image_size", side, MIN_SIZE) for side in image_size)
    return (_check_int("image_size", image_size, MIN_SIZE),) * spatial_dims


def ambiguous_shapes(
    num_images: int = 256,
    image_size: int | Sequence[int] = 64,
    num_annotations: int = 4,
    max_objects: int = 3,
    seed: int = 0,
    channels: int = 1,
    noise_std: float = 0.05,
    spatial_dims: int = 2,
) -> AmbiguousShapes:
    """Generates the ambiguous-shapes benchmark: images, annotations and exact label modes.

    Every image holds 1..`max_objects` non-overlapping objects (disc, ellipse or rotated square,
    random position and size). Each object independently takes one ambiguity type, uniformly:

    - `"boundary"` (class A): high contrast, visibly blurred edge. Its annotation is the blurred
      shape thresholded at 0.8 / 0.5 / 0.2 (under / normal / over segmentation), with weights
      1/4, 1/2, 1/4.
    - `"faint"`: uniform low contrast `c ~ U[0.1, 0.3]`, sharp edge. Annotated as class A with
      probability `p = 0.2 + 0.6 (c - 0.1) / 0.2` (in [0.2, 0.8]), else as background.
    - `"class"`: high contrast, striped texture, sharp edge. Vertical stripes: class A / B with
      probability 0.5 / 0.5; horizontal stripes: 0.3 / 0.7.

    Classes: 0 background, 1 class A, 2 class B (`num_classes = 3`).

    **Volumes** (`spatial_dims=3`): the same benchmark in 3D, from the same code: volumes
    `[N, D, H, W, channels]` with balls, ellipsoids (semi-axes `r, r a_1, r a_2`, `a ~ U[0.6, 1]`)
    and cubes, uniformly rotated, the same three ambiguity types with the same weights (stripes
    are planes: `"stripes_v"` varies along W, `"stripes_h"` along H), annotations
    `[N, K, D, H, W]`, modes `[M, D, H, W]`, marginals `[N, D, H, W, 3]`. The default
    `spatial_dims=2` gives the images of earlier versions bit for bit.

    #### Mathematical Details

    ```none
    objects o = 1..n,  n ~ U{1..max_objects} (an object with no free room is dropped),
                       hidden theta_o = (shape, position, size, contrast c_o, blur s_o,
                       texture t_o, type)
    sd_o(x)   = signed distance of pixel (voxel) x to the outline of o (negative inside)
    b_o(x)    = Phi(-sd_o(x) / s_o)                 blurred shape (s_o ~ size/32 or 0.5 px)
    image(x)  = clip(0.1 + sum_o c_o b_o(x) t_o(x) + eps(x), 0, 1),  eps ~ N(0, noise_std^2)
    object modes   boundary: 1[b_o > 0.8], 1[b_o > 0.5], 1[b_o > 0.2]   weights 1/4, 1/2, 1/4
                   faint:    A * 1[sd_o < 0], 0                           weights p(c_o), 1 - p(c_o)
                   class:    A * 1[sd_o < 0], B * 1[sd_o < 0]             weights P(A|t_o), P(B|t_o)
    joint modes    m_(j_1..j_n) = sum_o m_(o, j_o)    (objects are disjoint)
                   w_(j_1..j_n) = prod_o w_(o, j_o)   (at most 3^max_objects modes, sum to 1)
    annotations    Y_1..Y_K i.i.d. ~ sum_k w_k delta(m_k)
    ```

    Since the distribution is known exactly, so are the per-pixel marginals
    `p(y_x = c) = sum_k w_k [m_k(x) = c]` (`AmbiguousShapes.marginals()`) and the reference term
    of the generalised energy distance, `E[d(Y, Y')] = w^T D w` with `D_kl = d(m_k, m_l)` over the
    modes of `modes_of(i)`; only the model side of GED has to be sampled.

    Args:
      num_images: N >= 1.
      image_size: H = W (volumes: D = H = W) >= 16, or one side per spatial axis, each >= 16
        (objects scale with the smallest).
      num_annotations: K >= 1 sampled annotations ("raters") per image.
      max_objects: 1..4 objects per image (<= 3^max_objects joint modes).
      seed: integer seed of `np.random.default_rng`; equal seeds give identical data.
      channels: >= 1; the same clean render with independent noise in every channel.
      noise_std: >= 0, standard deviation of the additive Gaussian pixel noise.
      spatial_dims: 2 (images, default) or 3 (volumes).

    Returns:
      An `AmbiguousShapes`.

    Raises:
      ValueError: naming the argument, for out-of-range arguments.

    #### Examples

    ```python
    data = tfp_seg.data.ambiguous_shapes(num_images=64, image_size=32, seed=1)
    data.images.shape, data.annotations.shape   # ==> (64, 32, 32, 1), (64, 4, 32, 32)
    modes, weights = data.modes_of(0)           # ==> [M_0, 32, 32], [M_0] summing to 1
    train, val, test = data.split((0.8, 0.1, 0.1))
    ds = train.to_dataset(batch_size=8, annotation="random")
    volumes = tfp_seg.data.ambiguous_shapes(num_images=8, image_size=16, spatial_dims=3)
    volumes.images.shape, volumes.annotations.shape  # ==> (8, 16, 16, 16, 1), (8, 4, 16, 16, 16)
    ```
    """
    num_images = _check_int("num_images", num_images, 1)
    spatial_dims = _checks.check_spatial_dims(spatial_dims)
    shape = _check_size(image_size, spatial_dims)
    num_annotations = _check_int("num_annotations", num_annotations, 1)
    max_objects = _check_int("max_objects", max_objects, 1, MAX_OBJECTS_LIMIT)
    seed = _check_int("seed", seed, 0)
    channels = _check_int("channels", channels, 1)
    if not np.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")

    rng = np.random.default_rng(seed)
    n, k = num_images, num_annotations
    grid = tuple(np.meshgrid(*[np.arange(side, dtype=np.float64) for side in shape], indexing="ij"))

    clean = np.empty((n,) + shape, np.float64)
    object_labels = np.zeros((n, max_objects, MODES_PER_OBJECT) + shape, np.int8)
    object_weights = np.zeros((n, max_objects, MODES_PER_OBJECT), np.float64)
    annotations = np.empty((n, k) + shape, np.int32)
    annotation_modes = np.empty((n, k), np.int32)
    joint_weights, objects = [], []
    for i in range(n):
        clean[i], object_labels[i], object_weights[i], objs = render_image(
            rng, shape, max_objects, grid
        )
        objects.append(objs)
        counts = modes_lib.object_counts(object_weights[i])
        combos = modes_lib.joint_index(counts)
        w = np.prod(
            [object_weights[i, o, combos[:, o]] for o in range(len(counts))], axis=0
        ).reshape(-1)
        w = w / w.sum()
        joint_weights.append(w)
        draw = rng.choice(w.size, size=k, p=w)
        annotation_modes[i] = draw
        labels = np.zeros((k,) + shape, np.int32)
        for o in range(len(counts)):
            labels += object_labels[i, o][combos[draw, o]]
        annotations[i] = labels

    noise = rng.normal(0.0, noise_std, size=(n,) + shape + (channels,)) if noise_std > 0 else 0.0
    images = np.clip(clean[..., None] + noise, 0.0, 1.0).astype(np.float32)

    num_modes = np.array([w.size for w in joint_weights], np.int32)
    mode_weights = np.zeros((n, int(num_modes.max())), np.float32)
    for i, w in enumerate(joint_weights):
        mode_weights[i, : w.size] = w
    return AmbiguousShapes(
        images=images,
        annotations=annotations,
        annotation_modes=annotation_modes,
        mode_weights=mode_weights,
        num_modes=num_modes,
        object_labels=object_labels,
        object_weights=object_weights.astype(np.float32),
        objects=tuple(objects),
        indices=np.arange(n, dtype=np.int64),
        image_size=shape[0] if len(set(shape)) == 1 else shape,
        seed=seed,
    )
