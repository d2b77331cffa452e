"""Known-answer tests of `tfp_seg.evaluation.evaluate_ambiguous`.

The benchmark's label distribution is known exactly (modes `m_k` with weights `w_k` per image),
so a fake model that draws those modes with weights `v_k` has a closed-form expected report:

```none
D_kl = d(m_k, m_l)  (d = 1 - IoU, tfp_seg.metrics)
E[d(S,Y)]  = v^T D w      E[d(S,S')] = v^T D v  (independent S, S')      E[d(Y,Y')] = w^T D w
E[D_GED^2] = 2 v^T D w - v^T D v - w^T D w     (0 for v = w)
```

The evaluation's values are means over B images of per-image estimates that are independent
across images, so each is compared with its closed form within `Z` standard errors, the standard
error estimated from the per-image deviations from their own closed forms (the fake sampler is
replayed with the same seed to get the per-image values). With `Z = 4` a correct estimator fails
with probability ~6e-5 per comparison (normal approximation); the seeds are fixed anyway, so the
tests are deterministic.
"""

import numpy as np
import pytest

from tfp_seg import metrics
from tfp_seg.data import ambiguous_shapes
from tfp_seg.evaluation import evaluate_ambiguous

Z = 4.0  # standard errors
NUM_SAMPLES = 4  # small N: the V-statistic's bias, E[d(S,S')] / N, is large next to the MC error
C = 3


@pytest.fixture(scope="module")
def data():
    return ambiguous_shapes(num_images=256, image_size=32, num_annotations=4, max_objects=2, seed=5)


def _normalized(weights):
    w = np.asarray(weights, np.float64)
    return w / w.sum()


def _tilted(weights):
    """Known wrong mode weights: `v_k ~ w_k (k + 1)^2` (differs from w for >= 2 modes)."""
    return _normalized(_normalized(weights) * (np.arange(weights.size) + 1.0) ** 2)


class ModeSampler:
    """A fake model: logit samples whose arg max is mode k of image i with probability v_k.

    `v = weights_fn(w)` for the true weights `w` of the image (`weights_fn=None`: v = w, a
    perfect sampler). Only `sample_logits` is used by `evaluate_ambiguous`, which is called
    with `batch_size=None` (one batch): this fake draws all images in one call.
    """

    def __init__(self, data, weights_fn=None):
        self.data = data
        self.weights_fn = weights_fn or _normalized

    def mode_weights(self, i):
        modes, w = self.data.modes_of(i)
        return modes, _normalized(w), self.weights_fn(w)

    def sample_labels(self, num_samples, seed):
        # A seed stream unrelated to the evaluation's own oracle draws.
        rng = np.random.default_rng([int(seed), 2024])
        out = []
        for i in range(len(self.data)):
            modes, _, v = self.mode_weights(i)
            out.append(modes[rng.choice(len(v), size=num_samples, p=v)])
        return np.stack(out, axis=1)  # [N, B, H, W]

    def sample_logits(self, x, num_samples, seed=None, batch_size=None):
        assert np.array_equal(np.asarray(x), self.data.images)
        labels = self.sample_labels(num_samples, seed)
        return 10.0 * np.eye(C, dtype=np.float32)[labels]  # [N, B, H, W, C]


def _closed_form(sampler):
    """Per-image expected cross, sample diversity, reference diversity and D_GED^2."""
    rows = []
    for i in range(len(sampler.data)):
        modes, w, v = sampler.mode_weights(i)
        d = metrics.pairwise_iou_distance(modes, modes, C)
        cross, div_s, div_y = v @ d @ w, v @ d @ v, w @ d @ w
        rows.append((cross, div_s, div_y, 2 * cross - div_s - div_y))
    keys = ("cross", "div_s", "div_y", "ged")
    return {k: np.array(c) for k, c in zip(keys, zip(*rows, strict=True), strict=True)}


