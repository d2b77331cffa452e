"""`DistributionHead`: the shared contract of every tfp_seg head.

A head is a Keras layer `features [B, *S, F] -> params [B, *S, params_size]` plus pure
functions of those parameters: `distribution(params)` (a TFP distribution over logits with
batch `[B]` and event `[*S, C]`), `sample_logits(params, N)` (`[N, B, *S, C]` in
export-safe ops), `mean_logits(params)`, and the declared name of its likelihood
(`likelihood`). The spatial shape `S` is `(H, W)` for images (`spatial_dims=2`, the default)
or `(D, H, W)` for volumes (`spatial_dims=3`); one code path serves both, every parameter
function reads `S` from the tensors (`tf.shape`), and the low-rank covariances stay low rank
over the flattened `prod(S) * C` event. The parameter functions use only the head's
configuration, never its weights, so losses and exporters can rebuild them from a config.
This is TFP's `params_size` / `new` convention (`tfp.layers.DistributionLambda`) adapted to
Keras 3, whose models must output tensors. The contract is `tfp_seg.protocols.Head`.

A head never imports a loss: `default_loss()` looks up the loss that `tfp_seg.losses`
registered for the head's `likelihood` (`tfp_seg._registry`).
"""

from __future__ import annotations

from typing import Optional, Tuple

import keras
import tensorflow as tf

from tfp_seg import _checks, _registry
from tfp_seg import distributions as dists
from tfp_seg.layers import _conv

__all__ = ["DistributionHead"]


