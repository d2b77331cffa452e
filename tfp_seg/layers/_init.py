"""Initializers of the low-rank heads' projection (`LowRankLogits`, `MixtureLowRankLogits`):
where the covariance starts.

A projection's output channels per component are `[mu (C) | d_raw (C) | P (C*R)]`. With a
glorot kernel and a zero bias the covariance starts large (the factor alone gives logits a
standard deviation of about 2 on a U-Net's features and `D = exp(0) = 1`), so the first
epochs spend themselves shrinking it and the mean learns slowly behind samples that are
mostly noise. `factor_init_scale` scales the factor's kernel columns at initialisation and
`initial_diagonal` sets the diagonal's starting variance through the bias of `d_raw`.
"""

from __future__ import annotations

import math
from typing import Optional

import keras

__all__ = [
    "FACTOR_INIT_SCALE",
    "INITIAL_DIAGONAL",
    "LowRankBiasInitializer",
    "LowRankKernelInitializer",
    "check_factor_init_scale",
    "check_initial_diagonal",
    "raw_diagonal_for",
]


# The heads' defaults since they were measured (benchmarks/README.md, "Model quality"):
# the factor's kernel at a tenth of glorot's, the diagonal from exp(-4) ~ 0.018.
FACTOR_INIT_SCALE = 0.1
INITIAL_DIAGONAL = 0.018


def _finite_real(value) -> bool:
    """Whether `value` is a finite Python real (bool excluded)."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def check_factor_init_scale(value) -> float:
    """`factor_init_scale` as a finite float >= 0, else a `ValueError` naming it."""
    if not (_finite_real(value) and value >= 0):
        raise ValueError(f"`factor_init_scale` must be a finite float >= 0; got {value!r}.")
    return float(value)


def check_initial_diagonal(value, epsilon: float) -> Optional[float]:
    """`initial_diagonal` (None, or a finite variance > `epsilon`), else a `ValueError`."""
    if value is None:
        return None
    if not (_finite_real(value) and value > epsilon):
        raise ValueError(
            f"`initial_diagonal` must be None or a finite variance > epsilon ({epsilon}); "
            f"got {value!r}."
        )
    return float(value)


def raw_diagonal_for(variance: Optional[float], epsilon: float, transform: str) -> float:
    """The raw diagonal `d_raw` with `transform(d_raw) + epsilon = variance` (0 for None)."""
    if variance is None:
        return 0.0
    value = variance - epsilon
    if transform == "exp":
        return math.log(value)
    # softplus^-1(v) = log(expm1(v)), written stably for large v.
    return value + math.log(-math.expm1(-value))


def _component_pattern(num_classes: int, rank: int, first: float, second: float, factor: float):
    return [first] * num_classes + [second] * num_classes + [factor] * (num_classes * rank)


def _check_channels(name: str, channels, num_classes: int, rank: int, num_components: int):
    size = num_components * num_classes * (2 + rank)
    if channels != size:
        raise ValueError(
            f"{name} initialises {size} output channels ({num_components} x C (2 + R) with "
            f"C = {num_classes}, R = {rank}); got {channels}."
        )


@keras.saving.register_keras_serializable(package="tfp_seg")
class LowRankKernelInitializer(keras.initializers.Initializer):
    """`initializer`'s kernel with the factor's output channels scaled by `factor_scale`
    (the mean's and the raw diagonal's are left as drawn); the last axis is the output
    channels, `num_components` blocks of `[mu (C) | d_raw (C) | P (C*R)]`."""

    def __init__(
        self,
        initializer="glorot_uniform",
        num_classes: int = 1,
        rank: int = 1,
        factor_scale: float = 1.0,
        num_components: int = 1,
    ):
        self.initializer = keras.initializers.get(initializer)
        self.num_classes = int(num_classes)
        self.rank = int(rank)
        self.factor_scale = check_factor_init_scale(factor_scale)
        self.num_components = int(num_components)

    def __call__(self, shape, dtype=None):
        shape = tuple(shape)
        _check_channels(
            "LowRankKernelInitializer", shape[-1], self.num_classes, self.rank, self.num_components
        )
        kernel = self.initializer(shape, dtype=dtype)
        scale = self.num_components * _component_pattern(
            self.num_classes, self.rank, 1.0, 1.0, self.factor_scale
        )
        return kernel * keras.ops.convert_to_tensor(scale, dtype=kernel.dtype)

    def get_config(self):
        return {
            "initializer": keras.initializers.serialize(self.initializer),
            "num_classes": self.num_classes,
            "rank": self.rank,
            "factor_scale": self.factor_scale,
            "num_components": self.num_components,
        }


@keras.saving.register_keras_serializable(package="tfp_seg")
class LowRankBiasInitializer(keras.initializers.Initializer):
    """Bias `[0]*C (mu) | [raw_diagonal]*C (d_raw) | [0]*(C*R) (P)` per component."""

    def __init__(
        self, num_classes: int = 1, rank: int = 1, raw_diagonal: float = 0.0, num_components=1
    ):
        self.num_classes = int(num_classes)
        self.rank = int(rank)
        self.raw_diagonal = float(raw_diagonal)
        self.num_components = int(num_components)

    def __call__(self, shape, dtype=None):
        shape = tuple(shape)
        if len(shape) != 1:
            raise ValueError(f"LowRankBiasInitializer builds a vector; got shape {shape}.")
        _check_channels(
            "LowRankBiasInitializer", shape[0], self.num_classes, self.rank, self.num_components
        )
        values = self.num_components * _component_pattern(
            self.num_classes, self.rank, 0.0, self.raw_diagonal, 0.0
        )
        return keras.ops.convert_to_tensor(values, dtype=dtype or "float32")

    def get_config(self):
        return {
            "num_classes": self.num_classes,
            "rank": self.rank,
            "raw_diagonal": self.raw_diagonal,
            "num_components": self.num_components,
        }
