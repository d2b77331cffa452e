"""What the exporters share: their errors, the signature names, argument checks, what they
read from a Keras model (its head, number of classes, input shape, spatial rank, variables), the
choice of the exported image spec, the region-of-interest input (`roi_mask`), and the parity
comparison.

Everything here is rank-generic over the spatial shape `S`: `(H, W)` for images
(`images [B, H, W, channels]`, `roi_mask [B, H, W]`) and `(D, H, W)` for volumes
(`images [B, D, H, W, channels]`, `roi_mask [B, D, H, W]`); the rank is read from the image
shape `(*S, channels)` and checked against the model's declared `spatial_dims`."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from tfp_seg import _checks, protocols

if TYPE_CHECKING:  # annotations only: the adapters import this module
    from tfp_seg.export.adapters import ExportAdapter

__all__ = ["ExportError", "ExportParityError", "SIGNATURES"]

SIGNATURES = ("serving_default", "sample", "uncertainty", "params")
"""The signatures of an exported SavedModel, in this order (`ServingModule`)."""

ROI_MASK = "roi_mask"
"""The name of the region-of-interest input of an export with `roi_mask=True`."""


# ============================================================================================
# Errors
# ============================================================================================
class ExportError(RuntimeError):
    """The model could not be exported (conversion failed or produced an unusable file)."""


class ExportParityError(ExportError):
    """The exported artefact does not reproduce the Keras model's outputs within tolerance."""


# ============================================================================================
# What the exporters read from a model
# ============================================================================================
def distribution_head(model) -> Optional[protocols.Head]:
    """`model.head` if it is a distribution head (`tfp_seg.protocols.Head`), else None."""
    head = getattr(model, "head", None)
    return head if isinstance(head, protocols.Head) else None


def head_config(head) -> dict:
    return {
        "head": json.loads(json.dumps(keras.saving.serialize_keras_object(head), default=str)),
        "num_classes": int(head.num_classes),
        "params_size": int(head.params_size),
    }


def num_classes_of(model, what: str) -> int:
    """C of a model with a distribution head, or of one whose output is the logits."""
    head = distribution_head(model)
    if head is not None:
        return int(head.num_classes)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is None:
        try:
            num_classes = model.outputs[0].shape[-1]
        except (AttributeError, IndexError, TypeError, ValueError):
            num_classes = None
    if num_classes is None:
        raise ExportError(
            f"Cannot export {what}: its model {type(model).__name__} has no tfp_seg "
            "DistributionHead `.head` and no known number of output logits (`num_classes`)."
        )
    return int(num_classes)


def logit_samples_of(model, output, num_samples: int, seed, head_sampling: bool):
    """`num_samples` logit maps `[N, B, H, W, C]` from one forward pass's output, as
    `tfp_seg.uncertainty` samples a member / pass: the head's independent draws, or its mean
    logits (the output itself for a model without a head) repeated."""
    head = distribution_head(model)
    if head is not None:
        if head_sampling:
            return head.sample_logits(output, num_samples, seed=seed, antithetic=False)
        logits = head.mean_logits(output)
    else:
        logits = output
    logits = tf.cast(logits, tf.float32)
    return tf.repeat(logits[tf.newaxis], num_samples, axis=0)


def mean_logits_of(model, output):
    head = distribution_head(model)
    return head.mean_logits(output) if head is not None else output


def variables_of(trackable) -> list:
    variables = getattr(trackable, "variables", None)
    if variables is None:
        raise ValueError(
            f"Cannot find the weights of {type(trackable).__name__}: the adapter's `trackable` "
            "must be a Keras model/layer or a tf.Module (with `.variables`)."
        )
    return list(variables)


def tf_variable(variable):
    """The `tf.Variable` behind a Keras 3 variable (itself for a `tf.Variable`)."""
    if isinstance(variable, tf.Variable):
        return variable
    value = getattr(variable, "value", None)
    if isinstance(value, tf.Variable):
        return value
    raise TypeError(f"Cannot export variable {variable!r}: no tf.Variable behind it.")


