"""Uncertainty read-outs: the decomposition of predictive uncertainty from samples.

- From probability samples `[N, ..., C]` (numpy): `predictive_entropy` (total),
  `expected_entropy` (aleatoric), `mutual_information` (epistemic), and `uncertainty_maps`
  for all of them plus the probability variance.
- From logit samples `[N, B, *S, C]` (tensors, export-safe ops, used by the exported
  `uncertainty` signature): `uncertainty_maps_from_logits`, the same maps.

Images and volumes, `S = (H, W)` or `(D, H, W)`: every map is per pixel (voxel), computed over
the sample and class axes only, so `[N, B, *S, C]` gives `[B, *S]` whatever the rank of `S`
(a `[N, B, D, H, W, C]` volume gives the maps of the `[N, B, D*H, W, C]` image, reshaped). Only
`per_image=True` needs the rank of `S` (which trailing axes to average): `spatial_dims`
(2 by default), never read from the input's rank, which does not tell `[N, B, H, W, C]` from
`[N, D, H, W, C]`.

Both map functions return the same keys, computed by one implementation:

```none
key                  map [...] (nats)                                          read-out
predictive_entropy   H[p_bar] = -sum_c p_bar_c log p_bar_c                     total
expected_entropy     E_n H[p_n] = -(1/N) sum_n sum_c p_nc log p_nc             aleatoric
mutual_information   H[p_bar] - E_n H[p_n]  (>= 0; round-off clipped at 0)     epistemic
variance             sum_c (1/(N-1)) sum_n (p_nc - p_bar_c)^2  (0 when N = 1)  spread
```

#### Mathematical Details

```none
p_bar     = (1/N) sum_n p_n                     p_n = softmax(eta_n), one per sample
total     H[p_bar]           = -sum_c p_bar_c log p_bar_c            (predictive entropy)
aleatoric E_n H[p_n]         = -(1/N) sum_n sum_c p_nc log p_nc      (expected entropy)
epistemic I = H[p_bar] - E_n H[p_n] >= 0                             (mutual information)
```

`0 log 0 = 0`. With samples of a logits distribution (SSN, heteroscedastic heads), the
"epistemic" term measures the spread of the sampled softmax outputs; it is the mutual
information between the label and the sample index.

#### Compatibility aliases

The sampling baselines and the calibration tools that lived here moved: `MCDropout` and
`DeepEnsemble` to `tfp_seg.models.wrappers`, `TemperatureScaling`, `scale_class_covariance`
and `with_temperature` to `tfp_seg.calibration`. `tfp_seg.uncertainty.<name>` still resolves
them, lazily (module `__getattr__`): this module is a leaf below the models and imports none of
them itself.

#### References

[1] Kendall and Gal. What Uncertainties Do We Need in Bayesian Deep Learning for Computer
    Vision? NeurIPS 2017.
"""

from __future__ import annotations

import importlib
from typing import Dict

import numpy as np
import tensorflow as tf

# Compatibility aliases: name -> the module that defines it now (resolved by `__getattr__`).
_MOVED = {
    "MCDropout": "tfp_seg.models.wrappers",
    "DeepEnsemble": "tfp_seg.models.wrappers",
    "TemperatureScaling": "tfp_seg.calibration",
    "scale_class_covariance": "tfp_seg.calibration",
    "with_temperature": "tfp_seg.calibration",
}

__all__ = [
    "predictive_entropy",
    "expected_entropy",
    "mutual_information",
    "uncertainty_maps",
    "uncertainty_maps_from_logits",
] + list(_MOVED)


def __getattr__(name: str):
    """Compatibility alias of a name that moved (see `_MOVED`), imported on first use."""
    if name in _MOVED:
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_MOVED))


_PROB_ATOL = 1e-3


def _check_prob_samples(prob_samples, per_image: bool, spatial_dims: int) -> np.ndarray:
    p = np.asarray(prob_samples)
    if not np.issubdtype(p.dtype, np.floating):
        raise ValueError(
            f"`prob_samples` must be a float array of probabilities; got dtype {p.dtype}."
        )
    if p.ndim < 2:
        raise ValueError(
            f"`prob_samples` must have shape [N, ..., C] (sample axis first, classes last); "
            f"got shape {p.shape}."
        )
    if per_image and p.ndim < spatial_dims + 2:
        form = "[N, ..., H, W, C]" if spatial_dims == 2 else "[N, ..., D, H, W, C]"
        raise ValueError(
            f"`per_image=True` needs `prob_samples` of shape {form} "
            f"(spatial_dims={spatial_dims}); got shape {p.shape}."
        )
    if p.shape[0] == 0 or p.shape[-1] == 0:
        raise ValueError(f"`prob_samples` has an empty sample or class axis: shape {p.shape}.")
    if not np.all(np.isfinite(p)):
        raise ValueError("`prob_samples` contains NaN or Inf values.")
    if p.min() < -_PROB_ATOL or p.max() > 1 + _PROB_ATOL:
        raise ValueError(
            f"`prob_samples` must hold probabilities in [0, 1]; got values in "
            f"[{p.min():.4g}, {p.max():.4g}] (pass softmax outputs, not logits)."
        )
    sums = p.sum(axis=-1)
    if np.abs(sums - 1).max() > _PROB_ATOL * max(1, p.shape[-1]):
        raise ValueError(
            "`prob_samples` must sum to 1 over the last (class) axis; got sums in "
            f"[{sums.min():.4g}, {sums.max():.4g}]."
        )
    return np.clip(p, 0.0, 1.0)


