"""Protocols: the capabilities modules ask of heads and models, declared, not probed.

Every protocol is `typing.runtime_checkable`: `isinstance(obj, protocols.X)` checks that the
members exist (not their signatures), so a capability is stated once here and tested by name
instead of `hasattr` probes or `isinstance` on a concrete class. No logic lives here.

Shapes: B batch, S the spatial shape (`(H, W)` for images, `(D, H, W)` for volumes: a head's
`spatial_dims` is 2 or 3), C classes, R covariance rank, N samples, X = prod(S) (H * W for
images), P the head's `params_size`.

Who uses which protocol:
  `Head`                   losses (`losses/base.py`: head check and weightless copy,
                           `losses/chunked.py`), `_registry.default_loss` /
                           `losses.default_loss`, export (`export/_common.py`,
                           `export/adapters.py`), models (`ProbabilisticSegmenter.head`,
                           `from_keras_hub` / `from_keras_cv`, the heads of wrapped models in
                           `models/wrappers.py`), streaming metrics (`metrics/streaming.py`:
                           the bound head's weightless copy).
  `CovarianceHead`         export (`export/adapters.py`, `export/wrappers.py`: `loc` /
                           `cov_factor` / `cov_diag` outputs, logit variance), calibration
                           (`with_temperature`, `scale_class_covariance`,
                           `TemperatureScaling.scale_params`).
  `PlanarLowRankLogits`    `losses/chunked.py` (the fused class-planar sampling-and-scoring path).
  `MixtureHead`            `losses/mixture.py` (the mixture NLL scores every component),
                           export (`export/adapters.py`: `mixture_logits` / `component_*`
                           outputs), calibration (the SSN controls per component).
  `Sampler`                model-level read-outs (`models/sampling.py`, wrappers: MC dropout,
                           ensembles), evaluation and metrics that take "a model that samples".
  `GraphSampler`           export (`export/dispatch.py`: a model that samples itself in
                           graph-safe ops, as `ProbabilisticUNet`; nothing else is probed);
  `GraphParams`            export (optional extra outputs of the `params` signature).
  `ControlledModel`        export (`export/dispatch.py`: a model's params through a control
                           after inference, `calibration.ControlledSampler`), the CLI.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, Tuple, runtime_checkable

import numpy as np
import tensorflow as tf

from tfp_seg._seeds import SeedLike  # None, an int, or a shape-[2] int seed

__all__ = [
    "Head",
    "CovarianceHead",
    "PlanarLowRankLogits",
    "MixtureHead",
    "Sampler",
    "GraphSampler",
    "GraphParams",
    "ControlledModel",
]


@runtime_checkable
class Head(Protocol):
    """A distribution head: features -> packed parameters, and pure functions of them.

    The parameter functions use only the head's configuration, never its weights, so losses
    and exporters rebuild them from `get_config()`.

    ```none
    params  [B, *S, P]            P = params_size; the first C channels are the mean logits
    distribution(params)          batch [B], event [*S, C] (a TFP distribution over logits)
    sample_logits(params, N)      [N, B, *S, C] float32, export-safe ops
    sample_labels(params, N)      [N, B, *S] int32, distributed as argmax of logit samples
    mean_logits(params)           [B, *S, C]
    mean_probabilities(params, N) [B, *S, C], E[softmax(eta)] by Monte Carlo
    ```
    """

    num_classes: int
    """C, the number of classes (>= 2)."""

    spatial_dims: int
    """The number of spatial axes of S: 2 (images, `S = (H, W)`) or 3 (volumes,
    `S = (D, H, W)`). Models check their backbone's rank against it."""

    likelihood: str
    """Declared name of the head's likelihood (e.g. `"low_rank_normal_logits"`); the key under
    which `tfp_seg.losses` registers the head's negative log-likelihood (`default_loss`)."""

    antithetic: bool
    """Default of `sample_logits(antithetic=None)` and of the head's losses: mirrored pairs
    `mu +/- deviation`."""

    @property
    def params_size(self) -> int:
        """P, the number of parameter channels per pixel."""
        ...

    def check_params(self, params: Any, name: str = "params") -> tf.Tensor:
        """Validate packed parameters `[B, *S, P]` and return them as float32."""
        ...

    def distribution(self, params: tf.Tensor) -> Any:
        """TFP distribution over logits: batch `[B]`, event `[*S, C]`."""
        ...

    def sample_logits(
        self,
        params: tf.Tensor,
        num_samples: int,
        seed: SeedLike = None,
        antithetic: Optional[bool] = None,
        noise: Any = None,
    ) -> tf.Tensor:
        """Logit samples `[N, B, *S, C]` in export-safe ops.

        `antithetic=None` takes the head's default (N must then be even); `noise` replaces the
        random draws by fixed noise in the head's own layout (N/2 leading entries when
        antithetic).
        """
        ...

    def sample_labels(
        self,
        params: tf.Tensor,
        num_samples: int,
        seed: SeedLike = None,
        antithetic: Optional[bool] = None,
    ) -> tf.Tensor:
        """Label maps `[N, B, *S]` (int32) distributed as `argmax(sample_logits(...), -1)`
        (not necessarily the same draws for the same seed)."""
        ...

    def mean_logits(self, params: tf.Tensor) -> tf.Tensor:
        """Mean of the logits distribution, `[B, *S, C]`."""
        ...

    def mean_sampling(self, num_samples: int) -> Tuple[int, bool]:
        """`(N, antithetic)` the head uses for Monte Carlo means of `num_samples` samples."""
        ...

    def mean_probabilities(
        self, params: tf.Tensor, num_samples: int = 16, seed: SeedLike = None
    ) -> tf.Tensor:
        """Predictive probabilities `E[softmax(eta)]`, `[B, *S, C]`.

        The default `num_samples` is the head's (`CategoricalLogits`, a point mass: 1).
        """
        ...

    def get_config(self) -> dict:
        """Keras config: a head is rebuilt from it (weightless) by losses and exporters."""
        ...

    @classmethod
    def from_config(cls, config: dict) -> "Head":
        """The head `get_config()` describes (new, unbuilt, without weights)."""
        ...


