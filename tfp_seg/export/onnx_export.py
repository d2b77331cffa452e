"""`onnx`: an ONNX graph converted with tf2onnx, parity-checked in onnxruntime."""

from __future__ import annotations

import json
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfp_seg import _checks, _io
from tfp_seg import distributions as dists
from tfp_seg.export import _common, dispatch, graphs

__all__ = ["onnx"]


def onnx(
    model,
    path: str,
    num_samples: int = 16,
    opset: int = 17,
    *,
    image_shape: Optional[Sequence[Optional[int]]] = None,
    dynamic_spatial: Optional[bool] = None,
    check_images=None,
    atol: float = 1e-4,
    roi_mask: bool = False,
    check_roi_mask=None,
) -> str:
    """Export `model` to ONNX with tf2onnx and check it in onnxruntime.

    The graph takes `images` float32 `[B, H, W, channels]` (dynamic B) and returns the
    deterministic parameters (`params`, `mean_logits`, and `loc`, `cov_factor`, `cov_diag` for
    heads with a covariance), `num_samples` independent logit samples (Box-Muller on ONNX
    `RandomUniformLike`; `logit_samples [N, B, H, W, C]`, `label_samples [N, B, H, W]` int32),
    their mean `probabilities [B, H, W, C]`, `labels [B, H, W]` int32 and the uncertainty maps
    (`predictive_entropy`, `expected_entropy`, `mutual_information`, `variance`, `[B, H, W]`).
    Every sampled output of a run is computed from that run's `logit_samples` (no antithetic
    pairs: they are what a client sees). With `roi_mask=True` the graph has a second input
    `roi_mask` float32 `[B, H, W]` (the region of interest, 1 inside), passed with the images
    to the head, as `model({"images": images, "roi_mask": roi_mask})`; the models it applies
    to are those of `saved_model(..., roi_mask=True)`.

    Volumes (a model with `spatial_dims=3`) take `images [B, D, H, W, channels]` (and
    `roi_mask [B, D, H, W]`) through the same code path; every spatial output gains the axis
    `D` (`logit_samples [N, B, D, H, W, C]`, `labels [B, D, H, W]`, ...). The built-in 3D
    U-Net's ops (Conv3D, MaxPool3D, group normalisation, gather-based trilinear upsampling)
    all convert; it has no transposed 3D convolution.

    The converted graph is loaded and run in onnxruntime before it is written: its
    deterministic outputs must match the Keras model within `atol`, and its samples must vary
    between runs where the Keras model's do, or `ExportParityError` is raised and nothing is
    written.

    Args:
      model: see `saved_model`.
      path: the `.onnx` file to write.
      num_samples: N, fixed in the graph.
      opset: ONNX opset.
      image_shape, dynamic_spatial, check_images, atol, roi_mask, check_roi_mask: see
        `saved_model`.

    Returns:
      `path`.
    """
    try:
        import onnx as onnx_lib
        import onnxruntime
        import tf2onnx
    except ImportError as err:
        raise ImportError(
            f"ONNX export needs tf2onnx, onnx and onnxruntime ({err}); install them with "
            "`pip install tfp_seg[onnx]`."
        ) from err
    num_samples = _checks.positive_int(num_samples, "num_samples")
    adapter = dispatch.as_adapter(model, image_shape)
    roi_mask = bool(roi_mask)
    roi_check = _common.roi_check_inputs(adapter, roi_mask, check_images, check_roi_mask)
    spec = _common.image_spec(adapter, dynamic_spatial, num_samples, roi_mask)
    input_signature = [tf.TensorSpec(spec.shape, tf.float32, name="images")]
    if roi_mask:
        input_signature.append(_common.roi_mask_spec(spec))

    @tf.function(input_signature=input_signature, autograph=False)
    def graph(images, *mask):
        state = adapter.prepare(_common.graph_inputs(images, *mask, shape=spec.shape))
        out = {k: tf.cast(v, tf.float32) for k, v in adapter.params(state).items()}
        out["mean_logits"] = tf.cast(adapter.mean_logits(state), tf.float32)
        # Independent draws: the same samples feed `logit_samples` and the averages.
        samples = tf.cast(adapter.sample_logits(state, num_samples, seed=None), tf.float32)
        probabilities = dists.mean_softmax(samples)
        out.update(
            logit_samples=samples,
            label_samples=dists.argmax_classes(samples),
            probabilities=probabilities,
            labels=dists.argmax_classes(probabilities),
        )
        out.update(graphs.uncertainty_maps(samples))
        return out

    path = os.fspath(path)
    # Trace here, outside the conversion's error handling: an error of the model itself
    # surfaces as what it is, not as a conversion failure.
    graph.get_concrete_function()
    try:
        model_proto, _ = tf2onnx.convert.from_function(
            graph, input_signature=input_signature, opset=opset
        )
    except Exception as err:  # tf2onnx raises many types; the cause is chained
        raise _common.ExportError(
            f"tf2onnx could not convert {type(adapter.trackable).__name__}: {err}"
        ) from err
    meta = model_proto.metadata_props.add()
    meta.key = "tfp_seg"
    meta.value = json.dumps(
        {
            "head_config": adapter.config,
            "num_samples": num_samples,
            "inputs": [t.name for t in input_signature],
        },
        sort_keys=True,
    )
    # Check the graph before writing it: a file at `path` has passed the parity checks.
    serialized = model_proto.SerializeToString()
    try:
        onnx_lib.checker.check_model(model_proto)
        session = onnxruntime.InferenceSession(serialized, providers=["CPUExecutionProvider"])
    except (onnx_lib.checker.ValidationError, ValueError, *_onnxruntime_errors()) as err:
        raise _common.ExportError(
            f"tf2onnx produced a graph that does not load in onnxruntime (not written to "
            f"{path}): {err}"
        ) from err
    inputs = _common.parity_inputs(adapter, spec, check_images, roi_check)
    _check_onnx(adapter, session, inputs, atol, path, num_samples)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _io.atomic_write_bytes(path, serialized)
    return path


