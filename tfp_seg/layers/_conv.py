"""Argument checks and shapes shared by the convolutions of `tfp_seg.layers`: the ensemble
convolutions (`BatchEnsembleConv`, `PackedConv`; ranks 1-3, channels-last) and the heads'
projections (`keras_conv`: Conv2D for images, Conv3D for volumes)."""

from __future__ import annotations

from typing import Sequence, Union

import keras

from tfp_seg import _checks

__all__ = [
    "conv_tuple",
    "check_conv_rank",
    "check_padding",
    "check_conv_input",
    "conv_output_shape",
    "keras_conv",
]

_PADDINGS = ("same", "valid")
_RANKS = (1, 2, 3)


def conv_tuple(value: Union[int, Sequence[int]], rank: int, name: str) -> tuple:
    """`value` (a positive int, or `rank` positive ints) as a tuple of `rank` ints."""
    if isinstance(value, (list, tuple)):
        if len(value) != rank:
            raise ValueError(
                f"`{name}` must be a positive int or {rank} positive ints; got {value!r}."
            )
        return tuple(_checks.positive_int(v, name) for v in value)
    return (_checks.positive_int(value, name),) * rank


def check_conv_rank(rank) -> int:
    rank = _checks.positive_int(rank, "rank")
    if rank not in _RANKS:
        raise ValueError(f"`rank` must be one of {_RANKS} (spatial dimensions); got {rank}.")
    return rank


def check_padding(padding) -> str:
    if not isinstance(padding, str) or padding.lower() not in _PADDINGS:
        raise ValueError(f"`padding` must be one of {_PADDINGS}; got {padding!r}.")
    return padding.lower()


def check_conv_input(shape, rank: int, name: str = "inputs") -> None:
    """Raise if a static input `shape` is not `[batch, *S, channels]` with `rank` axes S and
    a known channel count."""
    if len(shape) != rank + 2:
        raise ValueError(
            f"`{name}` must have rank {rank + 2} ([batch, {rank} spatial axes, channels]); "
            f"got shape {tuple(shape)}."
        )
    if shape[-1] is None:
        raise ValueError(f"`{name}` must have a known channel count (last axis).")


def conv_output_shape(input_shape, kernel_size, strides, dilation_rate, padding) -> tuple:
    """`(batch, *S')` of a convolution of `input_shape [batch, *S, channels]` (no channels)."""
    input_shape = tuple(input_shape)
    spatial: list = []
    for size, k, stride, dilation in zip(
        input_shape[1:-1], kernel_size, strides, dilation_rate, strict=True
    ):
        if size is None:
            spatial.append(None)
        elif padding == "same":
            spatial.append(-(-size // stride))
        else:
            span = (k - 1) * dilation + 1
            spatial.append(max(0, -(-(size - span + 1) // stride)))
    return (input_shape[0], *spatial)


def keras_conv(rank: int):
    """The channels-last Keras convolution over `rank` spatial axes: `Conv1D`, `Conv2D`
    (images `[B, H, W, F]`) or `Conv3D` (volumes `[B, D, H, W, F]`)."""
    rank = check_conv_rank(rank)
    return {1: keras.layers.Conv1D, 2: keras.layers.Conv2D, 3: keras.layers.Conv3D}[rank]
