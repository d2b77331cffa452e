"""SavedModel and ONNX export of a `MixtureLowRankLogits` head, with parity and moments.

The exporters check parity themselves (deterministic outputs within 1e-4, seeded samples);
here, in addition: the mixture outputs of the `params` signature / ONNX graph equal the head's
`mixture_parts`, seeded SavedModel samples equal `head.sample_logits(..., antithetic=False)`,
and the exported samples have the mixture's per-logit mean and variance within 5 standard
errors (`Var(mean_hat) = var / n`, `Var(var_hat) = (mu_4 - var^2) / n`, with the mixture's
fourth central moment `mu_4 = sum_k pi_k (a^4 + 6 a^2 s + 3 s^2)`, `a = mu_k - mu`,
`s = var_k`).
"""

from __future__ import annotations

import json

import keras
import numpy as np
import onnx
import onnxruntime
import pytest
import tensorflow as tf
import tf2onnx  # noqa: F401  (a test dependency: the [test] extra installs it)

from tfp_seg import export
from tfp_seg.layers import MixtureLowRankLogits
from tfp_seg.models import ProbabilisticSegmenter, UNet

H = W = 16
C, K, R = 3, 2, 2
EXPORT_N = 8
K_SIGMA = 5.0
MIXTURE_OUTPUTS = ("mixture_logits", "component_loc", "component_cov_factor", "component_cov_diag")


def _images(batch, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, H, W, 1)).astype("float32")


@pytest.fixture(scope="module")
def model():
    keras.utils.set_random_seed(5)
    model = ProbabilisticSegmenter(
        UNet(base_filters=4, depth=1), MixtureLowRankLogits(C, num_components=K, rank=R)
    )
    model.build((None, H, W, 1))
    # Unequal weights and components apart, so that the mixture is not one Gaussian.
    kernel, bias = model.head.gate.get_weights()
    model.head.gate.set_weights([kernel, np.array([0.9, -0.6], "float32")])
    kernel, bias = model.head.projection.get_weights()
    s = C * (2 + R)
    bias[s : s + C] += 2.0  # component 1's mean
    model.head.projection.set_weights([kernel, bias])
    return model


def _moments(model, image):
    """Analytic per-logit mean, variance and fourth central moment of the mixture `[H, W, C]`."""
    params = model(image)
    weights = np.asarray(model.head.mixture_weights(params), np.float64)[0]  # [K]
    _, loc, factor, diag = (np.asarray(t, np.float64)[0] for t in model.head.mixture_parts(params))
    var_k = diag + np.sum(factor**2, axis=-1)  # [K, H, W, C]
    mean = np.einsum("k,khwc->hwc", weights, loc)
    a = loc - mean
    var = np.einsum("k,khwc->hwc", weights, var_k + a**2)
    mu4 = np.einsum("k,khwc->hwc", weights, a**4 + 6 * a**2 * var_k + 3 * var_k**2)
    return mean, var, mu4


def _check_moments(samples, mean, var, mu4):
    n = samples.shape[0]
    mean_hat = samples.mean(axis=0)
    var_hat = samples.var(axis=0, ddof=1)
    assert np.all(np.abs(mean_hat - mean) <= K_SIGMA * np.sqrt(var / n)), np.max(
        np.abs(mean_hat - mean) / np.sqrt(var / n)
    )
    se_var = np.sqrt((mu4 - var**2) / n)
    assert np.all(np.abs(var_hat - var) <= K_SIGMA * se_var), np.max(np.abs(var_hat - var) / se_var)


