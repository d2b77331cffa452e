"""`TemperatureScaling` (Guo et al., 2017): post-hoc temperature scaling of logits, fitted on
validation logits or on Monte Carlo predictive probabilities of logit samples.

#### References

[1] Guo et al. On Calibration of Modern Neural Networks. ICML 2017.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np
import tensorflow as tf
from scipy import optimize, special

from tfp_seg import protocols
from tfp_seg.calibration._fitted import FittedTemperature
from tfp_seg.calibration.sample_control import _check_head, _control_components, with_temperature

__all__ = ["TemperatureScaling"]


# ================================================================================================
# Calibration
# ================================================================================================
def _flatten_logits_labels(logits, labels, ignore_label, sample_axis: bool):
    z = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    lead = 1 if sample_axis else 0
    name = "logit_samples" if sample_axis else "logits"
    form = "[M, n, C] or [M, B, *S, C]" if sample_axis else "[n, C] or [B, *S, C]"
    if z.ndim < 2 + lead:
        raise ValueError(f"`{name}` must have shape {form}; got shape {z.shape}.")
    if y.shape != z.shape[lead:-1]:
        raise ValueError(
            f"`labels` must have shape {z.shape[lead:-1]} (the `{name}` shape {z.shape} without "
            f"{'the sample and ' if sample_axis else ''}the class axis); got {y.shape}."
        )
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.equal(np.mod(y, 1), 0)):
            raise ValueError("`labels` must hold integer class ids.")
        y = y.astype(np.int64)
    if not np.all(np.isfinite(z)):
        raise ValueError(f"`{name}` contains NaN or Inf values.")
    c = z.shape[-1]
    y = y.reshape(-1)
    z = z.reshape((z.shape[0], -1, c) if sample_axis else (-1, c))
    valid = np.ones_like(y, dtype=bool) if ignore_label is None else y != ignore_label
    bad = valid & ((y < 0) | (y >= c))
    if bad.any():
        raise ValueError(
            f"`labels` has values outside [0, {c})"
            + (f" and != ignore_label={ignore_label}" if ignore_label is not None else "")
            + f": e.g. {y[bad][:3].tolist()}."
        )
    if not valid.any():
        raise ValueError("`labels` has no valid (non-ignored) entries.")
    return (z[:, valid] if sample_axis else z[valid]), y[valid]


class TemperatureScaling(FittedTemperature):
    """Post-hoc temperature scaling of logits (Guo et al., 2017): `softmax(logits / T)`.

    `fit` minimises the validation NLL over `log T` by a bounded 1-D search
    (`scipy.optimize.minimize_scalar(method="bounded")`):

    ```none
    T* = argmin_T  -(1/n) sum_i log softmax(z_i / T)[y_i]            (fit)
    T* = argmin_T  -(1/n) sum_i log (1/M) sum_m softmax(z_i^m / T)[y_i]   (fit_samples)
    ```

    For distribution heads (SSN, heteroscedastic), the choice made here is to calibrate the
    *Monte Carlo predictive probabilities* the model actually reports, `E_s softmax(eta_s)`:
    `fit_samples(logit_samples, labels)` scales every logit sample by `1/T`. That is the same
    as the distribution with mean `mu / T` and covariance `Sigma / T^2`; `scale_params` returns
    those packed parameters, so a calibrated head can be exported. Fitting on the mean logits
    (`fit(head.mean_logits(params), labels)`) also works but calibrates `softmax(mu)`, which
    is not what `predict_proba` returns.

    Args:
      bounds: search interval `(T_min, T_max)` for the temperature.

    #### Examples

    ```python
    ts = tfp_seg.calibration.TemperatureScaling().fit(val_logits, val_labels)
    ts.temperature                 # ==> e.g. 1.7 (T > 1: the model was over-confident)
    calibrated = ts(test_logits)   # logits / T
    ```
    """

    def __init__(self, bounds: tuple = (0.05, 20.0)):
        lo, hi = (float(b) for b in bounds)
        if not (0 < lo < hi and math.isfinite(hi)):
            raise ValueError(f"`bounds` must satisfy 0 < T_min < T_max < inf; got {bounds!r}.")
        self.bounds = (lo, hi)
        self._temperature: Optional[float] = None
        self.nll_before: Optional[float] = None
        self.nll_after: Optional[float] = None

    def _search(self, objective) -> "TemperatureScaling":
        lo, hi = (math.log(b) for b in self.bounds)
        result = optimize.minimize_scalar(
            objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-5}
        )
        self._temperature = float(math.exp(result.x))
        self.nll_before = float(objective(0.0))
        self.nll_after = float(result.fun)
        return self

    def fit(self, logits, labels, ignore_label: Optional[int] = None) -> "TemperatureScaling":
        """Fit T on logits `[n, C]` or `[B, *S, C]` (any `[..., C]`: images `S = (H, W)` and
        volumes `S = (D, H, W)` alike, every pixel / voxel one term of the NLL) and integer
        `labels [...]` (the logits' shape without the class axis).

        Returns self.
        """
        z, y = _flatten_logits_labels(logits, labels, ignore_label, sample_axis=False)
        z_true = z[np.arange(len(y)), y]

        def nll(log_t):
            inv_t = math.exp(-log_t)
            return float(np.mean(special.logsumexp(z * inv_t, axis=-1) - z_true * inv_t))

        return self._search(nll)

    def fit_samples(
        self, logit_samples, labels, ignore_label: Optional[int] = None
    ) -> "TemperatureScaling":
        """Fit T on Monte Carlo predictive probabilities of logit samples `[M, ..., C]`
        (e.g. `[M, B, *S, C]`, `S = (H, W)` or `(D, H, W)`).

        `labels` have the shape of `logit_samples` without its first (sample) and last (class)
        axes, which is how the two are matched: no spatial rank is needed. Returns self.
        """
        z, y = _flatten_logits_labels(logit_samples, labels, ignore_label, sample_axis=True)
        s = z.shape[0]
        z_true = z[:, np.arange(len(y)), y]  # [S, n]

        def nll(log_t):
            inv_t = math.exp(-log_t)
            log_p = z_true * inv_t - special.logsumexp(z * inv_t, axis=-1)  # [S, n]
            return float(-np.mean(special.logsumexp(log_p, axis=0) - math.log(s)))

        return self._search(nll)

    def __call__(self, logits):
        """`logits / T` (a tf.Tensor for tensor input, else numpy)."""
        if isinstance(logits, (tf.Tensor, tf.Variable)):
            return logits / tf.cast(self.temperature, logits.dtype)
        logits = np.asarray(logits)
        return logits / np.asarray(self.temperature, dtype=logits.dtype)

    def predict_proba(self, logits) -> np.ndarray:
        """`softmax(logits / T)` over the last axis (numpy)."""
        return special.softmax(np.asarray(self(np.asarray(logits)), dtype=np.float64), axis=-1)

    def scale_params(self, params, head) -> tf.Tensor:
        """Packed head parameters whose logit samples are the original samples divided by T.

        Low-rank / heteroscedastic heads: mean `mu / T`, covariance `/ T^2`; a mixture head
        (`MixtureLowRankLogits`): the same for every component, weights unchanged. Heads whose
        params are the logits (`CategoricalLogits`): `params / T`.
        """
        t = self.temperature
        if isinstance(head, protocols.MixtureHead):
            _check_head(head)
            k, c = head.num_components, head.num_classes
            ones = np.ones((k, c))
            return _control_components(params, head, ones / t, ones / t**2, ones / t)
        if isinstance(head, protocols.CovarianceHead):
            loc, raw, factor = head.split_params(params)
            rescaled = head.pack_params(loc / t, raw, factor)
            return with_temperature(rescaled, head, 1.0 / t**2)
        params = tf.convert_to_tensor(params, tf.float32)
        if params.shape[-1] != head.num_classes:
            raise ValueError(
                f"`head` {type(head).__name__} has no covariance parameters and its params are "
                f"not logits (last axis {params.shape[-1]} != num_classes {head.num_classes})."
            )
        return params / t

    def __repr__(self):
        return f"TemperatureScaling(temperature={self.temperature:.4g}, fitted={self.fitted})"
