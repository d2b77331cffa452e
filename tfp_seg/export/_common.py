"""What the exporters share: their errors, the signature names, argument checks, what they
read from a Keras model (its head, number of classes, input shape, variables), the choice of the
exported image spec, the region-of-interest input (`roi_mask`), and the parity comparison."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Optional, Tuple

import keras
import numpy as np
import tensorflow as tf

from tfp_seg import protocols

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
    """`(H, W, channels)` the model was built for, if it can be read from it."""
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
        if shape is not None and len(shape) == 4:
            return tuple(shape[1:])
    return None


# ============================================================================================
# Image spec and parity checks
# ============================================================================================
# The exception types by which a trace with unknown H, W fails when the graph needs a static
# size (OperatorNotAllowedInGraphError is a TypeError).
_STATIC_SHAPE_ERRORS = (TypeError, ValueError)


def _image_shape(adapter: ExportAdapter) -> Tuple[Optional[int], ...]:
    shape = adapter.image_shape
    if shape is None or len(shape) != 3 or shape[-1] is None:
        raise ValueError(
            f"Cannot tell the input shape of {type(adapter.trackable).__name__} "
            f"(got {shape}); build the model or pass image_shape=(H, W, channels)."
        )
    return tuple(shape)


def image_spec(
    adapter: ExportAdapter, dynamic_spatial, num_samples, roi_mask: bool = False
) -> tf.TensorSpec:
    """The exported `images` spec `[None, H, W, channels]`, H and W None where the model
    traces with unknown sizes (`dynamic_spatial`, see `saved_model`); with `roi_mask` the
    trace takes the region of interest too (`roi_mask_spec`)."""
    shape = _image_shape(adapter)
    fixed = tf.TensorSpec([None, *shape], tf.float32)
    dynamic = tf.TensorSpec([None, None, None, shape[-1]], tf.float32)
    if dynamic_spatial is False:
        if None in shape[:2]:
            raise ValueError(f"dynamic_spatial=False needs a fixed image_shape; got {shape}.")
        return fixed
    if dynamic_spatial is True or None in shape[:2]:
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


def check_images(images, spec: tf.TensorSpec, known_shape=None) -> np.ndarray:
    if images is not None:
        images = np.asarray(images, dtype=np.float32)
        if images.ndim != 4:
            raise ValueError(
                f"`check_images` must be [B, H, W, channels]; got shape {images.shape}."
            )
        return images
    h, w, c = spec.shape[1:]
    if (h is None or w is None) and known_shape is not None:
        h, w = known_shape[0], known_shape[1]
    if h is None or w is None:
        h = w = 32  # dynamic H/W and no known size; pass `check_images` if 32 is invalid
    return np.random.default_rng(0).normal(size=(2, h, w, c)).astype(np.float32)


# ============================================================================================
# The region of interest (`roi_mask=True`)
# ============================================================================================
def roi_mask_spec(spec: tf.TensorSpec) -> tf.TensorSpec:
    """`roi_mask` float32 `[B, H, W]` of an images spec `[B, H, W, channels]`."""
    return tf.TensorSpec(spec.shape[:3], tf.float32, name=ROI_MASK)


def graph_inputs(images, roi_mask=None):
    """What `ExportAdapter.prepare` takes in a graph: the images, or with a region of interest
    `{"images": images, "roi_mask": roi_mask}`, the mask checked to be `[B, H, W]` of the
    images (a `[1, H, W]` mask would otherwise broadcast over the batch)."""
    if roi_mask is None:
        return images
    roi_mask = tf.convert_to_tensor(roi_mask, tf.float32)
    check = tf.debugging.assert_equal(
        tf.shape(roi_mask),
        tf.shape(images)[:3],
        message="`roi_mask` must be [B, H, W] of the `images` [B, H, W, channels]",
    )
    with tf.control_dependencies([check]):
        # The reshape fails where the assertion is dropped (tf2onnx drops Assert ops).
        roi_mask = tf.reshape(roi_mask, tf.shape(images)[:3])
    return {"images": images, ROI_MASK: roi_mask}


def roi_check_inputs(
    adapter: ExportAdapter, roi_mask: bool, images, mask
) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """For an export with `roi_mask`: the images and mask of its checks, once
    `adapter.check_roi_mask` has accepted them (else `ExportError`); None without.

    `images` (the exporter's `check_images`; default: 2 random ones at the model's size, as
    `check_images`) and `mask` (its `check_roi_mask`, `[B, H, W]`; default: a centred square
    of half the image's side, 1 inside and 0 outside).
    """
    if not roi_mask:
        if mask is not None:
            raise ValueError("`check_roi_mask` needs `roi_mask=True`.")
        return None
    shape = _image_shape(adapter)
    images = check_images(images, tf.TensorSpec([None, *shape], tf.float32), shape)
    if mask is None:
        b, h, w = images.shape[:3]
        mask = np.zeros((b, h, w), np.float32)
        mask[:, h // 4 : h - h // 4, w // 4 : w - w // 4] = 1.0
    mask = np.asarray(mask, dtype=np.float32)
    if mask.shape != images.shape[:3]:
        raise ValueError(
            f"`check_roi_mask` must be [B, H, W] of the check images {images.shape}; got shape "
            f"{mask.shape}."
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
    zeros = np.zeros(images.shape[:3], np.float32)
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