def _per_image(sampler, num_samples, seed):
    """Per-image unbiased estimates from the replayed samples: the V-statistic terms of
    `metrics.generalized_energy_distance`, with its sample diversity rescaled by N / (N - 1)
    (d(s, s) = 0, so this is the mean over pairs of distinct samples)."""
    s = sampler.sample_labels(num_samples, seed)
    cross, div_s = [], []
    for i in range(len(sampler.data)):
        modes, w, _ = sampler.mode_weights(i)
        t = metrics.generalized_energy_distance(
            s[:, i], modes, C, reference_weights=w, return_terms=True
        )
        cross.append(t["cross"])
        div_s.append(t["sample_diversity"] * num_samples / (num_samples - 1))
    return np.array(cross), np.array(div_s)


def _standard_error(values, expected):
    """SE of the mean of independent per-image values with known per-image means."""
    return float(np.sqrt(np.sum((values - expected) ** 2)) / values.size)


def test_perfect_sampler_matches_oracle(data):
    sampler = ModeSampler(data)
    report = evaluate_ambiguous(sampler, data, num_samples=NUM_SAMPLES, seed=11, batch_size=None)
    exact = _closed_form(sampler)
    np.testing.assert_allclose(exact["ged"], 0.0, atol=1e-12)
    cross, div_s = _per_image(sampler, NUM_SAMPLES, 11)
    ged = 2 * cross - div_s - exact["div_y"]
    assert report["ged"] == pytest.approx(ged.mean(), abs=1e-9)
    assert report["diversity"] == pytest.approx(div_s.mean(), abs=1e-9)
    se_ged = _standard_error(ged, 0.0)
    se_div = _standard_error(div_s, exact["div_y"])
    assert se_ged > 0 and se_div > 0

    # The reference side is exact.
    assert report["ged_reference_diversity"] == pytest.approx(exact["div_y"].mean(), abs=1e-9)
    assert report["oracle_diversity"] == pytest.approx(exact["div_y"].mean(), abs=1e-9)
    # Diversity of a perfect sampler == oracle diversity, within MC error. (The V-statistic
    # reads (N - 1) / N of it: 0.75 x ~0.45 here, ~9 standard errors below.)
    assert abs(report["diversity"] - report["oracle_diversity"]) <= Z * se_div, (
        report["diversity"],
        report["oracle_diversity"],
        se_div,
    )
    # GED of a perfect sampler == oracle GED, and both == 0 (the true D_GED^2), within MC error.
    # The oracle's sampler draws from the same distribution with the same estimator, so its
    # standard error is estimated by the model's.
    assert abs(report["ged"] - report["oracle_ged"]) <= Z * np.sqrt(2.0) * se_ged
    assert abs(report["ged"]) <= Z * se_ged, (report["ged"], se_ged)
    assert abs(report["oracle_ged"]) <= Z * se_ged, (report["oracle_ged"], se_ged)
    assert report["ged_cross"] == pytest.approx(cross.mean(), abs=1e-9)
    assert abs(report["ged_cross"] - exact["cross"].mean()) <= Z * _standard_error(
        cross, exact["cross"]
    )