@runtime_checkable
class CovarianceHead(Head, Protocol):
    """A head whose logits are Gaussian with a diagonal-plus-low-rank covariance.

    ```none
    params = pack_params(loc, raw, factor)         raw = raw_from_diag(cov_diag)
    loc [B, *S, C],  cov_factor [B, *S, C, R],  cov_diag [B, *S, C] (variances)
    ```

    The layout of `cov_factor` is the head's: `LowRankLogits` couples all pixels and classes
    (one `z ~ N(0, I_R)` per image), `HeteroscedasticLogits` couples the classes of a pixel
    (one `z` per pixel, R = `low_rank_classes`, possibly 0). The logit variance is
    `cov_diag + sum_r cov_factor^2` in both.
    """

    @property
    def rank(self) -> int:
        """R, the rank of the covariance factor."""
        ...

    def covariance_parts(self, params: tf.Tensor) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """`(loc [B,*S,C], cov_factor [B,*S,C,R], cov_diag [B,*S,C])`."""
        ...

    # The raw diagonal is each head's own parameterisation (`HeteroscedasticLogits`: the log
    # variance, named so in its signatures), so these arguments are positional-only.
    def split_params(self, params: tf.Tensor, /) -> Tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
        """`(loc [B,*S,C], raw_diag [B,*S,C], cov_factor [B,*S,C,R])` of packed params."""
        ...

    def pack_params(
        self, loc: tf.Tensor, raw_diag: tf.Tensor, cov_factor: Optional[tf.Tensor], /
    ) -> tf.Tensor:
        """Inverse of `split_params`: `[B, *S, P]`."""
        ...

    def diag_from_raw(self, raw_diag: tf.Tensor, /) -> tf.Tensor:
        """The covariance diagonal (variances) from its raw parameter channels."""
        ...

    def raw_from_diag(self, cov_diag: tf.Tensor, /) -> tf.Tensor:
        """Inverse of `diag_from_raw` on its range."""
        ...


@runtime_checkable
class PlanarLowRankLogits(Head, Protocol):
    """A head whose logits are `mu + P z + sqrt(D) eps` with ONE `z ~ N(0, I_R)` per image
    shared by all pixels (the SSN covariance), offered in a class-planar layout.

    `losses.chunked` draws and scores such heads in a fused form straight from these tensors,
    with a hand-written gradient; other heads are sampled through `sample_logits`.

    ```none
    eta[b, c, n, x] = loc[b, c, 0, x] + sum_r z[b, 0, n, r] factor[b, c, r, x]
                      + scale[b, c, 0, x] * eps[b, c, n, x]
    ```
    """

    @property
    def rank(self) -> int:
        """R, the number of columns of the covariance factor."""
        ...

    def planar_low_rank_parts(self, params: tf.Tensor) -> list:
        """`[loc [B,C,1,X], factor [B,C,R,X], scale [B,C,1,X]]` (float32; `scale = sqrt(D)`),
        differentiable in `params`."""
        ...


