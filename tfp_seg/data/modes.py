"""The discrete label distribution of one image: draws of annotations from its modes, and the
joint modes and weights of an image from its objects' independent per-object modes."""

from __future__ import annotations

import itertools
from typing import Sequence

import numpy as np

from tfp_seg import _checks

__all__ = ["check_weights", "joint_index", "joint_modes", "object_counts", "sample_annotations"]


def check_weights(weights: np.ndarray, num_modes: int, name: str = "weights") -> np.ndarray:
    w = np.asarray(weights, np.float64)
    if w.shape != (num_modes,):
        raise ValueError(f"{name} must have shape [{num_modes}], got {w.shape}")
    if np.any(w < 0) or abs(w.sum() - 1.0) > 1e-4:
        raise ValueError(f"{name} must be non-negative and sum to 1, got sum {w.sum():.6f}")
    return w / w.sum()


def sample_annotations(
    modes: np.ndarray, weights: np.ndarray, k: int, rng: np.random.Generator
) -> np.ndarray:
    """Draws `k` i.i.d. label maps from the discrete distribution over `modes`.

    Args:
      modes: integer `[M, *S]` label maps, `S = (H, W)` (images) or `(D, H, W)` (volumes).
      weights: `[M]` probabilities (non-negative, summing to 1).
      k: number of draws.
      rng: a `np.random.Generator`.

    Returns:
      `[k, *S]` label maps (dtype of `modes`), `modes[j]` with probability `weights[j]`.
    """
    modes = np.asarray(modes)
    if modes.ndim not in (3, 4):
        raise ValueError(f"modes must have shape [M, H, W] or [M, D, H, W], got {modes.shape}")
    k = _checks.positive_int(k, "k", message="k must be an int >= {minimum}, got {value}")
    w = check_weights(weights, modes.shape[0])
    return modes[rng.choice(modes.shape[0], size=int(k), p=w)]


def joint_index(counts: Sequence[int]) -> np.ndarray:
    """`[prod(counts), len(counts)]`: each joint mode's per-object mode index (last fastest)."""
    if len(counts) == 0:
        return np.zeros((1, 0), np.int64)
    return np.array(list(itertools.product(*[range(c) for c in counts])), np.int64)


def object_counts(object_weights: np.ndarray) -> list[int]:
    counts = (np.asarray(object_weights) > 0).sum(-1)
    return [int(c) for c in counts if c > 0]


def joint_modes(object_labels: np.ndarray, object_weights: np.ndarray):
    """Joint modes `[M, *S]` int32 and weights `[M]` float64 of one image from its factors
    (`object_labels [objects, modes, *S]`, `object_weights [objects, modes]`)."""
    counts = object_counts(object_weights)
    combos = joint_index(counts)
    modes = np.zeros((combos.shape[0],) + tuple(object_labels.shape[2:]), np.int32)
    weights = np.ones(combos.shape[0], np.float64)
    for o in range(len(counts)):
        modes += object_labels[o][combos[:, o]]
        weights *= object_weights[o].astype(np.float64)[combos[:, o]]
    return modes, weights / weights.sum()
