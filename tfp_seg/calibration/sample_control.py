"""Control of a low-rank (SSN) or heteroscedastic logits distribution after inference:
`scale_class_covariance` (per class) and `with_temperature` (whole covariance) return new packed
parameters (Monteiro et al., 2020, Sec. 5); for a mixture head (`MixtureLowRankLogits`) the
same controls apply to every component, or per component.

#### References

[1] Monteiro et al. Stochastic Segmentation Networks. NeurIPS 2020.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import tensorflow as tf

from tfp_seg import protocols

__all__ = ["scale_class_covariance", "with_temperature"]


# ================================================================================================
# Control of low-rank (SSN) samples
# ================================================================================================
def _check_head(head):
    if isinstance(head, protocols.MixtureHead) and isinstance(
        head.component_head, protocols.CovarianceHead
    ):
        return
    if not isinstance(head, protocols.CovarianceHead):
        raise ValueError(
            "`head` must be a covariance head (tfp_seg.protocols.CovarianceHead: a "
            "tfp_seg.layers.LowRankLogits or HeteroscedasticLogits) or a mixture of them "
            f"(tfp_seg.layers.MixtureLowRankLogits); got {type(head).__name__}."
        )


def _control_components(params, head, loc_scale, diag_scale, factor_scale) -> tf.Tensor:
    """New mixture params: component `k`'s class `c` gets `mu * loc_scale[k, c]`,
    `D * diag_scale[k, c]` and `P[c, :] * factor_scale[k, c]` (weights unchanged)."""
    component = head.component_head
    k, c = head.num_components, head.num_classes
    loc, raw, factor = component.split_params(head.component_params(params))

    spatial = getattr(head, "spatial_dims", 2)

    def scaled(t, scale):  # t [B*K, *S, C, ...], scale [K, C]
        shape = tf.shape(t)
        grouped = tf.reshape(t, tf.concat([[-1, k], shape[1:]], 0))  # [B, K, *S, C, ...]
        trailing = [1] * (t.shape.rank - 2 - spatial)
        s = tf.reshape(tf.constant(scale, tf.float32), [1, k] + [1] * spatial + [c] + trailing)
        return tf.reshape(grouped * s, shape)

    diag = scaled(component.diag_from_raw(raw), diag_scale)
    new = component.pack_params(
        scaled(loc, loc_scale), component.raw_from_diag(diag), scaled(factor, factor_scale)
    )
    return head.pack_mixture_params(new, head.mixture_logits(params))


def _per_component(values, num_components: int, parse, unit_ndim: int) -> np.ndarray:
    """`[K, ...]`: `parse(values)` for every component when `values` is one unit (a Mapping,
    or at most `unit_ndim` dimensions), else `parse` of each of its K entries."""
    if isinstance(values, Mapping):
        return np.stack([parse(values)] * num_components)
    if isinstance(values, (list, tuple)) and values and all(isinstance(v, Mapping) for v in values):
        entries = list(values)
    else:
        try:
            ndim = np.ndim(values)
        except (TypeError, ValueError):  # ragged: `parse` says what is wrong with it
            ndim = unit_ndim
        if ndim <= unit_ndim:
            return np.stack([parse(values)] * num_components)
        entries = list(values)
    if len(entries) != num_components:
        raise ValueError(
            f"per-component values must have one entry per component ({num_components}); "
            f"got {len(entries)}."
        )
    return np.stack([parse(v) for v in entries])


def _class_scale_vector(class_scales, num_classes: int) -> np.ndarray:
    if isinstance(class_scales, Mapping):
        scales = np.ones(num_classes)
        for key, value in class_scales.items():
            if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
                raise ValueError(f"`class_scales` keys must be class ids; got {key!r}.")
            if not 0 <= key < num_classes:
                raise ValueError(
                    f"`class_scales` key {key} is outside [0, {num_classes}) (num_classes)."
                )
            scales[int(key)] = float(value)
    else:
        try:
            scales = np.asarray(class_scales, dtype=np.float64)
        except (TypeError, ValueError):
            raise ValueError(
                f"`class_scales` must be {num_classes} numbers or a {{class: scale}} dict; "
                f"got {class_scales!r}."
            ) from None
        if scales.shape != (num_classes,):
            raise ValueError(
                f"`class_scales` must have one entry per class ({num_classes}); "
                f"got shape {scales.shape}."
            )
    if not np.all(np.isfinite(scales)) or np.any(scales < 0):
        raise ValueError(f"`class_scales` must be finite and >= 0; got {scales.tolist()}.")
    return scales


def scale_class_covariance(params, head, class_scales) -> tf.Tensor:
    """New packed params whose logit covariance is rescaled per class (SSN sample control).

    ```none
    P'[.., c, :] = s_c P[.., c, :]        D'_c = s_c^2 D_c
    Sigma' = S Sigma S,  S = diag(s_class(k))   block (c, c) x s_c^2, block (c, c') x s_c s_c'
    ```

    The mean is unchanged. Larger `s_c` makes class `c`'s logit vary more across samples, so
    its sampled area grows where it is not already the mean's argmax (and shrinks where it is).
    The diagonal `D` includes the head's `epsilon`; the new diagonal is floored at `epsilon`
    (a scale that would bring `D'_c` below it leaves `D'_c = epsilon`).

    For a mixture head (`MixtureLowRankLogits`) every component's covariance is rescaled:
    by the same scales, or, given K entries (a `[K, C]` array or K dicts), component `k` by
    entry `k`; the mixture weights and the means are unchanged.

    Args:
      params: packed `LowRankLogits`, `HeteroscedasticLogits` or `MixtureLowRankLogits`
        params `[B, *S, P]` (`S = (H, W)` or `(D, H, W)`).
      head: the head that produced `params` (its configuration only).
      class_scales: `C` non-negative scales, or a dict `{class_id: scale}` (others 1); for a
        mixture head also K such entries (per component).

    Returns:
      float32 `[B, *S, P]` packed params.
    """
    _check_head(head)
    if isinstance(head, protocols.MixtureHead):
        c = head.num_classes
        scales = _per_component(
            class_scales, head.num_components, lambda v: _class_scale_vector(v, c), 1
        )
        return _control_components(params, head, np.ones_like(scales), scales**2, scales)
    scales = _class_scale_vector(class_scales, head.num_classes)
    loc, raw, factor = head.split_params(params)
    s = tf.constant(scales, tf.float32)
    diag = head.diag_from_raw(raw) * tf.square(s)
    return head.pack_params(loc, head.raw_from_diag(diag), factor * s[:, tf.newaxis])


def with_temperature(params, head, t: float) -> tf.Tensor:
    """New packed params whose whole logit covariance is multiplied by `t` (mean unchanged).

    ```none
    P' = sqrt(t) P,   D' = t D    =>   Sigma' = t Sigma
    ```

    `t > 1` diversifies samples, `t < 1` concentrates them (`D'` is floored at the head's
    `epsilon`). Not the calibration temperature of `TemperatureScaling`, which divides logits.
    For a mixture head every component's covariance is multiplied by `t`, or component `k`'s
    by `t[k]` given K values; the weights and the means are unchanged.

    Args:
      params: packed `LowRankLogits`, `HeteroscedasticLogits` or `MixtureLowRankLogits`
        params `[B, *S, P]` (`S = (H, W)` or `(D, H, W)`).
      head: the head that produced `params`.
      t: finite, > 0 (for a mixture head also K such values, one per component).
    """
    _check_head(head)
    if isinstance(head, protocols.MixtureHead):
        ts = _per_component(t, head.num_components, _positive_number, 0)
        scales = np.repeat(ts[:, np.newaxis], head.num_classes, axis=1)
        return _control_components(params, head, np.ones_like(scales), scales, np.sqrt(scales))
    t = _positive_number(t)
    loc, raw, factor = head.split_params(params)
    diag = head.diag_from_raw(raw) * t
    return head.pack_params(loc, head.raw_from_diag(diag), factor * math.sqrt(t))


def _positive_number(t) -> float:
    try:
        t = float(t)
    except (TypeError, ValueError):
        raise ValueError(f"`t` must be a positive number; got {t!r}.") from None
    if not (math.isfinite(t) and t > 0):
        raise ValueError(f"`t` must be finite and > 0; got {t!r}.")
    return t