def model_image_shape(model) -> Optional[Tuple[Optional[int], ...]]:
    """`(*S, channels)` the model was built for (`(H, W, channels)` or `(D, H, W, channels)`),
    if it can be read from it (a model built on `{"images", "roi_mask"}`: the images')."""
    try:
        inputs = getattr(model, "inputs", None)
        if inputs:
            return tuple(inputs[0].shape[1:])
    except (AttributeError, ValueError):
        pass
    get_build_config = getattr(model, "get_build_config", None)
    if callable(get_build_config):
        build = get_build_config() or {}
        shape = build.get("input_shape")
        if isinstance(shape, dict):
            shape = shape.get("images")
        if shape is not None and len(shape) - 2 in _checks.SPATIAL_DIMS:
            return tuple(shape[1:])
    return None


def declared_spatial_dims(model) -> Optional[int]:
    """The spatial rank a model states (2: images, 3: volumes): a tfp_seg sampler's
    `input_spatial_dims` (`ProbabilisticSegmenter`, `MCDropout`, `DeepEnsemble`,
    `ProbabilisticUNet`, ...), else an int `spatial_dims` attribute; None when it states none."""
    for name in ("input_spatial_dims", "spatial_dims"):
        dims = getattr(model, name, None)
        if isinstance(dims, (int, np.integer)) and not isinstance(dims, bool):
            if int(dims) in _checks.SPATIAL_DIMS:
                return int(dims)
    return None


# ============================================================================================
# Image spec and parity checks
# ============================================================================================
# The exception types by which a trace with unknown H, W fails when the graph needs a static
# size (OperatorNotAllowedInGraphError is a TypeError).
_STATIC_SHAPE_ERRORS = (TypeError, ValueError)


def _image_shape(adapter: ExportAdapter) -> Tuple[Optional[int], ...]:
    """The adapter's `(*S, channels)`, checked: 2 or 3 spatial axes, a known channel count,
    and as many spatial axes as the model's declared `spatial_dims` (`declared_spatial_dims`)."""
    shape = adapter.image_shape
    name = type(adapter.trackable).__name__
    if shape is None or len(shape) - 1 not in _checks.SPATIAL_DIMS or shape[-1] is None:
        raise ValueError(
            f"Cannot tell the input shape of {name} (got {shape}); build the model or pass "
            "image_shape=(H, W, channels) for images or (D, H, W, channels) for volumes."
        )
    dims = declared_spatial_dims(adapter.trackable)
    if dims is not None and len(shape) - 1 != dims:
        raise ValueError(
            f"`image_shape` {tuple(shape)} has {len(shape) - 1} spatial axes but {name} has "
            f"spatial_dims={dims}: pass image_shape=({_checks.spatial_axes(dims)}, channels)."
        )
    return tuple(shape)


def image_spec(
    adapter: ExportAdapter, dynamic_spatial, num_samples, roi_mask: bool = False
) -> tf.TensorSpec:
    """The exported `images` spec `[None, *S, channels]` (`S = (H, W)` or `(D, H, W)`), the
    spatial sizes None where the model traces with unknown sizes (`dynamic_spatial`, see
    `saved_model`); with `roi_mask` the trace takes the region of interest too
    (`roi_mask_spec`)."""
    shape = _image_shape(adapter)
    fixed = tf.TensorSpec([None, *shape], tf.float32)
    dynamic = tf.TensorSpec([None] * len(shape) + [shape[-1]], tf.float32)
    if dynamic_spatial is False:
        if None in shape[:-1]:
            raise ValueError(f"dynamic_spatial=False needs a fixed image_shape; got {shape}.")
        return fixed
    if dynamic_spatial is True or None in shape[:-1]:
        return dynamic

    def trace(spec):
        def run(images, *mask):
            state = adapter.prepare(graph_inputs(images, *mask))
            return adapter.mean_logits(state), adapter.sample_logits(state, num_samples)

        specs = [spec, roi_mask_spec(spec)] if roi_mask else [spec]
        tf.function(run, autograph=False).get_concrete_function(*specs)

    try:
        trace(dynamic)
        return dynamic
    except _STATIC_SHAPE_ERRORS:
        # Layers that need a static H, W fail to trace with unknown ones with a TypeError
        # (Keras' bilinear UpSampling2D tests a symbolic shape in Python:
        # OperatorNotAllowedInGraphError; keras-hub's MiT multiplies `None` sizes) or a
        # ValueError (shape inference). Such an error is the dynamic size's only if the
        # fixed-size trace succeeds; if that fails too, its error is the model's own and
        # propagates (with the dynamic one as context). Other types always propagate.
        trace(fixed)
    return fixed


