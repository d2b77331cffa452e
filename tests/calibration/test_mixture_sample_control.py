"""The SSN sample controls on a mixture head, for every component or per component.

```none
scale_class_covariance   Sigma_k' = S_k Sigma_k S_k   (S_k = diag(s_k[class(i)])), mu_k, pi kept
with_temperature         Sigma_k' = t_k Sigma_k                                    mu_k, pi kept
TemperatureScaling       with the same noise, every sample of the new params is the old / T
```
Checked on the dense component covariances (`distribution(params).components_distribution`).
"""

import numpy as np
import pytest

from tfp_seg.calibration import TemperatureScaling, scale_class_covariance, with_temperature
from tfp_seg.layers import MixtureLowRankLogits

C, K = 3, 2


def _params(head, seed=0):
    rng = np.random.default_rng(seed)
    parts = []
    for _ in range(head.num_components):
        parts += [
            rng.normal(size=(1, 2, 2, C)),
            rng.uniform(-1, 1, size=(1, 2, 2, C)),  # D ~ 0.4..2.7 >> epsilon
            rng.normal(size=(1, 2, 2, C * head.rank)),
        ]
    parts.append(np.broadcast_to(rng.normal(size=(1, 1, 1, K)), (1, 2, 2, K)))
    return np.concatenate(parts, -1).astype("float32")


def _parts(head, params):
    dist = head.distribution(params)
    covs = np.asarray(dist.components_distribution.covariance())[0]  # [K, E, E]
    return covs, np.asarray(dist.loc)[0], np.asarray(head.mixture_logits(params))


CLS = np.arange(2 * 2 * C) % C  # the class of each index of the flattened [H, W, C] event


@pytest.mark.parametrize(
    "class_scales, per_component",
    [
        ([0.5, 1.0, 3.0], [[0.5, 1.0, 3.0]] * K),
        ({1: 2.5}, [[1.0, 2.5, 1.0]] * K),
        ([[0.5, 1.0, 3.0], [2.0, 0.25, 1.0]], [[0.5, 1.0, 3.0], [2.0, 0.25, 1.0]]),
        ([{0: 2.0}, {2: 0.5}], [[2.0, 1.0, 1.0], [1.0, 1.0, 0.5]]),
    ],
    ids=["all-vector", "all-dict", "per-component", "per-component-dicts"],
)
def test_scale_class_covariance_scales_each_components_class_blocks(class_scales, per_component):
    head = MixtureLowRankLogits(C, num_components=K, rank=2)
    params = _params(head)
    covs, loc, logits = _parts(head, params)
    new_covs, new_loc, new_logits = _parts(head, scale_class_covariance(params, head, class_scales))
    for k, scales in enumerate(np.asarray(per_component)):
        s = scales[CLS]
        np.testing.assert_allclose(new_covs[k], np.outer(s, s) * covs[k], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new_loc, loc, atol=1e-6)
    np.testing.assert_allclose(new_logits, logits, atol=1e-6)
    assert np.abs(new_covs - covs).max() > 0.1  # the control changed something


@pytest.mark.parametrize("t, per_component", [(2.0, [2.0, 2.0]), ([0.5, 3.0], [0.5, 3.0])])
def test_with_temperature_scales_each_components_covariance(t, per_component):
    head = MixtureLowRankLogits(C, num_components=K, rank=2)
    params = _params(head, seed=1)
    covs, loc, logits = _parts(head, params)
    new_covs, new_loc, new_logits = _parts(head, with_temperature(params, head, t))
    for k, tk in enumerate(per_component):
        np.testing.assert_allclose(new_covs[k], tk * covs[k], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(new_loc, loc, atol=1e-6)
    np.testing.assert_allclose(new_logits, logits, atol=1e-6)


def test_temperature_scaling_divides_every_sample_by_t():
    head = MixtureLowRankLogits(C, num_components=K, rank=2)
    params = _params(head, seed=2)
    rng = np.random.default_rng(3)
    noise = (rng.uniform(size=(5, 1)), rng.normal(size=(5, 1, 2)), rng.normal(size=(5, 1, 2, 2, C)))
    # over-confident logits of random labels: a fitted T well above 1
    logits = 4.0 * rng.normal(size=(500, C))
    ts = TemperatureScaling().fit(logits, rng.integers(0, C, size=500))
    t = ts.temperature
    assert t > 1.5
    scaled = ts.scale_params(params, head)
    before = np.asarray(head.sample_logits(params, 5, antithetic=False, noise=noise))
    after = np.asarray(head.sample_logits(scaled, 5, antithetic=False, noise=noise))
    np.testing.assert_allclose(after, before / t, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda p, h: scale_class_covariance(p, h, [[1.0, 2.0, 1.0]] * 3),
            "one entry per component",
        ),
        (lambda p, h: scale_class_covariance(p, h, [[1.0, -1.0, 1.0]] * 2), "class_scales"),
        (lambda p, h: scale_class_covariance(p, h, [1.0, 2.0]), "class_scales"),
        (lambda p, h: with_temperature(p, h, [1.0, 0.0]), "`t`"),
        (lambda p, h: with_temperature(p, h, [1.0, 2.0, 3.0]), "one entry per component"),
        (lambda p, h: with_temperature(p, h, "hot"), "`t`"),
    ],
)
def test_mixture_controls_validate(call, match):
    head = MixtureLowRankLogits(C, num_components=K, rank=2)
    with pytest.raises(ValueError, match=match):
        call(_params(head), head)
