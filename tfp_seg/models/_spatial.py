"""The spatial rank of the model level: images `[B, H, W, channels]` (`spatial_dims=2`) or
volumes `[B, D, H, W, channels]` (`spatial_dims=3`), one code path for both.

A model knows its rank from its head (`ProbabilisticSegmenter`, `EnsembleSegmenter`) or its
constructor (`ProbabilisticUNet`); its backbone's rank is read where the backbone states one
(`backbone_spatial_dims`), so that a 2D head on a 3D backbone, or the reverse, is an error at
construction, naming both ranks, instead of a shape error deep inside the first call.
"""

from __future__ import annotations

from typing import Optional

import keras
import tensorflow as tf

from tfp_seg import _checks

__all__ = [
    "backbone_spatial_dims",
    "check_backbone_rank",
    "check_input_rank",
    "check_feature_rank",
    "check_resolution",
    "input_form",
]


def input_form(spatial_dims: int, trailing: str = "channels", leading: str = "B") -> str:
    """`"[B, H, W, channels]"` or `"[B, D, H, W, channels]"`."""
    return _checks.spatial_form(spatial_dims, leading, trailing)


def backbone_spatial_dims(backbone) -> Optional[int]:
    """The spatial rank a backbone takes, where it states one: its int `spatial_dims`
    attribute (`tfp_seg.models.UNet`, the keras-hub / keras-cv adapters: 2), else the rank of a
    functional model's first input minus 2 when that is 2 or 3; None when unknown (a
    subclassed model or a `Sequential` without an input)."""
    dims = getattr(backbone, "spatial_dims", None)
    if isinstance(dims, int) and not isinstance(dims, bool):
        return dims
    try:
        inputs = backbone.inputs if isinstance(backbone, keras.Model) else None
    except (AttributeError, ValueError):  # a Sequential that is not built has no inputs
        inputs = None
    if inputs:
        rank = len(inputs[0].shape) - 2
        if rank in _checks.SPATIAL_DIMS:
            return rank
    return None


def check_backbone_rank(backbone, spatial_dims: int, what: str) -> None:
    """Raise if `backbone` states a spatial rank other than `spatial_dims` (that of `what`,
    e.g. "the head LowRankLogits")."""
    dims = backbone_spatial_dims(backbone)
    if dims is not None and dims != spatial_dims:
        raise ValueError(
            f"{what} has spatial_dims={spatial_dims} ({input_form(spatial_dims, 'F')} "
            f"features) but the backbone {type(backbone).__name__} has spatial_dims={dims} "
            f"(inputs {input_form(dims)}): give both the same spatial_dims (2 for images, 3 "
            "for volumes; keras-hub and keras-cv backbones are 2D only)."
        )


def check_input_rank(shape, spatial_dims: int, name: str = "inputs") -> None:
    """Raise if a static input shape (a tuple or a tensor's shape) has a rank other than
    `spatial_dims + 2`; the message names `name`, the layout and `spatial_dims`."""
    rank = len(shape) if shape is not None else None
    if rank is not None and rank != spatial_dims + 2:
        hint = ""
        if rank - 2 in _checks.SPATIAL_DIMS:
            hint = f" ({rank - 2}D inputs need a model with spatial_dims={rank - 2})"
        raise ValueError(
            f"`{name}` must have rank {spatial_dims + 2} ({input_form(spatial_dims)} "
            f"{'images' if spatial_dims == 2 else 'volumes'}, spatial_dims={spatial_dims}); "
            f"got shape {tuple(shape)}{hint}."
        )


def check_feature_rank(features, spatial_dims: int, form: Optional[str] = None) -> None:
    """Raise if the backbone's output (a tensor or a static shape) does not have rank
    `spatial_dims + 2` (`form`: its layout, default `[B, *S, F]`)."""
    form = form or input_form(spatial_dims, "F")
    shape = tf.TensorShape(getattr(features, "shape", features))
    if shape.rank is not None and shape.rank != spatial_dims + 2:
        raise ValueError(
            f"`backbone output` must have rank {spatial_dims + 2} ({form} features for "
            f"spatial_dims={spatial_dims}); got shape {tuple(shape.as_list())}."
        )


def check_resolution(inputs, outputs, spatial_dims: int, hint: str = "") -> None:
    """Raise if the static spatial shape `S` of `outputs [B, *S, ...]` differs from that of
    `inputs [B, *S, channels]` (a backbone that does not return features at the input
    resolution); `hint` is appended to the message."""
    axes = slice(1, 1 + spatial_dims)
    want, got = inputs.shape[axes], outputs.shape[axes]
    if want.is_fully_defined() and got.is_fully_defined() and want != got:
        raise ValueError(
            f"The backbone must return features at the input resolution {tuple(want)}; got "
            f"{_checks.shape_str(outputs)}.{hint}"
        )