def images_form(spatial_dims: int) -> str:
    """`"[B, H, W, channels]"` or `"[B, D, H, W, channels]"`, for messages."""
    return _checks.spatial_form(spatial_dims, "B", "channels")


def check_images(images, spec: tf.TensorSpec, known_shape=None) -> np.ndarray:
    """The parity checks' images `[B, *S, channels]` of the exported `spec`: `images` checked
    against its rank and channels, or (None) 2 random ones at the spec's sizes, where a size is
    dynamic at `known_shape`'s (the model's build shape), else 32 (images) / 16 (volumes)."""
    rank = spec.shape.rank
    form = images_form(rank - 2)
    channels = spec.shape[-1]
    if images is not None:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != rank or (channels is not None and images.shape[-1] != channels):
            raise ValueError(
                f"`check_images` must be {form} with channels={channels}, as the exported "
                f"`images` {spec.shape.as_list()}; got shape {images.shape}."
            )
        return images
    known = [None] * (rank - 2) if known_shape is None else list(known_shape[:-1])
    if len(known) != rank - 2:
        known = [None] * (rank - 2)
    default = 32 if rank == 4 else 16  # dynamic sizes, none known: pass `check_images` if invalid
    sizes = [
        d if d is not None else (k if k is not None else default)
        for d, k in zip(spec.shape[1:-1], known, strict=True)
    ]
    return np.random.default_rng(0).normal(size=(2, *sizes, channels)).astype(np.float32)


# ============================================================================================
# The region of interest (`roi_mask=True`)
# ============================================================================================
def roi_mask_spec(spec: tf.TensorSpec) -> tf.TensorSpec:
    """`roi_mask` float32 `[B, *S]` of an images spec `[B, *S, channels]`."""
    return tf.TensorSpec(spec.shape[:-1], tf.float32, name=ROI_MASK)


def graph_inputs(images, roi_mask=None, shape=None):
    """What `ExportAdapter.prepare` takes in a graph: the images, or with a region of interest
    `{"images": images, "roi_mask": roi_mask}`, the mask checked to be `[B, *S]` of the
    images `[B, *S, channels]` (a `[1, *S]` mask would otherwise broadcast over the batch).

    With `shape` (the exported images spec's, e.g. `[None, D, H, W, channels]`) the images
    are checked against it at run time (`tf.ensure_shape`): a loaded SavedModel's
    `signatures[name](...)` does not check its inputs' shapes, and an input of another rank
    would otherwise run through the graph and return outputs of another rank."""
    if shape is not None:
        images = tf.ensure_shape(images, shape)
    if roi_mask is None:
        return images
    roi_mask = tf.convert_to_tensor(roi_mask, tf.float32)
    spatial_dims = images.shape.rank - 2
    form = _checks.spatial_form(spatial_dims, "B")
    check = tf.debugging.assert_equal(
        tf.shape(roi_mask),
        tf.shape(images)[:-1],
        message=f"`roi_mask` must be {form} of the `images` {images_form(spatial_dims)}",
    )
    with tf.control_dependencies([check]):
        # The reshape fails where the assertion is dropped (tf2onnx drops Assert ops).
        roi_mask = tf.reshape(roi_mask, tf.shape(images)[:-1])
    return {"images": images, ROI_MASK: roi_mask}