class DistributionHead(keras.layers.Layer):
    """Base class: a 1x1 (or k x k) convolution to packed distribution parameters.

    Parameters are always computed in float32 (also under a mixed-precision policy), because
    the distribution's numerics (exp of log-variances, low-rank solves, log-softmax sums over
    all pixels) are not safe in float16.

    Args:
      num_classes: number of classes C (>= 2).
      kernel_size: spatial size of the convolution that maps features to parameters.
      validate_args: check parameters/labels for NaN/Inf and range at run time.
      spatial_dims: 2 (images: features `[B, H, W, F]`, a `Conv2D` projection) or 3
        (volumes: features `[B, D, H, W, F]`, a `Conv3D` projection). Every shape below is
        written `[B, *S, ...]` with `S = (H, W)` or `(D, H, W)`; a config without the key
        (files saved before volumes existed) loads as 2.

    Subclasses declare `likelihood` (the name under which `tfp_seg.losses` registers their
    default loss) and, if they sample in mirrored pairs by default, `antithetic`.
    """

    likelihood: Optional[str] = None
    """Name of the head's likelihood: the key of its default loss (None: no default loss)."""

    antithetic: bool = False
    """Default of `sample_logits(antithetic=None)` and of the head's losses."""

    def __init__(
        self,
        num_classes: int,
        kernel_size: int = 1,
        kernel_initializer="glorot_uniform",
        validate_args: bool = True,
        spatial_dims: int = 2,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_classes = _checks.positive_int(num_classes, "num_classes", minimum=2)
        self.kernel_size = _checks.positive_int(kernel_size, "kernel_size")
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.validate_args = bool(validate_args)
        self.spatial_dims = _checks.check_spatial_dims(spatial_dims)

    # Subclasses end their __init__ with `self.projection = self._make_projection()` once
    # `params_size` is known (sublayers must be created in __init__ to be saved).

    # --- to be provided by subclasses -------------------------------------------------------
    @property
    def params_size(self) -> int:
        """Number of parameter channels per pixel."""
        raise NotImplementedError

    def distribution(self, params):
        """TFP distribution over logits, batch `[B]`, event `[*S, C]`."""
        raise NotImplementedError

    def sample_logits(self, params, num_samples: int, seed=None, antithetic=None, noise=None):
        """Logit samples `[N, B, *S, C]` in export-safe ops."""
        raise NotImplementedError

    def default_loss(self, **kwargs) -> keras.losses.Loss:
        """The head's negative log-likelihood as a Keras loss: the loss `tfp_seg.losses`
        registered for `self.likelihood`, built with `**kwargs`
        (`tfp_seg.losses.default_loss(head, **kwargs)`)."""
        return _registry.default_loss(self, **kwargs)

    def sample_labels(self, params, num_samples: int, seed=None, antithetic=None) -> tf.Tensor:
        """Sampled label maps `[N, B, *S]` (int32): the arg max of each logit sample.

        Heads with a faster exact sampler of the arg max override this (`LowRankLogits`,
        `HeteroscedasticLogits`); their maps have the distribution of
        `argmax(sample_logits(...))` but are not the same draws for the same seed.
        """
        return dists.argmax_classes(
            self.sample_logits(params, num_samples, seed=seed, antithetic=antithetic)
        )

    def _bias_initializer(self):
        return "zeros"

    def _projection_kernel_initializer(self):
        return self.kernel_initializer

    def _make_projection(self, filters: Optional[int] = None):
        # One convolution to every parameter channel (`params_size` unless `filters`), always
        # float32: Conv2D for images (the layer that `.keras` files saved before volumes
        # hold), Conv3D for volumes; the name "projection" is part of the saved files.
        return _conv.keras_conv(self.spatial_dims)(
            self.params_size if filters is None else filters,
            self.kernel_size,
            padding="same",
            kernel_initializer=self._projection_kernel_initializer(),
            bias_initializer=self._bias_initializer(),
            dtype="float32",
            name="projection",
        )

    # --- spatial rank -----------------------------------------------------------------------
    def spatial_form(self, trailing: Optional[str] = None, leading: str = "B") -> str:
        """The layout `[B, *S, trailing]` written out for this head's rank (error messages),
        e.g. `"[B, D, H, W, F]"`."""
        return _checks.spatial_form(self.spatial_dims, leading, trailing)

    def _check_features(self, shape) -> None:
        """Raise if a static `features` shape is not `[B, *S, F]` with a known F."""
        shape = tf.TensorShape(shape)
        want = 2 + self.spatial_dims
        if shape.rank is not None and shape.rank != want:
            hint = ""
            if shape.rank - 2 in _checks.SPATIAL_DIMS:
                hint = f" (a head for {shape.rank - 2}D inputs takes spatial_dims={shape.rank - 2})"
            raise ValueError(
                f"`features` must have rank {want} ({self.spatial_form('F')}) for "
                f"spatial_dims={self.spatial_dims}; got shape {tuple(shape.as_list())}{hint}."
            )
        if shape.rank is not None and shape[-1] is None:
            raise ValueError("`features` must have a known channel count F (last axis).")

    def prepare_roi_mask(self, roi_mask, params=None) -> tf.Tensor:
        """`roi_mask` `[B, *S]` or `[B, *S, 1]` (1 inside the region) as `[B, *S]`, else a
        `ValueError` naming it; with `params [B, *S, P]` its static `[B, *S]` must match
        theirs (no broadcasting)."""
        roi_mask = tf.convert_to_tensor(roi_mask)
        s = self.spatial_dims
        rank = roi_mask.shape.rank
        if rank == s + 2 and roi_mask.shape[-1] == 1:
            roi_mask = roi_mask[..., 0]
        elif rank != s + 1:
            raise ValueError(
                f"`roi_mask` must have shape {self.spatial_form()} or "
                f"{self.spatial_form('1')}; got {_checks.shape_str(roi_mask)}."
            )
        if params is not None and not roi_mask.shape.is_compatible_with(params.shape[:-1]):
            raise ValueError(
                f"`roi_mask` shape {_checks.shape_str(roi_mask)} must equal the "
                f"{self.spatial_form()} of the parameters {_checks.shape_str(params)}."
            )
        return roi_mask

    # --- shared ------------------------------------------------------------------------------
    def build(self, input_shape):
        self._check_features(input_shape)
        self.projection.build(tuple(input_shape))
        self.built = True

    def call(self, features, roi_mask=None):
        """Map features `[B, *S, F]` to params `[B, *S, params_size]` (float32)."""
        self._check_features(features.shape)
        features = tf.cast(features, tf.float32)
        params = self.projection(features)
        return self._postprocess(params, roi_mask)

    def _postprocess(self, params, roi_mask):
        if roi_mask is not None:
            raise ValueError(f"{type(self).__name__} does not take an `roi_mask`.")
        return params

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.params_size,)

    def check_params(self, params, name: str = "params") -> tf.Tensor:
        """Validate packed parameters `[B, *S, params_size]` and return them as float32."""
        params = tf.convert_to_tensor(params)
        if not params.dtype.is_floating:
            raise ValueError(f"`{name}` must be a float tensor; got dtype {params.dtype.name}.")
        params = tf.cast(params, tf.float32)
        _checks.check_rank(
            params,
            2 + self.spatial_dims,
            name,
            f"{self.spatial_form(str(self.params_size))}, spatial_dims={self.spatial_dims}",
        )
        _checks.check_last_dim(
            params, self.params_size, name, f"params_size of {type(self).__name__}"
        )
        if params.shape[0] == 0:
            raise ValueError(f"`{name}` is an empty batch (shape {_checks.shape_str(params)}).")
        if self.validate_args:
            # `is_finite` + `reduce_all` instead of CheckNumerics: the same run-time check,
            # ~5x faster on CPU for [8, 128, 128, 36] params (CheckNumerics runs one thread).
            finite = tf.reduce_all(tf.math.is_finite(params))
            message = f"`{name}` contains NaN or Inf values"
            with tf.control_dependencies([tf.debugging.Assert(finite, [message])]):
                params = tf.identity(params)
        return params

    def mean_logits(self, params) -> tf.Tensor:
        """The mean of the logits distribution `[B, *S, C]` (the first C channels)."""
        params = self.check_params(params)
        return params[..., : self.num_classes]

    def mean_sampling(self, num_samples) -> Tuple[int, bool]:
        """`(N, antithetic)` for a Monte Carlo mean: the head's antithetic pairs when it has
        them and N is even, independent samples otherwise (so any N >= 1 is accepted)."""
        num_samples = _checks.check_num_samples(num_samples, antithetic=False)
        return num_samples, bool(self.antithetic) and num_samples % 2 == 0

    def mean_probabilities(self, params, num_samples: int = 16, seed=None) -> tf.Tensor:
        """Monte Carlo predictive probabilities `E[softmax(eta)]`, `[B, *S, C]`: the mean
        softmax of `sample_logits` (antithetic pairs when the head has them and N is even)."""
        num_samples, antithetic = self.mean_sampling(num_samples)
        return dists.mean_softmax(
            self.sample_logits(params, num_samples, seed=seed, antithetic=antithetic)
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_classes": self.num_classes,
                "kernel_size": self.kernel_size,
                "kernel_initializer": keras.initializers.serialize(self.kernel_initializer),
                "validate_args": self.validate_args,
                "spatial_dims": self.spatial_dims,
            }
        )
        return config
