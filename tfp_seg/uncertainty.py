"""Uncertainty read-outs: the decomposition of predictive uncertainty from samples.

- From probability samples `[N, ..., C]` (numpy): `predictive_entropy` (total),
  `expected_entropy` (aleatoric), `mutual_information` (epistemic), and `uncertainty_maps`
  for all of them plus the probability variance.
- From logit samples `[N, B, H, W, C]` (tensors, export-safe ops, used by the exported
  `uncertainty` signature): `uncertainty_maps_from_logits`, the same maps.

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


def _check_prob_samples(prob_samples, per_image: bool) -> np.ndarray:
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
    if per_image and p.ndim < 4:
        raise ValueError(
            "`per_image=True` needs `prob_samples` of shape [N, ..., H, W, C]; "
            f"got shape {p.shape}."
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


def uncertainty_maps(prob_samples, per_image: bool = False) -> Dict[str, np.ndarray]:
    """All read-outs of probability samples `[N, ..., C]`, as numpy maps.

    Args:
      prob_samples: probabilities `[N, ..., C]` (sample axis first, classes last), e.g.
        `[N, B, H, W, C]` from `model.probability_samples(x, N)`.
      per_image: average each map over its last two axes (H, W).

    Returns:
      `{"predictive_entropy", "expected_entropy", "mutual_information", "variance"}` (see
      the module docstring), each `[...]` (e.g. `[B, H, W]`), or without `H, W` when
      `per_image` (e.g. `[B]`), in the input's float dtype; computed in float64.
    """
    p = _check_prob_samples(prob_samples, per_image)
    p64 = tf.constant(p, tf.float64)
    log_p = tf.math.log(tf.maximum(p64, np.finfo(np.float64).tiny))
    maps = _decomposition(p64, log_p)
    out = {}
    for key, value in maps.items():
        value = value.numpy()
        if per_image:
            value = value.mean(axis=(-2, -1))
        out[key] = np.asarray(value, dtype=p.dtype)
    return out


def uncertainty_maps_from_logits(logit_samples) -> Dict[str, tf.Tensor]:
    """The maps of `uncertainty_maps` from logit samples `[N, B, H, W, C]`, as tensors.

    `p_n = softmax(eta_n)`; computed in the samples' float dtype with export-safe ops (the
    exported `uncertainty` signature and ONNX graph use it).

    Returns:
      `{"predictive_entropy", "expected_entropy", "mutual_information", "variance"}`, each
      `[B, H, W]` (nats; the variance is unitless).
    """
    log_p = tf.nn.log_softmax(logit_samples, axis=-1)
    return _decomposition(tf.exp(log_p), log_p)


def predictive_entropy(prob_samples, per_image: bool = False) -> np.ndarray:
    """Total uncertainty `H[(1/N) sum_n p_n]` in nats.

    Args:
      prob_samples: probabilities `[N, ..., C]` (sample axis first, classes last), e.g.
        `[N, B, H, W, C]` from `model.probability_samples(x, N)`.
      per_image: average the map over its last two axes (H, W).

    Returns:
      The per-pixel map `[...]` (e.g. `[B, H, W]`), or `[...]` without `H, W` when
      `per_image` (e.g. `[B]`), in the input's float dtype.
    """
    return uncertainty_maps(prob_samples, per_image)["predictive_entropy"]


def expected_entropy(prob_samples, per_image: bool = False) -> np.ndarray:
    """Aleatoric uncertainty `(1/N) sum_n H[p_n]` in nats (shapes as `predictive_entropy`)."""
    return uncertainty_maps(prob_samples, per_image)["expected_entropy"]


def mutual_information(prob_samples, per_image: bool = False) -> np.ndarray:
    """Epistemic uncertainty `H[p_bar] - (1/N) sum_n H[p_n]` in nats (`>= 0`).

    Mutual information is non-negative (entropy is concave); round-off negatives are clipped
    to 0. It is 0 exactly when all samples agree. Shapes as `predictive_entropy`.
    """
    return uncertainty_maps(prob_samples, per_image)["mutual_information"]
