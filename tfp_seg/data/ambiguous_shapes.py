"""A synthetic ambiguous-segmentation benchmark whose true label distribution is known exactly.

Real multi-rater data (LIDC-IDRI) cannot be downloaded here, and its true label distribution is
unknown anyway. `ambiguous_shapes` renders images from hidden object parameters and attaches to
every image the complete, enumerable distribution over its label maps, so exact per-pixel
marginals and the exact reference terms of the generalised energy distance are available; only
the model side has to be sampled.

NumPy (and SciPy's normal CDF) only; TensorFlow is imported inside `AmbiguousShapes.to_dataset`.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from typing import Sequence

import numpy as np
from scipy import special

from tfp_seg import _checks
from tfp_seg.data import modes as modes_lib
from tfp_seg.data._dataset import AnnotatedSet, check_fractions
from tfp_seg.data.modes import sample_annotations

__all__ = ["AmbiguousShapes", "ShapeObject", "ambiguous_shapes", "sample_annotations"]

NUM_CLASSES = 3
BACKGROUND, CLASS_A, CLASS_B = 0, 1, 2

KINDS = ("boundary", "faint", "class")
SHAPES = ("disc", "ellipse", "square")

# Largest number of annotation modes a single object can have (boundary: 3).
MODES_PER_OBJECT = 3
MAX_OBJECTS_LIMIT = 4

# Boundary: thresholds of the blurred shape (under / normal / over segmentation) and weights.
BOUNDARY_LEVELS = (0.8, 0.5, 0.2)
BOUNDARY_WEIGHTS = (0.25, 0.5, 0.25)
# Faint: contrast range and the present-probability range it maps to (linearly).
FAINT_CONTRAST = (0.1, 0.3)
FAINT_PRESENT = (0.2, 0.8)
# Ambiguous class: stripe orientation -> (P(class A), P(class B)).
TEXTURE_CLASS_PROBS = {"stripes_v": (0.5, 0.5), "stripes_h": (0.3, 0.7)}
# Contrast of the clearly visible (boundary, class) objects and of the background.
STRONG_CONTRAST = (0.6, 0.85)
BACKGROUND_LEVEL = 0.1


@dataclasses.dataclass(frozen=True)
class ShapeObject:
    """Hidden parameters of one rendered object (all of them visible in the image).

    Attributes:
      kind: ambiguity type, one of `"boundary"`, `"faint"`, `"class"`.
      shape: `"disc"`, `"ellipse"` or `"square"`.
      center: `(row, col)` in pixels.
      radius: disc radius / ellipse semi-major axis / square half-diagonal, in pixels.
      contrast: intensity added by the object on top of the background.
      blur: standard deviation (pixels) of the Gaussian edge profile.
      texture: `"none"`, `"stripes_v"` (vertical stripes) or `"stripes_h"` (horizontal).
      mode_names: names of the object's annotation modes, e.g. `("under", "normal", "over")`.
      mode_weights: probability of each of the object's modes (sums to 1).
    """

    kind: str
    shape: str
    center: tuple[float, float]
    radius: float
    contrast: float
    blur: float
    texture: str
    mode_names: tuple[str, ...]
    mode_weights: tuple[float, ...]


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class AmbiguousShapes(AnnotatedSet):
    """Images, K sampled annotations each, and the exact distribution over label maps.

    The joint label distribution of image `i` factorises over its objects. It is stored compactly
    as per-object mode label maps (`object_labels`, `object_weights`); the joint modes are the
    Cartesian product, materialised on demand by `modes_of(i)` (one image) or `modes` (all images,
    `[N, M_max, H, W]` int32: large for 128 px images, prefer `modes_of`).

    Attributes:
      images: float32 `[N, H, W, channels]`, roughly in `[0, 1]`.
      annotations: int32 `[N, K, H, W]`, K i.i.d. draws from each image's mode distribution.
      annotation_modes: int32 `[N, K]`, the joint mode index of every annotation.
      mode_weights: float32 `[N, M_max]`, joint mode weights, 0 beyond `num_modes`; rows sum to 1.
      num_modes: int32 `[N]`, number of joint modes of each image (<= 3 ** max_objects).
      object_labels: int8 `[N, max_objects, 3, H, W]`, label map of each object's modes (0 where
        the object's mode paints nothing, and for padding objects / modes).
      object_weights: float32 `[N, max_objects, 3]`, weight of each object mode, 0 for padding.
      objects: per image, the tuple of its `ShapeObject`s (order = object axis above).
      indices: int64 `[N]`, position of each image in the originally generated set.
      image_size: H = W.
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
    image_size: int
    seed: int
    num_classes: int = NUM_CLASSES

    _INDEX_HINT = "; use modes_of(i) or the array fields for a single image"

    # --- Sizes ------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return (
            f"AmbiguousShapes(num_images={len(self)}, image_size={self.image_size}, "
            f"channels={self.images.shape[-1]}, num_annotations={self.num_annotations}, "
            f"max_modes={self.max_modes}, num_classes={self.num_classes}, seed={self.seed})"
        )

    @property
    def max_modes(self) -> int:
        """M_max, the padded size of the mode axis."""
        return int(self.mode_weights.shape[1])

    # --- Exact distribution -----------------------------------------------------------------

    def modes_of(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Joint modes of image `i` without padding.

        Returns:
          modes: int32 `[M_i, H, W]`, all distinct label maps.
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
        """int32 `[N, M_max, H, W]`, the joint modes of every image, zero-padded (cached)."""
        n, h = len(self), self.image_size
        out = np.zeros((n, self.max_modes, h, h), np.int32)
        for i in range(n):
            modes, _ = modes_lib.joint_modes(self.object_labels[i], self.object_weights[i])
            out[i, : modes.shape[0]] = modes
        return out

    def marginals(self) -> np.ndarray:
        """Exact per-pixel label distribution, float32 `[N, H, W, num_classes]`.

        `p(y_ij = c) = sum_k w_k [m_k(i, j) = c]`; computed from the per-object factors (objects are
        disjoint, so each pixel's distribution comes from at most one object).
        """
        out = np.zeros(self.images.shape[:3] + (self.num_classes,), np.float64)
        num_objects, num_slots = self.object_weights.shape[1:]
        for o, j in itertools.product(range(num_objects), range(num_slots)):
            labels = self.object_labels[:, o, j]  # [N, H, W]
            w = self.object_weights[:, o, j].astype(np.float64)[:, None, None]
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


# --- Rendering --------------------------------------------------------------------------------


def _signed_distance(shape, center, radius, aspect, angle, yy, xx):
    """Approximate signed distance (pixels, negative inside) to the object's outline."""
    dy, dx = yy - center[0], xx - center[1]
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * dx + s * dy, -s * dx + c * dy
    if shape == "disc":
        return np.hypot(dx, dy) - radius
    if shape == "ellipse":
        a, b = radius, radius * aspect
        rho = np.hypot(u / a, v / b)
        grad = np.hypot(u / a**2, v / b**2) / np.maximum(rho, 1e-6)
        return (rho - 1.0) / np.maximum(grad, 1e-6)
    half = radius / np.sqrt(2.0)  # square: radius is the half-diagonal
    qx, qy = np.abs(u) - half, np.abs(v) - half
    outside = np.hypot(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    return outside + np.minimum(np.maximum(qx, qy), 0.0)


def _place(rng, size, extent, placed):
    """A center keeping the disc of radius `extent` inside the image and off `placed` discs."""
    lo, hi = extent, size - 1.0 - extent
    if hi < lo:
        return None
    for _ in range(50):
        center = rng.uniform(lo, hi, size=2)
        if all(np.hypot(*(center - c)) > extent + e + 1.0 for c, e in placed):
            return center
    return None


def _render_image(rng, size, max_objects, yy, xx):
    """Draws one image's objects. Returns clean intensity, per-object labels/weights, objects."""
    blur_boundary = max(1.2, size / 32.0)
    blur_sharp = 0.5
    stripe_period = max(3.0, size / 16.0)
    clean = np.full((size, size), BACKGROUND_LEVEL, np.float64)
    labels = np.zeros((max_objects, MODES_PER_OBJECT, size, size), np.int8)
    weights = np.zeros((max_objects, MODES_PER_OBJECT), np.float64)
    objects, placed = [], []
    num = int(rng.integers(1, max_objects + 1))
    for _ in range(num):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        blur = blur_boundary if kind == "boundary" else blur_sharp
        radius = rng.uniform(0.07, 0.13) * size
        aspect = rng.uniform(0.6, 1.0) if shape == "ellipse" else 1.0
        # Inradius (disc: r, ellipse: minor semi-axis, square: half-side) of at least 2.5 px,
        # and >= 1.5 px left in the under-segmented (0.8-level) boundary mask.
        inradius = max(2.5, 1.5 + blur * special.ndtri(BOUNDARY_LEVELS[0]))
        shrink = {"disc": 1.0, "ellipse": aspect, "square": 1.0 / np.sqrt(2.0)}[shape]
        radius = max(radius, inradius / shrink)
        angle = rng.uniform(0.0, np.pi)
        # Labels reach out to the over-segmentation level (0.2) at most.
        extent = radius - blur * special.ndtri(BOUNDARY_LEVELS[-1]) + 1.0
        center = _place(rng, size, extent, placed)
        if center is None:
            continue
        placed.append((center, extent))
        sd = _signed_distance(shape, center, radius, aspect, angle, yy, xx)
        profile = special.ndtr(-sd / blur)  # Gaussian-blurred indicator of the shape
        texture = "none"
        if kind == "boundary":
            contrast = rng.uniform(*STRONG_CONTRAST)
            masks = [profile > level for level in BOUNDARY_LEVELS]
            classes = [CLASS_A] * 3
            names, probs = ("under", "normal", "over"), BOUNDARY_WEIGHTS
            intensity = contrast * profile
        elif kind == "faint":
            contrast = rng.uniform(*FAINT_CONTRAST)
            t = (contrast - FAINT_CONTRAST[0]) / (FAINT_CONTRAST[1] - FAINT_CONTRAST[0])
            p = FAINT_PRESENT[0] + t * (FAINT_PRESENT[1] - FAINT_PRESENT[0])
            mask = sd < 0
            masks, classes = [mask, np.zeros_like(mask)], [CLASS_A, BACKGROUND]
            names, probs = ("present", "absent"), (p, 1.0 - p)
            intensity = contrast * profile
        else:
            contrast = rng.uniform(*STRONG_CONTRAST)
            texture = ("stripes_v", "stripes_h")[int(rng.integers(2))]
            coord = xx if texture == "stripes_v" else yy
            phase = rng.uniform(0.0, 2.0 * np.pi)
            stripes = 0.5 + 0.5 * np.cos(2.0 * np.pi * coord / stripe_period + phase)
            mask = sd < 0
            masks, classes = [mask, mask], [CLASS_A, CLASS_B]
            names, probs = ("A", "B"), TEXTURE_CLASS_PROBS[texture]
            intensity = contrast * profile * (0.3 + 0.7 * stripes)
        o = len(objects)
        _fill_object_modes(labels[o], weights[o], masks, classes, probs)
        clean += intensity
        objects.append(
            ShapeObject(
                kind=kind,
                shape=shape,
                center=(float(center[0]), float(center[1])),
                radius=float(radius),
                contrast=float(contrast),
                blur=float(blur),
                texture=texture,
                mode_names=tuple(names),
                mode_weights=tuple(float(x) for x in probs),
            )
        )
    return clean, labels, weights, tuple(objects)


def _fill_object_modes(labels, weights, masks, classes, probs):
    """Writes an object's distinct mode label maps; identical maps are merged (weights added)."""
    j = 0
    for mask, cls, p in zip(masks, classes, probs, strict=True):
        label = (mask * cls).astype(np.int8)
        for prev in range(j):
            if np.array_equal(labels[prev], label):
                weights[prev] += p
                break
        else:
            labels[j], weights[j] = label, p
            j += 1


# --- Public constructor -----------------------------------------------------------------------


def _check_int(name, value, low, high=None):
    value = _checks.positive_int(
        value, name, minimum=low, message="{name} must be {what}, got {value}"
    )
    if high is not None and value > high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def ambiguous_shapes(
    num_images: int = 256,
    image_size: int = 64,
    num_annotations: int = 4,
    max_objects: int = 3,
    seed: int = 0,
    channels: int = 1,
    noise_std: float = 0.05,
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

    #### Mathematical Details

    ```none
    objects o = 1..n,  n ~ U{1..max_objects} (an object with no free room is dropped),
                       hidden theta_o = (shape, position, size, contrast c_o, blur s_o,
                       texture t_o, type)
    sd_o(x)   = signed distance of pixel x to the outline of o (negative inside)
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
      image_size: H = W >= 16 (objects scale with it).
      num_annotations: K >= 1 sampled annotations ("raters") per image.
      max_objects: 1..4 objects per image (<= 3^max_objects joint modes).
      seed: integer seed of `np.random.default_rng`; equal seeds give identical data.
      channels: >= 1; the same clean render with independent noise in every channel.
      noise_std: >= 0, standard deviation of the additive Gaussian pixel noise.

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
    ```
    """
    num_images = _check_int("num_images", num_images, 1)
    image_size = _check_int("image_size", image_size, 16)
    num_annotations = _check_int("num_annotations", num_annotations, 1)
    max_objects = _check_int("max_objects", max_objects, 1, MAX_OBJECTS_LIMIT)
    seed = _check_int("seed", seed, 0)
    channels = _check_int("channels", channels, 1)
    if not np.isfinite(noise_std) or noise_std < 0:
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std!r}")

    rng = np.random.default_rng(seed)
    n, size, k = num_images, image_size, num_annotations
    grid = np.arange(size, dtype=np.float64)
    yy, xx = np.meshgrid(grid, grid, indexing="ij")

    clean = np.empty((n, size, size), np.float64)
    object_labels = np.zeros((n, max_objects, MODES_PER_OBJECT, size, size), np.int8)
    object_weights = np.zeros((n, max_objects, MODES_PER_OBJECT), np.float64)
    annotations = np.empty((n, k, size, size), np.int32)
    annotation_modes = np.empty((n, k), np.int32)
    joint_weights, objects = [], []
    for i in range(n):
        clean[i], object_labels[i], object_weights[i], objs = _render_image(
            rng, size, max_objects, yy, xx
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
        labels = np.zeros((k, size, size), np.int32)
        for o in range(len(counts)):
            labels += object_labels[i, o][combos[draw, o]]
        annotations[i] = labels

    noise = rng.normal(0.0, noise_std, size=(n, size, size, channels)) if noise_std > 0 else 0.0
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
        image_size=size,
        seed=seed,
    )