def roi_check_inputs(
    adapter: ExportAdapter, roi_mask: bool, images, mask
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """For an export with `roi_mask`: the images and mask of its checks, once
    `adapter.check_roi_mask` has accepted them (else `ExportError`); None without.

    `images` (the exporter's `check_images`; default: 2 random ones at the model's size, as
    `check_images`) and `mask` (its `check_roi_mask`, `[B, *S]`; default: a centred box of
    half the image's side along every spatial axis, 1 inside and 0 outside).
    """
    if not roi_mask:
        if mask is not None:
            raise ValueError("`check_roi_mask` needs `roi_mask=True`.")
        return None
    shape = _image_shape(adapter)
    images = check_images(images, tf.TensorSpec([None, *shape], tf.float32), shape)
    if mask is None:
        mask = np.zeros(images.shape[:-1], np.float32)
        box = tuple(slice(n // 4, n - n // 4) for n in images.shape[1:-1])
        mask[(slice(None), *box)] = 1.0
    mask = np.asarray(mask, dtype=np.float32)
    if mask.shape != images.shape[:-1]:
        raise ValueError(
            f"`check_roi_mask` must be {_checks.spatial_form(images.ndim - 2, 'B')} of the "
            f"check images {images.shape}; got shape {mask.shape}."
        )
    adapter.check_roi_mask(images)
    return images, mask


def parity_inputs(adapter: ExportAdapter, spec, images, roi_check) -> dict:
    """The inputs of the parity checks by input name: `{"images": ...}` (the exporter's
    `check_images`, or random ones: `check_images`), or with a region of interest the
    images and mask of `roi_check_inputs`."""
    if roi_check is None:
        return {"images": check_images(images, spec, adapter.image_shape)}
    return dict(zip(("images", ROI_MASK), roi_check, strict=True))


def check_takes_roi_mask(model, images: np.ndarray, what: str) -> None:
    """Raise `ExportError` unless `model({"images": ..., "roi_mask": ...})` runs and its output
    depends on the mask (checked with an all-zero mask: for `LowRankLogits` /
    `MixtureLowRankLogits` it zeroes the factor and sets the diagonal to epsilon everywhere)."""
    head = distribution_head(model)
    name = type(model).__name__ + (f" with head {type(head).__name__}" if head else "")
    zeros = np.zeros(images.shape[:-1], np.float32)
    try:
        masked = model({"images": images, ROI_MASK: zeros}, training=False)
    except (KeyError, TypeError, ValueError) as err:
        raise ExportError(
            f"Cannot export {what} with roi_mask=True: {name} does not take a region of "
            f"interest (called with {{'images', 'roi_mask'}} it raised {type(err).__name__}, "
            "the cause of this error). Heads that take one: LowRankLogits, "
            "MixtureLowRankLogits; export without roi_mask otherwise."
        ) from err
    plain = model(images, training=False)
    if np.array_equal(np.asarray(masked), np.asarray(plain)):
        raise ExportError(
            f"Cannot export {what} with roi_mask=True: {name} ignores the `roi_mask` (its "
            "output with an all-zero mask equals its output without one); export without "
            "roi_mask."
        )


def assert_close(what: str, got: np.ndarray, expected: np.ndarray, atol: float) -> None:
    got = np.asarray(got)
    if got.shape != expected.shape:
        raise ExportParityError(f"{what}: shape {got.shape} != Keras {expected.shape}.")
    diff = float(np.max(np.abs(got.astype(np.float64) - expected))) if got.size else 0.0
    if not diff <= atol:
        raise ExportParityError(f"{what}: max |exported - Keras| = {diff:.3g} > atol={atol}.")
