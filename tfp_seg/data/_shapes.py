"""Rendering of the ambiguous-shapes benchmark (`tfp_seg.data.ambiguous_shapes`), one code path
for images (spatial rank 2, `S = (H, W)`) and volumes (rank 3, `S = (D, H, W)`).

An object is a shape given by its signed distance over the voxel grid of the spatial rank:

```none
d(x)   = R (x - center)                      rotated offsets, R in SO(rank)
disc / ball:         sd(x) = |x - center| - r
ellipse / ellipsoid: sd(x) ~ (rho - 1) / |grad rho|,   rho = |d / a|,  a = r (1, aspect_1, ..)
square / cube:       sd(x) = box distance of d, half-side r / sqrt(rank) (r: half-diagonal)
```

The 2D path draws the same random numbers in the same order and evaluates the same floating
point operations as the 2D-only code it replaces, so 2D data sets are unchanged bit for bit.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
from scipy import special

__all__ = ["ShapeObject", "render_image", "shapes_for"]

NUM_CLASSES = 3
BACKGROUND, CLASS_A, CLASS_B = 0, 1, 2

KINDS = ("boundary", "faint", "class")
SHAPES = ("disc", "ellipse", "square")
SHAPES_3D = ("ball", "ellipsoid", "cube")

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
      shape: images: `"disc"`, `"ellipse"` or `"square"`; volumes: `"ball"`, `"ellipsoid"` or
        `"cube"`.
      center: `(row, col)` in pixels; volumes `(depth, row, col)` in voxels.
      radius: disc / ball radius, ellipse / ellipsoid semi-major axis, square / cube
        half-diagonal, in pixels.
      contrast: intensity added by the object on top of the background.
      blur: standard deviation (pixels) of the Gaussian edge profile.
      texture: `"none"`, `"stripes_v"` (vertical stripes: the intensity varies along the last
        axis W) or `"stripes_h"` (horizontal: it varies along H).
      mode_names: names of the object's annotation modes, e.g. `("under", "normal", "over")`.
      mode_weights: probability of each of the object's modes (sums to 1).
    """

    kind: str
    shape: str
    center: tuple[float, ...]
    radius: float
    contrast: float
    blur: float
    texture: str
    mode_names: tuple[str, ...]
    mode_weights: tuple[float, ...]


def shapes_for(rank: int) -> tuple[str, ...]:
    """The shape names of spatial rank 2 (images) or 3 (volumes)."""
    return SHAPES if rank == 2 else SHAPES_3D


def _norm(parts):
    """Euclidean norm of the component arrays (`np.hypot` folded over them)."""
    return functools.reduce(np.hypot, parts)


def _rotation(rng, rank):
    """Rows of a random rotation: 2D by an angle in [0, pi), 3D uniform (Haar) over SO(3)."""
    if rank == 2:
        angle = rng.uniform(0.0, np.pi)
        c, s = np.cos(angle), np.sin(angle)
        # Rows over the offsets (dy, dx): u = c dx + s dy, v = -s dx + c dy.
        return ((s, c), (c, -s))
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)  # a uniform unit quaternion
    return (
        (1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)),
        (2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)),
        (2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)),
    )


def _signed_distance(shape, center, radius, aspects, rotation, grid):
    """Approximate signed distance (pixels, negative inside) to the object's outline."""
    deltas = [g - c for g, c in zip(grid, center, strict=True)]
    if shape in ("disc", "ball"):
        return _norm(deltas[::-1]) - radius
    frame = [sum(r * d for r, d in zip(row, deltas, strict=True)) for row in rotation]
    if shape in ("ellipse", "ellipsoid"):
        axes = [radius] + [radius * a for a in aspects]
        rho = _norm([u / a for u, a in zip(frame, axes, strict=True)])
        grad = _norm([u / a**2 for u, a in zip(frame, axes, strict=True)]) / np.maximum(rho, 1e-6)
        return (rho - 1.0) / np.maximum(grad, 1e-6)
    half = radius / np.sqrt(float(len(grid)))  # square / cube: radius is the half-diagonal
    q = [np.abs(u) - half for u in frame]
    outside = _norm([np.maximum(qi, 0.0) for qi in q])
    return outside + np.minimum(functools.reduce(np.maximum, q), 0.0)


def _place(rng, shape, extent, placed):
    """A center keeping the ball of radius `extent` inside the grid and off `placed` balls."""
    lo = extent
    hi = np.asarray(shape, np.float64) - 1.0 - extent
    if np.any(hi < lo):
        return None
    for _ in range(50):
        center = rng.uniform(lo, hi)
        if all(_norm(center - c) > extent + e + 1.0 for c, e in placed):
            return center
    return None


def render_image(rng, shape, max_objects, grid):
    """Draws one image's (or volume's) objects over the coordinate arrays `grid` (one per axis
    of `shape`). Returns clean intensity `[*S]`, per-object labels `[max_objects, 3, *S]` and
    weights `[max_objects, 3]`, and the objects."""
    rank = len(shape)
    size = min(shape)  # object sizes, blur and stripes scale with the smallest side
    blur_boundary = max(1.2, size / 32.0)
    blur_sharp = 0.5
    stripe_period = max(3.0, size / 16.0)
    names_of_shapes = shapes_for(rank)
    clean = np.full(shape, BACKGROUND_LEVEL, np.float64)
    labels = np.zeros((max_objects, MODES_PER_OBJECT) + tuple(shape), np.int8)
    weights = np.zeros((max_objects, MODES_PER_OBJECT), np.float64)
    objects, placed = [], []
    num = int(rng.integers(1, max_objects + 1))
    for _ in range(num):
        kind = KINDS[int(rng.integers(len(KINDS)))]
        form = names_of_shapes[int(rng.integers(len(names_of_shapes)))]
        blur = blur_boundary if kind == "boundary" else blur_sharp
        radius = rng.uniform(0.07, 0.13) * size
        elongated = form in ("ellipse", "ellipsoid")
        if not elongated:
            aspects = (1.0,) * (rank - 1)
        elif rank == 2:
            aspects = (rng.uniform(0.6, 1.0),)
        else:
            aspects = tuple(rng.uniform(0.6, 1.0, size=rank - 1))
        # Inradius (disc: r, ellipse: minor semi-axis, square: half-side) of at least 2.5 px,
        # and >= 1.5 px left in the under-segmented (0.8-level) boundary mask.
        inradius = max(2.5, 1.5 + blur * special.ndtri(BOUNDARY_LEVELS[0]))
        if elongated:
            shrink = min(aspects)
        elif form in ("square", "cube"):
            shrink = 1.0 / np.sqrt(float(rank))
        else:
            shrink = 1.0
        radius = max(radius, inradius / shrink)
        rotation = _rotation(rng, rank)
        # Labels reach out to the over-segmentation level (0.2) at most.
        extent = radius - blur * special.ndtri(BOUNDARY_LEVELS[-1]) + 1.0
        center = _place(rng, shape, extent, placed)
        if center is None:
            continue
        placed.append((center, extent))
        sd = _signed_distance(form, center, radius, aspects, rotation, grid)
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
            coord = grid[-1] if texture == "stripes_v" else grid[-2]
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
                shape=form,
                center=tuple(float(c) for c in center),
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
