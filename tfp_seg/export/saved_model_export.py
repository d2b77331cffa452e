"""`saved_model`: a SavedModel in TF Serving's `<base>/<version>/` layout, parity-checked through
`tf.saved_model.load` and through the TF1 session loader TF Serving uses."""

from __future__ import annotations

import json
import os
import re
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfp_seg import _checks, _io
from tfp_seg import distributions as dists
from tfp_seg.export import _common, dispatch, graphs

__all__ = ["saved_model"]


def saved_model(
    model,
    export_dir: str,
    num_samples: int = 16,
    *,
    image_shape: Optional[Sequence[Optional[int]]] = None,
    dynamic_spatial: Optional[bool] = None,
    max_num_samples: int = 1024,
    overwrite: bool = False,
    check: bool = True,
    check_images=None,
    atol: float = 1e-4,
    roi_mask: bool = False,
    check_roi_mask=None,
) -> str:
    """Export `model` as a SavedModel for TF Serving, `<base>/<version>/`, and check it.

    Images `[B, H, W, channels]` or volumes `[B, D, H, W, channels]` (a model with
    `spatial_dims=3`): one code path, the same signatures and outputs with the spatial shape
    `S` of the inputs (`probabilities [B, *S, C]`, `labels [B, *S]`, `logits [N, B, *S, C]`,
    uncertainty maps `[B, *S]`, `roi_mask [B, *S]`). Shapes below are written for images.

    With `roi_mask=True` every signature takes a second input `roi_mask` float32 `[B, H, W]`
    (the region of interest, 1 inside, 0 outside) after `images`, passed with them to the
    head: `serving_default(images, roi_mask, num_samples?, seed?)`, ...,
    `params(images, roi_mask)`; the outputs are those of
    `model({"images": images, "roi_mask": roi_mask})`. Without it the signatures take the
    images alone. The option needs a model whose head takes a region (a
    `ProbabilisticSegmenter` with `LowRankLogits` or `MixtureLowRankLogits`), or an
    `MCDropout` / `DeepEnsemble` over such models (every member); any other model (a
    `CategoricalLogits` / `HeteroscedasticLogits` head, a `ProbabilisticUNet` or another
    self-sampling model, `ExportAdapter.from_functions`) is an `ExportError`, raised before
    anything is written.

    Args:
      model: a `ProbabilisticSegmenter` (any head), a `tfp_seg.models.MCDropout` or
        `DeepEnsemble`, a model that samples itself, or an `ExportAdapter` (see `as_adapter`).
      export_dir: `"savedmodels/<name>/<version>"` (integer version, TF Serving's layout), or
        `"savedmodels/<name>"` to write the next free version (1 if none).
      num_samples: default N of the sampled signatures, and the sampling chunk: a seeded
        `sample` request for exactly N samples reproduces
        `head.sample_logits(params, N, seed=seed, antithetic=False)` (independent draws);
        `serving_default` averages `head.sample_logits(params, N, seed=seed)` (the head's
        antithetic default, for even N).
      image_shape: `(H, W, channels)` (volumes: `(D, H, W, channels)`); default: the shape
        the model was built for. Its number of spatial axes must be the model's
        `spatial_dims` (`ValueError` otherwise).
      dynamic_spatial: export with dynamic H/W (True), the fixed `image_shape` (False), or try
        dynamic and fall back to fixed when the model needs a static size (None): when its
        trace with unknown H, W fails with a TypeError or ValueError and the fixed-size trace
        does not. Any other error of the model's trace is raised.
      max_num_samples: requests for more samples fail with INVALID_ARGUMENT.
      overwrite: replace an existing version directory.
      check: reload the SavedModel and compare its `params` outputs and a seeded `sample`
        with the Keras model; beyond `atol` raise `ExportParityError` and leave no version
        directory behind.
      check_images: images `[B, H, W, channels]` for the check (default: 2 random images).
      roi_mask: export the `roi_mask` input (see above).
      check_roi_mask: with `roi_mask`, the mask `[B, H, W]` of `check_images` for the check
        (default: a centred square (volumes: cube) of half the image's side).

    Returns:
      The version directory written.
    """
    num_samples = _checks.positive_int(num_samples, "num_samples")
    max_num_samples = _checks.positive_int(max_num_samples, "max_num_samples")
    if max_num_samples < num_samples:
        raise ValueError(
            f"`max_num_samples` ({max_num_samples}) must be >= `num_samples` ({num_samples})."
        )
    adapter = dispatch.as_adapter(model, image_shape)
    export_dir = _version_dir(export_dir)
    if os.path.exists(export_dir) and os.listdir(export_dir) and not overwrite:
        raise FileExistsError(
            f"{export_dir} exists and is not empty; pass overwrite=True or a new version."
        )
    roi_mask = bool(roi_mask)
    roi_check = _common.roi_check_inputs(adapter, roi_mask, check_images, check_roi_mask)

    spec = _common.image_spec(adapter, dynamic_spatial, num_samples, roi_mask)
    # The check's inputs are checked before anything is written.
    inputs = _common.parity_inputs(adapter, spec, check_images, roi_check) if check else None
    module = graphs.ServingModule(adapter, spec, num_samples, max_num_samples, roi_mask)
    parent = os.path.dirname(os.path.abspath(export_dir))
    os.makedirs(parent, exist_ok=True)
    # Write and check next to the target (`<version>.tmp-<random>`), then rename
    # (`tfp_seg._io.atomic_dir`): TF Serving never sees a half-written or unchecked version (it
    # ignores non-integer folder names), and a failed check leaves nothing behind.
    with _io.atomic_dir(export_dir) as tmp:
        tf.saved_model.save(module, tmp, signatures=module.signatures())
        extra = os.path.join(tmp, "assets.extra")
        os.makedirs(extra, exist_ok=True)
        with open(os.path.join(extra, "tfp_seg.json"), "w") as f:
            json.dump(
                {
                    "head_config": adapter.config,
                    "signatures": list(_common.SIGNATURES),
                    "inputs": ["images", _common.ROI_MASK] if roi_mask else ["images"],
                    "num_samples": num_samples,
                    "max_num_samples": max_num_samples,
                    "image_shape": [None if d is None else int(d) for d in spec.shape[1:]],
                },
                f,
                indent=2,
                sort_keys=True,
            )
        if inputs is not None:
            _check_saved_model(adapter, tmp, inputs, num_samples, atol)
    return export_dir


