"""Tests for `tfp_seg.uncertainty`: the entropy / mutual-information decomposition."""

import numpy as np
import pytest
import tensorflow as tf
from scipy.special import softmax

import tfp_seg
from tfp_seg import calibration, uncertainty
from tfp_seg.models import wrappers
from tfp_seg.uncertainty import expected_entropy, mutual_information, predictive_entropy


def _prob_samples(shape, seed=0, concentration=0.5):
    """Dirichlet probability samples (some entries exactly 0 to exercise 0 log 0)."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet([concentration] * shape[-1], size=shape[:-1])
    p[0, ..., 0, :] = np.eye(shape[-1])[0]  # one-hot rows
    return p.astype("float32")


def _entropy_ref(p):
    out = 0.0
    for v in p:
        if v > 0:
            out -= v * np.log(v)
    return out


# --- decomposition -----------------------------------------------------------------------------
def test_entropies_match_numpy_loops():
    p = _prob_samples((5, 2, 3, 4, 3)).astype("float64")
    n, b, h, w, _ = p.shape
    total = np.zeros((b, h, w))
    aleatoric = np.zeros((b, h, w))
    for i in np.ndindex(b, h, w):
        total[i] = _entropy_ref(p[(slice(None),) + i].mean(0))
        aleatoric[i] = np.mean([_entropy_ref(p[(k,) + i]) for k in range(n)])
    np.testing.assert_allclose(predictive_entropy(p), total, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(expected_entropy(p), aleatoric, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(mutual_information(p), total - aleatoric, atol=1e-12)
    maps = uncertainty.uncertainty_maps(p)
    np.testing.assert_allclose(maps["mutual_information"], total - aleatoric, atol=1e-12)
    assert predictive_entropy(p).shape == (b, h, w)
    # float32 in, float32 out
    assert predictive_entropy(p.astype("float32")).dtype == np.float32


MAP_KEYS = {"predictive_entropy", "expected_entropy", "mutual_information", "variance"}


def test_uncertainty_maps_from_probabilities_and_from_logits_agree():
    """One implementation: the numpy maps of probability samples and the (export) tensor maps
    of logit samples have the same keys and values; `variance` is sum_c var_n(p_n)."""
    z = np.random.default_rng(3).normal(scale=3.0, size=(6, 2, 4, 5, 3)).astype("float32")
    p = softmax(z.astype("float64"), -1)
    maps = uncertainty.uncertainty_maps(p)
    graph = uncertainty.uncertainty_maps_from_logits(tf.constant(z))
    assert set(maps) == set(graph) == MAP_KEYS
    for key in MAP_KEYS:
        assert maps[key].shape == graph[key].shape == (2, 4, 5)
        np.testing.assert_allclose(graph[key].numpy(), maps[key], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps["variance"], p.var(axis=0, ddof=1).sum(-1), rtol=1e-10)
    np.testing.assert_allclose(maps["predictive_entropy"], predictive_entropy(p), rtol=1e-12)
    one = uncertainty.uncertainty_maps(p[:1])
    np.testing.assert_array_equal(one["variance"], 0.0)
    np.testing.assert_allclose(one["mutual_information"], 0.0, atol=1e-12)
    per_image = uncertainty.uncertainty_maps(p.astype("float32"), per_image=True)
    assert set(per_image) == MAP_KEYS
    assert all(v.shape == (2,) and v.dtype == np.float32 for v in per_image.values())


def test_mutual_information_zero_for_identical_samples_and_nonnegative():
    one = _prob_samples((1, 2, 4, 4, 3), seed=1)
    same = np.repeat(one, 6, axis=0)
    np.testing.assert_allclose(mutual_information(same), 0.0, atol=1e-6)
    np.testing.assert_allclose(predictive_entropy(same), expected_entropy(same), atol=1e-6)
    spread = _prob_samples((6, 2, 4, 4, 3), seed=2)
    mi = mutual_information(spread)
    assert np.all(mi >= 0)
    assert mi.mean() > 0.05  # disagreeing samples carry epistemic uncertainty
    # bounded by log C and by the total entropy
    assert np.all(mi <= predictive_entropy(spread) + 1e-6)
    assert np.all(predictive_entropy(spread) <= np.log(3) + 1e-6)


def test_per_image_averages_over_height_and_width():
    p = _prob_samples((4, 3, 5, 6, 2), seed=3)
    for fn in (predictive_entropy, expected_entropy, mutual_information):
        np.testing.assert_allclose(fn(p, per_image=True), fn(p).mean(axis=(1, 2)), rtol=1e-6)
        assert fn(p, per_image=True).shape == (3,)
    # without a batch axis: [N, H, W, C] -> [H, W] maps, scalar per image
    assert predictive_entropy(p[:, 0]).shape == (5, 6)
    assert predictive_entropy(p[:, 0], per_image=True).shape == ()


def test_decomposition_accepts_model_probability_samples():
    logits = tf.random.stateless_normal([6, 2, 4, 4, 3], seed=[1, 2])
    probs = tf.nn.softmax(logits)  # a tf.Tensor works too
    assert predictive_entropy(probs).shape == (2, 4, 4)


@pytest.mark.parametrize(
    "arg, kwargs, match",
    [
        (np.ones((3,), "float32"), {}, "prob_samples"),
        (np.full((2, 4, 3), 2.0, "float32"), {}, "softmax outputs, not logits"),
        (np.full((2, 4, 3), 0.2, "float32"), {}, "sum to 1"),
        (np.full((2, 4, 2), 0.5, "float32"), {"per_image": True}, "per_image"),
        (np.ones((2, 4, 1), "int32"), {}, "float"),
        (np.full((2, 4, 2), np.nan, "float32"), {}, "NaN"),
    ],
)
def test_decomposition_validates_input(arg, kwargs, match):
    with pytest.raises(ValueError, match=match):
        predictive_entropy(arg, **kwargs)


def test_public_names():
    assert tfp_seg.uncertainty is uncertainty
    assert "uncertainty" in tfp_seg.__all__
    for name in (
        "predictive_entropy",
        "expected_entropy",
        "mutual_information",
        "MCDropout",
        "DeepEnsemble",
        "TemperatureScaling",
        "scale_class_covariance",
        "with_temperature",
    ):
        assert name in uncertainty.__all__ and hasattr(uncertainty, name)


def test_moved_names_are_lazy_compatibility_aliases():
    """`tfp_seg.uncertainty.MCDropout` etc. still work, resolved on use: the module itself
    imports neither the models nor calibration (it is a leaf below them)."""
    import ast
    import inspect

    moved = {
        "MCDropout": wrappers,
        "DeepEnsemble": wrappers,
        "TemperatureScaling": calibration,
        "scale_class_covariance": calibration,
        "with_temperature": calibration,
    }
    for name, home in moved.items():
        assert getattr(uncertainty, name) is getattr(home, name)
        assert name in dir(uncertainty)
    namespace = {}
    exec("from tfp_seg.uncertainty import *", namespace)
    assert all(namespace[name] is getattr(home, name) for name, home in moved.items())
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        uncertainty.nope  # noqa: B018
    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(uncertainty))):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert not {m for m in imported if m and m.startswith("tfp_seg")}, imported


# --- volumes -----------------------------------------------------------------------------------
def test_volume_maps_are_the_maps_of_the_tall_image():
    """Per-voxel maps: `[N, B, D, H, W, C]` gives `[B, D, H, W]`, equal to the maps of the
    `[N, B, D*H, W, C]` image reshaped; `per_image` with `spatial_dims=3` averages D, H, W."""
    n, b, d, h, w, c = 5, 2, 3, 4, 5, 3
    p = _prob_samples((n, b, d, h, w, c), seed=3)
    volume = uncertainty.uncertainty_maps(p)
    image = uncertainty.uncertainty_maps(p.reshape(n, b, d * h, w, c))
    for key, value in volume.items():
        assert value.shape == (b, d, h, w)
        np.testing.assert_allclose(value.reshape(b, d * h, w), image[key], rtol=1e-6)
    per_volume = uncertainty.uncertainty_maps(p, per_image=True, spatial_dims=3)
    per_image = uncertainty.uncertainty_maps(p.reshape(n, b, d * h, w, c), per_image=True)
    for key, value in per_volume.items():
        assert value.shape == (b,)
        np.testing.assert_allclose(value, per_image[key], rtol=1e-5)
    # Brute force: the predictive entropy of one voxel, and the mean over one volume.
    assert volume["predictive_entropy"][1, 2, 3, 4] == pytest.approx(
        _entropy_ref(p[:, 1, 2, 3, 4].astype(np.float64).mean(0)), rel=1e-5
    )
    assert predictive_entropy(p, per_image=True, spatial_dims=3)[1] == pytest.approx(
        np.mean(volume["predictive_entropy"][1], dtype=np.float64), rel=1e-5
    )
    for fn in (expected_entropy, mutual_information):
        assert fn(p, per_image=True, spatial_dims=3).shape == (b,)
    # The default spatial_dims=2 averages the last two axes only: [B, D] for a volume.
    assert predictive_entropy(p, per_image=True).shape == (b, d)


def test_volume_maps_from_logits():
    logits = tf.random.stateless_normal([4, 2, 3, 4, 5, 3], seed=[3, 4])
    maps = uncertainty.uncertainty_maps_from_logits(logits)
    ref = uncertainty.uncertainty_maps(softmax(logits.numpy().astype(np.float64), axis=-1))
    for key, value in maps.items():
        assert value.shape == (2, 3, 4, 5)
        np.testing.assert_allclose(value.numpy(), ref[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("spatial_dims", [1, 4, 2.0, True, "3"])
def test_spatial_dims_is_checked(spatial_dims):
    p = _prob_samples((3, 2, 3, 4, 5, 2))
    with pytest.raises(ValueError, match="`spatial_dims` must be 2"):
        predictive_entropy(p, per_image=True, spatial_dims=spatial_dims)


def test_per_image_volume_needs_the_spatial_axes():
    with pytest.raises(ValueError, match=r"\[N, \.\.\., D, H, W, C\] \(spatial_dims=3\)"):
        predictive_entropy(_prob_samples((3, 4, 5, 2)), per_image=True, spatial_dims=3)