def _check_onnx(adapter, session, inputs, atol, path, num_samples):
    """Compare the graph in `session` with `adapter` on `inputs` (`{"images": ...}`, plus
    `"roi_mask"` with a region of interest), and check that its samples vary between runs."""
    names = [o.name for o in session.get_outputs()]
    try:
        first = dict(zip(names, session.run(None, inputs), strict=True))
        (second,) = session.run(["logit_samples"], inputs)
    except _onnxruntime_errors() as err:
        raise _common.ExportError(
            f"The ONNX graph for {path} fails to run in onnxruntime: {err}"
        ) from err
    state = adapter.prepare(
        _common.graph_inputs(tf.constant(inputs["images"]), inputs.get(_common.ROI_MASK))
    )
    expected = {k: np.asarray(v) for k, v in adapter.params(state).items()}
    expected["mean_logits"] = np.asarray(adapter.mean_logits(state))
    for name, value in expected.items():
        _common.assert_close(f"ONNX {name}", first[name], value, atol)
    if _is_stochastic(adapter, state, num_samples):
        if np.array_equal(first["logit_samples"], second):
            raise _common.ExportParityError(
                f"{path}: logit samples are identical across runs although the Keras model's "
                "are not: the sampling noise was frozen into a constant (sample with "
                "tf.random ops, not keras.random.normal)."
            )


def _onnxruntime_errors() -> tuple:
    """The exception types onnxruntime raises (its own `Fail`, `InvalidGraph`, ... derive
    from `Exception` directly; pybind11 turns other C++ errors into `RuntimeError`)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    own = tuple(
        value
        for value in vars(state).values()
        if isinstance(value, type) and issubclass(value, Exception)
    )
    return (RuntimeError, *own)


def _is_stochastic(adapter, state, num_samples) -> bool:
    """Whether the model's logit samples vary (analytic variance, else two seeded draws)."""
    variance = adapter.logit_variance(state)
    if variance is not None:
        return float(np.max(np.asarray(variance))) > 1e-6
    draws = [
        np.asarray(adapter.sample_logits(state, num_samples, seed=tf.constant([0, s], tf.int64)))
        for s in (1, 2)
    ]
    return float(np.max(np.abs(draws[0] - draws[1]))) > 1e-6
