"""`as_adapter`: which `ExportAdapter` a model is exported through."""

from __future__ import annotations

import json
from typing import Optional, Sequence

import keras

from tfp_seg import protocols
from tfp_seg.export import _common, adapters, wrappers
from tfp_seg.models.sliding import SlidingWindowSampler
from tfp_seg.models.wrappers import DeepEnsemble, MCDropout

__all__ = ["as_adapter"]


def as_adapter(
    model, image_shape: Optional[Sequence[Optional[int]]] = None
) -> adapters.ExportAdapter:
    """The `ExportAdapter` of `model` (returned unchanged if it already is one).

    A `tfp_seg.models.SlidingWindowSampler` exports its model: the network's one pass over
    the whole input (volumes of any size the network takes), not the windows.

    Recognised, in order:
      0. a `tfp_seg.protocols.ControlledModel` (`tfp_seg.calibration.ControlledSampler`):
         as 1., with the wrapped model's params through its control;
      1. a model whose `head` is a distribution head (`tfp_seg.protocols.Head`, e.g. a
         `tfp_seg.layers.DistributionHead`) and `model(x) -> params` (`ProbabilisticSegmenter`,
         any head);
      2. `tfp_seg.models.MCDropout`: the sampled outputs are forward passes with the
         dropout layers on (Dropout, SpatialDropout*, GaussianDropout; others raise
         `ExportError`), the deterministic ones the network with dropout off;
      3. `tfp_seg.models.DeepEnsemble`: every member in the graph, sample `n` from member
         `n mod M`;
      4. a model that samples itself in graph-safe ops: a `tfp_seg.protocols.GraphSampler`
         (`ProbabilisticUNet`, or a model of your own), which declares
         - `num_classes`: C;
         - `sample_logits_tensor(images, num_samples, seed=None)`: independent logit samples
           `[N, B, H, W, C]` (a float tensor) in graph-safe TensorFlow ops, `num_samples` a
           Python int and `seed` None (stateful random ops, fresh per request) or an int64
           `[2]` tensor (stateless ops: seeded requests are reproducible);
         - `mean_logits_tensor(images)`: the deterministic logits `[B, H, W, C]` (`params`
           signature, parity checks).
         A `tfp_seg.protocols.GraphParams` (`params_tensors(images) -> {name: t}`) adds
         outputs to the `params` signature. Anything else exports through
         `tfp_seg.export.ExportAdapter.from_functions(...)`.
    """
    if isinstance(model, adapters.ExportAdapter):
        if image_shape is not None:
            model.image_shape = tuple(image_shape)
        return model
    if isinstance(model, SlidingWindowSampler):
        model = model.model
    if isinstance(model, protocols.ControlledModel):
        return adapters.ControlledHeadAdapter(model, image_shape)
    if _common.distribution_head(model) is not None:
        return adapters.HeadAdapter(model, image_shape)
    if isinstance(model, MCDropout):
        return wrappers.MCDropoutAdapter(model, image_shape)
    if isinstance(model, DeepEnsemble):
        return wrappers.EnsembleAdapter(model, image_shape)
    if isinstance(model, protocols.GraphSampler):
        num_classes = model.num_classes
        sample_fn, mean_fn = model.sample_logits_tensor, model.mean_logits_tensor
        params_fn = model.params_tensors if isinstance(model, protocols.GraphParams) else None
        config = {
            "format": "tfp_seg.export/1",
            "model": type(model).__name__,
            "num_classes": int(num_classes),
        }
        try:
            config["model_config"] = json.loads(
                json.dumps(keras.saving.serialize_keras_object(model), default=str)
            )
        except (NotImplementedError, TypeError, ValueError):
            # The config is informative only; models without a serialisable `get_config`
            # (Keras raises NotImplementedError or TypeError) export without it.
            pass
        return adapters.FunctionAdapter(
            model,
            num_classes,
            lambda x, n, seed: sample_fn(x, n, seed=seed),
            mean_fn,
            params_fn,
            config,
            image_shape,
        )
    raise ValueError(
        f"Cannot export {type(model).__name__}: expected a model with a tfp_seg "
        "DistributionHead as `.head` (params = model(x)), an MCDropout or DeepEnsemble, or a "
        "tfp_seg.protocols.GraphSampler (`num_classes`, graph-safe "
        "`sample_logits_tensor(images, num_samples, seed=None)` and "
        "`mean_logits_tensor(images)`); or pass tfp_seg.export.ExportAdapter.from_functions(...)."
    )