@runtime_checkable
class MixtureHead(Head, Protocol):
    """A head whose logits are a mixture of K components with image-level weights: every
    image draws ONE component `k ~ Categorical(softmax(mixture_logits))`, then logits from that
    component's distribution, which is a head of its own (`component_head`) with parameters
    `component_params(params)`.

    ```none
    mixture_logits(params)          [B, K]      unnormalised log weights (image-level)
    component_params(params)        [B*K, *S, P_c]     component k of image b at row b*K + k,
                                                in `component_head`'s packed layout
    pack_mixture_params(cp, logits) [B, *S, P]     the inverse of the two
    p(eta | x) = sum_k pi_k p_k(eta | component_params[b*K + k])
    ```
    """

    @property
    def num_components(self) -> int:
        """K, the number of mixture components."""
        ...

    @property
    def component_head(self) -> Head:
        """The (weightless) head of one component: `component_params` are its parameters."""
        ...

    def mixture_logits(self, params: tf.Tensor) -> tf.Tensor:
        """Unnormalised log weights of the components `[B, K]`, differentiable in `params`."""
        ...

    def component_params(self, params: tf.Tensor) -> tf.Tensor:
        """The components' packed parameters `[B*K, *S, P_c]` (row `b*K + k`)."""
        ...

    def pack_mixture_params(
        self, component_params: tf.Tensor, mixture_logits: tf.Tensor
    ) -> tf.Tensor:
        """Packed mixture parameters `[B, *S, P]` from `component_params [B*K, *S, P_c]` and
        `mixture_logits [B, K]` (the inverse of `component_params` / `mixture_logits`)."""
        ...


@runtime_checkable
class Sampler(Protocol):
    """A model that draws segmentations for images `x [B, *S, channels]` (numpy read-outs,
    computed `batch_size` images at a time). `num_samples=None` is the model's own default
    (`default_num_samples`: 16, or an `MCDropout` / `DeepEnsemble`'s `num_samples`); models
    may take further keyword arguments (`antithetic`)."""

    def sample_logits(
        self,
        x: Any,
        num_samples: Optional[int] = None,
        seed: SeedLike = None,
        batch_size: Optional[int] = 32,
    ) -> np.ndarray:
        """Logit samples `[N, B, *S, C]` (float32), independent draws."""
        ...

    def sample(
        self,
        x: Any,
        num_samples: Optional[int] = None,
        seed: SeedLike = None,
        batch_size: Optional[int] = 32,
    ) -> np.ndarray:
        """Label maps `[N, B, *S]` (int32), distributed as the arg max of logit samples."""
        ...

    def probability_samples(
        self,
        x: Any,
        num_samples: Optional[int] = None,
        seed: SeedLike = None,
        batch_size: Optional[int] = 32,
    ) -> np.ndarray:
        """Softmax of each logit sample, `[N, B, *S, C]`."""
        ...

    def predict_proba(
        self,
        x: Any,
        num_samples: Optional[int] = None,
        seed: SeedLike = None,
        batch_size: Optional[int] = 32,
    ) -> np.ndarray:
        """Predictive probabilities `E[softmax(eta)]`, `[B, *S, C]`."""
        ...


@runtime_checkable
class GraphSampler(Protocol):
    """A model that samples itself in graph-safe TensorFlow ops (what `tfp_seg.export` traces
    into its serving graph when the model has no distribution `head`): `ProbabilisticUNet`,
    and any model of a user's that wants to be exported this way (`export.as_adapter` reads
    these members and nothing else).
    """

    num_classes: int
    """C, the number of classes of the logits."""

    def sample_logits_tensor(
        self, images: tf.Tensor, num_samples: int, seed: SeedLike = None
    ) -> tf.Tensor:
        """Logit samples `[N, B, *S, C]` (float32 tensor), independent draws; `seed` is None
        or a shape-[2] int64 tensor."""
        ...

    def mean_logits_tensor(self, images: tf.Tensor) -> tf.Tensor:
        """Deterministic logits `[B, *S, C]` (float32 tensor)."""
        ...


@runtime_checkable
class GraphParams(Protocol):
    """Optional: extra named outputs of the exported `params` signature."""

    def params_tensors(self, images: tf.Tensor) -> Mapping[str, tf.Tensor]:
        """`{name: tensor}` computed from images `[B, *S, channels]`."""
        ...


@runtime_checkable
class ControlledModel(Protocol):
    """A model with a distribution head whose params go through a control after inference
    (`tfp_seg.calibration.ControlledSampler`): `control(model(x))` are the params of the
    distribution it samples, which is what `tfp_seg.export` exports for it."""

    model: Any
    """The wrapped model (`model(x) -> params`; it owns the weights)."""

    head: Any
    """The model's distribution head (a `Head`)."""

    def control(self, params: tf.Tensor) -> tf.Tensor:
        """The controlled packed params `[B, *S, P]` of the model's `params`."""
        ...

    def control_config(self) -> Mapping[str, Any]:
        """A JSON-serialisable description of the control (written into exports)."""
        ...