def _check_saved_model(adapter, export_dir, inputs, num_samples, atol):
    """Compare the SavedModel at `export_dir` with `adapter` on `inputs` (`{"images": ...}`,
    plus `"roi_mask"` in an export with a region of interest): `params` through the TF1
    session loader and `tf.saved_model.load`, seeded `sample` logits and `serving_default`
    probabilities through the latter."""
    tensors = {name: tf.constant(value) for name, value in inputs.items()}
    state = adapter.prepare(_common.graph_inputs(tensors["images"], tensors.get(_common.ROI_MASK)))
    expected = {k: np.asarray(v) for k, v in adapter.params(state).items()}
    # TF Serving's path: a TF1 session loader feeding the SignatureDef's tensor names.
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as session:
        logger = tf.get_logger()
        level = logger.level
        logger.setLevel("ERROR")  # the TF1 loader's deprecation notice is not for our users
        try:
            meta_graph = tf.compat.v1.saved_model.loader.load(session, ["serve"], export_dir)
        finally:
            logger.setLevel(level)
        signature_def = meta_graph.signature_def["params"]
        names = sorted(expected)
        try:
            values = session.run(
                [signature_def.outputs[name].name for name in names],
                {signature_def.inputs[key].name: value for key, value in inputs.items()},
            )
        except tf.errors.OpError as err:
            raise _common.ExportError(
                f"The SavedModel does not run in a TF1 session (TF Serving's loader): {err}"
            ) from err
    for name, value in zip(names, values, strict=True):
        _common.assert_close(f"SavedModel (session) params/{name}", value, expected[name], atol)
    loaded = tf.saved_model.load(export_dir)
    got = loaded.signatures["params"](**tensors)
    for name, value in expected.items():
        _common.assert_close(f"SavedModel params/{name}", np.asarray(got[name]), value, atol)
    seed = tf.constant([1234, 5678], tf.int64)
    reference = np.asarray(adapter.sample_logits(state, num_samples, seed=seed))
    sampled = loaded.signatures["sample"](
        **tensors, num_samples=tf.constant(num_samples), seed=seed
    )
    _common.assert_close(
        "SavedModel sample/logits (seeded)", np.asarray(sampled["logits"]), reference, atol
    )
    reference = np.asarray(
        dists.mean_softmax(adapter.sample_logits_for_mean(state, num_samples, seed=seed))
    )
    averaged = loaded.signatures["serving_default"](
        **tensors, num_samples=tf.constant(num_samples), seed=seed
    )
    _common.assert_close(
        "SavedModel serving_default/probabilities (seeded)",
        np.asarray(averaged["probabilities"]),
        reference,
        atol,
    )


def _version_dir(export_dir: str) -> str:
    export_dir = os.fspath(export_dir).rstrip("/\\") or "."
    base, last = os.path.split(export_dir)
    if re.fullmatch(r"\d+", last):
        if not base:
            raise ValueError(
                f"`export_dir` must be '<base>/<version>' (TF Serving layout); got {export_dir!r}."
            )
        return export_dir
    versions = [
        int(d)
        for d in (os.listdir(export_dir) if os.path.isdir(export_dir) else [])
        if re.fullmatch(r"\d+", d)
    ]
    return os.path.join(export_dir, str(max(versions, default=0) + 1))
