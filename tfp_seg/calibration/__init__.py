"""Post-hoc calibration and control of the logits distribution of a trained model.

- `TemperatureScaling` (Guo et al., 2017): one temperature `T`, fitted on validation logits
  (`fit`) or on Monte Carlo predictive probabilities of logit samples (`fit_samples`), and the
  packed head parameters of the calibrated distribution (`scale_params`).
- Control of a low-rank (SSN) or heteroscedastic logits distribution after inference:
  `scale_class_covariance` (per class) and `with_temperature` (whole covariance) return new
  packed parameters (Monteiro et al., 2020, Sec. 5); for a mixture head
  (`MixtureLowRankLogits`) the same controls apply to every component, or per component;
  `ControlledSampler` wraps a trained model so that all its read-outs (and the evaluation
  functions) draw from the controlled distribution, and `CovarianceTemperature` chooses the
  covariance temperature on held-out annotated images by the GED of the samples.
- Conformal calibration with finite-sample guarantees on held-out images:
  `ConformalRiskControl` (a foreground threshold whose masks have expected false-negative
  rate <= alpha; Angelopoulos et al., 2022) and `ConformalPredictionSets` (pixel-wise LAC /
  APS class sets with marginal coverage >= 1 - alpha).

These work on logits and head parameters, so they sit above the models in the package's
layering (DESIGN section 4); `tfp_seg.uncertainty` keeps compatibility aliases of them.

Modules (every name is importable from `tfp_seg.calibration`):

```none
temperature.py     TemperatureScaling
sample_control.py  scale_class_covariance, with_temperature
controlled.py      ControlledSampler, CovarianceTemperature
conformal.py       ConformalRiskControl, ConformalPredictionSets
```

#### References

[1] Guo et al. On Calibration of Modern Neural Networks. ICML 2017.
[2] Monteiro et al. Stochastic Segmentation Networks. NeurIPS 2020.
[3] Angelopoulos et al. Conformal Risk Control. ICLR 2024.
"""

from tfp_seg.calibration.conformal import ConformalPredictionSets, ConformalRiskControl
from tfp_seg.calibration.controlled import ControlledSampler, CovarianceTemperature
from tfp_seg.calibration.sample_control import scale_class_covariance, with_temperature
from tfp_seg.calibration.temperature import TemperatureScaling

__all__ = [
    "ConformalPredictionSets",
    "ConformalRiskControl",
    "ControlledSampler",
    "CovarianceTemperature",
    "TemperatureScaling",
    "scale_class_covariance",
    "with_temperature",
]
