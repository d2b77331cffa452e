"""Sample control of a trained model, as a model: `ControlledSampler` draws a covariance head's
samples from its controlled distribution (`with_temperature`, `scale_class_covariance`), and
`CovarianceTemperature` chooses the covariance temperature on held-out annotated images by
the generalised energy distance of the samples to the annotations.

```none
ControlledSampler(model, temperature=t, class_scales=s)
    params' = with_temperature(scale_class_covariance(model(x), head, s), head, t)
    Sigma'  = t S Sigma S,  S = diag(s_class(k)),  mean unchanged
    the read-outs of tfp_seg.models.sampling.Sampler (sample, sample_logits,
    probability_samples, predict_proba) on params', so evaluate_ambiguous /
    evaluate_annotations / the plots take it like any model

CovarianceTemperature(temperatures).fit(model, images, annotations)
    t* = argmin_t  GED_t,   GED_t = 2 cross - U_ss - V_yy      (per image, averaged)
    cross  = mean_{n,k} w_k d(s_n, y_k)
    U_ss   = mean_{n != n'} d(s_n, s_n')      unbiased over the N samples
    V_yy   = sum_{k,l} w_k w_l d(y_k, y_l)    exact for the references' empirical distribution
    d      = 1 - IoU (tfp_seg.metrics.generalized_energy_distance's distance)
```

Every temperature is scored with the same seed: `P' = sqrt(t) P`, `D' = t D` turn the same
standard normal noise into every candidate's samples (common random numbers), so the grid is
compared on paired draws and the choice does not follow Monte Carlo noise between candidates.
The diversity term is the U-statistic (no self-pairs): the V-statistic's `E[d(S,S')] / N`
bias would favour low temperatures.

Not the calibration temperature of `TemperatureScaling`, which divides logits (and the
covariance by `T^2`) to calibrate per-pixel probabilities; this one keeps the mean and scales
the covariance to match the spread of the annotations (Monteiro et al., 2020, Sec. 5).

#### References

[1] Monteiro et al. Stochastic Segmentation Networks. NeurIPS 2020.
[2] Szekely and Rizzo. Energy statistics: A class of statistics based on distances. 2013.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tfp_seg import _checks, _seeds, protocols
from tfp_seg import metrics as metrics_lib
from tfp_seg.calibration._fitted import FittedTemperature
from tfp_seg.calibration.sample_control import (
    _check_head,
    _class_scale_vector,
    _per_component,
    _positive_number,
    scale_class_covariance,
    with_temperature,
)
from tfp_seg.models import sampling

__all__ = ["ControlledSampler", "CovarianceTemperature"]

_TERMS = ("ged", "cross", "sample_diversity", "reference_diversity")
DEFAULT_TEMPERATURES = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)


def _model_head(model):
    head = getattr(model, "head", None)
    if not callable(model) or head is None:
        raise ValueError(
            "`model` must be a trained tfp_seg model with a covariance `head` (a "
            "ProbabilisticSegmenter with a LowRankLogits, HeteroscedasticLogits or "
            f"MixtureLowRankLogits head); got {type(model).__name__}."
        )
    try:
        _check_head(head)
    except ValueError as exc:
        raise ValueError(f"`model`'s head: {exc}") from None
    return head


def _temperature_arg(temperature, head):
    """A float, or for a mixture head a float or a tuple of K floats."""
    if isinstance(head, protocols.MixtureHead) and np.ndim(temperature) > 0:
        values = _per_component(temperature, head.num_components, _positive_number, 0)
        return tuple(float(v) for v in values)
    return _positive_number(temperature)


def _class_scales_arg(class_scales, head) -> Optional[np.ndarray]:
    """None, `[C]` scales, or for a mixture head `[K, C]` (per component)."""
    if class_scales is None:
        return None
    c = head.num_classes
    if isinstance(head, protocols.MixtureHead):
        scales = _per_component(
            class_scales, head.num_components, lambda v: _class_scale_vector(v, c), 1
        )
        # One shared vector stays one (the same control as the `[C]` form).
        return scales[0] if np.all(scales == scales[0]) else scales
    return _class_scale_vector(class_scales, c)


def _controlled_params(params, head, temperature, class_scales) -> tf.Tensor:
    """`with_temperature(scale_class_covariance(params, head, class_scales), head, t)`, each
    step left out where it is the identity (no scales, `t = 1`)."""
    if class_scales is not None:
        params = scale_class_covariance(params, head, class_scales)
    if temperature != 1.0:
        params = with_temperature(params, head, temperature)
    return tf.convert_to_tensor(params)


class ControlledSampler(sampling.Sampler):
    """A trained covariance-head model whose samples come from its controlled distribution.

    Wraps a `ProbabilisticSegmenter` with a low-rank (SSN), heteroscedastic or mixture
    head; every read-out (`sample`, `sample_logits`, `probability_samples`, `predict_proba`)
    first runs the model, then rescales the head's covariance (see the module docstring), then
    draws with the head's own samplers (its exact label sampler for `sample`, its estimator
    for `predict_proba`). Argument checks, defaults and seeds per batch are the model's
    (`tfp_seg.models.sampling.Sampler`); for the same seed, `temperature=1` and no
    `class_scales` give exactly the model's draws, and the read-outs run compiled as the
    model's do.

    Args:
      model: a `ProbabilisticSegmenter` (or any model with a covariance `head` whose call
        returns the head's packed params).
      temperature: `t > 0`, the whole covariance times `t` (`with_temperature`); for a
        mixture head also K values, one per component.
      class_scales: optional per-class scales `s_c >= 0` (`scale_class_covariance`): C numbers
        or a `{class: scale}` dict (others 1); for a mixture head also K such entries.

    #### Examples

    ```python
    fitted = tfp_seg.calibration.CovarianceTemperature().fit(model, val_images, val_raters)
    sampler = fitted.wrap(model)                      # == ControlledSampler(model, t*)
    labels = sampler.sample(test_images, num_samples=16)   # ==> [16, B, H, W]
    from tfp_seg.evaluation import evaluate_ambiguous
    report = evaluate_ambiguous(sampler, test_data, num_samples=16)
    report["ged"]                                  # ==> e.g. 0.06
    ```
    """

    _compile_read_outs = True

    def __init__(self, model, temperature=1.0, class_scales=None):
        self.head = _model_head(model)
        self.model = model
        self._temperature = _temperature_arg(temperature, self.head)
        self._class_scales = _class_scales_arg(class_scales, self.head)

    @property
    def temperature(self):
        """The covariance temperature (a float; for a mixture head maybe K floats)."""
        return self._temperature

    @property
    def class_scales(self) -> Optional[np.ndarray]:
        """The per-class scales `[C]` (or `[K, C]`), or None. Read-only: a new control is a
        new `ControlledSampler` (the compiled read-outs are traced with these values)."""
        return None if self._class_scales is None else self._class_scales.copy()

    @property
    def built(self) -> bool:
        """Whether the model is built (an unbuilt one builds eagerly on the first call)."""
        return bool(getattr(self.model, "built", True))

    @property
    def input_spatial_dims(self):
        return getattr(self.model, "input_spatial_dims", None)

    @property
    def default_num_samples(self) -> int:
        return getattr(self.model, "default_num_samples", sampling.DEFAULT_NUM_SAMPLES)

    def _read_out_key(self) -> tuple:
        # The model's head settings are baked into the traced read-outs as they are into the
        # model's own (a head changed in place gets a fresh trace here too).
        key = getattr(self.model, "_read_out_key", None)
        return key() if callable(key) else ()

    def control(self, params) -> tf.Tensor:
        """The controlled packed params of the model's `params` `[B, *S, P]`."""
        return _controlled_params(params, self.head, self._temperature, self._class_scales)

    def control_config(self) -> dict:
        """`{"temperature": t, "class_scales": [...] or None}` (JSON), as exports record it."""
        t = self._temperature
        scales = None if self._class_scales is None else self._class_scales.tolist()
        return {"temperature": list(t) if isinstance(t, tuple) else t, "class_scales": scales}

    def _params(self, images) -> tf.Tensor:
        return self.control(self.model(images, training=False))

    def _sample_logits_tensor(self, images, num_samples: int, seed=None, antithetic=False):
        return self.head.sample_logits(
            self._params(images), num_samples, seed=seed, antithetic=antithetic
        )

    def _sample_labels_tensor(self, images, num_samples: int, seed=None, antithetic=False):
        return self.head.sample_labels(
            self._params(images), num_samples, seed=seed, antithetic=antithetic
        )

    def _mean_probabilities(self, images, num_samples: int, seed=None) -> tf.Tensor:
        return self.head.mean_probabilities(
            self._params(images), num_samples=num_samples, seed=seed
        )

    def __repr__(self):
        scales = None if self.class_scales is None else self.class_scales.tolist()
        return (
            f"ControlledSampler({type(self.model).__name__}, temperature={self.temperature!r}, "
            f"class_scales={scales!r})"
        )


def _check_temperatures(temperatures) -> tuple:
    try:
        values = [float(t) for t in temperatures]
    except (TypeError, ValueError):
        raise ValueError(
            f"`temperatures` must be a sequence of positive numbers; got {temperatures!r}."
        ) from None
    if not values or not all(math.isfinite(t) and t > 0 for t in values):
        raise ValueError(
            f"`temperatures` must be a non-empty sequence of finite numbers > 0; got {values}."
        )
    if len(set(values)) != len(values):
        raise ValueError(f"`temperatures` must not repeat a value; got {values}.")
    return tuple(sorted(values))


def unbiased_ged(
    samples,
    references,
    num_classes: int,
    reference_weights=None,
    ignore_label: Optional[int] = None,
    spatial_dims: int = 2,
) -> dict:
    """Batch-averaged `D_GED^2` of `samples [B, N, *S]` (`N >= 2`) against `references
    [B, K, *S]` with the diversity of the samples as a U-statistic (module docstring); a dict
    `{"ged", "cross", "sample_diversity", "reference_diversity"}`."""
    n = np.shape(samples)[1] if np.ndim(samples) >= 2 else 0
    if n < 2:
        raise ValueError(
            f"`samples` must have shape [B, N, *S] with N >= 2; got {np.shape(samples)}."
        )
    terms = metrics_lib.generalized_energy_distance(
        samples,
        references,
        num_classes,
        reference_weights=reference_weights,
        return_terms=True,
        ignore_label=ignore_label,
        spatial_dims=spatial_dims,
    )
    # Uniform sample weights: the V-statistic's N self-pairs have d = 0, so U = V N / (N - 1).
    sample_div = terms["sample_diversity"] * n / (n - 1)
    return {
        "ged": 2.0 * terms["cross"] - sample_div - terms["reference_diversity"],
        "cross": terms["cross"],
        "sample_diversity": sample_div,
        "reference_diversity": terms["reference_diversity"],
    }


class CovarianceTemperature(FittedTemperature):
    """The covariance temperature of a trained covariance head, chosen on annotated images.

    `fit` draws `num_samples` label maps per image at every candidate temperature (the same
    seed for all, see the module docstring) and keeps the one with the lowest GED of the
    samples to the annotations; `wrap(model)` returns the `ControlledSampler` that samples
    at it, `scale_params(params, head)` the packed params (`with_temperature`) for exporting.

    The GED is averaged over the images of `fit`; use held-out (validation) images, never the
    test split. A grid search, not an optimiser: GED estimates from label maps are not smooth
    in `t`, and the grid's values are kept (`ged_by_temperature`, `terms_by_temperature`) so
    the curve can be inspected. The choice balances the samples' spread against their
    distance to the annotations; when the model's samples are wrong for another reason
    (in-between or wrong shapes rather than too much or too little spread), no temperature
    fixes it and the curve is flat: the chosen `t` then follows the Monte Carlo and rater
    noise of the fit (three default-job runs on the built-in data, 4 raters per image: 0.7,
    1.5 and 1.0, where the exact validation minimum is 1.0-1.1), so compare `ged_after` with
    `ged_before` before using it.

    Args:
      temperatures: the candidate temperatures (finite, > 0; 1.0 is always added, so that
        `ged_before` is measured on the same draws).
      num_samples: label maps per image and temperature (>= 2).
      seed: the seed of the draws (an int or a pair; the same for every candidate).
      batch_size: images per forward pass.

    #### Examples

    ```python
    fitted = tfp_seg.calibration.CovarianceTemperature().fit(model, val.images, val.annotations)
    fitted.temperature                       # ==> e.g. 1.1
    fitted.ged_before                        # ==> e.g. 0.06
    sampler = fitted.wrap(model)             # a ControlledSampler at t*
    ```
    """

    def __init__(
        self,
        temperatures: Sequence[float] = DEFAULT_TEMPERATURES,
        num_samples: int = 16,
        seed=0,
        batch_size: Optional[int] = 32,
    ):
        values = _check_temperatures(temperatures)
        self.temperatures = values if 1.0 in values else tuple(sorted(values + (1.0,)))
        self.num_samples = _checks.positive_int(num_samples, "num_samples")
        if self.num_samples < 2:
            raise ValueError("`num_samples` must be >= 2 (a diversity needs pairs); got 1.")
        self.seed = _seeds.check_seed(seed)
        if self.seed is None:
            raise ValueError("`seed` must be an int or a pair of ints (the grid's common draws).")
        self.batch_size = _checks.positive_int(batch_size, "batch_size", optional=True)
        self._temperature: Optional[float] = None
        self.ged_by_temperature: dict = {}
        self.terms_by_temperature: dict = {}
        self.class_scales: Optional[np.ndarray] = None

    @property
    def ged_before(self) -> Optional[float]:
        """The GED at `t = 1` (the model as trained), on `fit`'s draws."""
        return self.ged_by_temperature.get(1.0)

    @property
    def ged_after(self) -> Optional[float]:
        """The GED at the fitted temperature, on `fit`'s draws."""
        return self.ged_by_temperature.get(self._temperature) if self.fitted else None

    def fit(
        self,
        model,
        images,
        annotations,
        reference_weights=None,
        ignore_label: Optional[int] = None,
        class_scales=None,
    ) -> "CovarianceTemperature":
        """Choose the temperature of `model` on `images [B, *S, ch]` and their annotations
        `[B, K, *S]` (K raters, or the exact modes with `reference_weights [K]` / `[B, K]`).

        `class_scales` (optional) are applied before the temperature, as in
        `ControlledSampler`; `wrap` and `scale_params` apply them too. The model runs once
        per batch of `batch_size` images, and the GED is accumulated batch by batch (memory
        holds one batch's samples). Returns self.
        """
        head = _model_head(model)
        dims = getattr(model, "input_spatial_dims", None) or 2
        annotations = np.asarray(annotations)
        shown = images["images"] if isinstance(images, dict) else images
        b = np.shape(shown)[0] if np.ndim(shown) > 0 else None
        if annotations.ndim != dims + 2 or annotations.shape[0] != b:
            raise ValueError(
                f"`annotations` must have shape [B, K, *S] with B = {b} (the images' batch) and "
                f"{dims} spatial axes; got {annotations.shape}."
            )
        weights = None if reference_weights is None else np.asarray(reference_weights)
        per_image = weights is not None and weights.ndim == 2
        # The model runs once per batch; every temperature rescales the same params and draws
        # with the same batch seed as `ControlledSampler(model, t).sample(images, N, seed,
        # batch_size)` would (Sampler._batches), so `fit`'s draws are the wrapped model's.
        base = ControlledSampler(model, class_scales=class_scales)
        sums = {t: dict.fromkeys(_TERMS, 0.0) for t in self.temperatures}
        start = 0
        for xb, seed in base._batches(images, self.batch_size, self.seed):
            params = base._params(xb)
            nb = int(params.shape[0])
            refs = annotations[start : start + nb]
            w = weights[start : start + nb] if per_image else weights
            for t in self.temperatures:
                p = _controlled_params(params, head, t, None)
                labels = head.sample_labels(p, self.num_samples, seed=seed, antithetic=False)
                result = unbiased_ged(
                    np.moveaxis(np.asarray(labels), 0, 1),
                    refs,
                    head.num_classes,
                    reference_weights=w,
                    ignore_label=ignore_label,
                    spatial_dims=dims,
                )
                for key in _TERMS:
                    sums[t][key] += result[key] * nb
            start += nb
        terms = {t: {k: v / start for k, v in sums[t].items()} for t in self.temperatures}
        self.terms_by_temperature = terms
        self.ged_by_temperature = {t: terms[t]["ged"] for t in self.temperatures}
        ged = self.ged_by_temperature
        self._temperature = min(self.temperatures, key=lambda t: (ged[t], abs(math.log(t))))
        self.class_scales = base.class_scales
        return self

    def wrap(self, model) -> ControlledSampler:
        """`ControlledSampler(model, temperature=self.temperature, class_scales=...)` with the
        class scales `fit` was given."""
        return ControlledSampler(
            model, temperature=self.temperature, class_scales=self.class_scales
        )

    def scale_params(self, params, head) -> tf.Tensor:
        """The controlled packed params: `with_temperature(params, head, self.temperature)`,
        after `scale_class_covariance` with the class scales `fit` was given (the params of
        `wrap(model)`, as `ControlledSampler.control` gives them)."""
        return _controlled_params(params, head, self.temperature, self.class_scales)

    def __repr__(self):
        return f"CovarianceTemperature(temperature={self.temperature:.4g}, fitted={self.fitted})"