def _check_spatial_dims(spatial_dims) -> int:
    """2 or 3 as an int, else `ValueError` (this leaf module imports nothing of tfp_seg, so
    not `tfp_seg._checks.check_spatial_dims`; the same message)."""
    integer = isinstance(spatial_dims, (int, np.integer))
    if not integer or isinstance(spatial_dims, (bool, np.bool_)) or spatial_dims not in (2, 3):
        raise ValueError(
            f"`spatial_dims` must be 2 (images [H, W]) or 3 (volumes [D, H, W]); got "
            f"{spatial_dims!r}."
        )
    return int(spatial_dims)


def _decomposition(p: tf.Tensor, log_p: tf.Tensor) -> Dict[str, tf.Tensor]:
    """The one implementation of the maps: probabilities `p [N, ..., C]` and their logs.

    `log p` is passed in (a log-softmax for logits; the log of probabilities floored at the
    dtype's `tiny`, so that `0 log 0 = 0`). Export-safe ops only.
    """
    tiny = np.finfo(p.dtype.as_numpy_dtype).tiny
    mean_p = tf.reduce_mean(p, axis=0)
    total = -tf.reduce_sum(mean_p * tf.math.log(tf.maximum(mean_p, tiny)), axis=-1)
    aleatoric = tf.reduce_mean(-tf.reduce_sum(p * log_p, axis=-1), axis=0)
    n = tf.cast(tf.shape(p)[0], p.dtype)
    class_axis = p.shape.rank - 1 if p.shape.rank is not None else -1
    variance = tf.reduce_sum(tf.square(p - mean_p[tf.newaxis]), axis=[0, class_axis]) / tf.maximum(
        n - 1.0, 1.0
    )
    return {
        "predictive_entropy": total,
        "expected_entropy": aleatoric,
        "mutual_information": tf.maximum(total - aleatoric, 0.0),
        "variance": variance,
    }


def uncertainty_maps(
    prob_samples, per_image: bool = False, spatial_dims: int = 2
) -> Dict[str, np.ndarray]:
    """All read-outs of probability samples `[N, ..., C]`, as numpy maps.

    Args:
      prob_samples: probabilities `[N, ..., C]` (sample axis first, classes last), e.g.
        `[N, B, *S, C]` from `model.probability_samples(x, N)`, `S = (H, W)` or `(D, H, W)`.
      per_image: average each map over its last `spatial_dims` axes (`S`).
      spatial_dims: the rank of `S` that `per_image` averages over: 2 (`H, W`, the default)
        or 3 (`D, H, W`); the maps themselves do not depend on it.

    Returns:
      `{"predictive_entropy", "expected_entropy", "mutual_information", "variance"}` (see
      the module docstring), each `[...]` (e.g. `[B, *S]`), or without `S` when
      `per_image` (e.g. `[B]`), in the input's float dtype; computed in float64.
    """
    spatial_dims = _check_spatial_dims(spatial_dims)
    p = _check_prob_samples(prob_samples, per_image, spatial_dims)
    p64 = tf.constant(p, tf.float64)
    log_p = tf.math.log(tf.maximum(p64, np.finfo(np.float64).tiny))
    maps = _decomposition(p64, log_p)
    out = {}
    for key, value in maps.items():
        value = value.numpy()
        if per_image:
            value = value.mean(axis=tuple(range(-spatial_dims, 0)))
        out[key] = np.asarray(value, dtype=p.dtype)
    return out


def uncertainty_maps_from_logits(logit_samples) -> Dict[str, tf.Tensor]:
    """The maps of `uncertainty_maps` from logit samples `[N, B, *S, C]`, as tensors.

    `p_n = softmax(eta_n)`; computed in the samples' float dtype with export-safe ops (the
    exported `uncertainty` signature and ONNX graph use it).

    Returns:
      `{"predictive_entropy", "expected_entropy", "mutual_information", "variance"}`, each
      `[B, *S]` (nats; the variance is unitless): any `[N, ..., C]` works, the maps are per
      pixel (voxel).
    """
    log_p = tf.nn.log_softmax(logit_samples, axis=-1)
    return _decomposition(tf.exp(log_p), log_p)


def predictive_entropy(prob_samples, per_image: bool = False, spatial_dims: int = 2) -> np.ndarray:
    """Total uncertainty `H[(1/N) sum_n p_n]` in nats.

    Args:
      prob_samples: probabilities `[N, ..., C]` (sample axis first, classes last), e.g.
        `[N, B, *S, C]` from `model.probability_samples(x, N)`.
      per_image: average the map over its last `spatial_dims` axes (`S`).
      spatial_dims: 2 (`S = (H, W)`, the default) or 3 (`S = (D, H, W)`); used by
        `per_image` only.

    Returns:
      The per-pixel map `[...]` (e.g. `[B, *S]`), or `[...]` without `S` when `per_image`
      (e.g. `[B]`), in the input's float dtype.
    """
    return uncertainty_maps(prob_samples, per_image, spatial_dims)["predictive_entropy"]


def expected_entropy(prob_samples, per_image: bool = False, spatial_dims: int = 2) -> np.ndarray:
    """Aleatoric uncertainty `(1/N) sum_n H[p_n]` in nats (arguments and shapes as
    `predictive_entropy`)."""
    return uncertainty_maps(prob_samples, per_image, spatial_dims)["expected_entropy"]


def mutual_information(prob_samples, per_image: bool = False, spatial_dims: int = 2) -> np.ndarray:
    """Epistemic uncertainty `H[p_bar] - (1/N) sum_n H[p_n]` in nats (`>= 0`).

    Mutual information is non-negative (entropy is concave); round-off negatives are clipped
    to 0. It is 0 exactly when all samples agree. Arguments and shapes as
    `predictive_entropy`.
    """
    return uncertainty_maps(prob_samples, per_image, spatial_dims)["mutual_information"]