def test_saved_model_of_a_mixture_head(model, tmp_path):
    version = export.saved_model(
        model, str(tmp_path / "savedmodels" / "mixture"), num_samples=EXPORT_N, max_num_samples=4096
    )
    loaded = tf.saved_model.load(version)
    images = _images(2)
    params = model(images)
    out = loaded.signatures["params"](images=tf.constant(images))
    expected = dict(zip(MIXTURE_OUTPUTS, model.head.mixture_parts(params), strict=True))
    for name in MIXTURE_OUTPUTS:
        np.testing.assert_allclose(np.asarray(out[name]), np.asarray(expected[name]), atol=1e-5)
    assert tuple(out["component_cov_factor"].shape) == (2, K, H, W, C, R)
    np.testing.assert_allclose(
        np.asarray(out["mean_logits"]), np.asarray(model.head.mean_logits(params)), atol=1e-5
    )
    config = json.loads(out["head_config"].numpy().decode())
    assert config["head"]["class_name"] == "MixtureLowRankLogits"
    assert set(MIXTURE_OUTPUTS) <= set(config["params_outputs"])

    seed = tf.constant([7, 8], tf.int64)
    sampled = loaded.signatures["sample"](
        images=tf.constant(images), num_samples=tf.constant(EXPORT_N), seed=seed
    )
    reference = model.head.sample_logits(params, EXPORT_N, seed=seed, antithetic=False)
    np.testing.assert_allclose(np.asarray(sampled["logits"]), np.asarray(reference), atol=1e-4)
    assert sampled["labels"].shape == (EXPORT_N, 2, H, W)

    image = _images(1, seed=3)
    many = loaded.signatures["sample"](
        images=tf.constant(image), num_samples=tf.constant(4000), seed=tf.constant([1, 2], tf.int64)
    )
    _check_moments(np.asarray(many["logits"], np.float64)[:, 0], *_moments(model, image))


def test_onnx_of_a_mixture_head(model, tmp_path):
    path = export.onnx(model, str(tmp_path / "mixture.onnx"), num_samples=EXPORT_N)
    proto = onnx.load(path)
    meta = json.loads({p.key: p.value for p in proto.metadata_props}["tfp_seg"])
    assert meta["head_config"]["head"]["class_name"] == "MixtureLowRankLogits"
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    assert set(MIXTURE_OUTPUTS) <= set(names)
    images = _images(3, seed=1)  # a batch size other than the check's: the batch is dynamic
    first = dict(zip(names, session.run(None, {"images": images}), strict=True))
    params = model(images)
    expected = dict(zip(MIXTURE_OUTPUTS, model.head.mixture_parts(params), strict=True))
    for name in MIXTURE_OUTPUTS:
        np.testing.assert_allclose(first[name], np.asarray(expected[name]), atol=1e-4)
    np.testing.assert_allclose(
        first["mean_logits"], np.asarray(model.head.mean_logits(params)), atol=1e-4
    )
    (second,) = session.run(["logit_samples"], {"images": images})
    assert np.abs(first["logit_samples"] - second).max() > 0.1  # fresh noise every run
    soft = np.exp(first["logit_samples"] - first["logit_samples"].max(-1, keepdims=True))
    soft /= soft.sum(-1, keepdims=True)
    np.testing.assert_allclose(first["probabilities"], soft.mean(0), atol=1e-5)

    # 256 copies of one image: each draws its own component and noise (2048 samples).
    image = _images(1, seed=3)
    (samples,) = session.run(["logit_samples"], {"images": np.repeat(image, 256, axis=0)})
    samples = np.asarray(samples, np.float64).reshape(-1, H, W, C)
    _check_moments(samples, *_moments(model, image))


def test_mc_dropout_over_a_mixture_head_exports_the_mixture_outputs():
    from tfp_seg.models import MCDropout

    keras.utils.set_random_seed(6)
    network = ProbabilisticSegmenter(
        UNet(base_filters=4, depth=1, dropout=0.2),
        MixtureLowRankLogits(C, num_components=K, rank=R),
    )
    network.build((None, H, W, 1))
    adapter = export.as_adapter(MCDropout(network, num_samples=2))
    images = tf.constant(_images(2, seed=4))
    out = adapter.params(adapter.prepare(images))
    params = network(images, training=False)  # dropout off, as the exported params
    for name, value in zip(MIXTURE_OUTPUTS, network.head.mixture_parts(params), strict=True):
        np.testing.assert_allclose(np.asarray(out[name]), np.asarray(value), atol=1e-5)