def test_wrong_mode_weights_give_closed_form_ged(data):
    sampler = ModeSampler(data, weights_fn=_tilted)
    report = evaluate_ambiguous(sampler, data, num_samples=NUM_SAMPLES, seed=12, batch_size=None)
    exact = _closed_form(sampler)
    cross, div_s = _per_image(sampler, NUM_SAMPLES, 12)
    ged = 2 * cross - div_s - exact["div_y"]
    assert report["ged"] == pytest.approx(ged.mean(), abs=1e-9)
    se_ged = _standard_error(ged, exact["ged"])
    se_div = _standard_error(div_s, exact["div_s"])
    se_cross = _standard_error(cross, exact["cross"])

    expected_ged = float(exact["ged"].mean())  # mean of 2 v'Dw - v'Dv - w'Dw over images
    assert expected_ged > 8 * se_ged  # the wrong weights are clearly detectable
    assert abs(report["ged"] - expected_ged) <= Z * se_ged, (report["ged"], expected_ged, se_ged)
    assert abs(report["ged_cross"] - exact["cross"].mean()) <= Z * se_cross
    assert abs(report["ged_sample_diversity"] - exact["div_s"].mean()) <= Z * se_div
    assert abs(report["diversity"] - exact["div_s"].mean()) <= Z * se_div
    assert report["ged_reference_diversity"] == pytest.approx(exact["div_y"].mean(), abs=1e-9)
    # The oracle is unaffected by the model: its GED is 0 within MC error (its standard error is
    # of the order of the model's; allow twice it).
    assert abs(report["oracle_ged"]) <= 2 * Z * se_ged


def test_standard_errors_are_those_of_the_per_image_values_and_cover_the_truth(data):
    """`ged_se`, `diversity_se` are std(per-image, ddof=1) / sqrt(n) of the replayed per-image
    estimates; and they are calibrated: over 6 seeds the tilted sampler's GED lies within 4 of
    its SEs of the closed form, and the perfect sampler's (true value 0) too."""
    sampler = ModeSampler(data, weights_fn=_tilted)
    exact = _closed_form(sampler)
    n = len(data)
    for seed in range(6):
        report = evaluate_ambiguous(
            sampler, data, num_samples=NUM_SAMPLES, seed=seed, batch_size=None
        )
        cross, div_s = _per_image(sampler, NUM_SAMPLES, seed)
        ged = 2 * cross - div_s - exact["div_y"]
        assert report["ged_se"] == pytest.approx(ged.std(ddof=1) / np.sqrt(n), rel=1e-9)
        assert report["diversity_se"] == pytest.approx(div_s.std(ddof=1) / np.sqrt(n), rel=1e-9)
        assert abs(report["ged"] - exact["ged"].mean()) <= Z * report["ged_se"]
        assert abs(report["oracle_ged"]) <= Z * report["oracle_ged_se"]
        assert 0 < report["hm_iou_se"] < 0.05
    # the SE is not vacuous: the wrong weights' GED is many SEs from 0
    assert report["ged"] > 5 * report["ged_se"]
    first = data[:1]
    one = evaluate_ambiguous(
        ModeSampler(first, _tilted), first, num_samples=NUM_SAMPLES, seed=0, batch_size=None
    )
    assert one["ged_se"] == 0.0


def test_ged_terms_are_consistent(data):
    report = evaluate_ambiguous(
        ModeSampler(data, _tilted), data, num_samples=3, seed=1, batch_size=None
    )
    assert report["ged"] == pytest.approx(
        2 * report["ged_cross"]
        - report["ged_sample_diversity"]
        - report["ged_reference_diversity"],
        abs=1e-12,
    )
    assert report["diversity"] == pytest.approx(report["ged_sample_diversity"], abs=1e-12)
    assert report["num_samples"] == 3 and report["num_images"] == len(data)


def test_deterministic_model_has_zero_diversity(data):
    class Fixed(ModeSampler):
        def sample_labels(self, num_samples, seed):
            first = np.stack([self.data.modes_of(i)[0][0] for i in range(len(self.data))])
            return np.repeat(first[None], num_samples, axis=0)

    report = evaluate_ambiguous(Fixed(data), data, num_samples=2, seed=0, batch_size=None)
    assert report["diversity"] == 0.0 and report["ged_sample_diversity"] == 0.0
    assert report["oracle_diversity"] > 0.1


@pytest.mark.parametrize("num_samples", [1, 0, 2.5, True])
def test_num_samples_below_two_is_rejected(data, num_samples):
    with pytest.raises(ValueError, match="num_samples"):
        evaluate_ambiguous(ModeSampler(data), data, num_samples=num_samples)
