"""SavedModel and ONNX export of `calibration.ControlledSampler`: every output is the
controlled distribution's (params, seeded samples), and the export records the control."""

from __future__ import annotations

import json

import keras
import numpy as np
import onnx
import onnxruntime
import tensorflow as tf
import tf2onnx  # noqa: F401  (a test dependency: the [test] extra installs it)

from tfp_seg import export
from tfp_seg.calibration import ControlledSampler
from tfp_seg.layers import LowRankLogits
from tfp_seg.models import ProbabilisticSegmenter, UNet

H = W = 8
C, R, N = 3, 2, 4


def _sampler():
    keras.utils.set_random_seed(2)
    model = ProbabilisticSegmenter(UNet(base_filters=4, depth=1), LowRankLogits(C, rank=R))
    model.build((None, H, W, 1))
    return ControlledSampler(model, temperature=3.0, class_scales={2: 0.5})


def _images(batch, seed=0):
    return np.random.default_rng(seed).normal(size=(batch, H, W, 1)).astype("float32")


def test_saved_model_of_a_controlled_sampler(tmp_path):
    sampler = _sampler()
    version = export.saved_model(sampler, str(tmp_path / "controlled"), num_samples=N)
    loaded = tf.saved_model.load(version)
    images = _images(2)
    out = loaded.signatures["params"](images=tf.constant(images))
    controlled = sampler.control(sampler.model(images, training=False))
    np.testing.assert_allclose(np.asarray(out["params"]), np.asarray(controlled), atol=1e-5)
    _, factor, diag = sampler.head.covariance_parts(controlled)
    np.testing.assert_allclose(np.asarray(out["cov_diag"]), np.asarray(diag), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(out["cov_factor"]), np.asarray(factor), atol=1e-5)
    # ... and not the model's own covariance
    _, own_factor, _ = sampler.head.covariance_parts(sampler.model(images, training=False))
    assert np.abs(np.asarray(out["cov_factor"]) - np.asarray(own_factor)).max() > 1e-2
    config = json.loads(out["head_config"].numpy().decode())
    assert config["control"] == {"temperature": 3.0, "class_scales": [1.0, 1.0, 0.5]}
    seed = tf.constant([3, 4], tf.int64)
    sampled = loaded.signatures["sample"](
        images=tf.constant(images), num_samples=tf.constant(N), seed=seed
    )
    reference = sampler.head.sample_logits(controlled, N, seed=seed, antithetic=False)
    np.testing.assert_allclose(np.asarray(sampled["logits"]), np.asarray(reference), atol=1e-4)


def test_onnx_of_a_controlled_sampler(tmp_path):
    sampler = _sampler()
    path = export.onnx(sampler, str(tmp_path / "controlled.onnx"), num_samples=N)
    meta = json.loads({p.key: p.value for p in onnx.load(path).metadata_props}["tfp_seg"])
    assert meta["head_config"]["control"]["temperature"] == 3.0
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    images = _images(3, seed=1)
    got = dict(zip(names, session.run(None, {"images": images}), strict=True))
    controlled = sampler.control(sampler.model(images, training=False))
    _, _, diag = sampler.head.covariance_parts(controlled)
    np.testing.assert_allclose(got["cov_diag"], np.asarray(diag), rtol=1e-4)
