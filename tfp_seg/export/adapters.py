"""`ExportAdapter`: the export contract of a probabilistic segmentation model, and its
adapters for a model with a distribution head (`HeadAdapter`) and for plain functions
(`FunctionAdapter`, `ExportAdapter.from_functions`)."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence

import numpy as np
import tensorflow as tf

from tfp_seg import _checks, protocols
from tfp_seg.export import _common

__all__ = ["ControlledHeadAdapter", "ExportAdapter", "FunctionAdapter", "HeadAdapter"]


class ExportAdapter:
    """The export contract of a probabilistic segmentation model.

    Subclasses (or `ExportAdapter.from_functions`) provide `prepare`, `params`, `mean_logits`
    and `sample_logits` in graph-safe TensorFlow ops; `sample_logits` must accept a Python int
    `num_samples` and a `seed` that is None (stateful `tf.random` ops) or an int64 `[2]`
    tensor (stateless, reproducible), and return independent draws: they are what a client of
    the `sample` signature (or ONNX `logit_samples`) gets. `sample_logits_for_mean` may return
    correlated draws with the same marginals (antithetic pairs) for Monte Carlo means; by
    default it is `sample_logits`. `trackable` is the object that owns the variables (the
    Keras model); its variables (`variables()`) are stored on the exported module.

    `prepare` takes the images `[B, H, W, channels]`; in an export with a region of interest
    (`saved_model(..., roi_mask=True)`) it takes `{"images": ..., "roi_mask": [B, H, W]}`
    and passes the mask to the model. `check_roi_mask` says whether an adapter does: by
    default it does not (an adapter of your own that does overrides it).

    The shapes here are written for images, `S = (H, W)`; for volumes (a model with
    `spatial_dims=3`, `image_shape = (D, H, W, channels)`) every `H, W` reads `D, H, W`
    (`images [B, D, H, W, channels]`, `roi_mask [B, D, H, W]`, samples `[N, B, D, H, W, C]`):
    one contract and one code path for both ranks.

    Args:
      trackable: the Keras model (or any `tf.Module`) holding the weights.
      num_classes: C.
      config: JSON-serialisable description written into the export (`head_config`).
      image_shape: default `(H, W, channels)` (volumes: `(D, H, W, channels)`) of the inputs
        (sizes may be None), if known.
    """

    def __init__(
        self,
        trackable,
        num_classes: int,
        config: Optional[dict] = None,
        image_shape: Optional[Sequence[Optional[int]]] = None,
    ):
        self.trackable = trackable
        self.num_classes = int(num_classes)
        self.config = dict(config or {})
        self.image_shape = None if image_shape is None else tuple(image_shape)

    def prepare(self, images):
        """Run the network once: any nested structure of tensors (the sampling state).
        `images`: a `[B, H, W, channels]` tensor, or `{"images": ..., "roi_mask": [B, H, W]}`
        in an export with a region of interest."""
        raise NotImplementedError

    def check_roi_mask(self, images: np.ndarray) -> None:
        """Raise `ExportError` unless `prepare` takes a region of interest (`{"images": ...,
        "roi_mask": [B, H, W]}`) and passes it to the model: called by an export with
        `roi_mask=True`, with check images `[B, H, W, channels]`. Default: it does not."""
        del images
        raise _common.ExportError(
            f"Cannot export {type(self.trackable).__name__} with roi_mask=True: its export "
            f"adapter ({type(self).__name__}) takes no region of interest. A roi_mask input "
            "needs a ProbabilisticSegmenter whose head takes one (LowRankLogits, "
            "MixtureLowRankLogits), or an MCDropout / DeepEnsemble over such models; export "
            "without roi_mask otherwise."
        )

    def params(self, state) -> Dict[str, tf.Tensor]:
        """Named deterministic distribution parameters (float tensors with batch axis 0)."""
        raise NotImplementedError

    def mean_logits(self, state) -> tf.Tensor:
        """Mean (or deterministic) logits `[B, H, W, C]`."""
        raise NotImplementedError

    def sample_logits(self, state, num_samples: int, seed=None) -> tf.Tensor:
        """Independent logit samples `[num_samples, B, H, W, C]` in export-safe ops."""
        raise NotImplementedError

    def sample_logits_for_mean(self, state, num_samples: int, seed=None) -> tf.Tensor:
        """Logit samples `[num_samples, B, H, W, C]` whose softmax is averaged (the
        `probabilities` of `serving_default`): any draws with the right marginals, e.g.
        antithetic pairs. Default: `sample_logits`."""
        return self.sample_logits(state, num_samples, seed=seed)

    def sample_chunk(self, state, num_samples: int, seed, start, for_mean: bool = False):
        """Samples `start, ..., start + num_samples - 1` of one request (`start`: an int32
        scalar tensor), as the SavedModel signatures draw them chunk by chunk. The default
        ignores `start`; samplers whose draw depends on the sample's index (a deep ensemble
        draws sample `n` from member `n mod M`) override it, with `start = 0` equal to
        `sample_logits` / `sample_logits_for_mean`."""
        del start
        if for_mean:
            return self.sample_logits_for_mean(state, num_samples, seed=seed)
        return self.sample_logits(state, num_samples, seed=seed)

    def logit_variance(self, state) -> Optional[tf.Tensor]:
        """Analytic per-logit variance `[B, H, W, C]`, or None when unknown (used by checks)."""
        return None

    def variables(self) -> list:
        """The variables the exported graphs read (default: `trackable.variables`)."""
        return _common.variables_of(self.trackable)

    @classmethod
    def from_functions(
        cls,
        trackable,
        num_classes: int,
        sample_logits: Callable,
        mean_logits: Callable,
        params: Optional[Callable] = None,
        config: Optional[dict] = None,
        image_shape: Optional[Sequence[Optional[int]]] = None,
        logit_variance: Optional[Callable] = None,
    ) -> "ExportAdapter":
        """An adapter from plain functions of the images.

        Args:
          trackable: the Keras model (or `tf.Module`) that owns the functions' variables.
          num_classes: C.
          sample_logits: `(images, num_samples: int, seed) -> [N, B, H, W, C]`, independent
            draws; `seed` is None or an int64 `[2]` tensor.
          mean_logits: `images -> [B, H, W, C]`.
          params: `images -> {name: tensor}` (default: `{"mean_logits": mean_logits}`).
          config: JSON-serialisable description (the `head_config` output).
          image_shape: `(H, W, channels)` if the trackable cannot tell.
          logit_variance: `images -> [B, H, W, C]` analytic variance (optional; lets `onnx`
            detect sampling noise frozen into constants).
        """
        return FunctionAdapter(
            trackable,
            num_classes,
            sample_logits,
            mean_logits,
            params,
            config,
            image_shape,
            variance_fn=logit_variance,
        )


COVARIANCE_OUTPUTS = {
    "loc": "mean logits [B, H, W, C]",
    "cov_factor": "covariance factor [B, H, W, C, R] (see head class for its layout)",
    "cov_diag": "covariance diagonal (variances) [B, H, W, C]",
}

MIXTURE_OUTPUTS = {
    "mixture_logits": "unnormalised log weights of the components [B, K]",
    "component_loc": "component means [B, K, H, W, C]",
    "component_cov_factor": "component covariance factors [B, K, H, W, C, R]",
    "component_cov_diag": "component covariance diagonals (variances) [B, K, H, W, C]",
}


def described_outputs(outputs: Dict[str, str], spatial_dims: int) -> Dict[str, str]:
    """The descriptions `outputs` (written for images, `H, W`) for a model with
    `spatial_dims` spatial axes (3: `D, H, W`)."""
    axes = _checks.spatial_axes(spatial_dims)
    return {name: text.replace("H, W", axes) for name, text in outputs.items()}


def mixture_outputs(head: protocols.MixtureHead, params) -> Dict[str, tf.Tensor]:
    """The `params` outputs of a mixture head: `mixture_logits [B, K]` and, when its components
    are covariance heads, their `loc`, `cov_factor`, `cov_diag` as `component_* [B, K, ...]`."""
    out = {"mixture_logits": head.mixture_logits(params)}
    component = head.component_head
    if isinstance(component, protocols.CovarianceHead):
        k = head.num_components
        parts = component.covariance_parts(head.component_params(params))
        names = ("component_loc", "component_cov_factor", "component_cov_diag")
        for name, t in zip(names, parts, strict=True):
            out[name] = tf.reshape(t, tf.concat([[-1, k], tf.shape(t)[1:]], 0))
    return out


class HeadAdapter(ExportAdapter):
    """`params = model(x)`; the head (a `tfp_seg.protocols.Head`) turns params into samples and
    mean logits; a `protocols.CovarianceHead` adds `loc`, `cov_factor`, `cov_diag` outputs, a
    `protocols.MixtureHead` `mixture_logits` and `component_loc`, `component_cov_factor`,
    `component_cov_diag` (`mixture_outputs`)."""

    def __init__(self, model, image_shape=None):
        head = model.head
        config = {
            "format": "tfp_seg.export/1",
            "model": type(model).__name__,
            **_common.head_config(head),
        }
        spatial_dims = getattr(head, "spatial_dims", 2)
        if isinstance(head, protocols.CovarianceHead):
            config["params_outputs"] = described_outputs(COVARIANCE_OUTPUTS, spatial_dims)
        if isinstance(head, protocols.MixtureHead):
            config["params_outputs"] = described_outputs(MIXTURE_OUTPUTS, spatial_dims)
        image_shape = image_shape or _common.model_image_shape(model)
        super().__init__(model, head.num_classes, config, image_shape)
        self.model = model
        self.head = head

    def prepare(self, images):
        return self.model(images, training=False)

    def check_roi_mask(self, images):
        _common.check_takes_roi_mask(self.model, images, type(self.model).__name__)

    def params(self, state):
        out = {"params": tf.identity(state), "mean_logits": self.head.mean_logits(state)}
        if isinstance(self.head, protocols.CovarianceHead):
            loc, factor, diag = self.head.covariance_parts(state)
            out.update(loc=loc, cov_factor=factor, cov_diag=diag)
        if isinstance(self.head, protocols.MixtureHead):
            out.update(mixture_outputs(self.head, state))
        return out

    def mean_logits(self, state):
        return self.head.mean_logits(state)

    def sample_logits(self, state, num_samples, seed=None):
        # Independent draws whatever the head's default (the SSN head's is antithetic pairs,
        # whose second half mirrors the first: N requested samples would be N/2 draws).
        return self.head.sample_logits(state, num_samples, seed=seed, antithetic=False)

    def sample_logits_for_mean(self, state, num_samples, seed=None):
        # The head's rule for Monte Carlo means (`head.mean_probabilities`): its antithetic
        # default when `num_samples` is even, independent draws otherwise.
        num_samples, antithetic = self.head.mean_sampling(num_samples)
        return self.head.sample_logits(state, num_samples, seed=seed, antithetic=antithetic)

    def logit_variance(self, state):
        if isinstance(self.head, protocols.CovarianceHead):
            _, factor, diag = self.head.covariance_parts(state)
            return diag + tf.reduce_sum(tf.square(factor), axis=-1)
        try:
            return tf.convert_to_tensor(self.head.distribution(state).variance())
        except (NotImplementedError, ValueError, TypeError):
            return None


class ControlledHeadAdapter(HeadAdapter):
    """A `protocols.ControlledModel` (`calibration.ControlledSampler`): the wrapped model's
    params through the control, then the head as in `HeadAdapter`; so every output (params,
    samples, probabilities, variances) is the controlled distribution's. The control is
    described under `control` in the export's config."""

    def __init__(self, controlled, image_shape=None):
        super().__init__(controlled.model, image_shape)
        self.controlled = controlled
        self.config["control"] = dict(controlled.control_config())

    def prepare(self, images):
        return self.controlled.control(super().prepare(images))


class FunctionAdapter(ExportAdapter):
    def __init__(
        self,
        trackable,
        num_classes,
        sample_fn,
        mean_fn,
        params_fn,
        config,
        image_shape,
        variance_fn: Optional[Callable] = None,
    ):
        super().__init__(
            trackable,
            num_classes,
            config or {"format": "tfp_seg.export/1", "model": type(trackable).__name__},
            image_shape or _common.model_image_shape(trackable),
        )
        self._sample_fn = sample_fn
        self._mean_fn = mean_fn
        self._params_fn = params_fn
        self._variance_fn = variance_fn

    def prepare(self, images):
        return images

    def params(self, state):
        if self._params_fn is None:
            return {"mean_logits": self._mean_fn(state)}
        out = self._params_fn(state)
        if not isinstance(out, dict):
            out = {"params": out}
        return dict(out)

    def mean_logits(self, state):
        return self._mean_fn(state)

    def sample_logits(self, state, num_samples, seed=None):
        return self._sample_fn(state, num_samples, seed)

    def logit_variance(self, state):
        return None if self._variance_fn is None else self._variance_fn(state)
